"""Kernel bench: MoE-layer decode bandwidth against the machine's own read bandwidth, and
prefill GFLOP/s, on Kimi K2's expert shapes (H=7168, I=2048, top-8), for every weight type the kernels run,
beside KTransformers' CPU MoE kernel on the same blocks when kt-kernel is installed.

    python bench/bench_kernels.py [--threads 2] [--types all | Q4_0_R8,Q4_K_R8,Q2_K,IQ4_XS,...] [--isa avx2]

--types takes any of hybrid_k2.kernels.WEIGHT_QTYPES (default: all of them). Q4_0_R8 / Q4_K_R8 are Q4_0 / Q4_K
repacked to the kernels' 8-row layouts, which the cpu backend runs; the other types are read in place (the
GGUF layouts). A type this build's kernels do not run is reported in one line and skipped.

Decode (T=1) is memory-bound: each call reads 8 experts x (gate + up + down). The experts are
drawn at random each call from a pool much larger than the last-level cache, so they come
from RAM as in real decoding. The probe streams a 1 GiB buffer with the same thread pool.
Weights are random block bytes with valid fp16 scales (timing does not depend on the values).

KTransformers (pip install --no-deps kt-kernel; see bench/ktransformers_moe.py): its llamafile MoE backend runs
the same GGUF blocks (for an _R8 type: the blocks before repacking), same expert pool, same threads, bf16
activations. Its calls are interleaved with ours call by call (decode) and round by round (prefill), so load from
other processes hits both alike; the ratio printed is our speed over its speed (> 1: ours is faster). Without
kt-kernel (or with a broken one) one line says why and the bench goes on.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from hybrid_k2 import kernels as K
from hybrid_k2.synthetic import random_blocks   # valid random blocks of any weight type

try:
    from bench import ktransformers_moe as ktm
except ImportError:   # run as a script: bench/ is sys.path[0]
    import ktransformers_moe as ktm

H, I, TOP_K = 7168, 2048, 8
GiB = 1 << 30


def probe_bandwidth(nbytes: int, reps: int) -> float:
    buf = np.ones(nbytes, dtype=np.uint8)  # touch every page before timing
    K.read_probe(buf)
    best = 0.0
    for _ in range(reps):
        t0 = time.perf_counter()
        K.read_probe(buf)
        best = max(best, nbytes / (time.perf_counter() - t0))
    return best




def gguf_type(name: str) -> str:
    """The GGUF block type whose bytes a weight type's matrices are made from (an _R8 layout's source)."""
    return next((k for k, v in K.REPACKED.items() if v == name), name)


def make_layer(rng: np.random.Generator, name: str, n_experts: int) -> K.ExpertWeights:
    """A pool of n_experts random experts in the GGUF type of `name` (not yet repacked)."""
    src = gguf_type(name)
    gate = random_blocks(rng, src, n_experts * I, H).reshape(n_experts, I, -1)
    up = random_blocks(rng, src, n_experts * I, H).reshape(n_experts, I, -1)
    down = random_blocks(rng, src, n_experts * H, I).reshape(n_experts, H, -1)
    return K.ExpertWeights(gate, up, down, src)


class Ours:
    """Our moe_forward on one layer, in the calling convention of the interleaved loops below."""
    label = "ours"

    def __init__(self, layer: K.ExpertWeights, h_residual: bool | None):
        self.layer, self.h_residual = layer, h_residual

    def inputs(self, x, ids, w):
        return x, ids.astype(np.int32), w, np.empty_like(x)

    def __call__(self, x, ids, w, out):
        K.moe_forward(self.layer, x, ids, w, out=out, h_residual=self.h_residual)


class KT:
    """kt-kernel's MoE layer on the same blocks (bf16 activations in and out)."""

    def __init__(self, layer: ktm.MoELayer):
        self.layer, self.label = layer, f"KTransformers {layer.backend}"

    def inputs(self, x, ids, w):
        return ktm.to_bf16(x), ids.astype(np.int64), w, np.empty(x.shape, np.uint16)

    def __call__(self, x, ids, w, out):
        self.layer.forward(x, ids, w, out)


def draw_ids(rng: np.random.Generator, n_experts: int, T: int) -> np.ndarray:
    return np.stack([rng.choice(n_experts, TOP_K, replace=False) for _ in range(T)]).astype(np.int64)


def bench_decode(engines: list, n_experts: int, rng: np.random.Generator, iters: int) -> list[list[float]]:
    """Seconds per T=1 call for each engine, their calls interleaved (rotating who goes first), each call on a
    fresh random set of TOP_K experts (drawn per engine, so no engine finds the previous one's experts cached)."""
    x = rng.standard_normal((1, H)).astype(np.float32)
    w = np.full((1, TOP_K), 1.0 / TOP_K, dtype=np.float32)
    args = [e.inputs(x, draw_ids(rng, n_experts, 1), w) for e in engines]
    times = [[] for _ in engines]
    for it in range(iters + 3):
        for j in range(len(engines)):
            k = (j + it) % len(engines)
            xa, _, wa, out = args[k]
            ids = draw_ids(rng, n_experts, 1).astype(args[k][1].dtype)
            t0 = time.perf_counter()
            engines[k](xa, ids, wa, out)
            if it >= 3:  # warm-up: pool threads, workspace, page faults
                times[k].append(time.perf_counter() - t0)
    return times


def bench_prefill(engines: list, n_experts: int, rng: np.random.Generator, T: int, iters: int) -> list[float]:
    """Best seconds per T-token call for each engine, on the same tokens and routing, in alternating rounds."""
    x = rng.standard_normal((T, H)).astype(np.float32)
    ids = draw_ids(rng, n_experts, T)
    w = np.full((T, TOP_K), 1.0 / TOP_K, dtype=np.float32)
    args = [e.inputs(x, ids, w) for e in engines]
    for e, a in zip(engines, args):   # warm-up
        e(*a)
    best = [float("inf")] * len(engines)
    for _ in range(iters):
        for k, (e, a) in enumerate(zip(engines, args)):
            t0 = time.perf_counter()
            e(*a)
            best[k] = min(best[k], time.perf_counter() - t0)
    return best


def parse_types(spec: str) -> list[str]:
    """--types: 'all' or comma-separated names of hybrid_k2.kernels.WEIGHT_QTYPES (any case)."""
    if spec.strip().lower() == "all":
        return list(K.WEIGHT_QTYPES)
    names = [n.strip().upper() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in K.WEIGHT_QTYPES]
    if unknown or not names:
        raise ValueError(f"--types: unknown weight type{'s' if len(unknown) > 1 else ''} "
                         f"{', '.join(unknown) or repr(spec)} (known: all, {', '.join(K.WEIGHT_QTYPES)})")
    return names


def ours_runs(layer: K.ExpertWeights) -> str | None:
    """None when this build's kernels run layer's type, else the kernels' refusal."""
    x = np.zeros((1, H), np.float32)
    try:
        K.moe_forward(layer, x, np.zeros((1, TOP_K), np.int32) + np.arange(TOP_K, dtype=np.int32),
                      np.full((1, TOP_K), 1.0 / TOP_K, np.float32))
    except (K.KernelError, ValueError) as e:
        return str(e)
    return None


def make_kts(kt_pool, kt_probe: dict, layer: K.ExpertWeights, max_tokens: int) -> tuple[list[KT], list[str]]:
    """kt-kernel's layers (one per backend that runs the type) on the GGUF blocks of `layer`, and why not others."""
    if kt_pool is None:
        return [], []
    name = layer.gate_type.name
    if kt_probe.get(name):
        return [], [kt_probe[name]]
    found = ktm.backends(kt_pool.ext, name)
    if not found:
        return [], [f"kt-kernel has no {name} MoE backend"]
    kts, why = [], []
    g, u, d = (layer.blocks(k) for k in ("gate", "up", "down"))
    for backend in found:
        try:
            kts.append(KT(ktm.MoELayer(kt_pool, g, u, d, name, TOP_K, max_tokens, backend)))
        except Exception as e:   # its refusal (or a broken build) must not stop the bench
            why.append(f"kt-kernel's {backend} backend refused {name}: {type(e).__name__}: {e}")
    return kts, why


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--types", default="all", help="all, or comma-separated weight types (kernels.WEIGHT_QTYPES)")
    ap.add_argument("--isa", default=None, help="force our ISA (scalar, avx2, avx512)")
    ap.add_argument("--pool-gib", type=float, default=1.5, help="expert pool size per type (>> LLC)")
    ap.add_argument("--probe-gib", type=float, default=1.0)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--prefill-tokens", type=int, default=512)
    ap.add_argument("--prefill-iters", type=int, default=2)
    ap.add_argument("--no-ktransformers", action="store_true", help="do not run kt-kernel even when installed")
    args = ap.parse_args()
    try:
        types = parse_types(args.types)
    except ValueError as e:
        ap.error(str(e))

    K.set_threads(args.threads)
    if args.isa:
        K.set_isa(args.isa)
    rng = np.random.default_rng(0)
    print(f"isa={K.isa()} threads={K.get_threads()}  shapes H={H} I={I} top-{TOP_K}")
    kt_pool = None
    if not args.no_ktransformers:
        ext, why = ktm.load()
        if why:
            print(why)
        else:
            try:
                kt_pool = ktm.Pool(ext, args.threads)
                print(f"KTransformers: {ktm.variant()}, {args.threads} threads: its llamafile MoE backend on the same GGUF "
                      f"blocks (BF16 also its native BF16 backend), bf16 activations; calls interleaved with ours")
            except Exception as e:
                print(f"KTransformers comparison skipped: its thread pool failed ({type(e).__name__}: {e})")
    kt_probe = {}
    if kt_pool is not None:   # in child processes: a type its C++ side aborts on must not end this run
        kt_probe = ktm.probe(sorted({gguf_type(n) for n in types}), args.threads)
    bw = probe_bandwidth(int(args.probe_gib * GiB), reps=5)
    print(f"probe: streaming read {args.probe_gib:.1f} GiB, best of 5: {bw / 1e9:.1f} GB/s")

    rows = []   # the summary table
    for name in types:
        t = K.qtype(name)
        per_expert = t.row_bytes(H) * I * 2 + t.row_bytes(I) * H
        n_experts = max(2 * TOP_K, int(args.pool_gib * GiB // per_expert))
        layer = make_layer(rng, name, n_experts)
        kts, kt_why = make_kts(kt_pool, kt_probe, layer, max(args.prefill_tokens, 1))   # before repacking: the GGUF blocks
        if t.name in K.REPACKED.values():
            layer = layer.repacked()
        for why in kt_why:
            print(f"{name}: KTransformers not run ({why})")
        refused = ours_runs(layer)
        if refused:
            print(f"{name}: not run by this build's kernels ({refused})")
        read = TOP_K * per_expert
        src = K.qtype(gguf_type(name))   # what kt-kernel reads (an _R8 layout's GGUF blocks)
        read_kt = TOP_K * (src.row_bytes(H) * I * 2 + src.row_bytes(I) * H)
        ours = [] if refused else [Ours(layer, False), Ours(layer, True)]
        if not ours and not kts:
            rows.append((name, read, None, None, None, None, None, None, None))
            del layer
            continue
        times = bench_decode(ours + kts, n_experts, rng, args.iters)
        med = [statistics.median(ts) for ts in times]
        labels = ["ours, h 8-bit", "ours, h 8-bit + residual"][:len(ours)] + [k.label for k in kts]
        for j, (lab, ts, m) in enumerate(zip(labels, times, med)):
            best, rd = min(ts), read if j < len(ours) else read_kt
            print(f"{name} decode T=1, {lab}: {n_experts} experts ({layer.nbytes / GiB:.2f} GiB pool), "
                  f"{rd / 1e6:.1f} MB read/call; median {m * 1e3:.2f} ms = {rd / m / 1e9:.1f} GB/s = "
                  f"{rd / m / bw:.2f} of probe; best {best * 1e3:.2f} ms = {rd / best / 1e9:.1f} GB/s")
        dec_ours, dec_res = (med[0], med[1]) if ours else (None, None)
        dec_kt = med[len(ours):]
        for k, dk in zip(kts, dec_kt):
            if ours:
                print(f"{name} decode: ours / {k.label} speed = {dk / dec_ours:.2f}x (h 8-bit, as it), "
                      f"{dk / dec_res:.2f}x (ours with the residual)")
        pre_ours, pre_kt = None, [None] * len(kts)
        if args.prefill_tokens:
            T = args.prefill_tokens
            pours = [] if refused else [Ours(layer, None)]   # ours: its default h for T tokens
            best = bench_prefill(pours + kts, n_experts, rng, T, args.prefill_iters)
            flops = 2.0 * T * TOP_K * 3 * H * I
            for lab, tp in zip(["ours"][:len(pours)] + [k.label for k in kts], best):
                print(f"{name} prefill T={T}, {lab}: {tp * 1e3:.0f} ms/layer, {flops / tp / 1e9:.1f} GFLOP/s "
                      f"({T / tp:.0f} tok/s per layer)")
            pre_ours = flops / best[0] / 1e9 if pours else None
            pre_kt = [flops / tp / 1e9 for tp in best[len(pours):]]
            for k, pk in zip(kts, pre_kt):
                if pre_ours:
                    print(f"{name} prefill: ours / {k.label} speed = {pre_ours / pk:.2f}x")
        gbs = lambda sec: sec and read / sec   # noqa: E731
        for k, dk, pk in zip(kts or [None], dec_kt or [None], pre_kt or [None]):
            rows.append((name, read, gbs(dec_ours), gbs(dec_res), k and k.layer.backend, dk and read_kt / dk,
                         dec_ours and dk and dk / dec_ours, pre_ours, pk))
        del layer, kts, ours

    print(f"\nsummary ({args.threads} threads; decode: median GB/s and fraction of the {bw / 1e9:.1f} GB/s probe; "
          f"prefill: best GFLOP/s at T={args.prefill_tokens}; x = ours / KTransformers speed; - = not run)")
    print(f"{'type':8} {'MB/call':>7} | {'ours 8b':>13} {'ours+res':>8} | {'KT path':>11} {'KT':>5} {'x':>5} | "
          f"{'ours GF/s':>9} {'KT GF/s':>8} {'x':>5}")
    f = lambda v, fmt: "-" if v is None else format(v, fmt)   # noqa: E731
    for name, read, d8, dr, path, dk, xd, po, pk in rows:
        frac = f"{f(d8 and d8 / 1e9, '.1f')} ({f(d8 and d8 / bw, '.2f')})" if d8 else "-"
        print(f"{name:8} {read / 1e6:7.1f} | {frac:>13} {f(dr and dr / 1e9, '.1f'):>8} | {path or '-':>11} "
              f"{f(dk and dk / 1e9, '.1f'):>5} {f(xd, '.2f'):>5} | "
              f"{f(po, '.1f'):>9} {f(pk, '.1f'):>8} {f(po and pk and po / pk, '.2f'):>5}")

if __name__ == "__main__":
    main()
