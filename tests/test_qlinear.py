"""QuantLinear and dense_format: the non-expert matrices as GGML blocks in the C kernels.

References: the `gguf` package's quantizers/dequantizers and float torch linears; the whole model with
dense_format="float" (float matmuls on the same GGUF weights)."""
from functools import partial

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as GQT
from torch import nn

import hybrid_k2
from hybrid_k2.runtime import CPURuntime
from hybrid_k2 import kernels
from hybrid_k2.checkpoint import open_checkpoint
from hybrid_k2.cli import build_parser
from hybrid_k2.loader import DENSE_MATRICES, build_model
from hybrid_k2.qlinear import QuantLinear
from hybrid_k2.convert import convert


def act_roundtrip(x: np.ndarray) -> np.ndarray:
    """Activations as the kernels see them for Q8_0/Q4_0 weights: Q8_0 blocks, dequantized."""
    return gguf.quants.dequantize(gguf.quants.quantize(np.ascontiguousarray(x, np.float32), GQT.Q8_0), GQT.Q8_0)


# ---------------------------------------------------------------- the module

@pytest.mark.parametrize("qt,bound", [("q8_0", 0.01), ("q4_0", 0.12)])
def test_from_linear_error_bounds(qt, bound):
    torch.manual_seed(0)
    lin = nn.Linear(512, 300, bias=True)
    q = QuantLinear.from_linear(lin, qt)
    assert (q.in_features, q.out_features, q.qtype.name) == (512, 300, qt.upper())
    x = torch.randn(2, 5, 512)
    y = q(x)
    assert y.shape == (2, 5, 300) and y.dtype == torch.float32
    with torch.no_grad():
        exact = lin(x)
    rel = ((y - exact).norm() / exact.norm()).item()
    assert 1e-4 < rel < bound, rel    # quantized, within the format's error
    # exactly what the blocks say: gguf's bytes and dequantizer, 8-bit activations, float64 sums
    blocks = gguf.quants.quantize(lin.weight.detach().numpy(), GQT[qt.upper()])
    np.testing.assert_array_equal(q.blocks, blocks)
    w = gguf.quants.dequantize(blocks, GQT[qt.upper()]).astype(np.float64)
    ref = act_roundtrip(x.reshape(-1, 512).numpy()).astype(np.float64) @ w.T + lin.bias.detach().numpy()
    err = np.abs(y.reshape(-1, 300).numpy() - ref).max() / np.abs(ref).max()
    assert err < 1e-5, err
    np.testing.assert_array_equal(q.weight.numpy(), w.astype(np.float32))


def test_weight_is_lazy_and_shared_while_alive():
    q = QuantLinear.from_linear(nn.Linear(64, 8, bias=False), "q8_0")
    assert q._weight_ref is None                      # nothing dequantized until asked
    w = q.weight
    assert q.weight is w and w.shape == (8, 64) and w.dtype == torch.float32
    assert list(q.parameters()) == [] and "blocks" not in q.state_dict()


def test_dtype_follows_the_linear():
    lin = nn.Linear(64, 16, bias=False).to(torch.bfloat16)
    q = QuantLinear.from_linear(lin, "q8_0")
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    y = q(x)
    assert y.dtype == torch.bfloat16 and q.weight.dtype == torch.bfloat16
    rel = ((y.float() - lin(x).float()).norm() / lin(x).float().norm()).item()
    assert rel < 0.02


def test_from_blocks_reads_in_place():
    rng = np.random.default_rng(1)
    blocks = kernels.quantize(rng.standard_normal((24, 256)).astype(np.float32), "Q4_K")
    q = QuantLinear.from_blocks(blocks, "Q4_K", in_features=256)
    assert q.blocks is blocks and q.out_features == 24
    x = torch.randn(4, 256)
    np.testing.assert_array_equal(q(x).numpy(), kernels.linear(blocks, "Q4_K", x.numpy()))


def test_bad_arguments():
    rng = np.random.default_rng(2)
    blocks = kernels.quantize(rng.standard_normal((8, 64)).astype(np.float32), "Q8_0")
    with pytest.raises(ValueError, match="blocks: shape \\(8, 68\\), expected \\(8, 136\\)"):
        QuantLinear.from_blocks(blocks, "Q8_0", in_features=128)
    with pytest.raises(ValueError, match="blocks: expected \\[out_features, row_bytes\\]"):
        QuantLinear.from_blocks(blocks[None], "Q8_0", in_features=64)
    with pytest.raises(ValueError, match="48 columns is not a positive multiple of the Q8_0 block size 32"):
        QuantLinear(48, 8, "Q8_0")
    with pytest.raises(ValueError, match="Q8_K is not a weight type"):
        QuantLinear(256, 8, "Q8_K")
    with pytest.raises(ValueError, match="in_features: expected a positive int"):
        QuantLinear(0, 8, "Q8_0")
    with pytest.raises(TypeError, match="linear: expected an nn.Linear"):
        QuantLinear.from_linear(nn.Conv1d(4, 4, 1), "q8_0")
    with torch.device("meta"):
        meta = nn.Linear(64, 8)
    with pytest.raises(ValueError, match="meta device"):
        QuantLinear.from_linear(meta, "q8_0")
    empty = QuantLinear(64, 8, "Q8_0")
    with pytest.raises(RuntimeError, match="no weights loaded"):
        empty(torch.randn(1, 64))
    q = QuantLinear.from_blocks(blocks, "Q8_0", 64)
    with pytest.raises(ValueError, match="x: last dimension 32, expected in_features=64"):
        q(torch.randn(2, 32))
    with pytest.raises(ValueError, match="bias: shape \\(3,\\), expected \\(8,\\)"):
        QuantLinear(64, 8, "Q8_0", blocks, bias=torch.zeros(3))


def test_mlp_of_blocks_decodes_in_one_expert_call():
    """The CPU runtime runs a SwiGLU of QuantLinear matrices as one call of the routed experts' kernel
    (runtime.swiglu_as_expert), with the same 8-bit inputs as the three separate calls: it matches them, and the
    float MLP as closely."""
    from hybrid_k2.model import MLP
    from hybrid_k2.runtime import swiglu_as_expert
    torch.manual_seed(0)
    ref = MLP(256, 512).eval()
    mlp = MLP(256, 512).eval()
    for name in ("gate_proj", "up_proj", "down_proj"):
        q = QuantLinear.from_linear(getattr(ref, name), "q8_0")
        setattr(mlp, name, q)
        getattr(ref, name).weight.data.copy_(q.weight)    # the float model of the same (dequantized) weights
    x = torch.randn(1, 256)
    want = ref(x).detach()
    unfused = mlp(x).detach()                            # the module: three QuantLinear calls
    fused = kernels.moe_forward(swiglu_as_expert(mlp), x, torch.zeros(1, 1, dtype=torch.int32), torch.ones(1, 1),
                                h_residual=False)
    err_f = ((fused - want).norm() / want.norm()).item()
    err_u = ((unfused - want).norm() / want.norm()).item()
    assert err_f < 0.015 and err_f <= err_u * 1.05, (err_f, err_u)
    assert ((fused - unfused).norm() / unfused.norm()).item() < 2e-3   # same quantization; only silu's rounding


# ---------------------------------------------------------------- dense_format in the whole model

@pytest.fixture(scope="module")
def gguf_q8(demo_ggufs):
    return demo_ggufs("q8_0", "q8_0")


def covered_names(net) -> list[str]:
    return [n for n, m in net.named_modules() if DENSE_MATRICES.fullmatch(n)]


def test_native_runs_the_gguf_blocks_in_place(gguf_q8):
    native = hybrid_k2.load(gguf_q8, device="cpu", experts="torch", dense_format="native")
    ref = hybrid_k2.load(gguf_q8, device="cpu", experts="torch", dense_format="float")
    ck, cfg = native.checkpoint, native.cfg
    names = covered_names(native.model)
    # per layer: q_a, q_b, kv_a, o + gate/up/down (dense FFN or shared experts); and lm_head
    assert len(names) == 7 * cfg.num_hidden_layers + 1
    params = dict(native.model.named_parameters())
    for n in names:
        q = native.model.get_submodule(n)
        assert isinstance(q, QuantLinear) and q.qtype.name == "Q8_0", n
        assert n + ".weight" not in params                          # no float copy was made
        assert np.shares_memory(q.blocks, ck.raw_blocks(n + ".weight")[0]), f"{n} was copied"
        # the same weights the float model holds (gguf dequantization of the same bytes)
        assert torch.equal(q.weight, ref.model.get_submodule(n).weight), n
    for i in range(cfg.num_hidden_layers):
        # kv_b_proj stays a float tensor (prefill expands it); the decode step reads attn_k_b / attn_v_b in place
        attn = native.model.get_submodule(f"model.layers.{i}.self_attn")
        assert type(attn.kv_b_proj) is nn.Linear
        stored = ck.kv_b_blocks(f"model.layers.{i}.self_attn.kv_b_proj.weight")
        assert [t.name for _, t in attn.kv_b_blocks] == ["Q8_0", "Q8_0"]
        assert all(np.shares_memory(mine, theirs) for (mine, _), (theirs, _) in zip(attn.kv_b_blocks, stored))
    assert type(native.model.model.embed_tokens) is nn.Embedding

    ids = torch.randint(1, 500, (64,), generator=torch.Generator().manual_seed(0)).tolist()
    lq, lf = native.logits(ids), ref.logits(ids)
    # 8-bit activations into ~29 matmuls of a random-weight model: ~2% per position (measured median 0.02);
    # the odd position where a router's top-k flips moves more. Top-1 measured 0.875 (flat random logits).
    per_pos = ((lq - lf).norm(dim=-1) / lf.norm(dim=-1))
    assert per_pos.median() < 0.05, per_pos
    top1 = (lq.argmax(-1) == lf.argmax(-1)).float().mean().item()
    assert top1 >= 0.8, top1
    # Engine.generate (one-token decode steps in the CPU runtime) picks what the full-sequence pass ranks first
    native.model.set_runtime(partial(CPURuntime.build, torch_experts=True))
    out = native.generate(ids[:8], max_new_tokens=6, temperature=0)
    assert out.token_ids
    decoders = [k.mla for k in native.model.runtime.keep if isinstance(k, kernels.AttnDecoder)]
    assert len(decoders) == len(native.model.model.layers)
    for layer, dec in zip(native.model.model.layers, decoders):   # the decode steps read the GGUF's blocks
        assert dec.wkv_b is None and all(a[0] is b[0] for a, b in zip(dec.kv_b_blocks, layer.self_attn.kv_b_blocks))
    full = native.logits(ids[:8] + out.token_ids)[7:7 + len(out.token_ids)]
    if native.suppressed_ids is not None:
        full[:, native.suppressed_ids] = float("-inf")
    assert full.argmax(-1).tolist() == out.token_ids
    native.close(), ref.close()


def test_quantized_at_load_from_hf_checkpoint(demo_dir):
    """An FP8 HF checkpoint: each covered matrix is quantized at load, bytes equal gguf's quantizer."""
    for fmt in ("q8_0", "q4_0"):
        eng = hybrid_k2.load(demo_dir, device="cpu", experts="torch", dense_format=fmt)
        with open_checkpoint(demo_dir) as ck:
            for n in covered_names(eng.model)[::5]:
                q = eng.model.get_submodule(n)
                assert q.qtype.name == fmt.upper()
                np.testing.assert_array_equal(q.blocks, gguf.quants.quantize(ck.get(n + ".weight").numpy(),
                                                                              GQT[fmt.upper()]))
            check_kv_b_quantized(eng.model, ck, fmt.upper())
        eng.close()


def check_kv_b_quantized(net, ck, qt: str) -> None:
    """Each layer's decode-step kv_b: the checkpoint's kv_b_proj split as a GGUF splits it, quantized by gguf."""
    cfg = net.cfg
    H, nope, vd, R = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    for i, layer in enumerate(net.model.layers):
        w = ck.get(f"model.layers.{i}.self_attn.kv_b_proj.weight").float().view(H, nope + vd, R)
        want = (w[:, :nope].transpose(1, 2).reshape(H * R, nope), w[:, nope:].reshape(H * vd, R))
        for (blocks, t), m in zip(layer.self_attn.kv_b_blocks, want):
            assert t.name == qt
            np.testing.assert_array_equal(blocks, gguf.quants.quantize(m.contiguous().numpy(), GQT[qt]))


def test_native_falls_back_to_q8_0_for_float_tensors(demo_dir, tmp_path):
    path = convert(demo_dir, tmp_path / "demo-f32.gguf", experts="q8_0", other="f32", progress=False)
    with open_checkpoint(path) as ck:
        net = build_model(ck.config(), ck, "cpu", torch.float32, dense_format="native")
        for n in covered_names(net):
            q = net.get_submodule(n)
            assert q.qtype.name == "Q8_0", n
            np.testing.assert_array_equal(q.blocks, gguf.quants.quantize(ck.get(n + ".weight").numpy(), GQT.Q8_0))
        check_kv_b_quantized(net, ck, "Q8_0")   # attn_k_b / attn_v_b stored as F32: quantized at load
        blocks, qt = ck.raw_blocks("lm_head.weight")
        assert qt == GQT.F32 and blocks.dtype == np.uint8 and blocks.shape == (ck.shape("lm_head.weight")[0],
                                                                                 4 * ck.shape("lm_head.weight")[1])


def test_raw_blocks_refuses_what_is_not_one_matrix(gguf_q8):
    with open_checkpoint(gguf_q8) as ck:
        with pytest.raises(ValueError, match="kv_b_proj.*no raw blocks"):
            ck.raw_blocks("model.layers.0.self_attn.kv_b_proj.weight")
        with pytest.raises(ValueError, match="raw blocks are for 2-D matrices"):
            ck.raw_blocks("model.norm.weight")
        with pytest.raises(ValueError, match="not in this GGUF"):
            ck.raw_blocks("model.layers.0.mlp.nope.weight")


def test_bad_dense_format(gguf_q8):
    with pytest.raises(ValueError, match="dense_format='q8_0' .* needs device='cpu' \\(got device='cuda'\\)"):
        hybrid_k2.load(gguf_q8, device="cuda", dense_format="q8_0")
    with pytest.raises(ValueError, match="dense_format='q5_k': expected one of 'auto', 'float', 'native', 'q8_0', "
                                         "'q4_0', 'fp8', 'bf16'"):
        hybrid_k2.load(gguf_q8, device="cpu", dense_format="q5_k")
    with open_checkpoint(gguf_q8) as ck:
        with pytest.raises(ValueError, match="needs device='cpu'"):
            build_model(ck.config(), ck, "cuda", torch.bfloat16, dense_format="native")
    args = build_parser().parse_args(["generate", str(gguf_q8), "-p", "x", "--dense-format", "native"])
    assert args.dense_format == "native"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", str(gguf_q8), "-p", "x", "--dense-format", "f16"])
