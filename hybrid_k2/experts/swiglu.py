"""The routed experts' SwiGLU on torch tensors, batched per expert: the torch backend and the hybrid backend's
slots and prefill stages all run it."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def swiglu(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)


def grouped_swiglu(x: torch.Tensor, weights: torch.Tensor, pos: np.ndarray, key: np.ndarray, mats, after=None):
    """sum of weights[t, k] * expert(x[t]) over the (token, k) pairs at flat positions `pos` (t * K + k), float32
    [T, H]. Pairs are grouped by `key` (an expert id or a slot), one batched SwiGLU per group in key order;
    mats(key) gives a group's (gate, up, down) just before its work is queued, after(key) runs once it is (the
    prefill stages reuse their buffers there). Without `after`, one token (decode) sums its pairs in k order,
    without the gather and scatter."""
    K = weights.shape[1]
    if x.shape[0] == 1 and after is None and pos.size:
        y = None
        for p, k in zip(pos.tolist(), key.tolist()):
            o = swiglu(x, *mats(k)).float() * weights[0, p % K].float()
            y = o if y is None else y + o
        return y
    y = torch.zeros(x.shape[0], x.shape[1], device=x.device, dtype=torch.float32)
    if not pos.size:
        return y
    order = np.argsort(key, kind="stable")
    pos, key = pos[order], key[order]
    idx = torch.from_numpy(np.stack([pos // K, pos % K])).to(x.device)
    w = weights[idx[0], idx[1]].float()
    starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
    for a, b in zip(starts.tolist(), np.r_[starts[1:], len(key)].tolist()):
        k, t = int(key[a]), idx[0, a:b]
        m = mats(k)
        y.index_add_(0, t, swiglu(x.index_select(0, t), *m).float() * w[a:b, None])
        if after is not None:
            after(k)
    return y
