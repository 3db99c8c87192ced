"""VRAM expert slots and the fills that write them.

A slot holds one whole expert in the compute dtype: gate [S,I,H], up [S,I,H], down [S,H,I]. A fill moves the
expert's GGML blocks through a pinned staging ring to the device on a side stream and dequantizes there
(DEVICE_DEQUANT: fewer bytes over PCIe than the compute dtype); other block types are dequantized on the host
by the C kernels and moved as the compute dtype. An event marks a fill done and the compute stream waits on
it (no host sync); a slot is overwritten only after the compute stream's last read of it. Fills run on a
copier thread (async) or inline; on a CPU "device" the same steps run with plain copies and no streams.
"""
from __future__ import annotations

import contextlib
import logging
import queue
import threading
from typing import Any

import numpy as np
import torch

from .. import kernels
from . import block_signals
from .swiglu import grouped_swiglu

log = logging.getLogger(__name__)

DEVICE_DEQUANT = ("Q4_0", "Q8_0", "Q4_0_R8")   # block types dequantized on the accelerator (others on the host)


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


def _kinds(w: kernels.ExpertWeights):
    return (("gate", w.gate_type, (w.inter, w.hidden)), ("up", w.up_type, (w.inter, w.hidden)),
            ("down", w.down_type, (w.hidden, w.inter)))


def expert_matrices(w: kernels.ExpertWeights, e: int):
    """(blocks uint8 [rows, row_bytes], QType, (rows, cols)) of expert e's gate, up and down."""
    return tuple((np.asarray(w.blocks(kind)[e]), qt, shape) for kind, qt, shape in _kinds(w))


def link_nbytes(w: kernels.ExpertWeights, itemsize: int) -> list[int]:
    """Bytes one expert's gate, up and down take over the link for this layer's block types."""
    return [rows * (qt.row_bytes(cols) if qt.name in DEVICE_DEQUANT else cols * itemsize)
            for _, qt, (rows, cols) in _kinds(w)]


def link_bytes(blocks: np.ndarray, qt, shape, dtype: torch.dtype) -> np.ndarray:
    """A matrix as it crosses the link, flat uint8: its blocks, or (other block types) its values dequantized
    on the host by the kernels, in the compute dtype."""
    if qt.name in DEVICE_DEQUANT:
        return blocks.reshape(-1)
    return torch.from_numpy(kernels.dequantize(blocks, qt, shape)).to(dtype).view(torch.uint8).numpy().reshape(-1)


def unpack(raw: torch.Tensor, qt, shape, dst: torch.Tensor) -> None:
    """dst <- the matrix whose `link_bytes` are `raw` (uint8, on dst's device)."""
    if qt.name in DEVICE_DEQUANT:
        dst.copy_(dequantize_torch(raw.view(shape[0], -1), qt, shape[1]))
    else:
        dst.copy_(raw.view(dst.dtype).view(shape))


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


class Slot:
    """One slot's state. The main thread owns `content` and `gen`; the copier writes `ready`, `event` and
    `failed`. The slot serves key k once content == k and ready == gen (its latest fill is done)."""
    __slots__ = ("content", "gen", "ready", "failed", "event", "last_use", "prefetched")

    def __init__(self):
        self.content = -1            # cache key (MoE index * E + expert) of the latest fill queued or done
        self.gen = self.ready = 0    # fills asked for / the generation of the last one done
        self.failed = 0              # generation of a fill that raised in the copier
        self.event = None            # CUDA: the latest fill's done event (None once settled)
        self.last_use = None         # CUDA: the compute stream's event after its last read
        self.prefetched = False      # filled by a prediction and not hit yet


class SlotPool:
    """`n` slots on `device` for the experts of `weights` (ExpertWeights per MoE index, keys li * E + e)."""

    def __init__(self, weights: list, n: int, device: torch.device, dtype: torch.dtype, *, async_copies: bool,
                 staging_buffers: int, stage_bytes: int):
        self.weights, self.device, self.dtype, self.n = weights, device, dtype, n
        self.n_experts, H, I = weights[0].n_experts, weights[0].hidden, weights[0].inter
        self.cuda = device.type == "cuda"
        self.async_copies = async_copies
        with torch.inference_mode(False):   # written in place by the copier, which is never in inference mode
            self.gate = torch.empty(n, I, H, device=device, dtype=dtype)
            self.up = torch.empty(n, I, H, device=device, dtype=dtype)
            self.down = torch.empty(n, H, I, device=device, dtype=dtype)
        self.slots = [Slot() for _ in range(n)]
        self._slot_lock = threading.Lock()
        self._fill_lock = threading.Lock()           # one writer of slot contents at a time (copier / stage fills)
        self.queued = 0                              # fills handed to the copier and not yet issued by it
        self.side = torch.cuda.Stream(device) if self.cuda else None
        self._copier: threading.Thread | None = None
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._copy_error: BaseException | None = None
        self._n_staging, self._stage_bytes = max(1, staging_buffers), stage_bytes
        # the pinned ring (CUDA), its H2D events, the next one to use; the device staging buffer; the host copy
        # of read-only blocks (CPU device)
        self._pinned, self._pinned_done, self._next_pinned, self._dev_stage, self._host_stage = [], [], 0, None, None
        self.reset_stats()

    def reset_stats(self) -> None:
        self.fills_done = self.stale_fills = self.stage_fills = self.bytes_copied = 0

    def mats(self, s: int):
        """Slot s's (gate, up, down), as grouped_swiglu asks for them."""
        return self.gate[s], self.up[s], self.down[s]

    # ---- state ---------------------------------------------------------------------------------------
    def claim(self, s: int) -> int:
        """Start a new generation of slot s (its content is gone; an older fill still queued goes stale)."""
        sl = self.slots[s]
        with self._slot_lock:
            sl.gen += 1
            sl.content = -1
            return sl.gen

    def issued(self, s: int, key: int) -> bool:
        """Slot s holds `key` with its latest fill done or issued and none failed (its event may be pending)."""
        sl = self.slots[s]
        return sl.content == key and sl.ready == sl.gen and sl.failed != sl.gen

    def landed(self, s: int) -> bool:
        """The latest fill of slot s is complete: done by the copier (CPU device) and, on CUDA, its event has
        completed (the copy is in VRAM, no wait needed)."""
        sl = self.slots[s]
        if sl.ready != sl.gen:
            return False
        if sl.event is None:
            return True
        if not sl.event.query():
            return False
        sl.event = None   # settled: later checks (one per resident per admission) skip the CUDA query
        return True

    def landed_keys(self, slots: np.ndarray, keys: np.ndarray) -> np.ndarray:
        """Per key, its slot (-1: none) holds it with the copy landed."""
        return np.array([s >= 0 and self.slots[s].content == k and self.landed(int(s))
                         for s, k in zip(slots.tolist(), np.asarray(keys).tolist())], dtype=bool)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, pos: np.ndarray, slots: np.ndarray) -> torch.Tensor:
        """Sum over the pairs at flat positions `pos` (token * K + k) from their slots `slots[pos]`, float32 [T, H],
        after those slots' fills; a later fill of one waits for these reads (CUDA events)."""
        used = np.unique(slots[pos]).tolist()
        stream = torch.cuda.current_stream(self.device) if self.cuda else None
        for s in used if self.cuda else ():        # (no streams on a CPU device)
            if self.slots[s].event is not None:
                stream.wait_event(self.slots[s].event)
        y = grouped_swiglu(x, weights, pos, slots[pos], self.mats)
        if self.cuda:
            done = torch.cuda.Event()
            done.record(stream)
            for s in used:
                self.slots[s].last_use = done
        return y

    # ---- fills ---------------------------------------------------------------------------------------
    def request(self, s: int, key: int) -> None:
        """Fill slot s with `key`, queued to the copier (async) or now. `content` names the key only once the
        fill is queued or done, so an interruption in between leaves a mismatch the caller repairs."""
        gen = self.claim(s)
        req = (s, gen, key, self.slots[s].last_use)   # after the compute stream's last read of the old expert
        if self.async_copies:
            if self._copier is None or not self._copier.is_alive():
                self._copier = threading.Thread(target=self._copier_loop, name="hk2-expert-copier", daemon=True)
                self._copier.start()
            with self._slot_lock:
                self.queued += 1
            self._queue.put(req)
        else:
            self.fill(req)
        with self._slot_lock:
            if self.slots[s].gen == gen:
                self.slots[s].content = key

    def _copier_loop(self) -> None:
        block_signals()
        while True:
            req = self._queue.get()
            if req is None:
                return
            try:
                self.fill(req)
            except BaseException as e:       # the main thread re-raises it; the slot gets refilled on use
                self.slots[req[0]].failed = req[1]
                log.error("expert fill (MoE layer %d, expert %d) failed: %s", *divmod(req[2], self.n_experts), e)
                self._copy_error = e
            finally:
                with self._slot_lock:
                    self.queued -= 1

    def raise_copy_error(self) -> None:
        err, self._copy_error = self._copy_error, None
        if err is not None:
            raise RuntimeError(f"hybrid experts: a VRAM fill failed: {err}") from err

    def fill(self, req) -> None:
        s, gen, key, after = req
        sl = self.slots[s]
        with self._fill_lock:
            if sl.gen != gen:          # a newer fill of this slot is queued: skip the stale one
                self.stale_fills += 1
                return
            li, e = divmod(key, self.n_experts)
            moved = 0
            with torch.cuda.stream(self.side) if self.cuda else contextlib.nullcontext():
                if after is not None:
                    self.side.wait_event(after)
                for (blocks, qt, shape), dst in zip(expert_matrices(self.weights[li], e), self.mats(s)):
                    src = link_bytes(blocks, qt, shape, self.dtype)
                    unpack(self._to_device(src), qt, shape, dst)
                    moved += src.nbytes
                if self.cuda:
                    sl.event = torch.cuda.Event()
                    sl.event.record(self.side)
            self.bytes_copied += moved
            self.fills_done += 1
            sl.ready = gen

    def _to_device(self, src: np.ndarray) -> torch.Tensor:
        """The bytes on the device: on CUDA through the pinned ring to the device staging buffer (side stream);
        on the CPU a torch view, read-only mmaps (GGUF) through a reused host buffer."""
        n = src.nbytes
        if not self.cuda:
            if src.flags.writeable and src.flags.c_contiguous:
                return torch.from_numpy(src)
            if self._host_stage is None or self._host_stage.size < n:
                self._host_stage = np.empty(n, dtype=np.uint8)
            np.copyto(self._host_stage[:n], src)
            return torch.from_numpy(self._host_stage[:n])
        if not self._pinned:                             # allocated once: in-flight copies read them
            with torch.inference_mode(False):            # normal tensors: fills run in and out of inference mode
                self._pinned = [torch.empty(self._stage_bytes, dtype=torch.uint8, pin_memory=True)
                                for _ in range(self._n_staging)]
                self._dev_stage = torch.empty(self._stage_bytes, dtype=torch.uint8, device=self.device)
            self._pinned_done = [None] * self._n_staging
        i = self._next_pinned
        self._next_pinned = (i + 1) % len(self._pinned)
        if self._pinned_done[i] is not None:
            self._pinned_done[i].synchronize()          # its previous H2D has finished reading it
        pin = self._pinned[i][:n]
        np.copyto(pin.numpy(), src)
        stage = self._dev_stage[:n]
        stage.copy_(pin, non_blocking=True)
        self._pinned_done[i] = torch.cuda.Event()
        self._pinned_done[i].record(self.side)
        return stage

    def fill_from(self, mats, s: int, key: int, gen: int) -> None:
        """Slot s <- an expert already on the device (a prefill stage's gate, up, down), on the compute stream
        after its reads of the slot and any earlier fill of it: a streamed expert the cache admits does not
        cross the link twice. Nothing happens if the slot has moved on from generation `gen` since."""
        sl = self.slots[s]
        with self._fill_lock:
            if sl.gen != gen:
                return
            if self.cuda:
                stream = torch.cuda.current_stream(self.device)
                if sl.event is not None:
                    stream.wait_event(sl.event)
            for src, dst in zip(mats, self.mats(s)):
                dst.copy_(src)
            if self.cuda:
                done = torch.cuda.Event()
                done.record(stream)
                sl.event = sl.last_use = done
            self.stage_fills += 1
            self.fills_done += 1
            sl.ready = gen
        with self._slot_lock:
            if sl.gen == gen:
                sl.content = key

    def close(self) -> None:
        """Join the copier (pending fills finish first); it starts again on demand."""
        if self._copier is not None:
            self._queue.put(None)
            self._copier.join()
            self._copier = None
        if self.cuda:
            self.side.synchronize()
