"""HF safetensors checkpoint reading: parser, FP8-block and INT4 dequantisation, sharding, bad input."""
import json
import math
import os
import struct

import pytest
import safetensors.torch
import torch

from hybrid_k2.checkpoint import CheckpointError, HFCheckpoint, SafetensorsFile, fetch, open_checkpoint
from hybrid_k2.checkpoint.quantize import (fp8_block_quantize, int4_group_quantize, pack_int4, save_safetensors,
                                           write_sharded)

ALL_DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2,
              torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64, torch.bool]


def sample_tensors():
    g = torch.Generator().manual_seed(0)
    out = {}
    for i, dt in enumerate(ALL_DTYPES):
        x = torch.randn(3, 5 + i, generator=g) * 50
        out[f"t.{dt}".replace("torch.", "")] = x > 0 if dt is torch.bool else x.to(dt)
    out["scalar"] = torch.tensor(2.5)
    out["empty"] = torch.zeros(0, 4, dtype=torch.bfloat16)
    return out


def same_bits(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)) if a.numel() else True


def write_config(d, quantization_config):
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump({"model_type": "deepseek_v3", "quantization_config": quantization_config}, f)


# ---- safetensors parser / writer round trips -------------------------------------------------
def test_our_writer_roundtrip_and_reference_reader(tmp_path):
    ts = sample_tensors()
    path = tmp_path / "a.safetensors"
    save_safetensors(path, ts, metadata={"who": "test"})
    with SafetensorsFile(path) as f:
        assert sorted(f.names()) == sorted(ts)
        assert f.metadata["who"] == "test"
        for name, t in ts.items():
            v = f.view(name)
            assert f.info(name)[1] == tuple(t.shape)
            assert same_bits(v, t), name
    ref = safetensors.torch.load_file(str(path))  # the independent reader agrees
    for name, t in ts.items():
        assert same_bits(ref[name], t), name


def test_reads_reference_writer(tmp_path):
    ts = sample_tensors()
    path = tmp_path / "b.safetensors"
    safetensors.torch.save_file(ts, str(path), metadata={"format": "pt"})
    with SafetensorsFile(path) as f:
        assert f.metadata == {"format": "pt"}
        for name, t in ts.items():
            assert same_bits(f.view(name), t), name
        dtype, shape = f.info("t.bfloat16")
        assert dtype == "BF16" and shape == (3, 8)
        # zero-copy: two views of one tensor alias the same mapped bytes
        assert f.view("t.float32").data_ptr() == f.view("t.float32").data_ptr()


# ---- FP8 block -------------------------------------------------------------------------------
def fp8_reference(q, s, bo, bi):
    """Straightforward block-by-block dequantisation."""
    out = q.float().clone()
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            out[i * bo:(i + 1) * bo, j * bi:(j + 1) * bi] *= s[i, j]
    return out


@pytest.mark.parametrize("shape,block,config", [
    ((200, 300), (128, 128), {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                              "weight_block_size": [128, 128]}),
    ((256, 128), (128, 128), None),  # no config.json: default 128x128
    ((100, 70), (64, 32), {"quant_method": "fp8", "weight_block_size": [64, 32]}),
])
def test_fp8_block_dequant_matches_reference(tmp_path, shape, block, config):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    q, s = fp8_block_quantize(w, block)
    assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float32
    assert s.shape == (math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1]))
    save_safetensors(tmp_path / "model.safetensors", {"m.weight": q, "m.weight_scale_inv": s})
    if config:
        write_config(tmp_path, config)
    with HFCheckpoint(tmp_path) as ck:
        assert ck.names() == ["m.weight"] and ck.format("m.weight") == "fp8_block"
        assert ck.shape("m.weight") == shape
        got = ck.get("m.weight")
        assert got.dtype == torch.float32
        assert torch.equal(got, fp8_reference(q, s, *block))
        assert torch.equal(ck.get("m.weight", dtype=torch.bfloat16), got.bfloat16())
    # e4m3 keeps 3 mantissa bits: relative error per element <= 2^-4 of the block max
    assert ((got - w).abs() <= fp8_reference(torch.ones_like(w), s, *block) * 448 / 16 + 1e-6).all()


# ---- INT4 pack-quantized ---------------------------------------------------------------------
def int4_reference(packed, scale, out, inp, group):
    """Per-element decode straight from the compressed-tensors description."""
    words = packed.tolist()
    sc = scale.float()
    w = torch.empty(out, inp)
    q = torch.empty(out, inp, dtype=torch.uint8)
    for r in range(out):
        for c in range(inp):
            nib = (words[r][c // 8] >> (4 * (c % 8))) & 0xF
            q[r, c] = nib
            w[r, c] = (nib - 8) * sc[r, c // group]
    return w, q


def test_pack_int4_matches_loop_packing():
    q = torch.randint(-8, 8, (5, 13), generator=torch.Generator().manual_seed(2), dtype=torch.int8)
    want = torch.zeros(5, 2, dtype=torch.int64)
    for r in range(5):
        for c in range(13):
            want[r, c // 8] |= (int(q[r, c]) + 8) << (4 * (c % 8))  # padding nibbles stay 0
    want = torch.where(want >= 2**31, want - 2**32, want).to(torch.int32)
    assert torch.equal(pack_int4(q), want)


@pytest.mark.parametrize("shape,group,config", [
    ((70, 72), 32, None),  # default group 32, partial last group (72 % 32 = 8)
    ((64, 80), 32, {"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {
        "group_0": {"targets": ["Linear"], "weights": {"num_bits": 4, "group_size": 32, "strategy": "group",
                                                        "symmetric": True, "type": "int"}}}}),
    ((9, 13), 16, {"quant_method": "compressed-tensors", "config_groups": {
        "group_0": {"weights": {"num_bits": 4, "group_size": 16, "type": "int"}}}}),  # in % 8 != 0: padded word
])
def test_int4_dequant_matches_reference(tmp_path, shape, group, config):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(3))
    packed, scale, wshape = int4_group_quantize(w, group)
    assert packed.dtype == torch.int32 and packed.shape == (shape[0], math.ceil(shape[1] / 8))
    assert scale.dtype == torch.bfloat16 and scale.shape == (shape[0], math.ceil(shape[1] / group))
    assert wshape.tolist() == list(shape)
    ts = {"e.weight_packed": packed, "e.weight_scale": scale, "e.weight_shape": wshape,
          "norm.weight": torch.ones(4, dtype=torch.bfloat16)}
    save_safetensors(tmp_path / "model.safetensors", ts)
    if config:
        write_config(tmp_path, config)
    ref_w, ref_q = int4_reference(packed, scale, *shape, group)
    with HFCheckpoint(tmp_path) as ck:
        assert ck.names() == ["e.weight", "norm.weight"]
        assert ck.format("e.weight") == "int4_group" and ck.shape("e.weight") == shape
        assert torch.equal(ck.get("e.weight"), ref_w)
        q, s, g = ck.get_int4("e.weight")
        assert g == group and q.dtype == torch.uint8 and torch.equal(q, ref_q)
        assert s.dtype == torch.float32 and torch.equal(s, scale.float())
        with pytest.raises(CheckpointError, match="norm.weight"):
            ck.get_int4("norm.weight")
    # symmetric round-to-nearest: error within half a step
    step = scale.float().repeat_interleave(group, 1)[:, :shape[1]]
    assert ((ref_w - w).abs() <= step / 2 + 1e-6).all()


# ---- sharding, directory layouts -------------------------------------------------------------
def model_tensors():
    g = torch.Generator().manual_seed(4)
    ts = {"model.embed_tokens.weight": torch.randn(64, 32, generator=g).bfloat16(),
          "model.layers.0.input_layernorm.weight": torch.randn(32, generator=g),
          "model.layers.0.self_attn.rotary_emb.inv_freq": torch.rand(8, generator=g)}
    q, s = fp8_block_quantize(torch.randn(160, 200, generator=g))
    ts["model.layers.0.mlp.gate_proj.weight"], ts["model.layers.0.mlp.gate_proj.weight_scale_inv"] = q, s
    p, sc, sh = int4_group_quantize(torch.randn(48, 64, generator=g))
    ts["model.layers.1.mlp.experts.0.up_proj.weight_packed"] = p
    ts["model.layers.1.mlp.experts.0.up_proj.weight_scale"] = sc
    ts["model.layers.1.mlp.experts.0.up_proj.weight_shape"] = sh
    ts["lm_head.weight"] = torch.randn(64, 32, generator=g).half()
    return ts


LOGICAL = sorted(["model.embed_tokens.weight", "model.layers.0.input_layernorm.weight",
                  "model.layers.0.self_attn.rotary_emb.inv_freq", "model.layers.0.mlp.gate_proj.weight",
                  "model.layers.1.mlp.experts.0.up_proj.weight", "lm_head.weight"])


def test_sharded_index_matches_single_file(tmp_path):
    ts = model_tensors()
    files = write_sharded(tmp_path / "sharded", ts, max_shard_bytes=8000)
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(ts) and set(index["weight_map"].values()) == set(files)
    assert write_sharded(tmp_path / "single", ts, max_shard_bytes=1 << 30) == ["model.safetensors"]
    with open_checkpoint(tmp_path / "sharded") as a, HFCheckpoint(tmp_path / "single") as b:
        assert isinstance(a, HFCheckpoint)
        assert a.names() == b.names() == LOGICAL
        for name in LOGICAL:
            assert a.format(name) == b.format(name) and a.shape(name) == b.shape(name)
            assert torch.equal(a.get(name), b.get(name)), name
        assert a.format("lm_head.weight") == "f16" and a.format("model.embed_tokens.weight") == "bf16"
        assert torch.equal(a.get("lm_head.weight", dtype=torch.float16), ts["lm_head.weight"])


def test_dir_of_unindexed_shards_and_lone_file(tmp_path):
    ts = model_tensors()
    names = list(ts)
    save_safetensors(tmp_path / "part-a.safetensors", {n: ts[n] for n in names[:3]})
    save_safetensors(tmp_path / "part-b.safetensors", {n: ts[n] for n in names[3:]})
    with HFCheckpoint(tmp_path) as ck:
        assert ck.names() == LOGICAL
    with HFCheckpoint(tmp_path / "part-a.safetensors") as ck:
        assert ck.names() == sorted(names[:3])


def test_get_returns_fresh_writable_copy(tmp_path):
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    save_safetensors(tmp_path / "model.safetensors", {"x": t})
    with HFCheckpoint(tmp_path) as ck:
        a = ck.get("x")  # same dtype as stored: must still be a copy, not the read-only mapping
        a.add_(1)
        assert torch.equal(ck.get("x"), t)


def _file_backed_rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[2]) * os.sysconf("SC_PAGE_SIZE")  # resident file-backed pages


def test_get_maps_only_the_tensor_it_reads(tmp_path):
    big = {f"big.{i}": torch.full((1 << 20,), float(i)) for i in range(16)}  # 16 x 4 MiB
    big["small.a"] = torch.arange(1 << 18, dtype=torch.float32)  # 1 MiB
    big["small.b"] = torch.arange(1 << 18, dtype=torch.float32) * 2
    save_safetensors(tmp_path / "model.safetensors", big)
    size = os.path.getsize(tmp_path / "model.safetensors")
    with HFCheckpoint(tmp_path) as ck:
        ck.get("small.a")  # warm up code paths (their pages count as file-backed too); closing unmaps
    before = _file_backed_rss_bytes()
    with HFCheckpoint(tmp_path) as ck:
        got = ck.get("small.b")
        grown = _file_backed_rss_bytes() - before
    assert torch.equal(got, big["small.b"])
    assert got.untyped_storage().nbytes() == got.numel() * 4  # a fresh allocation of just this tensor
    assert grown < size // 8, f"reading a 1 MiB tensor mapped {grown} bytes of a {size}-byte file"


# ---- bad input ---------------------------------------------------------------------------------
def raw_file(path, header_bytes, data=b"", header_len=None):
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header_bytes) if header_len is None else header_len) + header_bytes + data)
    return path


@pytest.mark.parametrize("header,data,header_len,match", [
    (b"{not json", b"", None, "not valid JSON"),
    (b"{}", b"", 1 << 60, "header length"),
    (b"{}", b"", 4096, "header length"),  # longer than the file
    (b"[1, 2]", b"", None, "not a JSON object"),
    (json.dumps({"w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 20]}}).encode(), b"\0" * 24, None,
     "'w'.*needs 24"),  # offsets inconsistent with dtype x shape
    (json.dumps({"w": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 2]}}).encode(), b"\0" * 2, None,
     "'w'.*unsupported dtype"),
    (json.dumps({"a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]},
                 "b": {"dtype": "U8", "shape": [4], "data_offsets": [2, 6]}}).encode(), b"\0" * 6, None, "overlap"),
])
def test_corrupt_headers(tmp_path, header, data, header_len, match):
    path = raw_file(tmp_path / "bad.safetensors", header, data, header_len)
    with pytest.raises(CheckpointError, match=match) as e:
        SafetensorsFile(path)
    assert str(path) in str(e.value)


def test_tiny_and_truncated_files(tmp_path):
    (tmp_path / "tiny.safetensors").write_bytes(b"\1\0")
    with pytest.raises(CheckpointError, match="tiny.safetensors"):
        SafetensorsFile(tmp_path / "tiny.safetensors")
    path = tmp_path / "model.safetensors"
    save_safetensors(path, {"a": torch.ones(100), "last": torch.ones(10, dtype=torch.int8)})
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 3)
    with pytest.raises(CheckpointError, match=r"model.safetensors.*'last'.*truncated"):
        HFCheckpoint(tmp_path)


def test_missing_tensor_and_missing_shard(tmp_path):
    files = write_sharded(tmp_path, model_tensors(), max_shard_bytes=8000)
    with HFCheckpoint(tmp_path) as ck:
        for call in (ck.get, ck.shape, ck.format):
            with pytest.raises(CheckpointError, match=f"{tmp_path}.*'model.layers.7.mlp.gate.weight'"):
                call("model.layers.7.mlp.gate.weight")
        assert "model.layers.7.mlp.gate.weight" not in ck
        name = "model.layers.1.mlp.experts.0.up_proj.weight"
        assert torch.equal(fetch(ck, name, (48, 64)), ck.get(name))
        with pytest.raises(CheckpointError, match=rf"{name}.*\[48, 64\].*expects \[64, 48\]"):
            fetch(ck, name, (64, 48))
    os.remove(tmp_path / files[1])
    with pytest.raises(CheckpointError, match=rf"model.safetensors.index.json.*{files[1]}"):
        HFCheckpoint(tmp_path)


def test_wrong_dtypes_and_scale_shapes(tmp_path):
    w = torch.randn(130, 140)
    q, s = fp8_block_quantize(w)
    packed, scale, shape = int4_group_quantize(torch.randn(16, 64))
    save_safetensors(tmp_path / "model.safetensors", {
        "fp8_no_scale.weight": q,
        "fp8_bad_scale.weight": q, "fp8_bad_scale.weight_scale_inv": s[:1],
        "int4_float.weight_packed": packed.float(), "int4_float.weight_scale": scale, "int4_float.weight_shape": shape,
        "int4_bad_scale.weight_packed": packed, "int4_bad_scale.weight_scale": scale[:, :1],
        "int4_bad_scale.weight_shape": shape,
        "int4_no_scale.weight_packed": packed, "int4_no_scale.weight_shape": shape,
        "norm.weight": torch.ones(8, dtype=torch.int32),
    })
    with HFCheckpoint(tmp_path) as ck:
        cases = [("fp8_no_scale.weight", "F8_E4M3.*weight_scale_inv"),
                 ("fp8_bad_scale.weight", r"fp8_bad_scale.weight_scale_inv.*\[1, 2\].*expected.*\[2, 2\]"),
                 ("int4_float.weight", "int4_float.weight_packed.*F32"),
                 ("int4_bad_scale.weight", r"int4_bad_scale.weight_scale.*\[16, 1\]"),
                 ("int4_no_scale.weight", "int4_no_scale.weight_scale"),
                 ("norm.weight", "'norm.weight'.*I32")]
        for name, match in cases:
            with pytest.raises(CheckpointError, match=match) as e:
                ck.get(name)
            assert str(tmp_path) in str(e.value)


def _mtp_checkpoint(d, mark: bool):
    """A 2-layer model's tensors plus a third layer past the trunk (as DeepSeek-V3 / Kimi K2 store their MTP layer
    after layer 60), with or without the MTP layer's eh_proj; config.json says 2 layers and no MTP layers."""
    from test_hardening_readers import TINY
    from hybrid_k2.checkpoint import expected_tensors
    from hybrid_k2.config import ModelConfig
    cfg = dict(TINY, vocab_size=64, num_nextn_predict_layers=0)
    cfg.pop("quantization_config")
    full = ModelConfig.from_dict(dict(cfg, num_hidden_layers=3))
    t = {n: torch.zeros(s, dtype=torch.bfloat16) for n, s, _, _ in expected_tensors(full)}
    if mark:
        H = full.hidden_size
        t.update({"model.layers.2.eh_proj.weight": torch.zeros(H, 2 * H, dtype=torch.bfloat16),
                  "model.layers.2.enorm.weight": torch.ones(H, dtype=torch.bfloat16),
                  "model.layers.2.hnorm.weight": torch.ones(H, dtype=torch.bfloat16)})
    os.makedirs(d)
    save_safetensors(os.path.join(d, "model.safetensors"), t)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f)
    return d


def test_mtp_layer_past_the_trunk_is_allowed_when_the_config_does_not_count_it(tmp_path):
    """A layer past num_hidden_layers holding eh_proj is an MTP layer (not run here) even with
    num_nextn_predict_layers 0; the same layer without it is a trunk layer the config would leave out."""
    from hybrid_k2.checkpoint import CheckpointConfigError, check_config_against
    from hybrid_k2.config import ModelConfig
    ok = _mtp_checkpoint(tmp_path / "mtp", mark=True)
    with HFCheckpoint(ok) as ck:
        check_config_against(ck, ModelConfig.from_json(ok))
    bad = _mtp_checkpoint(tmp_path / "trunk", mark=False)
    with HFCheckpoint(bad) as ck, pytest.raises(CheckpointConfigError, match=r"model\.layers\.2\..*num_hidden_layers"):
        check_config_against(ck, ModelConfig.from_json(bad))
