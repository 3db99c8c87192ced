"""Hybrid-backend bench: the MoE part of decoding with routed experts on the CPU kernels, with and without the VRAM
expert cache, prefetch and overlap, and a long prompt's prefill with and without streaming its experts to the
accelerator, on whatever accelerator is present. One table at the end.

    python bench/bench_hybrid.py                       # cuda if present: K2 shapes, RAM/VRAM budgets below
    python bench/bench_hybrid.py --ram-budget 48GiB --vram-budget 40GiB --tokens 48
    python bench/bench_hybrid.py --layers 4 --cache-frac 0.1 --prefill-tokens 512    # bench/gpu_check.sh's run
    python bench/bench_hybrid.py --small               # forced on a CPU-only machine: plumbing, not K2

Model: `--layers` MoE layers (default: as many K2-shaped layers as fit --ram-budget) of random Q4_0 experts
(H 7168, I 2048, 384 experts, top-8 by default; held in the kernels' Q4_0_R8 layout, as the engine holds Q4_0
experts) in RAM, a bf16 shared expert and a router per layer on the accelerator, and a VRAM slot cache sized from
--vram-budget (or --cache-frac of all experts). Routing is synthetic but shaped like a real residual stream:
each token's hidden state is 0.9 x the previous one's plus noise (temporal locality), each layer's router input
drifts a little from the previous layer's (so the next layers' routers applied to it predict them), and the
routers' correction bias is skewed (some experts hotter). `--trace X.npz` replays a recorded routing trace
instead (ids only; prefetch then predicts nothing). Times cover the MoE layers only (router, shared expert,
routed experts): the decode tok/s are for those --layers layers, and 'K2 x60' scales them to K2's 60 MoE layers
(attention and the rest excluded); a prefill row times one --prefill-tokens prompt through every layer.
A configuration that fails is reported in the table (and its traceback on stderr); the others still run.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
import traceback
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from hybrid_k2 import kernels  # noqa: E402
from hybrid_k2.experts.cpu import CPUExperts  # noqa: E402
from hybrid_k2.experts.hybrid import HybridConfig, HybridExperts  # noqa: E402
from hybrid_k2.experts.prefetch import RoutingPredictor, _router_from_weights  # noqa: E402
from hybrid_k2.experts.slots import slot_bytes  # noqa: E402
from hybrid_k2.model import MLP  # noqa: E402
from hybrid_k2.placement import format_size, parse_size  # noqa: E402

K2 = dict(hidden=7168, inter=2048, experts=384, top_k=8)
SMALL = dict(hidden=512, inter=256, experts=64, top_k=8)


def tiled_blocks(n_bytes: int, chunk: np.ndarray, pool: ThreadPoolExecutor | None = None) -> np.ndarray:
    """n_bytes of blocks: a chunk of whole random blocks tiled (fast to build; the result is far larger than
    any cache, so reads still come from RAM). With a pool the copies (and first-touch page faults) run on its
    threads: numpy releases the GIL while copying."""
    out = np.empty(n_bytes, dtype=np.uint8)

    def put(o):
        n = min(chunk.size, n_bytes - o)
        out[o:o + n] = chunk[:n]
    offsets = range(0, n_bytes, chunk.size)
    if pool is None:
        for o in offsets:
            put(o)
    else:
        list(pool.map(put, offsets))
    return out


def make_chunk(rng: np.random.Generator, qt, n_blocks: int = 1 << 22) -> np.ndarray:
    """Blocks of random quants with every fp16 scale 0.01: Q4_0/Q8_0 (scale first in each block) or Q4_0_R8
    (per 8 rows and block: 8 scales, then the rows' nibbles), whole groups, so the tiling stays aligned."""
    group = qt.row_group * qt.block_bytes
    c = rng.integers(0, 256, size=(max(1, n_blocks // qt.row_group), group), dtype=np.uint8)
    c[:, :2 * qt.row_group] = np.tile(np.frombuffer(np.float16(0.01).tobytes(), dtype=np.uint8), qt.row_group)
    return c.reshape(-1)


def held_format(fmt: str) -> str:
    """The layout the engine holds experts of this format in (CPUExperts repacks Q4_0 to Q4_0_R8)."""
    return "Q4_0_R8" if fmt == "Q4_0" else fmt


def build_experts(n_layers: int, E: int, H: int, I: int, fmt: str, rng, threads: int = 1) -> CPUExperts:
    qt = kernels.qtype(held_format(fmt))
    chunk = make_chunk(rng, qt, 1 << 16 if H * I < 1 << 20 else 1 << 22)
    layers = {}
    with ThreadPoolExecutor(max(1, threads)) as pool:
        for li in range(n_layers):
            gate = tiled_blocks(E * I * qt.row_bytes(H), chunk, pool).reshape(E, I, -1)
            up = tiled_blocks(E * I * qt.row_bytes(H), chunk, pool).reshape(E, I, -1)
            down = tiled_blocks(E * H * qt.row_bytes(I), chunk, pool).reshape(E, H, -1)
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

    def prompt(self, T: int):
        """[(layer, x [T, H])] router inputs for a T-token prompt (the same drift as decoding)."""
        h = torch.empty(T, self.H)
        for t in range(T):
            self.h = 0.9 * self.h + 0.44 * torch.randn(1, self.H, generator=self.g)
            h[t] = self.h[0]
        xs, x = [], h
        for l in self.layers:
            x = x + 0.15 * torch.randn(T, self.H, generator=self.g)
            xs.append((l, x.to(self.device, self.dtype)))
        return xs


def moe(backend, routing: SyntheticRouting, layer: int, x, ids, w) -> torch.Tensor:
    """One MoE layer as model.MoE runs it: routed experts submitted, the shared expert meanwhile, then joined."""
    fut = backend.submit(layer, x, ids, w)
    return routing.shared[layer](x) + fut.result()


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
                moe(backend, routing, layer, x, ids, w)
            if cuda:
                torch.cuda.synchronize()
    return (time.perf_counter() - t0) / tokens


def run_prefill(backend, routing: SyntheticRouting, xs) -> float:
    """Seconds for one prompt (`xs`: SyntheticRouting.prompt) through every layer, after an untimed pass over
    the first layer (stage buffers, kernels' first call)."""
    cuda = routing.device.type == "cuda"
    with torch.inference_mode():
        routed = [(layer, x, *routing.routers[layer](x)) for layer, x in xs]
        layer, x, ids, w = routed[0]
        moe(backend, routing, layer, x, ids, w)
        if cuda:
            torch.cuda.synchronize()
        if hasattr(backend, "reset_stats"):
            backend.reset_stats()
        t0 = time.perf_counter()
        for layer, x, ids, w in routed:
            moe(backend, routing, layer, x, ids, w)
        if cuda:
            torch.cuda.synchronize()
    return time.perf_counter() - t0


def format_table(rows, n_layers: int, small: bool) -> str:
    """The results as one fixed-width table (decode rows, then prefill rows)."""
    head = (f"{'configuration':40s} {'tok/s':>9s} {'ms':>9s} {'K2 x60':>8s} {'hit%':>6s} {'late':>6s} "
            f"{'pf hits':>7s} {'MiB/tok':>8s} {'streamed':>8s}  note")
    lines = [head, "-" * len(head)]
    for r in rows:
        if r.get("error"):
            lines.append(f"{r['label']:40s} {'FAILED':>9s}  {r['error']}")
            continue
        s = r.get("stats") or {}
        per = r["seconds"] / r["tokens"]              # seconds per token (decode) or per prompt token (prefill)
        k2 = "" if small else f"{(r['tokens'] / (r['seconds'] * 60 / n_layers)):8.2f}"
        ms = 1e3 * r["seconds"] / (1 if r["kind"] == "prefill" else r["tokens"])
        hit = f"{100 * s['hit_rate']:6.1f}" if s.get("slots") else f"{'-':>6s}"
        late = f"{s['late']:6d}" if s.get("slots") else f"{'-':>6s}"
        pfh = f"{s['prefetch_hits']:7d}" if s.get("slots") else f"{'-':>7s}"
        mib = f"{(s['bytes_copied'] + s['stream_bytes']) / r['tokens'] / 2**20:8.1f}" if s else f"{'-':>8s}"
        streamed = f"{s['stream_layers']:3d} lyr" if s else f"{'-':>8s}"
        note = [r["note"]] if r.get("note") else []
        if s.get("stream_declined"):
            note.append(f"{s['stream_declined']} lyr declined")
        if r["kind"] == "prefill" and s.get("cpu_gflops"):
            note.append(f"kernels {s['cpu_gflops']:.0f} GFLOP/s")
        if s.get("slots") and r["kind"] == "decode":
            note.append(f"{s['prefetch_fills']} pf + {s['demand_fills']} demand fills")
        lines.append(f"{r['label']:40s} {1 / per:9.2f} {ms:9.2f} {k2:>8s} {hit} {late} {pfh} {mib} {streamed:>8s}  "
                     f"{', '.join(note)}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--small", action="store_true", help="small shapes (forced on a CPU device)")
    p.add_argument("--layers", type=int, default=None, help="MoE layers (default: fill --ram-budget)")
    p.add_argument("--ram-budget", default="48GiB", help="RAM for routed experts (K2 q4_0: 9.5 GB per layer)")
    p.add_argument("--vram-budget", default=None, help="VRAM for the expert cache (default: 50%% of free)")
    p.add_argument("--cache-frac", "--slots-frac", type=float, default=None,
                   help="cached share of all experts (default: CUDA from --vram-budget, CPU 0.25)")
    p.add_argument("--format", default="Q4_0", choices=["Q4_0", "Q8_0"])
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--warmup", type=int, default=16)
    p.add_argument("--prefill-tokens", type=int, default=512, help="prompt length of the prefill rows (0: none)")
    p.add_argument("--threads", type=int, default=None, help="CPU kernel threads (default: all cores)")
    p.add_argument("--trace", default=None, help="replay ids from a routing trace .npz")
    p.add_argument("--json", default=None, help="also write the table's rows (with all stats) to this file")
    args = p.parse_args(argv)
    for name, low in (("layers", 1), ("tokens", 1), ("warmup", 0), ("prefill_tokens", 0), ("threads", 1)):
        v = getattr(args, name)
        if v is not None and v < low:
            p.error(f"--{name.replace('_', '-')} must be >= {low}, got {v}")
    if args.cache_frac is not None and not 0 <= args.cache_frac <= 1:
        p.error(f"--cache-frac must be in [0, 1], got {args.cache_frac}")

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device")
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
    if args.cache_frac is not None:
        n_slots = int(total * args.cache_frac)
    elif device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = parse_size(args.vram_budget) if args.vram_budget else free // 2
        n_slots = int(min(total, budget // one_slot))
    else:
        n_slots = int(total * 0.25)

    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
          f"torch {torch.__version__}, kernels {kernels.isa()} x{kernels.get_threads()} threads", flush=True)
    if small:
        print(f"SMALL shapes (H {H}, I {I}, {E} experts, top-{K}): a plumbing run, not K2 performance")
    print(f"{n_layers} MoE layers x {E} experts {args.format} (held as {held_format(args.format)}) = "
          f"{format_size(n_layers * E * expert_ram)} in RAM; cache {n_slots} slots x {format_size(one_slot)} "
          f"{str(dtype).replace('torch.', '')} = {100 * n_slots / total:.1f}% of experts", flush=True)
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    cpu = build_experts(n_layers, E, H, I, args.format, rng, threads=os.cpu_count() or 1)
    routing = SyntheticRouting(n_layers, E, H, I, K, device, dtype)
    trace = None
    if args.trace:
        from hybrid_k2.sim import load_trace
        trace = load_trace(args.trace).ids % E
    T = args.prefill_tokens
    prompt = routing.prompt(T) if T else None
    print(f"built in {time.perf_counter() - t0:.1f} s; decode: {args.tokens} tokens timed after {args.warmup} "
          f"warm-up; prefill: one {T}-token prompt", flush=True)

    rows = []

    def bench(label, make, kind="decode", note=""):
        backend = None
        t_start = time.perf_counter()
        try:
            backend = make()
            if kind == "decode":
                seconds, tokens = run_decode(backend, routing, args.tokens, args.warmup, trace) * args.tokens, args.tokens
            else:
                seconds, tokens = run_prefill(backend, routing, prompt), T
            s = backend.stats() if hasattr(backend, "stats") else None
            rows.append(dict(label=label, kind=kind, seconds=seconds, tokens=tokens, stats=s, note=note))
            print(format_table(rows[-1:], n_layers, small).splitlines()[-1] +
                  f"  [{time.perf_counter() - t_start:.1f} s]", flush=True)
        except Exception as e:          # one configuration's failure must not hide the others' results
            traceback.print_exc()
            rows.append(dict(label=label, kind=kind, error=f"{type(e).__name__}: {e}"[:300]))
            print(f"{label}: FAILED ({type(e).__name__}: {e})", flush=True)
        finally:
            if backend is not None and backend is not cpu:
                backend.close()
            del backend
            gc.collect()                # anything else in a cycle (torch, tracebacks) goes before the next slots
            if device.type == "cuda":
                torch.cuda.empty_cache()

    def hybrid(slots, **kw):
        return lambda: HybridExperts(cpu, device, dtype, slots, HybridConfig(**kw),
                                     predictor=None if trace is not None else routing.predictor())

    bench("cpu backend (overlap)", lambda: cpu)
    for label, slots, kw in [("hybrid, cache off", 0, dict()),
                             ("hybrid, cache on, overlap", n_slots, dict(prefetch=False)),
                             ("hybrid, cache on, no overlap", n_slots, dict(prefetch=False, overlap=False)),
                             ("hybrid, cache+prefetch, overlap", n_slots, dict(prefetch=True)),
                             ("hybrid, cache+prefetch, no overlap", n_slots, dict(prefetch=True, overlap=False))]:
        bench(label, hybrid(slots, **kw))
    if T:
        for label, slots, mode in [("prefill, cpu kernels (stream off)", 0, False),
                                   ("prefill, streamed", 0, True),
                                   ("prefill, auto (cost model)", 0, None),
                                   ("prefill, streamed + cache+prefetch", n_slots, True)]:
            bench(f"{label} T={T}", hybrid(slots, prefill_stream=mode), kind="prefill")
    cpu.close()

    print(f"\n=== hybrid bench: {n_layers} MoE layers, {'SMALL' if small else 'K2'} shapes, {args.format}, {device}, "
          f"cache {n_slots} slots ({100 * n_slots / total:.1f}%) ===")
    print("decode rows: tok/s and ms per token over the layers; prefill rows: prompt tokens/s and ms per prompt; "
          "K2 x60: scaled to 60 MoE layers; MiB/tok: bytes moved to the device per token")
    print(format_table(rows, n_layers, small), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=str(device), layers=n_layers, small=small, format=args.format, slots=n_slots,
                           experts=total, rows=rows), f, indent=1, default=str)
    return 1 if any(r.get("error") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
