"""Prefill streaming in the `hybrid` backend (HybridConfig.prefill_stream) on the test device (conftest: the
GPU when there is one, else the CPU): a large forward's non-resident experts are streamed through the staging ring
and run with torch matmuls. Checked against the torch backend on the same dequantized weights, the cpu engine,
hand arithmetic for the cost model, and exact counters."""
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT
from gguf import quants

import hybrid_k2
from hybrid_k2 import kernels
from hybrid_k2.demo import ensure_demo
from hybrid_k2.experts.cpu import CPUExperts
from hybrid_k2.experts.hybrid import STREAM_MIN_TOKENS, HybridConfig, HybridExperts
from hybrid_k2.experts.slots import dequantize_torch
from hybrid_k2.experts.stream import ACCEL_GFLOPS_GUESS, CPU_GFLOPS_GUESS, PrefillStreamModel
from test_hybrid import (assert_slots_hold_their_experts, dequantized, dev_eng, eng,  # noqa: F401  (shared fixtures)
                         gate_copies, on, ref_float, with_backend)

PROMPT = "Beautiful is better than ugly. Explicit is better than implicit. Simple is better than complex. " * 4


@pytest.fixture(scope="module")
def prompt(eng):
    ids = eng.tokenizer.encode(PROMPT)
    assert len(ids) >= 2 * STREAM_MIN_TOKENS
    return ids


def routed_logits(eng, backend, ids):
    """Engine.logits through `backend`, and the distinct expert ids each MoE layer's router chose."""
    chosen = {}
    hooks = [blk.mlp.gate.register_forward_hook(
        lambda mod, args, out, l=blk.mlp.layer: chosen.setdefault(l, set()).update(out[0].flatten().tolist()))
        for blk in eng.model.model.layers if hasattr(blk.mlp, "gate")]
    try:
        return with_backend(eng, backend, lambda: eng.logits(ids)), chosen
    finally:
        for h in hooks:
            h.remove()


# ---- the device dequantizer for the kernels' repacked layout --------------------------------------
def test_dequantize_torch_q4_0_r8_matches_gguf(device):
    """Q4_0 experts live in RAM repacked to Q4_0_R8; the device dequantizes that layout directly."""
    x = np.random.default_rng(0).standard_normal((64, 256)).astype(np.float32) * 3
    blocks = kernels.quantize(x, "Q4_0")
    got = dequantize_torch(torch.from_numpy(kernels.repack(blocks, "Q4_0")).to(device), "Q4_0_R8", 256)
    assert got.device == device
    assert np.array_equal(got.cpu().numpy(), quants.dequantize(blocks, QT.Q4_0))     # the gguf package, independently
    with pytest.raises(ValueError, match="multiple of the Q4_0_R8 row group"):
        dequantize_torch(torch.from_numpy(blocks[:12]), "Q4_0_R8", 256)


# ---- the cost model ---------------------------------------------------------------------------------
def test_stream_model_hand_arithmetic():
    """One expert: 25 MB over 25 GB/s = 1 ms; 1e8 flops per pair: 0.001 ms on 1e5 GFLOP/s, 0.1 ms on 1e3;
    the CPU reads 25 MB at 50 GB/s = 0.5 ms."""
    m = PrefillStreamModel(copy_bytes=25_000_000, ram_bytes=25_000_000, flops_per_pair=100_000_000, pcie_gbps=25,
                           cpu_gflops=1000, accel_gflops=100_000, ram_gbps=50)
    # 100 experts, 2000 pairs: copy 100 ms, device 2 ms -> 100 + 2/100; CPU max(200, 50) ms
    assert m.stream_ms(100, 2000) == pytest.approx(100.02) and m.cpu_ms(100, 2000) == pytest.approx(200)
    assert m.wins(100, 2000)
    # 100 experts, 500 pairs: the CPU's 50 ms (compute and memory alike) beat the link's 100 ms
    assert m.cpu_ms(100, 500) == pytest.approx(50) and not m.wins(100, 500)
    # the break-even: 1000 pairs -> CPU 100 ms < stream 100.01 ms; 1001 pairs -> CPU 100.1 ms > stream 100.01 ms
    assert not m.wins(100, 1000) and m.wins(100, 1001)
    # memory floor: 10 experts at 1 pair each on the CPU = max(0.001 ms, 5 ms) vs 10 ms of copies
    assert m.cpu_ms(10, 10) == pytest.approx(5) and not m.wins(10, 10)
    # an accelerator no faster than the CPU never wins: 100 experts, 5000 pairs -> 500 + 100/100 vs 500
    slow = PrefillStreamModel(25_000_000, 25_000_000, 100_000_000, 25, 1000, 1000, 50)
    assert slow.stream_ms(100, 5000) == pytest.approx(501) and not slow.wins(100, 5000)
    assert not m.wins(0, 0) and m.stream_ms(0, 0) == 0.0
    with pytest.raises(ValueError, match="pcie_gbps must be positive"):
        PrefillStreamModel(1, 1, 1, pcie_gbps=0)


def test_backend_stream_model_figures(eng, device):
    """The backend's model: one Q8_0 expert's blocks over the link (dequantized there), 6*H*I flops per pair,
    the CPU rate given, else measured on its own prefill-sized kernel calls, else the documented guess."""
    cpu = eng.experts
    w = cpu.layers[1]
    b = HybridExperts(cpu, device, torch.float32, 0, HybridConfig(overlap=False, pcie_gbps=10, ram_gbps=20,
                      accel_gflops=500))
    m = b.stream_model(1)
    assert (m.copy_bytes, m.ram_bytes, m.flops_per_pair) == (w.expert_nbytes(), w.expert_nbytes(), 6 * 256 * 128)
    assert (m.pcie_gbps, m.ram_gbps, m.accel_gflops, m.cpu_gflops) == (10, 20, 500, CPU_GFLOPS_GUESS)
    g = torch.Generator().manual_seed(0)
    x, ids, wt = on(device, torch.randn(40, 256, generator=g), torch.randint(0, 16, (40, 4), generator=g),
                    torch.rand(40, 4))
    b.config.prefill_stream = False
    b.forward(1, x, ids, wt)                           # 40 tokens >= MEASURE_MIN_TOKENS: a measured rate
    measured = b.measured_cpu_gflops()
    assert measured > 0 and b.stream_model(1).cpu_gflops == measured == b.stats()["cpu_gflops"]
    b.close()
    fixed = HybridExperts(cpu, device, torch.float32, 0, HybridConfig(cpu_gflops=123.0))
    assert fixed.stream_model().cpu_gflops == 123.0
    fixed.close()


def test_auto_decision_follows_the_cost_model(eng, ref_float, device):
    """prefill_stream=None with the rates given: a large layer call streams exactly when
    stream_model(layer).wins(distinct non-resident experts, their pairs); declined calls run in the kernels
    (bit-exact), streamed ones in float. Rates in units of one pair's CPU time p (CPU 1 GFLOP/s, memory and
    device ~free): a copy costs 4p, so 2 experts x 4p < 128 pairs x p streams; then, with a 3x slower link,
    16 experts x 12p = 192p > 128p does not."""
    cpu = eng.experts
    layer = 2
    w = cpu.layers[layer]
    F = 6 * 256 * 128
    # CPU 1 GFLOP/s: a pair costs F/1e9 s. Link: one expert's copy = 4 pairs' CPU time.
    pcie = w.expert_nbytes() / (4 * F)                  # GB/s
    b = HybridExperts(cpu, device, torch.float32, 0, HybridConfig(overlap=False, prefill_stream=None,
                      prefill_stream_min_tokens=8, cpu_gflops=1.0, accel_gflops=1e6, pcie_gbps=pcie, ram_gbps=1e6))
    g = torch.Generator().manual_seed(1)
    T, K = 32, 4
    x, wt = torch.randn(T, 256, generator=g), torch.rand(T, K, generator=g)
    few = torch.tensor([[3, 9, 3, 9]] * T)             # 2 experts, 128 pairs: copies 8 pair-times << 128: stream
    many = torch.stack([torch.randperm(16, generator=g)[:K] for _ in range(T)])
    many[:16, 0] = torch.arange(16)                     # all 16 experts over 128 pairs
    assert b.stream_model(layer).wins(2, 128) and b.stream_model(layer).wins(16, 128)   # 8p, 64p < 128p
    y = b.forward(layer, *on(device, x, few, wt))
    assert torch.allclose(y, ref_float.forward(layer, *on(device, x, few, wt)), rtol=1e-5, atol=1e-5)
    s = b.stats()
    assert (s["stream_layers"], s["stream_declined"], s["stream_experts"], s["stream_pairs"]) == (1, 0, 2, T * K)
    b.config.pcie_gbps = pcie / 3                       # 16 experts x 12 pair-times = 192 > 128 pair-times
    assert not b.stream_model(layer).wins(16, 128)
    y = b.forward(layer, *on(device, x, many, wt))
    assert torch.equal(y.cpu(), kernels.moe_forward(w, x, many.int(), wt))
    s = b.stats()
    assert (s["stream_layers"], s["stream_declined"], s["cpu_pairs"]) == (1, 1, T * K)
    small = b.forward(layer, *on(device, x[:4], few[:4], wt[:4]))   # under prefill_stream_min_tokens: the kernels
    assert torch.equal(small.cpu(), kernels.moe_forward(w, x[:4], few[:4].int(), wt[:4]))   # (and not counted)
    assert b.stats()["stream_declined"] == 1
    b.close()
    # auto without an accelerator rate: off on a CPU device; on CUDA the documented guess decides
    auto = HybridExperts(cpu, device, torch.float32, 0, HybridConfig(overlap=False, prefill_stream_min_tokens=8))
    wins = auto.stream_model(layer).wins(2, T * K)
    auto.forward(layer, *on(device, x, few, wt))
    s = auto.stats()
    if device.type == "cpu":
        assert (s["stream_layers"], s["stream_declined"]) == (0, 0)
    else:
        assert auto.stream_model(layer).accel_gflops == ACCEL_GFLOPS_GUESS
        assert (s["stream_layers"], s["stream_declined"]) == ((1, 0) if wins else (0, 1))
    auto.close()


# ---- layers and the whole model -------------------------------------------------------------------
@pytest.mark.parametrize("fmt,buffers", [("q8_0", 2), ("q4_0", 3), ("q4_k_q6_k", 2)])
def test_streamed_layer_with_resident_slots(eng, fmt, buffers, device):
    """Resident pairs run from their slots, every other pair's expert is streamed once through the ring; the
    sum equals the torch backend on the same dequantized weights. Q4_0 (held as Q4_0_R8) and Q8_0 move blocks,
    K-quants move the compute dtype (dequantized on the host). Small calls still go to the kernels."""
    if fmt == "q8_0":
        cpu, owned = eng.experts, False
    elif fmt == "q4_0":
        cpu, owned = CPUExperts.from_checkpoint(eng.checkpoint, eng.cfg, "q4_0", overlap=False), True
        assert cpu.layers[1].gate_type.name == "Q4_0_R8"
    else:   # the demo's inter 128 is below the K-quant block of 256: one layer with inter 256
        rng = np.random.default_rng(5)
        E, H, I = 8, 256, 256
        gate, up = (kernels.quantize(rng.standard_normal((E, I, H)).astype(np.float32), "Q4_K") for _ in range(2))
        down = kernels.quantize(rng.standard_normal((E, H, I)).astype(np.float32), "Q6_K")
        layers = {1: kernels.ExpertWeights(gate, up, down, "Q4_K", down_type="Q6_K")}
        cpu, owned = CPUExperts(layers, overlap=False), True
    ref = dequantized(cpu, device)
    layer = min(cpu.layers)
    w = cpu.layers[layer]
    E, H = w.n_experts, w.hidden
    b = HybridExperts(cpu, device, torch.float32, 3, HybridConfig(prefetch=False, prefill_stream=True,
                      prefill_stream_min_tokens=16, prefill_stream_buffers=buffers, policy="lru", cost_model=None))
    b.preload([(layer, 0), (layer, 1), (layer, 2)])
    b.close()                                          # landed (async fills on CUDA)
    g = torch.Generator().manual_seed(2)
    T, K = 24, 4
    x = torch.randn(T, H, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    ids[0] = torch.tensor([0, 1, 2, 3])
    wt = torch.rand(T, K, generator=g)
    resident = b.cache.lookup(0, ids.numpy()).reshape(T, K)
    y = b.forward(layer, *on(device, x, ids, wt))
    assert torch.allclose(y, ref.forward(layer, *on(device, x, ids, wt)), rtol=1e-5, atol=1e-4)
    s = b.stats()
    n_res, away = int(resident.sum()), ids.numpy()[~resident]
    copy_bytes = b.stream_model(layer).copy_bytes
    assert n_res > 0 and len(b.streamer.buffers) == buffers
    assert (s["gpu_pairs"], s["stream_pairs"], s["cpu_pairs"]) == (n_res, T * K - n_res, 0)
    assert s["gpu_pairs"] + s["stream_pairs"] + s["cpu_pairs"] == s["hits"] + s["misses"] == T * K
    assert (s["stream_layers"], s["stream_experts"]) == (1, len(np.unique(away)))
    assert s["stream_bytes"] == len(np.unique(away)) * copy_bytes
    if fmt == "q4_k_q6_k":
        assert copy_bytes == 3 * H * w.inter * 4       # float32 over the link
    else:
        assert copy_bytes == w.expert_nbytes()          # the blocks themselves
    # decode-sized: the usual path (slot pairs + kernel pairs), nothing streamed
    ids1 = torch.tensor([[5, 6, 7, 0]]) % E
    res1 = torch.from_numpy(b.cache.lookup(0, ids1.numpy()).reshape(1, K))
    cpu_before = b.stats()["cpu_pairs"]
    d = b.forward(layer, *on(device, x[:1], ids1, wt[:1])).cpu()
    want = (ref.forward(layer, *on(device, x[:1], ids1, wt[:1] * res1)).cpu()
            + kernels.moe_forward(w, x[:1], ids1.int(), (wt[:1] * ~res1).contiguous()))
    assert torch.allclose(d, want, rtol=1e-5, atol=1e-4)
    assert b.stats()["stream_layers"] == 1 and b.stats()["cpu_pairs"] - cpu_before == K - int(res1.sum())
    b.close()
    if owned:
        cpu.close()


def test_prefill_logits_streamed_match_torch_and_cpu_engines(dev_eng, ref_float, prompt, device):
    """A 128-token prompt with streaming forced on and no slots: every MoE layer streams each expert its tokens
    use, once; the logits equal the torch backend's on the same dequantized weights (float rounding) and sit
    within test_hybrid's tolerance of the cpu engine (which adds 8-bit activation rounding)."""
    eng = dev_eng
    b = HybridExperts(eng.experts, device, torch.float32, 0, HybridConfig(prefill_stream=True))
    got, chosen = routed_logits(eng, b, prompt)
    flt, chosen_f = routed_logits(eng, ref_float, prompt)
    ref = with_backend(eng, eng.experts, lambda: eng.logits(prompt))
    s = b.stats()
    b.close()
    T, K = len(prompt), eng.cfg.num_experts_per_tok
    assert torch.allclose(got, flt, rtol=1e-4, atol=1e-4)
    assert chosen == chosen_f
    assert (s["stream_layers"], s["stream_pairs"], s["cpu_pairs"], s["gpu_pairs"]) == (3, 3 * T * K, 0, 0)
    assert s["stream_experts"] == sum(len(v) for v in chosen.values())
    assert s["stream_bytes"] == s["stream_experts"] * eng.experts.layers[1].expert_nbytes()
    rel = ((got - ref).norm(dim=1) / ref.norm(dim=1)).numpy()
    agree = float((got.argmax(1) == ref.argmax(1)).float().mean())
    assert np.median(rel) < 0.03 and np.mean(rel < 0.05) >= 0.75 and agree >= 0.8


def test_decode_after_streamed_prefill_is_unchanged(dev_eng, prompt, device):
    """Prefill (128 tokens) then 8 teacher-forced decode steps, 8 slots with the score policy and prefetch.
    Streaming forced on streams the prefill's three layers and nothing in decode (exact counters), its logits
    within tolerance of streaming off; streaming off is the previous behaviour: bit-identical to the default
    on a CPU device (auto, off there) with the same counters, none streamed. On CUDA auto asks the cost model
    once per prefill layer (and copies land when they land, so runs are compared within tolerance)."""
    eng = dev_eng
    tokens = prompt + eng.tokenizer.encode(" Flat is better than nested.")[:8]
    n, K = len(prompt), eng.cfg.num_experts_per_tok
    steps = len(tokens) - n
    runs = {}
    for mode in (True, False, None):
        b = HybridExperts(eng.experts, device, torch.float32, 8, HybridConfig(policy="score", prefetch=True,
                          overlap=True, **({} if mode is None else dict(prefill_stream=mode))))
        b.attach(eng.model)
        eng.model.set_experts(b)
        try:
            cache = eng.model.new_cache(len(tokens))
            with torch.inference_mode():
                out = [eng.model(torch.tensor(tokens[:n], device=device), 0, cache, last_only=True)[-1]]
                after_prefill = b.stats()
                for i in range(n, len(tokens)):
                    out.append(eng.model(torch.tensor(tokens[i:i + 1], device=device), i, cache)[-1])
        finally:
            eng.model.set_experts(eng.experts)
        runs[mode] = torch.stack(out).cpu().clone(), after_prefill, b.stats()
        b.close()
    (on, p_on, s_on), (off, _, s_off), (auto, _, s_auto) = runs[True], runs[False], runs[None]
    if device.type == "cpu":
        assert torch.equal(off, auto)
        drop = {"cpu_expert_ms", "cpu_gflops"}     # timings
        assert {k: v for k, v in s_off.items() if k not in drop} == {k: v for k, v in s_auto.items() if k not in drop}
    else:
        assert s_auto["stream_layers"] + s_auto["stream_declined"] == 3
        rel = ((auto - off).norm(dim=1) / off.norm(dim=1)).numpy()
        assert np.median(rel) < 0.03
    assert (s_off["stream_layers"], s_off["stream_pairs"], s_off["stream_bytes"]) == (0, 0, 0)
    assert p_on["stream_layers"] == 3 and p_on["cpu_pairs"] == 0
    assert p_on["gpu_pairs"] + p_on["stream_pairs"] == p_on["hits"] + p_on["misses"] == 3 * K * n
    for k in ("stream_layers", "stream_experts", "stream_pairs", "stream_bytes"):
        assert s_on[k] == p_on[k], k                   # decode streamed nothing
    assert (s_on["gpu_pairs"] + s_on["cpu_pairs"]) - (p_on["gpu_pairs"] + p_on["cpu_pairs"]) == 3 * K * steps
    rel = ((on - off).norm(dim=1) / off.norm(dim=1)).numpy()
    assert np.median(rel) < 0.03 and float((on.argmax(1) == off.argmax(1)).float().mean()) >= 0.75


def test_streamed_expert_admitted_to_the_cache_crosses_the_link_once(eng, ref_float, device):
    """A streamed layer whose experts the cache admits: each is filled from its staging buffer on the device, not
    copied from the host again (bytes over the link = the streamed bytes); a fill still queued for a streamed
    expert goes stale instead of copying it a second time. The slots then hold exactly those experts and a
    decode step runs them from the slots."""
    layer, K, T = 1, 4, 24
    experts = [2, 5, 9, 12]
    g = torch.Generator().manual_seed(7)
    x, wt = torch.randn(T, 256, generator=g), torch.rand(T, K, generator=g)
    ids = torch.stack([torch.tensor(experts)[torch.randperm(K, generator=g)] for _ in range(T)])
    x, wt, ids = on(device, x, wt, ids)
    copy_bytes = eng.experts.layers[layer].expert_nbytes()
    b = HybridExperts(eng.experts, device, torch.float32, 4, HybridConfig(policy="lru", prefetch=False, overlap=False,
                      prefill_stream=True, prefill_stream_min_tokens=16, cost_model=None))
    y = b.forward(layer, x, ids, wt)
    assert torch.allclose(y, ref_float.forward(layer, x, ids, wt), rtol=1e-5, atol=1e-4)
    s = b.stats()
    assert (s["stream_experts"], s["stream_bytes"]) == (4, 4 * copy_bytes)
    assert (s["demand_fills"], s["stage_fills"], s["fills_done"], s["bytes_copied"]) == (4, 4, 4, 0)
    assert sorted(b.cache.residents()) == [(0, e) for e in experts]
    assert assert_slots_hold_their_experts(b, ref_float) == 4
    one = torch.tensor([experts], device=device)
    d = b.forward(layer, x[:1], one, wt[:1])
    assert torch.allclose(d, ref_float.forward(layer, x[:1], one, wt[:1]), rtol=1e-5, atol=1e-5)
    assert (b.stats()["gpu_pairs"] - s["gpu_pairs"], b.stats()["cpu_pairs"]) == (K, 0)
    b.close()
    # the queued case: expert 2's fill waits on the copier when its layer streams
    q = HybridExperts(eng.experts, device, torch.float32, 4, HybridConfig(policy="lru", prefetch=False, overlap=False,
                      prefill_stream=True, prefill_stream_min_tokens=16, async_copies=True, cost_model=None))
    gate = gate_copies(q)
    q.preload([(layer, 2)])
    y = q.forward(layer, x, ids, wt)
    gate.set()
    q.close()
    assert torch.allclose(y, ref_float.forward(layer, x, ids, wt), rtol=1e-5, atol=1e-4)
    s = q.stats()
    assert (s["stream_experts"], s["stage_fills"], s["stale_fills"], s["bytes_copied"]) == (4, 4, 1, 0)
    assert assert_slots_hold_their_experts(q, ref_float) == 4
    q.close()


def test_stage_buffers_serve_calls_in_and_out_of_inference_mode(eng, ref_float, device):
    """The staging ring, allocated at the first streamed layer (here inside torch.inference_mode(), as Engine
    calls run), is written again by a streamed call outside it."""
    b = HybridExperts(eng.experts, device, torch.float32, 0, HybridConfig(prefill_stream=True,
                      prefill_stream_min_tokens=16))
    g = torch.Generator().manual_seed(8)
    x, ids, wt = on(device, torch.randn(24, 256, generator=g), torch.randint(0, 16, (24, 4), generator=g),
                    torch.rand(24, 4, generator=g))
    with torch.inference_mode():
        first = b.forward(1, x, ids, wt)
    with torch.no_grad():
        again = b.forward(1, x, ids, wt)               # raised "Inplace update to inference tensor outside ..."
    assert torch.equal(first, again) and b.stats()["stream_layers"] == 2
    assert torch.allclose(again, ref_float.forward(1, x, ids, wt), rtol=1e-5, atol=1e-4)
    b.close()


def test_staging_host_copy_in_chunks(eng, device):
    """The host side of a stage: a large expert's bytes are copied into the staging buffer on several threads."""
    b = HybridExperts(eng.experts, device, torch.float32, 0, HybridConfig(prefill_stream_copy_threads=3))
    src = np.random.default_rng(0).integers(0, 256, 9 << 20, dtype=np.uint8)
    dst = np.zeros_like(src)
    b.streamer.host_copy(dst, src)
    assert np.array_equal(dst, src) and b.streamer.copy_pool is not None
    b.close()
    assert b.streamer.copy_pool is None


def test_errors(eng):
    with pytest.raises(ValueError, match="prefill_stream_buffers must be an integer >= 2"):
        HybridExperts(eng.experts, "cpu", torch.float32, 0, HybridConfig(prefill_stream_buffers=1))
    with pytest.raises(ValueError, match="prefill_stream must be True, False or None"):
        HybridExperts(eng.experts, "cpu", torch.float32, 0, HybridConfig(prefill_stream="yes"))
    with pytest.raises(ValueError, match="cpu_gflops must be positive"):
        HybridExperts(eng.experts, "cpu", torch.float32, 0, HybridConfig(cpu_gflops=0))
    with pytest.raises(ValueError, match="prefill_stream_min_tokens"):
        HybridExperts(eng.experts, "cpu", torch.float32, 0, HybridConfig(prefill_stream_min_tokens=0))
