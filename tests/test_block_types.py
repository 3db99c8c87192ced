"""Every block type of the type families (csrc/quants_*.c), one table-driven suite: dequantization byte-exact
against the gguf package, and the dot kernels (hk2_linear, hk2_moe_forward) on every ISA variant against a
float64 reference built from the gguf-dequantized weights and the activations as the kernels quantize them.

Blocks are random bytes with their fp16 scales set to small finite values, so every bit pattern of the quant
fields (grid indices, signs, packed trits) is exercised; llama.cpp's own quantizer output is tested against
llama.cpp itself in test_llama_cpp_types.py."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as GQT

from hybrid_k2 import kernels as K
from hybrid_k2.checkpoint.gguf import SCALE_FIELDS
from hybrid_k2.synthetic import random_blocks
from test_kernels import q8_k_reference

pytestmark = pytest.mark.usefixtures("kernel_defaults")   # conftest: variants, simde_lib

# activation blocks the kernels quantize x (and h) to for each weight type: llama.cpp's vec_dot_type
ACT_QB = {
    "Q2_K": 256, "Q3_K": 256, "Q5_K": 256, "Q4_1": 32, "Q5_0": 32, "Q5_1": 32, "IQ4_NL": 32, "IQ4_XS": 256,
    "IQ2_XXS": 256, "IQ2_XS": 256, "IQ2_S": 256, "IQ3_XXS": 256, "IQ3_S": 256, "IQ1_S": 256, "IQ1_M": 256,
    "TQ1_0": 256, "TQ2_0": 256, "F32": 0, "F16": 0, "BF16": 0,
}
TYPES = list(ACT_QB)

FP16_FIELDS = {qt.name: offs for qt, offs in SCALE_FIELDS.items()}   # the blocks' fp16 scales (ggml-common.h)


def dequantize_ref(blocks: np.ndarray, qt: str) -> np.ndarray:
    return gguf.quants.dequantize(blocks, GQT[qt]).astype(np.float64)


def act_roundtrip(v: np.ndarray, qb: int) -> np.ndarray:
    """Activations as the kernels see them: float (qb 0), or int8 blocks of qb values dequantized."""
    v = np.ascontiguousarray(v, dtype=np.float32)
    if qb == 0:
        return v.astype(np.float64)
    if qb == 32:
        return gguf.quants.dequantize(gguf.quants.quantize(v, GQT.Q8_0), GQT.Q8_0).astype(np.float64)
    d, q = q8_k_reference(v)
    return (q.astype(np.float32) * d[..., None]).reshape(v.shape).astype(np.float64)


def relerr(y, ref) -> float:
    return float(np.abs(np.asarray(y, np.float64) - ref).max() / np.abs(ref).max())


def test_the_python_and_c_type_tables_agree():
    for qt in TYPES:
        t = K.QTYPES[qt]
        assert (t.block_size, t.block_bytes) == gguf.GGML_QUANT_SIZES[GQT[qt]], qt
        assert K._default.lib.hk2_block_size(t.id) == t.block_size, qt
        assert K._default.lib.hk2_block_bytes(t.id) == t.block_bytes, qt


@pytest.mark.parametrize("qt", TYPES)
def test_dequantize_equals_gguf(qt):
    rng = np.random.default_rng(7)
    cols = 512
    blocks = random_blocks(rng, qt, 9, cols)
    out = K.dequantize(blocks, qt, (9, cols))
    ref = gguf.quants.dequantize(blocks, GQT[qt]).astype(np.float32)
    assert out.shape == (9, cols)
    assert np.array_equal(out.view(np.uint32), ref.view(np.uint32)), f"{qt}: dequantize differs from gguf"


@pytest.mark.parametrize("qt", TYPES)
def test_linear_matches_reference(variants, qt):
    rng = np.random.default_rng(11)
    N, Kd = 37, 768  # odd row count; three 256-blocks (24 32-blocks)
    blocks = random_blocks(rng, qt, N, Kd)
    w = dequantize_ref(blocks, qt)
    for T in (1, 3, 7, 9, 17):   # the kernels take 4 (or 8) rows per call: every tail
        x = rng.standard_normal((T, Kd)).astype(np.float32)
        ref = act_roundtrip(x, ACT_QB[qt]) @ w.T
        for label, lib, isa in variants:
            lib.set_isa(isa)
            y = lib.linear(blocks, qt, x)
            assert relerr(y, ref) <= 1e-5, f"{qt} {label} T={T}: max error {relerr(y, ref):.2e} of scale"


def moe_reference(gate, up, down, qt: str, x, ids, weights) -> np.ndarray:
    """float64 MoE on the kernels' quantized activations, h carried at ~15 bits (two 8-bit rows) as
    moe_forward does for a few tokens."""
    qb = ACT_QB[qt]
    y = np.zeros(x.shape)
    xq = act_roundtrip(x, qb)
    for e in np.unique(ids):
        t, k = np.nonzero(ids == e)
        g, u = xq[t] @ gate[e].T, xq[t] @ up[e].T
        h = (g / (1.0 + np.exp(-g)) * u).astype(np.float32)
        hq = act_roundtrip(h, qb)
        if qb:
            hq = hq + act_roundtrip((h - hq.astype(np.float32)).astype(np.float32), qb)
        np.add.at(y, t, weights[t, k][:, None] * (hq @ down[e].T))
    return y


@pytest.mark.parametrize("qt", TYPES)
def test_moe_forward_matches_reference(variants, qt):
    rng = np.random.default_rng(13)
    E, H, I, T, top_k = 5, 512, 256, 13, 3   # ~8 tokens per expert: full and partial calls of 8 rows
    raw = [np.stack([random_blocks(rng, qt, r, c) for _ in range(E)]) for r, c in ((I, H), (I, H), (H, I))]
    gate, up, down = (np.stack([dequantize_ref(m, qt) for m in r]) for r in raw)
    layer = K.ExpertWeights(*raw, qt)
    x = rng.standard_normal((T, H)).astype(np.float32)
    ids = rng.integers(0, E, size=(T, top_k)).astype(np.int32)
    weights = rng.random((T, top_k)).astype(np.float32)
    ref = moe_reference(gate, up, down, qt, x, ids, weights)
    for label, lib, isa in variants:
        lib.set_isa(isa)
        y = lib.moe_forward(layer, x, ids, weights, h_residual=True)
        # an h within float error of an 8-bit rounding boundary may round the other way: 5e-3 of the scale
        assert relerr(y, ref) <= 5e-3, f"{qt} {label}: max error {relerr(y, ref):.2e} of scale"


@pytest.mark.parametrize("qt", [q for q in TYPES if q not in ("F32", "F16", "BF16")])  # those: 1 value per block
def test_rows_not_a_multiple_of_the_block_are_refused_by_name(qt):
    t = K.QTYPES[qt]
    with pytest.raises(ValueError, match=f"{t.block_size + 16} columns is not a positive multiple of the {qt} block size"):
        t.row_bytes(t.block_size + 16)
