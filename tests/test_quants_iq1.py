"""IQ1_S / IQ1_M (csrc/quants_iq1*.c): the dequantizers against gguf on every byte value of every packed field (so
every grid index, delta sign and 3-bit scale), IQ1_M's fp16 d gathered from the top nibbles of its scale words, and
the dot kernels of every ISA variant on edge blocks (one block per row, 1..5 tokens, zero and extreme scales)
against a float64 reference. There is no quantizer (llama.cpp makes these files): asked for one, a clear error."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as GQT

from hybrid_k2 import kernels as K
from test_block_types import act_roundtrip, relerr

pytestmark = pytest.mark.usefixtures("kernel_defaults")   # conftest: variants, simde_lib

IQ1 = ("IQ1_S", "IQ1_M")


def set_d(blocks: np.ndarray, qt: str, d: np.ndarray) -> None:
    """write the fp16 super-block scale d (one per block): IQ1_S bytes 0..1; IQ1_M the top nibble of each of the four
    uint16 scale words at bytes 48..55 (word w holds bits 4w..4w+3 of d)"""
    h = np.asarray(d, np.float16).view(np.uint16)
    if qt == "IQ1_S":
        blocks[:, 0:2] = h.view(np.uint8).reshape(-1, 2)
        return
    w = blocks[:, 48:56].copy().view(np.uint16)
    for i in range(4):
        w[:, i] = (w[:, i] & 0x0FFF) | (((h >> (4 * i)) & 0xF) << 12)
    blocks[:, 48:56] = w.view(np.uint8)


@pytest.mark.parametrize("qt", IQ1)
def test_dequantize_every_byte_value(qt):
    """block v holds byte (v + i) % 256 at byte i: every qs byte, qh bit pattern (all 2048 grid indices, both delta
    signs) and scale bits; then the scale d of each block set to a few fp16 values"""
    t = K.QTYPES[qt]
    v = np.arange(256)[:, None]
    blocks = ((v + np.arange(t.block_bytes)[None, :]) % 256).astype(np.uint8)
    set_d(blocks, qt, np.float16([1.0, 0.375, 3.0e-3, 6.0e4])[np.arange(256) % 4])
    out = K.dequantize(blocks.reshape(1, -1), qt, (1, 256 * 256))
    ref = gguf.quants.dequantize(blocks, GQT[qt]).astype(np.float32).reshape(1, -1)
    assert np.array_equal(out.view(np.uint32), ref.view(np.uint32)), f"{qt}: dequantize differs from gguf"


def test_iq1_m_scale_is_read_from_the_nibbles():
    """each of the 16 bits of d moves the result as gguf says (a d read from one word alone would not)"""
    rng = np.random.default_rng(1)
    blocks = rng.integers(0, 256, size=(16, 56), dtype=np.uint8)
    d = (np.uint16(0x2E66) ^ (np.uint16(1) << np.arange(16, dtype=np.uint16))).view(np.float16)
    d = np.where(np.isfinite(d), d, np.float16(0.5))
    set_d(blocks, "IQ1_M", d)
    out = K.dequantize(blocks.reshape(1, -1), "IQ1_M", (1, 16 * 256)).reshape(16, 256)
    ref = gguf.quants.dequantize(blocks, GQT.IQ1_M).astype(np.float32)
    assert np.array_equal(out.view(np.uint32), ref.view(np.uint32))


@pytest.mark.parametrize("qt", IQ1)
def test_no_quantizer_is_a_clear_error(qt):
    with pytest.raises(K.KernelError, match=f"no quantizer for {qt}"):
        K.quantize(np.zeros((2, 256), np.float32), qt)


def edge_blocks(rng, qt: str, rows: int) -> np.ndarray:
    """[rows, one block] of random bytes with these scales: 0, the fp16 maximum, tiny, ordinary; row 3 all bytes 255
    but its d (the largest grid index, negative deltas and scales 7), row 4 all 0"""
    t = K.QTYPES[qt]
    b = rng.integers(0, 256, size=(rows, t.block_bytes), dtype=np.uint8)
    b[3], b[4] = 255, 0
    d = np.float16(rng.uniform(0.5, 2.0, size=rows) * 1e-2)
    d[0], d[1], d[2] = 0.0, 65504.0, 6e-5
    set_d(b, qt, d)
    return b


@pytest.mark.parametrize("qt", IQ1)
def test_dot_one_block_rows_every_variant(variants, qt):
    rng = np.random.default_rng(9)
    blocks = edge_blocks(rng, qt, 13)
    w = gguf.quants.dequantize(blocks, GQT[qt]).astype(np.float64)
    assert np.abs(w[1]).max() >= 65504.0
    for T in (1, 2, 3, 4, 5):
        x = rng.standard_normal((T, 256)).astype(np.float32)
        x[0, :7] = 0.0
        x[-1, 128:] *= 50.0  # activations at the int8 extremes (-127, 127) in half a block
        xq = act_roundtrip(x, 256)
        ref = xq @ w.T
        # float error relative to each output's sum of |products|, so tiny-scale rows and cancellations count too
        tol = 1e-5 * (np.abs(xq) @ np.abs(w).T) + 1e-30
        for label, lib, isa in variants:
            lib.set_isa(isa)
            y = lib.linear(blocks, qt, x)
            assert np.all(y[:, 0] == 0.0), f"{qt} {label}: a zero-scale row must give 0"
            assert (np.abs(y - ref) <= tol).all(), f"{qt} {label} T={T}: max error {relerr(y, ref):.2e}"
