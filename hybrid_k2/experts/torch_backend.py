"""Reference backend: dequantized experts stacked per layer, torch matmuls, one expert at a time."""
from __future__ import annotations

import numpy as np
import torch

from ..checkpoint import fetch
from . import ExpertBackend, Ready, expert_names
from .swiglu import grouped_swiglu


class TorchExperts(ExpertBackend):
    name = "torch"

    def __init__(self, layers: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]):
        # layer -> (gate [E,I,H], up [E,I,H], down [E,H,I])
        self.layers = layers

    @classmethod
    def from_checkpoint(cls, ckpt, cfg, device, dtype, progress=None) -> "TorchExperts":
        E, I, H = cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.hidden_size
        layers = {}
        for layer in cfg.moe_layers:
            gate = torch.empty(E, I, H, device=device, dtype=dtype)
            up = torch.empty(E, I, H, device=device, dtype=dtype)
            down = torch.empty(E, H, I, device=device, dtype=dtype)
            for e in range(E):
                for dst, name in zip((gate, up, down), expert_names(layer, e)):
                    dst[e].copy_(fetch(ckpt, name, tuple(dst.shape[1:])))
                if progress is not None:
                    progress.update(1)
            layers[layer] = (gate, up, down)
        return cls(layers)

    def submit(self, layer, x, ids, weights):
        gate, up, down = self.layers[layer]
        flat = ids.detach().reshape(-1).cpu().numpy()
        y = grouped_swiglu(x, weights, np.arange(flat.size), flat, lambda e: (gate[e], up[e], down[e]))
        return Ready(y.to(x.dtype))
