"""QuantLinear: an nn.Linear whose weight stays in GGML blocks and runs in the C kernels.

On a CPU-only machine decode is memory-bound, so the non-expert matrices (attention projections, dense
FFN, shared experts, lm_head) are read as Q8_0 / Q4_0 / Q4_K / Q6_K blocks (1.06 bytes/weight for Q8_0)
instead of fp32 (4 bytes/weight), exactly as llama.cpp does with the same GGUF bytes. Activations are
quantized to 8 bits on the fly (hybrid_k2.kernels.linear).

    q = QuantLinear.from_linear(nn.Linear(4096, 1024, bias=False), "q8_0")
    q = QuantLinear.from_blocks(blocks, "Q8_0", in_features=4096)   # blocks [1024, row_bytes], read in place
    y = q(x)                                                         # x [..., 4096] on the CPU

Inference only (no autograd). `.weight` dequantizes on demand for code that needs a tensor.
"""
from __future__ import annotations

import weakref
from typing import Any

import numpy as np
import torch
from torch import nn

from . import kernels


class QuantLinear(nn.Module):
    """y = x @ W.T (+ bias) with W [out_features, in_features] held as GGML blocks [out_features, row_bytes].

    `blocks` is a uint8 numpy array (a GGUF memmap view is used in place) or CPU uint8 tensor. It is not a
    parameter or buffer: `state_dict()` does not carry it and `.to(device)` does not move it (CPU only).
    `dtype` is the float dtype of the model around it: outputs and `.weight` come in it."""

    def __init__(self, in_features: int, out_features: int, qtype: Any, blocks: Any = None, *,
                 bias: torch.Tensor | None = None, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.qtype = kernels.qtype(qtype)
        if self.qtype.name not in kernels.WEIGHT_QTYPES:
            raise ValueError(f"qtype: {self.qtype.name} is not a weight type ({', '.join(kernels.WEIGHT_QTYPES)})")
        self.in_features = kernels._require_int(in_features, "in_features", 1)
        self.out_features = kernels._require_int(out_features, "out_features", 1)
        self.row_bytes = self.qtype.row_bytes(self.in_features)  # raises: in_features not a block multiple
        self.dtype = dtype
        self.blocks: np.ndarray | None = None
        self._weight_ref = None
        if bias is not None:
            if tuple(bias.shape) != (self.out_features,):
                raise ValueError(f"bias: shape {tuple(bias.shape)}, expected ({self.out_features},)")
            self.register_buffer("bias", bias.detach().to("cpu", torch.float32).clone())
        else:
            self.bias = None
        if blocks is not None:
            self.set_blocks(blocks)

    # ---- construction ----------------------------------------------------------------------------
    @classmethod
    def from_blocks(cls, blocks: Any, qtype: Any, in_features: int, *, bias: torch.Tensor | None = None,
                    dtype: torch.dtype = torch.float32) -> "QuantLinear":
        """Wrap existing blocks [out_features, row_bytes(qtype, in_features)] without copying them."""
        b = kernels._as_numpy(blocks, "blocks")
        if b.ndim != 2:
            raise ValueError(f"blocks: expected [out_features, row_bytes], got shape {b.shape}")
        return cls(in_features, b.shape[0], qtype, b, bias=bias, dtype=dtype)

    @classmethod
    def from_linear(cls, linear: nn.Linear, qtype: Any) -> "QuantLinear":
        """Quantize a float nn.Linear's weight (bias kept in float32); the result has the linear's dtype."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear: expected an nn.Linear, got {type(linear).__name__}")
        w = linear.weight.detach()
        if w.device.type == "meta":
            raise ValueError("linear: its weight is on the meta device (no values to quantize)")
        q = cls(linear.in_features, linear.out_features, qtype, bias=linear.bias, dtype=w.dtype)
        q.set_blocks(kernels.quantize(w.to("cpu", torch.float32).contiguous().numpy(), q.qtype))
        return q

    def set_blocks(self, blocks: Any) -> None:
        """Point this layer at blocks [out_features, row_bytes] (no copy), after checking them."""
        b = kernels._as_numpy(blocks, "blocks")
        kernels._check_array(b, "blocks", np.uint8, ndim=2, shape=(self.out_features, self.row_bytes))
        if b.ctypes.data % 2:
            raise ValueError("blocks: data is not 2-byte aligned (blocks hold fp16 scales)")
        self.blocks = b
        self._op = kernels.bind_linear(b, self.qtype)
        self._weight_ref = None

    # ---- use -------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bias is None and self.blocks is not None and self._op.takes(x):
            return self._op.run(x)   # decode's common case
        if self.blocks is None:
            raise RuntimeError("QuantLinear: no weights loaded yet (set_blocks)")
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x: last dimension {x.shape[-1]}, expected in_features={self.in_features}")
        if x.device.type != "cpu":
            raise ValueError(f"x: tensor is on {x.device}; QuantLinear runs in the CPU kernels")
        lead = x.shape[:-1]
        xf = x.detach().reshape(-1, self.in_features)
        if xf.dtype != torch.float32 or not xf.is_contiguous():
            xf = xf.to(torch.float32).contiguous()
        y = self._op(xf)
        if self.bias is not None:
            y += self.bias
        return y.reshape(*lead, self.out_features).to(x.dtype)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight [out_features, in_features] in `dtype`, made on demand (and shared while
        the caller keeps it alive): for code that reads a weight tensor; forward never does."""
        w = self._weight_ref() if self._weight_ref is not None else None
        if w is None:
            if self.blocks is None:
                raise RuntimeError("QuantLinear: no weights loaded yet (set_blocks)")
            w = torch.from_numpy(kernels.dequantize(self.blocks, self.qtype)).to(self.dtype)
            self._weight_ref = weakref.ref(w)
        return w

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def nbytes(self) -> int:
        return self.out_features * self.row_bytes

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, qtype={self.qtype.name}, "
                f"bias={self.bias is not None}")
