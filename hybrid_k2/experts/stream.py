"""Prefill streaming: a forward of many tokens is compute-bound on the CPU, so when PrefillStreamModel says it is
faster, every expert the layer's non-resident pairs use goes to the accelerator instead of running in the
kernels. Its blocks go through a ring of >= 2 staging buffers (host -> device copy and dequantization on the
side stream while the compute stream runs the previous expert; events order buffer reuse), and it runs there
with torch matmuls. An expert the cache admits from such a layer is filled from its staging buffer on the
device, so it crosses the link once, not twice.
"""
from __future__ import annotations

import contextlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from ..placement import PCIE_GBPS_ASSUMED
from . import block_signals
from .slots import SlotPool, expert_matrices, link_bytes, unpack
from .swiglu import grouped_swiglu

# Figures before any is measured. The CPU's is the kernels' prefill rate on a many-core AVX2/AVX-512 host (a
# large kernel call's measured rate replaces it); the accelerator's a fraction of a datacenter GPU's dense bf16
# peak (one expert's GEMMs at a few hundred tokens are small); RAM: the per-expert roofline.
CPU_GFLOPS_GUESS = 1000.0
ACCEL_GFLOPS_GUESS = 100_000.0
RAM_GBPS_GUESS = 50.0


@dataclass(frozen=True)
class PrefillStreamModel:
    """Stream-vs-CPU decision for one MoE layer of a large forward: n_experts distinct non-resident experts
    used by n_pairs (token, expert) pairs. F = flops_per_pair = 6*H*I (gate, up and down matvecs, 2 flops
    per multiply-add); c = copy_bytes / pcie_gbps one expert's copy.
        copy    C = n_experts * c                       (the link)
        compute G = n_pairs * F / accel_gflops          (the accelerator)
        stream  = max(C, G) + min(C, G) / n_experts     (a pipeline of n_experts stages: copy i+1 overlaps
                                                         compute i; the first copy and last compute do not)
        cpu     = max(n_pairs * F / cpu_gflops,         (the kernels: compute-bound at large T,
                      n_experts * ram_bytes / ram_gbps)  never faster than reading each expert once)
    Streaming wins when stream < cpu."""
    copy_bytes: int          # one expert over the link (blocks for device-dequantized types)
    ram_bytes: int           # one expert's blocks the kernels read
    flops_per_pair: int
    pcie_gbps: float = PCIE_GBPS_ASSUMED
    cpu_gflops: float = CPU_GFLOPS_GUESS
    accel_gflops: float = ACCEL_GFLOPS_GUESS
    ram_gbps: float = RAM_GBPS_GUESS

    def __post_init__(self):
        for k in ("copy_bytes", "ram_bytes", "flops_per_pair", "pcie_gbps", "cpu_gflops", "accel_gflops",
                  "ram_gbps"):
            if not getattr(self, k) > 0:
                raise ValueError(f"PrefillStreamModel: {k} must be positive, got {getattr(self, k)!r}")

    def stream_ms(self, n_experts: int, n_pairs: int) -> float:
        if n_experts <= 0:
            return 0.0
        c = n_experts * self.copy_bytes / (self.pcie_gbps * 1e9) * 1e3
        g = n_pairs * self.flops_per_pair / (self.accel_gflops * 1e9) * 1e3
        return max(c, g) + min(c, g) / n_experts

    def cpu_ms(self, n_experts: int, n_pairs: int) -> float:
        compute = n_pairs * self.flops_per_pair / (self.cpu_gflops * 1e9) * 1e3
        memory = n_experts * self.ram_bytes / (self.ram_gbps * 1e9) * 1e3
        return max(compute, memory)

    def wins(self, n_experts: int, n_pairs: int) -> bool:
        return n_experts > 0 and self.stream_ms(n_experts, n_pairs) < self.cpu_ms(n_experts, n_pairs)


class StageBuffer:
    """One stage: an expert's link bytes on the host (pinned on CUDA) and on the device, and its dequantized
    gate/up/down. Events (CUDA): h2d (the host bytes may be overwritten), ready (weights written), free (the
    compute stream's last read of the weights)."""

    def __init__(self, nbytes: int, H: int, I: int, device: torch.device, dtype: torch.dtype):
        cuda = device.type == "cuda"
        self.host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=cuda)
        self.raw = torch.empty(nbytes, dtype=torch.uint8, device=device) if cuda else self.host
        self.mats = (torch.empty(I, H, device=device, dtype=dtype), torch.empty(I, H, device=device, dtype=dtype),
                     torch.empty(H, I, device=device, dtype=dtype))
        self.h2d = self.ready = self.free = None


class PrefillStreamer:
    """The staging ring of `n_buffers` stages over `pool`'s experts (its weights, side stream and slots), the
    host copies into it on `copy_threads` threads (None: 4 on CUDA, else 1)."""

    def __init__(self, pool: SlotPool, n_buffers: int, copy_threads: int | None, stage_nbytes: int):
        self.pool, self.n_buffers, self.stage_nbytes = pool, n_buffers, stage_nbytes
        self.copy_threads = (4 if pool.cuda else 1) if copy_threads is None else max(1, int(copy_threads))
        self.buffers: list[StageBuffer] = []
        self.copy_pool: ThreadPoolExecutor | None = None
        self.reset_stats()

    def reset_stats(self) -> None:
        self.layers = self.experts = self.bytes = 0

    def _buffers(self) -> list[StageBuffer]:
        if not self.buffers:    # allocated at the first streamed layer, then kept: in-flight copies use them
            p = self.pool
            w = p.weights[0]
            with torch.inference_mode(False):   # normal tensors: later calls may run outside inference mode
                self.buffers = [StageBuffer(self.stage_nbytes, w.hidden, w.inter, p.device, p.dtype)
                                for _ in range(self.n_buffers)]
        return self.buffers

    def _load(self, b: StageBuffer, li: int, e: int) -> None:
        """Expert e of MoE layer li -> b.host -> b.raw (device) -> dequantized into b.mats; on CUDA queued on the
        side stream after the compute stream's last read of b (b.free), the host bytes reused after b.h2d."""
        p = self.pool
        if b.h2d is not None:
            b.h2d.synchronize()
        parts, off = [], 0
        for blocks, qt, shape in expert_matrices(p.weights[li], e):
            src = link_bytes(blocks, qt, shape, p.dtype)
            self.host_copy(b.host[off:off + src.nbytes].numpy(), src)
            parts.append((off, src.nbytes, qt, shape))
            off += -(-src.nbytes // 16) * 16            # 16-byte aligned: a dtype view of the next part is legal
        with torch.cuda.stream(p.side) if p.cuda else contextlib.nullcontext():
            if p.cuda:
                if b.free is not None:
                    p.side.wait_event(b.free)
                b.raw[:off].copy_(b.host[:off], non_blocking=True)
                b.h2d = torch.cuda.Event()
                b.h2d.record(p.side)
            for (o, n, qt, shape), dst in zip(parts, b.mats):
                unpack(b.raw[o:o + n], qt, shape, dst)
            if p.cuda:
                b.ready = torch.cuda.Event()
                b.ready.record(p.side)
        self.bytes += sum(part[1] for part in parts)

    def host_copy(self, dst: np.ndarray, src: np.ndarray) -> None:
        """src -> dst (1-D uint8), in chunks on `copy_threads` threads when it is large: one thread's memcpy
        into pinned memory would be slower than the link it feeds."""
        k = self.copy_threads
        if k <= 1 or src.nbytes < (4 << 20):
            np.copyto(dst, src)
            return
        if self.copy_pool is None:
            self.copy_pool = ThreadPoolExecutor(k, thread_name_prefix="hk2-stage-copy", initializer=block_signals)
        bounds = np.linspace(0, src.nbytes, k + 1).astype(np.int64).tolist()
        for f in [self.copy_pool.submit(np.copyto, dst[a:z], src[a:z]) for a, z in zip(bounds, bounds[1:])]:
            f.result()                                  # numpy releases the GIL while copying

    def run(self, li: int, x: torch.Tensor, weights: torch.Tensor, pos: np.ndarray, experts_at: np.ndarray,
            to_slot: dict) -> torch.Tensor:
        """Sum over the pairs at flat positions `pos` (their expert ids `experts_at`), each distinct expert
        streamed once through the ring: while expert i runs on the compute stream, the next ones are copied and
        dequantized. to_slot: expert -> (slot, key, generation) claims (SlotPool.fill_from) of the experts the
        cache admitted, filled from their stage. float32 [T, H]."""
        experts = np.unique(experts_at).tolist()       # grouped_swiglu's group order
        bufs = self._buffers()
        n = len(bufs)
        compute = torch.cuda.current_stream(self.pool.device) if self.pool.cuda else None
        for j in range(min(n - 1, len(experts))):       # prime the ring
            self._load(bufs[j], li, experts[j])

        i = 0                                           # the group grouped_swiglu is at

        def mats(e):
            if compute is not None:
                compute.wait_event(bufs[i % n].ready)
            return bufs[i % n].mats

        def after(e):
            nonlocal i
            b = bufs[i % n]
            claim = to_slot.pop(e, None)
            if claim is not None:                       # admitted by the cache: keep the streamed copy
                self.pool.fill_from(b.mats, *claim)
            if compute is not None:
                b.free = torch.cuda.Event()
                b.free.record(compute)
            # expert i is queued: stage expert i+n-1 while it runs, into the buffer expert i-1 used (after its reads)
            if i + n - 1 < len(experts):
                self._load(bufs[(i + n - 1) % n], li, experts[i + n - 1])
            i += 1

        y = grouped_swiglu(x, weights, pos, experts_at, mats, after)
        self.layers += 1
        self.experts += len(experts)
        return y

    def close(self) -> None:
        if self.copy_pool is not None:
            self.copy_pool.shutdown(wait=True)
            self.copy_pool = None
