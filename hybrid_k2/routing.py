"""Routing traces: which experts each token chose in each MoE layer, saved as DESIGN.md's .npz format."""
from __future__ import annotations

import os

import numpy as np
import torch


class RoutingRecorder:
    """Collects router output per MoE layer; `save()` writes ids int16 [tokens, moe_layers, top_k] and weights."""

    def __init__(self, path: str | os.PathLike, moe_layers: list[int], top_k: int):
        self.path = os.fspath(path)
        self.moe_layers = list(moe_layers)
        self.top_k = top_k
        self._ids: dict[int, list[np.ndarray]] = {layer: [] for layer in self.moe_layers}
        self._w: dict[int, list[np.ndarray]] = {layer: [] for layer in self.moe_layers}

    def record(self, layer: int, ids: torch.Tensor, weights: torch.Tensor) -> None:
        self._ids[layer].append(ids.detach().to("cpu", torch.int16).numpy())
        self._w[layer].append(weights.detach().to("cpu", torch.float32).numpy())

    @property
    def tokens(self) -> int:
        return sum(a.shape[0] for a in self._ids[self.moe_layers[0]]) if self.moe_layers else 0

    def save(self) -> str:
        if not self.moe_layers or not self.tokens:
            raise ValueError(f"{self.path}: no routing recorded yet")
        ids = np.stack([np.concatenate(self._ids[layer]) for layer in self.moe_layers], axis=1)
        w = np.stack([np.concatenate(self._w[layer]) for layer in self.moe_layers], axis=1)
        tmp = self.path + ".tmp.npz"
        np.savez_compressed(tmp, ids=ids, weights=w, layers=np.array(self.moe_layers, np.int16))
        os.replace(tmp, self.path)
        return self.path
