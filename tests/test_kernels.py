"""C expert kernels against independent references.

Weights: the `gguf` package's own quantizers/dequantizers. MoE forward: float64 numpy math on
gguf-dequantized weights, with activations quantized the way the kernels define it (Q8_0 via
gguf, Q8_K re-derived here), so the only differences left are float summation order and, rarely,
an 8-bit rounding of the intermediate flipping by one step (bounded below).
Every ISA variant runs: scalar, AVX2 (when the CPU has it), native AVX-512 (when present) and the
AVX-512 code compiled against SIMDe (always, from a shared library built by this test).
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import zlib

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as GQT

from hybrid_k2 import kernels as K

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ACT_QB = {"Q4_0": 32, "Q8_0": 32, "Q4_K": 256, "Q6_K": 256, "Q4_0_R8": 32, "Q4_K_R8": 256}


def unpack_r8(r8: np.ndarray) -> np.ndarray:
    """Q4_0_R8 bytes [..., rows, row_bytes] back to GGUF Q4_0, from the layout's definition in csrc/hk2.h:
    per block of 8 rows, 8 fp16 scales then byte 32c + 4r + i = row r's qs[4c + i]."""
    *lead, rows, rb = r8.shape
    g = r8.reshape(-1, rows // 8, rb // 18, 144)                      # [.., group, block, 144]
    d = g[..., :16].reshape(*g.shape[:3], 8, 2)                        # [.., group, block, row, 2]
    qs = g[..., 16:].reshape(*g.shape[:3], 4, 8, 4).swapaxes(-3, -2)   # [.., group, block, row, c, 4]
    q4 = np.concatenate([d, qs.reshape(*qs.shape[:4], 16)], axis=-1)   # [.., group, block, row, 18]
    return np.ascontiguousarray(q4.transpose(0, 1, 3, 2, 4)).reshape(*lead, rows, rb)


def unpack_k_r8(r8: np.ndarray) -> np.ndarray:
    """Q4_K_R8 bytes [..., rows, row_bytes] back to GGUF Q4_K, from the layout's definition in csrc/hk2.h: per
    super-block of 8 rows, 8 fp16 d, 8 fp16 dmin, sc[8 sub-blocks][8 rows], m[8][8], then per 64-value chunk c
    byte 256c + 32k + 4r + i = row r's qs[32c + 4k + i]; the 6-bit scales and mins packed again as ggml does."""
    *lead, rows, rb = r8.shape
    nb = rb // 148
    g = r8.reshape(-1, rows // 8, nb, 8 * 148).astype(np.uint16)     # [.., group, super-block, 1184]
    d, dmin = g[..., 0:16:2] | g[..., 1:16:2] << 8, g[..., 16:32:2] | g[..., 17:32:2] << 8   # [.., sb, row]
    sc, m = g[..., 32:96].reshape(*g.shape[:3], 8, 8), g[..., 96:160].reshape(*g.shape[:3], 8, 8)   # [.., j, row]
    qs = g[..., 160:].reshape(*g.shape[:3], 4, 8, 8, 4)              # [.., c, k, row, i]
    out = np.zeros((*g.shape[:3], 8, 144), np.uint16)                # [.., group, super-block, row, 144]
    out[..., 0], out[..., 1], out[..., 2], out[..., 3] = d & 255, d >> 8, dmin & 255, dmin >> 8
    sc, m = np.moveaxis(sc, -2, -1), np.moveaxis(m, -2, -1)         # [.., row, j]
    out[..., 4:8] = sc[..., :4] | (sc[..., 4:] >> 4) << 6
    out[..., 8:12] = m[..., :4] | (m[..., 4:] >> 4) << 6
    out[..., 12:16] = (sc[..., 4:] & 15) | (m[..., 4:] & 15) << 4
    out[..., 16:] = np.moveaxis(qs, -2, -4).reshape(*g.shape[:3], 8, 128)   # [.., row, c, k, i]
    return np.ascontiguousarray(out.astype(np.uint8).transpose(0, 1, 3, 2, 4)).reshape(*lead, rows, nb * 144)


def gguf_dequantize(blocks: np.ndarray, qt: str) -> np.ndarray:
    """The gguf package's dequantizer (the _R8 layouts unpacked to their GGUF type first)."""
    if qt == "Q4_0_R8":
        blocks, qt = unpack_r8(blocks), "Q4_0"
    if qt == "Q4_K_R8":
        blocks, qt = unpack_k_r8(blocks), "Q4_K"
    return gguf.quants.dequantize(blocks, GQT[qt])


def quantize_as(x: np.ndarray, qt: str) -> np.ndarray:
    if qt.endswith("_R8"):
        src = qt[:-3]
        return K.repack(K.quantize(x, src), src)
    return K.quantize(x, qt)


pytestmark = pytest.mark.usefixtures("kernel_defaults")   # conftest: variants, simde_lib


# ---------------------------------------------------------------- references

def act_roundtrip(v: np.ndarray, qb: int) -> np.ndarray:
    """Activations as the kernels see them: quantized to int8 blocks of qb, then dequantized."""
    v = np.ascontiguousarray(v, dtype=np.float32)
    if qb == 32:
        return gguf.quants.dequantize(gguf.quants.quantize(v, GQT.Q8_0), GQT.Q8_0).astype(np.float64)
    d, q = q8_k_reference(v)
    return (q.astype(np.float32) * d[..., None]).reshape(v.shape).astype(np.float64)


def act_roundtrip_2(v: np.ndarray, qb: int) -> np.ndarray:
    """h for the down projection as the kernels carry it: an 8-bit row plus its rounding residual's 8-bit row."""
    v = np.ascontiguousarray(v, dtype=np.float32)
    first = act_roundtrip(v, qb)
    residual = (v - first.astype(np.float32)).astype(np.float32)
    return first + act_roundtrip(residual, qb)


def q8_k_reference(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q8_K as defined here: d = amax/127 (float32), q = round-half-away(x / d)."""
    b = v.reshape(*v.shape[:-1], -1, 256)
    d = (np.abs(b).max(axis=-1) / np.float32(127)).astype(np.float32)
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)
    q = gguf.quants.np_roundf(b * inv[..., None]).astype(np.int8)
    return d, q


def moe_reference(w: dict, x: np.ndarray, ids: np.ndarray, weights: np.ndarray, h_residual: bool | None = None) -> np.ndarray:
    """float64 MoE on the kernels' quantized activations; h_residual as kernels.moe_forward's (None: its default)."""
    T, H = x.shape
    if h_residual is None:
        h_residual = T <= K.H_RESIDUAL_MAX_TOKENS
    y = np.zeros((T, H))
    xq = act_roundtrip(x, ACT_QB[w["gate_type"]])
    for e in np.unique(ids):
        t, k = np.nonzero(ids == e)
        g = xq[t] @ w["gate"][e].T
        u = xq[t] @ w["up"][e].T
        h = (g / (1.0 + np.exp(-g)) * u).astype(np.float32)
        hq = act_roundtrip_2(h, ACT_QB[w["down_type"]]) if h_residual else act_roundtrip(h, ACT_QB[w["down_type"]])
        out = hq @ w["down"][e].T
        np.add.at(y, t, weights[t, k][:, None] * out)
    return y


def assert_close_to_reference(y: np.ndarray, ref: np.ndarray, label: str) -> None:
    """Float summation order costs ~1e-7 of the output scale. Beyond that, an intermediate value
    (silu(g)*u) lying within float error of an 8-bit rounding boundary may round one step the
    other way, which moves that token's outputs by up to ~1e-3 of the scale; this happens for a
    few percent of tokens. So: every token within 5e-3, and all but a few within 1e-5."""
    scale = np.abs(ref).max()
    err = np.abs(np.asarray(y, dtype=np.float64) - ref).max(axis=1) / scale
    assert err.max() <= 5e-3, f"{label}: max error {err.max():.2e} of scale"
    n_off = int((err > 1e-5).sum())
    assert n_off <= max(1, len(err) // 8), f"{label}: {n_off}/{len(err)} tokens off by more than 1e-5 of scale"


def make_experts(rng, gate_type: str, down_type: str, E: int, H: int, I: int) -> dict:
    gate = (rng.standard_normal((E, I, H)) * 0.05).astype(np.float32)
    up = (rng.standard_normal((E, I, H)) * 0.05).astype(np.float32)
    down = (rng.standard_normal((E, H, I)) * 0.05).astype(np.float32)
    qg, qu, qd = quantize_as(gate, gate_type), quantize_as(up, gate_type), quantize_as(down, down_type)
    deq = lambda q, t: gguf_dequantize(q, t).astype(np.float64)
    return {"layer": K.ExpertWeights(qg, qu, qd, gate_type, down_type=down_type),
            "gate": deq(qg, gate_type), "up": deq(qu, gate_type), "down": deq(qd, down_type),
            "gate_type": gate_type, "down_type": down_type, "raw": (qg, qu, qd)}


def routing(rng, T: int, E: int, K_: int, repeats: bool) -> tuple[np.ndarray, np.ndarray]:
    ids = rng.integers(0, E, size=(T, K_)).astype(np.int32)  # repeats within and across tokens
    if repeats and K_ >= 3:
        ids[:, 1] = ids[:, 0]  # the same expert twice in one token
    weights = rng.random((T, K_)).astype(np.float32)
    return ids, weights


# ---------------------------------------------------------------- block formats

@pytest.mark.parametrize("name", ["Q8_0", "Q4_0"])
def test_quantize_bytes_equal_gguf(name):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((37, 256)).astype(np.float32) * rng.uniform(0.01, 10, size=(37, 1)).astype(np.float32)
    x[0, :32] = 0.0                                     # all-zero block
    x[1, :32] = np.arange(32, dtype=np.float32) - 16.5  # ties and a negative extreme
    x[2, 32:64] = 127 * np.linspace(-1, 1, 32, dtype=np.float32)
    ours = K.quantize(x, name)
    assert ours.dtype == np.uint8 and ours.shape == (37, 256 // 32 * K.QTYPES[name].block_bytes)
    np.testing.assert_array_equal(ours, gguf.quants.quantize(x, GQT[name]))


@pytest.mark.parametrize("name", ["Q8_0", "Q4_0", "Q4_K", "Q6_K"])
def test_dequantize_equals_gguf(name):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((9, 512)).astype(np.float32)
    blocks = K.quantize(x, name)
    np.testing.assert_array_equal(K.dequantize(blocks, name), gguf.quants.dequantize(blocks, GQT[name]))
    # arbitrary block bytes too (every bit of the packed 6-bit scales / high quant bits), finite fp16 scales
    t = K.QTYPES[name]
    raw = rng.integers(0, 256, size=(5, t.row_bytes(512)), dtype=np.uint8)
    b = raw.reshape(-1, t.block_bytes)
    scale_offsets = {"Q8_0": [0], "Q4_0": [0], "Q4_K": [0, 2], "Q6_K": [208]}[name]
    for off in scale_offsets:
        b[:, off:off + 2] = rng.uniform(-2, 2, size=(len(b), 1)).astype(np.float16).view(np.uint8)
    np.testing.assert_array_equal(K.dequantize(raw, name, (5, 512)), gguf.quants.dequantize(raw, GQT[name]))


@pytest.mark.parametrize("name,rms_bound", [("Q8_0", 0.007), ("Q4_0", 0.1), ("Q4_K", 0.1), ("Q6_K", 0.03)])
def test_quantizers_roundtrip(name, rms_bound):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((16, 1024)).astype(np.float32)
    err = gguf.quants.dequantize(K.quantize(x, name), GQT[name]) - x
    assert np.sqrt(np.mean(err ** 2)) < rms_bound
    zeros = np.zeros((2, 256), dtype=np.float32)
    np.testing.assert_array_equal(gguf.quants.dequantize(K.quantize(zeros, name), GQT[name]), zeros)


def test_activation_quantization_identical_on_every_isa(variants):
    rng = np.random.default_rng(4)
    x = rng.standard_normal((6, 512)).astype(np.float32) * 3
    x[0, :32] = np.arange(-16, 16, dtype=np.float32) + 0.5  # amax 127/127: halves are exact ties
    x[0, 31] = 127.0
    x[1, :256] = 0.0
    want_q8_0 = gguf.quants.quantize(x, GQT.Q8_0)
    d, q = q8_k_reference(x)
    bsums = q.reshape(6, 2, 16, 16).astype(np.int16).sum(-1).astype(np.int16)
    want_q8_k = np.concatenate([d[..., None].view(np.uint8), q.view(np.uint8), bsums.view(np.uint8)], axis=-1).reshape(6, -1)
    for label, lib, isa in variants:
        lib.set_isa(isa)
        np.testing.assert_array_equal(lib.quantize_activations(x, "Q8_0"), want_q8_0, err_msg=label)
        np.testing.assert_array_equal(lib.quantize_activations(x, "Q8_K"), want_q8_k, err_msg=label)


# ---------------------------------------------------------------- fused MoE

MOE_CASES = [  # gate/up type, down type, E, H, I
    ("Q4_0", "Q4_0", 8, 96, 64),
    ("Q8_0", "Q8_0", 8, 96, 64),
    ("Q4_0", "Q8_0", 6, 320, 192),
    ("Q4_K", "Q6_K", 6, 256, 512),
    ("Q6_K", "Q4_K", 4, 512, 256),
    ("Q4_K", "Q4_K", 4, 256, 256),
    ("Q8_0", "Q6_K", 4, 256, 256),
    ("Q4_0_R8", "Q4_0_R8", 8, 96, 64),
    ("Q4_0_R8", "Q6_K", 4, 256, 256),
    ("Q8_0", "Q4_0_R8", 6, 320, 192),
    ("Q4_K_R8", "Q4_K_R8", 4, 256, 256),
    ("Q4_K_R8", "Q6_K", 4, 256, 512),
    ("Q8_0", "Q4_K_R8", 4, 512, 256),
]


@pytest.mark.parametrize("gate_type,down_type,E,H,I", MOE_CASES)
@pytest.mark.parametrize("T", [1, 2, 7, 64])
def test_moe_forward_matches_reference(variants, gate_type, down_type, E, H, I, T):
    rng = np.random.default_rng(zlib.crc32(f"{gate_type}{down_type}{T}".encode()))
    w = make_experts(rng, gate_type, down_type, E, H, I)
    x = rng.standard_normal((T, H)).astype(np.float32)
    ids, weights = routing(rng, T, E, 4, repeats=True)
    ref = moe_reference(w, x, ids, weights)
    for label, lib, isa in variants:
        lib.set_isa(isa)
        assert_close_to_reference(lib.moe_forward(w["layer"], x, ids, weights), ref, f"{label} T={T}")


@pytest.mark.parametrize("gate_type,down_type", [("Q4_0", "Q4_K"), ("Q8_0", "Q4_0_R8")])
@pytest.mark.parametrize("T", [1, 40])
def test_moe_forward_h_residual_on_and_off(variants, gate_type, down_type, T):
    """Both settings at both call sizes against their own references; the residual brings h close to float."""
    rng = np.random.default_rng(zlib.crc32(f"resid{gate_type}{T}".encode()))
    w = make_experts(rng, gate_type, down_type, 6, 256, 256)
    x = rng.standard_normal((T, 256)).astype(np.float32)
    ids, weights = routing(rng, T, 6, 4, repeats=True)
    refs = {r: moe_reference(w, x, ids, weights, h_residual=r) for r in (False, True)}
    for label, lib, isa in variants:
        lib.set_isa(isa)
        for r in (False, True):
            assert_close_to_reference(lib.moe_forward(w["layer"], x, ids, weights, h_residual=r), refs[r], f"{label} {r}")
    # against float h (x still at 8 bits): the residual takes most of the down projection's error away
    xq = act_roundtrip(x, ACT_QB[gate_type])
    exact = np.zeros_like(refs[True])
    for t in range(T):
        for k in range(4):
            e = ids[t, k]
            g, u = w["gate"][e] @ xq[t], w["up"][e] @ xq[t]
            exact[t] += weights[t, k] * (w["down"][e] @ (g / (1 + np.exp(-g)) * u))
    err = {r: np.abs(refs[r] - exact).max() for r in (False, True)}
    assert err[True] < 0.1 * err[False], err


@pytest.mark.parametrize("gate_type", ["Q4_0", "Q8_0", "Q4_0_R8"])
def test_moe_forward_prefill_512_tokens(variants, gate_type):
    rng = np.random.default_rng(5)
    w = make_experts(rng, gate_type, gate_type, 8, 96, 64)
    x = rng.standard_normal((512, 96)).astype(np.float32)
    ids, weights = routing(rng, 512, 8, 4, repeats=False)
    ref = moe_reference(w, x, ids, weights)
    for label, lib, isa in variants:
        if label.startswith("simde") and gate_type != "Q4_0":
            continue  # the emulated AVX-512 runs the 512-token case once (Q4_0), to stay fast
        lib.set_isa(isa)
        assert_close_to_reference(lib.moe_forward(w["layer"], x, ids, weights), ref, f"{label} T=512")


@pytest.mark.parametrize("gate_type,down_type", [("Q4_0", "Q4_0"), ("Q4_K", "Q6_K"), ("Q4_0_R8", "Q4_0_R8"),
                                                 ("Q4_K_R8", "Q4_K_R8")])
def test_results_do_not_depend_on_thread_count(gate_type, down_type):
    rng = np.random.default_rng(6)
    w = make_experts(rng, gate_type, down_type, 8, 512, 512)
    for T in (1, 7, 33):
        x = rng.standard_normal((T, 512)).astype(np.float32)
        ids, weights = routing(rng, T, 8, 4, repeats=True)
        outs = []
        for n in (1, 2, 3, 4):
            K.set_threads(n)
            assert K.get_threads() == n
            outs.append(K.moe_forward(w["layer"], x, ids, weights))
        for o in outs[1:]:
            np.testing.assert_array_equal(o, outs[0])


def test_repeated_expert_in_a_token_equals_summed_weight():
    rng = np.random.default_rng(7)
    w = make_experts(rng, "Q4_0", "Q4_0", 4, 96, 64)
    x = rng.standard_normal((2, 96)).astype(np.float32)
    twice = K.moe_forward(w["layer"], x, np.array([[1, 1], [2, 2]], np.int32), np.array([[0.25, 0.5], [1, 1]], np.float32))
    once = K.moe_forward(w["layer"], x, np.array([[1], [2]], np.int32), np.array([[0.75], [2]], np.float32))
    np.testing.assert_allclose(twice, once, rtol=1e-6, atol=1e-7)


def test_torch_inputs_and_out_buffer():
    rng = np.random.default_rng(8)
    w = make_experts(rng, "Q8_0", "Q8_0", 4, 96, 64)
    x = torch.randn(3, 96)
    ids = torch.tensor([[0, 1], [2, 3], [3, 3]])  # int64 is converted
    weights = torch.rand(3, 2)
    y = K.moe_forward(w["layer"], x, ids, weights)
    assert isinstance(y, torch.Tensor) and y.dtype == torch.float32 and y.shape == (3, 96)
    ref = moe_reference(w, x.numpy(), ids.numpy(), weights.numpy())
    assert_close_to_reference(y.numpy(), ref, "torch")
    out = torch.empty(3, 96)
    assert K.moe_forward(w["layer"], x, ids, weights, out=out) is out
    np.testing.assert_array_equal(out.numpy(), y.numpy())
    # experts given as torch tensors / per-expert lists, read in place
    qg, qu, qd = w["raw"]
    layer2 = K.ExpertWeights([torch.from_numpy(qg[e]) for e in range(4)], torch.from_numpy(qu), list(qd), "Q8_0")
    np.testing.assert_array_equal(K.moe_forward(layer2, x, ids, weights).numpy(), y.numpy())


def test_gguf_memmap_weights_are_used_in_place(tmp_path):
    rng = np.random.default_rng(9)
    w = make_experts(rng, "Q4_K", "Q6_K", 4, 256, 256)
    path = tmp_path / "experts.bin"
    qg, qu, qd = w["raw"]
    with open(path, "wb") as f:
        for a in (qg, qu, qd):
            f.write(a.tobytes())
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    ng, nu = qg.nbytes, qu.nbytes
    layer = K.ExpertWeights(mm[:ng].reshape(qg.shape), mm[ng:ng + nu].reshape(qu.shape),
                            mm[ng + nu:].reshape(qd.shape), "Q4_K", down_type="Q6_K")
    x = rng.standard_normal((2, 256)).astype(np.float32)
    ids, weights = routing(rng, 2, 4, 2, repeats=False)
    np.testing.assert_array_equal(K.moe_forward(layer, x, ids, weights), K.moe_forward(w["layer"], x, ids, weights))


# ---------------------------------------------------------------- bad arguments

@pytest.fixture(scope="module")
def small():
    rng = np.random.default_rng(10)
    w = make_experts(rng, "Q4_0", "Q4_0", 4, 96, 64)
    x = rng.standard_normal((2, 96)).astype(np.float32)
    ids = np.array([[0, 1], [2, 3]], np.int32)
    weights = np.ones((2, 2), np.float32)
    return w, x, ids, weights


def test_bad_arguments_raise_before_c(small):
    w, x, ids, weights = small
    layer = w["layer"]
    f = K.moe_forward
    with pytest.raises(TypeError, match="x: dtype float64"):
        f(layer, x.astype(np.float64), ids, weights)
    with pytest.raises(ValueError, match=r"x: shape \(2, 95\)"):
        f(layer, x[:, :95].copy(), ids, weights)
    with pytest.raises(ValueError, match="x: expected 2 dimensions"):
        f(layer, x[0], ids, weights)
    with pytest.raises(ValueError, match="x: array is not C-contiguous"):
        f(layer, np.asfortranarray(x), ids, weights)
    buf = np.zeros(x.nbytes + 1, np.uint8)
    misaligned = buf[1:].view(np.float32).reshape(x.shape)
    with pytest.raises(ValueError, match="x: data is not aligned"):
        f(layer, misaligned, ids, weights)
    with pytest.raises(ValueError, match=r"ids\[1, 0\] = 4 is not an expert id in \[0, 4\)"):
        f(layer, x, np.array([[0, 1], [4, 3]], np.int32), weights)
    with pytest.raises(ValueError, match=r"ids\[0, 1\] = -1"):
        f(layer, x, np.array([[0, -1], [2, 3]], np.int64), weights)
    with pytest.raises(TypeError, match="ids: dtype float32"):
        f(layer, x, ids.astype(np.float32), weights)
    with pytest.raises(ValueError, match=r"ids: shape \(1, 2\)"):
        f(layer, x, ids[:1], weights)
    with pytest.raises(ValueError, match=r"weights: shape \(2, 1\)"):
        f(layer, x, ids, weights[:, :1].copy())
    with pytest.raises(TypeError, match="weights: dtype float16"):
        f(layer, x, ids, weights.astype(np.float16))
    with pytest.raises(ValueError, match="out: shape"):
        f(layer, x, ids, weights, out=np.empty((2, 95), np.float32))
    ro = np.empty((2, 96), np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="out: array is read-only"):
        f(layer, x, ids, weights, out=ro)
    with pytest.raises(TypeError, match="x: dtype torch.bfloat16"):
        f(layer, torch.from_numpy(x).bfloat16(), ids, weights)
    with pytest.raises(TypeError, match="layer: expected ExpertWeights"):
        f(w["raw"], x, ids, weights)


def test_torch_fast_path_checks_what_it_skips(small):
    """The engine's call (contiguous CPU torch tensors, int32 ids) skips the numpy conversion; the C side
    still names a bad id, and any other shape falls through to the checked path."""
    w, x, ids, weights = small
    layer, tx, tw = w["layer"], torch.from_numpy(x), torch.from_numpy(weights)
    ref = K.moe_forward(layer, x, ids, weights)
    y = K.moe_forward(layer, tx, torch.from_numpy(ids), tw)
    assert isinstance(y, torch.Tensor) and np.array_equal(y.numpy(), ref)
    with pytest.raises(ValueError, match=r"ids\[1, 0\] = 4"):
        K.moe_forward(layer, tx, torch.tensor([[0, 1], [4, 3]], dtype=torch.int32), tw)
    with pytest.raises(ValueError, match=r"ids\[0, 1\] = -1"):
        K.moe_forward(layer, tx, torch.tensor([[0, -1], [2, 3]], dtype=torch.int32), tw)
    with pytest.raises(ValueError, match=r"x: shape \(2, 95\)"):
        K.moe_forward(layer, tx[:, :95].contiguous(), torch.from_numpy(ids), tw)
    with pytest.raises(ValueError, match=r"weights: shape \(2, 1\)"):
        K.moe_forward(layer, tx, torch.from_numpy(ids), tw[:, :1].contiguous())


def test_bad_weights_and_shapes(small):
    w, *_ = small
    qg, qu, qd = w["raw"]
    with pytest.raises(ValueError, match="x: 33 columns is not a positive multiple of the Q8_0 block size 32"):
        K.quantize(np.ones((2, 33), np.float32), "Q8_0")
    with pytest.raises(ValueError, match="Q4_K block size 256"):
        K.quantize(np.ones((2, 96), np.float32), "Q4_K")
    with pytest.raises(ValueError, match="unsupported block type"):
        K.quantize(np.ones((2, 64), np.float32), "Q8_1")
    with pytest.raises(ValueError, match="blocks: 10 bytes"):
        K.dequantize(np.zeros(10, np.uint8), "Q8_0", (1, 32))
    with pytest.raises(ValueError, match="up: 63 rows per expert, expected 64"):
        K.ExpertWeights(qg, qu[:, :63], qd, "Q4_0")
    with pytest.raises(ValueError, match="gate: 17 bytes per row is not a multiple of the Q4_0 block"):
        K.ExpertWeights(np.zeros((4, 64, 17), np.uint8), qu, qd, "Q4_0")
    with pytest.raises(ValueError, match="down: inter=64 .* not a multiple of the Q6_K block size 256"):
        K.ExpertWeights(qg, qu, qd, "Q4_0", down_type="Q6_K")
    with pytest.raises(ValueError, match="gate/up/down hold 4/3/4 experts"):
        K.ExpertWeights(qg, qu[:3], qd, "Q4_0")
    with pytest.raises(TypeError, match="gate: dtype float32"):
        K.ExpertWeights(qg.astype(np.float32), qu, qd, "Q4_0")
    with pytest.raises(ValueError, match="the rows of each expert must be contiguous"):
        K.ExpertWeights(qg[:, ::2], qu[:, ::2], qd, "Q4_0")
    with pytest.raises(ValueError, match="Q8_K is not a weight type"):
        K.ExpertWeights(qg, qu, qd, "Q8_K")
    odd = np.zeros(qg.nbytes + 1, np.uint8)[1:].reshape(qg.shape)
    with pytest.raises(ValueError, match="gate: expert 0 data is not 2-byte aligned"):
        K.ExpertWeights(odd, qu, qd, "Q4_0")


def test_c_side_rejects_bad_arguments(small):
    """The C entry points return an error code and a message instead of crashing."""
    w, x, ids, weights = small
    ffi, lib = K._default.ffi, K._default.lib
    layer = w["layer"].cstruct(K._default)
    xp, wp = ffi.cast("float *", x.ctypes.data), ffi.cast("float *", weights.ctypes.data)
    y = np.empty_like(x)
    yp = ffi.cast("float *", y.ctypes.data)
    bad_ids = np.array([[0, 9], [1, 2]], np.int32)
    assert lib.hk2_moe_forward(layer, 2, 2, xp, ffi.cast("int32_t *", bad_ids.ctypes.data), wp, yp, 0) == lib.HK2_EID
    assert b"ids[0, 1] = 9" in ffi.string(lib.hk2_last_error())
    assert lib.hk2_moe_forward(layer, 2, 2, ffi.NULL, ffi.cast("int32_t *", ids.ctypes.data), wp, yp, 0) == lib.HK2_EINVAL
    assert lib.hk2_moe_forward(ffi.NULL, 2, 2, xp, ffi.cast("int32_t *", ids.ctypes.data), wp, yp, 0) == lib.HK2_EINVAL
    bad = ffi.new("hk2_moe_layer *", layer[0])
    bad.down_type = lib.HK2_Q8_K
    assert lib.hk2_moe_forward(bad, 2, 2, xp, ffi.cast("int32_t *", ids.ctypes.data), wp, yp, 0) == lib.HK2_ETYPE
    bad.down_type, bad.inter = lib.HK2_Q4_0, 48
    assert lib.hk2_moe_forward(bad, 2, 2, xp, ffi.cast("int32_t *", ids.ctypes.data), wp, yp, 0) == lib.HK2_ESHAPE
    assert b"down: row length 48" in ffi.string(lib.hk2_last_error())
    assert lib.hk2_quantize(lib.HK2_Q8_0, xp, 2, 95, ffi.cast("void *", y.ctypes.data)) == lib.HK2_ESHAPE
    assert lib.hk2_quantize(99, xp, 2, 96, ffi.cast("void *", y.ctypes.data)) == lib.HK2_ETYPE
    assert lib.hk2_set_threads(0) == lib.HK2_EINVAL
    assert lib.hk2_set_isa(b"sse9") == lib.HK2_EISA


# ---------------------------------------------------------------- threads, ISA, GIL

def test_thread_pool_resizes_and_counts():
    for n in (3, 1, 2, 4, 2):
        K.set_threads(n)
        assert K.get_threads() == n
    with pytest.raises(K.KernelError, match="threads=0"):
        K.set_threads(0)
    with pytest.raises(TypeError):
        K.set_threads(2.5)


def test_c_calls_release_the_gil():
    """A C call that waits until another Python thread calls C: only possible if the GIL is released."""
    lib = K._default.lib
    rc = []
    waiter = threading.Thread(target=lambda: rc.append(lib.hk2_debug_wait(5000)))
    waiter.start()
    deadline = time.monotonic() + 10
    while not lib.hk2_debug_signal() and time.monotonic() < deadline:
        time.sleep(0.001)
    waiter.join()
    assert rc == [0]


def test_pool_works_in_a_forked_child(small):
    """The workers do not survive fork(); the child builds its own pool on first use."""
    w, x, ids, weights = small
    K.set_threads(2)
    want = K.moe_forward(w["layer"], x, ids, weights)
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        ok = False
        try:
            ok = np.array_equal(K.moe_forward(w["layer"], x, ids, weights), want) and K.get_threads() == 2
        finally:
            os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


def test_isa_selection():
    assert K.isa() in ("scalar", "avx2", "avx512bw", "avx512vnni")
    assert K.isa_supported("scalar")
    K.set_isa("scalar")
    assert K.isa() == "scalar"
    with pytest.raises(K.KernelError, match="unknown ISA 'sse9'"):
        K.set_isa("sse9")
    for name in ("avx2", "avx512"):
        if not K.isa_supported(name):
            with pytest.raises(K.KernelError, match="lacks ISA"):
                K.set_isa(name)


def test_isa_env_var(simde_path, monkeypatch):
    """HYBRID_K2_ISA picks the kernels when the library loads (a fresh process, C side) and an
    unusable value is refused with an error naming the variable (Python side)."""
    code = ("import cffi, sys; ffi = cffi.FFI(); ffi.cdef('const char *hk2_isa(void);'); "
            "print(ffi.string(ffi.dlopen(sys.argv[1]).hk2_isa()).decode())")
    for want in ("scalar", "avx512bw"):
        env = dict(os.environ, HYBRID_K2_ISA=want)
        out = subprocess.run([sys.executable, "-c", code, simde_path], env=env, capture_output=True, text=True)
        assert out.returncode == 0 and out.stdout.strip() == want, out.stderr
    monkeypatch.setenv("HYBRID_K2_ISA", "sse9")
    with pytest.raises(RuntimeError, match="HYBRID_K2_ISA='sse9': .*unknown ISA"):
        K._load_default()
    if not K.isa_supported("avx512"):
        monkeypatch.setenv("HYBRID_K2_ISA", "avx512")
        with pytest.raises(RuntimeError, match="HYBRID_K2_ISA='avx512': this CPU"):
            K._load_default()


def test_read_probe_reads_every_byte():
    buf = np.random.default_rng(11).integers(0, 256, size=(1 << 20) + 4096 * 3 + 8, dtype=np.uint8)
    K.set_threads(3)
    want = int(buf[: buf.size // 8 * 8].view(np.uint64).sum(dtype=np.uint64))
    assert K.read_probe(buf) == want


# ---------------------------------------------------------------- dense linear

def linear_reference(blocks: np.ndarray, qt: str, x: np.ndarray) -> np.ndarray:
    """float64: activations as the kernels quantize them, times the gguf-dequantized weight."""
    w = gguf_dequantize(blocks, qt).astype(np.float64)
    return act_roundtrip(x, ACT_QB[qt]) @ w.T


def assert_linear_close(y: np.ndarray, ref: np.ndarray, label: str) -> None:
    """Same quantized inputs on both sides: only float summation order differs (~1e-7 of the scale)."""
    err = np.abs(np.asarray(y, dtype=np.float64) - ref).max() / np.abs(ref).max()
    assert err <= 1e-5, f"{label}: max error {err:.2e} of scale"


LINEAR_CASES = [  # type, K (row length), N (output rows, odd)
    ("Q8_0", 96, 67),     # three blocks: a pair and a lone trailing block
    ("Q4_0", 160, 67),    # five blocks: Q4_0's pair loop and its odd tail
    ("Q8_0", 512, 33),
    ("Q4_0", 512, 33),
    ("Q4_K", 512, 45),
    ("Q6_K", 256, 45),
    ("Q4_0_R8", 160, 64),
    ("Q4_0_R8", 512, 24),
    ("Q4_K_R8", 512, 24),
]


@pytest.mark.parametrize("qt,Kd,N", LINEAR_CASES)
def test_linear_matches_reference(variants, qt, Kd, N):
    rng = np.random.default_rng(zlib.crc32(f"linear{qt}{Kd}".encode()))
    blocks = quantize_as((rng.standard_normal((N, Kd)) * 0.05).astype(np.float32), qt)
    x = rng.standard_normal((64, Kd)).astype(np.float32)
    for T in (1, 2, 3, 4, 5, 7, 31, 33, 64):
        ref = linear_reference(blocks, qt, x[:T])
        for label, lib, isa in variants:
            if label.startswith("simde") and T not in (1, 5, 64):
                continue  # the emulated AVX-512 is slow: one decode, one odd tile, one multi-tile case
            lib.set_isa(isa)
            y = lib.linear(blocks, qt, x[:T])
            assert y.shape == (T, N) and y.dtype == np.float32
            assert_linear_close(y, ref, f"{label} {qt} T={T}")


def test_linear_float_error_bound():
    """Against the float product itself: the only error left is the 8-bit activations' (~0.5% for Q8_0)."""
    rng = np.random.default_rng(20)
    w = rng.standard_normal((200, 1024)).astype(np.float32)
    x = rng.standard_normal((9, 1024)).astype(np.float32)
    blocks = K.quantize(w, "Q8_0")
    exact = x.astype(np.float64) @ gguf.quants.dequantize(blocks, GQT.Q8_0).astype(np.float64).T
    rel = np.linalg.norm(K.linear(blocks, "Q8_0", x) - exact) / np.linalg.norm(exact)
    assert 1e-4 < rel < 1e-2, rel   # quantized (not a float path), and no worse than 8-bit rounding


def test_linear_is_independent_of_threads_and_batch():
    rng = np.random.default_rng(21)
    for qt in ("Q4_0", "Q6_K"):
        blocks = K.quantize(rng.standard_normal((1001, 256)).astype(np.float32), qt)
        x = rng.standard_normal((70, 256)).astype(np.float32)
        outs = []
        for n in (1, 2, 3, 4):
            K.set_threads(n)
            outs.append(K.linear(blocks, qt, x))
        for o in outs[1:]:
            np.testing.assert_array_equal(o, outs[0])
        for t in (0, 33, 69):  # a token alone gives the same bits as inside a batch
            np.testing.assert_array_equal(K.linear(blocks, qt, x[t:t + 1]), outs[0][t:t + 1])


def test_linear_torch_inputs_memmap_weights_and_out(tmp_path):
    rng = np.random.default_rng(22)
    blocks = K.quantize(rng.standard_normal((40, 128)).astype(np.float32), "Q8_0")
    path = tmp_path / "w.bin"
    blocks.tofile(path)
    mm = np.memmap(path, dtype=np.uint8, mode="r", shape=blocks.shape)
    x = torch.randn(3, 128)
    y = K.linear(mm, "Q8_0", x)
    assert isinstance(y, torch.Tensor) and y.shape == (3, 40)
    assert_linear_close(y.numpy(), linear_reference(blocks, "Q8_0", x.numpy()), "memmap")
    np.testing.assert_array_equal(K.linear(torch.from_numpy(blocks), GQT.Q8_0, x).numpy(), y.numpy())
    out = np.empty((3, 40), np.float32)
    assert K.linear(blocks, "q8_0", x.numpy(), out=out) is out
    np.testing.assert_array_equal(out, y.numpy())
    assert K.linear(blocks, "Q8_0", np.empty((0, 128), np.float32)).shape == (0, 40)


def test_linear_bad_arguments():
    rng = np.random.default_rng(23)
    blocks = K.quantize(rng.standard_normal((8, 64)).astype(np.float32), "Q8_0")
    x = rng.standard_normal((2, 64)).astype(np.float32)
    f = K.linear
    with pytest.raises(ValueError, match="Q8_K is not a weight type"):
        f(blocks, "Q8_K", x)
    with pytest.raises(ValueError, match="unsupported block type"):
        f(blocks, "Q8_1", x)
    with pytest.raises(TypeError, match="weight_blocks: dtype float32"):
        f(blocks.astype(np.float32), "Q8_0", x)
    with pytest.raises(ValueError, match="weight_blocks: expected 2 dimensions"):
        f(blocks[None], "Q8_0", x)
    with pytest.raises(ValueError, match="weight_blocks: 67 bytes per row is not a multiple of the Q8_0 block"):
        f(np.zeros((8, 67), np.uint8), "Q8_0", x)
    with pytest.raises(ValueError, match="weight_blocks: array is not C-contiguous"):
        f(np.zeros((8, 136), np.uint8)[:, :68], "Q8_0", x)
    odd = np.zeros(blocks.nbytes + 1, np.uint8)[1:].reshape(blocks.shape)
    with pytest.raises(ValueError, match="weight_blocks: data is not 2-byte aligned"):
        f(odd, "Q8_0", x)
    with pytest.raises(ValueError, match="weight_blocks: no rows"):
        f(blocks[:0], "Q8_0", x)
    with pytest.raises(ValueError, match=r"x: shape \(2, 96\), but the Q8_0 weight rows hold 64 values"):
        f(blocks, "Q8_0", np.zeros((2, 96), np.float32))
    with pytest.raises(ValueError, match="68 bytes per row is not a multiple of the Q4_0 block of 18 bytes"):
        f(blocks, "Q4_0", x)   # Q8_0 rows passed as Q4_0
    with pytest.raises(TypeError, match="x: dtype float64"):
        f(blocks, "Q8_0", x.astype(np.float64))
    with pytest.raises(ValueError, match="x: expected 2 dimensions"):
        f(blocks, "Q8_0", x[0])
    with pytest.raises(ValueError, match="x: array is not C-contiguous"):
        f(blocks, "Q8_0", np.zeros((64, 2), np.float32).T)
    with pytest.raises(TypeError, match="x: dtype torch.bfloat16"):
        f(blocks, "Q8_0", torch.from_numpy(x).bfloat16())
    with pytest.raises(ValueError, match=r"out: shape \(2, 7\)"):
        f(blocks, "Q8_0", x, out=np.empty((2, 7), np.float32))
    ro = np.empty((2, 8), np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="out: array is read-only"):
        f(blocks, "Q8_0", x, out=ro)
    square = K.quantize(np.ones((64, 64), np.float32), "Q8_0")
    buf = np.zeros((2, 64), np.float32)
    with pytest.raises(ValueError, match="out: overlaps x"):
        f(square, "Q8_0", buf, out=buf)


def test_linear_c_side_rejects_bad_arguments():
    ffi, lib = K._default.ffi, K._default.lib
    blocks = K.quantize(np.ones((8, 64), np.float32), "Q8_0")
    x = np.ones((2, 64), np.float32)
    y = np.empty((2, 8), np.float32)
    wp, xp, yp = (ffi.cast("void *", a.ctypes.data) for a in (blocks, x, y))
    assert lib.hk2_linear(lib.HK2_Q8_0, wp, 8, 64, 2, xp, yp) == lib.HK2_OK
    d = np.float64(np.float16(np.float32(1) / np.float32(127)))   # both scales as stored: fp16
    np.testing.assert_allclose(y, 64 * (127 * d) ** 2, rtol=1e-6)
    assert lib.hk2_linear(lib.HK2_Q8_K, wp, 8, 64, 2, xp, yp) == lib.HK2_ETYPE
    assert lib.hk2_linear(lib.HK2_Q8_0, wp, 8, 48, 2, xp, yp) == lib.HK2_ESHAPE
    assert b"n_cols=48" in ffi.string(lib.hk2_last_error())
    assert lib.hk2_linear(lib.HK2_Q4_K, wp, 8, 64, 2, xp, yp) == lib.HK2_ESHAPE
    assert lib.hk2_linear(lib.HK2_Q8_0, wp, 0, 64, 2, xp, yp) == lib.HK2_ESHAPE
    assert lib.hk2_linear(lib.HK2_Q8_0, wp, 8, 64, -1, xp, yp) == lib.HK2_ESHAPE
    assert lib.hk2_linear(lib.HK2_Q8_0, ffi.NULL, 8, 64, 2, xp, yp) == lib.HK2_EINVAL
    assert lib.hk2_linear(lib.HK2_Q8_0, wp, 8, 64, 2, xp, ffi.NULL) == lib.HK2_EINVAL
    assert lib.hk2_linear(lib.HK2_Q8_0, ffi.cast("char *", wp) + 1, 8, 64, 2, xp, yp) == lib.HK2_EINVAL
    assert b"2-byte aligned" in ffi.string(lib.hk2_last_error())
    assert lib.hk2_linear(lib.HK2_Q8_0, wp, 8, 64, 0, ffi.NULL, ffi.NULL) == lib.HK2_OK   # no tokens, nothing read


def test_expert_weights_blocks_accessor():
    rng = np.random.default_rng(24)
    w = make_experts(rng, "Q4_0", "Q8_0", 3, 96, 64)
    layer, (qg, qu, qd) = w["layer"], w["raw"]
    for kind, raw in (("gate", qg), ("up", qu), ("down", qd)):
        assert layer.blocks(kind) is raw and layer.blocks(kind) is getattr(layer, "_" + kind)
    assert np.shares_memory(layer.blocks("down")[2], qd)
    with pytest.raises(ValueError, match="kind: expected 'gate', 'up' or 'down'"):
        layer.blocks("shared")


def test_linear_and_moe_from_two_python_threads():
    """The shared expert (linear) runs while the routed experts (moe_forward) run on another Python thread:
    calls serialize on the C side and each gives the same bits as alone."""
    rng = np.random.default_rng(25)
    w = make_experts(rng, "Q4_0", "Q4_0", 8, 256, 128)
    x = rng.standard_normal((3, 256)).astype(np.float32)
    ids, weights = routing(rng, 3, 8, 4, repeats=False)
    blocks = K.quantize(rng.standard_normal((300, 256)).astype(np.float32), "Q8_0")
    K.set_threads(2)
    want_moe, want_lin = K.moe_forward(w["layer"], x, ids, weights), K.linear(blocks, "Q8_0", x)
    bad = []

    def loop(f, want):
        for _ in range(200):
            if not np.array_equal(f(), want):
                bad.append(f)
    threads = [threading.Thread(target=loop, args=(lambda: K.moe_forward(w["layer"], x, ids, weights), want_moe)),
               threading.Thread(target=loop, args=(lambda: K.linear(blocks, "Q8_0", x), want_lin))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not bad


# ---------------------------------------------------------------- Q4_0_R8 (repacked Q4_0)

def test_repack_layout_and_dequantize():
    rng = np.random.default_rng(11)
    q = K.quantize((rng.standard_normal((3, 16, 160)) * 0.05).astype(np.float32), "Q4_0")
    r8 = K.repack(q, "Q4_0")
    assert r8.shape == q.shape and not np.array_equal(r8, q)
    np.testing.assert_array_equal(unpack_r8(r8), q)                        # the documented layout
    np.testing.assert_array_equal(K.dequantize(r8, "Q4_0_R8"), gguf.quants.dequantize(q, GQT.Q4_0))
    out = np.zeros_like(q)
    view = out[1]
    assert K.repack(q[1], "Q4_0", out=view) is view
    np.testing.assert_array_equal(out[1], r8[1])


def test_repack_q4_k_layout_and_dequantize():
    """Q4_K_R8 decodes to exactly what gguf decodes its Q4_K source to; its bytes are the documented layout."""
    rng = np.random.default_rng(13)
    q = K.quantize((rng.standard_normal((2, 16, 512)) * 0.05).astype(np.float32), "Q4_K")
    r8 = K.repack(q, "Q4_K")
    assert r8.shape == (2, 16, 2 * 148)
    np.testing.assert_array_equal(unpack_k_r8(r8), q)                      # the documented layout
    np.testing.assert_array_equal(K.dequantize(r8, "Q4_K_R8"), gguf.quants.dequantize(q, GQT.Q4_K))
    with pytest.raises(ValueError, match="12 rows is not a multiple of 8"):
        K.repack(q[0, :12], "Q4_K")
    with pytest.raises(ValueError, match="Q4_K_R8 is a kernel layout; quantize to Q4_K and repack"):
        K.quantize(np.ones((8, 256), np.float32), "Q4_K_R8")


def test_repack_bad_arguments():
    q = K.quantize(np.ones((16, 64), np.float32), "Q4_0")
    with pytest.raises(ValueError, match="12 rows is not a multiple of 8"):
        K.repack(q[:12], "Q4_0")
    with pytest.raises(ValueError, match="Q8_0 has no repacked layout"):
        K.repack(K.quantize(np.ones((8, 64), np.float32), "Q8_0"), "Q8_0")
    with pytest.raises(ValueError, match="overlaps"):
        K.repack(q, "Q4_0", out=q)
    with pytest.raises(ValueError, match="out: shape"):
        K.repack(q, "Q4_0", out=np.empty((8, 36), np.uint8))
    with pytest.raises(ValueError, match="quantize to Q4_0 and repack"):
        K.quantize(np.ones((8, 64), np.float32), "Q4_0_R8")
    r8 = K.repack(q, "Q4_0")
    with pytest.raises(ValueError, match="12 rows is not a multiple of the Q4_0_R8 row group 8"):
        K.dequantize(r8[:12], "Q4_0_R8")
    with pytest.raises(ValueError, match="12 rows is not a multiple of the Q4_0_R8 row group"):
        K.linear(r8[:12], "Q4_0_R8", np.ones((1, 64), np.float32))
    lib = K._default   # the C side refuses too
    with pytest.raises(K.KernelError, match="not a multiple of 8"):
        lib.check(lib.lib.hk2_repack_q4_0_r8(lib._ptr(q, "const void *"), 12, 64, lib._ptr(r8, "void *")), "repack")
    with pytest.raises(K.KernelError, match="row group 8"):
        lib.check(lib.lib.hk2_linear(1002, lib._ptr(r8, "const void *"), 12, 64, 1,
                                      lib._ptr(np.ones(64, np.float32), "const float *"),
                                      lib._ptr(np.empty(12, np.float32), "float *")), "linear")


def test_expert_weights_repacked_runs_the_same_experts():
    rng = np.random.default_rng(12)
    w = make_experts(rng, "Q4_0", "Q8_0", 4, 96, 64)
    layer = w["layer"]
    r = layer.repacked()
    assert (r.gate_type.name, r.up_type.name, r.down_type.name) == ("Q4_0_R8", "Q4_0_R8", "Q8_0")
    assert r.blocks("down") is layer.blocks("down")                         # nothing to repack: not copied
    np.testing.assert_array_equal(unpack_r8(r.blocks("gate")), w["raw"][0])
    x = rng.standard_normal((5, 96)).astype(np.float32)
    ids, weights = routing(rng, 5, 4, 2, repeats=False)
    assert_close_to_reference(K.moe_forward(r, x, ids, weights), moe_reference(w, x, ids, weights), "repacked")
    with pytest.raises(ValueError, match="must share a row layout"):
        K.ExpertWeights(r.blocks("gate"), w["raw"][1], w["raw"][2], "Q4_0_R8", "Q4_0", "Q8_0")
