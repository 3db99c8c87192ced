"""CPU backend: routed experts as GGML blocks in RAM, run by the C kernels (hybrid_k2.kernels).

Weights come from a GGUF file or from an HF checkpoint quantized at load, one expert at a time
(compressed-tensors INT4 experts become Q4_0 without requantizing). Q4_0 and Q4_K are repacked to the kernels'
Q4_0_R8 / Q4_K_R8 layouts (8 rows interleaved; ~1.5x / ~1.3x faster kernels, as llama.cpp's CPU repack), the
file's pages released as each layer is copied; other formats run from the GGUF mapping in place.
While the kernels run (they release the GIL) the accelerator computes the shared expert.
"""
from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from .. import kernels
from ..checkpoint import CheckpointError, fetch
from ..checkpoint.gguf import qtype_name
from ..checkpoint.quantize import int4_to_q4_0
from . import ExpertBackend, block_signals, expert_names

log = logging.getLogger(__name__)

FORMATS = {n.lower(): n for n in kernels.QUANTIZE_QTYPES}


class CPUExperts(ExpertBackend):
    name = "cpu"

    def __init__(self, layers: dict[int, kernels.ExpertWeights], threads: int | None = None, overlap: bool = True):
        self.layers = layers
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
                        progress=None, overlap: bool = True) -> "CPUExperts":
        if expert_format is not None and expert_format != "native" and expert_format not in FORMATS:
            raise ValueError(f"expert_format={expert_format!r}: expected one of {', '.join(FORMATS)} or 'native'")
        layers = {}
        for layer in cfg.moe_layers:
            if hasattr(ckpt, "expert_blocks") and expert_format in (None, "native", *_native_names(ckpt, layer)):
                w = _gguf_layer(ckpt, layer)
                layers[layer] = r = w.repacked()
                copied = [k for k, a, b in (("gate", w.gate_type, r.gate_type), ("up", w.up_type, r.up_type),
                                            ("down", w.down_type, r.down_type)) if a is not b]
                if copied:   # the copies replace those pages; matrices run in place keep theirs (Q4_K_M: Q6_K down)
                    ckpt.release_experts(layer, copied)
                if progress is not None:
                    progress.update(cfg.n_routed_experts)
            else:
                layers[layer] = _quantize_layer(ckpt, cfg, layer, expert_format, progress)
        return cls(layers, threads=threads, overlap=overlap)

    # ---- running -----------------------------------------------------------------------------
    def _cpu_forward(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        if not kernels.plain_cpu_tensors(x, ids, weights, (torch.float32, torch.int32, torch.float32)):
            x = x.detach().to("cpu", torch.float32).contiguous()     # (decode on a CPU device needs none of this)
            ids = ids.detach().to("cpu", torch.int32).contiguous()
            weights = weights.detach().to("cpu", torch.float32).contiguous()
        return kernels.moe_forward(self.layers[layer], x, ids, weights)

    def forward(self, layer, x, ids, weights):
        y = self._cpu_forward(layer, x, ids, weights)
        return y if y.device == x.device and y.dtype == x.dtype else y.to(x.device, x.dtype)

    def run(self, layer, x, ids, weights, shared):
        if shared is None or self._pool is None:
            return super().run(layer, x, ids, weights, shared)
        fut = self._pool.submit(self._cpu_forward, layer, x, ids, weights)   # kernels release the GIL
        s = shared(x)
        return s + fut.result().to(x.device, x.dtype)

    def submit(self, layer, x, ids, weights):
        if self._pool is None:
            return super().submit(layer, x, ids, weights)
        fut = self._pool.submit(self._cpu_forward, layer, x, ids, weights)   # one worker: runs before later calls
        return lambda: fut.result().to(x.device, x.dtype)

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


def _gguf_layer(ckpt, layer: int) -> kernels.ExpertWeights:
    types = _gguf_types(ckpt, layer)
    blocks = ckpt.expert_blocks(layer)
    return kernels.ExpertWeights(blocks["gate"][0], blocks["up"][0], blocks["down"][0], types["gate"],
                                 types["up"], types["down"])


def _quantize_layer(ckpt, cfg, layer: int, fmt: str | None, progress) -> kernels.ExpertWeights:
    E, I, H = cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.hidden_size
    names0 = expert_names(layer, 0)
    int4 = all(ckpt.format(n) == "int4_group" for n in names0) if hasattr(ckpt, "format") else False
    if fmt in (None, "native"):
        fmt = "q4_0" if int4 else "q8_0"
    qt = kernels.qtype(FORMATS[fmt])
    lossless = int4 and fmt == "q4_0"
    layout = kernels.repacked_type(qt, I)
    if kernels.repacked_type(qt, H) is not layout:   # gate/up (I rows) and down (H rows) share one type here
        layout = qt
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

