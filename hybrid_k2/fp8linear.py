"""FP8Linear: an nn.Linear whose weight stays as the checkpoint stores it, FP8 with block scales.

Kimi-K2-Instruct (DeepSeek-V3's format) stores each matrix as `weight` float8_e4m3fn [out, in] and
`weight_scale_inv` float32 [ceil(out/bo), ceil(in/bi)] (bo = bi = 128), w = fp8 * scale per block. Held that
way an accelerator keeps 1 byte per weight instead of bf16's 2, and nothing is lost: these are the file's values.

Forward dequantizes the weight a slab of rows at a time into a workspace shared by every FP8Linear on the
same device and stream, exactly as the checkpoint reader does it (HFCheckpoint.get: fp8 -> float32, times
the block's float32 scale, one rounding to the compute dtype), and multiplies. The output is therefore the
float model's matmul on `fetch`'s weights. torch's FP8 GEMM (`torch._scaled_mm`) is not used: with 128x128
weight scales it needs the activations quantized to FP8 too (1x128 blocks, a Hopper-only recipe), which
changes the numerics; the dequantizing path runs on any device, the CPU included.

    m = FP8Linear.from_checkpoint_tensors(w8, scale_inv, block=(128, 128))
    y = m(x)                                   # x [..., in] in the compute dtype, on m's device
"""
from __future__ import annotations

import math
import weakref

import torch
from torch import nn
from torch.nn import functional as F

FP8 = torch.float8_e4m3fn
SLAB_WEIGHTS = 1 << 24   # weights dequantized per step: bounds the workspace (64 MiB float32 + the compute copy)
_workspaces: dict = {}   # (device, stream, dtype) -> flat tensor, grown on demand


def _workspace(device: torch.device, dtype: torch.dtype, n: int) -> torch.Tensor:
    # Keyed by stream too: two streams sharing one buffer would overwrite each other's slab.
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device, stream, dtype)
    buf = _workspaces.get(key)
    if buf is None or buf.numel() < n:
        with torch.inference_mode(False):   # a normal tensor: written in place in and out of inference mode
            buf = _workspaces[key] = torch.empty(n, dtype=dtype, device=device)
    return buf[:n]


class FP8Linear(nn.Module):
    """y = x @ W.T with W = fp8 [out, in] * scale [ceil(out/bo), ceil(in/bi)] per bo x bi block (edge blocks partial).

    The two tensors are buffers stored as their raw bits (uint8 for the FP8 bytes, int32 for the float32
    scales): Module.to(dtype) casts every floating-point buffer, and the point is to keep the checkpoint's.
    `.to(device)` moves them. `dtype` is the model's compute dtype (`.weight` comes in it); forward computes
    in the input's dtype. Inference only (no autograd)."""

    def __init__(self, in_features: int, out_features: int, block: tuple[int, int] = (128, 128), *,
                 dtype: torch.dtype = torch.bfloat16, device=None):
        super().__init__()
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name}: expected a positive int, got {v!r}")
        block = tuple(block)
        if len(block) != 2 or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block):
            raise ValueError(f"block: expected two positive ints (rows, columns), got {block!r}")
        self.in_features, self.out_features, self.block = in_features, out_features, block
        self.dtype = dtype
        self.scale_shape = (math.ceil(out_features / block[0]), math.ceil(in_features / block[1]))
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.uint8, device=device))
        self.register_buffer("qscale", torch.zeros(self.scale_shape, dtype=torch.int32, device=device))
        # rows dequantized per slab: whole row blocks, about SLAB_WEIGHTS weights
        self.slab_rows = min(out_features, max(1, SLAB_WEIGHTS // (in_features * block[0])) * block[0])
        self._weight_ref = None

    @classmethod
    def from_checkpoint_tensors(cls, weight: torch.Tensor, scale_inv: torch.Tensor, block=(128, 128), *,
                                dtype: torch.dtype = torch.bfloat16) -> "FP8Linear":
        if weight.ndim != 2:
            raise ValueError(f"weight: expected [out_features, in_features], got shape {tuple(weight.shape)}")
        m = cls(weight.shape[1], weight.shape[0], block, dtype=dtype, device=weight.device)
        m.set_weight(weight, scale_inv)
        return m

    @property
    def weight_fp8(self) -> torch.Tensor:
        return self.qweight.view(FP8)

    @property
    def scale_inv(self) -> torch.Tensor:
        return self.qscale.view(torch.float32)

    def set_weight(self, weight: torch.Tensor, scale_inv: torch.Tensor) -> None:
        """Copy a checkpoint's FP8 weight and its block scales in (onto this module's device), after checking them."""
        if weight.dtype != FP8:
            raise ValueError(f"weight: dtype {weight.dtype}, expected {FP8}")
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"weight: shape {tuple(weight.shape)}, expected ({self.out_features}, {self.in_features})")
        if not scale_inv.is_floating_point() or tuple(scale_inv.shape) != self.scale_shape:
            raise ValueError(f"scale_inv: {scale_inv.dtype} {tuple(scale_inv.shape)}, expected a float "
                             f"{self.scale_shape} for {self.block[0]}x{self.block[1]} blocks")
        s = scale_inv.to(torch.float32)
        if not bool(torch.isfinite(s).all()):
            raise ValueError("scale_inv: holds values that are not finite")
        self.qweight.copy_(weight.view(torch.uint8))
        self.scale_inv.copy_(s)
        self._weight_ref = None

    def _apply(self, fn, recurse=True):
        self._weight_ref = None   # a .weight made before a move would be on the old device
        return super()._apply(fn, recurse)

    # ---- use -------------------------------------------------------------------------------------
    def _dequantize(self, r0: int, r1: int, dtype: torch.dtype) -> torch.Tensor:
        """Rows r0:r1 (r0 a multiple of the row block) as `dtype`, in the workspace: fetch's arithmetic."""
        bo, bi = self.block
        n, inp, dev = r1 - r0, self.in_features, self.qweight.device
        w = _workspace(dev, torch.float32, n * inp).view(n, inp)
        w.copy_(self.weight_fp8[r0:r1])
        b0 = r0 // bo
        s = self.scale_inv[b0:b0 + math.ceil(n / bo)].repeat_interleave(bi, dim=1)[:, :inp]   # [row blocks, in]
        full = n // bo
        if full:
            w[:full * bo].view(full, bo, inp).mul_(s[:full, None, :])
        if full * bo < n:   # the matrix's partial last row block
            w[full * bo:].mul_(s[full])
        if dtype == torch.float32:
            return w
        return _workspace(dev, dtype, n * inp).view(n, inp).copy_(w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x: last dimension {x.shape[-1]}, expected in_features={self.in_features}")
        if x.device != self.qweight.device:
            raise ValueError(f"x: tensor is on {x.device}, the FP8 weight on {self.qweight.device}")
        if not x.is_floating_point():
            raise ValueError(f"x: dtype {x.dtype}, expected a float dtype")
        if self.slab_rows >= self.out_features:
            return F.linear(x, self._dequantize(0, self.out_features, x.dtype))
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        y = torch.empty(x2.shape[0], self.out_features, dtype=x.dtype, device=x.device)
        for r0 in range(0, self.out_features, self.slab_rows):
            r1 = min(r0 + self.slab_rows, self.out_features)
            y[:, r0:r1] = F.linear(x2, self._dequantize(r0, r1, x.dtype))
        return y.view(*lead, self.out_features)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight [out_features, in_features] in `dtype`, made on demand (and shared while the
        caller keeps it alive): for code that reads a weight tensor; forward never does."""
        w = self._weight_ref() if self._weight_ref is not None else None
        if w is None:
            w = torch.empty(self.out_features, self.in_features, dtype=self.dtype, device=self.qweight.device)
            for r0 in range(0, self.out_features, self.slab_rows):
                r1 = min(r0 + self.slab_rows, self.out_features)
                w[r0:r1] = self._dequantize(r0, r1, self.dtype)
            self._weight_ref = weakref.ref(w)
        return w

    @property
    def nbytes(self) -> int:
        return self.qweight.numel() + 4 * self.qscale.numel()

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"block={self.block[0]}x{self.block[1]}, dtype={self.dtype}")
