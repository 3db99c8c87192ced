"""IQ4_NL and IQ4_XS (csrc/quants_iq4*.c) beyond the table-driven tests/test_block_types.py: the format's
value table against the gguf package's, our quantizers (gguf has none for these) by round-trip error
bounds and exact reproduction of representable blocks, and the dot kernels of every ISA variant on block
counts that leave the SIMD kernels' tails, on extreme scales and on each activation row count 1..4."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as GQT

from hybrid_k2 import kernels as K
from test_block_types import act_roundtrip, random_blocks, relerr

pytestmark = pytest.mark.usefixtures("kernel_defaults")   # conftest: variants, simde_lib

TYPES = ("IQ4_NL", "IQ4_XS")
ACT_QB = {"IQ4_NL": 32, "IQ4_XS": 256}
TABLE = np.array(gguf.quants.IQ4_NL.kvalues, np.float32)  # the format's 16 levels, from the gguf package


def xs_block(d: float, ls: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """One IQ4_XS block: fp16 d, the eight sub-block scales ls (-32..31) and 256 table indices."""
    u = (np.asarray(ls) + 32).astype(np.uint16)
    sh = np.uint16(sum(int(u[i] >> 4) << (2 * i) for i in range(8)))
    sl = (u[0::2] & 0xF | (u[1::2] & 0xF) << 4).astype(np.uint8)
    q = idx.reshape(8, 2, 16).astype(np.uint8)
    qs = (q[:, 0] | q[:, 1] << 4).reshape(-1)
    return np.concatenate([np.float16(d).reshape(1).view(np.uint8), sh.reshape(1).view(np.uint8), sl, qs])


def test_the_value_table_is_the_formats():
    """Index k of a block with d = 1 (IQ4_XS: ls - 32 = 1) dequantizes to the format's level k."""
    idx = np.tile(np.arange(16), 2)
    nl = np.concatenate([np.float16(1).reshape(1).view(np.uint8), (idx[:16] | idx[16:] << 4).astype(np.uint8)])
    assert np.array_equal(K.dequantize(nl[None], "IQ4_NL")[0], np.tile(TABLE, 2))
    xs = xs_block(1.0, np.ones(8, int), np.tile(np.arange(16), 16))
    assert np.array_equal(K.dequantize(xs[None], "IQ4_XS")[0], np.tile(TABLE, 16))
    assert np.array_equal(gguf.quants.dequantize(xs[None], GQT.IQ4_XS)[0], np.tile(TABLE, 16))


def rms_rel(y, x) -> float:
    return float(np.sqrt(np.mean((y.astype(np.float64) - x) ** 2) / np.mean(x.astype(np.float64) ** 2)))


@pytest.mark.parametrize("qt", TYPES)
def test_quantize_error_beats_q4_1(qt):
    """On Gaussian rows our IQ4 quantizers (4.5 / 4.25 bits a value) lose less than gguf's Q4_1 (5 bits)."""
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((32, 2048)) * rng.uniform(1e-3, 10, size=(32, 1))).astype(np.float32)
    q4_1 = rms_rel(gguf.quants.dequantize(gguf.quants.quantize(x, GQT.Q4_1), GQT.Q4_1), x)
    blocks = K.quantize(x, qt)
    ours = rms_rel(gguf.quants.dequantize(blocks, GQT[qt]), x)
    assert ours < q4_1, f"{qt}: relative RMS error {ours:.4f} vs Q4_1's {q4_1:.4f}"
    # no block is far off: every value within 20 % of its 32-value block's largest magnitude
    y = K.dequantize(blocks, qt).reshape(-1, 32)
    b = x.reshape(-1, 32)
    assert (np.abs(y - b).max(1) <= 0.2 * np.abs(b).max(1)).all()


@pytest.mark.parametrize("qt", TYPES)
def test_quantize_edge_blocks(qt):
    rng = np.random.default_rng(2)
    rows = np.stack([
        np.zeros(512),                                                    # all zero
        np.r_[np.zeros(256), rng.standard_normal(256)],                   # zero sub-blocks beside others
        np.full(512, -2.5),                                               # constant
        rng.standard_normal(512) * 3e-4,                                  # fp16 subnormal scales
        rng.standard_normal(512) * 5e3,                                   # large scales
        np.r_[4e3, rng.standard_normal(511) * 1e-2],                      # an outlier
    ]).astype(np.float32)
    y = K.dequantize(K.quantize(rows, qt), qt)
    assert np.isfinite(y).all()
    assert not y[0].any() and not y[1, :256].any()
    np.testing.assert_allclose(y[2], rows[2], rtol=2e-3)
    for r in range(1, 6):
        b, e = rows[r].reshape(-1, 32), (y[r] - rows[r]).reshape(-1, 32)
        lim = 0.2 * np.abs(b).max(1)
        if qt == "IQ4_XS":  # a sub-block scale rounds to a step of d = (largest scale) / 32, i.e. ~ amax / (127 * 32),
            # which moves a level-127 value by up to amax / 64 (amax of the 256-value super-block)
            lim = lim + np.repeat(np.abs(rows[r]).reshape(-1, 256).max(1), 8) / 64
        assert (np.abs(e).max(1) <= lim + 1e-12).all(), r


def test_representable_blocks_reproduce_exactly():
    """Blocks that are exactly d * level (IQ4_XS: d * ls * level) with the extreme level present come back
    bit for bit: the scale search finds the scale and nearest-level rounding the indices."""
    rng = np.random.default_rng(4)
    idx = rng.integers(0, 16, size=(6, 512))
    idx[:, ::32] = 0  # -127 in every sub-block
    d = np.float32(0.375)
    x = (d * TABLE[idx]).astype(np.float32)
    assert np.array_equal(K.dequantize(K.quantize(x, "IQ4_NL"), "IQ4_NL"), x)
    ls = rng.integers(-31, 32, size=(6, 2, 8))
    ls[:, :, 0] = -32  # the super-block's largest scale
    ls[0, 1, 3] = 0    # an all-zero sub-block
    dx = np.float32(0.25)
    xs = (dx * np.repeat(ls.reshape(6, 16), 32, axis=1) * TABLE[idx]).astype(np.float32)
    blocks = K.quantize(xs, "IQ4_XS")
    assert np.array_equal(K.dequantize(blocks, "IQ4_XS"), xs)


def gguf_dot_ref(blocks: np.ndarray, qt: str, x: np.ndarray) -> np.ndarray:
    return act_roundtrip(x, ACT_QB[qt]) @ gguf.quants.dequantize(blocks, GQT[qt]).astype(np.float64).T


@pytest.mark.parametrize("qt,nblocks", [("IQ4_NL", n) for n in (1, 2, 3, 4, 5, 7, 9)] + [("IQ4_XS", n) for n in (1, 2, 3)])
def test_dot_every_isa_on_block_counts(variants, qt, nblocks):
    rng = np.random.default_rng(200 + nblocks)
    cols = K.QTYPES[qt].block_size * nblocks
    blocks = random_blocks(rng, qt, 11, cols)
    for T in (1, 2, 3, 4, 7):  # 1..4 activation rows per dot call, and 7 = 4 + 3
        x = rng.standard_normal((T, cols)).astype(np.float32)
        ref = gguf_dot_ref(blocks, qt, x)
        for label, lib, isa in variants:
            lib.set_isa(isa)
            y = lib.linear(blocks, qt, x)
            assert relerr(y, ref) <= 1e-5, f"{qt} {label} blocks={nblocks} T={T}: {relerr(y, ref):.2e}"


@pytest.mark.parametrize("qt", TYPES)
def test_dot_extreme_blocks(variants, qt):
    """The largest integer sums the kernels form (every weight at level -127, IQ4_XS scales at -32, activations
    at +-127) next to all-zero blocks and scales near fp16's limits."""
    rng = np.random.default_rng(9)
    t = K.QTYPES[qt]
    cols, rows = 4 * 256, 5
    blocks = random_blocks(rng, qt, rows, cols).reshape(rows, -1, t.block_bytes)
    blocks[0, :, 2:] = 0                                  # IQ4_XS: ls = -32, every index 0 (-127)
    blocks[1, ::3] = 0                                    # all-zero blocks
    d = rng.choice(np.array([6e4, -6e4, 3e-7], np.float32), size=blocks.shape[:2]).astype(np.float16)
    blocks[2:, :, :2] = d[2:, :, None].view(np.uint8).reshape(rows - 2, -1, 2)
    blocks = blocks.reshape(rows, -1)
    for x in (np.ones((1, cols), np.float32), -np.ones((2, cols), np.float32),
              rng.standard_normal((4, cols)).astype(np.float32)):
        ref = gguf_dot_ref(blocks, qt, x)
        for label, lib, isa in variants:
            lib.set_isa(isa)
            y = lib.linear(blocks, qt, x)
            assert np.isfinite(y).all()
            assert relerr(y, ref) <= 1e-5, f"{qt} {label}: {relerr(y, ref):.2e}"
