"""Hybrid backend: whole routed experts cached in accelerator memory (slots.py) in front of the CPU kernels.

Per MoE layer, `submit`: the router's ids come to the host (the one sync: the CPU needs them anyway) and the
ExpertCache, the object the trace simulator (hybrid_k2.sim) drives too, records the access. Pairs whose expert
has a landed slot run there; the others go to the C kernels on a worker thread, compacted per token, or, in a
long prompt when it pays, are streamed to the accelerator (stream.py). The Prefetcher then admits what the
router predictor expects in the next `lookahead` layers and what just missed, when the cost model says the
copy pays and the modelled link (Link, as in the simulator) lands it in time. A resident whose copy has not
landed runs on the CPU ('late'), and the score policy does not evict it. Layers are model layer numbers at
this class's API and MoE indices (0..n_moe-1) inside, as in the cache, the prefetcher, the slots and the sim.
"""
from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .. import kernels
from ..placement import PCIE_GBPS_ASSUMED
from . import ExpertBackend, block_signals
from .cache import ExpertCache
from .cpu import CPUExperts
from .prefetch import CostModel, Link, Prefetcher, RoutingPredictor
from .slots import SlotPool, link_nbytes, slot_bytes, slots_for_budget
from .stream import ACCEL_GFLOPS_GUESS, CPU_GFLOPS_GUESS, RAM_GBPS_GUESS, PrefillStreamModel, PrefillStreamer

log = logging.getLogger(__name__)

STREAM_MIN_TOKENS = 64               # below this a forward never streams (decode, short prompts)
MEASURE_MIN_TOKENS = 32              # CPU calls at least this long feed the measured prefill GFLOP/s


@dataclass
class HybridConfig:
    """The hybrid backend's tuning; the defaults are bench/bench_prefetch.py's SIM settings. The cache, the
    prefetcher, the slots and the stages are built from it once; per-call decisions read it live."""
    # the cache (ExpertCache): 'score' | 'lru' | 'static' (with HybridExperts' `profile`); the score policy's
    # per-token decay of use counts, admission margin (decayed uses) and weight of a predicted use
    policy: str = "score"
    decay: float = 0.98
    margin: float = 2.0
    predict_weight: float = 10.0
    # copies (Prefetcher)
    prefetch: bool = True                     # admit what the predictor expects in the next `lookahead` layers
    lookahead: int = 3
    demand: bool = True                       # admit missed experts
    defer_demand: bool = True                 # a decode layer's demand copies go after the next layer's prefetches
    min_uses: float = 0.3                     # a prefetch candidate's predicted uses
    cost_model: CostModel | str | None = "auto"   # auto: CUDA: PCIe vs measured CPU time; None: what the policy takes
    max_backlog_ms: float | None = None       # skip prefetches while the modelled link is busy longer (async)
    max_demand_backlog_ms: float | None = 0.0  # the same for demand copies
    land_check: bool = True                   # plan a prefetch only if the link lands it before its layer starts
    pcie_gbps: float = PCIE_GBPS_ASSUMED      # the link
    predictor_heads: Any = None               # learned heads (RoutingPredictor.save_heads), loaded into the predictor
    # threads
    overlap: bool = True                      # the CPU experts on a worker while the accelerator works
    async_copies: bool | None = None          # fills on a copier thread (None: on CUDA)
    staging_buffers: int = 3                  # the fills' pinned ring
    # prefill: a forward of `fit_on_prefill` tokens or more fits the predictor's ridge corrections on <=
    # `prefill_fit_tokens` of its router inputs unless it has learned heads (None or 0: off); one of
    # `prefill_stream_min_tokens` or more streams its non-resident experts (None: when PrefillStreamModel says so)
    fit_on_prefill: int | None = 256
    prefill_ridge: float = 0.3
    prefill_fit_tokens: int = 512
    prefill_stream: bool | None = None
    prefill_stream_min_tokens: int = STREAM_MIN_TOKENS
    prefill_stream_buffers: int = 2
    prefill_stream_copy_threads: int | None = None   # the stages' host copies (None: 4 on CUDA)
    cpu_gflops: float | None = None           # None: measured (MEASURE_MIN_TOKENS), CPU_GFLOPS_GUESS before
    accel_gflops: float | None = None         # None: ACCEL_GFLOPS_GUESS on CUDA; elsewhere auto stays off
    ram_gbps: float = RAM_GBPS_GUESS

    def __post_init__(self):
        if not (self.cost_model in ("auto", None) or isinstance(self.cost_model, CostModel)):
            raise TypeError(f"HybridConfig: cost_model must be 'auto', None or a CostModel, got {self.cost_model!r}")
        for field, ok, want in (
                ("lookahead", self.lookahead >= 0, ">= 0"),
                ("fit_on_prefill", self.fit_on_prefill is None or self.fit_on_prefill >= 0, ">= 0 or None"),
                ("prefill_stream", self.prefill_stream in (None, True, False), "True, False or None (auto)"),
                ("prefill_stream_buffers", isinstance(self.prefill_stream_buffers, int)
                 and self.prefill_stream_buffers >= 2, "an integer >= 2 (double buffering)"),
                ("prefill_stream_min_tokens", self.prefill_stream_min_tokens >= 1, ">= 1"),
                ("pcie_gbps", self.pcie_gbps > 0, "positive"), ("ram_gbps", self.ram_gbps > 0, "positive"),
                ("cpu_gflops", self.cpu_gflops is None or self.cpu_gflops > 0, "positive or None (default)"),
                ("accel_gflops", self.accel_gflops is None or self.accel_gflops > 0, "positive or None (default)")):
            if not ok:
                raise ValueError(f"HybridConfig: {field} must be {want}, got {getattr(self, field)!r}")


class _Joined:
    """The future `HybridExperts.submit` returns: the device's part now, the CPU worker's when it is done."""

    def __init__(self, owner, x, y, fut, y_cpu, rows_t, T):
        self.owner, self.x, self.y, self.fut, self.y_cpu, self.rows_t, self.T = owner, x, y, fut, y_cpu, rows_t, T

    def result(self) -> torch.Tensor:
        x, y, rows_t = self.x, self.y, self.rows_t
        y_cpu = self.fut.result() if self.fut is not None else self.y_cpu
        zeros = lambda: torch.zeros(self.T, self.owner.hidden, device=x.device, dtype=torch.float32)   # noqa: E731
        if y_cpu is not None and rows_t is not None:
            y = (zeros() if y is None else y).index_add_(0, rows_t, y_cpu.to(x.device))
        elif y_cpu is not None:
            y = y_cpu.to(x.device) if y is None else y + y_cpu.to(x.device)
        return (zeros() if y is None else y).to(x.dtype)       # None: K == 0 or T == 0


class HybridExperts(ExpertBackend):
    """VRAM expert cache + CPU kernels. `cpu` holds every routed expert in RAM (the CPU path); `n_slots` whole
    experts fit on `device`; `config` (HybridConfig) tunes the rest. predictor: a RoutingPredictor (default:
    built from the model by `attach`); profile: use counts [moe_layers, E] for the static policy."""

    name = "hybrid"

    def __init__(self, cpu: CPUExperts, device, dtype: torch.dtype, n_slots: int, config: HybridConfig | None = None,
                 *, predictor: RoutingPredictor | None = None, profile=None, owns_cpu: bool = False):
        if not isinstance(cpu, CPUExperts):
            raise TypeError(f"HybridExperts: cpu must be a CPUExperts, got {type(cpu).__name__}")
        if not cpu.layers:
            raise ValueError("HybridExperts: the CPU backend holds no MoE layers")
        cfg = self.config = HybridConfig() if config is None else config
        if not isinstance(cfg, HybridConfig):
            raise TypeError(f"HybridExperts: config must be a HybridConfig, got {type(cfg).__name__}")
        self.cpu, self.device, self.dtype = cpu, torch.device(device), dtype
        self._cuda = self.device.type == "cuda"
        self.layers = sorted(cpu.layers)                       # model layer numbers of the MoE layers
        self._index = {l: i for i, l in enumerate(self.layers)}
        self._weights = [cpu.layers[l] for l in self.layers]   # by MoE index
        geometry = {(w.n_experts, w.hidden, w.inter) for w in self._weights}
        if len(geometry) != 1:
            raise ValueError(f"HybridExperts: MoE layers differ in (experts, hidden, inter): {sorted(geometry)}")
        self.n_experts, self.hidden, self.inter = geometry.pop()
        itemsize = torch.empty((), dtype=dtype).element_size()
        per_matrix = [link_nbytes(w, itemsize) for w in self._weights]
        self.copy_bytes = max(sum(m) for m in per_matrix)         # one expert's fill
        self._layer_copy_bytes = [sum(m) for m in per_matrix]
        if not isinstance(n_slots, (int, np.integer)) or isinstance(n_slots, bool) or n_slots < 0:
            raise ValueError(f"HybridExperts: n_slots must be a non-negative integer, got {n_slots!r}")
        n_slots = min(int(n_slots), len(self.layers) * self.n_experts)
        self.cache = ExpertCache(n_slots, len(self.layers), self.n_experts, cfg.policy, decay=cfg.decay,
                                 margin=cfg.margin, predict_weight=cfg.predict_weight, expert_bytes=self.copy_bytes,
                                 profile=profile)
        self.async_copies = self._cuda if cfg.async_copies is None else bool(cfg.async_copies)
        self.pool = pool = SlotPool(self._weights, n_slots, self.device, dtype, async_copies=self.async_copies,
                                    staging_buffers=cfg.staging_buffers, stage_bytes=max(max(m) for m in per_matrix))
        # the "landed?" predicate holds the pool, not the backend: a cycle through the cache would keep the VRAM
        # slots alive past the backend's last reference, until a garbage collection
        where = self.cache.where
        self.cache.set_landed(lambda keys: pool.landed_keys(where[keys], keys))
        self.streamer = PrefillStreamer(pool, cfg.prefill_stream_buffers, cfg.prefill_stream_copy_threads,
                                        self.copy_bytes + 3 * 16)
        self.link = Link()                            # the modelled copy link (perf_counter seconds)
        self.prefetch = bool(cfg.prefetch) and n_slots > 0
        self._auto_cost = cfg.cost_model == "auto"
        auto = CostModel.from_bandwidth(self.copy_bytes, cfg.pcie_gbps, RAM_GBPS_GUESS) if self._cuda else None
        cost_model = auto if self._auto_cost else cfg.cost_model
        self.prefetcher = Prefetcher(self.cache, cost_model, min_uses=cfg.min_uses,
                                     max_backlog_ms=cfg.max_backlog_ms, max_demand_backlog_ms=cfg.max_demand_backlog_ms,
                                     demand=cfg.demand, defer_demand=cfg.defer_demand)
        # streamed expert -> (slot, key, slot generation) to fill from its stage (SlotPool.fill_from)
        self._stage_fill: dict[int, tuple[int, int, int]] = {}
        self._prefill_x: dict[int, torch.Tensor] = {}   # MoE index -> this prefill's router inputs (subsampled)
        self.prefill_fits = 0
        self.predictor = None
        if predictor is not None:
            self.set_predictor(predictor)
        self._owns_cpu = owns_cpu
        self._flops_per_pair = 6 * self.hidden * self.inter
        self._worker: ThreadPoolExecutor | None = None
        # kernel time and distinct experts run; of calls of >= MEASURE_MIN_TOKENS tokens, time and flops
        self._cpu_s = self._cpu_big_s = 0.0
        self._cpu_expert_runs = self._cpu_big_flops = self._forwards = 0
        self.reset_stats()
        for slot, key in enumerate(self.cache.slot_key.tolist()):   # static policy: its profile is preloaded
            if key >= 0:
                self._request(slot, key, prefetch=False)

    # ---- construction ----------------------------------------------------------------------------
    @classmethod
    def from_checkpoint(cls, ckpt, cfg, expert_format: str | None = None, *, device, dtype,
                        n_slots: int | None = None, vram_budget=None, ctx: int | None = None,
                        threads: int | None = None, progress=None, ram_budget=None, ram_used: int = 0,
                        config: HybridConfig | None = None) -> "HybridExperts":
        """The CPU experts (as CPUExperts.from_checkpoint, ram_budget included) plus a cache of `n_slots` slots, or
        as many as `slots_for_budget(cfg, device, dtype, vram_budget, ctx)` allows when n_slots is None."""
        cpu = CPUExperts.from_checkpoint(ckpt, cfg, expert_format, threads=threads, progress=progress,
                                         overlap=False, ram_budget=ram_budget, ram_used=ram_used, lazy_check=True)
        try:
            if n_slots is None:
                n_slots = slots_for_budget(cfg, device, dtype, vram_budget, ctx)
            log.info("hybrid experts: %d VRAM slots of %.1f MiB", n_slots, slot_bytes(cfg, dtype=dtype) / 2**20)
            return cls(cpu, device, dtype, n_slots, config, owns_cpu=True)
        except BaseException:
            cpu.close()
            raise

    def attach(self, model) -> None:
        """Build the routing predictor from a model.Transformer's routers (when prefetching without one)."""
        if self.prefetch and self.predictor is None and self.config.lookahead > 0:
            self.set_predictor(RoutingPredictor.from_model(model))

    def set_predictor(self, predictor: RoutingPredictor | None) -> None:
        """Keys: the MoE layers' model numbers (as RoutingPredictor.from_model gives) or 0..n_moe-1; the backend
        asks it by position (its j-th router is MoE index j) either way."""
        if predictor is not None:
            keys = list(predictor.layers)
            if keys != self.layers and keys != list(range(len(self.layers))):
                raise ValueError(f"HybridExperts: predictor layers {keys} are neither the MoE layers {self.layers} "
                                 f"nor their indices 0..{len(self.layers) - 1}")
            if self.config.predictor_heads is not None and not predictor.heads:
                predictor.load_heads(self.config.predictor_heads)
            want = min(self.config.lookahead, len(self.layers) - 1)
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
            if slot is not None and self.pool.slots[slot].content != key:
                self._request(slot, key, prefetch=False)
                n += 1
        return n

    # ---- running ---------------------------------------------------------------------------------
    def submit(self, layer, x, ids, weights):
        self.pool.raise_copy_error()
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
                if self.pool.slots[s].prefetched:
                    self.pool.slots[s].prefetched = False
                    self.prefetch_hits += 1
                on_dev[p] = self._usable(s, li * E + int(flat[p]))
            n_dev = int(np.count_nonzero(on_dev))
            self.late += n_hit - n_dev
        away = None                                   # flat positions of the pairs no slot serves
        if n_dev < flat.size:
            away = np.flatnonzero(~on_dev) if n_dev else np.arange(flat.size)
        stream = away is not None and self._will_stream(li, T, flat[away])
        if stream and n_hit > n_dev:
            # A streamed layer never copies an expert twice: a resident whose fill is issued (its event pending)
            # runs from its slot after that event; one whose fill is still queued is filled from its stage.
            for p in np.flatnonzero(hit & ~on_dev).tolist():
                s, key = int(slots[p]), li * E + int(flat[p])
                if self.pool.issued(s, key):
                    on_dev[p] = True
                elif int(flat[p]) not in self._stage_fill:     # the queued fill goes stale: the stage fills the slot
                    self._stage_fill[int(flat[p])] = (s, key, self.pool.claim(s))
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
            if self.config.overlap:      # kernels release the GIL
                if self._worker is None:
                    self._worker = ThreadPoolExecutor(1, thread_name_prefix="hk2-hybrid-cpu", initializer=block_signals)
                fut = self._worker.submit(self._cpu_part, li, xh, ids_c, w_c, n_pairs)
            else:
                y_cpu = self._cpu_part(li, xh, ids_c, w_c, n_pairs)
        y = self.pool.forward(x, weights, np.flatnonzero(on_dev), slots) if n_dev else None
        if self.cache.n_slots:
            self._collect_prefill(li, x)
            # admission before streaming: a streamed expert the cache admits is filled from its stage
            self._plan(li, x, flat, hit, n_cpu_experts, set(flat[away].tolist()) if stream else None)
        if stream:
            ys = self.streamer.run(li, x, weights, away, flat[away], self._stage_fill)
            y = ys if y is None else y + ys
        return _Joined(self, x, y, fut, y_cpu, rows_t, T)

    def _collect_prefill(self, li: int, x: torch.Tensor) -> None:
        """Keep a long forward's router inputs per MoE layer; after the last layer, fit the corrections."""
        if li == 0:
            self._prefill_x = {}
        T, cfg = x.shape[0], self.config
        if (not cfg.fit_on_prefill or T < cfg.fit_on_prefill or not self.prefetch or self.predictor is None
                or self.predictor.heads):
            return
        step = max(1, -(-T // max(1, int(cfg.prefill_fit_tokens))))     # evenly strided rows, at most the cap
        self._prefill_x[li] = x.detach()[::step].float()
        n = len(self.layers)
        if li != n - 1 or len(self._prefill_x) != n:
            return
        xs, self._prefill_x = self._prefill_x, {}
        self.predictor.fit_corrections([xs[j] for j in range(n)], max(cfg.lookahead, 1), cfg.prefill_ridge)
        self.prefill_fits += 1

    def _layer_index(self, layer: int) -> int:
        li = self._index.get(layer)
        if li is None:
            raise ValueError(f"HybridExperts: layer {layer} is not an MoE layer (MoE layers: {self.layers})")
        return li

    def _usable(self, s: int, key: int) -> bool:
        """Slot s holds `key` with its copy landed; a fill never issued (interrupted) or failed is requested
        again. Not landed: the caller runs the expert on the CPU and the copy lands for later use."""
        sl = self.pool.slots[s]
        if sl.content != key or sl.failed == sl.gen:
            self._request(s, key, prefetch=False)
        return sl.content == key and self.pool.landed(s)

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

    def _cpu_part(self, li: int, xh: torch.Tensor, ids_c: np.ndarray, w_c: np.ndarray, n_pairs: int) -> torch.Tensor:
        t0 = time.perf_counter()
        y = kernels.moe_forward(self._weights[li], xh, ids_c, w_c)
        dt = time.perf_counter() - t0
        self._cpu_s += dt
        self._cpu_expert_runs += len(set(ids_c.ravel().tolist())) if ids_c.size <= 64 else len(np.unique(ids_c))
        if xh.shape[0] >= MEASURE_MIN_TOKENS:      # a prefill-sized call: its rate feeds the streaming decision
            self._cpu_big_s += dt
            self._cpu_big_flops += n_pairs * self._flops_per_pair
        return y

    # ---- prefill streaming -----------------------------------------------------------------------
    def measured_cpu_gflops(self) -> float | None:
        """The kernels' rate on this backend's calls of >= MEASURE_MIN_TOKENS tokens (None before one)."""
        return self._cpu_big_flops / self._cpu_big_s / 1e9 if self._cpu_big_s > 0 else None

    def stream_model(self, layer: int | None = None) -> PrefillStreamModel:
        """The cost model `prefill_stream=None` decides with, for `layer` (default the first MoE layer)."""
        return self._stream_model(0 if layer is None else self._layer_index(layer))

    def _stream_model(self, li: int) -> PrefillStreamModel:
        cfg = self.config
        cpu = cfg.cpu_gflops or self.measured_cpu_gflops() or CPU_GFLOPS_GUESS
        return PrefillStreamModel(self._layer_copy_bytes[li], self._weights[li].expert_nbytes(), self._flops_per_pair,
                                  cfg.pcie_gbps, cpu, cfg.accel_gflops or ACCEL_GFLOPS_GUESS, cfg.ram_gbps)

    def _will_stream(self, li: int, T: int, away_ids: np.ndarray) -> bool:
        """Whether this layer's non-resident pairs (their expert ids `away_ids`) stream to the device."""
        cfg = self.config
        if T < cfg.prefill_stream_min_tokens or cfg.prefill_stream is False:
            return False
        if cfg.prefill_stream is None and not self._cuda and cfg.accel_gflops is None:
            return False      # auto on a CPU "device": no rate for it, and no separate compute to win
        if cfg.prefill_stream:
            return True
        if self._stream_model(li).wins(len(np.unique(away_ids)), len(away_ids)):
            return True
        self.stream_declined += 1
        return False

    # ---- admission and fills ---------------------------------------------------------------------
    def _plan(self, li: int, x: torch.Tensor, flat: np.ndarray, hit: np.ndarray, n_cpu_experts: int = 0,
              streamed: set | None = None) -> None:
        """Prefetch for the next layers, then demand-admit this layer's misses; issue the fills. `streamed`: this
        layer's experts about to be streamed: an admitted one is filled from its staging buffer."""
        fills = []
        cfg, rp = self.config, self.predictor
        if self.prefetch and rp is not None and cfg.lookahead > 0:
            ahead = rp.predict_ahead(rp.layers[li], x.detach(), cfg.lookahead, uses=True)
            pred = {li + d: v for d, v in enumerate(ahead.values(), 1)}     # its targets are layers li+1, li+2, ...
            lead = None
            cm = self.prefetcher.cost_model
            if cfg.land_check and cm is not None and pred:       # this layer: its CPU experts' time
                lead = self.prefetcher.lead_times(li, n_cpu_experts * cm.cpu_expert_ms, pred)
            fills += [(l2, e, True) for l2, e in self.prefetcher.plan_copies(li, pred, self._backlog_ms(), lead)]
        # a streamed layer's misses are decided now: the stage holds them only until the next expert is staged
        fills += [(l2, e, False) for l2, e in self.prefetcher.after_access(
            li, flat, hit, self._backlog_ms(), defer=False if streamed is not None else None, on_device=streamed or ())]
        for l2, e, predicted in fills:
            s = self.cache.resident(l2, e)
            key = l2 * self.n_experts + e
            if s is None or self.pool.slots[s].content == key:
                continue
            if streamed is not None and l2 == li and e in streamed:
                # an earlier stage fill of this slot was evicted in the same decision: drop it
                self._stage_fill = {e2: v for e2, v in self._stage_fill.items() if v[0] != s}
                self._stage_fill[e] = (s, key, self.pool.claim(s))   # the slot's old content is gone
                self.pool.slots[s].prefetched = predicted
                self.demand_fills += not predicted
                self.prefetch_fills += predicted
            else:
                self._request(s, key, predicted)

    def _backlog_ms(self) -> float:
        """Copy time ahead of a new fill on the modelled link, at least the copier's queue; 0 for inline fills."""
        if not self.async_copies:
            return 0.0
        queued = max(self.pool.queued, 0) * self.copy_bytes / (self.config.pcie_gbps * 1e9) * 1e3
        return max(queued, 1e3 * self.link.backlog(time.perf_counter()))

    def _request(self, s: int, key: int, prefetch: bool) -> None:
        self.pool.slots[s].prefetched = prefetch
        self.prefetch_fills += prefetch
        self.demand_fills += not prefetch
        if self.async_copies:
            self.link.send(time.perf_counter(), self.copy_bytes / (self.config.pcie_gbps * 1e9))
        self.pool.request(s, key)

    # ---- stats and shutdown ----------------------------------------------------------------------
    @property
    def cpu_expert_ms(self) -> float | None:
        """Measured wall time of one expert on the CPU (per distinct expert of a kernel call)."""
        return 1e3 * self._cpu_s / self._cpu_expert_runs if self._cpu_expert_runs else None

    def _refresh_cost_model(self) -> None:
        ms = self.cpu_expert_ms
        if self._auto_cost and self.prefetcher.cost_model is not None and ms:
            self.prefetcher.cost_model = CostModel(self.copy_bytes, self.config.pcie_gbps, ms)

    def reset_stats(self) -> None:
        self.cache.reset_stats()
        self.pool.reset_stats()
        self.streamer.reset_stats()
        self.prefetcher.declined_by_cost = self.prefetcher.declined_by_link = self.prefetcher.declined_late = 0
        self.late = self.gpu_pairs = self.cpu_pairs = self.prefetch_hits = 0
        self.prefetch_fills = self.demand_fills = self.stream_declined = self.stream_pairs = 0

    def stats(self) -> dict:
        """Cache hits/misses (exact per (token, expert) access), where pairs ran (gpu_pairs from slots,
        cpu_pairs in the kernels, stream_pairs streamed: they sum to hits + misses), fills and bytes moved;
        prefill streaming: layers streamed / declined by the cost model, experts and bytes streamed."""
        c, p, st, pf = self.cache.stats(), self.pool, self.streamer, self.prefetcher
        return dict(hits=c["hits"], misses=c["misses"], hit_rate=c["hit_rate"], late=self.late,
                    gpu_pairs=self.gpu_pairs, cpu_pairs=self.cpu_pairs, prefetch_fills=self.prefetch_fills,
                    demand_fills=self.demand_fills, prefetch_hits=self.prefetch_hits, fills_done=p.fills_done,
                    stale_fills=p.stale_fills, stage_fills=p.stage_fills, bytes_copied=p.bytes_copied,
                    declined_late=pf.declined_late, evictions=c["evictions"], rejected=c["rejected"],
                    declined_by_cost=pf.declined_by_cost, declined_by_link=pf.declined_by_link,
                    prefill_fits=self.prefill_fits, resident=c["resident"], slots=c["slots"],
                    cpu_expert_ms=self.cpu_expert_ms, stream_layers=st.layers, stream_declined=self.stream_declined,
                    stream_experts=st.experts, stream_pairs=self.stream_pairs, stream_bytes=st.bytes,
                    cpu_gflops=self.measured_cpu_gflops())

    def close(self) -> None:
        """Join the copier and the CPU worker (pending fills finish first). The backend stays usable:
        threads start again on demand."""
        self.pool.close()
        if self._worker is not None:
            self._worker.shutdown(wait=True)
            self._worker = None
        self.streamer.close()
        if self._owns_cpu:
            self.cpu.close()
