"""IQ2_XXS IQ2_XS IQ2_S IQ3_XXS IQ3_S specifics (csrc/quants_iq23*.c) and the generated grid header
(csrc/iq_grids.h from tools/gen_iq_grids.py). The table-driven checks every type gets live in
test_block_types.py; here: the header is what the generator makes, edge blocks, one-block rows, na = 1..4."""
from __future__ import annotations

import os
import subprocess
import sys

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as GQT

from hybrid_k2 import kernels as K
from test_block_types import act_roundtrip, random_blocks, relerr

pytestmark = pytest.mark.usefixtures("kernel_defaults")   # conftest: variants, simde_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADER = os.path.join(ROOT, "csrc", "iq_grids.h")
IQ23 = ["IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S"]


def test_grid_header_is_what_the_generator_writes(tmp_path):
    out = tmp_path / "iq_grids.h"
    subprocess.run([sys.executable, os.path.join(ROOT, "tools", "gen_iq_grids.py"), "--out", str(out)], check=True)
    with open(HEADER, "rb") as f:
        committed = f.read()
    assert out.read_bytes() == committed, "csrc/iq_grids.h differs from tools/gen_iq_grids.py's output: regenerate it"


def _header_array(name: str) -> list[int]:
    text = open(HEADER, encoding="utf-8").read()
    body = text.split(f"_t {name}[", 1)[1].split("{", 1)[1].split("}", 1)[0]
    return [int(v, 16) for v in body.replace("\n", " ").split(",") if v.strip()]


def test_sign_table_matches_gguf_and_its_definition():
    ks = _header_array("hk2_ksigns")
    assert bytes(ks) == gguf.quants.IQ2_XXS.ksigns
    for i, v in enumerate(ks):
        assert v & 0x7F == i and bin(v).count("1") % 2 == 0


@pytest.mark.parametrize("name,cls,width", [
    ("hk2_iq2xxs_grid", "IQ2_XXS", 8), ("hk2_iq2xs_grid", "IQ2_XS", 8), ("hk2_iq2s_grid", "IQ2_S", 8),
    ("hk2_iq1s_grid", "IQ1_S", 8), ("hk2_iq3xxs_grid", "IQ3_XXS", 4), ("hk2_iq3s_grid", "IQ3_S", 4)])
def test_grid_entries_are_the_gguf_grid(name, cls, width):
    c = getattr(gguf.quants, cls)
    c.init_grid()
    ref = np.asarray(c.grid).reshape(-1, width)
    vals = np.array(_header_array(name), dtype=np.uint64)
    assert len(vals) == ref.shape[0]
    got = ((vals[:, None] >> (8 * np.arange(width, dtype=np.uint64))) & 0xFF).astype(np.uint8).view(np.int8)
    assert np.array_equal(got.astype(np.float32), ref)


# byte ranges of each type's scale fields: (offset, length, value OR-ed in) that set every scale to its maximum
MAX_SCALES = {
    "IQ2_XXS": [(2 + 8 * ib + 7, 1, 0xF0) for ib in range(8)],   # top nibble of each sub-block's second word
    "IQ2_XS": [(66, 8, 0xFF)],
    "IQ2_S": [(74, 8, 0xFF)],
    "IQ3_XXS": [(2 + 64 + 4 * ib + 3, 1, 0xF0) for ib in range(8)],
    "IQ3_S": [(106, 4, 0xFF)],
}


def _with_d(blocks: np.ndarray, qt: str, d: float) -> np.ndarray:
    t = K.QTYPES[qt]
    b = blocks.reshape(-1, t.block_bytes).copy()
    b[:, 0:2] = np.full((b.shape[0], 1), d, dtype=np.float16).view(np.uint8)
    return b.reshape(blocks.shape)


@pytest.mark.parametrize("qt", IQ23)
@pytest.mark.parametrize("d", [0.0, -0.0, 65504.0, -65504.0, 6e-8, 1.0, -3.25])
@pytest.mark.parametrize("body", ["zeros", "ones", "random"])
def test_dequantize_edge_blocks_equal_gguf(qt, d, body):
    rng = np.random.default_rng(3)
    t = K.QTYPES[qt]
    fill = {"zeros": np.zeros, "ones": lambda s, dtype: np.full(s, 0xFF, dtype)}.get(body)
    blocks = fill((4, 2 * t.block_bytes), dtype=np.uint8) if fill else random_blocks(rng, qt, 4, 512)
    blocks = _with_d(blocks, qt, d)
    out = K.dequantize(blocks, qt, (4, 512))
    ref = gguf.quants.dequantize(blocks, GQT[qt]).astype(np.float32)
    assert np.array_equal(out.view(np.uint32), ref.view(np.uint32)), f"{qt} d={d} {body}"


@pytest.mark.parametrize("qt", IQ23)
def test_dots_at_the_largest_integer_sums(variants, qt):
    """All scales at their maximum and activations of full magnitude carrying the weights' signs: every product
    adds up, the integer sums are at their largest (no int16 saturation, no int32 overflow)."""
    rng = np.random.default_rng(5)
    N, Kd = 6, 256 * 5
    blocks = random_blocks(rng, qt, N, Kd).reshape(N, -1, K.QTYPES[qt].block_bytes)
    for off, ln, v in MAX_SCALES[qt]:
        blocks[:, :, off:off + ln] |= np.uint8(v)
    blocks = blocks.reshape(N, -1)
    w = gguf.quants.dequantize(blocks, GQT[qt]).astype(np.float64)
    x = np.where(w[:4] < 0, -1.0, 1.0).astype(np.float32)   # row j of x matches row j of w's signs
    ref = act_roundtrip(x, 256) @ w.T
    assert np.all(np.diag(ref[:, :4]) > 0)
    for label, lib, isa in variants:
        lib.set_isa(isa)
        for T in (1, 2, 3, 4):
            y = lib.linear(blocks, qt, x[:T])
            assert relerr(y, ref[:T]) <= 1e-6, f"{qt} {label} T={T}: {relerr(y, ref[:T]):.2e}"


@pytest.mark.parametrize("qt", IQ23)
def test_one_block_rows_and_every_row_count(variants, qt):
    rng = np.random.default_rng(9)
    N = 5
    blocks = random_blocks(rng, qt, N, 256)
    w = gguf.quants.dequantize(blocks, GQT[qt]).astype(np.float64)
    x = rng.standard_normal((4, 256)).astype(np.float32)
    ref = act_roundtrip(x, 256) @ w.T
    zero = _with_d(blocks, qt, 0.0)
    for label, lib, isa in variants:
        lib.set_isa(isa)
        for T in (1, 2, 3, 4):
            y = lib.linear(blocks, qt, x[:T])
            assert relerr(y, ref[:T]) <= 1e-5, f"{qt} {label} T={T}: {relerr(y, ref[:T]):.2e}"
            assert np.array_equal(lib.linear(zero, qt, x[:T]), np.zeros((T, N), np.float32)), f"{qt} {label}: d = 0"


@pytest.mark.parametrize("qt", IQ23)
def test_quantize_is_refused_by_name(qt):
    with pytest.raises(K.KernelError, match=f"no quantizer for {qt}.*llama-quantize"):
        K.quantize(np.zeros((2, 256), np.float32), qt)
