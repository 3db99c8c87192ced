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
from test_kernels import _restore_defaults, simde_lib, simde_path, variants  # noqa: F401 (fixtures)

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
