"""What a plain `hybrid_k2.load(path)` runs: the fast path by default, the reference when asked, and a summary
that says so. On an accelerator the choice is the planner's (resolve_dense_format, sized without a GPU)."""
import logging

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as GQT
from gguf import quants
from torch import nn

import hybrid_k2
from hybrid_k2 import kernels
from hybrid_k2.checkpoint import CheckpointError, open_checkpoint
from hybrid_k2.checkpoint.quantize import save_safetensors
from hybrid_k2.config import KIMI_K2, ModelConfig
from hybrid_k2.demo import ensure_demo
from hybrid_k2.loader import DENSE_MATRICES, resolve_dense_format
from hybrid_k2.placement import PlacementError
from hybrid_k2.qlinear import QuantLinear

DEMO = ensure_demo()


@pytest.fixture(scope="module")
def demo_gguf(demo_ggufs):
    return demo_ggufs("q8_0", "q8_0", trained=True)   # DEMO's


def covered(eng):
    return {n: m for n, m in eng.model.named_modules() if DENSE_MATRICES.fullmatch(n)}


def test_gguf_runs_its_own_blocks_by_default(demo_gguf):
    eng = hybrid_k2.load(demo_gguf, device="cpu", progress=False)
    assert eng.dense_format == "native"
    mods = covered(eng)
    assert len(mods) == 7 * eng.cfg.num_hidden_layers + 1
    for n, m in mods.items():
        assert isinstance(m, QuantLinear) and m.qtype.name == "Q8_0", n
        assert np.shares_memory(m.blocks, eng.checkpoint.raw_blocks(n + ".weight")[0]), n   # the file's, in place
    assert all(layer.self_attn.kv_b_blocks is not None for layer in eng.model.model.layers)   # the C decode step's
    # the decode steps run as one C sequence (the CPU runtime), not torch matmuls
    eng.generate([5, 6, 7], max_new_tokens=4, temperature=0)
    assert eng.model.runtime is not None
    eng.close()


def test_none_is_auto_and_float_is_asked_for(demo_gguf):
    eng = hybrid_k2.load(demo_gguf, device="cpu", progress=False, dense_format=None)
    assert eng.dense_format == "native"
    eng.close()
    for kw in (dict(dense_format="float"), dict(experts="torch")):   # asked for, or the reference asked for
        eng = hybrid_k2.load(demo_gguf, device="cpu", progress=False, **kw)
        assert eng.dense_format == "float", kw
        assert all(type(m) is nn.Linear for m in covered(eng).values()), kw
        eng.close()
    eng = hybrid_k2.load(demo_gguf, device="cpu", progress=False, experts="torch", dense_format="native")
    assert eng.dense_format == "native"   # an explicit format wins over the reference's default
    eng.close()


def test_hf_checkpoint_is_quantized_to_q8_0_by_default():
    eng = hybrid_k2.load(DEMO, device="cpu", progress=False)
    assert eng.dense_format == "q8_0"
    with open_checkpoint(DEMO) as ck:
        for n, m in list(covered(eng).items())[::6]:
            assert isinstance(m, QuantLinear) and m.qtype.name == "Q8_0", n
            np.testing.assert_array_equal(m.blocks, quants.quantize(ck.get(n + ".weight").numpy(), GQT.Q8_0))
    eng.close()


def test_summary_says_what_runs_where(demo_gguf, caplog, capsys):
    with caplog.at_level(logging.INFO, logger="hybrid_k2.loader"):
        eng = hybrid_k2.load(demo_gguf, device="cpu", threads=2, progress=False)
    s = eng.summary
    assert s.startswith("loaded demo-q8_0.gguf: cpu device; dense native blocks Q8_0, C kernels")
    assert f"experts cpu Q8_0 ({eng.cfg.n_routed_experts} x {len(eng.cfg.moe_layers)} layers)" in s
    assert s.endswith(f"; 2 threads, {kernels.isa()} (torch 1 thread beside them)")
    assert torch.get_num_threads() == 1            # the kernels' pool owns the cores
    assert [r.getMessage() for r in caplog.records if r.name == "hybrid_k2.loader"] == [s]
    assert s not in capsys.readouterr().err        # progress off: logged only
    eng.close()
    eng = hybrid_k2.load("demo", device="cpu", experts="torch", progress=True)
    assert eng.summary in capsys.readouterr().err  # progress on (the CLI): printed too
    assert eng.summary.startswith("loaded demo: cpu device; dense float32 (torch) (the reference")
    assert "experts torch float32" in eng.summary
    eng.close()


def test_bad_dense_formats(demo_gguf):
    with pytest.raises(ValueError, match="dense_format='q5_k': expected one of 'auto', 'float', 'native'"):
        hybrid_k2.load(demo_gguf, device="cpu", dense_format="q5_k")
    with pytest.raises(ValueError, match="dense_format='native' .* needs device='cpu'"):
        hybrid_k2.load(demo_gguf, device="cuda", dense_format="native")   # checked before any CUDA call
    with pytest.raises(ValueError, match="dense_format='bf16' .* dtype=torch.float32"):
        hybrid_k2.load(DEMO, device="cpu", dense_format="bf16", dtype=torch.float32)
    eng = hybrid_k2.load(DEMO, device="cpu", experts="torch", dense_format="bf16", progress=False)
    assert eng.dense_format == "float" and eng.model.lm_head.weight.dtype == torch.bfloat16
    eng.close()


# ---- on an accelerator: resolve_dense_format asks the planner (no GPU needed to decide) -------------------
def test_accelerator_keeps_an_fp8_checkpoint_fp8():
    cfg = ModelConfig.from_json(DEMO)
    with open_checkpoint(DEMO) as ck:
        fmt, why = resolve_dense_format("auto", ck, cfg, "cuda", torch.bfloat16, vram_budget="4GiB", ctx=4096)
        assert fmt == "fp8" and "the checkpoint's own precision" in why
        assert resolve_dense_format("auto", ck, cfg, "cuda", torch.bfloat16, experts="torch")[0] == "float"
        assert resolve_dense_format(None, ck, cfg, "cpu", torch.float32)[0] == "q8_0"
        with pytest.raises(PlacementError, match="dense_format='auto': none fits the 1.0 MiB VRAM budget"):
            resolve_dense_format("auto", ck, cfg, "cuda", torch.bfloat16, vram_budget="1MiB", ctx=4096)


def test_accelerator_picks_the_largest_that_fits(demo_gguf, tmp_path):
    """A float checkpoint sized as Kimi K2 (its config; a real bf16 safetensors file holds the matrix whose
    format is read): bf16 in 40 GiB, fp8 (quantized at load) in 24 GiB."""
    save_safetensors(tmp_path / "model.safetensors",
                     {"model.layers.0.self_attn.o_proj.weight": torch.zeros(8, 8, dtype=torch.bfloat16)})
    cfg = ModelConfig.from_dict({**KIMI_K2, "hidden_act": "silu"})
    with open_checkpoint(tmp_path) as ck:
        fmt, why = resolve_dense_format("auto", ck, cfg, "cuda", torch.bfloat16, vram_budget="40GiB", ctx=32768)
        assert fmt == "float" and why.startswith("the largest precision that fits: 28.4 GiB of 40.0 GiB")
        fmt, why = resolve_dense_format("auto", ck, cfg, "cuda", torch.bfloat16, vram_budget="24GiB", ctx=32768)
        assert fmt == "fp8" and why.startswith("bf16 needs 28.4 GiB, 4.4 GiB over the 24.0 GiB VRAM budget; fp8 fits")
    with open_checkpoint(demo_gguf) as ck:   # a GGUF: the compute dtype (no FP8 in it), or the error naming it
        assert resolve_dense_format("auto", ck, ck.config(), "cuda", torch.bfloat16, vram_budget="4GiB")[0] == "float"
        with pytest.raises(CheckpointError, match="demo-q8_0.gguf: dense_format='fp8'"):
            resolve_dense_format("fp8", ck, ck.config(), "cuda", torch.bfloat16)
