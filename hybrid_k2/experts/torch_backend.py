"""Reference backend: dequantized experts stacked per layer, torch matmuls, one expert at a time."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..checkpoint import fetch
from . import ExpertBackend, Ready, expert_names


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
        y = torch.zeros_like(x, dtype=torch.float32)
        flat = ids.reshape(-1)
        order = flat.argsort()
        counts = torch.bincount(flat, minlength=gate.shape[0]).tolist()
        tok = (order // ids.shape[1])
        w = weights.reshape(-1)[order]
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            t, we = tok[start:start + n], w[start:start + n]
            start += n
            xe = x[t]
            h = F.silu(xe @ gate[e].T) * (xe @ up[e].T)
            y.index_add_(0, t, (h @ down[e].T).float() * we[:, None].float())
        return Ready(y.to(x.dtype))
