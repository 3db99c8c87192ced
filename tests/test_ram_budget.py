"""Models larger than RAM: load(ram_budget=) below the routed experts' size keeps a GGUF's experts mapped in place
(the file's own block layout, no repack copy), says so, checks their block scales on first use instead of reading
the whole file at load, and generates what the roomy (repacked) load generates; the planner reports the shortfall
and the slowdown instead of refusing.

Real files: deepseek2 GGUFs written by our converter from a randomised HF model (tests/test_gguf.py's fixtures).
"""
import logging
import re
import shutil

import numpy as np
import pytest
import torch
from gguf import GGUFReader

import hybrid_k2
from hybrid_k2 import placement
from hybrid_k2.checkpoint import CheckpointError
from hybrid_k2.checkpoint.gguf import GGUFCheckpoint
from hybrid_k2.config import preset
from hybrid_k2.placement import GiB, RAM_RESERVE, PlacementError, plan
from test_gguf import converted, hf_dir  # noqa: F401  (shared fixtures)

PROMPT = list(range(5, 29))
ROOMY = "64GiB"
SHORT = "1MiB"


def load(path, ram_budget, caplog=None, **kw):
    if caplog is not None:
        caplog.clear()
    with caplog.at_level(logging.INFO, logger="hybrid_k2") if caplog is not None else _nothing():
        return hybrid_k2.load(path, device="cpu", experts="cpu", ram_budget=ram_budget, progress=False, **kw)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def greedy(engine, n=24):
    return engine.generate(PROMPT, max_new_tokens=n, temperature=0.0, stop=None).token_ids


def mapping_of(engine):
    return engine.checkpoint._reader.data   # the reader's numpy memmap of the whole file


@pytest.mark.parametrize("experts,repacked", [("q4_0", "Q4_0_R8"), ("q4_k", "Q4_K_R8"), ("q8_0", "Q8_0")])
def test_experts_over_the_budget_stay_mapped_in_place_and_generate_the_same(converted, experts, repacked, caplog):
    path = converted(experts, "q8_0")
    stored = experts.upper()
    roomy = load(path, ROOMY, caplog)
    assert roomy.experts.mapped is None and "mapped in place" not in caplog.text
    for w in roomy.experts.layers.values():
        assert (w.gate_type.name, w.up_type.name, w.down_type.name) == (repacked,) * 3
        assert np.shares_memory(w.blocks("gate"), mapping_of(roomy)) == (repacked == stored)

    short = load(path, SHORT, caplog)
    held = sum(w.nbytes for w in short.experts.layers.values())
    line = [r.getMessage() for r in caplog.records if r.name == "hybrid_k2.experts.cpu"]
    assert len(line) == 1 and any(r.levelno == logging.WARNING and r.getMessage() == line[0] for r in caplog.records)
    assert line[0].startswith(f"experts {placement.format_size(held)} > RAM budget 1.0 MiB (given; 0.0 MiB after the "
                              f"4.0 GiB reserve and ")
    assert line[0].endswith(f"mapped in place from {path}, expect disk-bound speed")
    assert "mapped in place from the file, paged from disk" in short.summary
    for w in short.experts.layers.values():
        assert (w.gate_type.name, w.up_type.name, w.down_type.name) == (stored,) * 3
        for kind in ("gate", "up", "down"):
            b = w.blocks(kind)
            assert np.shares_memory(b, mapping_of(short)) and not b.flags.writeable   # views, not copies

    a, b = greedy(roomy), greedy(short)
    assert len(a) == 24 and a == b
    la, lb = roomy.logits(PROMPT), short.logits(PROMPT)
    if repacked == stored:   # the same blocks through the same kernels
        assert torch.equal(la, lb)
    else:                    # the repacked layout sums in another order
        assert ((la - lb).norm(dim=-1) / la.norm(dim=-1)).max() < 1e-4
    roomy.close(), short.close()


def test_repacked_only_when_it_fits(converted, caplog):
    """Q4_K_R8 is larger than Q4_K (unpacked scales): a budget that holds the file's layout but not the repacked
    one runs the file's blocks in place, in RAM (scales checked at load, no 'disk-bound' line)."""
    from hybrid_k2.experts.cpu import _gguf_layer_nbytes
    from hybrid_k2.loader import resident_bytes
    path = converted("q4_k", "q8_0")
    roomy = load(path, ROOMY)
    cfg = roomy.model.cfg
    with GGUFCheckpoint(path) as g:
        sizes = [_gguf_layer_nbytes(g, cfg, layer) for layer in cfg.moe_layers]
    held, stored = (sum(s[i] for s in sizes) for i in (0, 1))
    assert held == sum(w.nbytes for w in roomy.experts.layers.values()) > stored
    budget = RAM_RESERVE + resident_bytes(roomy.model, "cpu") + stored
    eng = load(path, budget, caplog)
    assert eng.experts.mapped is None and "disk-bound" not in caplog.text and "kept in the file's layout" in caplog.text
    for w in eng.experts.layers.values():
        assert w.gate_type.name == "Q4_K" and np.shares_memory(w.blocks("gate"), mapping_of(eng))
    assert greedy(eng) == greedy(roomy)
    eng.close()
    eng = load(path, budget + held - stored)   # room for the repacked copies: repacked
    assert {w.gate_type.name for w in eng.experts.layers.values()} == {"Q4_K_R8"}
    eng.close(), roomy.close()


def poison_scale(src, dst, tensor: str, expert: int):
    """Copy a GGUF and make one block scale of one expert NaN (a float16 0x7E00 in the expert's first block)."""
    shutil.copyfile(src, dst)
    t = next(t for t in GGUFReader(src).tensors if t.name == tensor)
    per_expert = t.data.nbytes // t.data.shape[0]
    with open(dst, "r+b") as f:
        f.seek(int(t.data_offset) + expert * per_expert)
        f.write(np.float16(np.nan).tobytes())


def test_scales_of_experts_paged_from_disk_are_checked_on_first_use(converted, tmp_path):
    path = str(tmp_path / "nan.gguf")
    poison_scale(converted("q4_0", "q8_0"), path, "blk.1.ffn_gate_exps.weight", 2)
    with pytest.raises(CheckpointError, match=r"blk\.1\.ffn_gate_exps\.weight.*not finite"):
        load(path, ROOMY)   # fits: checked at load, as before
    eng = load(path, SHORT)   # mapped: the load reads no expert page for the check
    be, H = eng.experts, eng.model.cfg.hidden_size
    x = torch.randn(3, H)
    w = torch.full((3, 2), 0.5)
    ok = be.forward(1, x, torch.tensor([[0, 1], [3, 1], [0, 3]], dtype=torch.int32), w)
    assert torch.isfinite(ok).all()
    assert be.forward(2, x, torch.tensor([[2, 1], [2, 0], [3, 2]], dtype=torch.int32), w).isfinite().all()
    with pytest.raises(CheckpointError, match=re.escape(f"{path}: tensor 'blk.1.ffn_gate_exps.weight' (q4_0), "
                                                        "expert 2: 1 block scale(s) that are not finite")):
        be.forward(1, x, torch.tensor([[0, 1], [2, 3], [0, 1]], dtype=torch.int32), w)
    # every expert of layer 2 used once: nothing is left to check there; layer 1 keeps its unchecked experts
    assert 2 not in be._unchecked and be._unchecked[1][2].tolist() == [False, False, True, False]
    with pytest.raises(CheckpointError, match="expert 2"):   # still refused on the next use
        be.forward(1, x[:1], torch.tensor([[2, 0]], dtype=torch.int32), w[:1])
    eng.close()


def test_hybrid_backend_pages_its_cpu_experts_and_checks_them_on_first_use(converted, tmp_path):
    """experts='hybrid' takes the same budget: its CPU experts stay mapped in place, and an expert's scales are
    checked before its first use, whether it would run on the CPU or be copied to a slot."""
    path = str(tmp_path / "nan.gguf")
    poison_scale(converted("q4_0", "q8_0"), path, "blk.1.ffn_gate_exps.weight", 2)
    eng = hybrid_k2.load(path, device="cpu", experts="hybrid", cache_slots=2, ram_budget=SHORT, progress=False)
    try:
        be, H = eng.experts, eng.model.cfg.hidden_size
        assert be.cpu.unchecked and be.cpu.layers[1].gate_type.name == "Q4_0"   # the file's layout, not repacked
        x, w = torch.randn(2, H), torch.full((2, 2), 0.5)
        assert be.forward(1, x, torch.tensor([[0, 1], [3, 1]], dtype=torch.int32), w).isfinite().all()
        with pytest.raises(CheckpointError, match=r"blk\.1\.ffn_gate_exps\.weight.*expert 2"):
            be.forward(1, x, torch.tensor([[0, 2], [3, 1]], dtype=torch.int32), w)
    finally:
        eng.close()


def test_bad_ram_budget_is_named(converted):
    path = converted("q4_0", "q8_0")
    for bad in ("lots", "-1GiB", True, -5, float("nan"), [1]):
        with pytest.raises(ValueError, match="ram_budget"):
            hybrid_k2.load(path, device="cpu", ram_budget=bad)
    with pytest.raises(ValueError, match="ram_budget applies to the experts kept in RAM.*not experts='torch'"):
        hybrid_k2.load(path, device="cpu", experts="torch", ram_budget="64GiB")
    assert placement.resolve_ram_budget("2GiB") == (2 * GiB, "given")
    found, src = placement.resolve_ram_budget(None)
    assert src == "MemAvailable" and 0 < found <= placement.total_ram_bytes()


def test_experts_quantized_at_load_must_fit(hf_dir):
    """An HF checkpoint's experts are copied into RAM (quantized at load): over the budget they are refused, with
    the way out."""
    with pytest.raises(PlacementError, match=r"quantized at load need .* > RAM budget 1\.0 MiB \(given; .*"
                                             r"hybrid-k2 convert.*ram_budget="):
        hybrid_k2.load(hf_dir, device="cpu", ram_budget=SHORT)
    eng = hybrid_k2.load(hf_dir, device="cpu", ram_budget=ROOMY)
    assert eng.experts.mapped is None
    eng.close()


CTX = 32768


def test_plan_reports_the_ram_shortfall_and_slowdown_for_a_gguf():
    k2 = preset("kimi-k2")
    kw = dict(vram_budget="80GiB", ctx=CTX, ram_gbps=200.0, pcie_gbps=25.0, gpu_gbps=1000.0, stored="gguf")
    fits = plan(k2, ram_budget="768GiB", disk_gbps=3.0, **kw)
    assert not fits.experts_mapped and fits.component("routed_experts").where == "ram"
    p = plan(k2, ram_budget="256GiB", disk_gbps=3.0, **kw)
    experts = 60 * 384 * (3 * 7168 * 2048 // 32 * 18)
    assert p.experts_mapped and p.component("routed_experts").where == "disk"
    assert p.component("routed_experts").nbytes == experts
    assert p.ram_shortfall == experts + RAM_RESERVE - 256 * GiB
    cached = 256 * GiB - RAM_RESERVE
    f = cached / ((1 - p.hit_rate) * experts)
    assert p.disk_read_share == pytest.approx(1 - f)
    t_cpu = 60 * (1 - p.hit_rate) * 8 * p.expert_bytes * (f / 200e9 + (1 - f) / 3e9)
    assert p.t_cpu_s == pytest.approx(t_cpu) and p.t_token_s == pytest.approx(p.t_gpu_serial_s + t_cpu)
    assert p.t_token_in_ram_s == pytest.approx(fits.t_token_s)
    assert p.ram_used == 256 * GiB   # the page cache and the reserve fill the budget
    text = p.render()
    slow = p.t_token_s / fits.t_token_s
    assert slow > 10
    assert (f"RAM short  {p.ram_shortfall / GiB:.1f} GiB over the budget: routed experts {experts / GiB:.1f} GiB "
            f"(q4_0, the file's layout) mapped in place from the GGUF") in text
    assert f"at 3.0 GB/s (given) -> decode {slow:.1f}x slower than with the experts in RAM" in text
    faster = plan(k2, ram_budget="256GiB", disk_gbps=6.0, **kw)
    assert faster.t_token_s < p.t_token_s
    # q4_k: repacked (148 bytes a super-block) when that fits, the file's 144 in place when only that does
    q4k = 60 * 384 * (3 * 7168 * 2048 // 256)
    between = plan(k2, ram_budget=q4k * 146 + RAM_RESERVE, expert_format="q4_k", **kw)
    assert not between.experts_mapped and between.component("routed_experts").nbytes == q4k * 144
    assert "repacked would not fit" in between.component("routed_experts").detail
    assert plan(k2, ram_budget=q4k * 148 + RAM_RESERVE, expert_format="q4_k", **kw).component(
        "routed_experts").nbytes == q4k * 148
    # an HF checkpoint's experts are quantized into RAM: still refused, pointing at a GGUF
    with pytest.raises(PlacementError, match=r"279\.6 GiB over.*use a GGUF of these experts.*--gguf"):
        plan(k2, ram_budget="256GiB", **{**kw, "stored": None})


def test_plan_command_on_a_gguf_shows_the_shortfall(converted, capsys):
    path = converted("q4_0", "q8_0")
    assert placement.main([path, "--vram", "2GiB", "--ram", "1GiB", "--ctx", "256", "--mode", "hybrid",
                           "--ram-gbps", "20", "--disk-gbps", "2"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"routed_experts\s+disk\s", out)
    assert re.search(r"RAM short  3\.0 GiB over the budget: .* mapped in place from the GGUF .* from disk at "
                     r"2\.0 GB/s \(given\) -> decode [\d.]+x slower", out)
    assert placement.main(["kimi-k2", "--vram", "80GiB", "--ram", "256GiB", "--ram-gbps", "200", "--gguf"]) == 0
    assert "RAM short  279.6 GiB over the budget" in capsys.readouterr().out
    assert placement.main(["kimi-k2", "--vram", "80GiB", "--ram", "256GiB", "--ram-gbps", "200"]) == 2
    assert "plan it with --gguf" in capsys.readouterr().err
