"""Routing traces: which experts each token chose in each MoE layer, saved as the .npz hybrid_k2.sim reads.

With `hidden=True` the trace also holds each MoE layer's router input and the routers themselves (weights,
correction bias, post-attention norm weights, grouping), which is what `python -m hybrid_k2.sim` needs to
replay the routing predictor.
"""
from __future__ import annotations

import os

import numpy as np
import torch


class RoutingRecorder:
    """Collects router output per MoE layer; `save()` writes ids int16 [tokens, moe_layers, top_k] and more."""

    def __init__(self, path: str | os.PathLike, model, hidden: bool = False):
        cfg = model.cfg
        self.path = os.fspath(path)
        self.model = model
        self.moe_layers = list(cfg.moe_layers)
        self.hidden = hidden
        self._ids: dict[int, list[np.ndarray]] = {layer: [] for layer in self.moe_layers}
        self._w: dict[int, list[np.ndarray]] = {layer: [] for layer in self.moe_layers}
        self._x: dict[int, list[np.ndarray]] = {layer: [] for layer in self.moe_layers}

    def record(self, layer: int, ids: torch.Tensor, weights: torch.Tensor, x: torch.Tensor) -> None:
        self._ids[layer].append(ids.detach().to("cpu", torch.int16).numpy())
        self._w[layer].append(weights.detach().to("cpu", torch.float32).numpy())
        if self.hidden:
            self._x[layer].append(x.detach().to("cpu", torch.float16).numpy())

    @property
    def tokens(self) -> int:
        return sum(a.shape[0] for a in self._ids[self.moe_layers[0]]) if self.moe_layers else 0

    def save(self) -> str:
        if not self.moe_layers or not self.tokens:
            raise ValueError(f"{self.path}: no routing recorded yet")
        cfg = self.model.cfg

        def stack(d):
            return np.stack([np.concatenate(d[layer]) for layer in self.moe_layers], axis=1)

        arrays = dict(ids=stack(self._ids), weights=stack(self._w), n_experts=np.int64(cfg.n_routed_experts),
                      layers=np.array(self.moe_layers, np.int16))
        if self.hidden:
            blocks = [self.model.model.layers[i] for i in self.moe_layers]
            arrays.update(
                hidden=stack(self._x),
                routers=np.stack([b.mlp.gate.weight.detach().float().cpu().numpy() for b in blocks]),
                norms=np.stack([b.post_attention_layernorm.weight.detach().float().cpu().numpy() for b in blocks]),
                n_group=np.int64(cfg.n_group), topk_group=np.int64(cfg.topk_group))
            if blocks[0].mlp.gate.has_bias:
                arrays["router_bias"] = np.stack(
                    [b.mlp.gate.e_score_correction_bias.detach().float().cpu().numpy() for b in blocks])
        tmp = self.path + ".tmp.npz"
        np.savez_compressed(tmp, **arrays)
        os.replace(tmp, self.path)
        return self.path
