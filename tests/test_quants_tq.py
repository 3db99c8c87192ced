"""TQ1_0 / TQ2_0 (csrc/quants_tq*.c): the quantizers byte for byte against gguf.quants.quantize, the dequantizers on
every byte value of the packed trit fields (gguf decodes them with uint8 arithmetic, also the bytes 243..255 no
quantizer writes), and the dot kernels of every ISA variant on edge blocks (one block per row, 1..4 tokens, zero and
extreme scales) against a float64 reference."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as GQT

from hybrid_k2 import kernels as K
from test_block_types import act_roundtrip, relerr

pytestmark = pytest.mark.usefixtures("kernel_defaults")   # conftest: variants, simde_lib

TQ = ("TQ1_0", "TQ2_0")
D_OFFSET = {"TQ1_0": 52, "TQ2_0": 64}  # byte offset of the fp16 d in a block


def edge_rows(rng, n_rows: int, cols: int) -> np.ndarray:
    """float32 rows whose 256-blocks cover the quantizer's corners: zero blocks, a single nonzero, exact
    ties x = +-max/2, values already ternary, tiny and huge (fp16-overflowing) maxima, random."""
    x = rng.standard_normal((n_rows, cols)).astype(np.float32)
    b = x.reshape(-1, 256)
    b[0] = 0.0
    b[1] = 0.0
    b[1, 17] = -3.5
    b[2] = rng.choice(np.float32([-1.0, -0.5, 0.0, 0.5, 1.0]), 256)
    b[2, 0] = 1.0
    b[3] = rng.choice(np.float32([-0.25, 0.0, 0.25]), 256)
    b[4] *= np.float32(1e-30)
    b[5] *= np.float32(1e5)
    b[6] *= np.float32(6e4 / np.abs(b[6]).max())
    b[7, ::2] = 0.0
    return x


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")  # the 1e5 block's d is inf in fp16, in both
@pytest.mark.parametrize("qt", TQ)
def test_quantize_equals_gguf(qt):
    rng = np.random.default_rng(3)
    x = edge_rows(rng, 6, 512)
    ours = K.quantize(x, qt)
    ref = gguf.quants.quantize(x, GQT[qt])
    assert ours.shape == ref.shape
    bad = np.nonzero((ours != ref).any(axis=-1))
    assert np.array_equal(ours, ref), f"{qt}: rows {bad} differ from gguf.quants.quantize"


@pytest.mark.parametrize("qt", TQ)
def test_dequantize_every_byte_value(qt):
    """block v holds byte (v + i) % 256 at packed byte i, so every field position sees all 256 values"""
    t = K.QTYPES[qt]
    v = np.arange(256)[:, None]
    blocks = ((v + np.arange(t.block_bytes)[None, :]) % 256).astype(np.uint8)
    d = D_OFFSET[qt]
    blocks[:, d:d + 2] = np.full(256, 1.5, np.float16).view(np.uint8).reshape(256, 2)
    out = K.dequantize(blocks.reshape(1, -1), qt, (1, 256 * 256))
    ref = gguf.quants.dequantize(blocks, GQT[qt]).astype(np.float32).reshape(1, -1)
    assert np.array_equal(out.view(np.uint32), ref.view(np.uint32)), f"{qt}: dequantize differs from gguf"
    # TQ2_0's fourth code (3) is q = 2: gguf decodes it so
    assert set(np.unique(out)) == ({-1.5, 0.0, 1.5} if qt == "TQ1_0" else {-1.5, 0.0, 1.5, 3.0})


@pytest.mark.parametrize("qt", TQ)
def test_round_trip(qt):
    rng = np.random.default_rng(5)
    # values already of the form d * {-1, 0, 1} (d an fp16 value) come back exactly
    d = np.float16(rng.uniform(0.01, 4.0, size=(8, 1))).astype(np.float32)
    tern = rng.integers(-1, 2, size=(8, 256)).astype(np.float32)
    tern[:, 0] = 1.0
    x = (d * tern).reshape(2, 1024)
    y = K.dequantize(K.quantize(x, qt), qt, x.shape)
    assert np.array_equal(y, x), f"{qt}: ternary values did not survive the round trip"
    # any values: each within half the block's max (the ternary step) of the original
    x = rng.standard_normal((4, 1024)).astype(np.float32)
    y = K.dequantize(K.quantize(x, qt), qt, x.shape)
    amax = np.abs(x.reshape(-1, 256)).max(axis=-1, keepdims=True)
    err = np.abs((y - x).reshape(-1, 256))
    assert (err <= amax * (0.5 + 1e-3)).all(), f"{qt}: round-trip error above half the block max"


def edge_blocks(rng, qt: str, rows: int) -> np.ndarray:
    """[rows, one block] of random bytes with these scales: 0, the fp16 maximum, tiny, ordinary"""
    t = K.QTYPES[qt]
    b = rng.integers(0, 256, size=(rows, t.block_bytes), dtype=np.uint8)
    scales = np.float16(rng.uniform(0.5, 2.0, size=rows) * 1e-2)
    scales[0], scales[1], scales[2] = 0.0, 65504.0, 6e-5
    b[:, D_OFFSET[qt]:D_OFFSET[qt] + 2] = scales.view(np.uint8).reshape(rows, 2)
    b[3, :D_OFFSET[qt]] = 255  # bytes no quantizer writes: decoded as gguf does
    return b


@pytest.mark.parametrize("qt", TQ)
def test_dot_one_block_rows_every_variant(variants, qt):
    rng = np.random.default_rng(9)
    blocks = edge_blocks(rng, qt, 13)
    w = gguf.quants.dequantize(blocks, GQT[qt]).astype(np.float64)
    assert np.abs(w[1]).max() >= 65504.0
    for T in (1, 2, 3, 4, 5):
        x = rng.standard_normal((T, 256)).astype(np.float32)
        x[0, :7] = 0.0
        xq = act_roundtrip(x, 256)
        ref = xq @ w.T
        # float error relative to each output's sum of |products|, so tiny-scale rows and cancellations count too
        tol = 1e-5 * (np.abs(xq) @ np.abs(w).T) + 1e-30
        for label, lib, isa in variants:
            lib.set_isa(isa)
            y = lib.linear(blocks, qt, x)
            assert np.all(y[:, 0] == 0.0), f"{qt} {label}: a zero-scale row must give 0"
            assert (np.abs(y - ref) <= tol).all(), f"{qt} {label} T={T}: max error {relerr(y, ref):.2e}"


@pytest.mark.parametrize("qt", TQ)
def test_dot_of_quantized_weights(variants, qt):
    """the whole path on weights our quantizer made (many blocks per row)"""
    rng = np.random.default_rng(17)
    blocks = K.quantize(rng.standard_normal((19, 2048)).astype(np.float32), qt)
    w = gguf.quants.dequantize(blocks, GQT[qt]).astype(np.float64)
    x = rng.standard_normal((4, 2048)).astype(np.float32)
    ref = act_roundtrip(x, 256) @ w.T
    for label, lib, isa in variants:
        lib.set_isa(isa)
        assert relerr(lib.linear(blocks, qt, x), ref) <= 1e-5, f"{qt} {label}"
