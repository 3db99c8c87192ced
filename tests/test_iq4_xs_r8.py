"""IQ4_XS_R8 (csrc/quants_iq4.c): IQ4_XS with 8 rows interleaved per super-block, the layout the CPU backend
repacks IQ4_XS experts to. Repacked blocks must decode to exactly what gguf decodes from the source blocks, and
the 8-row kernels of every ISA must match the float64 reference."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as GQT

from hybrid_k2 import kernels as K
from test_block_types import act_roundtrip, dequantize_ref, moe_reference, random_blocks, relerr

pytestmark = pytest.mark.usefixtures("kernel_defaults")   # conftest: variants, simde_lib


def test_repack_then_dequantize_equals_gguf_on_the_source_blocks():
    rng = np.random.default_rng(3)
    src = random_blocks(rng, "IQ4_XS", 24, 768)
    r8 = K.repack(src, "IQ4_XS")
    assert r8.shape == (24, 3 * 138)
    assert r8.shape[-1] == K.QTYPES["IQ4_XS_R8"].row_bytes(768)
    out = K.dequantize(r8, "IQ4_XS_R8", (24, 768))
    ref = gguf.quants.dequantize(src, GQT.IQ4_XS).astype(np.float32)
    assert np.array_equal(out.view(np.uint32), ref.view(np.uint32))
    # experts stacked [E, rows, row_bytes] repack per 8-row group too
    st = K.repack(src.reshape(3, 8, -1), "IQ4_XS")
    assert np.array_equal(st.reshape(24, -1), r8)


def test_linear_matches_reference(variants):
    rng = np.random.default_rng(11)
    N, Kd = 40, 768
    src = random_blocks(rng, "IQ4_XS", N, Kd)
    blocks = K.repack(src, "IQ4_XS")
    w = dequantize_ref(src, "IQ4_XS")
    for T in (1, 3, 9, 17):
        x = rng.standard_normal((T, Kd)).astype(np.float32)
        ref = act_roundtrip(x, 256) @ w.T
        for label, lib, isa in variants:
            lib.set_isa(isa)
            y = lib.linear(blocks, "IQ4_XS_R8", x)
            assert relerr(y, ref) <= 1e-5, f"{label} T={T}: max error {relerr(y, ref):.2e} of scale"


def test_extreme_blocks_do_not_overflow(variants):
    """Every index at the table's ends (levels -127 / 113), scales -32, activations at +-127: the largest int32 sums."""
    rng = np.random.default_rng(5)
    src = random_blocks(rng, "IQ4_XS", 8, 512)
    b = src.reshape(8, 2, 136)
    b[:, :, 2:8] = 0                         # every 6-bit scale 0: ls - 32 = -32
    b[:, 0, 8:] = 0x00                       # level -127 everywhere
    b[:, 1, 8:] = 0xFF                       # level 113 everywhere
    w = dequantize_ref(src, "IQ4_XS")
    x = np.where(rng.random((9, 512)) < 0.5, -1.0, 1.0).astype(np.float32)
    x[0] = 1.0
    x[1] = -1.0
    ref = act_roundtrip(x, 256) @ w.T
    blocks = K.repack(src, "IQ4_XS")
    for label, lib, isa in variants:
        lib.set_isa(isa)
        assert relerr(lib.linear(blocks, "IQ4_XS_R8", x), ref) <= 1e-5, label


@pytest.mark.parametrize("T", [1, 3, 9, 17])
def test_moe_forward_matches_reference(variants, T):
    rng = np.random.default_rng(13 + T)
    E, H, I, top_k = 4, 512, 256, 3
    raw = [np.stack([random_blocks(rng, "IQ4_XS", r, c) for _ in range(E)]) for r, c in ((I, H), (I, H), (H, I))]
    gate, up, down = (np.stack([dequantize_ref(m, "IQ4_XS") for m in r]) for r in raw)
    layer = K.ExpertWeights(*[K.repack(m, "IQ4_XS") for m in raw], "IQ4_XS_R8")
    x = rng.standard_normal((T, H)).astype(np.float32)
    ids = np.stack([rng.permutation(E)[:top_k] for _ in range(T)]).astype(np.int32)
    weights = rng.random((T, top_k)).astype(np.float32)
    ref = moe_reference(gate, up, down, "IQ4_XS", x, ids, weights)
    for label, lib, isa in variants:
        lib.set_isa(isa)
        y = lib.moe_forward(layer, x, ids, weights, h_residual=True)
        assert relerr(y, ref) <= 5e-3, f"{label} T={T}: max error {relerr(y, ref):.2e} of scale"


def test_repack_argument_errors():
    rng = np.random.default_rng(1)
    src = random_blocks(rng, "IQ4_XS", 12, 256)
    with pytest.raises(ValueError, match="12 rows is not a multiple of 8"):
        K.repack(src, "IQ4_XS")
    src = random_blocks(rng, "IQ4_XS", 8, 256)
    with pytest.raises(ValueError, match="out: shape"):
        K.repack(src, "IQ4_XS", out=np.empty((8, 136), np.uint8))
    with pytest.raises(ValueError, match="IQ4_XS_R8 has no repacked layout"):
        K.repack(src, "IQ4_XS_R8")
    lib = K._default.lib
    ffi = K._default.ffi
    buf = np.zeros(8 * 138, np.uint8)
    p = ffi.cast("void *", buf.ctypes.data)
    assert lib.hk2_repack_iq4_xs_r8(ffi.NULL, 8, 256, p) == lib.HK2_EINVAL
    assert b"null input" in ffi.string(lib.hk2_last_error())
    assert lib.hk2_repack_iq4_xs_r8(p, 12, 256, p) == lib.HK2_ESHAPE
    assert b"nrows=12 is not a multiple of 8" in ffi.string(lib.hk2_last_error())
    assert lib.hk2_repack_iq4_xs_r8(p, 8, 100, p) == lib.HK2_ESHAPE
    assert lib.hk2_repack_iq4_xs_r8(p, 8, 256, p) == lib.HK2_EINVAL
    assert b"overlap" in ffi.string(lib.hk2_last_error())
    with pytest.raises(ValueError, match="IQ4_XS_R8 is a kernel layout"):
        K.quantize(np.zeros((8, 256), np.float32), "IQ4_XS_R8")
    assert lib.hk2_quantize(K.QTYPES["IQ4_XS_R8"].id, ffi.cast("float *", buf.ctypes.data), 0, 256, p) == lib.HK2_ETYPE


def test_expert_weights_repacked_runs_the_same_experts():
    rng = np.random.default_rng(12)
    E, H, I = 4, 512, 256
    raw = [np.stack([random_blocks(rng, "IQ4_XS", r, c) for _ in range(E)]) for r, c in ((I, H), (I, H), (H, I))]
    layer = K.ExpertWeights(*raw, "IQ4_XS")
    r = layer.repacked()
    assert (r.gate_type.name, r.up_type.name, r.down_type.name) == ("IQ4_XS_R8",) * 3
    np.testing.assert_array_equal(r.blocks("gate"), K.repack(raw[0], "IQ4_XS"))
    for T in (1, 9):
        x = rng.standard_normal((T, H)).astype(np.float32)
        ids = np.stack([rng.permutation(E)[:2] for _ in range(T)]).astype(np.int32)
        weights = rng.random((T, 2)).astype(np.float32)
        a = K.moe_forward(layer, x, ids, weights)
        b = K.moe_forward(r, x, ids, weights)
        assert relerr(b, np.asarray(a, np.float64)) <= 1e-5, f"T={T}"
