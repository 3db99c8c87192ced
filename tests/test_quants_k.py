"""Q2_K, Q3_K, Q5_K specifics beyond tests/test_block_types.py: our quantizers (valid blocks that gguf dequantizes to
what we do, bounded round-trip error, zero and extreme-scale rows), the dot kernels at the int16 bounds of their
maddubs / madd sums (all-ones bit fields, activations at +-127), one-block rows and every na of 1..4 on every ISA
variant."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as GQT

from hybrid_k2 import kernels as K
from test_block_types import FP16_FIELDS, act_roundtrip, dequantize_ref, random_blocks, relerr

pytestmark = pytest.mark.usefixtures("kernel_defaults")   # conftest: variants, simde_lib

TYPES = ("Q2_K", "Q3_K", "Q5_K")
# relative RMS round-trip error on N(0, 1) rows (ours measure 0.281, 0.149, 0.035; llama.cpp's are of that order)
RMS_BOUND = {"Q2_K": 0.30, "Q3_K": 0.16, "Q5_K": 0.04}


def roundtrip(x: np.ndarray, qt: str) -> tuple[np.ndarray, np.ndarray]:
    blocks = K.quantize(x, qt)
    y = K.dequantize(blocks, qt, x.shape)
    ref = gguf.quants.dequantize(blocks, GQT[qt]).astype(np.float32).reshape(x.shape)
    assert np.array_equal(y.view(np.uint32), ref.view(np.uint32)), f"{qt}: our dequantize of our blocks differs from gguf"
    return blocks, y


def rel_rms(y, x) -> float:
    return float(np.sqrt(((y.astype(np.float64) - x) ** 2).mean() / (x.astype(np.float64) ** 2).mean()))


@pytest.mark.parametrize("qt", TYPES)
def test_quantize_roundtrip_error_is_bounded(qt):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((32, 2048)).astype(np.float32)
    blocks, y = roundtrip(x, qt)
    assert blocks.shape == (32, K.QTYPES[qt].row_bytes(2048))
    assert rel_rms(y, x) <= RMS_BOUND[qt], f"{qt}: relative RMS error {rel_rms(y, x):.4f}"
    # the extremes of each row survive to within a few quantization steps (no saturated or dropped scales)
    assert np.abs(y.max(axis=1) - x.max(axis=1)).max() <= 3 * RMS_BOUND[qt] * 4


@pytest.mark.parametrize("qt", TYPES)
@pytest.mark.parametrize("scale", [1e-5, 1e-2, 1e3])
def test_quantize_keeps_its_error_at_extreme_scales(qt, scale):
    rng = np.random.default_rng(2)
    x = (rng.standard_normal((4, 1024)) * scale).astype(np.float32)
    _, y = roundtrip(x, qt)
    assert np.isfinite(y).all()
    # fp16 super-block scales lose a little at 1e-5 (subnormal steps); a wrong scale path loses everything
    assert rel_rms(y, x) <= RMS_BOUND[qt] * (1.6 if scale < 1e-4 else 1.05), f"{qt} x{scale}: {rel_rms(y, x):.4f}"


@pytest.mark.parametrize("qt", TYPES)
def test_quantize_special_rows(qt):
    rng = np.random.default_rng(3)
    zero = np.zeros((1, 512), np.float32)
    _, y = roundtrip(zero, qt)
    assert not y.any(), f"{qt}: an all-zero row must dequantize to zeros"
    const = np.full((1, 256), 0.75, np.float32)  # one sign only: Q2_K / Q5_K need no min, Q3_K maps it to -4 steps
    _, y = roundtrip(const, qt)
    assert np.abs(y - const).max() <= 0.05 * 0.75, f"{qt}: constant row off by {np.abs(y - const).max()}"
    neg = -np.abs(rng.standard_normal((2, 256))).astype(np.float32)  # all negative: the min carries the row
    _, y = roundtrip(neg, qt)
    assert rel_rms(y, neg) <= RMS_BOUND[qt], f"{qt}: negative row error {rel_rms(y, neg):.4f}"
    spike = np.zeros((1, 256), np.float32)  # one outlier in a zero block: its sub-block keeps it
    spike[0, 77] = 5.0
    _, y = roundtrip(spike, qt)
    assert abs(y[0, 77] - 5.0) <= 0.05 * 5.0 and np.abs(np.delete(y, 77)).max() <= 0.05 * 5.0


def saturating_blocks(qt: str, rows: int, cols: int, fill: int) -> np.ndarray:
    """Blocks whose quant and scale bytes are all `fill` (0xFF: every q and scale at its largest; 0x00: Q3_K's
    scales at -32 and every q at -4), fp16 scales 1e-2."""
    t = K.QTYPES[qt]
    nb = rows * (cols // t.block_size)
    b = np.full((nb, t.block_bytes), fill, np.uint8)
    for off in FP16_FIELDS[qt]:
        b[:, off:off + 2] = np.array([1e-2], np.float16).view(np.uint8)
    return b.reshape(rows, -1)


@pytest.mark.parametrize("qt", TYPES)
@pytest.mark.parametrize("fill", [0xFF, 0x00, 0xAA, 0x0F])
def test_dot_at_the_int16_bounds(variants, qt, fill):
    rows, cols = 8, 512
    blocks = saturating_blocks(qt, rows, cols, fill)
    w = dequantize_ref(blocks, qt)
    # every activation quantizes to +-127 (Q8_K's largest), in runs that keep the pair sums of one sign
    x = np.stack([np.ones(cols), -np.ones(cols), np.repeat([1.0, -1.0], cols // 2), np.tile([1.0, 1.0, -1.0, -1.0], cols // 4)])
    x = x.astype(np.float32)
    ref = act_roundtrip(x, 256) @ w.T
    for label, lib, isa in variants:
        lib.set_isa(isa)
        y = lib.linear(blocks, qt, x)
        if not ref.any():  # Q2_K / Q5_K bytes 0x00: zero weights
            assert not y.any(), f"{qt} fill {fill:#x} {label}: zero weights gave {np.abs(y).max()}"
            continue
        assert relerr(y, ref) <= 1e-5, f"{qt} fill {fill:#x} {label}: max error {relerr(y, ref):.2e} of scale"


@pytest.mark.parametrize("qt", TYPES)
def test_one_block_rows_and_every_na(variants, qt):
    rng = np.random.default_rng(5)
    blocks = random_blocks(rng, qt, 9, 256)
    w = dequantize_ref(blocks, qt)
    for T in (1, 2, 3, 4, 5, 8):
        x = (rng.standard_normal((T, 256)) * rng.uniform(0.1, 10.0, size=(T, 1))).astype(np.float32)
        ref = act_roundtrip(x, 256) @ w.T
        for label, lib, isa in variants:
            lib.set_isa(isa)
            y = lib.linear(blocks, qt, x)
            assert relerr(y, ref) <= 1e-5, f"{qt} {label} T={T}: max error {relerr(y, ref):.2e} of scale"


@pytest.mark.parametrize("qt", TYPES)
def test_quantized_weights_run_through_linear(variants, qt):
    """Our quantizer's blocks are what the kernels consume: linear of them matches the float64 reference."""
    rng = np.random.default_rng(6)
    wf = rng.standard_normal((19, 1280)).astype(np.float32)
    blocks = K.quantize(wf, qt)
    w = dequantize_ref(blocks, qt)
    x = rng.standard_normal((3, 1280)).astype(np.float32)
    ref = act_roundtrip(x, 256) @ w.T
    for label, lib, isa in variants:
        lib.set_isa(isa)
        assert relerr(lib.linear(blocks, qt, x), ref) <= 1e-5, f"{qt} {label}"
