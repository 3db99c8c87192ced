"""Hybrid-backend decode bench: the MoE part of decoding with routed experts on the CPU kernels, with and without
the VRAM expert cache, prefetch and overlap, on whatever accelerator is present.

    python bench/bench_hybrid.py                       # cuda if present: K2 shapes, RAM/VRAM budgets below
    python bench/bench_hybrid.py --ram-budget 48GiB --vram-budget 40GiB --tokens 48
    python bench/bench_hybrid.py --small               # forced on a CPU-only machine: plumbing, not K2

Model: `--layers` MoE layers (default: as many K2-shaped layers as fit --ram-budget) of random Q4_0 experts
(H 7168, I 2048, 384 experts, top-8 by default) in RAM, a bf16 shared expert and a router per layer on the
accelerator, and a VRAM slot cache sized from --vram-budget. Routing is synthetic but shaped like a real
residual stream: each token's hidden state is 0.9 x the previous one's plus noise (temporal locality), each
layer's router input drifts a little from the previous layer's (so the next layers' routers applied to it
predict them), and the routers' correction bias is skewed (some experts hotter). `--trace X.npz` replays a
recorded routing trace instead (ids only; prefetch then predicts nothing). Times cover the MoE layers only
(router, shared expert, routed experts): the printed tok/s are for those --layers layers, and 'K2 x60' scales
them to K2's 60 MoE layers (attention and the rest excluded).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from hybrid_k2 import kernels  # noqa: E402
from hybrid_k2.experts.cpu import CPUExperts  # noqa: E402
from hybrid_k2.experts.hybrid import HybridExperts, slot_bytes  # noqa: E402
from hybrid_k2.experts.prefetch import RoutingPredictor, _router_from_weights  # noqa: E402
from hybrid_k2.model import MLP  # noqa: E402
from hybrid_k2.placement import format_size, parse_size  # noqa: E402

K2 = dict(hidden=7168, inter=2048, experts=384, top_k=8)
SMALL = dict(hidden=512, inter=256, experts=64, top_k=8)


def tiled_blocks(n_bytes: int, chunk: np.ndarray) -> np.ndarray:
    """n_bytes of blocks: a chunk of whole random blocks tiled (fast to build; the result is far larger than
    any cache, so reads still come from RAM)."""
    out = np.empty(n_bytes, dtype=np.uint8)
    for o in range(0, n_bytes, chunk.size):
        n = min(chunk.size, n_bytes - o)
        out[o:o + n] = chunk[:n]
    return out


def make_chunk(rng: np.random.Generator, block_bytes: int, n_blocks: int = 1 << 22) -> np.ndarray:
    """Q4_0/Q8_0 blocks of random quants with every fp16 scale 0.01."""
    c = rng.integers(0, 256, size=(n_blocks, block_bytes), dtype=np.uint8)
    c[:, 0:2] = np.frombuffer(np.float16(0.01).tobytes(), dtype=np.uint8)
    return c.reshape(-1)


def build_experts(n_layers: int, E: int, H: int, I: int, fmt: str, rng) -> CPUExperts:
    qt = kernels.qtype(fmt)
    chunk = make_chunk(rng, qt.block_bytes, 1 << 16 if H * I < 1 << 20 else 1 << 22)
    layers = {}
    for li in range(n_layers):
        gate = tiled_blocks(E * I * qt.row_bytes(H), chunk).reshape(E, I, -1)
        up = tiled_blocks(E * I * qt.row_bytes(H), chunk).reshape(E, I, -1)
        down = tiled_blocks(E * H * qt.row_bytes(I), chunk).reshape(E, H, -1)
        layers[li + 1] = kernels.ExpertWeights(gate, up, down, qt.name)
    return CPUExperts(layers, overlap=True)


class SyntheticRouting:
    """Routers + shared experts on the device and a drifting hidden state (see the module docstring)."""

    def __init__(self, n_layers, E, H, I, K, device, dtype, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.layers = list(range(1, n_layers + 1))
        self.H, self.device, self.dtype = H, device, dtype
        skew = (torch.rand(n_layers, E, generator=g) ** 3) * 0.5            # some experts hotter
        self.routers = {l: _router_from_weights((torch.randn(E, H, generator=g) / H ** 0.5).to(device),
                                                skew[i].to(device), top_k=K, scaling=2.827)
                        for i, l in enumerate(self.layers)}
        self.shared = {}
        for l in self.layers:
            m = MLP(H, I).to(device=device, dtype=dtype)
            for p in m.parameters():
                torch.nn.init.normal_(p, std=H ** -0.5)
            self.shared[l] = m.requires_grad_(False)
        self.g = torch.Generator(device="cpu").manual_seed(seed + 1)
        self.h = torch.randn(1, H, generator=self.g)

    def predictor(self) -> RoutingPredictor:
        return RoutingPredictor(self.routers)

    def next_token(self):
        """[(layer, x)] router inputs for one decode token."""
        self.h = 0.9 * self.h + 0.44 * torch.randn(1, self.H, generator=self.g)
        xs, x = [], self.h
        for l in self.layers:
            x = x + 0.15 * torch.randn(1, self.H, generator=self.g)
            xs.append((l, x.to(self.device, self.dtype)))
        return xs


def run_decode(backend, routing: SyntheticRouting, tokens: int, warmup: int, trace=None) -> float:
    """Seconds per token over `tokens` decode steps after `warmup` untimed ones."""
    cuda = routing.device.type == "cuda"
    t0 = 0.0
    with torch.inference_mode():
        for t in range(warmup + tokens):
            if t == warmup:
                if cuda:
                    torch.cuda.synchronize()
                if hasattr(backend, "reset_stats"):
                    backend.reset_stats()
                t0 = time.perf_counter()
            for j, (layer, x) in enumerate(routing.next_token()):
                ids, w = routing.routers[layer](x)
                if trace is not None:
                    ids = torch.as_tensor(trace[t % len(trace), j % trace.shape[1]], device=x.device).long()[None]
                backend.run(layer, x, ids, w, routing.shared[layer])
            if cuda:
                torch.cuda.synchronize()
    return (time.perf_counter() - t0) / tokens


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--small", action="store_true", help="small shapes (forced on a CPU device)")
    p.add_argument("--layers", type=int, default=None, help="MoE layers (default: fill --ram-budget)")
    p.add_argument("--ram-budget", default="48GiB", help="RAM for routed experts (K2 q4_0: 9.5 GB per layer)")
    p.add_argument("--vram-budget", default=None, help="VRAM for the expert cache (default: 50%% of free)")
    p.add_argument("--slots-frac", type=float, default=0.25, help="CPU device: cached share of all experts")
    p.add_argument("--format", default="Q4_0", choices=["Q4_0", "Q8_0"])
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--warmup", type=int, default=16)
    p.add_argument("--threads", type=int, default=None, help="CPU kernel threads (default: all cores)")
    p.add_argument("--trace", default=None, help="replay ids from a routing trace .npz")
    args = p.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    small = args.small or device.type != "cuda"
    shape = SMALL if small else K2
    H, I, E, K = shape["hidden"], shape["inter"], shape["experts"], shape["top_k"]
    kernels.set_threads(args.threads or os.cpu_count() or 1)
    if device.type == "cpu":
        torch.set_num_threads(1)     # the "accelerator" shares the cores with the kernels' pool
    qt = kernels.qtype(args.format)
    expert_ram = 2 * I * qt.row_bytes(H) + H * qt.row_bytes(I)
    n_layers = args.layers or max(1, min(60, parse_size(args.ram_budget) // (E * expert_ram)))
    if small:
        n_layers = args.layers or 4
    one_slot = slot_bytes(H, I, dtype)
    total = n_layers * E
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = parse_size(args.vram_budget) if args.vram_budget else free // 2
        n_slots = int(min(total, budget // one_slot))
    else:
        n_slots = int(total * args.slots_frac)

    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
          f"kernels {kernels.isa()} x{kernels.get_threads()} threads")
    if small:
        print(f"SMALL shapes (H {H}, I {I}, {E} experts, top-{K}): a plumbing run, not K2 performance")
    print(f"{n_layers} MoE layers x {E} experts {args.format} = {format_size(n_layers * E * expert_ram)} in RAM; "
          f"cache {n_slots} slots x {format_size(one_slot)} {str(dtype).replace('torch.', '')} "
          f"= {100 * n_slots / total:.1f}% of experts")
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    cpu = build_experts(n_layers, E, H, I, args.format, rng)
    routing = SyntheticRouting(n_layers, E, H, I, K, device, dtype)
    trace = None
    if args.trace:
        from hybrid_k2.sim import load_trace
        trace = load_trace(args.trace).ids % E
    print(f"built in {time.perf_counter() - t0:.1f} s; timing {args.tokens} tokens after {args.warmup} warm-up")

    rows = []

    def bench(label, backend):
        dt = run_decode(backend, routing, args.tokens, args.warmup, trace)
        s = backend.stats() if hasattr(backend, "stats") else None
        rows.append((label, dt, s))
        extra = ""
        if s is not None and s["slots"]:
            n = max(args.tokens, 1)
            extra = (f"  hit {100 * s['hit_rate']:5.1f}%  late {s['late']:4d}  prefetch hits {s['prefetch_hits']:5d}  "
                     f"copied {s['bytes_copied'] / n / 2**20:7.1f} MiB/tok")
        k2 = "" if small else f"  K2 x60: {n_layers / dt / 60:6.2f} tok/s"
        print(f"{label:34s} {1 / dt:8.2f} tok/s ({n_layers} layers){k2}{extra}", flush=True)

    bench("cpu backend (overlap)", cpu)
    for label, kw in [("hybrid, cache off", dict(n_slots=0)),
                      ("hybrid, cache on, overlap", dict(prefetch=False)),
                      ("hybrid, cache on, no overlap", dict(prefetch=False, overlap=False)),
                      ("hybrid, cache+prefetch, overlap", dict(prefetch=True)),
                      ("hybrid, cache+prefetch, no overlap", dict(prefetch=True, overlap=False))]:
        kw = dict(kw)
        slots = kw.pop("n_slots", n_slots)
        b = HybridExperts(cpu, device, dtype, slots, predictor=None if trace is not None else routing.predictor(),
                          **kw)
        try:
            bench(label, b)
        finally:
            b.close()
            del b
            if device.type == "cuda":
                torch.cuda.empty_cache()
    cpu.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
