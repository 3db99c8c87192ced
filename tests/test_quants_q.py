"""Q4_1, Q5_0, Q5_1 (csrc/quants_q*.c) beyond the table-driven tests/test_block_types.py: the quantizers
byte for byte against gguf.quants.quantize (which rounds like ggml's reference quantizers) on ordinary and
edge blocks, and the dot kernels of every ISA variant on row lengths whose block counts leave the SIMD
kernels' tails (odd counts), on extreme scales and on each activation row count 1..4."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as GQT

from hybrid_k2 import kernels as K
from test_block_types import act_roundtrip, relerr

pytestmark = pytest.mark.usefixtures("kernel_defaults")   # conftest: variants, simde_lib

TYPES = ("Q4_1", "Q5_0", "Q5_1")


def edge_rows(rng) -> np.ndarray:
    """[rows, 256] float32: 8 blocks a row, each an edge case of the quantizers."""
    blocks = [
        np.zeros(32),                                   # all zero: d = 0, id = 0
        np.full(32, 0.75),                              # constant: max == min
        np.full(32, -3.0),
        np.r_[np.full(16, 1.0), np.full(16, -1.0)],     # |max| tie between signs (Q5_0 takes the first)
        np.r_[np.full(16, -1.0), np.full(16, 1.0)],
        np.linspace(-1, 1, 32),                         # values on exact rounding midpoints of Q4_1/Q5_1
        rng.standard_normal(32) * 1e-6,                 # scales in fp16's subnormal range
        rng.standard_normal(32) * 2e3,                  # large scales (fp16 still finite)
        np.r_[1e3, rng.standard_normal(31) * 1e-3],     # one outlier
        np.arange(32) - 15.5,
        np.where(np.arange(32) % 2, 7.0, -8.0),
    ]
    rows = np.stack(blocks).astype(np.float32).reshape(-1)
    rows = np.r_[rows, np.zeros((-len(rows)) % 256, np.float32)]
    return rows.reshape(-1, 256)


@pytest.mark.parametrize("qt", TYPES)
def test_quantize_is_byte_exact_with_gguf(qt):
    rng = np.random.default_rng(3)
    for x in (rng.standard_normal((17, 4096)).astype(np.float32),
              (rng.standard_normal((5, 512)) * rng.uniform(1e-4, 1e2, size=(5, 1))).astype(np.float32),
              rng.uniform(0, 1, size=(3, 1024)).astype(np.float32),   # one-signed blocks
              edge_rows(rng)):
        ours = K.quantize(x, qt)
        ref = gguf.quants.quantize(x, GQT[qt])
        assert ours.shape == ref.shape
        bad = np.nonzero((ours != ref).any(axis=-1))[0]
        assert bad.size == 0, f"{qt}: rows {bad[:5]} differ from gguf.quants.quantize"


@pytest.mark.parametrize("qt", TYPES)
def test_quantize_roundtrip_within_half_a_step(qt):
    """x -> blocks -> x stays within half a quantization step (plus fp16 rounding of d and m) per block; Q5_0's
    extreme maps to -16, so values near the other sign's extreme clamp at 15 and may lose a whole step."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((8, 1024)).astype(np.float32)
    y = K.dequantize(K.quantize(x, qt), qt).reshape(-1, 32)
    b = x.reshape(-1, 32)
    levels = 15 if qt == "Q4_1" else 31
    step = (b.max(1) - b.min(1)) / levels if qt != "Q5_0" else np.abs(b).max(1) / 16
    bound = (1.0 if qt == "Q5_0" else 0.5) * step * 1.01 + 1e-3 * np.abs(b).max(1)
    assert (np.abs(y - b).max(1) <= bound).all()


def gguf_dot_ref(blocks: np.ndarray, qt: str, x: np.ndarray) -> np.ndarray:
    return act_roundtrip(x, 32) @ gguf.quants.dequantize(blocks, GQT[qt]).astype(np.float64).T


@pytest.mark.parametrize("qt", TYPES)
@pytest.mark.parametrize("nblocks", [1, 2, 3, 5, 7])
def test_dot_every_isa_on_odd_block_counts(variants, qt, nblocks):
    rng = np.random.default_rng(100 + nblocks)
    cols = 32 * nblocks
    blocks = K.quantize(rng.standard_normal((9, cols)).astype(np.float32), qt)
    for T in (1, 2, 3, 4, 6):  # 1..4 activation rows per dot call, and a split 6 = 4 + 2
        x = rng.standard_normal((T, cols)).astype(np.float32)
        ref = gguf_dot_ref(blocks, qt, x)
        for label, lib, isa in variants:
            lib.set_isa(isa)
            y = lib.linear(blocks, qt, x)
            assert relerr(y, ref) <= 1e-5, f"{qt} {label} blocks={nblocks} T={T}: {relerr(y, ref):.2e}"


@pytest.mark.parametrize("qt", TYPES)
def test_dot_extreme_scales_and_zero_blocks(variants, qt):
    """Blocks of fp16 scales near 6e4 and in the subnormal range next to all-zero blocks: the integer sums
    must not wrap and the float terms must neither overflow nor vanish against the large ones."""
    rng = np.random.default_rng(21)
    t = K.QTYPES[qt]
    cols, rows = 32 * 12, 6
    b = rng.integers(0, 256, size=(rows, cols // 32, t.block_bytes), dtype=np.uint8)
    d = rng.choice(np.array([6e4, -6e4, 3e-7, 1.0], np.float32), size=(rows, cols // 32, 2)).astype(np.float16)
    nfp16 = 1 if qt == "Q5_0" else 2
    b[..., :2 * nfp16] = d[..., :nfp16].copy().view(np.uint8).reshape(rows, cols // 32, 2 * nfp16)
    b[:, ::4, :] = 0  # all-zero blocks: d = m = 0
    blocks = b.reshape(rows, -1)
    # all quants at their extreme with an all-127 activation: the largest integer sums the kernels see
    ext = blocks.copy().reshape(rows, cols // 32, t.block_bytes)
    ext[0, :, 2 * nfp16:] = 0xFF
    blocks = ext.reshape(rows, -1)
    for x in (rng.standard_normal((3, cols)).astype(np.float32), np.ones((1, cols), np.float32),
              -np.ones((2, cols), np.float32)):
        ref = gguf_dot_ref(blocks, qt, x)
        for label, lib, isa in variants:
            lib.set_isa(isa)
            y = lib.linear(blocks, qt, x)
            assert np.isfinite(y).all()
            assert relerr(y, ref) <= 1e-5, f"{qt} {label}: {relerr(y, ref):.2e}"


@pytest.mark.parametrize("qt", TYPES)
def test_all_zero_weights_give_zero(variants, qt):
    t = K.QTYPES[qt]
    blocks = np.zeros((4, t.row_bytes(96)), np.uint8)
    x = np.random.default_rng(0).standard_normal((3, 96)).astype(np.float32)
    for label, lib, isa in variants:
        lib.set_isa(isa)
        assert not lib.linear(blocks, qt, x).any(), label
