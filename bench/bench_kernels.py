"""Kernel bench: MoE-layer decode bandwidth against the machine's own read bandwidth, and
prefill GFLOP/s, on Kimi K2's expert shapes (H=7168, I=2048, top-8).

    python bench/bench_kernels.py [--threads 2] [--types Q4_0_R8,Q4_0,Q8_0,Q4_K_R8,Q4_K] [--isa avx2]

Q4_0_R8 / Q4_K_R8 are Q4_0 / Q4_K repacked to the kernels' 8-row layouts, which the cpu backend runs; Q4_0
and Q4_K are the GGUF layouts read in place (kept for matrices loaded without repacking).

Decode (T=1) is memory-bound: each call reads 8 experts x (gate + up + down). The experts are
drawn at random each iteration from a pool much larger than the last-level cache, so they come
from RAM as in real decoding. The probe streams a 1 GiB buffer with the same thread pool.
Weights are random block bytes with sane fp16 scales (timing does not depend on the values).
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from hybrid_k2 import kernels as K

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


def random_blocks(rng: np.random.Generator, t: K.QType, rows: int, cols: int) -> np.ndarray:
    """[rows, row_bytes] random quants with every fp16 scale set to a normal value."""
    if t.name in K.REPACKED.values():   # a kernel layout: random blocks of its GGUF type, repacked
        src = next(k for k, v in K.REPACKED.items() if v == t.name)
        return K.repack(random_blocks(rng, K.qtype(src), rows, cols), src)
    rb = t.row_bytes(cols)
    a = rng.integers(0, 256, size=(rows, rb), dtype=np.uint8)
    blocks = a.reshape(-1, t.block_bytes)
    scale = np.frombuffer(np.float16(0.01).tobytes(), dtype=np.uint8)
    if t.name in ("Q4_0", "Q8_0"):
        blocks[:, 0:2] = scale
    elif t.name == "Q4_K":
        blocks[:, 0:2] = scale
        blocks[:, 2:4] = scale
    elif t.name == "Q6_K":
        blocks[:, 208:210] = scale
    return a


def make_layer(rng: np.random.Generator, t: K.QType, n_experts: int) -> K.ExpertWeights:
    gate = random_blocks(rng, t, n_experts * I, H).reshape(n_experts, I, -1)
    up = random_blocks(rng, t, n_experts * I, H).reshape(n_experts, I, -1)
    down = random_blocks(rng, t, n_experts * H, I).reshape(n_experts, H, -1)
    return K.ExpertWeights(gate, up, down, t.name)


def bench_decode(layer: K.ExpertWeights, rng: np.random.Generator, iters: int, h_residual: bool) -> list[float]:
    """Seconds per call, a fresh random set of TOP_K experts each time."""
    x = rng.standard_normal((1, H)).astype(np.float32)
    w = np.full((1, TOP_K), 1.0 / TOP_K, dtype=np.float32)
    out = np.empty((1, H), dtype=np.float32)
    times = []
    for it in range(iters + 3):
        ids = rng.choice(layer.n_experts, TOP_K, replace=False).astype(np.int32)[None, :]
        t0 = time.perf_counter()
        K.moe_forward(layer, x, ids, w, out=out, h_residual=h_residual)
        if it >= 3:  # warm-up: pool threads, workspace, page faults
            times.append(time.perf_counter() - t0)
    return times


def bench_prefill(layer: K.ExpertWeights, rng: np.random.Generator, T: int, iters: int) -> float:
    x = rng.standard_normal((T, H)).astype(np.float32)
    ids = np.stack([rng.choice(layer.n_experts, TOP_K, replace=False) for _ in range(T)]).astype(np.int32)
    w = np.full((T, TOP_K), 1.0 / TOP_K, dtype=np.float32)
    K.moe_forward(layer, x, ids, w)
    best = float("inf")
    for _ in range(iters):
        t0 = time.perf_counter()
        K.moe_forward(layer, x, ids, w)
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--types", default="Q4_0_R8,Q4_0,Q8_0,Q4_K_R8,Q4_K")
    ap.add_argument("--isa", default=None, help="force an ISA (scalar, avx2, avx512)")
    ap.add_argument("--pool-gib", type=float, default=1.5, help="expert pool size per type (>> LLC)")
    ap.add_argument("--probe-gib", type=float, default=1.0)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--prefill-tokens", type=int, default=512)
    ap.add_argument("--prefill-iters", type=int, default=2)
    args = ap.parse_args()

    K.set_threads(args.threads)
    if args.isa:
        K.set_isa(args.isa)
    rng = np.random.default_rng(0)
    print(f"isa={K.isa()} threads={K.get_threads()}  shapes H={H} I={I} top-{TOP_K}")
    bw = probe_bandwidth(int(args.probe_gib * GiB), reps=5)
    print(f"probe: streaming read {args.probe_gib:.1f} GiB, best of 5: {bw / 1e9:.1f} GB/s")

    for name in args.types.split(","):
        t = K.qtype(name)
        per_expert = t.row_bytes(H) * I * 2 + t.row_bytes(I) * H
        n_experts = max(2 * TOP_K, int(args.pool_gib * GiB // per_expert))
        layer = make_layer(rng, t, n_experts)
        read = TOP_K * per_expert
        for h_residual in (False, True):   # h at 8 bits (as llama.cpp) / with its residual row (the engine's decode)
            times = bench_decode(layer, rng, args.iters, h_residual)
            med, best = statistics.median(times), min(times)
            print(f"{t.name} decode T=1, h {'8-bit + residual' if h_residual else '8-bit'}: {n_experts} experts "
                  f"({layer.nbytes / GiB:.2f} GiB pool), {read / 1e6:.1f} MB read/call; "
                  f"median {med * 1e3:.2f} ms = {read / med / 1e9:.1f} GB/s = {read / med / bw:.2f} of probe; "
                  f"best {best * 1e3:.2f} ms = {read / best / 1e9:.1f} GB/s = {read / best / bw:.2f}")
        if args.prefill_tokens:
            T = args.prefill_tokens
            tp = bench_prefill(layer, rng, T, args.prefill_iters)
            flops = 2.0 * T * TOP_K * 3 * H * I
            print(f"{t.name} prefill T={T}: {tp * 1e3:.0f} ms/layer, {flops / tp / 1e9:.1f} GFLOP/s "
                  f"({T / tp:.0f} tok/s per layer)")
        del layer


if __name__ == "__main__":
    main()
