"""Hybrid backend: whole routed experts cached in accelerator memory, in front of the CPU kernels.

Per MoE layer, `run`:
  1. the router's ids come to the host (the one sync: the CPU needs them anyway); the ExpertCache, the same
     object the trace simulator (hybrid_k2.sim) drives, records the access and names the resident experts;
  2. the (token, expert) pairs without a usable slot go to the C kernels on a worker thread, compacted per
     token (a row is padded with its own first id at weight 0, which the kernel merges: no extra work);
  3. meanwhile the accelerator runs the shared expert and the resident experts from the slots;
  4. the Prefetcher admits what the router predictor expects in the next `lookahead` layers and what just
     missed, when the cost model says the copy pays; copies go to a copier thread (or run inline);
  5. the partial sums meet: y = shared + (y_slots + y_cpu).

Slots hold whole experts dequantized to the compute dtype: gate [S,I,H], up [S,I,H], down [S,H,I]. A fill
moves the expert's GGML blocks through a pinned staging ring to the device on a side stream and dequantizes
there (Q4_0/Q8_0: 3.5x fewer bytes over PCIe than bf16); other block types are dequantized on the host by the
C kernels and moved as compute dtype. An event marks a fill done and the compute stream waits on it (no host
sync); a slot is overwritten only after the compute stream's last read of it (an event recorded per layer).
A resident expert whose fill has not been issued yet (copier backlog) runs on the CPU that time ('late').
On a CPU "accelerator" the same steps run with plain copies and no streams.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .. import kernels
from . import ExpertBackend
from .cache import ExpertCache
from .cpu import CPUExperts
from .prefetch import CostModel, Prefetcher, RoutingPredictor

log = logging.getLogger(__name__)

DEVICE_DEQUANT = ("Q4_0", "Q8_0")   # block types dequantized on the accelerator (others on the host)
PCIE_GBPS = 25.0                     # PCIe 4.0 x16 with pinned memory; placement.PCIE_GBPS_ASSUMED
RAM_GBPS_GUESS = 50.0                # per-expert CPU time before any is measured (roofline)


def dequantize_torch(blocks: torch.Tensor, qtype: Any, cols: int) -> torch.Tensor:
    """GGML Q4_0 / Q8_0 blocks, uint8 [rows, row_bytes] on any device -> float32 [rows, cols] there.

    Q8_0 block: fp16 d, int8 q[32]: x = d*q.  Q4_0 block: fp16 d, 16 bytes of nibbles: x[j] = d*(lo_j - 8),
    x[j+16] = d*(hi_j - 8). Same float32 products as the C kernels and the gguf package."""
    t = kernels.qtype(qtype)
    if t.name not in DEVICE_DEQUANT:
        raise ValueError(f"dequantize_torch: {t.name} is not one of {', '.join(DEVICE_DEQUANT)}")
    rows = blocks.shape[0]
    if blocks.dtype != torch.uint8 or blocks.dim() != 2 or blocks.shape[1] != t.row_bytes(cols):
        raise ValueError(f"dequantize_torch: blocks must be uint8 [rows, {t.row_bytes(cols)}] for {cols} {t.name} "
                         f"columns, got {blocks.dtype} {tuple(blocks.shape)}")
    b = blocks.reshape(rows, cols // t.block_size, t.block_bytes)
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


@dataclass
class _Fill:
    slot: int
    gen: int                 # the slot's fill generation this request writes
    layer: int               # model layer number
    expert: int
    key: int                 # cache key (MoE index * E + expert)
    after: Any               # CUDA event: the compute stream's last read of the slot's previous expert


class HybridExperts(ExpertBackend):
    """VRAM expert cache + CPU kernels. `cpu` holds every routed expert in RAM (the CPU path); `n_slots` whole
    experts fit on `device`. policy: 'score' | 'lru' | 'static' (needs `profile`, use counts [moe_layers, E]).
    prefetch: demand admission of missed experts plus, given a predictor (or after `attach(model)`), copies of
    the experts the next `lookahead` layers' routers pick from the current hidden state. overlap: CPU experts
    on a worker thread while the accelerator works. async_copies: fills on a copier thread (default: on CUDA).
    cost_model: 'auto' (CUDA: PCIe bandwidth vs the measured CPU time per expert; CPU device: none), None
    (admit whatever the policy accepts) or a CostModel."""

    name = "hybrid"

    def __init__(self, cpu: CPUExperts, device, dtype: torch.dtype, n_slots: int, policy: str = "score",
                 prefetch: bool = True, lookahead: int = 1, overlap: bool = True,
                 predictor: RoutingPredictor | None = None, *, cost_model: CostModel | str | None = "auto",
                 async_copies: bool | None = None, decay: float = 0.98, profile=None, pcie_gbps: float = PCIE_GBPS,
                 staging_buffers: int = 3, owns_cpu: bool = False):
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
        self.cache = ExpertCache(n_slots, len(self.layers), self.n_experts, policy, decay=decay,
                                 expert_bytes=self.copy_bytes, profile=profile)
        S, E, H, I = n_slots, self.n_experts, self.hidden, self.inter
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
        self.prefetcher = Prefetcher(self.cache, None, cost_model, lookahead=lookahead)
        if predictor is not None:
            self.set_predictor(predictor)
        self._owns_cpu = owns_cpu

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
                        threads: int | None = None, progress=None, **kw) -> "HybridExperts":
        """The CPU experts (as CPUExperts.from_checkpoint) plus a cache of `n_slots` slots, or as many as
        `slots_for_budget(cfg, device, dtype, vram_budget, ctx)` allows when n_slots is None."""
        cpu = CPUExperts.from_checkpoint(ckpt, cfg, expert_format, threads=threads, progress=progress,
                                         overlap=False)
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
    def forward(self, layer, x, ids, weights):
        return self.run(layer, x, ids, weights, None)

    def run(self, layer, x, ids, weights, shared):
        self._raise_copy_error()
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
        self.gpu_pairs += n_dev
        self.cpu_pairs += flat.size - n_dev

        fut = y_cpu = rows_t = None
        if n_dev < flat.size:
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
            if self.overlap:
                fut = self._worker().submit(self._cpu_part, layer, xh, ids_c, w_c)   # kernels release the GIL
            else:
                y_cpu = self._cpu_part(layer, xh, ids_c, w_c)
        s_out = shared(x) if shared is not None else None
        y = self._device_part(x, weights, K, np.flatnonzero(on_dev), slots) if n_dev else None
        if self.cache.n_slots:
            self._plan(li, layer, x, flat, hit)
        if fut is not None:
            y_cpu = fut.result()
        if y_cpu is not None:
            yc = y_cpu.to(x.device)
            if rows_t is None:
                y = yc if y is None else y + yc
            else:
                y = torch.zeros(T, self.hidden, device=x.device, dtype=torch.float32) if y is None else y
                y.index_add_(0, rows_t, yc)
        if y is None:                                 # K == 0 or T == 0
            y = torch.zeros(T, self.hidden, device=x.device, dtype=torch.float32)
        y = y.to(x.dtype)
        return y if s_out is None else s_out + y

    def _layer_index(self, layer: int) -> int:
        li = self._index.get(layer)
        if li is None:
            raise ValueError(f"HybridExperts: layer {layer} is not an MoE layer (MoE layers: {self.layers})")
        return li

    def _usable(self, s: int, key: int) -> bool:
        if self._content[s] != key or self._failed[s] == self._gen[s]:   # fill never issued (interrupted) or failed
            self._request(s, key, prefetch=False)
        return self._content[s] == key and self._ready[s] == self._gen[s]

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

    def _cpu_part(self, layer: int, xh: torch.Tensor, ids_c: np.ndarray, w_c: np.ndarray) -> torch.Tensor:
        t0 = time.perf_counter()
        y = kernels.moe_forward(self.cpu.layers[layer], xh, ids_c, w_c)
        self._cpu_s += time.perf_counter() - t0
        self._cpu_expert_runs += len(set(ids_c.ravel().tolist())) if ids_c.size <= 64 else len(np.unique(ids_c))
        return y

    def _expert(self, x: torch.Tensor, s: int) -> torch.Tensor:
        return F.linear(F.silu(F.linear(x, self.gate[s])) * F.linear(x, self.up[s]), self.down[s])

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
    def _plan(self, li: int, layer: int, x: torch.Tensor, flat: np.ndarray, hit: np.ndarray) -> None:
        """Prefetch for the next layers, then demand-admit this layer's misses; issue the fills."""
        fills = []
        if self.prefetch and self.predictor is not None:
            ahead = self.predictor.predict_ahead(li if self._pred_by_index else layer, x.detach(), self.lookahead)
            pred = {(k if self._pred_by_index else self._index[k]): v for k, v in ahead.items()}
            fills += [(l2, e, True) for l2, e in self.prefetcher.plan_copies(li, pred)]
        fills += [(l2, e, False) for l2, e in self.prefetcher.after_access(li, flat, hit)]
        for l2, e, predicted in fills:
            s = self.cache.resident(l2, e)
            key = l2 * self.n_experts + e
            if s is not None and self._content[s] != key:
                self._request(s, key, predicted)

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

    def _fill(self, req: _Fill) -> None:
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
            self._pinned = [torch.empty(size, dtype=torch.uint8, pin_memory=True) for _ in range(self._n_staging)]
            self._pinned_done = [None] * self._n_staging
            self._dev_stage = torch.empty(size, dtype=torch.uint8, device=self.device)
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
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="hk2-hybrid-cpu")
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
        self.prefetcher.declined_by_cost = 0
        self.late = self.gpu_pairs = self.cpu_pairs = self.prefetch_hits = 0
        self.prefetch_fills = self.demand_fills = self.fills_done = self.stale_fills = self.bytes_copied = 0

    def stats(self) -> dict:
        """Cache hits/misses (exact per (token, expert) access), where pairs ran, fills and bytes moved."""
        c = self.cache.stats()
        return dict(hits=c["hits"], misses=c["misses"], hit_rate=c["hit_rate"], late=self.late,
                    gpu_pairs=self.gpu_pairs, cpu_pairs=self.cpu_pairs, prefetch_fills=self.prefetch_fills,
                    demand_fills=self.demand_fills, prefetch_hits=self.prefetch_hits, fills_done=self.fills_done,
                    stale_fills=self.stale_fills, bytes_copied=self.bytes_copied, evictions=c["evictions"],
                    rejected=c["rejected"], declined_by_cost=self.prefetcher.declined_by_cost,
                    resident=c["resident"], slots=c["slots"], cpu_expert_ms=self.cpu_expert_ms)

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
        if self._cuda:
            self._side.synchronize()
        if self._owns_cpu:
            self.cpu.close()
