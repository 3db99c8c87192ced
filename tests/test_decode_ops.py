"""The C decode-step ops (kernels.rms_norm, kernels.mla_decoder) against torch re-derivations in float64
(and, for kv_b as GGML blocks, the gguf package's dequantizer)."""
import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as GQT

from hybrid_k2 import kernels


def rope_rot(n_pairs: int, pos: int) -> torch.Tensor:
    ang = pos * 0.37 / (1 + torch.arange(n_pairs, dtype=torch.float64))
    return torch.stack([ang.cos(), ang.sin()], -1).float().contiguous()    # [rope/2, 2]


def rotate(x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    a, b = x[..., 0::2], x[..., 1::2]
    c, s = rot[:, 0].double(), rot[:, 1].double()
    return torch.stack([a * c - b * s, a * s + b * c], -1).flatten(-2)


def expanded_attention(q, kv_a, rot, kv_prev, pe_prev, wkv_b, norm, H, nope, rope, vd, scale, eps):
    """Per-head keys and values expanded from the latents (no absorption), float64."""
    R = wkv_b.shape[1]
    q, kv_a, wkv_b = q.double().view(H, nope + rope), kv_a.double(), wkv_b.double().view(H, nope + vd, R)
    lat = kv_a[:R] / torch.sqrt(kv_a[:R].pow(2).mean() + eps) * norm.double()
    c = torch.cat([kv_prev.double(), lat[None]])                    # [S, R]
    r = torch.cat([pe_prev.double(), rotate(kv_a[R:], rot)[None]])  # [S, rope]
    k = torch.einsum("hdr,sr->shd", wkv_b[:, :nope], c)             # [S, H, nope]
    v = torch.einsum("hdr,sr->shd", wkv_b[:, nope:], c)             # [S, H, vd]
    scores = (torch.einsum("hd,shd->hs", q[:, :nope], k) + rotate(q[:, nope:], rot) @ r.T) * scale
    return torch.einsum("hs,shd->hd", scores.softmax(-1), v).reshape(-1), lat, r[-1]


@pytest.mark.parametrize("dims", [(3, 16, 8, 12, 40), (6, 32, 8, 16, 80), (5, 16, 6, 12, 44), (2, 128, 64, 128, 512)],
                         ids=["odd", "tiles", "k_tails", "k2_head"])
@pytest.mark.parametrize("pos", [0, 1, 37])
def test_mla_decoder_matches_expanded_attention(dims, pos):
    H, nope, rope, vd, R = dims
    g = torch.Generator().manual_seed(pos)
    wkv_b = torch.randn(H * (nope + vd), R, generator=g) * R ** -0.5
    norm = 1 + 0.1 * torch.randn(R, generator=g)
    q, kv_a = torch.randn(H * (nope + rope), generator=g), torch.randn(R + rope, generator=g)
    kv_cache, pe_cache = torch.randn(pos + 3, R, generator=g), torch.randn(pos + 3, rope, generator=g)
    prev_kv, prev_pe, after = kv_cache[:pos].clone(), pe_cache[:pos].clone(), kv_cache[pos + 1:].clone()
    rot = rope_rot(rope // 2, pos)
    scale, eps = (nope + rope) ** -0.5, 1e-6
    ref, lat, pe = expanded_attention(q, kv_a, rot, prev_kv, prev_pe, wkv_b, norm, H, nope, rope, vd, scale, eps)
    dec = kernels.mla_decoder(wkv_b, norm, n_heads=H, nope=nope, rope=rope, v_dim=vd, scale=scale, eps=eps)
    old, old_isa = kernels.get_threads(), kernels.isa()
    try:
        for isa in [i for i in ("scalar", "avx2", "avx512") if kernels.isa_supported(i)]:
            kernels.set_isa(isa)
            outs = []
            for threads in (1, 2, 3):
                kernels.set_threads(threads)
                o = dec(q, kv_a, rot, kv_cache, pe_cache, pos)
                err = (o.double() - ref).abs().max().item()
                assert err <= 1e-4 * ref.abs().max().item(), f"isa={isa} threads={threads}: max error {err:.3e}"
                outs.append(o)   # work split differently over threads: the same bits
                assert torch.equal(o, outs[0]), f"isa={isa}: {threads} threads differ from 1"
                # the new token's cache row is written; the rows before and after it are not touched
                assert torch.allclose(kv_cache[pos].double(), lat, rtol=1e-5, atol=1e-6)
                assert torch.allclose(pe_cache[pos].double(), pe, rtol=1e-5, atol=1e-6)
                assert torch.equal(kv_cache[:pos], prev_kv) and torch.equal(pe_cache[:pos], prev_pe)
                assert torch.equal(kv_cache[pos + 1:], after)
    finally:
        kernels.set_isa(old_isa)
        kernels.set_threads(old)


def split_kv_b(wkv_b: torch.Tensor, H: int, nope: int, vd: int) -> tuple[np.ndarray, np.ndarray]:
    """kv_b_proj [H * (nope + vd), R] -> a GGUF's attn_k_b [H * R, nope] and attn_v_b [H * vd, R] (float)."""
    w = wkv_b.view(H, nope + vd, -1)
    R = w.shape[-1]
    return (w[:, :nope].transpose(1, 2).reshape(H * R, nope).contiguous().numpy(),
            w[:, nope:].reshape(H * vd, R).contiguous().numpy())


@pytest.mark.parametrize("dims,types", [
    ((3, 32, 8, 16, 64), ("Q8_0", "Q8_0")), ((3, 32, 8, 16, 64), ("Q4_0", "Q4_0")),
    ((3, 32, 8, 16, 64), ("Q4_0_R8", "Q4_0_R8")),   # 8 interleaved rows per group: whole groups per head
    ((2, 128, 64, 128, 512), ("Q8_0", "Q8_0")), ((2, 128, 64, 128, 512), ("Q8_0", "Q6_K")),
    ((2, 128, 64, 128, 512), ("Q4_0", "Q4_K")),     # K-quant v_b: rank 512 fills its 256-value blocks
], ids=["q8_0", "q4_0", "q4_0_r8", "k2_head", "k2_head_q6_k", "k2_head_q4_k"])
def test_mla_decoder_reads_kv_b_blocks(dims, types):
    """kv_b as a GGUF's attn_k_b / attn_v_b blocks: the expanded float attention on the blocks' values (the
    gguf package's dequantizer) is matched up to the 8-bit rounding of each head's query and output."""
    H, nope, rope, vd, R = dims
    pos = 21
    g = torch.Generator().manual_seed(1)
    wkv_b = torch.randn(H * (nope + vd), R, generator=g) * R ** -0.5
    norm = 1 + 0.1 * torch.randn(R, generator=g)
    q, kv_a = torch.randn(H * (nope + rope), generator=g), torch.randn(R + rope, generator=g)
    kv_cache, pe_cache = torch.randn(pos + 1, R, generator=g), torch.randn(pos + 1, rope, generator=g)
    rot = rope_rot(rope // 2, pos)
    scale, eps = (nope + rope) ** -0.5, 1e-6
    stored = [t.replace("_R8", "") for t in types]   # what a GGUF holds; Q4_0_R8 is Q4_0 repacked at load
    # (gguf quantizes only the simple types; our quantizer writes the K-quants, gguf's dequantizer reads them back)
    k_b, v_b = (gguf.quants.quantize(m, GQT[t]) if t in ("Q8_0", "Q4_0") else kernels.quantize(m, t)
                for m, t in zip(split_kv_b(wkv_b, H, nope, vd), stored))
    # the float weights the blocks hold, back in kv_b_proj's layout
    k_deq = torch.from_numpy(gguf.quants.dequantize(k_b, GQT[stored[0]])).view(H, R, nope).transpose(1, 2)
    v_deq = torch.from_numpy(gguf.quants.dequantize(v_b, GQT[stored[1]])).view(H, vd, R)
    if types[0].endswith("_R8"):
        k_b, v_b = kernels.repack(k_b, "Q4_0"), kernels.repack(v_b, "Q4_0")
    w_deq = torch.cat([k_deq, v_deq], 1).reshape(H * (nope + vd), R)
    ref, lat, _ = expanded_attention(q, kv_a, rot, kv_cache[:pos].clone(), pe_cache[:pos].clone(), w_deq, norm,
                                     H, nope, rope, vd, scale, eps)
    dec = kernels.mla_decoder(None, norm, n_heads=H, nope=nope, rope=rope, v_dim=vd, scale=scale, eps=eps,
                              kv_b_blocks=((k_b, types[0]), (v_b, types[1])))
    old, old_isa = kernels.get_threads(), kernels.isa()
    try:
        for isa in [i for i in ("scalar", "avx2", "avx512") if kernels.isa_supported(i)]:
            kernels.set_isa(isa)
            outs = []
            for threads in (1, 3):
                kernels.set_threads(threads)
                o = dec(q, kv_a, rot, kv_cache, pe_cache, pos)
                rel = ((o.double() - ref).norm() / ref.norm()).item()
                assert 0 < rel < 0.02, f"isa={isa} threads={threads}: relative error {rel:.3e}"   # measured ~0.005
                assert torch.allclose(kv_cache[pos].double(), lat, rtol=1e-5, atol=1e-6)
                outs.append(o)
            assert torch.equal(outs[0], outs[1]), f"isa={isa}: the thread count changed the result"
    finally:
        kernels.set_isa(old_isa)
        kernels.set_threads(old)


def test_mla_decoder_rejects_bad_kv_b_blocks():
    H, nope, rope, vd, R = 2, 32, 8, 16, 64
    wkv_b, norm = torch.randn(H * (nope + vd), R), torch.ones(R)
    k_b, v_b = (gguf.quants.quantize(m, GQT.Q8_0) for m in split_kv_b(wkv_b, H, nope, vd))
    kw = dict(n_heads=H, nope=nope, rope=rope, v_dim=vd, scale=0.3, eps=1e-6)
    with pytest.raises(ValueError, match="wkv_b: pass None with kv_b_blocks"):
        kernels.mla_decoder(wkv_b, norm, **kw, kv_b_blocks=((k_b, "Q8_0"), (v_b, "Q8_0")))
    with pytest.raises(ValueError, match=r"k_b: 127 rows of 34 bytes, expected 128 rows of 32 Q8_0 values"):
        kernels.mla_decoder(None, norm, **kw, kv_b_blocks=((k_b[:-1], "Q8_0"), (v_b, "Q8_0")))
    with pytest.raises(ValueError, match=r"v_b: 32 rows of 34 bytes, expected 32 rows of 64 Q8_0 values \(68 bytes\)"):
        kernels.mla_decoder(None, norm, **kw, kv_b_blocks=((k_b, "Q8_0"), (np.ascontiguousarray(v_b[:, :34]), "Q8_0")))
    # Q4_0_R8 v_b with 12 rows per head: 24 rows fill three groups of 8, but the second head's start inside one
    wv = torch.randn(2 * (nope + 12), R)
    kq, vq = (kernels.repack(gguf.quants.quantize(m, GQT.Q4_0), "Q4_0") for m in split_kv_b(wv, 2, nope, 12))
    dec = kernels.mla_decoder(None, norm, **{**kw, "v_dim": 12}, kv_b_blocks=((kq, "Q4_0_R8"), (vq, "Q4_0_R8")))
    with pytest.raises(kernels.KernelError, match="v_b: v_dim=12 rows per head do not fill Q4_0_R8 row groups of 8"):
        dec(torch.randn(2 * (nope + rope)), torch.randn(R + rope), rope_rot(rope // 2, 0), torch.zeros(1, R),
            torch.zeros(1, rope), 0)
    with pytest.raises(ValueError, match="k_b"):   # 32 columns are not a whole 256-value Q4_K block
        kernels.mla_decoder(None, norm, **kw, kv_b_blocks=((np.zeros((128, 144), np.uint8), "Q4_K"), (v_b, "Q8_0")))


def test_mla_decoder_rejects_bad_arguments():
    H, nope, rope, vd, R = 2, 8, 4, 8, 16
    wkv_b, norm = torch.randn(H * (nope + vd), R), torch.ones(R)
    dec = kernels.mla_decoder(wkv_b, norm, n_heads=H, nope=nope, rope=rope, v_dim=vd, scale=0.3, eps=1e-6)
    q, kv_a, rot = torch.randn(H * (nope + rope)), torch.randn(R + rope), rope_rot(rope // 2, 3)
    kv, pe = torch.zeros(8, R), torch.zeros(8, rope)
    with pytest.raises(ValueError, match=r"kv_cache: shape \(8, 16\), expected \[>= 9, 16\]"):
        dec(q, kv_a, rot, kv, pe, 8)
    with pytest.raises(ValueError, match="q: 23 values"):
        dec(q[:-1], kv_a, rot, kv, pe, 3)
    with pytest.raises(ValueError, match="kv_a: expected a contiguous float32 CPU tensor, got torch.float64"):
        dec(q, kv_a.double(), rot, kv, pe, 3)
    with pytest.raises(ValueError, match="pe_cache: expected a contiguous"):
        dec(q, kv_a, rot, kv, torch.zeros(rope, 8).T, 3)
    with pytest.raises(ValueError, match="pos: expected an int >= 0"):
        dec(q, kv_a, rot, kv, pe, -1)
    with pytest.raises(ValueError, match="rope: 5 is odd"):
        kernels.mla_decoder(wkv_b, norm, n_heads=H, nope=nope, rope=5, v_dim=vd, scale=0.3, eps=1e-6)
    with pytest.raises(ValueError, match=r"wkv_b: shape \(32, 16\), expected \[n_heads \* \(nope \+ v_dim\) = 48"):
        kernels.mla_decoder(wkv_b, norm, n_heads=3, nope=nope, rope=rope, v_dim=vd, scale=0.3, eps=1e-6)
    with pytest.raises(ValueError, match=r"kv_norm: shape \(15,\), expected \(16,\)"):
        kernels.mla_decoder(wkv_b, norm[:15], n_heads=H, nope=nope, rope=rope, v_dim=vd, scale=0.3, eps=1e-6)
    with pytest.raises(kernels.KernelError, match="scale"):
        kernels.mla_decoder(wkv_b, norm, n_heads=H, nope=nope, rope=rope, v_dim=vd, scale=-1.0, eps=1e-6)(
            q, kv_a, rot, kv, pe, 3)


@pytest.mark.parametrize("shape", [(1, 7168), (3, 40), (1, 7)])
def test_rms_norm_matches_torch(shape):
    g = torch.Generator().manual_seed(shape[1])
    x, w = torch.randn(*shape, generator=g) * 3, 1 + 0.1 * torch.randn(shape[1], generator=g)
    ref = x.double() / torch.sqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-6) * w.double()
    y = kernels.rms_norm(x, w, 1e-6)
    assert torch.allclose(y.double(), ref, rtol=1e-5, atol=1e-6)


def test_rms_norm_rejects_bad_arguments():
    x, w = torch.randn(2, 8), torch.ones(8)
    with pytest.raises(ValueError, match=r"weight: shape \(7,\), expected \(8,\)"):
        kernels.rms_norm(x, w[:7], 1e-6)
    with pytest.raises(ValueError, match="x: expected a contiguous float32 CPU tensor"):
        kernels.rms_norm(x.T, torch.ones(2), 1e-6)
    with pytest.raises(kernels.KernelError, match="eps"):
        kernels.rms_norm(x, w, -1.0)


ROUTERS = {   # (n_experts, top_k, n_group, topk_group, scoring, noaux bias, norm_topk)
    "k2": (48, 8, 1, 1, "sigmoid", True, True),
    "v3_groups": (32, 4, 4, 2, "sigmoid", True, True),
    "softmax_groups_no_bias": (24, 3, 3, 1, "softmax", False, False),
    "softmax_plain": (16, 1, 1, 1, "softmax", False, True),
}


@pytest.mark.parametrize("case", list(ROUTERS))
@pytest.mark.parametrize("T", [1, 5])
def test_router_matches_the_torch_router(case, T):
    """kernels.router (one C call, what the CPU runtime routes with) against Router's torch ops."""
    from hybrid_k2.config import preset
    from hybrid_k2.model import Router
    E, K, G, TG, scoring, bias, norm = ROUTERS[case]
    cfg = preset("kimi-k2").replace(hidden_size=96, n_routed_experts=E, num_experts_per_tok=K, n_group=G,
                                    topk_group=TG, scoring_func=scoring, topk_method="noaux_tc" if bias else "greedy",
                                    norm_topk_prob=norm)
    torch.manual_seed(T)
    r = Router(cfg)
    with torch.no_grad():
        r.weight.normal_(0, 0.5)
        if bias:
            r.e_score_correction_bias.uniform_(0, 0.3)
    x = torch.randn(T, 96)
    ids_ref, w_ref = r(x)                      # the torch ops
    c = kernels.router(r.weight.detach(), r.e_score_correction_bias.detach() if bias else None, top_k=K, n_group=G,
                       topk_group=TG, softmax=scoring != "sigmoid", norm_topk=norm, scaling=r.scaling)
    ids, w = c(x)
    assert ids.dtype == torch.int32
    assert torch.equal(ids.long(), ids_ref)    # same experts, same (best-first) order
    assert torch.allclose(w, w_ref.detach(), rtol=1e-5, atol=1e-7)


def test_router_rejects_bad_arguments():
    w = torch.randn(12, 8)
    with pytest.raises(kernels.KernelError, match=r"top_k=5 out of range \[1, 4\]"):
        kernels.router(w, top_k=5, n_group=3, topk_group=1)(torch.randn(1, 8))
    with pytest.raises(kernels.KernelError, match="n_group=5 must divide n_experts=12"):
        kernels.router(w, top_k=2, n_group=5, topk_group=1)(torch.randn(1, 8))
    with pytest.raises(ValueError, match=r"bias: shape \(11,\), expected \(12,\)"):
        kernels.router(w, torch.zeros(11), top_k=2)
    with pytest.raises(ValueError, match=r"x: shape \(1, 9\), expected \[T, 8\]"):
        kernels.router(w, top_k=2)(torch.randn(1, 9))


def test_model_built_directly_decodes_through_the_c_ops():
    """A Transformer made in code (its parameters still want grad, as in a training script): without autograd
    with the CPU runtime installed, its decode steps without autograd take the C ops and match the torch ops of the
    same steps with autograd on."""
    from hybrid_k2.runtime import CPURuntime
    from hybrid_k2.config import ModelConfig
    from hybrid_k2.model import Transformer
    cfg = ModelConfig.from_dict(dict(
        model_type="kimi_k2", vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
        num_hidden_layers=2, num_attention_heads=2, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8,
        qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2,
        first_k_dense_replace=2))   # dense layers only: no expert backend needed
    model = Transformer(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if p.dim() == 1 else 0.0))
    assert all(p.requires_grad for p in model.parameters())
    ids = torch.randint(0, 64, (12,), generator=g)
    outs = []
    model.set_runtime(CPURuntime.build)
    for mode in (torch.enable_grad, torch.no_grad):
        with mode():
            cache = model.new_cache(16)
            model(ids[:4], 0, cache, last_only=True)
            outs.append(torch.cat([model(ids[i:i + 1], i, cache, last_only=True) for i in range(4, 12)]).detach())
    assert model.runtime is not None    # the no-grad pass took the C decode step
    assert torch.allclose(outs[1], outs[0], rtol=1e-4, atol=1e-5)


def test_bound_ops_refuse_weights_moved_to_new_memory():
    """kernels.router / kernels.mla_decoder read their weights in place: after `weight.data = ...` (old memory
    freed) they refuse to run instead of reading freed memory; the model's layers rebind and follow."""
    w = torch.randn(8, 16)
    r = kernels.router(w, top_k=2)
    w.data = torch.randn(8, 16)
    with pytest.raises(ValueError, match="moved to new memory"):
        r(torch.randn(1, 16))
    wkv, norm = torch.randn(2 * 16, 8), torch.ones(8)
    dec = kernels.mla_decoder(wkv, norm, n_heads=2, nope=8, rope=4, v_dim=8, scale=0.3, eps=1e-6)
    wkv.data = torch.randn(2 * 16, 8)
    with pytest.raises(ValueError, match="moved to new memory"):
        dec(torch.randn(24), torch.randn(12), rope_rot(2, 0), torch.zeros(1, 8), torch.zeros(1, 4), 0)


def test_router_argument_checks():
    w = torch.randn(8, 16)
    with pytest.raises(ValueError, match="top_k: expected a positive int, got -1"):
        kernels.router(w, top_k=-1)
    with pytest.raises(ValueError, match="scaling: expected a finite number"):
        kernels.router(w, top_k=2, scaling=float("nan"))


@pytest.mark.parametrize("q_lora", [True, False], ids=["q_lora", "q_proj"])
def test_attention_block_in_one_call_matches_the_modules(q_lora):
    """With the projections as GGML blocks, the CPU runtime runs a decode step's attention as one C call (norm,
    projections, MLA, residual); it agrees with the modules to the 8-bit activation rounding both paths do."""
    from hybrid_k2.runtime import CPURuntime
    from hybrid_k2.config import ModelConfig
    from hybrid_k2.model import Transformer
    from hybrid_k2.qlinear import QuantLinear
    cfg = ModelConfig.from_dict(dict(
        model_type="kimi_k2", vocab_size=64, hidden_size=64, intermediate_size=64, moe_intermediate_size=32,
        num_hidden_layers=2, num_attention_heads=2, q_lora_rank=32 if q_lora else None, kv_lora_rank=32,
        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=4, n_shared_experts=1,
        num_experts_per_tok=2, first_k_dense_replace=2))
    model = Transformer(cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if p.dim() == 1 else 0.0))
    for layer in model.model.layers:
        a = layer.self_attn
        for name in ("q_a_proj", "q_b_proj", "q_proj", "kv_a_proj_with_mqa", "o_proj"):
            if hasattr(a, name):
                setattr(a, name, QuantLinear.from_linear(getattr(a, name), "q8_0"))
    ids = torch.randint(0, 64, (10,), generator=g)
    outs = []
    for fused in (True, False):
        model.set_runtime(CPURuntime.build if fused else None)
        with torch.no_grad():
            cache = model.new_cache(16)
            model(ids[:3], 0, cache)
            outs.append(torch.cat([model(ids[i:i + 1], i, cache) for i in range(3, 10)]))
        assert (model.runtime is not None) == fused
    rel = (outs[0] - outs[1]).norm(dim=1) / outs[1].norm(dim=1)
    assert float(rel.max()) < 0.03, rel


def test_attention_block_rejects_what_does_not_fit():
    from hybrid_k2.qlinear import QuantLinear
    H, nope, rope, vd, R, D = 2, 16, 8, 16, 32, 64
    dec = kernels.mla_decoder(torch.randn(H * (nope + vd), R), torch.ones(R), n_heads=H, nope=nope, rope=rope,
                              v_dim=vd, scale=0.2, eps=1e-6)

    def mat(rows, cols):
        q = QuantLinear.from_linear(torch.nn.Linear(cols, rows, bias=False), "q8_0")
        return q.blocks, q.qtype

    norm = torch.ones(D)
    good = [mat(H * (nope + rope), D), mat(R + rope, D), mat(D, H * vd)]
    blk = kernels.attn_decoder(dec, norm, 1e-6, None, 0.0, None, *good)
    out = blk(torch.randn(1, D), rope_rot(rope // 2, 0), torch.zeros(2, R), torch.zeros(2, rope), 0)
    assert out.shape == (1, D) and torch.isfinite(out).all()
    bad = kernels.attn_decoder(dec, norm, 1e-6, None, 0.0, None, mat(H * (nope + rope), D), mat(R + rope, D),
                               mat(D, 64 + 32))
    with pytest.raises(kernels.KernelError, match=r"attn_decode: o is 64 x 96, expected 64 x 32"):
        bad(torch.randn(1, D), rope_rot(rope // 2, 0), torch.zeros(2, R), torch.zeros(2, rope), 0)
    with pytest.raises(ValueError, match="x: 63 values, expected hidden=64"):
        blk(torch.randn(1, 63), rope_rot(rope // 2, 0), torch.zeros(2, R), torch.zeros(2, rope), 0)
    norm.data = torch.ones(D)
    with pytest.raises(ValueError, match="moved to new memory"):
        blk(torch.randn(1, D), rope_rot(rope // 2, 0), torch.zeros(2, R), torch.zeros(2, rope), 0)
    # the attention core's kv_b is read through the block's copy of the MLA pointers: its move is caught too
    blk2 = kernels.attn_decoder(dec, torch.ones(D), 1e-6, None, 0.0, None, *good)
    dec.wkv_b.data = torch.randn(H * (nope + vd), R)
    with pytest.raises(ValueError, match="moved to new memory"):
        blk2(torch.randn(1, D), rope_rot(rope // 2, 0), torch.zeros(2, R), torch.zeros(2, rope), 0)
