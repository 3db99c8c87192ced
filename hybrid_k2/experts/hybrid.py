"""Hybrid backend: whole routed experts cached in accelerator memory, in front of the CPU kernels.

Per MoE layer, `run`:
  1. the router's ids come to the host (the one sync: the CPU needs them anyway); the ExpertCache, the same
     object the trace simulator (hybrid_k2.sim) drives, records the access and names the resident experts;
  2. the (token, expert) pairs without a usable slot go to the C kernels on a worker thread, compacted per
     token (a row is padded with its own first id at weight 0, which the kernel merges: no extra work);
  3. meanwhile the accelerator runs the shared expert and the resident experts from the slots;
  4. the Prefetcher admits what the router predictor (or its learned heads, `load_predictor_heads`) expects in
     the next `lookahead` layers and what just missed, when the cost model says the copy pays and the copy
     queue is short enough for it to land in time; copies go to a copier thread (or run inline);
  5. the partial sums meet: y = shared + (y_slots + y_cpu).

Slots hold whole experts dequantized to the compute dtype: gate [S,I,H], up [S,I,H], down [S,H,I]. A fill
moves the expert's GGML blocks through a pinned staging ring to the device on a side stream and dequantizes
there (Q4_0/Q8_0: 3.5x fewer bytes over PCIe than bf16); other block types are dequantized on the host by the
C kernels and moved as compute dtype. An event marks a fill done and the compute stream waits on it (no host
sync); a slot is overwritten only after the compute stream's last read of it (an event recorded per layer).
A resident expert whose fill has not landed (queued on the copier, or its event not yet complete) runs on the
CPU that time ('late') and its copy lands for later use, as the simulator models; the same "landed?" test
(`_landed`) keeps the score policy from evicting an expert whose copy is in flight. The copy link is modelled
as in the simulator (one fill at a time at pcie_gbps) to tell the prefetcher its backlog, and prefetches that
cannot land before their layer starts are not issued (`land_check`).
On a CPU "accelerator" the same steps run with plain copies and no streams.

Prefill streaming (`prefill_stream`): a forward of many tokens is compute-bound on the CPU, so when
PrefillStreamModel says it is faster, every expert the layer's non-resident pairs use is streamed to the
accelerator instead of running in the kernels: its blocks go through a ring of >= 2 staging buffers (host ->
device copy and dequantization on the side stream while the compute stream runs the previous expert; events
order buffer reuse), and it runs there with torch matmuls; resident slots are used in place as always. An
expert the cache admits from such a layer is filled from its staging buffer on the device (it crosses the
link once, not twice).
"""
from __future__ import annotations

import logging
import queue
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .. import kernels
from . import ExpertBackend, block_signals
from .cache import ExpertCache
from .cpu import CPUExperts
from .prefetch import CostModel, Prefetcher, RoutingPredictor

log = logging.getLogger(__name__)

DEVICE_DEQUANT = ("Q4_0", "Q8_0", "Q4_0_R8")   # block types dequantized on the accelerator (others on the host)
PCIE_GBPS = 25.0                     # PCIe 4.0 x16 with pinned memory; placement.PCIE_GBPS_ASSUMED
RAM_GBPS_GUESS = 50.0                # per-expert CPU time before any is measured (roofline)
# Prefill streaming's defaults. The CPU figure is the kernels' prefill rate on a ~32-core AVX2/AVX-512 host
# (this 2-core AVX2 machine measures 92-120 GFLOP/s at T=512, NOTES); once a large CPU call has run, its
# measured rate replaces it. The accelerator figure is a fraction of an H100's dense bf16 peak: one expert's
# GEMMs at a few hundred tokens are small.
CPU_GFLOPS_GUESS = 1000.0
ACCEL_GFLOPS_GUESS = 100_000.0
STREAM_MIN_TOKENS = 64               # below this a forward never streams (decode, short prompts)
MEASURE_MIN_TOKENS = 32              # CPU calls at least this long feed the measured prefill GFLOP/s


def dequantize_torch(blocks: torch.Tensor, qtype: Any, cols: int) -> torch.Tensor:
    """GGML Q4_0 / Q8_0 blocks, uint8 [rows, row_bytes] on any device -> float32 [rows, cols] there.

    Q8_0 block: fp16 d, int8 q[32]: x = d*q.  Q4_0 block: fp16 d, 16 bytes of nibbles: x[j] = d*(lo_j - 8),
    x[j+16] = d*(hi_j - 8). Q4_0_R8 (kernels' repacked Q4_0, csrc/hk2.h): per 8 rows and block, 8 fp16 d then
    the rows' nibble bytes in 4-byte runs (run c of row r at 32c + 4r), un-interleaved here. Same float32
    products as the C kernels and the gguf package."""
    t = kernels.qtype(qtype)
    if t.name not in DEVICE_DEQUANT:
        raise ValueError(f"dequantize_torch: {t.name} is not one of {', '.join(DEVICE_DEQUANT)}")
    rows = blocks.shape[0]
    if blocks.dtype != torch.uint8 or blocks.dim() != 2 or blocks.shape[1] != t.row_bytes(cols):
        raise ValueError(f"dequantize_torch: blocks must be uint8 [rows, {t.row_bytes(cols)}] for {cols} {t.name} "
                         f"columns, got {blocks.dtype} {tuple(blocks.shape)}")
    nb = cols // t.block_size
    if t.name == "Q4_0_R8":
        if rows % 8:
            raise ValueError(f"dequantize_torch: {rows} rows is not a multiple of the Q4_0_R8 row group 8")
        g = blocks.reshape(rows // 8, nb, 8 * t.block_bytes)
        d = g[..., :16].contiguous().view(torch.float16).float().permute(0, 2, 1)[..., None]   # [G, 8, nb, 1]
        qs = g[..., 16:].reshape(rows // 8, nb, 4, 8, 4).permute(0, 3, 1, 2, 4).reshape(rows // 8, 8, nb, 16)
        q = torch.cat((qs & 0x0F, qs >> 4), dim=-1).float() - 8.0
        return (d * q).reshape(rows, cols)
    b = blocks.reshape(rows, nb, t.block_bytes)
    d = b[..., :2].contiguous().view(torch.float16).float()          # [rows, nb, 1]
    if t.name == "Q8_0":
        q = b[..., 2:].contiguous().view(torch.int8).float()
    else:
        qs = b[..., 2:]
        q = torch.cat((qs & 0x0F, qs >> 4), dim=-1).float() - 8.0
    return (d * q).reshape(rows, cols)


def _matrices(w: kernels.ExpertWeights, e: int):
    """(blocks uint8 [rows, row_bytes], QType, (rows, cols)) of expert e's gate, up and down."""
    I, H = w.inter, w.hidden
    return ((np.asarray(w._gate[e]), w.gate_type, (I, H)), (np.asarray(w._up[e]), w.up_type, (I, H)),
            (np.asarray(w._down[e]), w.down_type, (H, I)))


def _copy_nbytes(w: kernels.ExpertWeights, itemsize: int) -> list[int]:
    """Bytes one fill moves host -> device per matrix (gate, up, down) for this layer's block types."""
    return [rows * (qt.row_bytes(cols) if qt.name in DEVICE_DEQUANT else cols * itemsize)
            for qt, (rows, cols) in ((w.gate_type, (w.inter, w.hidden)), (w.up_type, (w.inter, w.hidden)),
                                     (w.down_type, (w.hidden, w.inter)))]


def slot_bytes(cfg_or_hidden, inter: int | None = None, dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes of one VRAM slot: a whole expert in the compute dtype."""
    if inter is None:
        H, I = cfg_or_hidden.hidden_size, cfg_or_hidden.moe_intermediate_size
    else:
        H, I = int(cfg_or_hidden), int(inter)
    return 3 * H * I * torch.empty((), dtype=dtype).element_size()


def slots_for_budget(cfg, device, dtype, vram_budget=None, ctx: int | None = None) -> int:
    """Slots that fit beside what is already allocated on `device` (the model's non-expert weights), the KV
    cache for `ctx` and the workspace reserve (placement.workspace_bytes). vram_budget (bytes or '24GiB'):
    the device memory to use in all; default the whole device. On a CPU device, vram_budget is the cache's
    own size and the default is no cache."""
    from ..placement import kv_cache_bytes, parse_size, workspace_bytes
    device = torch.device(device)
    one = slot_bytes(cfg, dtype=dtype)
    total = len(cfg.moe_layers) * cfg.n_routed_experts
    if device.type != "cuda":
        return 0 if vram_budget is None else min(parse_size(vram_budget, "vram_budget") // one, total)
    budget = (parse_size(vram_budget, "vram_budget") if vram_budget is not None
              else torch.cuda.get_device_properties(device).total_memory)
    ctx = ctx or 4096
    reserve = workspace_bytes(cfg, ctx) + kv_cache_bytes(cfg, ctx, "bf16")
    free = budget - torch.cuda.memory_allocated(device) - reserve
    return int(max(0, min(free // one, total)))


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
    pcie_gbps: float = PCIE_GBPS
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


class _StageBuffer:
    """One prefill-streaming stage: an expert's blocks on the host (pinned on CUDA) and on the device, and its
    dequantized gate/up/down. Events (CUDA): h2d (the host bytes may be overwritten), ready (weights written),
    free (the compute stream's last read of the weights)."""

    def __init__(self, nbytes: int, H: int, I: int, device: torch.device, dtype: torch.dtype):
        cuda = device.type == "cuda"
        self.host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=cuda)
        self.raw = torch.empty(nbytes, dtype=torch.uint8, device=device) if cuda else self.host
        self.mats = (torch.empty(I, H, device=device, dtype=dtype), torch.empty(I, H, device=device, dtype=dtype),
                     torch.empty(H, I, device=device, dtype=dtype))
        self.h2d = self.ready = self.free = None


@dataclass
class _Fill:
    slot: int
    gen: int                 # the slot's fill generation this request writes
    layer: int               # model layer number
    expert: int
    key: int                 # cache key (MoE index * E + expert)
    after: Any               # CUDA event: the compute stream's last read of the slot's previous expert


def _weak_call(method):
    """A callable forwarding to the bound `method` without keeping its object alive."""
    ref = weakref.WeakMethod(method)

    def call(*args):
        return ref()(*args)
    return call


class _Joined:
    """The future `HybridExperts.submit` returns: the device's part now, the CPU worker's when it is done."""

    def __init__(self, owner, x, y, fut, y_cpu, rows_t, T):
        self.owner, self.x, self.y, self.fut, self.y_cpu, self.rows_t, self.T = owner, x, y, fut, y_cpu, rows_t, T

    def result(self) -> torch.Tensor:
        x, y, y_cpu, rows_t = self.x, self.y, self.y_cpu, self.rows_t
        if self.fut is not None:
            y_cpu = self.fut.result()
        if y_cpu is not None:
            yc = y_cpu.to(x.device)
            if rows_t is None:
                y = yc if y is None else y + yc
            else:
                y = torch.zeros(self.T, self.owner.hidden, device=x.device, dtype=torch.float32) if y is None else y
                y.index_add_(0, rows_t, yc)
        if y is None:                                 # K == 0 or T == 0
            y = torch.zeros(self.T, self.owner.hidden, device=x.device, dtype=torch.float32)
        return y.to(x.dtype)


class HybridExperts(ExpertBackend):
    """VRAM expert cache + CPU kernels. `cpu` holds every routed expert in RAM (the CPU path); `n_slots` whole
    experts fit on `device`. policy: 'score' | 'lru' | 'static' (needs `profile`, use counts [moe_layers, E]).
    prefetch: demand admission of missed experts plus, given a predictor (or after `attach(model)`), copies of
    the experts the next `lookahead` layers' routers pick from the current hidden state. overlap: CPU experts
    on a worker thread while the accelerator works. async_copies: fills on a copier thread (default: on CUDA).
    cost_model: 'auto' (CUDA: PCIe bandwidth vs the measured CPU time per expert; CPU device: none), None
    (admit whatever the policy accepts) or a CostModel. predictor_heads: a learned-heads .npz
    (RoutingPredictor.save_heads) for the predictor. max_backlog_ms / max_demand_backlog_ms: skip prefetch /
    demand copies while the modelled copy link is busy longer than this (async copies only); land_check: plan
    a prefetch only if the modelled link lands it before its layer starts (needs a cost model); demand: admit
    missed experts; defer_demand: decide a decode layer's demand copies at the next layer, after its
    prefetches (Prefetcher); min_uses: the Prefetcher's candidate threshold (predicted uses; plain routers
    predict 1 per chosen id); margin / predict_weight: the score policy's admission margin and weight of a
    predicted use (ExpertCache). Defaults are bench/bench_prefetch.py's SIM settings (lookahead there is 3,
    with learned heads fitted to depth 3).
    fit_on_prefill: a forward of at least this many tokens (a prompt's prefill) fits the predictor's ridge
    corrections (RoutingPredictor.fit_correction, `prefill_ridge`) on its own (layer L, layer L+d) router
    inputs, at most `prefill_fit_tokens` of them, when the predictor has no learned heads: calibration from
    the prompt, no files needed (None or 0: off).
    prefill_stream: in a forward of at least `prefill_stream_min_tokens` tokens, stream each layer's
    non-resident experts to the device through `prefill_stream_buffers` (>= 2) staging buffers instead of the
    kernels (the host copies into pinned memory on `prefill_stream_copy_threads` threads, default 4 on CUDA):
    True always, False never, None (auto) when PrefillStreamModel (`stream_model`) says it is faster. Figures:
    pcie_gbps, ram_gbps, accel_gflops (None: ACCEL_GFLOPS_GUESS on CUDA; on another device auto stays off
    unless it is given), cpu_gflops (None: the rate measured on this backend's own kernel calls of >=
    MEASURE_MIN_TOKENS tokens, CPU_GFLOPS_GUESS before one)."""

    name = "hybrid"

    def __init__(self, cpu: CPUExperts, device, dtype: torch.dtype, n_slots: int, policy: str = "score",
                 prefetch: bool = True, lookahead: int = 3, overlap: bool = True,
                 predictor: RoutingPredictor | None = None, *, cost_model: CostModel | str | None = "auto",
                 async_copies: bool | None = None, decay: float = 0.98, profile=None, pcie_gbps: float = PCIE_GBPS,
                 staging_buffers: int = 3, owns_cpu: bool = False, predictor_heads=None,
                 max_backlog_ms: float | None = None, max_demand_backlog_ms: float | None = 0.0,
                 land_check: bool = True, demand: bool = True, defer_demand: bool = True,
                 predict_weight: float = 10.0, min_uses: float = 0.3, margin: float = 2.0,
                 fit_on_prefill: int | None = 256,
                 prefill_ridge: float = 0.3, prefill_fit_tokens: int = 512, prefill_stream: bool | None = None,
                 prefill_stream_min_tokens: int = STREAM_MIN_TOKENS, prefill_stream_buffers: int = 2,
                 prefill_stream_copy_threads: int | None = None, cpu_gflops: float | None = None,
                 accel_gflops: float | None = None,
                 ram_gbps: float = RAM_GBPS_GUESS):
        if not isinstance(cpu, CPUExperts):
            raise TypeError(f"HybridExperts: cpu must be a CPUExperts, got {type(cpu).__name__}")
        if not cpu.layers:
            raise ValueError("HybridExperts: the CPU backend holds no MoE layers")
        if lookahead < 0:
            raise ValueError(f"HybridExperts: lookahead must be >= 0, got {lookahead}")
        self.cpu, self.device, self.dtype = cpu, torch.device(device), dtype
        self._cuda = self.device.type == "cuda"
        self.layers = sorted(cpu.layers)                       # model layer numbers of the MoE layers
        self._index = {l: i for i, l in enumerate(self.layers)}
        geometry = {(w.n_experts, w.hidden, w.inter) for w in cpu.layers.values()}
        if len(geometry) != 1:
            raise ValueError(f"HybridExperts: MoE layers differ in (experts, hidden, inter): {sorted(geometry)}")
        self.n_experts, self.hidden, self.inter = geometry.pop()
        itemsize = torch.empty((), dtype=dtype).element_size()
        per_matrix = [_copy_nbytes(w, itemsize) for w in cpu.layers.values()]
        self.copy_bytes = max(sum(m) for m in per_matrix)         # one expert's fill
        self._stage_bytes = max(max(m) for m in per_matrix)       # one matrix: the staging buffers' size
        n_keys = len(self.layers) * self.n_experts
        if not isinstance(n_slots, (int, np.integer)) or isinstance(n_slots, bool) or n_slots < 0:
            raise ValueError(f"HybridExperts: n_slots must be a non-negative integer, got {n_slots!r}")
        n_slots = min(int(n_slots), n_keys)
        self.cache = ExpertCache(n_slots, len(self.layers), self.n_experts, policy, decay=decay, margin=margin,
                                 predict_weight=predict_weight, expert_bytes=self.copy_bytes, profile=profile)
        # through a weak method: a bound one held by the cache is a cycle, so the VRAM slots below would outlive
        # the backend's last reference until a garbage collection
        self.cache.set_landed(_weak_call(self._landed_keys))
        S, E, H, I = n_slots, self.n_experts, self.hidden, self.inter
        with torch.inference_mode(False):   # written in place by the copier, which is never in inference mode
            self.gate = torch.empty(S, I, H, device=self.device, dtype=dtype)
            self.up = torch.empty(S, I, H, device=self.device, dtype=dtype)
            self.down = torch.empty(S, H, I, device=self.device, dtype=dtype)
        # Slot state. The main thread owns the cache and _gen/_content; the copier writes _ready/_event.
        # A slot is usable for key k iff _content == k and _ready == _gen (its latest fill is done/enqueued).
        self._gen = [0] * S
        self._ready = [0] * S
        self._content = [-1] * S
        self._event: list[Any] = [None] * S          # CUDA: fill-done event
        self._last_use: list[Any] = [None] * S       # CUDA: compute-stream event after the last read
        self._prefetched = [False] * S               # filled by a prediction and not hit yet
        self._failed = [0] * S                       # generation of a fill that raised in the copier
        self._slot_lock = threading.Lock()
        self._fill_lock = threading.Lock()           # one writer of slot contents at a time (copier / stage fills)

        self.predictor = None
        self._pred_by_index = False
        self.prefetch = bool(prefetch) and S > 0
        self.lookahead = lookahead
        self.overlap = overlap
        self.async_copies = self._cuda if async_copies is None else bool(async_copies)
        self._auto_cost = cost_model == "auto"
        self.pcie_gbps = pcie_gbps
        if self._auto_cost:
            cost_model = (CostModel(self.copy_bytes, pcie_gbps, self.copy_bytes / (RAM_GBPS_GUESS * 1e9) * 1e3)
                          if self._cuda else None)
        elif cost_model is not None and not isinstance(cost_model, CostModel):
            raise TypeError(f"HybridExperts: cost_model must be 'auto', None or a CostModel, got {cost_model!r}")
        self.prefetcher = Prefetcher(self.cache, None, cost_model, lookahead=lookahead, min_uses=min_uses,
                                     max_backlog_ms=max_backlog_ms, max_demand_backlog_ms=max_demand_backlog_ms,
                                     demand=demand, defer_demand=defer_demand)
        self.land_check = bool(land_check)
        self._queued = 0                              # fills handed to the copier and not yet issued by it
        self._link_free = 0.0                         # perf_counter time the modelled copy link becomes idle
        # streamed expert -> (slot, key, slot generation) to fill from its stage; a claim whose slot has moved on to
        # another generation since (reassigned to another expert) is dropped
        self._stage_fill: dict[int, tuple[int, int, int]] = {}
        if fit_on_prefill is not None and fit_on_prefill < 0:
            raise ValueError(f"HybridExperts: fit_on_prefill must be >= 0 or None, got {fit_on_prefill!r}")
        self.fit_on_prefill, self.prefill_ridge = fit_on_prefill, prefill_ridge
        self.prefill_fit_tokens = max(1, int(prefill_fit_tokens))
        self._prefill_x: dict[int, torch.Tensor] = {}   # MoE index -> this prefill's router inputs (subsampled)
        self.prefill_fits = 0
        self.predictor_heads = predictor_heads
        if predictor is not None:
            self.set_predictor(predictor)
        self._owns_cpu = owns_cpu
        if prefill_stream not in (None, True, False):
            raise ValueError(f"HybridExperts: prefill_stream must be True, False or None (auto), got "
                             f"{prefill_stream!r}")
        if not isinstance(prefill_stream_buffers, int) or prefill_stream_buffers < 2:
            raise ValueError(f"HybridExperts: prefill_stream_buffers must be an integer >= 2 (double buffering), got "
                             f"{prefill_stream_buffers!r}")
        if prefill_stream_min_tokens < 1:
            raise ValueError(f"HybridExperts: prefill_stream_min_tokens must be >= 1, got "
                             f"{prefill_stream_min_tokens!r}")
        self.prefill_stream, self.prefill_stream_min_tokens = prefill_stream, int(prefill_stream_min_tokens)
        self.prefill_stream_buffers = prefill_stream_buffers
        self.prefill_stream_copy_threads = (4 if self._cuda else 1) if prefill_stream_copy_threads is None \
            else max(1, int(prefill_stream_copy_threads))
        self._copy_pool: ThreadPoolExecutor | None = None
        for k, v in (("cpu_gflops", cpu_gflops), ("accel_gflops", accel_gflops)):
            if v is not None and not v > 0:
                raise ValueError(f"HybridExperts: {k} must be positive or None (default), got {v!r}")
        self.cpu_gflops, self.accel_gflops, self.ram_gbps = cpu_gflops, accel_gflops, ram_gbps
        self._flops_per_pair = 6 * self.hidden * self.inter
        self._layer_copy_bytes = {l: sum(m) for l, m in zip(cpu.layers, per_matrix)}
        self._stage: list[_StageBuffer] = []
        self._cpu_big_s = 0.0                         # kernel calls of >= MEASURE_MIN_TOKENS tokens: time, flops
        self._cpu_big_flops = 0
        self.stream_model(self.layers[0])               # validates the figures now

        self._pool: ThreadPoolExecutor | None = None
        self._copier: threading.Thread | None = None
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._copy_error: BaseException | None = None
        self._side = torch.cuda.Stream(self.device) if self._cuda else None
        self._n_staging = max(1, staging_buffers)
        self._pinned: list[torch.Tensor] = []
        self._pinned_done: list[Any] = []
        self._next_pinned = 0
        self._dev_stage: torch.Tensor | None = None
        self._host_stage: np.ndarray | None = None
        self._cpu_s = 0.0
        self._cpu_expert_runs = 0
        self._forwards = 0
        self.reset_stats()
        for slot, key in enumerate(self.cache.slot_key.tolist()):   # static policy: its profile is preloaded
            if key >= 0:
                self._request(slot, key, prefetch=False)

    # ---- construction ----------------------------------------------------------------------------
    @classmethod
    def from_checkpoint(cls, ckpt, cfg, expert_format: str | None = None, *, device, dtype,
                        n_slots: int | None = None, vram_budget=None, ctx: int | None = None,
                        threads: int | None = None, progress=None, ram_budget=None, ram_used: int = 0,
                        **kw) -> "HybridExperts":
        """The CPU experts (as CPUExperts.from_checkpoint, ram_budget included) plus a cache of `n_slots` slots, or
        as many as `slots_for_budget(cfg, device, dtype, vram_budget, ctx)` allows when n_slots is None."""
        cpu = CPUExperts.from_checkpoint(ckpt, cfg, expert_format, threads=threads, progress=progress,
                                         overlap=False, ram_budget=ram_budget, ram_used=ram_used, lazy_check=True)
        try:
            if n_slots is None:
                n_slots = slots_for_budget(cfg, device, dtype, vram_budget, ctx)
            log.info("hybrid experts: %d VRAM slots of %.1f MiB", n_slots, slot_bytes(cfg, dtype=dtype) / 2**20)
            return cls(cpu, device, dtype, n_slots, owns_cpu=True, **kw)
        except BaseException:
            cpu.close()
            raise

    def attach(self, model) -> None:
        """Build the routing predictor from a model.Transformer's routers (when prefetching without one)."""
        if self.prefetch and self.predictor is None and self.lookahead > 0:
            self.set_predictor(RoutingPredictor.from_model(model))

    def load_predictor_heads(self, path) -> None:
        """Learned routing heads (an .npz from RoutingPredictor.save_heads, e.g. fitted on a recorded trace) for
        the predictor; before `attach`, they are loaded when the predictor is built."""
        self.predictor_heads = path
        if self.predictor is not None:
            self.predictor.load_heads(path)

    def set_predictor(self, predictor: RoutingPredictor | None) -> None:
        """Keys: the MoE layers' model numbers (as RoutingPredictor.from_model gives) or 0..n_moe-1."""
        if predictor is not None:
            keys = list(predictor.layers)
            if keys == self.layers:
                self._pred_by_index = False
            elif keys == list(range(len(self.layers))):
                self._pred_by_index = True
            else:
                raise ValueError(f"HybridExperts: predictor layers {keys} are neither the MoE layers {self.layers} "
                                 f"nor their indices 0..{len(self.layers) - 1}")
            if self.predictor_heads is not None and not predictor.heads:
                predictor.load_heads(self.predictor_heads)
            want = min(self.lookahead, len(self.layers) - 1)
            have = predictor.head_depth()
            if predictor.heads and have < want:
                log.warning("predictor heads reach %d MoE layer(s) ahead but prefetch looks %d ahead: beyond %d "
                            "the plain routers predict (fit heads to depth %d)", have, want, have, want)
        self.predictor = predictor

    def preload(self, keys=None) -> int:
        """Fill slots now: `keys` [(model layer, expert)], default every expert in layer order while slots
        are free. Goes through the policy's admission; returns the number of fills issued."""
        if keys is None:
            free = int((self.cache.slot_key < 0).sum())
            keys = [(l, e) for l in self.layers for e in range(self.n_experts)][:free]
        n = 0
        for layer, e in keys:
            li = self._layer_index(layer)
            slot = self.cache.admit(li, int(e))
            key = li * self.n_experts + int(e)
            if slot is not None and self._content[slot] != key:
                self._request(slot, key, prefetch=False)
                n += 1
        return n

    # ---- running ---------------------------------------------------------------------------------
    def submit(self, layer, x, ids, weights):
        self._raise_copy_error()
        if self.cpu.unchecked:   # experts paged from disk: their scales are checked before first use (slot or CPU)
            self.cpu.check_first_use(layer, ids.detach().cpu())
        li = self._layer_index(layer)
        T, K = ids.shape
        E = self.n_experts
        if li == 0:
            self.cache.next_token(max(T, 1))          # a new forward pass: advance the decay clock
            self._forwards += 1
            if self._forwards % 32 == 0:
                self._refresh_cost_model()
        ids_h = ids.detach().to("cpu", torch.int64).numpy()
        flat = ids_h.reshape(-1)
        self._stage_fill = {}
        hit = self.cache.access(li, flat)
        n_hit = int(np.count_nonzero(hit))
        n_dev = 0
        if n_hit:
            on_dev = np.zeros(flat.size, dtype=bool)
            slots = np.full(flat.size, -1, dtype=np.int64)
            slots[hit] = self.cache.slot_of(li, flat[hit])
            for p in np.flatnonzero(hit).tolist():
                s = int(slots[p])
                if self._prefetched[s]:
                    self._prefetched[s] = False
                    self.prefetch_hits += 1
                on_dev[p] = self._usable(s, li * E + int(flat[p]))
            n_dev = int(np.count_nonzero(on_dev))
            self.late += n_hit - n_dev
        away = None                                   # flat positions of the pairs no slot serves
        if n_dev < flat.size:
            away = np.flatnonzero(~on_dev) if n_dev else np.arange(flat.size)
        stream = away is not None and self._will_stream(layer, T, flat[away])
        if stream and n_hit > n_dev:
            # A streamed layer never copies an expert twice: a resident whose fill is issued (its event pending)
            # runs from its slot after that event; one whose fill is still queued is filled from its stage.
            self._stage_fill = {}
            for p in np.flatnonzero(hit & ~on_dev).tolist():
                s, key = int(slots[p]), li * E + int(flat[p])
                if self._content[s] == key and self._ready[s] == self._gen[s] and self._failed[s] != self._gen[s]:
                    on_dev[p] = True
                elif int(flat[p]) not in self._stage_fill:
                    with self._slot_lock:       # the queued fill goes stale: the stage fills the slot
                        self._gen[s] += 1
                        self._content[s] = -1
                        self._stage_fill[int(flat[p])] = (s, key, self._gen[s])
            self.late -= int(np.count_nonzero(on_dev)) - n_dev
            n_dev = int(np.count_nonzero(on_dev))
            away = np.flatnonzero(~on_dev)
        self.gpu_pairs += n_dev
        if stream:
            self.stream_pairs += flat.size - n_dev
        else:
            self.cpu_pairs += flat.size - n_dev

        n_cpu_experts = 0 if stream or away is None else len(np.unique(flat[away]))
        fut = y_cpu = rows_t = None
        if n_dev < flat.size and not stream:
            if n_dev == 0:        # everything on the CPU: the router's lists as they are
                rows = None
                ids_c = ids_h.astype(np.int32)
                w_c = weights.detach().to("cpu", torch.float32).contiguous()
            else:
                rows, ids_c, w_c = self._compact(~on_dev.reshape(T, K), ids_h, weights)
            if rows is not None and len(rows) < T:
                rows_t = torch.from_numpy(rows).to(x.device)
                xs = x.detach().index_select(0, rows_t)
            else:
                xs = x.detach()
            xh = xs.to("cpu", torch.float32).contiguous()
            n_pairs = flat.size - n_dev
            if self.overlap:      # kernels release the GIL
                fut = self._worker().submit(self._cpu_part, layer, xh, ids_c, w_c, n_pairs)
            else:
                y_cpu = self._cpu_part(layer, xh, ids_c, w_c, n_pairs)
        y = self._device_part(x, weights, K, np.flatnonzero(on_dev), slots) if n_dev else None
        if self.cache.n_slots:
            self._collect_prefill(li, x)
            # admission before streaming: a streamed expert the cache admits is filled from its stage
            self._plan(li, layer, x, flat, hit, n_cpu_experts, set(flat[away].tolist()) if stream else None)
        if stream:
            ys = self._stream_part(layer, x, weights, K, away, flat)
            y = ys if y is None else y + ys
        return _Joined(self, x, y, fut, y_cpu, rows_t, T)

    def _collect_prefill(self, li: int, x: torch.Tensor) -> None:
        """Keep a long forward's router inputs per MoE layer; after the last layer, fit the corrections."""
        if li == 0:
            self._prefill_x = {}
        T = x.shape[0]
        if (not self.fit_on_prefill or T < self.fit_on_prefill or not self.prefetch or self.predictor is None
                or self.predictor.heads):
            return
        step = max(1, -(-T // self.prefill_fit_tokens))             # evenly strided rows, at most the cap
        self._prefill_x[li] = x.detach()[::step].float()
        n = len(self.layers)
        if li != n - 1 or len(self._prefill_x) != n:
            return
        xs, self._prefill_x = self._prefill_x, {}
        for j in range(n):
            for d in range(1, max(self.lookahead, 1) + 1):
                if j + d < n:
                    self.predictor.fit_correction(j if self._pred_by_index else self.layers[j], d, xs[j], xs[j + d],
                                                  ridge=self.prefill_ridge)
        self.prefill_fits += 1

    def _layer_index(self, layer: int) -> int:
        li = self._index.get(layer)
        if li is None:
            raise ValueError(f"HybridExperts: layer {layer} is not an MoE layer (MoE layers: {self.layers})")
        return li

    def _usable(self, s: int, key: int) -> bool:
        """Slot s holds `key` with its copy landed; a fill never issued (interrupted) or failed is requested
        again. Not landed: the caller runs the expert on the CPU and the copy lands for later use."""
        if self._content[s] != key or self._failed[s] == self._gen[s]:
            self._request(s, key, prefetch=False)
        return self._content[s] == key and self._landed(s)

    def _landed(self, s: int) -> bool:
        """The latest fill of slot s is complete: done by the copier (CPU device) and, on CUDA, its event has
        completed (the copy is in VRAM, no wait needed)."""
        if self._ready[s] != self._gen[s]:
            return False
        ev = self._event[s]
        if ev is None:
            return True
        if not ev.query():
            return False
        self._event[s] = None   # settled: later checks (one per resident per admission) skip the CUDA query
        return True

    def _landed_keys(self, keys: np.ndarray) -> np.ndarray:
        """The cache's "landed?" predicate (ExpertCache.set_landed): per resident key, its slot's copy is done."""
        slots = self.cache.where[keys]
        return np.array([s >= 0 and self._content[s] == k and self._landed(int(s))
                         for s, k in zip(slots.tolist(), np.asarray(keys).tolist())], dtype=bool)

    @staticmethod
    def _compact(miss: np.ndarray, ids_h: np.ndarray, weights: torch.Tensor):
        """Rows with a CPU pair, and their pairs packed left; padding repeats the row's first id at weight 0,
        which the kernel folds into that pair (it merges a token's duplicate ids), so it costs nothing."""
        w_h = weights.detach().to("cpu", torch.float32).numpy()
        if miss.shape[0] == 1:    # decode: just the CPU pairs
            sel = np.flatnonzero(miss[0])
            return np.zeros(1, np.int64), ids_h[:, sel].astype(np.int32), np.ascontiguousarray(w_h[:, sel])
        rows = np.flatnonzero(miss.any(1))
        m = miss[rows]
        n = m.sum(1)
        kc = int(n.max())
        order = np.argsort(~m, axis=1, kind="stable")[:, :kc]       # the CPU pairs first, in k order
        ids_c = np.take_along_axis(ids_h[rows], order, 1).astype(np.int32)
        w_c = np.take_along_axis(w_h[rows], order, 1).astype(np.float32)
        pad = np.arange(kc)[None, :] >= n[:, None]
        if pad.any():
            ids_c = np.where(pad, ids_c[:, :1], ids_c)
            w_c = np.where(pad, np.float32(0), w_c)
        return rows, np.ascontiguousarray(ids_c), np.ascontiguousarray(w_c)

    def _cpu_part(self, layer: int, xh: torch.Tensor, ids_c: np.ndarray, w_c: np.ndarray, n_pairs: int) -> torch.Tensor:
        t0 = time.perf_counter()
        y = kernels.moe_forward(self.cpu.layers[layer], xh, ids_c, w_c)
        dt = time.perf_counter() - t0
        self._cpu_s += dt
        self._cpu_expert_runs += len(set(ids_c.ravel().tolist())) if ids_c.size <= 64 else len(np.unique(ids_c))
        if xh.shape[0] >= MEASURE_MIN_TOKENS:      # a prefill-sized call: its rate feeds the streaming decision
            self._cpu_big_s += dt
            self._cpu_big_flops += n_pairs * self._flops_per_pair
        return y

    @staticmethod
    def _swiglu(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
        return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)

    def _expert(self, x: torch.Tensor, s: int) -> torch.Tensor:
        return self._swiglu(x, self.gate[s], self.up[s], self.down[s])

    # ---- prefill streaming -----------------------------------------------------------------------
    def measured_cpu_gflops(self) -> float | None:
        """The kernels' rate on this backend's calls of >= MEASURE_MIN_TOKENS tokens (None before one)."""
        return self._cpu_big_flops / self._cpu_big_s / 1e9 if self._cpu_big_s > 0 else None

    def stream_model(self, layer: int | None = None) -> PrefillStreamModel:
        """The cost model `prefill_stream=None` decides with, for `layer` (default the first MoE layer)."""
        layer = self.layers[0] if layer is None else layer
        cpu = self.cpu_gflops or self.measured_cpu_gflops() or CPU_GFLOPS_GUESS
        return PrefillStreamModel(self._layer_copy_bytes[layer], self.cpu.layers[layer].expert_nbytes(),
                                  self._flops_per_pair, self.pcie_gbps, cpu, self.accel_gflops or ACCEL_GFLOPS_GUESS,
                                  self.ram_gbps)

    def _will_stream(self, layer: int, T: int, away_ids: np.ndarray) -> bool:
        """Whether this layer's non-resident pairs (their expert ids `away_ids`) stream to the device."""
        if T < self.prefill_stream_min_tokens or self.prefill_stream is False:
            return False
        if self.prefill_stream is None and not self._cuda and self.accel_gflops is None:
            return False      # auto on a CPU "device": no rate for it, and no separate compute to win
        if self.prefill_stream:
            return True
        if self.stream_model(layer).wins(len(np.unique(away_ids)), len(away_ids)):
            return True
        self.stream_declined += 1
        return False

    def _stage_buffers(self) -> list[_StageBuffer]:
        if not self._stage:    # allocated at the first streamed layer, then kept: in-flight copies use them
            nbytes = self.copy_bytes + 3 * 16
            with torch.inference_mode(False):   # normal tensors: later calls may run outside inference mode
                self._stage = [_StageBuffer(nbytes, self.hidden, self.inter, self.device, self.dtype)
                               for _ in range(self.prefill_stream_buffers)]
        return self._stage

    def _stage_load(self, b: _StageBuffer, layer: int, e: int) -> None:
        """Expert e's blocks -> b.host -> b.raw (device) -> dequantized into b.mats; on CUDA queued on the side
        stream after the compute stream's last read of b (b.free), the host bytes reused after b.h2d."""
        if b.h2d is not None:
            b.h2d.synchronize()
        parts, off = [], 0
        for blocks, qt, shape in _matrices(self.cpu.layers[layer], e):
            if qt.name in DEVICE_DEQUANT:
                src = blocks.reshape(-1)
            else:     # K-quants: dequantized on the host by the kernels, moved as the compute dtype
                f = torch.from_numpy(kernels.dequantize(blocks, qt, shape)).to(self.dtype)
                src = f.view(torch.uint8).numpy().reshape(-1)
            self._host_copy(b.host[off:off + src.nbytes].numpy(), src)
            parts.append((off, src.nbytes, qt, shape))
            off += -(-src.nbytes // 16) * 16            # 16-byte aligned: a dtype view of the next part is legal
        if self._cuda:
            with torch.cuda.stream(self._side):
                if b.free is not None:
                    self._side.wait_event(b.free)
                b.raw[:off].copy_(b.host[:off], non_blocking=True)
                b.h2d = torch.cuda.Event()
                b.h2d.record(self._side)
                self._stage_dequant(b, parts)
                b.ready = torch.cuda.Event()
                b.ready.record(self._side)
        else:
            self._stage_dequant(b, parts)
        self.stream_bytes += sum(p[1] for p in parts)

    def _host_copy(self, dst: np.ndarray, src: np.ndarray) -> None:
        """src -> dst (1-D uint8), in chunks on `prefill_stream_copy_threads` threads when it is large: one
        thread's memcpy into pinned memory (~5-10 GB/s) would be slower than the link it feeds."""
        k = self.prefill_stream_copy_threads
        if k <= 1 or src.nbytes < (4 << 20):
            np.copyto(dst, src)
            return
        if self._copy_pool is None:
            self._copy_pool = ThreadPoolExecutor(k, thread_name_prefix="hk2-stage-copy", initializer=block_signals)
        bounds = np.linspace(0, src.nbytes, k + 1).astype(np.int64).tolist()
        for f in [self._copy_pool.submit(np.copyto, dst[a:z], src[a:z]) for a, z in zip(bounds, bounds[1:])]:
            f.result()                                  # numpy releases the GIL while copying

    def _stage_dequant(self, b: _StageBuffer, parts) -> None:
        for (o, n, qt, (rows, cols)), dst in zip(parts, b.mats):
            raw = b.raw[o:o + n]
            if qt.name in DEVICE_DEQUANT:
                dst.copy_(dequantize_torch(raw.view(rows, -1), qt, cols))
            else:
                dst.copy_(raw.view(self.dtype).view(rows, cols))

    def _stream_part(self, layer: int, x: torch.Tensor, weights: torch.Tensor, K: int, pos: np.ndarray,
                     flat: np.ndarray) -> torch.Tensor:
        """Sum over the pairs at flat positions `pos`, each distinct expert streamed once through the staging
        ring: while expert i runs on the compute stream, the next ones are copied and dequantized. float32 [T, H]."""
        T = x.shape[0]
        e_of = flat[pos]
        order = np.argsort(e_of, kind="stable")
        pos, e_of = pos[order], e_of[order]
        starts = np.flatnonzero(np.r_[True, e_of[1:] != e_of[:-1]])
        ends = np.r_[starts[1:], len(pos)].tolist()
        experts = e_of[starts].tolist()
        starts = starts.tolist()
        idx = torch.from_numpy(np.stack([pos // K, pos % K])).to(x.device)
        w_sel = weights[idx[0], idx[1]].float()
        y = torch.zeros(T, self.hidden, device=x.device, dtype=torch.float32)
        bufs = self._stage_buffers()
        n = len(bufs)
        compute = torch.cuda.current_stream(self.device) if self._cuda else None
        for j in range(min(n - 1, len(experts))):       # prime the ring
            self._stage_load(bufs[j], layer, experts[j])
        for i in range(len(experts)):
            b = bufs[i % n]
            if compute is not None:
                compute.wait_event(b.ready)
            t = idx[0, starts[i]:ends[i]]
            y.index_add_(0, t, self._swiglu(x.index_select(0, t), *b.mats).float() * w_sel[starts[i]:ends[i], None])
            to_slot = self._stage_fill.pop(experts[i], None)
            if to_slot is not None:                  # admitted by the cache: keep the streamed copy
                self._fill_from_stage(b, *to_slot)
            if compute is not None:
                b.free = torch.cuda.Event()
                b.free.record(compute)
            # expert i is queued: stage expert i+n-1 while it runs, into the buffer expert i-1 used (after its reads)
            if i + n - 1 < len(experts):
                self._stage_load(bufs[(i + n - 1) % n], layer, experts[i + n - 1])
        self.stream_layers += 1
        self.stream_experts += len(experts)
        return y

    def _fill_from_stage(self, b: _StageBuffer, s: int, key: int, gen: int) -> None:
        """Slot s <- the expert in staging buffer b (device to device, on the compute stream after its reads of
        the slot and any earlier fill of it): an expert streamed for a layer and admitted to the cache is not
        copied over the link a second time. Nothing happens if the slot was given to another fill since the claim
        (generation gen)."""
        with self._fill_lock:
            if self._gen[s] != gen:
                return
            if self._cuda:
                stream = torch.cuda.current_stream(self.device)
                if self._event[s] is not None:
                    stream.wait_event(self._event[s])
            for src, dst in zip(b.mats, (self.gate[s], self.up[s], self.down[s])):
                dst.copy_(src)
            if self._cuda:
                done = torch.cuda.Event()
                done.record(stream)
                self._event[s] = self._last_use[s] = done
            self.stage_fills += 1
            self.fills_done += 1
            self._ready[s] = gen
        with self._slot_lock:
            if self._gen[s] == gen:
                self._content[s] = key

    def _device_part(self, x, weights, K: int, pos: np.ndarray, slots: np.ndarray) -> torch.Tensor:
        """Sum over the slot-resident pairs at flat positions `pos` (token * K + k), float32 [T, H]."""
        T = x.shape[0]
        tok, kk, sl = pos // K, pos % K, slots[pos]
        used = np.unique(sl).tolist()
        if self._cuda:
            stream = torch.cuda.current_stream(self.device)
            for s in used:
                if self._event[s] is not None:
                    stream.wait_event(self._event[s])
        if T == 1:
            y = None
            for k, s in zip(kk.tolist(), sl.tolist()):
                o = self._expert(x, s).float() * weights[0, k].float()
                y = o if y is None else y + o
        else:
            order = np.argsort(sl, kind="stable")
            tok, kk, sl = tok[order], kk[order], sl[order]
            idx = torch.from_numpy(np.stack([tok, kk])).to(x.device)
            w_sel = weights[idx[0], idx[1]].float()
            y = torch.zeros(T, self.hidden, device=x.device, dtype=torch.float32)
            starts = np.flatnonzero(np.r_[True, sl[1:] != sl[:-1]])
            for a, b in zip(starts.tolist(), np.r_[starts[1:], len(sl)].tolist()):
                t = idx[0, a:b]
                y.index_add_(0, t, self._expert(x.index_select(0, t), int(sl[a])).float() * w_sel[a:b, None])
        if self._cuda:
            done = torch.cuda.Event()
            done.record(torch.cuda.current_stream(self.device))
            for s in used:
                self._last_use[s] = done
        return y

    # ---- admission and fills ---------------------------------------------------------------------
    def _plan(self, li: int, layer: int, x: torch.Tensor, flat: np.ndarray, hit: np.ndarray, n_cpu_experts: int = 0,
              streamed: set | None = None) -> None:
        """Prefetch for the next layers, then demand-admit this layer's misses; issue the fills. `streamed`: this
        layer's experts about to be streamed: an admitted one is filled from its staging buffer (_stream_part)."""
        fills = []
        if self.prefetch and self.predictor is not None and self.lookahead > 0:
            ahead = self.predictor.predict_ahead(li if self._pred_by_index else layer, x.detach(), self.lookahead,
                                                 uses=True)
            pred = {(k if self._pred_by_index else self._index[k]): v for k, v in ahead.items()}
            lead = None
            cm = self.prefetcher.cost_model
            if self.land_check and cm is not None and pred:       # this layer: its CPU experts' time
                lead = self.prefetcher.lead_times(li, n_cpu_experts * cm.cpu_expert_ms, pred)
            fills += [(l2, e, True) for l2, e in self.prefetcher.plan_copies(li, pred, self._backlog_ms(), lead)]
        # a streamed layer's misses are decided now: the stage holds them only until the next expert is staged
        fills += [(l2, e, False) for l2, e in self.prefetcher.after_access(
            li, flat, hit, self._backlog_ms(), defer=False if streamed is not None else None, on_device=streamed or ())]
        for l2, e, predicted in fills:
            s = self.cache.resident(l2, e)
            key = l2 * self.n_experts + e
            if s is None or self._content[s] == key:
                continue
            if streamed is not None and l2 == li and e in streamed:
                # an earlier stage fill of this slot was evicted in the same decision: drop it
                self._stage_fill = {e2: v for e2, v in self._stage_fill.items() if v[0] != s}
                with self._slot_lock:          # the slot's old content is gone; _stream_part fills it
                    self._gen[s] += 1
                    self._content[s] = -1
                    self._stage_fill[e] = (s, key, self._gen[s])
                self._prefetched[s] = predicted
                self.demand_fills += not predicted
                self.prefetch_fills += predicted
            else:
                self._request(s, key, predicted)

    def _backlog_ms(self) -> float:
        """Copy time ahead of a new fill on the modelled link (one fill at a time at pcie_gbps, as the simulator
        models it), at least the copier's queue; 0 for inline fills."""
        if not self.async_copies:
            return 0.0
        queued = max(self._queued, 0) * self.copy_bytes / (self.pcie_gbps * 1e9) * 1e3
        return max(queued, 1e3 * (self._link_free - time.perf_counter()))

    def _request(self, s: int, key: int, prefetch: bool) -> None:
        """Fill slot s with `key`. _content names the key only once the fill is queued (async) or done (sync),
        so an interruption in between leaves a mismatch that `_usable` repairs."""
        li, e = divmod(key, self.n_experts)
        with self._slot_lock:
            self._gen[s] += 1
            req = _Fill(s, self._gen[s], self.layers[li], e, key, self._last_use[s])
            self._content[s] = -1
        self._prefetched[s] = prefetch
        if prefetch:
            self.prefetch_fills += 1
        else:
            self.demand_fills += 1
        if self.async_copies:
            self._start_copier()
            now = time.perf_counter()
            self._link_free = max(now, self._link_free) + self.copy_bytes / (self.pcie_gbps * 1e9)
            with self._slot_lock:
                self._queued += 1
            self._queue.put(req)
        else:
            self._fill(req)
        with self._slot_lock:
            if self._gen[s] == req.gen:
                self._content[s] = key

    def _start_copier(self) -> None:
        if self._copier is None or not self._copier.is_alive():
            self._copier = threading.Thread(target=self._copier_loop, name="hk2-expert-copier", daemon=True)
            self._copier.start()

    def _copier_loop(self) -> None:
        block_signals()
        while True:
            req = self._queue.get()
            if req is None:
                return
            try:
                self._fill(req)
            except BaseException as e:       # the main thread re-raises it; the slot gets refilled on use
                self._failed[req.slot] = req.gen
                log.error("expert fill (layer %d, expert %d) failed: %s", req.layer, req.expert, e)
                self._copy_error = e
            finally:
                with self._slot_lock:
                    self._queued -= 1

    def _fill(self, req: _Fill) -> None:
        with self._fill_lock:
            self._fill_locked(req)

    def _fill_locked(self, req: _Fill) -> None:
        s = req.slot
        if self._gen[s] != req.gen:          # a newer fill of this slot is queued: skip the stale one
            self.stale_fills += 1
            return
        w = self.cpu.layers[req.layer]
        dsts = (self.gate[s], self.up[s], self.down[s])
        moved = 0
        if self._cuda:
            with torch.cuda.stream(self._side):
                if req.after is not None:
                    self._side.wait_event(req.after)
                for (blocks, qt, shape), dst in zip(_matrices(w, req.expert), dsts):
                    moved += self._fill_matrix_cuda(blocks, qt, shape, dst)
                done = torch.cuda.Event()
                done.record(self._side)
            self._event[s] = done
        else:
            for (blocks, qt, shape), dst in zip(_matrices(w, req.expert), dsts):
                if qt.name in DEVICE_DEQUANT:
                    moved += blocks.nbytes
                    dst.copy_(dequantize_torch(self._host_view(blocks), qt, shape[1]))
                else:
                    moved += shape[0] * shape[1] * dst.element_size()
                    dst.copy_(torch.from_numpy(kernels.dequantize(blocks, qt, shape)))
        self.bytes_copied += moved
        self.fills_done += 1
        self._ready[s] = req.gen

    def _host_view(self, blocks: np.ndarray) -> torch.Tensor:
        """A torch view of the blocks; read-only mmaps (GGUF) go through a reused host buffer."""
        if blocks.flags.writeable and blocks.flags.c_contiguous:
            return torch.from_numpy(blocks)
        if self._host_stage is None or self._host_stage.size < blocks.nbytes:
            self._host_stage = np.empty(blocks.nbytes, dtype=np.uint8)
        stage = self._host_stage[:blocks.nbytes].reshape(blocks.shape)
        np.copyto(stage, blocks)
        return torch.from_numpy(stage)

    def _fill_matrix_cuda(self, blocks: np.ndarray, qt, shape, dst: torch.Tensor) -> int:
        """One matrix through the pinned ring to the device staging buffer, then into the slot (side stream)."""
        on_device = qt.name in DEVICE_DEQUANT
        if on_device:
            src = blocks.reshape(-1)
        else:    # K-quants: dequantize on the host (C kernels), move the compute dtype
            f = torch.from_numpy(kernels.dequantize(blocks, qt, shape)).to(self.dtype)
            src = f.view(torch.uint8).numpy().reshape(-1)
        n = src.nbytes
        if not self._pinned:                             # allocated once: in-flight copies read them
            size = self._stage_bytes
            with torch.inference_mode(False):            # normal tensors: fills run in and out of inference mode
                self._pinned = [torch.empty(size, dtype=torch.uint8, pin_memory=True) for _ in range(self._n_staging)]
                self._dev_stage = torch.empty(size, dtype=torch.uint8, device=self.device)
            self._pinned_done = [None] * self._n_staging
        i = self._next_pinned
        self._next_pinned = (i + 1) % len(self._pinned)
        if self._pinned_done[i] is not None:
            self._pinned_done[i].synchronize()          # its previous H2D has finished reading it
        pin = self._pinned[i][:n]
        np.copyto(pin.numpy(), src)
        stage = self._dev_stage[:n]
        stage.copy_(pin, non_blocking=True)
        ev = torch.cuda.Event()
        ev.record(self._side)
        self._pinned_done[i] = ev
        if on_device:
            dst.copy_(dequantize_torch(stage.view(shape[0], -1), qt, shape[1]))
        else:
            dst.copy_(stage.view(self.dtype).view(shape))
        return n

    def _raise_copy_error(self) -> None:
        err, self._copy_error = self._copy_error, None
        if err is not None:
            raise RuntimeError(f"hybrid experts: a VRAM fill failed: {err}") from err

    def _worker(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="hk2-hybrid-cpu", initializer=block_signals)
        return self._pool

    # ---- stats and shutdown ----------------------------------------------------------------------
    @property
    def cpu_expert_ms(self) -> float | None:
        """Measured wall time of one expert on the CPU (per distinct expert of a kernel call)."""
        return 1e3 * self._cpu_s / self._cpu_expert_runs if self._cpu_expert_runs else None

    def _refresh_cost_model(self) -> None:
        ms = self.cpu_expert_ms
        if self._auto_cost and self.prefetcher.cost_model is not None and ms:
            self.prefetcher.cost_model = CostModel(self.copy_bytes, self.pcie_gbps, ms)

    def reset_stats(self) -> None:
        self.cache.reset_stats()
        self.prefetcher.declined_by_cost = self.prefetcher.declined_by_link = self.prefetcher.declined_late = 0
        self.late = self.gpu_pairs = self.cpu_pairs = self.prefetch_hits = 0
        self.prefetch_fills = self.demand_fills = self.fills_done = self.stale_fills = self.bytes_copied = 0
        self.stage_fills = 0
        self.stream_layers = self.stream_declined = self.stream_experts = self.stream_pairs = self.stream_bytes = 0

    def stats(self) -> dict:
        """Cache hits/misses (exact per (token, expert) access), where pairs ran (gpu_pairs from slots,
        cpu_pairs in the kernels, stream_pairs streamed: they sum to hits + misses), fills and bytes moved;
        prefill streaming: layers streamed / declined by the cost model, experts and bytes streamed."""
        c = self.cache.stats()
        return dict(hits=c["hits"], misses=c["misses"], hit_rate=c["hit_rate"], late=self.late,
                    gpu_pairs=self.gpu_pairs, cpu_pairs=self.cpu_pairs, prefetch_fills=self.prefetch_fills,
                    demand_fills=self.demand_fills, prefetch_hits=self.prefetch_hits, fills_done=self.fills_done,
                    stale_fills=self.stale_fills, stage_fills=self.stage_fills, bytes_copied=self.bytes_copied,
                    declined_late=self.prefetcher.declined_late, evictions=c["evictions"],
                    rejected=c["rejected"], declined_by_cost=self.prefetcher.declined_by_cost,
                    declined_by_link=self.prefetcher.declined_by_link, prefill_fits=self.prefill_fits,
                    resident=c["resident"], slots=c["slots"], cpu_expert_ms=self.cpu_expert_ms,
                    stream_layers=self.stream_layers, stream_declined=self.stream_declined,
                    stream_experts=self.stream_experts, stream_pairs=self.stream_pairs,
                    stream_bytes=self.stream_bytes, cpu_gflops=self.measured_cpu_gflops())

    def close(self) -> None:
        """Join the copier and the CPU worker (pending fills finish first). The backend stays usable:
        threads start again on demand."""
        if self._copier is not None:
            self._queue.put(None)
            self._copier.join()
            self._copier = None
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        if self._copy_pool is not None:
            self._copy_pool.shutdown(wait=True)
            self._copy_pool = None
        if self._cuda:
            self._side.synchronize()
        if self._owns_cpu:
            self.cpu.close()
