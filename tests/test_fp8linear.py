"""FP8Linear and dense_format='fp8': a checkpoint's FP8 matrices held as stored, block scales and all.

References: the HF checkpoint reader's dequantization (`fetch`, HFCheckpoint.get on a real safetensors file)
and the float model built from the same checkpoint."""
import json

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import hybrid_k2
from hybrid_k2.checkpoint import CheckpointError, fetch, open_checkpoint
from hybrid_k2.checkpoint.quantize import fp8_block_quantize, save_safetensors
from hybrid_k2.convert import convert
from hybrid_k2.demo import ensure_demo
from hybrid_k2.experts.torch_backend import TorchExperts
from hybrid_k2.generate import Engine
from hybrid_k2.fp8linear import FP8Linear
from hybrid_k2.loader import DENSE_MATRICES, build_model

DEMO = ensure_demo()   # the packaged trained demo: Kimi-K2-Instruct's layout (FP8 matrices, bf16 lm_head)


@pytest.fixture(scope="module")
def fp8_file(tmp_path_factory):
    """A real FP8 checkpoint of one [300, 200] matrix (edge blocks partial both ways), read by HFCheckpoint."""
    d = tmp_path_factory.mktemp("fp8")
    w = torch.randn(300, 200, generator=torch.Generator().manual_seed(0)) * 0.05
    q, s = fp8_block_quantize(w, 128)
    save_safetensors(d / "model.safetensors", {"m.weight": q, "m.weight_scale_inv": s})
    return d


def test_weight_and_forward_are_fetchs_dequantization(fp8_file):
    with open_checkpoint(fp8_file) as ck:
        ref = fetch(ck, "m.weight", (300, 200))                       # the reader's float32 dequantization
        ref_bf16 = ck.get("m.weight", dtype=torch.bfloat16)
        m = FP8Linear.from_checkpoint_tensors(ck.raw("m.weight"), ck.raw("m.weight_scale_inv"), dtype=torch.float32)
    assert m.weight_fp8.dtype == torch.float8_e4m3fn and m.scale_inv.dtype == torch.float32
    assert torch.equal(m.weight, ref)
    x = torch.randn(5, 200, generator=torch.Generator().manual_seed(1))
    assert torch.equal(m(x), F.linear(x, ref))
    assert torch.equal(m(x.bfloat16()), F.linear(x.bfloat16(), ref_bf16))   # rounded once, as get(dtype=bf16)
    # several slabs (the path large matrices take): the same weights, the same products row by row
    m.slab_rows = 128
    y = m(x.view(5, 1, 200))
    assert y.shape == (5, 1, 300)
    torch.testing.assert_close(y.view(5, 300), F.linear(x, ref), rtol=1e-6, atol=1e-6)
    m._weight_ref = None
    assert torch.equal(m.weight, ref)
    assert m.nbytes == 300 * 200 + 4 * 3 * 2


def test_keeps_its_bits_through_module_casts(fp8_file):
    with open_checkpoint(fp8_file) as ck:
        w8, s = ck.raw("m.weight"), ck.raw("m.weight_scale_inv")
        m = FP8Linear.from_checkpoint_tensors(w8, s)
        m.to(torch.bfloat16).to("cpu").half()      # Module.to(dtype) casts floating buffers; these are bits
        assert torch.equal(m.weight_fp8.view(torch.uint8), w8.view(torch.uint8))
        assert torch.equal(m.scale_inv, s.float())
        assert list(m.parameters()) == [] and set(m.state_dict()) == {"qweight", "qscale"}
    with torch.device("meta"):
        e = FP8Linear(200, 300)
    assert e.qweight.is_meta
    e.to_empty(device="cpu")
    assert e.weight_fp8.shape == (300, 200)


def test_bad_arguments():
    m = FP8Linear(256, 128)
    w = torch.zeros(128, 256, dtype=torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="weight: dtype torch.bfloat16, expected torch.float8_e4m3fn"):
        m.set_weight(w.bfloat16(), torch.ones(1, 2))
    with pytest.raises(ValueError, match=r"weight: shape \(128, 128\), expected \(128, 256\)"):
        m.set_weight(w[:, :128], torch.ones(1, 2))
    with pytest.raises(ValueError, match=r"scale_inv: .* \(2, 2\), expected a float \(1, 2\) for 128x128 blocks"):
        m.set_weight(w, torch.ones(2, 2))
    with pytest.raises(ValueError, match="not finite"):
        m.set_weight(w, torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(ValueError, match="in_features: expected a positive int"):
        FP8Linear(0, 4)
    with pytest.raises(ValueError, match="block: expected two positive ints"):
        FP8Linear(4, 4, (128, 0))
    m.set_weight(w, torch.ones(1, 2))
    with pytest.raises(ValueError, match="x: last dimension 64, expected in_features=256"):
        m(torch.randn(1, 64))
    with pytest.raises(ValueError, match="x: dtype torch.int64"):
        m(torch.ones(1, 256, dtype=torch.long))


def covered(net):
    return {n: m for n, m in net.named_modules() if DENSE_MATRICES.fullmatch(n)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_model_equals_the_float_model(dtype):
    """The demo held as FP8 (on a CPU device, as an accelerator would hold it): the same logits as the float model."""
    with open_checkpoint(DEMO) as ck:
        cfg = hybrid_k2.ModelConfig.from_json(DEMO)
        fp8 = build_model(cfg, ck, "cpu", dtype, dense_format="fp8")
        ref = build_model(cfg, ck, "cpu", dtype, dense_format="float")
        mods = covered(fp8)
        assert len(mods) == 7 * cfg.num_hidden_layers + 1
        for n, m in mods.items():
            if n == "lm_head":       # stored bf16 in the checkpoint (as Kimi K2's): kept float
                assert type(m) is nn.Linear and ck.format("lm_head.weight") == "bf16"
                continue
            assert isinstance(m, FP8Linear), n
            assert torch.equal(m.weight_fp8.view(torch.uint8), ck.raw(n + ".weight").view(torch.uint8)), n
            assert torch.equal(m.weight, ref.get_submodule(n).weight), n
            assert n + ".weight" not in dict(fp8.named_parameters())     # no float copy was made
        experts = TorchExperts.from_checkpoint(ck, cfg, "cpu", dtype)
    fp8.set_experts(experts), ref.set_experts(experts)
    ids = list(range(3, 70))
    a, b = Engine(fp8, None).logits(ids), Engine(ref, None).logits(ids)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5 if dtype == torch.float32 else 0)


def test_load_fp8_and_the_summary():
    eng = hybrid_k2.load(DEMO, device="cpu", experts="torch", dense_format="fp8", progress=False)
    ref = hybrid_k2.load(DEMO, device="cpu", experts="torch", progress=False)
    assert eng.dense_format == "fp8" and ref.dense_format == "float"
    assert "dense fp8, 42 of 43 matrices" in eng.summary
    out = eng.generate([5, 6, 7], max_new_tokens=8, temperature=0)
    assert out.token_ids == ref.generate([5, 6, 7], max_new_tokens=8, temperature=0).token_ids
    eng.close(), ref.close()


def test_float_checkpoint_is_quantized_at_load(tmp_path):
    """A bf16 checkpoint with dense_format='fp8': DeepSeek-V3's quantizer at load, lm_head kept float."""
    with open_checkpoint(DEMO) as ck:
        tensors = {n: ck.get(n, dtype=torch.bfloat16) for n in ck.names()}
    save_safetensors(tmp_path / "model.safetensors", tensors)
    cfg = json.loads((DEMO / "config.json").read_text())
    del cfg["quantization_config"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with open_checkpoint(tmp_path) as ck:
        net = build_model(hybrid_k2.ModelConfig.from_json(tmp_path), ck, "cpu", torch.float32, dense_format="fp8")
        for n, m in covered(net).items():
            if n == "lm_head":
                assert type(m) is nn.Linear
                continue
            q, s = fp8_block_quantize(ck.get(n + ".weight"), 128)
            assert torch.equal(m.weight_fp8.view(torch.uint8), q.view(torch.uint8)), n
            assert torch.equal(m.scale_inv, s), n


def test_fp8_refused_for_a_gguf(tmp_path):
    path = convert(DEMO, tmp_path / "demo.gguf", experts="q8_0", other="q8_0", progress=False)
    with pytest.raises(CheckpointError, match=f"{tmp_path / 'demo.gguf'}: dense_format='fp8' .* a GGUF does not store"):
        hybrid_k2.load(path, device="cpu", dense_format="fp8", progress=False)


def test_bad_fp8_tensors_are_named(tmp_path):
    with open_checkpoint(DEMO) as ck:
        tensors = {n: ck.raw(n).clone() for n in ck.physical_names()}
    name = "model.layers.0.self_attn.o_proj.weight_scale_inv"
    tensors[name][0, 0] = float("inf")
    save_safetensors(tmp_path / "model.safetensors", tensors)
    (tmp_path / "config.json").write_text((DEMO / "config.json").read_text())
    with open_checkpoint(tmp_path) as ck:
        with pytest.raises(CheckpointError, match=r"model\.layers\.0\.self_attn\.o_proj\.weight") as ei:
            build_model(hybrid_k2.ModelConfig.from_json(tmp_path), ck, "cpu", torch.float32, dense_format="fp8")
        assert "finite" in str(ei.value)
    del tensors[name]
    save_safetensors(tmp_path / "model.safetensors", tensors)
    with open_checkpoint(tmp_path) as ck:
        with pytest.raises(CheckpointError, match="o_proj.weight_scale_inv"):
            build_model(hybrid_k2.ModelConfig.from_json(tmp_path), ck, "cpu", torch.float32, dense_format="fp8")
