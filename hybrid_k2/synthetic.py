"""Random weights for the tests and benches: GGML blocks of any weight type, and a checkpoint of any config."""
from __future__ import annotations

import zlib

import numpy as np
import torch
from gguf import GGMLQuantizationType

from . import kernels
from .checkpoint import Checkpoint
from .checkpoint.gguf import SCALE_FIELDS
from .config import ModelConfig
from .model import Transformer


class SyntheticCheckpoint(Checkpoint):
    """Random weights under the canonical names, generated per tensor on request (deterministic per name)."""

    def __init__(self, cfg: ModelConfig, seed: int = 0):
        self.path, self.cfg, self.seed = "<synthetic k2-shaped>", cfg, seed
        with torch.device("meta"):
            net = Transformer(cfg)
        self._shapes = {n: tuple(p.shape) for n, p in net.named_parameters()}
        for layer in cfg.moe_layers:
            for e in range(cfg.n_routed_experts):
                p = f"model.layers.{layer}.mlp.experts.{e}."
                I, H = cfg.moe_intermediate_size, cfg.hidden_size
                self._shapes.update({p + "gate_proj.weight": (I, H), p + "up_proj.weight": (I, H),
                                     p + "down_proj.weight": (H, I)})

    def names(self):
        return list(self._shapes)

    def __contains__(self, name):
        return name in self._shapes

    def shape(self, name):
        return self._shapes[name]

    def format(self, name):
        return "f32"

    def get(self, name, dtype=torch.float32, device="cpu"):
        g = torch.Generator().manual_seed(zlib.crc32(f"{self.seed}:{name}".encode()))
        shape = self._shapes[name]
        if name.endswith("norm.weight"):
            return torch.ones(shape, dtype=dtype)
        if name.endswith("e_score_correction_bias"):
            return torch.zeros(shape, dtype=dtype)
        return (torch.randn(shape, generator=g) * shape[-1] ** -0.5).to(dtype)


_FLOAT_DTYPES = {"F32": np.float32, "F16": np.float16}


# the kernel bench's and the block-type tests' weights (timing and the float references do not depend on the values)
def random_blocks(rng: np.random.Generator, t: kernels.QType | str, rows: int, cols: int) -> np.ndarray:
    """[rows, row_bytes] random blocks of weight type t with every fp16 scale finite, about 1e-2 (the scale
    offsets: gguf.SCALE_FIELDS); float types: values ~ N(0, 0.05) in that precision."""
    t = kernels.qtype(t)
    if t.name in kernels.REPACKED.values():   # a kernel layout: random blocks of its GGUF type, repacked
        src = next(k for k, v in kernels.REPACKED.items() if v == t.name)
        return kernels.repack(random_blocks(rng, src, rows, cols), src)
    if t.name in _FLOAT_DTYPES:
        return (rng.standard_normal((rows, cols), np.float32) * 0.05).astype(_FLOAT_DTYPES[t.name]).view(np.uint8)
    if t.name == "BF16":   # the high half of a float32
        f = rng.standard_normal((rows, cols), np.float32) * 0.05
        return (f.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
    a = rng.integers(0, 256, size=(rows, t.row_bytes(cols)), dtype=np.uint8)
    b = a.reshape(-1, t.block_bytes)
    scales = (rng.uniform(0.5, 2.0, size=(b.shape[0], 2)) * 1e-2).astype(np.float16)
    if t.name == "IQ1_M":   # its fp16 scale: the top nibbles of its four uint16 scale words (bytes 48..55)
        d = scales[:, 0].view(np.uint16)
        w = b[:, 48:56].copy().view(np.uint16)
        for i in range(4):
            w[:, i] = (w[:, i] & 0x0FFF) | (((d >> (4 * i)) & 0xF) << 12)
        b[:, 48:56] = w.view(np.uint8)
    else:
        fields = SCALE_FIELDS.get(GGMLQuantizationType[t.name])
        if fields is None:
            raise ValueError(f"random_blocks: no fp16 scale table entry for {t.name} (gguf.SCALE_FIELDS)")
        sb = scales.view(np.uint8)
        for i, off in enumerate(fields):
            b[:, off:off + 2] = sb[:, 2 * i:2 * i + 2]
    return a
