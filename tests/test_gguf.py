"""GGUF side: HF checkpoint -> llama.cpp deepseek2 GGUF (hybrid_k2/convert.py) and back (hybrid_k2/checkpoint/gguf.py).

References: the HF tensors themselves (transformers' DeepseekV3ForCausalLM.save_pretrained), the `gguf`
package's reader and quantizers (llama.cpp's own Python), and llama.cpp's deepseek2 tensor table
(src/models/deepseek2.cpp load_arch_tensors), re-derived below from the file's own metadata.
"""
import base64
import collections
import json
import os
import shutil

import gguf
import numpy as np
import pytest
import regex  # tiktoken's dependency; understands Kimi's pattern
import torch
from gguf import GGMLQuantizationType as QT
from gguf import GGUFReader, GGUFValueType

import hybrid_k2
from hybrid_k2 import kernels
from hybrid_k2.checkpoint import CheckpointError, HFCheckpoint, open_checkpoint
from hybrid_k2.checkpoint.gguf import GGUFCheckpoint
from hybrid_k2.checkpoint.quantize import int4_group_quantize, save_safetensors
from hybrid_k2.config import ModelConfig
from hybrid_k2.convert import convert, main
from hybrid_k2.tokenizer import KIMI_PAT_STR, KIMI_SPECIAL_TOKEN_OFFSETS, Tokenizer

TEXT = ("The quick brown fox jumps over the lazy dog. The dog sleeps; the fox runs far away. "
        "Héllo wörld, naïve café! 数据 数据 模型 the theory of the thing: there, then, these, those. "
        "Mixture of experts routes each token to the best experts; experts run on the CPU. ") * 3
CHAT_TEMPLATE = "{% for m in messages %}<|im_{{ m['role'] }}|>{{ m['content'] }}<|im_end|>{% endfor %}"


# ---- fixtures ------------------------------------------------------------------------------------
def train_ranks(text: str, n_merges: int) -> dict[bytes, int]:
    """A tiny byte-level BPE (most frequent pair first) over Kimi's pre-tokenised pieces."""
    pieces = collections.Counter(p.encode() for p in regex.findall(KIMI_PAT_STR, text, flags=regex.V1))
    ranks = {bytes([b]): b for b in range(256)}
    seqs = {w: [w[i:i + 1] for i in range(len(w))] for w in pieces}
    for _ in range(n_merges):
        pairs = collections.Counter()
        for w, c in pieces.items():
            s = seqs[w]
            for a, b in zip(s, s[1:]):
                pairs[a, b] += c
        pairs = {p: c for p, c in pairs.items() if p[0] + p[1] not in ranks}
        if not pairs:
            break
        a, b = max(pairs, key=lambda p: (pairs[p], p))
        ranks[a + b] = len(ranks)
        for w, s in seqs.items():
            i, out = 0, []
            while i < len(s):
                if i + 1 < len(s) and s[i] == a and s[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            seqs[w] = out
    return ranks


def write_tokenizer(d, ranks):
    with open(os.path.join(d, "tiktoken.model"), "w") as f:
        for b, r in sorted(ranks.items(), key=lambda kv: kv[1]):
            f.write(f"{base64.b64encode(b).decode()} {r}\n")
    base = len(ranks)
    decoder = {str(base + off): {"content": name, "special": True} for name, off in KIMI_SPECIAL_TOKEN_OFFSETS.items()}
    with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
        json.dump({"added_tokens_decoder": decoder, "bos_token": "[BOS]", "eos_token": "[EOS]",
                   "pad_token": "[PAD]", "unk_token": "[UNK]", "chat_template": CHAT_TEMPLATE}, f)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """transformers' DeepseekV3ForCausalLM with every tensor randomised (norms and the correction bias
    too, so a swapped mapping cannot hide), plus a Kimi-layout tiktoken tokenizer."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    d = str(tmp_path_factory.mktemp("hf"))
    ranks = train_ranks(TEXT, 60)
    base = len(ranks)
    cfg = DeepseekV3Config(
        vocab_size=base + 256, hidden_size=256, intermediate_size=320, moe_intermediate_size=256,
        num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=2, q_lora_rank=64, kv_lora_rank=64,
        qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=4, n_shared_experts=1,
        num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1, routed_scaling_factor=2.827,
        norm_topk_prob=True, rms_norm_eps=1e-6, rope_theta=50000.0, max_position_embeddings=256,
        rope_scaling=dict(type="yarn", factor=4.0, original_max_position_embeddings=64, beta_fast=1.0,
                          beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0),
        bos_token_id=base, eos_token_id=base + 1, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(cfg)
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.normal_(0, 0.05)
    model.save_pretrained(d)
    write_tokenizer(d, ranks)
    return d


@pytest.fixture(scope="module")
def converted(hf_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf")
    cache = {}

    def get(experts, other):
        if (experts, other) not in cache:
            path = str(out / f"m-{experts}-{other}.gguf")
            if (experts, other) == ("q4_0", "q8_0"):  # the CLI defaults, through the CLI entry point
                assert main([hf_dir, path, "--no-progress"]) == 0
            else:
                assert convert(hf_dir, path, experts=experts, other=other, progress=False) == path
            cache[experts, other] = path
        return cache[experts, other]

    return get


@pytest.fixture(scope="module")
def hf(hf_dir):
    with HFCheckpoint(hf_dir) as ck:
        yield ck


def ref_quant(w: np.ndarray, qt: QT) -> np.ndarray:
    """gguf package (llama.cpp's Python reference) quantize -> dequantize."""
    return gguf.quants.dequantize(gguf.quants.quantize(np.ascontiguousarray(w, np.float32), qt), qt)


def hf_kv_b_split(w: np.ndarray, c: ModelConfig):
    kv = w.reshape(c.num_attention_heads, c.qk_nope_head_dim + c.v_head_dim, c.kv_lora_rank)
    return kv[:, :c.qk_nope_head_dim].transpose(0, 2, 1), kv[:, c.qk_nope_head_dim:]


# ---- the file as llama.cpp sees it ---------------------------------------------------------------
U32, F32T, BOOL, STR = GGUFValueType.UINT32, GGUFValueType.FLOAT32, GGUFValueType.BOOL, GGUFValueType.STRING
REQUIRED_KEYS = {  # llama.cpp get_key() is type-checked: the writer must use these exact types
    "general.architecture": STR, "deepseek2.block_count": U32, "deepseek2.context_length": U32,
    "deepseek2.embedding_length": U32, "deepseek2.feed_forward_length": U32, "deepseek2.attention.head_count": U32,
    "deepseek2.attention.head_count_kv": U32, "deepseek2.attention.layer_norm_rms_epsilon": F32T,
    "deepseek2.leading_dense_block_count": U32, "deepseek2.attention.q_lora_rank": U32,
    "deepseek2.attention.kv_lora_rank": U32, "deepseek2.attention.key_length": U32,
    "deepseek2.attention.value_length": U32, "deepseek2.attention.key_length_mla": U32,
    "deepseek2.attention.value_length_mla": U32, "deepseek2.expert_feed_forward_length": U32,
    "deepseek2.expert_count": U32, "deepseek2.expert_used_count": U32, "deepseek2.expert_shared_count": U32,
    "deepseek2.expert_weights_scale": F32T, "deepseek2.expert_weights_norm": BOOL,
    "deepseek2.expert_gating_func": U32, "deepseek2.expert_group_count": U32,
    "deepseek2.expert_group_used_count": U32, "deepseek2.rope.dimension_count": U32,
    "deepseek2.rope.freq_base": F32T, "deepseek2.rope.scaling.type": STR, "deepseek2.rope.scaling.factor": F32T,
    "deepseek2.rope.scaling.original_context_length": U32, "deepseek2.rope.scaling.yarn_log_multiplier": F32T,
    "deepseek2.rope.scaling.yarn_beta_fast": F32T, "deepseek2.rope.scaling.yarn_beta_slow": F32T,
    "deepseek2.vocab_size": U32, "tokenizer.ggml.model": STR, "tokenizer.ggml.pre": STR,
    "tokenizer.ggml.bos_token_id": U32, "tokenizer.ggml.eos_token_id": U32,
}


def field(r: GGUFReader, key: str):
    f = r.get_field(key)
    assert f is not None, key
    return f.contents()


def llama_cpp_tensor_table(r: GGUFReader) -> dict[str, list[int]]:
    """ne of every tensor llama.cpp's deepseek2 load_arch_tensors creates, from the file's metadata
    (n_embd_head_k_mla = key_length_mla, n_rot = rope.dimension_count, ...)."""
    a = lambda k: field(r, "deepseek2." + k)  # noqa: E731
    n_embd, n_vocab, n_head, n_layer = a("embedding_length"), a("vocab_size"), a("attention.head_count"), a("block_count")
    k_mla, v_mla, n_rot = a("attention.key_length_mla"), a("attention.value_length_mla"), a("rope.dimension_count")
    nope, q_lora, kv_lora = k_mla - n_rot, a("attention.q_lora_rank"), a("attention.kv_lora_rank")
    n_ff, n_ff_exp, n_expert = a("feed_forward_length"), a("expert_feed_forward_length"), a("expert_count")
    n_shexp = n_ff_exp * a("expert_shared_count")
    t = {"token_embd.weight": [n_embd, n_vocab], "output_norm.weight": [n_embd], "output.weight": [n_embd, n_vocab]}
    for i in range(n_layer):
        b = f"blk.{i}."
        t.update({b + "attn_norm.weight": [n_embd], b + "attn_q_a_norm.weight": [q_lora],
                  b + "attn_kv_a_norm.weight": [kv_lora], b + "attn_q_a.weight": [n_embd, q_lora],
                  b + "attn_q_b.weight": [q_lora, n_head * k_mla], b + "attn_kv_a_mqa.weight": [n_embd, kv_lora + n_rot],
                  b + "attn_k_b.weight": [nope, kv_lora, n_head], b + "attn_v_b.weight": [kv_lora, v_mla, n_head],
                  b + "attn_output.weight": [n_head * v_mla, n_embd], b + "ffn_norm.weight": [n_embd]})
        if i < a("leading_dense_block_count"):
            t.update({b + "ffn_gate.weight": [n_embd, n_ff], b + "ffn_down.weight": [n_ff, n_embd],
                      b + "ffn_up.weight": [n_embd, n_ff]})
        else:
            t.update({b + "ffn_gate_inp.weight": [n_embd, n_expert], b + "exp_probs_b.bias": [n_expert],
                      b + "ffn_down_exps.weight": [n_ff_exp, n_embd, n_expert],
                      b + "ffn_gate_exps.weight": [n_embd, n_ff_exp, n_expert],
                      b + "ffn_up_exps.weight": [n_embd, n_ff_exp, n_expert],
                      b + "ffn_gate_shexp.weight": [n_embd, n_shexp], b + "ffn_down_shexp.weight": [n_shexp, n_embd],
                      b + "ffn_up_shexp.weight": [n_embd, n_shexp]})
    return t


def test_file_has_what_llama_cpp_loads(converted, hf_dir):
    r = GGUFReader(converted("q4_0", "q8_0"))
    for key, vtype in REQUIRED_KEYS.items():
        f = r.get_field(key)
        assert f is not None, f"missing {key}"
        assert f.types[0] == vtype, f"{key}: {f.types[0].name}, llama.cpp reads {vtype.name}"
    c = ModelConfig.from_json(hf_dir)
    assert field(r, "general.architecture") == "deepseek2"
    assert field(r, "deepseek2.attention.head_count_kv") == 1
    assert field(r, "deepseek2.attention.key_length") == c.kv_lora_rank + c.qk_rope_head_dim
    assert field(r, "deepseek2.attention.value_length") == c.kv_lora_rank
    assert field(r, "deepseek2.attention.key_length_mla") == c.qk_nope_head_dim + c.qk_rope_head_dim
    assert field(r, "deepseek2.attention.value_length_mla") == c.v_head_dim
    assert field(r, "deepseek2.expert_gating_func") == 2  # sigmoid
    assert field(r, "deepseek2.expert_weights_norm") is True
    assert field(r, "deepseek2.rope.scaling.type") == "yarn"
    assert field(r, "deepseek2.rope.scaling.yarn_log_multiplier") == np.float32(0.1 * 1.0)
    assert field(r, "deepseek2.expert_weights_scale") == np.float32(2.827)
    assert field(r, "tokenizer.ggml.model") == "gpt2" and field(r, "tokenizer.ggml.pre") == "kimi-k2"
    assert r.get_field("tokenizer.ggml.token_type").types == [GGUFValueType.ARRAY, GGUFValueType.INT32]
    assert len(field(r, "tokenizer.ggml.tokens")) == c.vocab_size
    assert field(r, "tokenizer.chat_template") == CHAT_TEMPLATE

    table = llama_cpp_tensor_table(r)
    got = {t.name: [int(x) for x in t.shape] for t in r.tensors}
    assert got == table
    types = {t.name: QT(t.tensor_type) for t in r.tensors}
    for name, qt in types.items():
        if name.endswith("_exps.weight"):
            assert qt == QT.Q4_0, name
        elif name.endswith(("norm.weight", "ffn_gate_inp.weight", "exp_probs_b.bias")):
            assert qt == QT.F32, name
        else:
            assert qt == QT.Q8_0, name
    data_end = max(t.data_offset + t.n_bytes for t in r.tensors)
    assert data_end <= os.path.getsize(converted("q4_0", "q8_0"))


def test_kv_b_split_is_llama_cpp_layout(converted, hf, hf_dir):
    c = ModelConfig.from_json(hf_dir)
    r = GGUFReader(converted("q8_0", "f32"))
    t = {x.name: x for x in r.tensors}
    for i in range(c.num_hidden_layers):
        k_ref, v_ref = hf_kv_b_split(hf.get(f"model.layers.{i}.self_attn.kv_b_proj.weight").numpy(), c)
        np.testing.assert_array_equal(t[f"blk.{i}.attn_k_b.weight"].data, k_ref)
        np.testing.assert_array_equal(t[f"blk.{i}.attn_v_b.weight"].data, v_ref)


# ---- reading back through GGUFCheckpoint ---------------------------------------------------------
def test_every_tensor_roundtrips_exactly_with_f32(converted, hf):
    with open_checkpoint(converted("q8_0", "f32")) as g:
        assert isinstance(g, GGUFCheckpoint)
        assert sorted(g.names()) == sorted(hf.names())
        for name in hf.names():
            w = hf.get(name)
            assert g.shape(name) == tuple(w.shape), name
            got = g.get(name)
            assert got.dtype == torch.float32
            if ".mlp.experts." in name:
                assert g.format(name) == "q8_0"
                np.testing.assert_array_equal(got.numpy(), ref_quant(w.numpy(), QT.Q8_0), err_msg=name)
            else:
                assert g.format(name) == "f32", name
                assert torch.equal(got, w), name  # includes kv_b_proj rebuilt from attn_k_b + attn_v_b


def test_q4_0_experts_and_q8_0_rest_match_reference_quantizers(converted, hf, hf_dir):
    c = ModelConfig.from_json(hf_dir)
    with GGUFCheckpoint(converted("q4_0", "q8_0")) as g:
        for name in hf.names():
            w = hf.get(name).numpy()
            got = g.get(name, dtype=torch.float64).numpy()
            assert got.dtype == np.float64
            if ".mlp.experts." in name:
                ref = ref_quant(w, QT.Q4_0)
            elif name.endswith("kv_b_proj.weight"):
                k, v = hf_kv_b_split(w, c)
                ref = np.concatenate([ref_quant(k, QT.Q8_0).transpose(0, 2, 1), ref_quant(v, QT.Q8_0)], axis=1)
                ref = ref.reshape(w.shape)
            elif w.ndim == 1 or name.endswith("mlp.gate.weight"):
                ref = w  # norms, router, correction bias stay F32
            else:
                ref = ref_quant(w, QT.Q8_0)
            np.testing.assert_array_equal(got, ref, err_msg=name)


@pytest.mark.parametrize("experts,other,rel_err", [("q4_k", "bf16", 0.12), ("q6_k", "f16", 0.03)])
def test_k_quant_experts(converted, hf, experts, other, rel_err):
    qt = {"q4_k": QT.Q4_K, "q6_k": QT.Q6_K}[experts]
    with GGUFCheckpoint(converted(experts, other)) as g:
        for layer in (1, 2):
            blocks = g.expert_blocks(layer)
            for kind in ("gate", "up", "down"):
                arr, t = blocks[kind]
                assert t == qt
                for e in range(arr.shape[0]):
                    name = f"model.layers.{layer}.mlp.experts.{e}.{kind}_proj.weight"
                    w, got = hf.get(name).numpy(), g.get(name).numpy()
                    # two independent dequantizers (gguf package inside get(), our C kernels) agree
                    np.testing.assert_array_equal(got, kernels.dequantize(arr[e], t, w.shape), err_msg=name)
                    err = np.sqrt(np.mean((got - w) ** 2) / np.mean(w ** 2))
                    assert 0 < err < rel_err, (name, err)
        w = hf.get("model.layers.0.self_attn.o_proj.weight")
        want = w.to(torch.bfloat16 if other == "bf16" else torch.float16).float()
        assert torch.equal(g.get("model.layers.0.self_attn.o_proj.weight"), want)
        assert g.format("model.layers.0.self_attn.o_proj.weight") == other


def test_q4_k_experts_run_in_the_repacked_layout(converted, hf_dir):
    """Q4_K experts (a GGUF's, or quantized at load) run as Q4_K_R8: the same weights, the same model."""
    import hybrid_k2
    path = converted("q4_k", "bf16")
    cpu = hybrid_k2.load(path, device="cpu", experts="cpu", dense_format="float")   # only the experts differ
    ref = hybrid_k2.load(path, device="cpu", experts="torch")   # the same blocks dequantized, float matmuls
    with GGUFCheckpoint(path) as g:
        for layer, w in cpu.experts.layers.items():
            assert (w.gate_type.name, w.up_type.name, w.down_type.name) == ("Q4_K_R8",) * 3
            for e in range(w.n_experts):
                name = f"model.layers.{layer}.mlp.experts.{e}.gate_proj.weight"
                np.testing.assert_array_equal(kernels.dequantize(w.blocks("gate")[e], "Q4_K_R8"), g.get(name).numpy())
    ids = list(range(3, 40))
    a, b = cpu.logits(ids), ref.logits(ids)
    rel = ((a - b).norm(dim=-1) / b.norm(dim=-1)).median().item()
    assert rel < 0.02, rel   # 8-bit activations into the experts (measured ~0.005)
    cpu.close(), ref.close()
    # quantized at load from the HF checkpoint: the same Q4_K blocks as our quantizer's, repacked
    eng = hybrid_k2.load(hf_dir, device="cpu", experts="cpu", expert_format="q4_k")
    with HFCheckpoint(hf_dir) as hf:
        for layer, w in eng.experts.layers.items():
            assert w.down_type.name == "Q4_K_R8"
            name = f"model.layers.{layer}.mlp.experts.1.down_proj.weight"
            want = kernels.dequantize(kernels.quantize(hf.get(name).float().numpy(), "Q4_K"), "Q4_K")
            np.testing.assert_array_equal(kernels.dequantize(w.blocks("down")[1], "Q4_K_R8"), want)
    eng.close()


def test_expert_blocks_are_zero_copy_views(converted, hf_dir):
    c = ModelConfig.from_json(hf_dir)
    with GGUFCheckpoint(converted("q4_0", "q8_0")) as g:
        assert g.moe_layers() == [1, 2]
        blocks = g.expert_blocks(2)
        for kind, rows, cols in (("gate", c.moe_intermediate_size, c.hidden_size),
                                 ("up", c.moe_intermediate_size, c.hidden_size),
                                 ("down", c.hidden_size, c.moe_intermediate_size)):
            arr, qt = blocks[kind]
            assert qt == int(QT.Q4_0) and arr.dtype == np.uint8
            assert arr.shape == (c.n_routed_experts, rows, cols // 32 * 18)
            assert np.shares_memory(arr, g._reader.data) and not arr.flags.writeable
            for e in range(c.n_routed_experts):
                np.testing.assert_array_equal(gguf.quants.dequantize(arr[e], QT.Q4_0),
                                              g.get(f"model.layers.2.mlp.experts.{e}.{kind}_proj.weight").numpy())
        with pytest.raises(CheckpointError, match="layer 0 has no routed experts"):
            g.expert_blocks(0)


def test_config_roundtrip(converted, hf_dir):
    with GGUFCheckpoint(converted("q4_0", "q8_0")) as g:
        d = g.config_dict()
        assert d["routed_scaling_factor"] == 2.827 and d["rope_scaling"]["mscale_all_dim"] == 1.0
        assert d["model_type"] == "kimi_k2"
        got = ModelConfig.from_dict(d, source="x")
        want = ModelConfig.from_json(hf_dir)  # transformers wrote model_type deepseek_v3
        assert got.replace(model_type=want.model_type, source=want.source) == want
        assert g.config() == got.replace(source=g.path)


def test_bench_gives_llama_cpp_the_files_yarn_betas(converted):
    """llama-cpp-python's Llama() defaults to YaRN beta_fast=32 over the file's own (here 1.0): the bench passes
    the GGUF's values, or llama.cpp computes other RoPE frequencies than the model's."""
    from hybrid_k2.versus_llama import llama_cpp_rope_args
    assert llama_cpp_rope_args(converted("q8_0", "q8_0")) == dict(yarn_beta_fast=1.0, yarn_beta_slow=1.0)


def test_tokenizer_roundtrip(converted, hf_dir):
    tok = Tokenizer.from_dir(hf_dir)
    path = converted("q4_0", "q8_0")
    with GGUFCheckpoint(path) as g:
        ranks, specials = g.tokenizer_vocab()
        assert g.chat_template() == CHAT_TEMPLATE
        d = g.config_dict()
    assert ranks == {tok.token_bytes(i): i for i in range(tok.num_base_tokens)}
    assert specials == tok.special_tokens and len(specials) == 256
    assert (d["bos_token_id"], d["eos_token_id"]) == (tok.bos_id, tok.eos_id)
    assert d["pad_token_id"] == tok.pad_id
    again = Tokenizer.from_ranks(ranks, specials)
    sample = TEXT[:200] + "<|im_end|>"
    assert again.encode(sample, allow_special=True) == tok.encode(sample, allow_special=True)

    # llama.cpp tokenizes with the merges list (rank = position): it must reproduce tiktoken
    r = GGUFReader(path)
    tokens, merges = field(r, "tokenizer.ggml.tokens"), field(r, "tokenizer.ggml.merges")
    assert len(merges) > 40
    merge_rank = {tuple(m.split(" ")): i for i, m in enumerate(merges)}
    ids = {t: i for i, t in enumerate(tokens)}
    b2u = gguf.vocab.bytes_to_unicode()
    for piece in set(regex.findall(KIMI_PAT_STR, TEXT, flags=regex.V1)):
        parts = ["".join(b2u[b] for b in bytes([x])) for x in piece.encode()]
        while True:
            cands = [(merge_rank[p], i) for i, p in enumerate(zip(parts, parts[1:])) if p in merge_rank]
            if not cands:
                break
            _, i = min(cands)
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        assert [ids[p] for p in parts] == tok.encode(piece), piece


def test_old_unsplit_kv_b_and_fused_gate_up_files(converted, hf, hf_dir, tmp_path):
    """Files from older converters (attn_kv_b, key/value_length = MLA head sizes) and from
    --fuse-gate-up-exps (ffn_gate_up_exps, gate rows first) read the same tensors."""
    c = ModelConfig.from_json(hf_dir)
    src = converted("q8_0", "f32")
    r = GGUFReader(src)
    tensors = {t.name: t for t in r.tensors}
    repl, drop = {}, set()
    for i in range(c.num_hidden_layers):
        drop |= {f"blk.{i}.attn_k_b.weight", f"blk.{i}.attn_v_b.weight"}
        repl[f"blk.{i}.attn_kv_b.weight"] = (hf.get(f"model.layers.{i}.self_attn.kv_b_proj.weight").numpy(), QT.F32)
    for i in (1, 2):
        gate, up = tensors[f"blk.{i}.ffn_gate_exps.weight"], tensors[f"blk.{i}.ffn_up_exps.weight"]
        drop |= {gate.name, up.name}
        repl[f"blk.{i}.ffn_gate_up_exps.weight"] = (np.concatenate([gate.data, up.data], axis=1), QT.Q8_0)
    kv = {"deepseek2.attention.key_length": c.qk_nope_head_dim + c.qk_rope_head_dim,
          "deepseek2.attention.value_length": c.v_head_dim}
    old = str(tmp_path / "old.gguf")
    rewrite_gguf(src, old, drop=drop | {"deepseek2.attention.key_length_mla", "deepseek2.attention.value_length_mla"},
                 add_tensors=repl, set_kv=kv)
    with GGUFCheckpoint(src) as new, GGUFCheckpoint(old) as g:
        assert sorted(g.names()) == sorted(new.names())
        for name in new.names():
            assert torch.equal(g.get(name), new.get(name)), name
        assert g.config_dict() == new.config_dict()
        a, b = g.expert_blocks(1), new.expert_blocks(1)
        for kind in ("gate", "up", "down"):
            np.testing.assert_array_equal(a[kind][0], b[kind][0])


# ---- INT4 checkpoint, q_proj (no q_lora), no YaRN, small sizes -----------------------------------
@pytest.fixture(scope="module")
def int4_dir(hf_dir, tmp_path_factory):
    """Kimi-K2-Thinking-style checkpoint: compressed-tensors INT4 experts (group 32); also exercises
    q_lora_rank = null, no rope scaling, norm_topk_prob false and a k_b row (nope = 16) too short for Q8_0."""
    d = str(tmp_path_factory.mktemp("int4"))
    for f in ("tiktoken.model", "tokenizer_config.json"):
        shutil.copy(os.path.join(hf_dir, f), d)
    base = Tokenizer.from_dir(hf_dir).num_base_tokens
    cfg = dict(model_type="kimi_k2", architectures=["DeepseekV3ForCausalLM"], vocab_size=base + 256,
               hidden_size=64, intermediate_size=96, moe_intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=2, num_key_value_heads=2, q_lora_rank=None, kv_lora_rank=32,
               qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=4, n_shared_experts=1,
               num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=1, norm_topk_prob=False,
               routed_scaling_factor=1.5, scoring_func="sigmoid", topk_method="noaux_tc", rms_norm_eps=1e-5,
               rope_theta=10000.0, max_position_embeddings=512, bos_token_id=base, eos_token_id=base + 1,
               tie_word_embeddings=False,
               quantization_config={"quant_method": "compressed-tensors", "format": "pack-quantized",
                                    "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
                                        "num_bits": 4, "type": "int", "symmetric": True, "strategy": "group",
                                        "group_size": 32}}}})
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f)
    H, nh, qk, kvr, v = 64, 2, 24, 32, 16
    g = torch.Generator().manual_seed(1)
    rnd = lambda *s: torch.randn(*s, generator=g) * 0.05  # noqa: E731
    t = {"model.embed_tokens.weight": rnd(base + 256, H), "model.norm.weight": rnd(H), "lm_head.weight": rnd(base + 256, H)}
    for i in range(2):
        p = f"model.layers.{i}."
        t.update({p + "input_layernorm.weight": rnd(H), p + "post_attention_layernorm.weight": rnd(H),
                  p + "self_attn.q_proj.weight": rnd(nh * qk, H), p + "self_attn.kv_a_proj_with_mqa.weight": rnd(kvr + 8, H),
                  p + "self_attn.kv_a_layernorm.weight": rnd(kvr), p + "self_attn.kv_b_proj.weight": rnd(nh * 32, kvr),
                  p + "self_attn.o_proj.weight": rnd(H, nh * v)})
        if i == 0:
            t.update({p + "mlp.gate_proj.weight": rnd(96, H), p + "mlp.up_proj.weight": rnd(96, H),
                      p + "mlp.down_proj.weight": rnd(H, 96)})
            continue
        t.update({p + "mlp.gate.weight": rnd(4, H), p + "mlp.gate.e_score_correction_bias": rnd(4),
                  p + "mlp.shared_experts.gate_proj.weight": rnd(64, H), p + "mlp.shared_experts.up_proj.weight": rnd(64, H),
                  p + "mlp.shared_experts.down_proj.weight": rnd(H, 64)})
        for e in range(4):
            for kind in ("gate_proj", "up_proj", "down_proj"):
                packed, scale, shape = int4_group_quantize(rnd(64, 64), 32)
                n = f"{p}mlp.experts.{e}.{kind}."
                t.update({n + "weight_packed": packed, n + "weight_scale": scale, n + "weight_shape": shape})
    save_safetensors(os.path.join(d, "model.safetensors"), t)
    return d


def test_int4_experts_become_q4_0_losslessly(int4_dir, tmp_path):
    out = convert(int4_dir, str(tmp_path / "int4.gguf"), experts="q4_0", other="q8_0", progress=False)
    with HFCheckpoint(int4_dir) as hf, GGUFCheckpoint(out) as g:
        assert sorted(g.names()) == sorted(hf.names())
        n_exact = 0
        for name in hf.names():
            if hf.format(name) == "int4_group":
                assert g.format(name) == "q4_0"
                # requantizing would not be exact: int4_group_quantize uses scale = amax/7, Q4_0 amax/-8
                assert torch.equal(g.get(name), hf.get(name)), name
                n_exact += 1
        assert n_exact == 12
        assert torch.allclose(g.get("model.layers.1.self_attn.q_proj.weight"),
                              hf.get("model.layers.1.self_attn.q_proj.weight"), atol=2e-3)
        assert g.format("model.layers.1.self_attn.kv_b_proj.weight") == "f32"  # k_b rows of 16: no Q8_0 blocks
        assert torch.allclose(g.get("model.layers.1.self_attn.kv_b_proj.weight"),
                              hf.get("model.layers.1.self_attn.kv_b_proj.weight"), atol=2e-3)
        d = g.config_dict()
        assert "rope_scaling" not in d and d["q_lora_rank"] is None and d["norm_topk_prob"] is False
        assert ModelConfig.from_dict(d, source="x") == ModelConfig.from_json(int4_dir).replace(source="x")
    r = GGUFReader(out)
    assert r.get_field("deepseek2.attention.q_lora_rank") is None
    assert QT(next(t for t in r.tensors if t.name == "blk.1.attn_k_b.weight").tensor_type) == QT.F32


def test_convert_rejects_bad_arguments(int4_dir, tmp_path):
    out = str(tmp_path / "x.gguf")
    with pytest.raises(ValueError, match="experts='iq2_xxs'"):
        convert(int4_dir, out, experts="iq2_xxs", progress=False)
    with pytest.raises(ValueError, match="other='q4_0'"):
        convert(int4_dir, out, other="q4_0", progress=False)
    with pytest.raises(ValueError, match=r"blk\.1\.ffn_gate_exps\.weight: rows of 64 values do not fill Q4_K"):
        convert(int4_dir, out, experts="q4_k", progress=False)
    assert not os.path.exists(out) and not os.path.exists(out + ".part")
    with pytest.raises(SystemExit):
        main([int4_dir, out, "--experts", "iq2_xxs"])


# ---- bad files -----------------------------------------------------------------------------------
def rewrite_gguf(src, dst, *, arch=None, drop=(), add_tensors=None, set_kv=None):
    """Copy a GGUF through the gguf package, dropping keys/tensors and adding or replacing some."""
    r = GGUFReader(src)
    w = gguf.GGUFWriter(dst, arch or field(r, "general.architecture"))
    for key, f in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or key in drop:
            continue
        if key in (set_kv or {}):
            w.add_key_value(key, set_kv[key], f.types[0])
        elif f.types[0] == GGUFValueType.ARRAY:
            w.add_key_value(key, f.contents(), GGUFValueType.ARRAY, sub_type=f.types[-1])
        else:
            w.add_key_value(key, f.contents(), f.types[0])
    for key, v in (set_kv or {}).items():
        if r.get_field(key) is None:
            w.add_uint32(key, v)
    for t in r.tensors:
        if t.name not in drop and t.name not in (add_tensors or {}):
            w.add_tensor(t.name, np.asarray(t.data), raw_dtype=QT(t.tensor_type))
    for name, (data, qt) in (add_tensors or {}).items():
        w.add_tensor(name, np.ascontiguousarray(data), raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_bad_files_raise_checkpoint_error_naming_file_and_tensor(converted, tmp_path):
    src = converted("q4_0", "q8_0")

    def expect(path, *fragments):
        with pytest.raises(CheckpointError) as ei:
            GGUFCheckpoint(path)
        msg = str(ei.value)
        assert str(path) in msg
        for frag in fragments:
            assert frag in msg, (frag, msg)

    p = str(tmp_path / "llama.gguf")
    rewrite_gguf(src, p, arch="llama")
    expect(p, "architecture is 'llama'", "deepseek2")

    p = str(tmp_path / "missing.gguf")
    rewrite_gguf(src, p, drop={"blk.1.ffn_up_exps.weight"})
    expect(p, "'blk.1.ffn_up_exps.weight'", "missing")

    p = str(tmp_path / "half_kv.gguf")
    rewrite_gguf(src, p, drop={"blk.2.attn_v_b.weight"})
    expect(p, "'blk.2.attn_v_b.weight'", "missing")

    p = str(tmp_path / "shape.gguf")
    rewrite_gguf(src, p, add_tensors={"blk.0.attn_norm.weight": (np.ones(100, np.float32), QT.F32)})
    expect(p, "'blk.0.attn_norm.weight'", "[100]", "expected [256]")

    p = str(tmp_path / "nokey.gguf")
    rewrite_gguf(src, p, drop={"deepseek2.attention.kv_lora_rank"})
    expect(p, "deepseek2.attention.kv_lora_rank", "missing")

    data = open(src, "rb").read()
    p = str(tmp_path / "truncated.gguf")
    open(p, "wb").write(data[:-1000])
    expect(p, "'output.weight'", "truncated")

    p = str(tmp_path / "header.gguf")
    open(p, "wb").write(data[:300])
    expect(p, "not a readable GGUF")

    p = str(tmp_path / "junk.gguf")
    open(p, "wb").write(b"not a gguf file at all" * 10)
    expect(p, "not a readable GGUF")

    expect(str(tmp_path / "absent.gguf"), "not found")

    with GGUFCheckpoint(src) as g:
        with pytest.raises(CheckpointError, match="'model.layers.9.mlp.gate.weight' is not in this GGUF"):
            g.get("model.layers.9.mlp.gate.weight")


def _retype_up_experts(converted, tmp_path, qt: "QT", fill) -> str:
    """A copy of a converted GGUF whose layer-1 up experts are random `qt` blocks (fill sets their scales)."""
    src = converted("q8_0", "q8_0")
    with GGUFCheckpoint(src) as g:
        E, rows, _ = g.expert_blocks(1)["up"][0].shape
        cols = g.shape("model.layers.1.mlp.experts.0.up_proj.weight")[1]
    block, nbytes = gguf.GGML_QUANT_SIZES[qt]
    raw = np.random.default_rng(0).integers(0, 256, size=(E, rows, cols // block, nbytes), dtype=np.uint8)
    fill(raw)
    p = str(tmp_path / f"{qt.name.lower()}-up.gguf")
    rewrite_gguf(src, p, add_tensors={"blk.1.ffn_up_exps.weight": (raw.reshape(E, rows, -1), qt)})
    return p


def test_community_expert_type_runs_in_place(converted, tmp_path):
    """Experts in Q2_K (the bulk of the most downloaded Kimi K2 quants) run on the CPU kernels from the file's own
    blocks, and the model's logits follow the torch backend run on the same (dequantized) weights."""
    def fill(raw):
        raw[..., 80:84] = np.frombuffer(np.array([0.01, 0.002], np.float16).tobytes(), np.uint8)   # d, dmin
    p = _retype_up_experts(converted, tmp_path, QT.Q2_K, fill)
    ids = list(range(3, 40))
    with hybrid_k2.load(p, device="cpu", dense_format="float", progress=False) as eng, \
            hybrid_k2.load(p, device="cpu", experts="torch", progress=False) as ref:
        assert "Q2_K" in eng.summary
        got, want = eng.logits(ids), ref.logits(ids)
    rel = ((got - want).norm() / want.norm()).item()
    assert rel < 2e-2, rel


def test_expert_type_the_kernels_do_not_run_is_named(converted, tmp_path):
    """Experts stored in a block type the CPU kernels do not run (here MXFP4, a gpt-oss type) are refused naming
    the file, the tensor and the type by name; expert_format= requantizes them at load, and that model's logits
    follow the torch backend run on the file's own (dequantized) weights."""
    def fill(raw):
        raw[..., 0] = 120   # e8m0 block scale 2^-7
    p = _retype_up_experts(converted, tmp_path, QT.MXFP4, fill)
    with pytest.raises(CheckpointError) as ei:
        hybrid_k2.load(p, device="cpu", progress=False)
    msg = str(ei.value)
    for frag in (p, "'blk.1.ffn_up_exps.weight'", "is MXFP4", "Q4_0, Q8_0, Q4_K, Q6_K", "Q2_K", "IQ4_XS", "expert_format="):
        assert frag in msg, (frag, msg)
    ids = list(range(3, 40))
    with hybrid_k2.load(p, device="cpu", expert_format="q8_0", dense_format="float", progress=False) as eng, \
            hybrid_k2.load(p, device="cpu", experts="torch", progress=False) as ref:
        got, want = eng.logits(ids), ref.logits(ids)
    rel = ((got - want).norm() / want.norm()).item()
    assert rel < 2e-2, rel
