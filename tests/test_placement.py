"""Placement planner: byte accounting against hand arithmetic for Kimi K2, budgets, errors, CLI."""
import json

import gguf
import pytest

from hybrid_k2 import placement
from hybrid_k2.config import KIMI_K2, preset
from hybrid_k2.placement import PlacementError, bytes_per_weight, parse_size, plan

GiB = 2**30
K2 = preset("kimi-k2")
CTX = 32768

# ---- Kimi K2 by hand (bf16 dense, q4_0 experts, bf16 KV) -------------------------------------------
EXPERT_WEIGHTS = 3 * 7168 * 2048                       # gate + up + down
EXPERT_Q4_0 = EXPERT_WEIGHTS * 18 // 32                 # 18 bytes per 32-weight block
SLOT = EXPERT_WEIGHTS * 2                               # a VRAM cache slot holds the expert dequantized to bf16
N_EXPERTS = 60 * 384                                    # 60 MoE layers x 384 routed experts
EMBED_BF16 = 163840 * 7168 * 2
ATTN_WEIGHTS = (1536 * 7168                             # q_a_proj
                + 64 * (128 + 64) * 1536                # q_b_proj
                + (512 + 64) * 7168                     # kv_a_proj_with_mqa
                + 64 * (128 + 128) * 512                # kv_b_proj
                + 7168 * 64 * 128)                      # o_proj
KV_B_WEIGHTS = 64 * (128 + 128) * 512
ATTN_NORMS = (7168 + 7168 + 1536 + 512) * 4             # input, post-attn, q_a, kv_a norms in fp32
DENSE_WEIGHTS = 3 * 7168 * 18432                        # layer 0
ROUTERS = 60 * (384 * 7168 + 384) * 4                   # fp32 gate + correction bias
SHARED_WEIGHTS = 60 * 3 * 7168 * 2048
FINAL_NORM = 7168 * 4
KV_PER_TOKEN = 61 * (512 + 64) * 2
WORKSPACE = (2**30                                      # CUDA context / cuBLAS / allocator
             + 128 * 64 * CTX * 4 * 2                   # fp32 scores + probs of a 128-token prefill chunk
             + CTX * 64 * (128 + 128) * 2               # one layer's latents expanded to K/V
             + 128 * 163840 * 4)                        # fp32 logits of the chunk


def float_bpw(bpw):
    """Under fp8 the embedding, lm_head and kv_b_proj stay in the bf16 compute dtype."""
    return 2 if bpw == 1 else bpw


def gpu_total(bpw):
    flt = float_bpw(bpw)
    weights = ((2 * 163840 * 7168 + 61 * KV_B_WEIGHTS) * flt
               + (61 * (ATTN_WEIGHTS - KV_B_WEIGHTS) + DENSE_WEIGHTS + SHARED_WEIGHTS) * bpw)
    return int(weights) + 61 * ATTN_NORMS + ROUTERS + FINAL_NORM + CTX * KV_PER_TOKEN + WORKSPACE


def test_hand_constants():
    assert EXPERT_Q4_0 == 24_772_608
    assert ATTN_WEIGHTS == 101_122_048
    assert KV_PER_TOKEN == 70_272
    assert WORKSPACE == 4_378_853_376


def test_bytes_per_weight():
    assert [bytes_per_weight(f) for f in ("f32", "bf16", "f16", "fp8")] == [4, 2, 2, 1]
    assert bytes_per_weight("q8_0") == 34 / 32
    assert bytes_per_weight("q4_0") == 18 / 32
    assert bytes_per_weight("q4_k") == 144 / 256
    assert bytes_per_weight("q6_k") == 210 / 256
    assert bytes_per_weight("q2_k") == 84 / 256 and bytes_per_weight("iq1_s") == 50 / 256
    for name, (block, nbytes) in placement.FORMATS.items():   # the GGML types' own sizes
        if name not in ("fp8",):
            assert gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[name.upper()]] == (block, nbytes), name
    with pytest.raises(ValueError, match="q9_k"):
        bytes_per_weight("q9_k")


def test_component_sizes_kimi():
    assert placement.expert_bytes(K2, "q4_0") == EXPERT_Q4_0
    assert placement.expert_bytes(K2, "q8_0") == EXPERT_WEIGHTS * 34 // 32
    assert placement.expert_bytes(K2, "q4_k") == EXPERT_WEIGHTS // 256 * 148   # held as Q4_K_R8: 144 + 4 scale bytes
    assert placement.expert_bytes(K2, "q6_k") == EXPERT_WEIGHTS // 256 * 210
    assert placement.routed_expert_bytes(K2, "q4_0") == N_EXPERTS * EXPERT_Q4_0 == 570_760_888_320
    assert placement.embed_bytes(K2, "bf16") == placement.lm_head_bytes(K2, "bf16") == EMBED_BF16
    assert placement.attention_layer_bytes(K2, "bf16") == ATTN_WEIGHTS * 2 + ATTN_NORMS
    assert placement.dense_ffn_bytes(K2, "fp8") == DENSE_WEIGHTS
    assert placement.router_bytes(K2) * 60 == ROUTERS
    assert placement.shared_expert_bytes(K2, "bf16") * 60 == SHARED_WEIGHTS * 2
    assert placement.kv_bytes_per_token(K2) == KV_PER_TOKEN
    assert placement.kv_cache_bytes(K2, CTX) == CTX * 70_272
    assert placement.workspace_bytes(K2, CTX) == WORKSPACE
    # without q_lora: one q_proj [heads*192, hidden] and no q_a norm
    nolora = K2.replace(q_lora_rank=None)
    assert placement.attention_layer_bytes(nolora, "bf16") == (
        (64 * 192 * 7168 + 576 * 7168 + 64 * 256 * 512 + 7168 * 8192) * 2 + (7168 * 2 + 512) * 4)


@pytest.mark.parametrize("vram,dense", [(48 * GiB, "bf16"), (80 * GiB, "bf16"), (24 * GiB, "fp8")])
def test_kimi_hybrid_plan(vram, dense):
    bpw = {"bf16": 2, "fp8": 1}[dense]
    p = plan(K2, vram_budget=vram, ram_budget="768GiB", ctx=CTX, dense_format=dense, ram_gbps=200.0,
             pcie_gbps=25.0, gpu_gbps=1000.0)
    gpu = gpu_total(bpw)
    slots = (vram - gpu) // SLOT
    assert p.mode == "hybrid"
    assert p.cache_slots == slots
    assert p.vram_used == gpu + slots * SLOT <= vram
    assert p.ram_used == N_EXPERTS * EXPERT_Q4_0 + 4 * GiB
    assert p.component("routed_experts").where == "ram"
    for name in ("embed_tokens", "attention", "routers", "shared_experts", "dense_ffn", "lm_head", "kv_cache"):
        assert p.component(name).where == "gpu"
    assert p.component("kv_cache").nbytes == CTX * KV_PER_TOKEN
    # roofline by hand: uniform-routing hit rate, CPU experts overlapping shared expert + cached experts
    h = slots / N_EXPERTS
    assert p.hit_rate == pytest.approx(h)
    active = 60 * 8 * EXPERT_Q4_0
    t_cpu = (1 - h) * active / 200e9
    t_par = (SHARED_WEIGHTS * bpw + h * 60 * 8 * SLOT) / 1000e9     # cached experts are read as bf16
    flt = float_bpw(bpw)
    serial_bytes = gpu - EMBED_BF16 * flt // 2 - WORKSPACE - SHARED_WEIGHTS * bpw + 7168 * flt
    t = serial_bytes / 1000e9 + max(t_cpu, t_par)
    assert p.t_token_s == pytest.approx(t, rel=1e-12)
    assert p.decode_tok_s == pytest.approx(1 / t, rel=1e-12)
    text = p.render()
    assert "hybrid" in text and f"{slots} slots" in text and "tok/s" in text
    assert "routed_experts  RAM" in text


def test_more_vram_more_slots_and_speed():
    kw = dict(ram_budget="768GiB", ctx=CTX, ram_gbps=200.0, pcie_gbps=25.0, gpu_gbps=1000.0)
    p48, p80 = plan(K2, vram_budget="48GiB", **kw), plan(K2, vram_budget="80GiB", **kw)
    assert p80.cache_slots - p48.cache_slots == 32 * GiB // SLOT
    assert p80.decode_tok_s > p48.decode_tok_s
    given = plan(K2, vram_budget="48GiB", hit_rate=0.5, **kw)
    assert given.hit_rate == 0.5 and given.decode_tok_s > p48.decode_tok_s


def test_vram_too_small_reports_shortfall_and_fixes():
    need = gpu_total(2)
    bf16 = dict(ram_budget="768GiB", ram_gbps=200.0, dense_format="bf16")
    with pytest.raises(PlacementError) as ei:
        plan(K2, vram_budget="24GiB", ctx=CTX, **bf16)
    msg = str(ei.value)
    assert f"{need / GiB:.1f} GiB of VRAM" in msg and "budget is 24.0 GiB" in msg
    assert f"{(need - 24 * GiB) / GiB:.1f} GiB over" in msg
    assert "--dense fp8" in msg
    n = int(msg.split("lower --ctx to ")[1].split(",")[0])
    plan(K2, vram_budget="24GiB", ctx=n, **bf16)       # fits exactly
    with pytest.raises(PlacementError):
        plan(K2, vram_budget="24GiB", ctx=n + 1, **bf16)
    with pytest.raises(PlacementError, match="add .* of VRAM"):
        plan(K2, vram_budget="4GiB", ram_budget="768GiB", ctx=CTX, ram_gbps=200.0)


def test_ram_too_small_reports_shortfall():
    need = N_EXPERTS * EXPERT_Q4_0 + 4 * GiB
    with pytest.raises(PlacementError) as ei:
        plan(K2, vram_budget="80GiB", ram_budget="256GiB", ctx=CTX, ram_gbps=200.0)
    msg = str(ei.value)
    assert "RAM" in msg and f"{need / GiB:.1f} GiB" in msg and f"{(need - 256 * GiB) / GiB:.1f} GiB over" in msg
    # q8_0 does not fit: suggest the largest (best) format that does
    q6k = N_EXPERTS * EXPERT_WEIGHTS // 256 * 210 + 4 * GiB            # 779.2 GiB
    with pytest.raises(PlacementError, match=r"use --experts q6_k \(775\.2 GiB\)"):
        plan(K2, vram_budget="80GiB", ram_budget=q6k, ctx=CTX, expert_format="q8_0", ram_gbps=200.0)
    with pytest.raises(PlacementError, match=r"use --experts q4_k \(546\.3 GiB\)"):
        plan(K2, vram_budget="80GiB", ram_budget=q6k - 1, ctx=CTX, expert_format="q8_0", ram_gbps=200.0)


def test_tp_mode():
    p = plan(K2, n_gpus=16, gpu_vram_each="80GiB", ram_budget="64GiB", ctx=CTX, ram_gbps=50.0, gpu_gbps=2000.0)
    assert p.mode == "tp" and p.vram_budget == 16 * 80 * GiB
    assert p.component("routed_experts").where == "gpu" and p.ram_used == 0
    active = 60 * 8 * EXPERT_Q4_0
    serial_bytes = gpu_total(2) - EMBED_BF16 - WORKSPACE + 7168 * 2
    assert p.t_token_s == pytest.approx((serial_bytes + active) / (16 * 2000e9), rel=1e-12)
    assert "tp" in p.render()
    # one GPU big enough for everything: auto picks tp as well
    assert plan(K2, vram_budget="1TiB", ram_budget="64GiB", ctx=CTX, ram_gbps=50.0).mode == "tp"
    # 16 small GPUs: tp cannot hold the experts; the message says so and offers hybrid
    with pytest.raises(PlacementError, match="--mode hybrid"):
        plan(K2, n_gpus=16, gpu_vram_each="24GiB", ram_budget="768GiB", ctx=CTX, ram_gbps=50.0)
    h = plan(K2, n_gpus=16, gpu_vram_each="24GiB", ram_budget="768GiB", ctx=CTX, ram_gbps=50.0, mode="hybrid")
    assert h.mode == "hybrid" and h.cache_slots == (16 * 24 * GiB - gpu_total(2)) // SLOT


def test_parse_size():
    assert parse_size("24GiB") == 24 * 2**30
    assert parse_size("80GB") == 80 * 10**9
    assert parse_size("768GiB") == 768 * 2**30
    assert parse_size("1.5TiB") == 3 * 2**39
    assert parse_size("512M") == 512 * 2**20
    assert parse_size("64 gib") == 64 * 2**30
    assert parse_size("100") == 100 and parse_size(4096) == 4096
    for bad in ("", "abc", "-1GiB", "12XB", "iB", "GiB", "1.2.3G"):
        with pytest.raises(ValueError, match="cannot parse"):
            parse_size(bad, "--vram")
    for bad in (True, None, -5, float("nan")):
        with pytest.raises(ValueError):
            parse_size(bad)


def test_bad_arguments():
    kw = dict(ram_budget="768GiB", ram_gbps=100.0)
    with pytest.raises(ValueError, match="dense_format"):
        plan(K2, vram_budget="80GiB", ctx=CTX, dense_format="bf17", **kw)
    with pytest.raises(ValueError, match="ctx"):
        plan(K2, vram_budget="80GiB", ctx=0, **kw)
    with pytest.raises(ValueError, match="vram_budget"):
        plan(K2, vram_budget="lots", ctx=CTX, **kw)
    with pytest.raises(ValueError, match="ram_gbps"):
        plan(K2, vram_budget="80GiB", ctx=CTX, ram_budget="768GiB", ram_gbps=-1.0)
    with pytest.raises(ValueError, match="exceeds"):
        plan(K2, vram_budget="100GiB", gpu_vram_each="24GiB", n_gpus=2, ctx=CTX, **kw)
    demo = placement.load_config("demo")      # moe_intermediate 128 cannot hold 256-weight q4_k blocks
    with pytest.raises(PlacementError, match="q4_k.*128"):
        plan(demo, vram_budget="4GiB", ram_budget="4GiB", ctx=512, expert_format="q4_k", ram_gbps=10.0)


def test_measure_ram_gbps_reads_memory():
    assert placement.measure_ram_gbps(nbytes=8 * 2**20, repeats=1, threads=2) > 0


def test_cli(tmp_path, capsys):
    assert placement.main(["kimi-k2", "--vram", "48GiB", "--ram", "768GiB", "--ctx", "32768",
                           "--ram-gbps", "200", "--pcie-gbps", "25", "--gpu-gbps", "1000"]) == 0
    out = capsys.readouterr().out    # the preset's checkpoint is FP8: auto keeps it
    assert "mode  hybrid" in out and f"{(48 * GiB - gpu_total(1)) // SLOT} slots" in out
    assert "dense fp8 (the checkpoint's own precision" in out
    (tmp_path / "config.json").write_text(json.dumps({**KIMI_K2, "hidden_act": "silu"}))   # no FP8 in it
    assert placement.main([str(tmp_path), "--vram", "24GiB", "--ram", "768GiB", "--ram-gbps", "200",
                           "--dense", "bf16"]) == 2
    err = capsys.readouterr().err
    assert "error: needs" in err and "--dense fp8" in err
    assert placement.main(["demo", "--vram", "2GiB", "--ram", "8GiB", "--ctx", "4096", "--ram-gbps", "10"]) == 0
    assert "tp" in capsys.readouterr().out      # the demo fits in 2 GiB: everything on the GPU
    assert placement.main(["no-such-model", "--vram", "2GiB", "--ram", "8GiB", "--ram-gbps", "10"]) == 2
    assert "no-such-model" in capsys.readouterr().err


# ---- --dense auto ---------------------------------------------------------------------------------------
def run_plan(*args):
    import subprocess
    import sys
    return subprocess.run([sys.executable, "-m", "hybrid_k2", "plan", *args], capture_output=True, text=True,
                          timeout=120)


def test_plan_kimi_k2_on_24_gib_keeps_its_fp8():
    """The issue's command: exited 2 ("needs 28.4 GiB ... use --dense fp8") although the checkpoint is FP8."""
    r = run_plan("kimi-k2", "--vram", "24GiB", "--ram", "768GiB", "--ctx", "32768")
    assert r.returncode == 0, r.stderr
    slots = (24 * GiB - gpu_total(1)) // SLOT
    assert slots == 45      # the embedding, lm_head and kv_b stay bf16 beside the FP8 matrices
    assert "mode  hybrid" in r.stdout and f"expert cache  {slots} slots" in r.stdout
    assert (f"dense fp8 (the checkpoint's own precision: its matrices are FP8, bf16 would only upcast them; "
            f"{gpu_total(1) / GiB:.1f} GiB of 24.0 GiB VRAM") in r.stdout


def test_plan_that_fits_nothing_says_by_how_much():
    r = run_plan("kimi-k2", "--vram", "8GiB", "--ram", "128GiB", "--ram-gbps", "100")
    assert r.returncode == 2 and r.stdout == ""
    vram_over = (gpu_total(1) - 8 * GiB) / GiB
    ram_over = (N_EXPERTS * EXPERT_Q4_0 + 4 * GiB - 128 * GiB) / GiB
    assert r.stderr.startswith(f"error: needs {gpu_total(1) / GiB:.1f} GiB of VRAM")
    assert f"{vram_over:.1f} GiB over: add {vram_over:.1f} GiB of VRAM" in r.stderr
    assert f"{ram_over:.1f} GiB over: " in r.stderr and f"add {ram_over:.1f} GiB of RAM" in r.stderr


def test_auto_for_a_float_checkpoint_picks_the_largest_that_fits(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({**KIMI_K2, "hidden_act": "silu"}))   # no FP8 in it
    kw = ["--ram", "768GiB", "--ram-gbps", "200"]
    assert placement.main([str(tmp_path), "--vram", "40GiB", *kw]) == 0
    out = capsys.readouterr().out
    assert (f"dense bf16 (the largest precision that fits: {gpu_total(2) / GiB:.1f} GiB of 40.0 GiB VRAM"
            in out) and f"{(40 * GiB - gpu_total(2)) // SLOT} slots" in out
    assert placement.main([str(tmp_path), "--vram", "24GiB", *kw]) == 0
    out = capsys.readouterr().out
    assert (f"dense fp8 (bf16 needs {gpu_total(2) / GiB:.1f} GiB, {(gpu_total(2) - 24 * GiB) / GiB:.1f} GiB over "
            f"the 24.0 GiB VRAM budget; fp8 fits") in out
    assert placement.main([str(tmp_path), "--vram", "8GiB", *kw]) == 2
    err = capsys.readouterr().err
    assert (f"no dense format fits (none fits the 8.0 GiB VRAM budget: bf16 needs {gpu_total(2) / GiB:.1f} GiB, "
            f"fp8 needs {gpu_total(1) / GiB:.1f} GiB)") in err
    # explicit formats are kept, and said to be
    assert placement.main([str(tmp_path), "--vram", "40GiB", "--dense", "fp8", *kw]) == 0
    assert "dense fp8 (as asked)" in capsys.readouterr().out


def test_stored_dense(tmp_path):
    assert placement.stored_dense("kimi-k2") == "fp8" and placement.stored_dense("demo") == "fp8"
    assert placement.stored_dense("x.gguf") == "gguf"
    (tmp_path / "config.json").write_text(json.dumps({**KIMI_K2, "quantization_config": {"quant_method": "fp8"}}))
    assert placement.stored_dense(str(tmp_path)) == "fp8"
    assert placement.stored_dense(str(tmp_path / "config.json")) == "fp8"
    (tmp_path / "config.json").write_text(json.dumps(KIMI_K2))
    assert placement.stored_dense(str(tmp_path)) is None
    assert placement.stored_dense(str(tmp_path / "missing")) is None
    kw = dict(vram_budget="24GiB", ram_budget="768GiB", ctx=CTX, ram_gbps=200.0)
    with pytest.raises(ValueError, match="a GGUF stores no FP8"):
        plan(K2, dense_format="fp8", stored="gguf", **kw)
    with pytest.raises(PlacementError, match="needs 28.4 GiB of VRAM .* bf16"):
        plan(K2, stored="gguf", **kw)         # a GGUF's blocks become bf16 on the accelerator: no fp8 to fall to
    assert plan(K2, stored="fp8", vram_budget="80GiB", ram_budget="768GiB", ctx=CTX, ram_gbps=200.0
                ).dense_format == "fp8"       # even where bf16 fits: it would only upcast
