"""Python API of the C expert kernels (csrc/, built by cffi as `hybrid_k2._kernels`).

Weights are GGML blocks (Q4_0, Q8_0, Q4_K, Q6_K), byte for byte as in GGUF files, so a
numpy memmap of a GGUF tensor is used in place — or Q4_0 / Q4_K repacked to our Q4_0_R8 / Q4_K_R8 layouts (8
rows interleaved per block; Q4_0_R8 the same bytes per row, Q4_K_R8 4 more per super-block for unpacked scales),
which the kernels run about 1.5x / 1.3x faster (`repack`). Every argument is checked here, before any C
runs; the C side checks again and returns an error code instead of crashing.

    layer = ExpertWeights(gate, up, down, "Q4_K", down_type="Q6_K")
    y = moe_forward(layer, x, ids, weights)          # x [T,H] f32, ids [T,K], weights [T,K] f32
    y = linear(blocks, "Q8_0", x)                    # dense: blocks [N, row_bytes], x [T,K] -> [T,N]

The C calls release the GIL (cffi API mode does so for every out-of-line call), so the
experts can run on the CPU while Python keeps feeding the accelerator.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

try:
    import torch
except ImportError:  # torch is a dependency of the engine, not of the kernels
    torch = None

__all__ = [
    "QType", "QTYPES", "WEIGHT_QTYPES", "qtype", "ExpertWeights", "KernelLib", "KernelError",
    "quantize", "quantize_activations", "dequantize", "repack", "moe_forward", "linear", "bind_linear", "BoundLinear", "set_threads", "get_threads", "isa", "set_isa",
    "isa_supported", "read_probe",
]


@dataclass(frozen=True)
class QType:
    name: str
    id: int              # GGML type id (gguf.GGMLQuantizationType value)
    block_size: int      # values per block
    block_bytes: int     # bytes per block
    row_group: int = 1   # rows stored interleaved (the _R8 layouts: 8); row counts must be multiples of it

    def row_bytes(self, ncols: int) -> int:
        if ncols <= 0 or ncols % self.block_size:
            raise ValueError(f"{ncols} columns is not a positive multiple of the {self.name} block size {self.block_size}")
        return ncols // self.block_size * self.block_bytes


QTYPES: dict[str, QType] = {
    q.name: q for q in (
        QType("Q4_0", int(GGMLQuantizationType.Q4_0), 32, 18),
        QType("Q8_0", int(GGMLQuantizationType.Q8_0), 32, 34),
        QType("Q4_K", int(GGMLQuantizationType.Q4_K), 256, 144),
        QType("Q6_K", int(GGMLQuantizationType.Q6_K), 256, 210),
        QType("Q8_K", int(GGMLQuantizationType.Q8_K), 256, 292),  # activations of K-quant dots
        QType("Q4_0_R8", 1002, 32, 18, row_group=8),  # ours (csrc/hk2.h), not a GGUF type
        QType("Q4_K_R8", 1003, 256, 148, row_group=8),  # ours too: Q4_K's 144 bytes + unpacked scales
        QType("IQ4_XS_R8", 1004, 256, 138, row_group=8),  # ours too: IQ4_XS's 136 bytes, scales unpacked
    )
}
# The type families of csrc/quants_*.c (layouts as gguf.constants.GGML_QUANT_SIZES).
_FAMILY_TYPES = ("Q2_K", "Q3_K", "Q5_K", "Q4_1", "Q5_0", "Q5_1", "IQ4_NL", "IQ4_XS", "IQ2_XXS", "IQ2_XS", "IQ2_S",
                 "IQ3_XXS", "IQ3_S", "IQ1_S", "IQ1_M", "TQ1_0", "TQ2_0", "F32", "F16", "BF16")
for _n in _FAMILY_TYPES:
    _g = GGMLQuantizationType[_n]
    QTYPES[_n] = QType(_n, int(_g), *GGML_QUANT_SIZES[_g])
WEIGHT_QTYPES = ("Q4_0", "Q8_0", "Q4_K", "Q6_K", "Q4_0_R8", "Q4_K_R8", "IQ4_XS_R8") + _FAMILY_TYPES
# the weight types our quantizer writes (the grid IQ types: llama.cpp's quantizer only)
QUANTIZE_QTYPES = ("Q4_0", "Q8_0", "Q4_K", "Q6_K", "Q2_K", "Q3_K", "Q5_K", "Q4_1", "Q5_0", "Q5_1", "IQ4_NL", "IQ4_XS",
                   "TQ1_0", "TQ2_0", "BF16", "F16", "F32")
REPACKED = {"Q4_0": "Q4_0_R8", "Q4_K": "Q4_K_R8", "IQ4_XS": "IQ4_XS_R8"}  # GGUF type -> the kernel layout it repacks to


def repacked_type(t: QType, rows: int) -> QType:
    """The layout a matrix of `rows` rows in type t runs in: its repacked layout when rows fill its row
    groups, else t itself."""
    to = REPACKED.get(t.name)
    return QTYPES[to] if to is not None and rows % QTYPES[to].row_group == 0 else t
# moe_forward carries h at ~15 bits for calls of up to this many tokens: decode's top-1 tokens then match the
# float model's (8-bit h flips ~2% of a weakly trained model's); in prefill it would cost ~60% more time.
H_RESIDUAL_MAX_TOKENS = 16


def h_residual_default(T: int) -> bool:
    """Whether a moe_forward call of T tokens carries h at ~15 bits when not told (also CPUDecodeStep's rule)."""
    return T <= H_RESIDUAL_MAX_TOKENS
_BY_ID = {q.id: q for q in QTYPES.values()}
WEIGHT_IDS = frozenset(QTYPES[n].id for n in WEIGHT_QTYPES)


def qtype(q: str | int | GGMLQuantizationType | QType, arg: str = "qtype") -> QType:
    """Resolve a type given by name ('q4_0'), GGML id or gguf enum."""
    if isinstance(q, QType):
        return q
    if isinstance(q, str):
        t = QTYPES.get(q.upper())
    elif isinstance(q, (int, np.integer)):  # GGMLQuantizationType is an IntEnum
        t = _BY_ID.get(int(q))
    else:
        raise TypeError(f"{arg}: expected a type name or GGML type id, got {type(q).__name__}")
    if t is None:
        raise ValueError(f"{arg}: unsupported block type {q!r} (supported: {', '.join(QTYPES)})")
    return t


class KernelError(RuntimeError):
    """The C side refused a call (it names the argument)."""


# ---------------------------------------------------------------- argument checks

def _as_numpy(a: Any, arg: str) -> np.ndarray:
    """A numpy view of a numpy array or CPU torch tensor (never a copy)."""
    if isinstance(a, np.ndarray):
        return a
    if torch is not None and isinstance(a, torch.Tensor):
        if a.device.type != "cpu":
            raise ValueError(f"{arg}: tensor is on {a.device}, expected a CPU tensor")
        if a.dtype == torch.bfloat16 or a.dtype == torch.float16:
            raise TypeError(f"{arg}: dtype {a.dtype} is not supported, expected float32")
        return a.detach().numpy()
    raise TypeError(f"{arg}: expected a numpy array or CPU torch tensor, got {type(a).__name__}")


def _check_array(a: np.ndarray, arg: str, dtype: np.dtype | tuple, ndim: int | None = None,
                 shape: Sequence[int | None] | None = None, writable: bool = False) -> None:
    dtypes = dtype if isinstance(dtype, tuple) else (dtype,)
    if a.dtype not in [np.dtype(d) for d in dtypes]:
        raise TypeError(f"{arg}: dtype {a.dtype}, expected {' or '.join(str(np.dtype(d)) for d in dtypes)}")
    if ndim is not None and a.ndim != ndim:
        raise ValueError(f"{arg}: expected {ndim} dimensions, got shape {a.shape}")
    if shape is not None:
        for got, want in zip(a.shape, shape):
            if want is not None and got != want:
                raise ValueError(f"{arg}: shape {a.shape}, expected {tuple('?' if s is None else s for s in shape)}")
    if not a.flags.c_contiguous:
        raise ValueError(f"{arg}: array is not C-contiguous (use np.ascontiguousarray)")
    if a.ctypes.data % a.dtype.itemsize:
        raise ValueError(f"{arg}: data is not aligned to its {a.dtype.itemsize}-byte elements")
    if writable and not a.flags.writeable:
        raise ValueError(f"{arg}: array is read-only")


def _expert_ptrs(a: Any, arg: str, n_rows: int | None, row_bytes: int | None) -> tuple[list[int], np.ndarray | list, int, int]:
    """Base address of each expert of a [E, rows, row_bytes] uint8 array (or a list of [rows, row_bytes]).

    Rows must be contiguous within an expert; experts may sit anywhere (a strided view, a list)."""
    if isinstance(a, (list, tuple)):
        if not a:
            raise ValueError(f"{arg}: empty list of experts")
        parts = [_as_numpy(p, f"{arg}[{i}]") for i, p in enumerate(a)]
        ptrs, keep = [], parts
        shape = None
        for i, p in enumerate(parts):
            _check_array(p, f"{arg}[{i}]", np.uint8, ndim=2)
            if shape is not None and p.shape != shape:
                raise ValueError(f"{arg}[{i}]: shape {p.shape} differs from {arg}[0]'s {shape}")
            shape = p.shape
            ptrs.append(p.ctypes.data)
        rows, rb = shape
    else:
        arr = _as_numpy(a, arg)
        if arr.dtype != np.uint8:
            raise TypeError(f"{arg}: dtype {arr.dtype}, expected uint8 block bytes")
        if arr.ndim != 3:
            raise ValueError(f"{arg}: expected [experts, rows, row_bytes] block bytes, got shape {arr.shape}")
        E, rows, rb = arr.shape
        if (rb > 1 and arr.strides[2] != 1) or (rows > 1 and arr.strides[1] != rb):
            raise ValueError(f"{arg}: the rows of each expert must be contiguous (strides {arr.strides})")
        ptrs = [arr.ctypes.data + e * arr.strides[0] for e in range(E)]
        keep = arr
    for i, p in enumerate(ptrs):
        if p % 2:
            raise ValueError(f"{arg}: expert {i} data is not 2-byte aligned (blocks hold fp16 scales)")
    if n_rows is not None and rows != n_rows:
        raise ValueError(f"{arg}: {rows} rows per expert, expected {n_rows}")
    if row_bytes is not None and rb != row_bytes:
        raise ValueError(f"{arg}: {rb} bytes per row, expected {row_bytes}")
    return ptrs, keep, rows, rb


def _cols_from_row_bytes(t: QType, rb: int, arg: str) -> int:
    if rb <= 0 or rb % t.block_bytes:
        raise ValueError(f"{arg}: {rb} bytes per row is not a multiple of the {t.name} block of {t.block_bytes} bytes")
    return rb // t.block_bytes * t.block_size


def _check_linear_weights(wa: np.ndarray, t: QType) -> tuple[int, int]:
    """(rows, columns) of a dense weight matrix in blocks, after checking it."""
    if t.name not in WEIGHT_QTYPES:
        raise ValueError(f"qtype: {t.name} is not a weight type ({', '.join(WEIGHT_QTYPES)})")
    _check_array(wa, "weight_blocks", np.uint8, ndim=2)
    N, rb = wa.shape
    if N == 0:
        raise ValueError("weight_blocks: no rows")
    K = _cols_from_row_bytes(t, rb, "weight_blocks")
    if N % t.row_group:
        raise ValueError(f"weight_blocks: {N} rows is not a multiple of the {t.name} row group {t.row_group}")
    if wa.ctypes.data % 2:
        raise ValueError("weight_blocks: data is not 2-byte aligned (blocks hold fp16 scales)")
    return N, K


# ---------------------------------------------------------------- weights

class ExpertWeights:
    """One layer's routed experts as GGML blocks.

    gate, up: [E, I, row_bytes(gate_type, H)] uint8 (or lists of E [I, row_bytes] arrays);
    down:     [E, H, row_bytes(down_type, I)] uint8. Numpy memmaps and CPU torch tensors are
    referenced, never copied. up_type / down_type default to gate_type.
    """

    def __init__(self, gate: Any, up: Any, down: Any, gate_type: Any, up_type: Any = None,
                 down_type: Any = None, *, hidden: int | None = None, inter: int | None = None):
        self.gate_type = qtype(gate_type, "gate_type")
        self.up_type = qtype(gate_type if up_type is None else up_type, "up_type")
        self.down_type = qtype(gate_type if down_type is None else down_type, "down_type")
        for name in ("gate_type", "up_type", "down_type"):
            if getattr(self, name).name not in WEIGHT_QTYPES:
                raise ValueError(f"{name}: {getattr(self, name).name} is not a weight type ({', '.join(WEIGHT_QTYPES)})")
        if hidden is not None:
            self.gate_type.row_bytes(hidden)  # raises if not a multiple of the block
        g_ptrs, self._gate, I, g_rb = _expert_ptrs(
            gate, "gate", inter, None if hidden is None else self.gate_type.row_bytes(hidden))
        H = _cols_from_row_bytes(self.gate_type, g_rb, "gate")
        try:
            d_rb = self.down_type.row_bytes(I)
        except ValueError as e:
            raise ValueError(f"down: inter={I} (rows of gate) is not a multiple of the {self.down_type.name} block "
                             f"size {self.down_type.block_size}") from e
        u_ptrs, self._up, _, _ = _expert_ptrs(up, "up", I, self.up_type.row_bytes(H))
        d_ptrs, self._down, _, _ = _expert_ptrs(down, "down", H, d_rb)
        if not (len(g_ptrs) == len(u_ptrs) == len(d_ptrs)):
            raise ValueError(f"gate/up/down hold {len(g_ptrs)}/{len(u_ptrs)}/{len(d_ptrs)} experts; they must agree")
        if self.gate_type.row_group != self.up_type.row_group:
            raise ValueError(f"gate ({self.gate_type.name}) and up ({self.up_type.name}) must share a row layout")
        for name, t, rows in (("gate", self.gate_type, I), ("down", self.down_type, H)):
            if rows % t.row_group:
                raise ValueError(f"{name}: {rows} rows is not a multiple of the {t.name} row group {t.row_group}")
        self.n_experts, self.hidden, self.inter = len(g_ptrs), H, I
        self._ptrs = (g_ptrs, u_ptrs, d_ptrs)
        self._c = {}  # cdata per KernelLib (the struct and the pointer arrays it points to)

    def blocks(self, kind: str):
        """The block arrays of one matrix kind ('gate', 'up' or 'down'), as given: a [E, rows, row_bytes]
        uint8 array (numpy view or CPU tensor) or a list of E [rows, row_bytes] arrays. Index [e] for expert e."""
        if kind not in ("gate", "up", "down"):
            raise ValueError(f"kind: expected 'gate', 'up' or 'down', got {kind!r}")
        return getattr(self, "_" + kind)

    @property
    def nbytes(self) -> int:
        """Weight bytes of all experts."""
        per = self.inter * (self.gate_type.row_bytes(self.hidden) + self.up_type.row_bytes(self.hidden)) \
            + self.hidden * self.down_type.row_bytes(self.inter)
        return per * self.n_experts

    def expert_nbytes(self) -> int:
        return self.nbytes // self.n_experts

    def repacked(self) -> "ExpertWeights":
        """The same experts with every matrix in a faster kernel layout (Q4_0 -> Q4_0_R8, Q4_K -> Q4_K_R8: `repacked_type`)
        copied out, one expert at a time; matrices without one are kept as they are (not copied). Returns self
        when nothing repacks."""
        mats = (("gate", self.gate_type, self.inter, self.hidden), ("up", self.up_type, self.inter, self.hidden),
                ("down", self.down_type, self.hidden, self.inter))
        to = [repacked_type(t, rows) for _, t, rows, _ in mats]
        if to[0].row_group != to[1].row_group:   # gate and up must agree: keep both as stored
            to[0], to[1] = self.gate_type, self.up_type
        if all(new is t for new, (_, t, _, _) in zip(to, mats)):
            return self
        out = []
        for new, (kind, t, rows, cols) in zip(to, mats):
            src = self.blocks(kind)
            if new is not t:
                dst = np.empty((self.n_experts, rows, new.row_bytes(cols)), np.uint8)
                for e in range(self.n_experts):
                    repack(src[e], t.name, out=dst[e])
                src = dst
            out.append(src)
        return ExpertWeights(*out, *to)

    def cstruct(self, lib: "KernelLib"):
        """The hk2_moe_layer struct for this library, made once (its pointer arrays kept alive here)."""
        c = self._c.get(id(lib))
        if c is None:
            ffi = lib.ffi
            arrays = [ffi.new("const void *[]", [ffi.cast("const void *", p) for p in ptrs]) for ptrs in self._ptrs]
            s = ffi.new("hk2_moe_layer *")
            s.n_experts, s.hidden, s.inter = self.n_experts, self.hidden, self.inter
            s.gate_type, s.up_type, s.down_type = self.gate_type.id, self.up_type.id, self.down_type.id
            s.gate, s.up, s.down = arrays
            c = self._c[id(lib)] = (s, arrays)
        return c[0]

    def __repr__(self) -> str:
        return (f"ExpertWeights(E={self.n_experts}, H={self.hidden}, I={self.inter}, "
                f"{self.gate_type.name}/{self.up_type.name}/{self.down_type.name})")


# ---------------------------------------------------------------- the library

class KernelLib:
    """The kernels of one compiled library: the cffi extension, or (tests) a shared library
    opened in ABI mode, e.g. the AVX-512 code built against SIMDe."""

    def __init__(self, ffi, lib, name: str = "hybrid_k2._kernels"):
        self.ffi, self.lib, self.name = ffi, lib, name

    @classmethod
    def open_shared(cls, path: str) -> "KernelLib":
        from cffi import FFI

        from hybrid_k2._kernels_build import cdef_text
        ffi = FFI()
        ffi.cdef(cdef_text())
        return cls(ffi, ffi.dlopen(path), name=path)

    def check(self, rc: int, what: str) -> int:
        if rc < 0:
            msg = self.ffi.string(self.lib.hk2_last_error()).decode(errors="replace") or f"error {rc}"
            raise KernelError(msg if msg.startswith(what + ":") else f"{what}: {msg}")
        return rc

    def _ptr(self, a: np.ndarray, ctype: str):
        return self.ffi.cast(ctype, a.ctypes.data)

    # ---- block formats
    def quantize(self, x: Any, qtype_: Any) -> np.ndarray:
        """float32 [..., cols] -> uint8 [..., row_bytes] GGML blocks."""
        t = qtype(qtype_)
        if t.row_group > 1:
            raise ValueError(f"qtype: {t.name} is a kernel layout; quantize to {t.name.split('_R')[0]} and repack()")
        a = _as_numpy(x, "x")
        _check_array(a, "x", np.float32)
        if a.ndim < 1:
            raise ValueError("x: expected at least one dimension")
        cols = a.shape[-1]
        rb = t.row_bytes(cols) if cols % t.block_size == 0 and cols > 0 else None
        if rb is None:
            raise ValueError(f"x: {cols} columns is not a positive multiple of the {t.name} block size {t.block_size}")
        rows = int(np.prod(a.shape[:-1], dtype=np.int64))
        out = np.empty((*a.shape[:-1], rb), dtype=np.uint8)
        self.check(self.lib.hk2_quantize(t.id, self._ptr(a, "const float *"), rows, cols, self._ptr(out, "void *")), "quantize")
        return out

    def quantize_activations(self, x: Any, qtype_: Any = "Q8_0") -> np.ndarray:
        """Activations quantized exactly as the MoE kernels do it with the active ISA, as Q8_0
        (for Q4_0/Q8_0 weights) or Q8_K (for K-quant weights) blocks [rows, row_bytes]."""
        t = qtype(qtype_)
        if t.name not in ("Q8_0", "Q8_K"):
            raise ValueError(f"qtype: {t.name} is not an activation type (Q8_0, Q8_K)")
        a = _as_numpy(x, "x")
        _check_array(a, "x", np.float32, ndim=2)
        rows, cols = a.shape
        if cols == 0 or cols % t.block_size:
            raise ValueError(f"x: {cols} columns is not a positive multiple of the {t.name} block size {t.block_size}")
        out = np.empty((rows, t.row_bytes(cols)), dtype=np.uint8)
        self.check(self.lib.hk2_quantize_act(t.id, self._ptr(a, "const float *"), rows, cols, self._ptr(out, "void *")),
                    "quantize_activations")
        return out

    def dequantize(self, blocks: Any, qtype_: Any, shape: Sequence[int] | None = None) -> np.ndarray:
        """uint8 GGML blocks -> float32 of `shape` (default: blocks' shape with the last axis in values)."""
        t = qtype(qtype_)
        b = _as_numpy(blocks, "blocks")
        _check_array(b, "blocks", np.uint8)
        if shape is None:
            if b.ndim < 1:
                raise ValueError("blocks: expected at least one dimension")
            shape = (*b.shape[:-1], _cols_from_row_bytes(t, b.shape[-1], "blocks"))
        shape = tuple(int(s) for s in shape)
        if not shape or any(s < 0 for s in shape):
            raise ValueError(f"shape: {shape} is not a valid shape")
        cols = shape[-1]
        rows = int(np.prod(shape[:-1], dtype=np.int64))
        need = rows * t.row_bytes(cols)
        if b.nbytes != need:
            raise ValueError(f"blocks: {b.nbytes} bytes, but {t.name} of shape {shape} needs {need}")
        if rows % t.row_group:
            raise ValueError(f"shape: {rows} rows is not a multiple of the {t.name} row group {t.row_group}")
        out = np.empty(shape, dtype=np.float32)
        self.check(self.lib.hk2_dequantize(t.id, self._ptr(b, "const void *"), rows, cols, self._ptr(out, "float *")), "dequantize")
        return out

    def repack(self, blocks: Any, qtype_: Any, out: Any = None) -> np.ndarray:
        """GGUF blocks [..., rows, row_bytes] -> the faster kernel layout of their type (Q4_0 -> Q4_0_R8, the
        same bytes; Q4_K -> Q4_K_R8, 148 bytes per row and super-block; IQ4_XS -> IQ4_XS_R8, 138): 8 rows interleaved per block, so rows
        must be a multiple of 8."""
        t = qtype(qtype_)
        if t.name not in REPACKED:
            raise ValueError(f"qtype: {t.name} has no repacked layout (only {', '.join(REPACKED)})")
        b = _as_numpy(blocks, "blocks")
        _check_array(b, "blocks", np.uint8)
        if b.ndim < 2:
            raise ValueError(f"blocks: expected [..., rows, row_bytes], got shape {b.shape}")
        cols = _cols_from_row_bytes(t, b.shape[-1], "blocks")
        rows = int(np.prod(b.shape[:-1], dtype=np.int64))
        to = QTYPES[REPACKED[t.name]]
        if b.shape[-2] % to.row_group:
            raise ValueError(f"blocks: {b.shape[-2]} rows is not a multiple of {to.row_group}")
        shape = b.shape[:-1] + (to.row_bytes(cols),)
        if out is None:
            out = np.empty(shape, np.uint8)
        o = _as_numpy(out, "out")
        _check_array(o, "out", np.uint8, shape=shape, writable=True)
        if o.shape != shape:
            raise ValueError(f"out: shape {o.shape}, expected {shape}")
        if np.may_share_memory(o, b):
            raise ValueError("out: overlaps blocks")
        fn = {"Q4_0": self.lib.hk2_repack_q4_0_r8, "Q4_K": self.lib.hk2_repack_q4_K_r8,
              "IQ4_XS": self.lib.hk2_repack_iq4_xs_r8}[t.name]
        self.check(fn(self._ptr(b, "const void *"), rows, cols, self._ptr(o, "void *")), "repack")
        return out

    # ---- MoE
    def moe_forward(self, layer: ExpertWeights, x: Any, ids: Any, weights: Any, out: Any = None, *,
                    h_residual: bool | None = None):
        """y[t] = sum_k weights[t,k] * down_e(silu(gate_e(x_t)) * up_e(x_t)), e = ids[t,k].

        x float32 [T,H]; ids int32/int64 [T,K]; weights float32 [T,K]; returns float32 [T,H]
        (a torch tensor when x is one). `out` (float32 [T,H]) is written in place if given.
        h_residual: carry h = silu(g) * u at ~15 bits (an 8-bit row plus its residual's) instead of 8; the
        default does so for calls of up to H_RESIDUAL_MAX_TOKENS tokens (decode), where it costs little."""
        if not isinstance(layer, ExpertWeights):
            raise TypeError(f"layer: expected ExpertWeights, got {type(layer).__name__}")
        if out is None and plain_cpu_tensors(x, ids, weights, (torch.float32, torch.int32, torch.float32)):
            T, K = ids.shape if ids.dim() == 2 else (-1, -1)
            if x.dim() == 2 and x.shape == (T, layer.hidden) and weights.shape == (T, K) and K >= 1:
                # the engine's decode call: what numpy conversion would check is checked here, ids by the C side
                y = torch.empty((T, layer.hidden), dtype=torch.float32)
                if h_residual is None:
                    h_residual = h_residual_default(T)
                ffi = self.ffi
                rc = self.lib.hk2_moe_forward(layer.cstruct(self), T, K, ffi.cast("const float *", x.data_ptr()),
                                              ffi.cast("const int32_t *", ids.data_ptr()),
                                              ffi.cast("const float *", weights.data_ptr()), ffi.cast("float *", y.data_ptr()),
                                              self.lib.HK2_MOE_H_RESIDUAL if h_residual else 0)
                if rc == self.lib.HK2_EID:   # a bad id: the same ValueError as the checked path's
                    raise ValueError(self.ffi.string(self.lib.hk2_last_error()).decode(errors="replace"))
                self.check(rc, "moe_forward")
                return y
        x_is_torch = torch is not None and isinstance(x, torch.Tensor)
        xa = _as_numpy(x, "x")
        _check_array(xa, "x", np.float32, ndim=2, shape=(None, layer.hidden))
        T = xa.shape[0]
        ia = _as_numpy(ids, "ids")
        if ia.dtype == np.int64 or (ia.dtype != np.int32 and np.issubdtype(ia.dtype, np.integer)):
            if ia.ndim == 2 and ia.size and (ia.min() < np.iinfo(np.int32).min or ia.max() > np.iinfo(np.int32).max):
                raise ValueError("ids: values do not fit int32")
            ia = np.ascontiguousarray(ia, dtype=np.int32)  # small [T,K]; the only copy we make
        _check_array(ia, "ids", np.int32, ndim=2, shape=(T, None))
        K = ia.shape[1]
        if K < 1:
            raise ValueError("ids: top_k must be at least 1")
        wa = _as_numpy(weights, "weights")
        _check_array(wa, "weights", np.float32, ndim=2, shape=(T, K))
        if ia.size:
            lo, hi = int(ia.min()), int(ia.max())
            if lo < 0 or hi >= layer.n_experts:
                bad = np.argwhere((ia < 0) | (ia >= layer.n_experts))[0]
                raise ValueError(f"ids[{bad[0]}, {bad[1]}] = {ia[tuple(bad)]} is not an expert id in [0, {layer.n_experts})")
        if out is None:
            oa = np.empty((T, layer.hidden), dtype=np.float32)
            result = torch.from_numpy(oa) if x_is_torch else oa
        else:
            oa = _as_numpy(out, "out")
            _check_array(oa, "out", np.float32, ndim=2, shape=(T, layer.hidden), writable=True)
            result = out
        if h_residual is None:
            h_residual = h_residual_default(T)
        rc = self.lib.hk2_moe_forward(layer.cstruct(self), T, K, self._ptr(xa, "const float *"),
                                      self._ptr(ia, "const int32_t *"), self._ptr(wa, "const float *"),
                                      self._ptr(oa, "float *"), self.lib.HK2_MOE_H_RESIDUAL if h_residual else 0)
        self.check(rc, "moe_forward")
        return result

    # ---- dense
    def linear(self, weight_blocks: Any, qtype_: Any, x: Any, out: Any = None):
        """y[t, n] = sum_k W[n, k] * x[t, k], W given as GGML blocks.

        weight_blocks uint8 [N, row_bytes(qtype, K)] (numpy, memmap or CPU tensor, read in place);
        x float32 [T, K]; returns float32 [T, N] (a torch tensor when x is one). x is quantized to
        8 bits on the fly, as for the experts. `out` (float32 [T, N]) is written in place if given."""
        t = qtype(qtype_)
        wa = _as_numpy(weight_blocks, "weight_blocks")
        N, K = _check_linear_weights(wa, t)
        x_is_torch = torch is not None and isinstance(x, torch.Tensor)
        xa = _as_numpy(x, "x")
        if xa.ndim == 2 and xa.shape[1] != K:
            raise ValueError(f"x: shape {xa.shape}, but the {t.name} weight rows hold {K} values")
        _check_array(xa, "x", np.float32, ndim=2, shape=(None, K))
        T = xa.shape[0]
        if out is None:
            oa = np.empty((T, N), dtype=np.float32)
            result = torch.from_numpy(oa) if x_is_torch else oa
        else:
            oa = _as_numpy(out, "out")
            _check_array(oa, "out", np.float32, ndim=2, shape=(T, N), writable=True)
            if np.may_share_memory(oa, xa):
                raise ValueError("out: overlaps x")
            result = out
        rc = self.lib.hk2_linear(t.id, self._ptr(wa, "const void *"), N, K, T, self._ptr(xa, "const float *"),
                                 self._ptr(oa, "float *"))
        self.check(rc, "linear")
        return result

    def bind_linear(self, weight_blocks: Any, qtype_: Any) -> "BoundLinear":
        """A weight matrix checked once, for many `linear` calls on CPU float32 torch inputs (decode calls
        it hundreds of times per token, so the per-call checks are kept to what the input can change)."""
        t = qtype(qtype_)
        wa = _as_numpy(weight_blocks, "weight_blocks")
        _check_linear_weights(wa, t)
        return BoundLinear(self, wa, t)

    def rms_norm(self, x: Any, weight: Any, eps: float):
        """y = x / sqrt(mean(x^2) + eps) * weight over the last dimension, for contiguous float32 CPU torch
        tensors x [..., n] and weight [n] (one C call: decode runs ~3 per layer per token)."""
        if not plain_cpu_tensors(x, weight, (torch.float32, torch.float32)):
            _require_cpu_f32(x, "x")
            _require_cpu_f32(weight, "weight")
        n = x.shape[-1] if x.dim() else 0
        if weight.shape != (n,):
            raise ValueError(f"weight: shape {tuple(weight.shape)}, expected ({n},) (x's last dimension)")
        y = torch.empty_like(x)
        ffi = self.ffi
        self.check(self.lib.hk2_rms_norm(ffi.cast("const float *", x.data_ptr()), ffi.cast("const float *", weight.data_ptr()),
                                          x.numel() // max(n, 1), n, eps, ffi.cast("float *", y.data_ptr())), "rms_norm")
        return y

    def router(self, weight: Any, bias: Any = None, *, top_k: int, n_group: int = 1, topk_group: int = 1,
               softmax: bool = False, norm_topk: bool = True, scaling: float = 1.0) -> "BoundRouter":
        """The MoE router (hk2_route) over float32 CPU weights: weight [n_experts, hidden] (mlp.gate.weight),
        bias [n_experts] (e_score_correction_bias) or None. The router keeps references to both."""
        _require_cpu_f32(weight, "weight")
        if bias is not None:
            _require_cpu_f32(bias, "bias")
        for name, v in (("top_k", top_k), ("n_group", n_group), ("topk_group", topk_group)):
            _require_int(v, name, 1)
        if not np.isfinite(scaling):
            raise ValueError(f"scaling: expected a finite number, got {scaling!r}")
        if weight.dim() != 2:
            raise ValueError(f"weight: expected [n_experts, hidden], got shape {tuple(weight.shape)}")
        if bias is not None and bias.shape != (weight.shape[0],):
            raise ValueError(f"bias: shape {tuple(bias.shape)}, expected ({weight.shape[0]},)")
        return BoundRouter(self, weight, bias, int(top_k), int(n_group), int(topk_group), bool(softmax),
                           bool(norm_topk), float(scaling))

    def mla_decoder(self, wkv_b: Any, kv_norm: Any, *, n_heads: int, nope: int, rope: int, v_dim: int,
                    scale: float, eps: float, kv_b_blocks=None) -> "MLADecoder":
        """The absorbed MLA attention of one decode token (hk2_mla_decode) for one layer's CPU weights:
        wkv_b = kv_b_proj.weight [n_heads * (nope + v_dim), rank] float32, kv_norm = kv_a_layernorm.weight
        [rank]. Or kv_b as GGML blocks, kv_b_blocks = ((k_b blocks, qtype), (v_b blocks, qtype)) in a GGUF's
        attn_k_b / attn_v_b layout ([n_heads * rank, row_bytes(nope)], [n_heads * v_dim, row_bytes(rank)]),
        read in place of wkv_b (then None) with the head's query and output quantized to 8 bits. The decoder
        keeps references to what it reads; see MLADecoder.__call__."""
        for name, v in (("n_heads", n_heads), ("nope", nope), ("rope", rope), ("v_dim", v_dim)):
            _require_int(v, name, 1)
        if rope % 2:
            raise ValueError(f"rope: {rope} is odd (rope dimensions come in pairs)")
        _require_cpu_f32(kv_norm, "kv_norm")
        if kv_b_blocks is None:
            _require_cpu_f32(wkv_b, "wkv_b")
            if wkv_b.dim() != 2 or wkv_b.shape[0] != n_heads * (nope + v_dim):
                raise ValueError(f"wkv_b: shape {tuple(wkv_b.shape)}, expected [n_heads * (nope + v_dim) = "
                                 f"{n_heads * (nope + v_dim)}, rank]")
        if kv_b_blocks is None:
            rank = wkv_b.shape[1]
            if tuple(kv_norm.shape) != (rank,):
                raise ValueError(f"kv_norm: shape {tuple(kv_norm.shape)}, expected ({rank},) (wkv_b's rank)")
        elif kv_norm.dim() != 1:
            raise ValueError(f"kv_norm: shape {tuple(kv_norm.shape)}, expected (rank,)")
        else:
            rank = kv_norm.shape[0]
        if kv_b_blocks is not None:
            if wkv_b is not None:
                raise ValueError("wkv_b: pass None with kv_b_blocks (the blocks are read instead)")
            mats = []
            for name, mat, rows, cols in (("k_b", kv_b_blocks[0], n_heads * rank, nope),
                                          ("v_b", kv_b_blocks[1], n_heads * v_dim, rank)):
                blocks, t = _block_matrix(mat, name)
                if blocks.shape[0] != rows or _cols_from_row_bytes(t, blocks.shape[1], name) != cols:
                    raise ValueError(f"{name}: {blocks.shape[0]} rows of {blocks.shape[1]} bytes, expected {rows} rows "
                                     f"of {cols} {t.name} values ({t.row_bytes(cols) if cols % t.block_size == 0 else '?'} bytes)")
                mats.append((blocks, t))
            kv_b_blocks = tuple(mats)
        return MLADecoder(self, wkv_b, kv_norm, int(n_heads), int(nope), int(rope), int(v_dim), float(scale), float(eps),
                          kv_b_blocks)

    def attn_decoder(self, mla: "MLADecoder", input_norm, input_eps: float, q_a_norm, q_a_eps: float,
                     q_a, q_b, kv_a, o) -> "AttnDecoder":
        """A layer's attention end to end (hk2_attn_decode): mla an MLADecoder, the norms float32 CPU tensors
        (q_a_norm None without a query LoRA), q_a / q_b / kv_a / o as (blocks [rows, row_bytes], qtype) with
        q_a None when q_b is q_proj. The C side checks the shapes fit together."""
        _require_cpu_f32(input_norm, "input_norm")
        if q_a_norm is not None:
            _require_cpu_f32(q_a_norm, "q_a_norm")
        mats = []
        for name, mat in (("q_a", q_a), ("q_b", q_b), ("kv_a", kv_a), ("o", o)):
            if mat is None and name != "q_a":
                raise ValueError(f"{name}: required")
            mats.append(None if mat is None else _block_matrix(mat, name))
        return AttnDecoder(self, mla, input_norm, float(input_eps), q_a_norm, float(q_a_eps), *mats)

    # ---- threads, ISA, probe
    def set_threads(self, n: int) -> None:
        if not isinstance(n, (int, np.integer)) or isinstance(n, bool):
            raise TypeError(f"n: expected an int, got {type(n).__name__}")
        self.check(self.lib.hk2_set_threads(int(n)), "set_threads")

    def get_threads(self) -> int:
        return int(self.lib.hk2_get_threads())

    def isa(self) -> str:
        return self.ffi.string(self.lib.hk2_isa()).decode()

    def isa_supported(self, name: str) -> bool:
        return bool(self.check(self.lib.hk2_isa_supported(name.encode()), "isa_supported"))

    def set_isa(self, name: str) -> None:
        """'scalar', 'avx2', 'avx512' (best AVX-512 variant), 'avx512bw' or 'avx512vnni'."""
        self.check(self.lib.hk2_set_isa(name.encode()), "set_isa")

    def read_probe(self, buf: np.ndarray) -> int:
        """Stream-read every byte of buf with the pool (for bandwidth measurement); returns a checksum."""
        _check_array(buf, "buf", np.uint8)
        return int(self.lib.hk2_read_probe(self._ptr(buf, "const void *"), buf.nbytes))


def plain_cpu_tensors(*args) -> bool:
    """Whether args[:-1] are contiguous CPU torch tensors of the dtypes in args[-1] (the C calls' fast paths;
    they read the data in place and track no gradient)."""
    if torch is None:
        return False
    for t, dt in zip(args[:-1], args[-1]):
        if not (isinstance(t, torch.Tensor) and t.dtype == dt and t.device.type == "cpu" and t.is_contiguous()):
            return False
    return True


def _require_int(v: Any, name: str, low: int) -> int:
    """v as an int, or a ValueError naming `name` unless v is an int (not a bool) >= low."""
    if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < low:
        raise ValueError(f"{name}: expected {'a positive int' if low == 1 else f'an int >= {low}'}, got {v!r}")
    return int(v)


def _require_cpu_f32(t: Any, name: str) -> None:
    """Raise a ValueError naming `name` unless t is a contiguous float32 CPU torch tensor."""
    if not plain_cpu_tensors(t, (torch.float32,)):
        raise ValueError(f"{name}: expected a contiguous float32 CPU tensor, got {getattr(t, 'dtype', type(t).__name__)}"
                         f"{'' if getattr(t, 'is_contiguous', lambda: True)() else ' (not contiguous)'} on "
                         f"{getattr(t, 'device', '?')}")


class BoundLinear:
    """y = x @ W.T for one weight matrix in blocks (see KernelLib.bind_linear); x a CPU float32 torch tensor
    [T, in_features] (other inputs take the checked path of KernelLib.linear)."""

    def __init__(self, lib: KernelLib, blocks: np.ndarray, t: QType):
        self.lib, self.blocks, self.qtype = lib, blocks, t
        self.out_features, self.in_features = blocks.shape[0], _cols_from_row_bytes(t, blocks.shape[1], "blocks")
        self.cweights = lib.ffi.cast("const void *", blocks.ctypes.data)

    def __call__(self, x: Any) -> Any:
        return self.run(x) if self.takes(x) else self.lib.linear(self.blocks, self.qtype, x)

    def takes(self, x: Any) -> bool:
        """Whether x goes straight to the kernel (`run`): a contiguous float32 CPU tensor [T, in_features]
        without grad."""
        return (torch is not None and isinstance(x, torch.Tensor) and x.dtype == torch.float32 and x.dim() == 2
                and x.device.type == "cpu" and x.shape[1] == self.in_features and x.is_contiguous()
                and not x.requires_grad)

    def run(self, x: Any) -> Any:
        """The kernel call for an x that `takes` accepts (not checked again)."""
        y = torch.empty((x.shape[0], self.out_features), dtype=torch.float32)
        ffi = self.lib.ffi
        rc = self.lib.lib.hk2_linear(self.qtype.id, self.cweights, self.out_features, self.in_features, x.shape[0],
                                     ffi.cast("const float *", x.data_ptr()), ffi.cast("float *", y.data_ptr()))
        self.lib.check(rc, "linear")
        return y


def _block_matrix(mat, name: str) -> tuple[np.ndarray, QType]:
    """(blocks [rows, row_bytes], qtype) as given -> checked (numpy blocks, QType)."""
    blocks, t = _as_numpy(mat[0], name), qtype(mat[1])
    _check_linear_weights(blocks, t)
    return blocks, t


def _fill_matrix(ffi, dst, mat, name: str) -> None:
    """An hk2_matrix from checked (blocks, QType), or w = NULL for None."""
    if mat is None:
        dst.w = ffi.NULL
        return
    blocks, t = mat
    dst.qtype, dst.w, dst.rows = t.id, ffi.cast("const void *", blocks.ctypes.data), blocks.shape[0]
    dst.cols = _cols_from_row_bytes(t, blocks.shape[1], name)


class _Watched:
    """Base of the bound C objects that read torch tensors in place through raw pointers: they refuse to run
    once one of those tensors has moved to new memory (`weight.data = ...` frees the old storage)."""

    def _watch(self, *tensors) -> None:
        self._watched = tensors
        self._ptrs = self._current()

    def _current(self) -> tuple:
        return tuple(None if t is None else t.data_ptr() for t in self._watched)

    def moved(self) -> bool:
        return self._ptrs != self._current()

    def _check_storage(self, names: str, maker: str) -> None:
        if self.moved():
            raise ValueError(f"{names}: moved to new memory since this was made; make a new one ({maker})")


class BoundRouter(_Watched):
    """One MoE layer's router in C (KernelLib.router): x [T, hidden] -> (ids int32 [T, top_k] best first,
    weights float32 [T, top_k])."""

    def __init__(self, lib: KernelLib, weight, bias, top_k: int, n_group: int, topk_group: int, softmax: bool,
                 norm_topk: bool, scaling: float):
        self.lib, self.weight, self.bias, self.top_k = lib, weight, bias, top_k
        r = lib.ffi.new("hk2_router *")
        r.n_experts, r.hidden, r.top_k, r.n_group, r.topk_group = weight.shape[0], weight.shape[1], top_k, n_group, topk_group
        r.softmax, r.norm_topk, r.scaling = int(softmax), int(norm_topk), scaling
        r.weight = lib.ffi.cast("const float *", weight.data_ptr())
        r.bias = lib.ffi.cast("const float *", bias.data_ptr()) if bias is not None else lib.ffi.NULL
        self.cstruct = r
        self._watch(weight, bias)

    def binds(self, weight, bias) -> bool:
        """Whether this router reads these tensors' current storage."""
        return self.weight is weight and self.bias is bias and not self.moved()

    def __call__(self, x):
        _require_cpu_f32(x, "x")
        if x.dim() != 2 or x.shape[1] != self.weight.shape[1]:
            raise ValueError(f"x: shape {tuple(x.shape)}, expected [T, {self.weight.shape[1]}]")
        self._check_storage("weight/bias", "kernels.router")
        T = x.shape[0]
        ids = torch.empty((T, self.top_k), dtype=torch.int32)
        w = torch.empty((T, self.top_k), dtype=torch.float32)
        ffi = self.lib.ffi
        self.lib.check(self.lib.lib.hk2_route(self.cstruct, T, ffi.cast("const float *", x.data_ptr()),
                                               ffi.cast("int32_t *", ids.data_ptr()), ffi.cast("float *", w.data_ptr())),
                        "route")
        return ids, w


class AttnDecoder(_Watched):
    """A layer's whole attention for one decode token in one C call (hk2_attn_decode): out = x +
    o_proj(MLA(input_norm(x))), the projections as GGML blocks. Made by KernelLib.attn_decoder."""

    def __init__(self, lib: KernelLib, mla: "MLADecoder", input_norm, input_eps: float, q_a_norm, q_a_eps: float,
                 q_a, q_b, kv_a, o):
        self.lib, self.mla = lib, mla
        # the weights it reads (kept alive while bound): norms, then each projection's blocks (None: no q_a)
        self.refs = (input_norm, q_a_norm) + tuple(None if mat is None else mat[0] for mat in (q_a, q_b, kv_a, o))
        ffi = lib.ffi
        a = ffi.new("hk2_attn *")
        a.mla = mla.cstruct[0]
        a.hidden = input_norm.shape[0]
        a.input_norm, a.input_eps = ffi.cast("const float *", input_norm.data_ptr()), input_eps
        a.q_a_norm = ffi.cast("const float *", q_a_norm.data_ptr()) if q_a_norm is not None else ffi.NULL
        a.q_a_eps = q_a_eps
        for field, mat in (("q_a", q_a), ("q_b", q_b), ("kv_a", kv_a), ("o", o)):
            _fill_matrix(ffi, getattr(a, field), mat, field)
        self.cstruct = a
        self._watch(input_norm, q_a_norm, mla.wkv_b, mla.kv_norm)   # (a.mla copied mla's pointers)

    def binds(self, *refs) -> bool:
        """Whether this decoder reads exactly these weights (input_norm, q_a_norm, then the q_a, q_b, kv_a, o
        blocks: the same objects, in the same memory)."""
        return all(a is b for a, b in zip(self.refs, refs)) and not self.moved()

    def __call__(self, x, rot, kv_cache, pe_cache, pos: int):
        """x [1, hidden] -> x + attention(x) [1, hidden]; rot, kv_cache, pe_cache, pos as for MLADecoder."""
        self._check_storage("attention weights", "kernels.attn_decoder")
        _require_cpu_f32(x, "x")
        if x.numel() != self.cstruct.hidden:
            raise ValueError(f"x: {x.numel()} values, expected hidden={self.cstruct.hidden}")
        self.mla._check_step(rot, kv_cache, pe_cache, pos)
        out = torch.empty_like(x)
        ffi = self.lib.ffi
        self.lib.check(self.lib.lib.hk2_attn_decode(self.cstruct, int(pos), ffi.cast("const float *", x.data_ptr()),
                                                     ffi.cast("const float *", rot.data_ptr()),
                                                     ffi.cast("float *", kv_cache.data_ptr()),
                                                     ffi.cast("float *", pe_cache.data_ptr()),
                                                     ffi.cast("float *", out.data_ptr())), "attn_decode")
        return out


class MLADecoder(_Watched):
    """One layer's absorbed MLA decode step (KernelLib.mla_decoder): the C kernel writes the new token's
    cache row and returns the attention output before o_proj."""

    def __init__(self, lib: KernelLib, wkv_b, kv_norm, n_heads: int, nope: int, rope: int, v_dim: int,
                 scale: float, eps: float, kv_b_blocks=None):
        # references keep the weights alive
        self.lib, self.wkv_b, self.kv_norm, self.kv_b_blocks = lib, wkv_b, kv_norm, kv_b_blocks
        self.n_heads, self.nope, self.rope, self.v_dim, self.rank = n_heads, nope, rope, v_dim, kv_norm.shape[0]
        ffi = lib.ffi
        m = ffi.new("hk2_mla *")
        m.n_heads, m.nope, m.rope, m.v_dim, m.rank = n_heads, nope, rope, v_dim, self.rank
        m.scale, m.eps = scale, eps
        m.wkv_b = ffi.cast("const float *", wkv_b.data_ptr()) if wkv_b is not None else ffi.NULL
        m.kv_norm = ffi.cast("const float *", kv_norm.data_ptr())
        for field, mat in zip(("k_b", "v_b"), kv_b_blocks or (None, None)):
            _fill_matrix(ffi, getattr(m, field), mat, field)
        self.cstruct = m
        self._watch(wkv_b, kv_norm)

    def binds(self, wkv_b, kv_norm, kv_b_blocks=None) -> bool:
        """Whether this decoder reads these weights (kv_b_blocks: the same block arrays) in their current
        storage (a parameter moved or reloaded into new memory needs a new decoder)."""
        mine = self.kv_b_blocks
        same_blocks = (mine is None and kv_b_blocks is None) or (
            mine is not None and kv_b_blocks is not None and all(a[0] is b[0] for a, b in zip(mine, kv_b_blocks)))
        return self.wkv_b is wkv_b and self.kv_norm is kv_norm and same_blocks and not self.moved()

    def _check(self, t, name: str, numel: int | None = None, rows: int | None = None, cols: int | None = None):
        _require_cpu_f32(t, name)
        if numel is not None and t.numel() != numel:
            raise ValueError(f"{name}: {t.numel()} values (shape {tuple(t.shape)}), expected {numel}")
        if cols is not None and (t.dim() != 2 or t.shape[1] != cols or t.shape[0] < rows):
            raise ValueError(f"{name}: shape {tuple(t.shape)}, expected [>= {rows}, {cols}]")

    def _check_step(self, rot, kv_cache, pe_cache, pos) -> None:
        """The per-token arguments (also AttnDecoder's): one combined test for the decode loop's case, then
        the checks that name the wrong argument."""
        _require_int(pos, "pos", 0)
        if not (plain_cpu_tensors(rot, kv_cache, pe_cache, (torch.float32,) * 3) and rot.numel() == self.rope
                and kv_cache.dim() == 2 and kv_cache.shape[1] == self.rank and kv_cache.shape[0] > pos
                and pe_cache.dim() == 2 and pe_cache.shape[1] == self.rope and pe_cache.shape[0] > pos):
            self._check(rot, "rot", self.rope)
            self._check(kv_cache, "kv_cache", rows=pos + 1, cols=self.rank)
            self._check(pe_cache, "pe_cache", rows=pos + 1, cols=self.rope)

    def __call__(self, q, kv_a, rot, kv_cache, pe_cache, pos: int):
        """q [n_heads * (nope + rope)] (rope part unrotated), kv_a [rank + rope] (kv_a_proj's output), rot
        [rope / 2, 2] cos/sin for position pos, kv_cache [>= pos + 1, rank] and pe_cache [>= pos + 1, rope]
        (row pos is written) -> o [n_heads * v_dim]. All float32 CPU tensors."""
        self._check_storage("wkv_b/kv_norm", "kernels.mla_decoder")
        if not plain_cpu_tensors(q, kv_a, (torch.float32, torch.float32)) or q.numel() != self.n_heads * (
                self.nope + self.rope) or kv_a.numel() != self.rank + self.rope:
            self._check(q, "q", self.n_heads * (self.nope + self.rope))   # say which argument is wrong
            self._check(kv_a, "kv_a", self.rank + self.rope)
        self._check_step(rot, kv_cache, pe_cache, pos)
        o = torch.empty(self.n_heads * self.v_dim, dtype=torch.float32)
        ffi = self.lib.ffi
        rc = self.lib.lib.hk2_mla_decode(self.cstruct, int(pos), ffi.cast("const float *", q.data_ptr()),
                                         ffi.cast("const float *", kv_a.data_ptr()), ffi.cast("const float *", rot.data_ptr()),
                                         ffi.cast("float *", kv_cache.data_ptr()), ffi.cast("float *", pe_cache.data_ptr()),
                                         ffi.cast("float *", o.data_ptr()))
        self.lib.check(rc, "mla_decode")
        return o


def _load_default() -> KernelLib:
    from hybrid_k2 import _kernels
    lib = KernelLib(_kernels.ffi, _kernels.lib)
    env = os.environ.get("HYBRID_K2_ISA")
    if env:  # the C side already chose it at load; refuse a name it could not honour
        try:
            ok = lib.isa_supported(env)
        except KernelError as e:
            raise RuntimeError(f"HYBRID_K2_ISA={env!r}: {e}") from None
        if not ok:
            raise RuntimeError(f"HYBRID_K2_ISA={env!r}: this CPU (or build) lacks that ISA")
    return lib


_default = _load_default()


def default_lib() -> KernelLib:
    """The library the engine runs on (the cffi extension)."""
    return _default


quantize = _default.quantize
quantize_activations = _default.quantize_activations
dequantize = _default.dequantize
repack = _default.repack
moe_forward = _default.moe_forward
linear = _default.linear
bind_linear = _default.bind_linear
mla_decoder = _default.mla_decoder
attn_decoder = _default.attn_decoder
router = _default.router
rms_norm = _default.rms_norm
set_threads = _default.set_threads
get_threads = _default.get_threads
isa = _default.isa
isa_supported = _default.isa_supported
set_isa = _default.set_isa
read_probe = _default.read_probe
