"""CPU backend: routed experts as GGML blocks in RAM, run by the C kernels (hybrid_k2.kernels).

Weights come from a GGUF file or from an HF checkpoint quantized at load, one expert at a time
(compressed-tensors INT4 experts become Q4_0 without requantizing). Q4_0 and Q4_K are repacked to the kernels'
Q4_0_R8 / Q4_K_R8 layouts (8 rows interleaved for faster kernels, as llama.cpp's CPU repack), the
file's pages released as each layer is copied; other formats run from the GGUF mapping in place.
While the kernels run (they release the GIL) the accelerator computes the shared expert.

Models larger than RAM: when the experts as held (repacked) do not fit the RAM budget, a GGUF's experts run
from the file mapping in its own layout (repacked layouts only when they fit), and when even that does not fit
the OS pages them in from disk as the kernels touch them, as llama.cpp does. The block-scale check (a NaN scale
is a block of NaNs) then runs per expert on its first use instead of at load: the load-time check reads every
page, i.e. the whole file, which is what mapping in place avoids. First use reads those pages anyway (the kernel
runs on them right after), and once every expert of a layer is checked that layer costs nothing more.
"""
from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from .. import kernels
from ..checkpoint import CheckpointError, fetch
from ..checkpoint.gguf import nonfinite_scales, qtype_name
from ..checkpoint.quantize import int4_to_q4_0
from . import ExpertBackend, Pending, Ready, block_signals, expert_names

log = logging.getLogger(__name__)

FORMATS = {n.lower(): n for n in kernels.QUANTIZE_QTYPES}


class CPUExperts(ExpertBackend):
    name = "cpu"

    def __init__(self, layers: dict[int, kernels.ExpertWeights], threads: int | None = None, overlap: bool = True,
                 *, mapped: str | None = None, unchecked: dict | None = None):
        self.layers = layers
        # Why the experts are mapped in place from the file (the RAM budget) or None, and for those whose scales
        # are checked on first use {layer: (path, {kind: (tensor name, GGML type id)}, bool[E] still to check)}
        self.mapped = mapped
        self._unchecked = dict(unchecked or {})
        if threads is not None:
            kernels.set_threads(threads)
        self.overlap = overlap
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="hk2-experts", initializer=block_signals) if overlap else None

    @property
    def nbytes(self) -> int:
        return sum(w.nbytes for w in self.layers.values())

    # ---- loading -----------------------------------------------------------------------------
    @classmethod
    def from_checkpoint(cls, ckpt, cfg, expert_format: str | None = None, threads: int | None = None,
                        progress=None, overlap: bool = True, *, ram_budget=None, ram_used: int = 0,
                        lazy_check: bool = False) -> "CPUExperts":
        """ram_budget (bytes or '256GiB'; None: the machine's MemAvailable) less placement.RAM_RESERVE and
        `ram_used` (what the rest of the model holds in RAM) is the room for the experts: a GGUF's are repacked
        only when the repacked copies fit it, else kept mapped in place (paged from disk when even the file's
        layout does not fit); experts quantized at load (an HF checkpoint, another expert_format) must fit.
        lazy_check: with experts paged from disk, check their block scales on first use (`check_first_use`,
        which the caller must run before any kernel reads an expert: _cpu_forward does) instead of at load."""
        from .. import placement
        if expert_format is not None and expert_format != "native" and expert_format not in FORMATS:
            raise ValueError(f"expert_format={expert_format!r}: expected one of {', '.join(FORMATS)} or 'native'")
        budget, source = placement.resolve_ram_budget(ram_budget)
        room = budget - placement.RAM_RESERVE - ram_used
        gguf = hasattr(ckpt, "expert_blocks")
        native = {layer: gguf and expert_format in (None, "native", *_native_names(ckpt, layer)) for layer in cfg.moe_layers}
        held = stored = 0   # bytes of every layer's experts as held (repacked / quantized) and in the file's layout
        for layer in cfg.moe_layers:
            if native[layer]:
                h, st = _gguf_layer_nbytes(ckpt, cfg, layer)
            else:
                h = st = _quantized_nbytes(ckpt, cfg, layer, expert_format)
            held, stored = held + h, stored + st
        fmt = placement.format_size
        where = (f"RAM budget {fmt(budget)} ({source}; {fmt(max(room, 0))} after the {fmt(placement.RAM_RESERVE)} "
                 f"reserve" + (f" and {fmt(ram_used)} of dense weights)" if ram_used else ")"))
        mode = "copy" if held <= room else "in_place" if stored <= room else "paged"
        mapped = None
        if mode != "copy":
            if not all(native.values()):
                raise placement.PlacementError(
                    f"{ckpt.path}: the routed experts quantized at load need {fmt(held)} of RAM > {where}; "
                    f"experts run from disk only mapped in place from a GGUF: convert this "
                    f"checkpoint (hybrid-k2 convert) and load the .gguf, or pass a larger ram_budget= to load "
                    f"regardless")
            if mode == "paged":
                mapped = f"experts {fmt(stored)} > {where}: mapped in place from {ckpt.path}, expect disk-bound speed"
                log.warning("%s", mapped)
            else:
                log.info("experts repacked would need %s > %s: kept in the file's layout, run in place",
                         fmt(held), where)
        layers, unchecked = {}, {}
        for layer in cfg.moe_layers:
            if native[layer] and mode == "paged" and lazy_check:
                layers[layer] = w = _gguf_layer(ckpt, layer, blocks=ckpt.expert_blocks(layer, check_scales=False))   # checked on first use
                unchecked[layer] = (ckpt.path, ckpt.expert_types(layer), np.ones(w.n_experts, bool))
                if progress is not None:
                    progress.update(cfg.n_routed_experts)
            elif native[layer]:
                w = _gguf_layer(ckpt, layer)
                layers[layer] = r = w.repacked() if mode == "copy" else w
                copied = [k for k, a, b in (("gate", w.gate_type, r.gate_type), ("up", w.up_type, r.up_type),
                                            ("down", w.down_type, r.down_type)) if a is not b]
                if copied:   # the copies replace those pages; matrices run in place keep theirs (Q4_K_M: Q6_K down)
                    ckpt.release_experts(layer, copied)
                if progress is not None:
                    progress.update(cfg.n_routed_experts)
            else:
                layers[layer] = _quantize_layer(ckpt, cfg, layer, expert_format, progress)
        return cls(layers, threads=threads, overlap=overlap, mapped=mapped, unchecked=unchecked)

    @property
    def pending_checks(self):
        """The layers with experts whose scales are still to be checked on first use."""
        return self._unchecked.keys()

    @property
    def unchecked(self) -> bool:
        """Whether some experts' scales are still to be checked on first use (experts paged from disk)."""
        return bool(self._unchecked)

    def check_first_use(self, layer: int, ids) -> None:
        """Check the block scales of the experts in `ids` (a CPU tensor or array of expert ids) that have not
        been checked yet (experts paged from disk: see the module docstring); a NaN or infinite scale is a
        CheckpointError naming the file, the tensor and the expert. Ids out of range are left to the kernels."""
        pending = self._unchecked.get(layer)
        if pending is None:
            return
        path, tensors, todo = pending
        e = np.unique(np.asarray(ids).reshape(-1))
        e = e[(e >= 0) & (e < todo.size)]
        w = self.layers[layer]
        for i in e[todo[e]].tolist():
            for kind, (name, qt) in tensors.items():
                bad = nonfinite_scales(w.blocks(kind)[i], qt)
                if bad:
                    raise CheckpointError(f"{path}: tensor {name!r} ({qtype_name(qt)}), expert {i}: {bad} block "
                                          f"scale(s) that are not finite (NaN or infinity)")
            todo[i] = False
        if not todo.any():
            del self._unchecked[layer]

    # ---- running -----------------------------------------------------------------------------
    def _cpu_forward(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        if not kernels.plain_cpu_tensors(x, ids, weights, (torch.float32, torch.int32, torch.float32)):
            x = x.detach().to("cpu", torch.float32).contiguous()     # (decode on a CPU device needs none of this)
            ids = ids.detach().to("cpu", torch.int32).contiguous()
            weights = weights.detach().to("cpu", torch.float32).contiguous()
        if self._unchecked:   # experts paged from disk whose scales are not checked yet
            self.check_first_use(layer, ids)
        return kernels.moe_forward(self.layers[layer], x, ids, weights)

    def submit(self, layer, x, ids, weights):
        if self._pool is None:
            return Ready(self._cpu_forward(layer, x, ids, weights).to(x.device, x.dtype))
        # one worker, so calls run in submission order; the kernels release the GIL meanwhile
        return Pending(self._pool.submit(self._cpu_forward, layer, x, ids, weights), x)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


def _native_names(ckpt, layer: int) -> tuple[str, ...]:
    """The format names of a GGUF layer's experts, so asking for the stored format keeps them in place."""
    kinds = {q for _, q in ckpt.expert_types(layer).values()}
    if len(kinds) != 1:
        return ()
    try:
        return (qtype_name(kinds.pop()),)
    except ValueError:
        return ()


def _gguf_types(ckpt, layer: int) -> dict[str, "kernels.QType"]:
    """{'gate' | 'up' | 'down': the kernels' type} of a GGUF layer's experts, from the header; a type the CPU
    kernels do not run is refused naming the file, the tensor and its type."""
    types = {}
    for kind, (name, q) in ckpt.expert_types(layer).items():
        try:
            stored = qtype_name(q).upper()
        except ValueError:   # a type id the gguf package does not know
            stored = f"type id {q}"
        t = kernels.QTYPES.get(stored)
        if t is None or t.name not in kernels.WEIGHT_QTYPES:
            raise CheckpointError(
                f"{ckpt.path}: tensor {name!r} is {stored}, which the CPU expert kernels do not run "
                f"(they run {', '.join(n for n in kernels.WEIGHT_QTYPES if '_R' not in n)}); pass expert_format= "
                f"one of {', '.join(FORMATS)} to requantize at load, or use a GGUF with those expert types")
        types[kind] = t
    return types


def _gguf_layer(ckpt, layer: int, blocks=None) -> kernels.ExpertWeights:
    types = _gguf_types(ckpt, layer)
    blocks = ckpt.expert_blocks(layer) if blocks is None else blocks
    return kernels.ExpertWeights(blocks["gate"][0], blocks["up"][0], blocks["down"][0], types["gate"],
                                 types["up"], types["down"])


def _gguf_layer_nbytes(ckpt, cfg, layer: int) -> tuple[int, int]:
    """(bytes as ExpertWeights.repacked() holds them, bytes in the file's layout) of a GGUF layer's experts, from
    the header alone."""
    types = _gguf_types(ckpt, layer)
    E, I, H = cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.hidden_size
    mats = (("gate", I, H), ("up", I, H), ("down", H, I))
    to = {kind: kernels.repacked_type(types[kind], rows) for kind, rows, _ in mats}
    if to["gate"].row_group != to["up"].row_group:   # as repacked(): gate and up then stay as stored
        to["gate"], to["up"] = types["gate"], types["up"]
    held = sum(rows * to[kind].row_bytes(cols) for kind, rows, cols in mats)
    stored = sum(rows * types[kind].row_bytes(cols) for kind, rows, cols in mats)
    return E * held, E * stored


def _quant_layout(ckpt, cfg, layer: int, fmt: str | None):
    """(format name, the kernels' type, the layout it is held in, lossless INT4) of a layer quantized at load."""
    I, H = cfg.moe_intermediate_size, cfg.hidden_size
    names0 = expert_names(layer, 0)
    int4 = all(ckpt.format(n) == "int4_group" for n in names0) if hasattr(ckpt, "format") else False
    if fmt in (None, "native"):
        fmt = "q4_0" if int4 else "q8_0"
    qt = kernels.qtype(FORMATS[fmt])
    layout = kernels.repacked_type(qt, I)
    if kernels.repacked_type(qt, H) is not layout:   # gate/up (I rows) and down (H rows) share one type here
        layout = qt
    return fmt, qt, layout, int4 and fmt == "q4_0"


def _quantized_nbytes(ckpt, cfg, layer: int, fmt: str | None) -> int:
    I, H = cfg.moe_intermediate_size, cfg.hidden_size
    layout = _quant_layout(ckpt, cfg, layer, fmt)[2]
    return cfg.n_routed_experts * (2 * I * layout.row_bytes(H) + H * layout.row_bytes(I))


def _quantize_layer(ckpt, cfg, layer: int, fmt: str | None, progress) -> kernels.ExpertWeights:
    E, I, H = cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.hidden_size
    fmt, qt, layout, lossless = _quant_layout(ckpt, cfg, layer, fmt)
    gate = np.empty((E, I, layout.row_bytes(H)), np.uint8)   # (Q4_K_R8 rows are longer than Q4_K's)
    up = np.empty((E, I, layout.row_bytes(H)), np.uint8)
    down = np.empty((E, H, layout.row_bytes(I)), np.uint8)
    for e in range(E):
        for dst, name, shape in zip((gate, up, down), expert_names(layer, e), ((I, H), (I, H), (H, I))):
            iw = ckpt.get_int4(name) if lossless else None
            if iw is not None and iw.group_size == 32 and tuple(iw.q.shape) == shape:
                blocks = int4_to_q4_0(iw.q.numpy(), iw.scale.numpy())[0]   # same nibbles, same scales
            else:
                blocks = kernels.quantize(fetch(ckpt, name, shape).numpy(), qt.name)
            if layout is qt:
                dst[e] = blocks
            else:
                kernels.repack(blocks, qt.name, out=dst[e])
        if progress is not None:
            progress.update(1)
    return kernels.ExpertWeights(gate, up, down, layout.name)

