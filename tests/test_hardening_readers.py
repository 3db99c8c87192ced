"""Hardening of the readers and the config (issue 11, item 3): sizes from headers checked against the file
before anything is allocated, corrupt files refused by tensor name, shard paths confined to the checkpoint,
every config field validated by name, and a SIGBUS on a truncated mapped file that says which file.

The checkpoints are real files: a tiny Kimi-K2-shaped HF directory (FP8 dense, INT4 experts, BF16 norms,
tiktoken.model) written here, and the deepseek2 GGUF that hybrid_k2.convert makes of it. The fuzz harness
(test_fuzz.py) seeds from the same files.
"""
import json
import math
import os
import resource
import shutil
import signal
import struct
import subprocess
import sys
import textwrap

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT

from hybrid_k2.bpe_train import train_bpe, write_tiktoken_model
from hybrid_k2.checkpoint import (CheckpointConfigError, CheckpointError, HFCheckpoint, SafetensorsFile,
                                  check_config_against, expected_tensors, open_checkpoint)
from hybrid_k2.checkpoint.gguf import SCALE_FIELDS, GGUFCheckpoint, nonfinite_scales, scan_header
from hybrid_k2.checkpoint.quantize import fp8_block_quantize, int4_group_quantize, save_safetensors, write_sharded
from hybrid_k2.config import ConfigError, ModelConfig
from hybrid_k2.tokenizer import KIMI_PAT_STR

TINY = dict(
    architectures=["DeepseekV3ForCausalLM"], model_type="kimi_k2", hidden_size=64, intermediate_size=64,
    moe_intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, q_lora_rank=32, kv_lora_rank=32,
    qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=4, n_shared_experts=1,
    num_experts_per_tok=2, n_group=1, topk_group=1, topk_method="noaux_tc", scoring_func="sigmoid",
    norm_topk_prob=True, routed_scaling_factor=2.827, first_k_dense_replace=1, moe_layer_freq=1, rms_norm_eps=1e-6,
    rope_theta=50000.0, max_position_embeddings=4096, hidden_act="silu", tie_word_embeddings=False,
    rope_scaling=dict(type="yarn", factor=32.0, original_max_position_embeddings=4096, beta_fast=1.0, beta_slow=1.0,
                      mscale=1.0, mscale_all_dim=1.0),
    quantization_config=dict(quant_method="fp8", fmt="e4m3", weight_block_size=[32, 32], config_groups={
        "group_0": {"targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "symmetric": True,
                                                        "strategy": "group", "group_size": 32}}}),
)
TEXT = "def main():\n    print('hello, world')\n    return 0\n" * 4 + "The quick brown fox jumps over the lazy dog.\n"


def write_tiny_hf(d, shard_bytes: int | None = None, **overrides) -> dict:
    """A Kimi-K2-shaped HF checkpoint in the real layouts, tensors derived from the config's own list:
    FP8 (32x32 blocks) dense matrices, compressed-tensors INT4 experts, BF16 norms/embeddings/router,
    fp32 correction bias, tiktoken.model. Returns the config written."""
    os.makedirs(d, exist_ok=True)
    ranks = train_bpe(TEXT, 300, KIMI_PAT_STR)
    write_tiktoken_model(os.path.join(d, "tiktoken.model"), ranks)
    cfg = dict(TINY, vocab_size=len(ranks) + 256, bos_token_id=len(ranks), eos_token_id=len(ranks) + 1)
    cfg.update(overrides)
    mc = ModelConfig.from_dict(cfg, source="tiny")
    g = torch.Generator().manual_seed(0)
    t = {}
    for name, shape, _, _ in expected_tensors(mc):
        if name == "lm_head.weight" and mc.tie_word_embeddings:
            continue
        w = torch.randn(*shape, generator=g) * 0.1
        base = name[: -len(".weight")]
        if name.endswith("e_score_correction_bias"):
            t[name] = w
        elif len(shape) == 1 or name.endswith(("embed_tokens.weight", "lm_head.weight", "mlp.gate.weight")):
            t[name] = (w + (1 if len(shape) == 1 else 0)).bfloat16()
        elif ".mlp.experts." in name:
            t[base + ".weight_packed"], t[base + ".weight_scale"], t[base + ".weight_shape"] = int4_group_quantize(w, 32)
        else:
            t[name], t[name + "_scale_inv"] = fp8_block_quantize(w, (32, 32))
    if shard_bytes is None:
        save_safetensors(os.path.join(d, "model.safetensors"), t, metadata={"format": "pt"})
    else:
        write_sharded(d, t, shard_bytes, metadata={"format": "pt"})
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    return cfg


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_hf")
    write_tiny_hf(d)
    return d


@pytest.fixture(scope="module")
def tiny_gguf(tiny_hf, tmp_path_factory):
    from hybrid_k2.convert import convert
    return convert(str(tiny_hf), str(tmp_path_factory.mktemp("tiny_gguf") / "tiny.gguf"), experts="q4_0",
                   other="q8_0", progress=False)


def copy_dir(src, dst):
    shutil.copytree(src, dst)
    return dst


def set_config(d, **fields):
    p = os.path.join(d, "config.json")
    cfg = json.load(open(p))
    cfg.update(fields)
    json.dump(cfg, open(p, "w"))


def run_bounded(code: str, timeout: float = 60, mem_gb: float = 4):
    """Run Python code in a child with an address-space limit and a timeout: a hang or unbounded allocation
    fails the test (TimeoutExpired / MemoryError) instead of taking the machine down."""
    limit = int(mem_gb * (1 << 30))

    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, preexec_fn=cap)


def gguf_layout(path):
    """{tensor name: (byte offset of its type id in the header, byte offset of its data offset field)} and
    {metadata key: byte offset of its (scalar) value}, from the gguf package's own reader."""
    r = gguf.GGUFReader(path)
    base = r.data.ctypes.data
    tensors = {t.name: (t.field.parts[4].ctypes.data - base, t.field.parts[5].ctypes.data - base) for t in r.tensors}
    kv = {k: f.parts[-1].ctypes.data - base for k, f in r.fields.items() if not k.startswith("GGUF.")}
    return r, tensors, kv


def patch(path, dst, offset, data: bytes):
    b = bytearray(open(path, "rb").read())
    b[offset:offset + len(data)] = data
    open(dst, "wb").write(bytes(b))
    return str(dst)


def expect_error(fn, cls, *fragments):
    with pytest.raises(cls) as ei:
        fn()
    msg = str(ei.value)
    for frag in fragments:
        assert frag in msg, (frag, msg)
    return ei.value


# ---- the list of expected tensors is the model's ---------------------------------------------------------
@pytest.mark.parametrize("over", [{}, {"q_lora_rank": None, "tie_word_embeddings": True},
                                  {"moe_layer_freq": 2, "num_hidden_layers": 4, "topk_method": "greedy",
                                   "n_shared_experts": 0}])
def test_expected_tensors_are_the_models_parameters_and_experts(over):
    from hybrid_k2.experts import expert_names
    from hybrid_k2.model import Transformer
    cfg = ModelConfig.from_dict(dict(TINY, vocab_size=600, **over))
    with torch.device("meta"):
        net = Transformer(cfg)
    want = {n: tuple(p.shape) for n, p in net.named_parameters()}
    for layer in cfg.moe_layers:
        for e in range(cfg.n_routed_experts):
            for n, shape in zip(expert_names(layer, e), ((32, 64), (32, 64), (64, 32))):
                want[n] = shape
    got = {n: s for n, s, _, _ in expected_tensors(cfg)}
    assert got == want


# ---- sizes from headers are checked against the file before anything is allocated ------------------------
def test_gguf_block_count_2_32_is_refused_at_once(tiny_gguf, tmp_path):
    _, _, kv = gguf_layout(tiny_gguf)
    bad = patch(tiny_gguf, tmp_path / "layers.gguf", kv["deepseek2.block_count"], struct.pack("<I", 2**32 - 1))
    r = run_bounded(f"""
        from hybrid_k2.checkpoint.gguf import GGUFCheckpoint
        from hybrid_k2.config import ConfigError
        try:
            GGUFCheckpoint({bad!r})
        except ConfigError as e:
            print(e)
    """, timeout=60, mem_gb=3)
    assert r.returncode == 0, r.stderr[-2000:]
    assert bad in r.stdout and "num_hidden_layers" in r.stdout and "deepseek2.block_count" in r.stdout, r.stdout


def test_gguf_block_count_smaller_than_the_file_is_refused(tiny_gguf, tmp_path):
    _, _, kv = gguf_layout(tiny_gguf)
    bad = patch(tiny_gguf, tmp_path / "fewer.gguf", kv["deepseek2.block_count"], struct.pack("<I", 1))
    expect_error(lambda: GGUFCheckpoint(bad), CheckpointConfigError, bad, "'blk.1.", "block_count is 1")


def load_error(d) -> str:
    """The ConfigError message of hybrid_k2.load(d), in a child bounded in time and memory (a hang or a huge
    allocation fails the test instead of the machine)."""
    r = run_bounded(f"""
        import hybrid_k2
        try:
            hybrid_k2.load({str(d)!r}, device="cpu", progress=False)
        except hybrid_k2.ConfigError as e:
            print(e)
    """, timeout=120, mem_gb=4)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


@pytest.mark.parametrize("layers", [1_000_000, 2**63])
def test_config_with_absurd_layer_count_is_refused_by_name(tiny_hf, tmp_path, layers):
    d = copy_dir(tiny_hf, tmp_path / "ck")
    set_config(d, num_hidden_layers=layers)
    out = load_error(d)
    assert "num_hidden_layers" in out and str(d / "config.json") in out, out


def test_config_num_hidden_layers_against_the_checkpoint(tiny_hf, tmp_path):
    with HFCheckpoint(tiny_hf) as ck:
        cfg = ModelConfig.from_json(tiny_hf)
        check_config_against(ck, cfg)   # the real pair agrees
        e = expect_error(lambda: check_config_against(ck, cfg.replace(num_hidden_layers=1)), CheckpointConfigError,
                         str(tiny_hf), "'num_hidden_layers' is 1", "model.layers.1.")
        assert e.field == "num_hidden_layers" and isinstance(e, ConfigError) and isinstance(e, CheckpointError)
        expect_error(lambda: check_config_against(ck, cfg.replace(num_hidden_layers=40)), CheckpointConfigError,
                     "'num_hidden_layers' is 40", "no tensors for layer 2", "37 more")
        # MTP layers stored after the trunk are allowed when the config says there are some
        check_config_against(ck, cfg.replace(num_hidden_layers=1, first_k_dense_replace=1, num_nextn_predict_layers=1))


@pytest.mark.parametrize("field,value,fragments", [
    ("vocab_size", 1 << 24, ["'model.embed_tokens.weight'", "field vocab_size gives 16777216"]),
    ("hidden_size", 1 << 17, ["'model.embed_tokens.weight'", "field hidden_size gives 131072"]),
    ("n_routed_experts", 2, ["mlp.experts.2.", "is expert 2", "'n_routed_experts' is 2"]),
    ("n_shared_experts", 0, ["mlp.shared_experts", "'n_shared_experts' is 0"]),
    ("first_k_dense_replace", 0, ["model.layers.0.mlp", "first_k_dense_replace"]),
    ("q_lora_rank", None, ["'model.layers.0.self_attn.q_proj.weight' is missing", "q_lora_rank"]),
    ("moe_intermediate_size", 1 << 20, ["field moe_intermediate_size", "gives 1048576"]),
    ("topk_method", "greedy", ["e_score_correction_bias", "'topk_method'"]),
])
def test_config_sizes_are_checked_against_the_tensors(tiny_hf, field, value, fragments):
    cfg = ModelConfig.from_json(tiny_hf).replace(**{field: value, "num_experts_per_tok": 2})
    with HFCheckpoint(tiny_hf) as ck:
        expect_error(lambda: check_config_against(ck, cfg), CheckpointConfigError, str(tiny_hf), *fragments)


def test_huge_vocab_config_is_refused_before_allocating(tiny_hf, tmp_path):
    """config.json vocab_size 2**24 and hidden 2**17 on a small checkpoint: the loader used to build the model on
    meta and to_empty() it (terabytes) before shapes were compared."""
    d = copy_dir(tiny_hf, tmp_path / "ck")
    set_config(d, vocab_size=1 << 24, hidden_size=1 << 17)
    out = load_error(d)
    assert "model.embed_tokens.weight" in out and "vocab_size" in out, out


@pytest.mark.parametrize("block,match", [([1e9, 1e9], "weight_block_size"), ([10**9, 10**9], "weight_block_size"),
                                         ([0, 32], "weight_block_size"), ("32", "weight_block_size")])
def test_bad_fp8_block_sizes_are_refused(tiny_hf, tmp_path, block, match):
    d = copy_dir(tiny_hf, tmp_path / "ck")
    set_config(d, quantization_config=dict(TINY["quantization_config"], weight_block_size=block))
    r = run_bounded(f"""
        from hybrid_k2.checkpoint import HFCheckpoint, CheckpointError
        with HFCheckpoint({str(d)!r}) as ck:
            try:
                ck.get("model.layers.0.self_attn.o_proj.weight")
            except CheckpointError as e:
                print(e)
    """, timeout=60, mem_gb=3)
    assert r.returncode == 0, r.stderr[-2000:]
    assert match in r.stdout and str(d / "config.json") in r.stdout, r.stdout


def test_fp8_block_larger_than_the_matrix_is_one_scale(tmp_path):
    w = torch.randn(40, 50)
    q, s = fp8_block_quantize(w, (4096, 4096))
    assert s.shape == (1, 1)
    save_safetensors(tmp_path / "model.safetensors", {"m.weight": q, "m.weight_scale_inv": s})
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {"weight_block_size": [4096, 4096]}}))
    with HFCheckpoint(tmp_path) as ck:
        assert torch.equal(ck.get("m.weight"), q.float() * s[0, 0])


def test_gguf_counts_beyond_the_file_are_refused_without_parsing(tiny_gguf, tmp_path):
    data = open(tiny_gguf, "rb").read()
    for off, what in ((8, "tensor count"), (16, "metadata key count")):
        bad = str(tmp_path / f"count{off}.gguf")
        open(bad, "wb").write(data[:off] + struct.pack("<Q", 2**63) + data[off + 8:])
        expect_error(lambda: GGUFCheckpoint(bad), CheckpointError, bad, "cannot hold that many")
    # an array whose item count exceeds the file: gguf's own reader loops on it (each read past the end is
    # empty, so nothing advances) with memory growing; the header scan refuses it by key
    r, _, _ = gguf_layout(tiny_gguf)
    f = r.fields["tokenizer.ggml.token_type"]
    count_at = f.parts[4].ctypes.data - r.data.ctypes.data
    bad = patch(tiny_gguf, tmp_path / "array.gguf", count_at, struct.pack("<Q", 2**62))
    expect_error(lambda: GGUFCheckpoint(bad), CheckpointError, bad, "tokenizer.ggml.token_type")


# ---- corrupt files are refused, not read as garbage -------------------------------------------------------
def test_gguf_retyped_tensor_is_refused(tiny_gguf, tmp_path):
    r, tensors, _ = gguf_layout(tiny_gguf)
    names = [t.name for t in r.tensors]
    q8 = [t.name for t in r.tensors if t.tensor_type == QT.Q8_0]
    for name in (q8[0], q8[-1] if q8[-1] == names[-1] else names[-1]):   # one inside, the last one
        t = next(t for t in r.tensors if t.name == name)
        new = QT.Q4_0 if t.tensor_type != QT.Q4_0 else QT.Q8_0
        bad = patch(tiny_gguf, tmp_path / "retyped.gguf", tensors[name][0], struct.pack("<I", int(new)))
        expect_error(lambda: GGUFCheckpoint(bad), CheckpointError, bad, repr(name))


def test_gguf_offset_into_another_tensor_is_refused(tiny_gguf, tmp_path):
    r, tensors, _ = gguf_layout(tiny_gguf)
    a, b = r.tensors[3], r.tensors[4]
    into = int(a.data_offset - r.data_offset) + 32   # b's data offset moved inside a
    bad = patch(tiny_gguf, tmp_path / "alias.gguf", tensors[b.name][1], struct.pack("<Q", into))
    expect_error(lambda: GGUFCheckpoint(bad), CheckpointError, bad, repr(b.name), repr(a.name), "into another tensor")
    bad = patch(tiny_gguf, tmp_path / "unaligned.gguf", tensors[b.name][1],
                struct.pack("<Q", int(b.data_offset - r.data_offset) + 1))
    expect_error(lambda: GGUFCheckpoint(bad), CheckpointError, bad, repr(b.name))


def test_gguf_bytes_after_the_last_tensor_are_refused(tiny_gguf, tmp_path):
    bad = str(tmp_path / "tail.gguf")
    open(bad, "wb").write(open(tiny_gguf, "rb").read() + b"\0" * 64)
    expect_error(lambda: GGUFCheckpoint(bad), CheckpointError, bad, "after the last tensor")


def test_safetensors_header_length_one_byte_short_is_refused(tmp_path):
    path = tmp_path / "model.safetensors"
    save_safetensors(path, {"a": torch.arange(8, dtype=torch.float32), "b": torch.ones(4)})
    data = bytearray(path.read_bytes())
    n = struct.unpack("<Q", data[:8])[0]
    assert data[8 + n - 1:8 + n] == b" "   # the writer pads the JSON with spaces: it still parses one byte short
    for delta, frag in ((-1, "header length"), (+1, "not valid JSON")):
        bad = tmp_path / f"short{delta}.safetensors"
        bad.write_bytes(struct.pack("<Q", n + delta) + data[8:])
        expect_error(lambda: SafetensorsFile(bad), CheckpointError, str(bad), frag)


def test_safetensors_gaps_and_trailing_bytes_are_refused(tmp_path):
    def raw(name, header, data):
        h = json.dumps(header).encode()
        p = tmp_path / name
        p.write_bytes(struct.pack("<Q", len(h)) + h + data)
        return p
    gap = raw("gap.safetensors", {"a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]},
                                  "b": {"dtype": "U8", "shape": [2], "data_offsets": [6, 8]}}, b"\0" * 8)
    expect_error(lambda: SafetensorsFile(gap), CheckpointError, str(gap), "'a' and 'b'", "gap")
    tail = raw("tail.safetensors", {"a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]}}, b"\0" * 5)
    expect_error(lambda: SafetensorsFile(tail), CheckpointError, str(tail), "end at byte 4", "5 bytes")


def test_nonfinite_fp8_and_int4_scales_are_refused_by_name(tmp_path):
    q, s = fp8_block_quantize(torch.randn(64, 64), (32, 32))
    s[1, 0] = float("nan")
    packed, scale, shape = int4_group_quantize(torch.randn(8, 64), 32)
    scale[3, 1] = float("inf")
    save_safetensors(tmp_path / "model.safetensors", {"d.weight": q, "d.weight_scale_inv": s, "e.weight_packed": packed,
                                                      "e.weight_scale": scale, "e.weight_shape": shape})
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": TINY["quantization_config"]}))
    with HFCheckpoint(tmp_path) as ck:
        expect_error(lambda: ck.get("d.weight"), CheckpointError, str(tmp_path), "'d.weight_scale_inv'", "not finite")
        expect_error(lambda: ck.get_int4("e.weight"), CheckpointError, "'e.weight_scale'", "not finite")
        expect_error(lambda: ck.get("e.weight"), CheckpointError, "'e.weight_scale'", "not finite")


def test_scale_table_matches_the_gguf_dequantizer():
    """Each table offset is a block scale: NaN there makes gguf's reference dequantize produce NaN."""
    rng = np.random.default_rng(0)
    for qt, offs in SCALE_FIELDS.items():
        if qt == QT.Q8_K:
            continue   # gguf cannot dequantize Q8_K (an activation type); its float32 d leads the block
        bs, ts = gguf.constants.GGML_QUANT_SIZES[qt]
        blk = rng.integers(0, 256, size=(3, ts), dtype=np.uint8)
        for o in offs:
            blk[:, o:o + 2] = np.frombuffer(np.float16(0.5).tobytes(), np.uint8)
        assert np.isfinite(gguf.quants.dequantize(blk.copy(), qt)).all() and nonfinite_scales(blk, qt) == 0, qt
        for o in offs:
            bad = blk.copy()
            bad[1, o:o + 2] = np.frombuffer(np.float16(np.nan).tobytes(), np.uint8)
            with np.errstate(invalid="ignore"):
                assert not np.isfinite(gguf.quants.dequantize(bad, qt)).all(), (qt, o)
            assert nonfinite_scales(bad, qt) == 1, (qt, o)


def test_gguf_nonfinite_block_scale_is_refused_where_it_is_read(tiny_gguf, tmp_path):
    r = gguf.GGUFReader(tiny_gguf)
    base = r.data.ctypes.data
    for name, read in (("blk.1.ffn_down_exps.weight", lambda g: g.expert_blocks(1)),
                       ("blk.0.attn_output.weight", lambda g: g.raw_blocks("model.layers.0.self_attn.o_proj.weight")),
                       ("blk.0.attn_output.weight", lambda g: g.get("model.layers.0.self_attn.o_proj.weight"))):
        t = next(t for t in r.tensors if t.name == name)
        block = gguf.constants.GGML_QUANT_SIZES[QT(t.tensor_type)][1]
        at = t.data.ctypes.data - base + 5 * block   # the 6th block's d
        bad = patch(tiny_gguf, tmp_path / "nan.gguf", at, np.float16(np.inf).tobytes())
        with GGUFCheckpoint(bad) as g:   # opening reads no data
            expect_error(lambda: read(g), CheckpointError, bad, repr(name), "not finite")


# ---- shard paths stay inside the checkpoint ------------------------------------------------------------
def test_index_shard_paths_are_confined(tiny_hf, tmp_path):
    d = tmp_path / "ck"
    write_tiny_hf(d, shard_bytes=20_000)
    index = d / "model.safetensors.index.json"
    good = json.loads(index.read_text())
    name, shard = next(iter(good["weight_map"].items()))
    outside = tmp_path / "outside.safetensors"
    shutil.copy(d / shard, outside)
    for entry in ("../outside.safetensors", str(outside), "/etc/passwd", "sub/../../outside.safetensors", "./" + shard):
        bad = dict(good, weight_map={**good["weight_map"], name: entry})
        index.write_text(json.dumps(bad))
        expect_error(lambda: HFCheckpoint(d), CheckpointError, str(index), repr(name), repr(entry))
    # a symbolic link out of the directory is resolved and refused too
    index.write_text(json.dumps(dict(good, weight_map={**good["weight_map"], name: "link.safetensors"})))
    os.symlink(outside, d / "link.safetensors")
    expect_error(lambda: HFCheckpoint(d), CheckpointError, str(index), "'link.safetensors'", "outside")
    index.write_text(json.dumps(good))
    with HFCheckpoint(d) as ck:
        assert name in ck.physical_names()


def test_unindexed_shard_symlink_out_of_the_dir_is_refused_but_hf_cache_layout_works(tiny_hf, tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.copy(tiny_hf / "model.safetensors", outside / "model.safetensors")
    d = tmp_path / "ck"
    d.mkdir()
    shutil.copy(tiny_hf / "config.json", d)
    os.symlink(outside / "model.safetensors", d / "model.safetensors")
    expect_error(lambda: HFCheckpoint(d), CheckpointError, "model.safetensors", "outside")
    # huggingface_hub's cache: snapshots/<rev>/file -> ../../blobs/<hash>
    repo = tmp_path / "hub" / "models--org--tiny"
    (repo / "blobs").mkdir(parents=True)
    (repo / "snapshots" / "abc").mkdir(parents=True)
    shutil.copy(tiny_hf / "model.safetensors", repo / "blobs" / "0123abcd")
    os.symlink("../../blobs/0123abcd", repo / "snapshots" / "abc" / "model.safetensors")
    with HFCheckpoint(repo / "snapshots" / "abc") as ck:
        assert "model.norm.weight" in ck


# ---- config fields validated at load, by name ----------------------------------------------------------
@pytest.mark.parametrize("fields,rope,name", [
    ({"rope_theta": 1}, {}, "rope_theta"),
    ({}, {"original_max_position_embeddings": 0}, "rope_scaling.original_max_position_embeddings"),
    ({}, {"beta_fast": float("nan")}, "rope_scaling.beta_fast"),
    ({}, {"mscale_all_dim": float("inf")}, "rope_scaling.mscale_all_dim"),
    ({}, {"factor": 0.5}, "rope_scaling.factor"),
    ({}, {"truncate": "no"}, "rope_scaling.truncate"),
    ({}, {"attention_factor": 1e30}, "rope_scaling.attention_factor"),   # found by the fuzzer: inf logits
    ({}, {"mscale": 1e300}, "rope_scaling.mscale"),
    ({"routed_scaling_factor": float("nan")}, {}, "routed_scaling_factor"),
    ({"routed_scaling_factor": float("inf")}, {}, "routed_scaling_factor"),
    ({"rms_norm_eps": float("nan")}, {}, "rms_norm_eps"),
    ({"rms_norm_eps": 0}, {}, "rms_norm_eps"),
    ({"n_shared_experts": -1}, {}, "n_shared_experts"),
    ({"num_hidden_layers": True}, {}, "num_hidden_layers"),
    ({"hidden_size": 64.0}, {}, "hidden_size"),
    ({"vocab_size": 1 << 25}, {}, "vocab_size"),
    ({"n_routed_experts": 1 << 17}, {}, "n_routed_experts"),
    ({"max_position_embeddings": 1 << 30}, {}, "max_position_embeddings"),
    ({"eos_token_id": "[EOS]"}, {}, "eos_token_id"),
    ({"bos_token_id": 10**6}, {}, "bos_token_id"),
    ({"norm_topk_prob": 1}, {}, "norm_topk_prob"),
    ({"rope_theta": 10**400}, {}, "rope_theta"),
    ({"n_routed_experts": 0, "intermediate_size": 0}, {}, "intermediate_size"),
])
def test_config_values_are_validated_by_name(tmp_path, fields, rope, name):
    d = dict(TINY, vocab_size=556)
    d.update(fields)
    d["rope_scaling"] = dict(TINY["rope_scaling"], **rope)
    (tmp_path / "config.json").write_text(json.dumps(d))   # NaN / Infinity: Python's json writes and reads them
    e = expect_error(lambda: ModelConfig.from_json(tmp_path), ConfigError, str(tmp_path / "config.json"), repr(name))
    assert e.field == name


def test_validation_also_guards_replace():
    cfg = ModelConfig.from_dict(dict(TINY, vocab_size=556))
    expect_error(lambda: cfg.replace(rope_theta=float("nan")), ConfigError, "'rope_theta'")
    expect_error(lambda: cfg.replace(num_hidden_layers="2"), ConfigError, "'num_hidden_layers' must be an integer")


def test_gguf_metadata_goes_through_the_same_validation(tiny_gguf, tmp_path):
    _, _, kv = gguf_layout(tiny_gguf)
    for key, value, field in (("deepseek2.rope.freq_base", struct.pack("<f", 1.0), "rope_theta"),
                              ("deepseek2.attention.layer_norm_rms_epsilon", struct.pack("<f", float("nan")),
                               "rms_norm_eps"),
                              ("deepseek2.expert_weights_scale", struct.pack("<f", float("inf")), "routed_scaling_factor"),
                              ("deepseek2.expert_shared_count", struct.pack("<I", 2000), "n_shared_experts"),
                              ("deepseek2.rope.scaling.original_context_length", struct.pack("<I", 0),
                               "rope_scaling.original_max_position_embeddings")):
        bad = patch(tiny_gguf, tmp_path / "meta.gguf", kv[key], value)
        e = expect_error(lambda: GGUFCheckpoint(bad), CheckpointConfigError, bad, repr(field), key)
        assert e.field == field


# ---- a file truncated while mapped ----------------------------------------------------------------------
def test_gguf_truncated_after_open_is_an_error_at_load_time(tiny_gguf, tmp_path):
    p = shutil.copy(tiny_gguf, tmp_path / "t.gguf")
    with GGUFCheckpoint(p) as g:
        os.truncate(p, 4096)
        expect_error(lambda: g.get("model.norm.weight"), CheckpointError, str(p), "truncated while in use")
        expect_error(lambda: g.expert_blocks(1), CheckpointError, str(p), "truncated while in use")


@pytest.mark.parametrize("kind", ["gguf", "kernels", "safetensors"])
def test_sigbus_on_a_truncated_mapping_names_the_file(tiny_gguf, tiny_hf, tmp_path, kind):
    """A view handed out before the truncation (what the kernels read in place) faults: the process dies of
    SIGBUS, as before, but first says which file, and does not hang -- also when the fault is in the C
    kernels' worker threads, which run without the GIL."""
    if kind == "kernels":
        from hybrid_k2.convert import convert
        p = convert(str(tiny_hf), str(tmp_path / "q8.gguf"), experts="q8_0", progress=False)   # run in place
        code = f"""
            import os, torch
            from hybrid_k2 import kernels
            from hybrid_k2.checkpoint.gguf import GGUFCheckpoint
            from hybrid_k2.experts.cpu import _gguf_layer
            w = _gguf_layer(GGUFCheckpoint({str(p)!r}), 1)
            kernels.set_threads(2)
            x, ids, wt = torch.randn(4, 64), torch.tensor([[0, 1], [2, 3], [1, 2], [3, 0]], dtype=torch.int32), torch.ones(4, 2)
            kernels.moe_forward(w, x, ids, wt)
            os.truncate({str(p)!r}, 4096)
            print("sum", float(kernels.moe_forward(w, x, ids, wt).sum()))
        """
    elif kind == "gguf":
        p = shutil.copy(tiny_gguf, tmp_path / "t.gguf")
        code = f"""
            import os, numpy as np
            from hybrid_k2.checkpoint.gguf import GGUFCheckpoint
            g = GGUFCheckpoint({str(p)!r})
            down = g.expert_blocks(1)["down"][0]
            os.truncate({str(p)!r}, 4096)
            print("sum", int(down.sum()))
        """
    else:
        p = shutil.copy(tiny_hf / "model.safetensors", tmp_path / "t.safetensors")
        code = f"""
            import os
            from hybrid_k2.checkpoint import SafetensorsFile
            f = SafetensorsFile({str(p)!r})
            v = f.view("lm_head.weight")
            os.truncate({str(p)!r}, 4096)
            print("sum", float(v.float().sum()))
        """
    r = run_bounded(code, timeout=60)
    assert r.returncode == -signal.SIGBUS, (r.returncode, r.stderr[-2000:])
    assert "SIGBUS" in r.stderr and f"{p}: " in r.stderr and "now 4096 bytes" in r.stderr, r.stderr[-2000:]
    assert "sum" not in r.stdout


def test_expert_views_outlive_the_checkpoint(tmp_path):
    """Closing a GGUFCheckpoint must not unmap under the expert views it handed out (the CPU backend runs them in
    place): reading one after close() was a segfault. The SIGBUS note keeps naming the file until the last view goes."""
    import gc
    from hybrid_k2.versus_llama import build_demo_gguf
    from hybrid_k2.checkpoint import mapped
    p = str(build_demo_gguf())
    g = GGUFCheckpoint(p)
    blocks = g.expert_blocks(g.moe_layers()[0])["up"][0]
    want = bytes(blocks[1, 2, :64])
    g.close()
    assert bytes(blocks[1, 2, :64]) == want
    assert any(path == p for path, _ in mapped.mapped_files())
    del blocks
    gc.collect()
    assert not any(path == p for path, _ in mapped.mapped_files())
