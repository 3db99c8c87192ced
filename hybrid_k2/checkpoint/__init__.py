"""Checkpoint readers: one interface over HF safetensors dirs and GGUF files.

Every reader maps tensors lazily from disk and hands out one dequantised tensor at a
time under the canonical HF DeepseekV3 names (see DESIGN.md). `CheckpointError` and
`Checkpoint` are defined here, before the submodules are imported, so that the
readers (and the future `gguf.py`) can import them from the package.
"""
from __future__ import annotations

import os
from typing import NamedTuple

import torch


class CheckpointError(ValueError):
    """A checkpoint file is missing, malformed or inconsistent; the message names the file/tensor."""


class Int4Weight(NamedTuple):
    """Raw symmetric INT4 weight, lossless: w[r, c] = (q[r, c] - 8) * scale[r, c // group_size].

    `q` is uint8 [out, in] holding the unsigned nibble 0..15, i.e. exactly the nibble GGML
    Q4_0 stores (Q4_0 also decodes as (nibble - 8) * d); with group_size 32 a converter only
    regroups nibbles into Q4_0's layout and rounds `scale` to fp16 for d.
    `scale` is float32 [out, ceil(in / group_size)]; the last group may be partial.
    """
    q: torch.Tensor
    scale: torch.Tensor
    group_size: int


class Checkpoint:
    """Interface shared by HFCheckpoint and GGUFCheckpoint (names are logical/canonical)."""

    path: str

    def names(self) -> list[str]:
        raise NotImplementedError

    def __contains__(self, name: object) -> bool:
        raise NotImplementedError

    def shape(self, name: str) -> tuple[int, ...]:
        raise NotImplementedError

    def format(self, name: str) -> str:
        """'f32', 'bf16', 'f16', 'fp8_block', 'int4_group' (readers may add their own)."""
        raise NotImplementedError

    def get(self, name: str, dtype: torch.dtype = torch.float32, device="cpu") -> torch.Tensor:
        """Dequantised copy of one tensor (never a view of the file)."""
        raise NotImplementedError

    def get_int4(self, name: str) -> Int4Weight:
        raise CheckpointError(f"{self.path}: tensor {name!r} is not stored as INT4")

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __iter__(self):
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())


from .safetensors import SafetensorsFile  # noqa: E402  (needs CheckpointError above)
from .hf import HFCheckpoint  # noqa: E402


def fetch(ckpt: Checkpoint, name: str, shape: tuple[int, ...], dtype: torch.dtype = torch.float32,
          device="cpu") -> torch.Tensor:
    """`ckpt.get(name)` after checking the stored shape is the one the model expects."""
    have = tuple(ckpt.shape(name))
    if have != tuple(shape):
        raise CheckpointError(f"{ckpt.path}: tensor {name!r} has shape {list(have)}, the model expects {list(shape)}")
    return ckpt.get(name, dtype=dtype, device=device)


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """HF checkpoint dir (or single .safetensors file) -> HFCheckpoint; .gguf file -> GGUFCheckpoint."""
    path = os.fspath(path)
    if path.endswith(".gguf"):
        from .gguf import GGUFCheckpoint  # lazy: only GGUF users pay for the gguf package

        return GGUFCheckpoint(path)
    return HFCheckpoint(path)


__all__ = ["Checkpoint", "CheckpointError", "Int4Weight", "SafetensorsFile", "HFCheckpoint", "fetch",
           "open_checkpoint"]
