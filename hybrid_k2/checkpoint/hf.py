"""HF safetensors checkpoint dir -> logical tensors under canonical HF names.

Storage forms understood (all dequantised in `get`, one tensor at a time, from the mmap):
  plain        X                      F32 / BF16 / F16 / F64
  fp8_block    X.weight F8_E4M3 + X.weight_scale_inv F32 [ceil(out/bo), ceil(in/bi)]
               (DeepSeek-V3 / Kimi-K2: w = fp8 * scale_inv per bo x bi block, edge blocks partial)
  int4_group   X.weight_packed I32 [out, ceil(in/8)] + X.weight_scale [out, ceil(in/g)]
               + X.weight_shape [2] (compressed-tensors "pack-quantized", Kimi-K2-Thinking experts)
"""
from __future__ import annotations

import glob
import json
import math
import os

import torch

from . import Checkpoint, CheckpointError, Int4Weight
from .safetensors import SafetensorsFile

INDEX_FILE = "model.safetensors.index.json"
FLOAT_FORMATS = {"F32": "f32", "BF16": "bf16", "F16": "f16", "F64": "f64"}
INT4_PARTS = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point", "weight_g_idx")
DEFAULT_FP8_BLOCK = (128, 128)
DEFAULT_INT4_GROUP = 32


class HFCheckpoint(Checkpoint):
    def __init__(self, path: str | os.PathLike):
        path = os.fspath(path)
        self.path = path
        self._files: dict[str, SafetensorsFile] = {}  # shard file name -> opened file (lazily)
        self._quant = None
        self._closed = False
        if os.path.isfile(path) and path.endswith(".safetensors"):  # a lone file
            self.dir, shards = os.path.dirname(path) or ".", [os.path.basename(path)]
        elif os.path.isdir(path):
            self.dir, shards = path, None
        else:
            raise CheckpointError(f"{path}: not a checkpoint directory or .safetensors file")

        index_path = os.path.join(self.dir, INDEX_FILE)
        if shards is None and os.path.isfile(index_path):
            self._where = self._read_index(index_path)
        else:
            if shards is None:
                single = os.path.join(self.dir, "model.safetensors")
                shards = (["model.safetensors"] if os.path.isfile(single) else
                          sorted(os.path.basename(p) for p in glob.glob(os.path.join(self.dir, "*.safetensors"))))
                if not shards:
                    raise CheckpointError(f"{path}: no {INDEX_FILE}, model.safetensors or *.safetensors files")
            self._where = {}
            for shard in shards:
                for n in self._file(shard).names():
                    if n in self._where:
                        raise CheckpointError(f"{path}: tensor {n!r} is in both {self._where[n]} and {shard}")
                    self._where[n] = shard
        self._build_logical()

    # ---- physical layer ------------------------------------------------------------------
    def _read_index(self, index_path: str) -> dict[str, str]:
        try:
            with open(index_path) as f:
                weight_map = json.load(f)["weight_map"]
            assert isinstance(weight_map, dict) and all(isinstance(v, str) for v in weight_map.values())
        except (OSError, ValueError, KeyError, TypeError, AssertionError) as e:
            raise CheckpointError(f"{index_path}: unreadable index (needs a weight_map of name -> shard): {e!r}") from e
        for shard in sorted(set(weight_map.values())):
            if not os.path.isfile(os.path.join(self.dir, shard)):
                raise CheckpointError(f"{index_path}: shard {shard!r} named in the index is missing from {self.dir}")
        return weight_map

    def _file(self, shard: str) -> SafetensorsFile:
        f = self._files.get(shard)
        if f is None:
            if self._closed:
                raise CheckpointError(f"{self.path}: checkpoint is closed")
            f = self._files[shard] = SafetensorsFile(os.path.join(self.dir, shard))
        return f

    def _locate(self, phys: str) -> SafetensorsFile:
        shard = self._where.get(phys)
        if shard is None:
            raise CheckpointError(f"{self.path}: no tensor {phys!r}")
        f = self._file(shard)
        if phys not in f:
            raise CheckpointError(f"{f.path}: tensor {phys!r} is listed in {INDEX_FILE} but not in the shard")
        return f

    def raw(self, phys: str) -> torch.Tensor:
        """Zero-copy read-only view of a physical (stored) tensor, e.g. 'X.weight_packed'."""
        return self._locate(phys).view(phys)

    def raw_info(self, phys: str) -> tuple[str, tuple[int, ...]]:
        return self._locate(phys).info(phys)

    def physical_names(self) -> list[str]:
        return list(self._where)

    # ---- logical layer -------------------------------------------------------------------
    def _build_logical(self) -> None:
        phys = set(self._where)
        hidden, int4 = set(), set()
        for n in phys:
            if n.endswith(".weight_packed"):
                base = n[: -len("_packed")]
                if base in phys:
                    raise CheckpointError(f"{self.path}: both {base!r} and {n!r} are stored; which one is the weight?")
                int4.add(base)
                hidden.update(f"{base[: -len('weight')]}{p}" for p in INT4_PARTS)
            elif n.endswith(".weight_scale_inv") and n[: -len("_scale_inv")] in phys:
                hidden.add(n)
        self._int4 = int4
        self._names = sorted((phys - hidden) | int4)
        self._name_set = set(self._names)

    def names(self) -> list[str]:
        return list(self._names)

    def __contains__(self, name: object) -> bool:
        return name in self._name_set

    def _check(self, name: str) -> None:
        if name not in self._name_set:
            raise CheckpointError(f"{self.path}: checkpoint has no tensor {name!r}")

    def format(self, name: str) -> str:
        self._check(name)
        if name in self._int4:
            return "int4_group"
        dtype, _ = self.raw_info(name)
        if dtype == "F8_E4M3":
            return "fp8_block"
        return FLOAT_FORMATS.get(dtype, dtype.lower())

    def shape(self, name: str) -> tuple[int, ...]:
        self._check(name)
        if name in self._int4:
            return self._int4_shape(name)
        return self.raw_info(name)[1]

    def get(self, name: str, dtype: torch.dtype = torch.float32, device="cpu") -> torch.Tensor:
        w = self._get(name, dtype, device)
        # loading walks the whole checkpoint once: keep only the dequantised copy resident, not the file pages
        for phys in (name, name + "_scale_inv", name + "_packed", name + "_scale"):
            if phys in self._where:
                self._locate(phys).release(phys)
        return w

    def _get(self, name: str, dtype: torch.dtype, device) -> torch.Tensor:
        self._check(name)
        if name in self._int4:
            w = self._int4_get(name, device)
        else:
            sdtype, _ = self.raw_info(name)
            if sdtype in ("F8_E4M3", "F8_E5M2"):
                w = self._fp8_get(name, sdtype, device)
            elif sdtype in FLOAT_FORMATS:
                view = self.raw(name)
                w = view.to(device=device, dtype=dtype)
                if w.data_ptr() == view.data_ptr() and w.numel():
                    w = w.clone()  # never hand out the read-only mapping
                return w
            else:
                raise CheckpointError(f"{self.path}: tensor {name!r} is stored as {sdtype}, not a float weight")
        return w.to(dtype)

    # ---- FP8 block ------------------------------------------------------------------------
    def _fp8_get(self, name: str, sdtype: str, device) -> torch.Tensor:
        scale_name = name + "_scale_inv"
        w8 = self.raw(name)
        if sdtype != "F8_E4M3" or scale_name not in self._where:
            raise CheckpointError(
                f"{self.path}: tensor {name!r} is {sdtype} without a {scale_name!r} block scale; "
                "only F8_E4M3 with weight_scale_inv is supported")
        if w8.ndim != 2:
            raise CheckpointError(f"{self.path}: FP8 tensor {name!r} has shape {tuple(w8.shape)}, expected 2-D")
        out, inp = w8.shape
        bo, bi = self._quant_config()["fp8_block"]
        s_dtype, s_shape = self.raw_info(scale_name)
        want = (math.ceil(out / bo), math.ceil(inp / bi))
        if s_dtype not in FLOAT_FORMATS or s_shape != want:
            raise CheckpointError(
                f"{self.path}: {scale_name!r} is {s_dtype}{list(s_shape)}, expected float {list(want)} "
                f"for {name!r} [{out}, {inp}] with {bo}x{bi} blocks")
        w = w8.to(device).to(torch.float32)
        s = self.raw(scale_name).to(device=device, dtype=torch.float32)
        s_cols = s.repeat_interleave(bi, dim=1)[:, :inp]  # [row blocks, in], small
        full = out // bo
        w[: full * bo].view(full, bo, inp).mul_(s_cols[:full, None, :])
        if full * bo < out:  # partial last row block
            w[full * bo:].mul_(s_cols[full])
        return w

    # ---- INT4 group (compressed-tensors pack-quantized) ----------------------------------
    def _int4_shape(self, name: str) -> tuple[int, int]:
        shape_name = name + "_shape"
        if shape_name not in self._where:
            raise CheckpointError(f"{self.path}: INT4 tensor {name!r} has no {shape_name!r}")
        sdtype, sshape = self.raw_info(shape_name)
        if sdtype not in ("I32", "I64") or sshape != (2,):
            raise CheckpointError(f"{self.path}: {shape_name!r} is {sdtype}{list(sshape)}, expected I32/I64 [2]")
        out, inp = (int(v) for v in self.raw(shape_name).tolist())
        if out <= 0 or inp <= 0:
            raise CheckpointError(f"{self.path}: {shape_name!r} holds a bad shape ({out}, {inp})")
        return out, inp

    def get_int4(self, name: str) -> Int4Weight:
        """Unsigned nibbles q uint8 [out, in] (value = q - 8), scale f32 [out, ngroups], group size."""
        self._check(name)
        if name not in self._int4:
            raise CheckpointError(f"{self.path}: tensor {name!r} is {self.format(name)}, not INT4 pack-quantized")
        out, inp = self._int4_shape(name)
        packed_name, scale_name = name + "_packed", name + "_scale"
        pdtype, pshape = self.raw_info(packed_name)
        if pdtype != "I32" or pshape != (out, math.ceil(inp / 8)):
            raise CheckpointError(
                f"{self.path}: {packed_name!r} is {pdtype}{list(pshape)}, expected I32 [{out}, {math.ceil(inp / 8)}]")
        for extra in ("_zero_point", "_g_idx"):
            if name + extra in self._where:
                raise CheckpointError(f"{self.path}: {name + extra!r}: asymmetric / act-order INT4 is not supported")
        if scale_name not in self._where:
            raise CheckpointError(f"{self.path}: INT4 tensor {name!r} has no {scale_name!r}")
        sdtype, sshape = self.raw_info(scale_name)
        q = self._quant_config()
        if q["int4_bits"] != 4:
            raise CheckpointError(f"{self.path}: {packed_name!r}: only 4-bit pack-quantized is supported, "
                                  f"config says num_bits={q['int4_bits']}")
        group = next((g or inp for g in q["int4_groups"] if sshape == (out, math.ceil(inp / (g or inp)))), None)
        if sdtype not in FLOAT_FORMATS or group is None:
            raise CheckpointError(
                f"{self.path}: {scale_name!r} is {sdtype}{list(sshape)}, expected float [{out}, ceil({inp}/group)] "
                f"for group size in {q['int4_groups']}")
        # pack_to_int32 (compressed-tensors, pack_quantized.py): q + 8 as an unsigned nibble, columns
        # zero-padded to a multiple of 8, nibble i of word j (bits 4i..4i+3) = column 8j + i. On a
        # little-endian host byte k of word j therefore holds columns 8j+2k (low) and 8j+2k+1 (high).
        # Groups: scale has ceil(in/g) columns (compressed-tensors' strategy_cdiv; older versions
        # required in % g == 0), so a last partial group is allowed.
        b = self.raw(packed_name).view(torch.uint8)  # [out, 4 * words]
        nib = torch.empty(out, b.shape[1] * 2, dtype=torch.uint8)
        torch.bitwise_and(b, 0x0F, out=nib[:, 0::2])
        torch.bitwise_right_shift(b, 4, out=nib[:, 1::2])
        nib = nib[:, :inp].contiguous() if nib.shape[1] != inp else nib
        return Int4Weight(nib, self.raw(scale_name).to(torch.float32), group)

    def _int4_get(self, name: str, device) -> torch.Tensor:
        q, s, g = self.get_int4(name)
        out, inp = q.shape
        w = q.to(device).to(torch.float32).sub_(8)
        s = s.to(device)
        full = inp // g
        w[:, : full * g].unflatten(1, (full, g)).mul_(s[:, :full, None])
        if full * g < inp:  # partial last group
            w[:, full * g:].mul_(s[:, full:full + 1])
        return w

    # ---- config.json quantization_config (read lazily, only when a quantised tensor needs it) ----
    def _quant_config(self) -> dict:
        if self._quant is None:
            qc, cfg_path = {}, os.path.join(self.dir, "config.json")
            if os.path.isfile(cfg_path):
                try:
                    with open(cfg_path) as f:
                        qc = json.load(f).get("quantization_config") or {}
                except (OSError, ValueError, AttributeError) as e:
                    raise CheckpointError(f"{cfg_path}: unreadable config: {e!r}") from e
            try:
                block = tuple(int(b) for b in qc.get("weight_block_size") or DEFAULT_FP8_BLOCK)
                weights = [g.get("weights") or {} for g in (qc.get("config_groups") or {}).values()]
                groups = [w.get("group_size") for w in weights if w.get("type", "int") == "int"]
                bits = {int(w.get("num_bits", 4)) for w in weights if w.get("type", "int") == "int"} or {4}
            except (AttributeError, TypeError, ValueError) as e:
                raise CheckpointError(f"{cfg_path}: malformed quantization_config: {e!r}") from e
            if len(block) != 2 or min(block) <= 0:
                raise CheckpointError(f"{cfg_path}: bad weight_block_size {block}")
            self._quant = {"fp8_block": block, "int4_groups": groups or [DEFAULT_INT4_GROUP],
                           "int4_bits": bits.pop() if len(bits) == 1 else sorted(bits)}
        return self._quant

    def close(self) -> None:
        self._closed = True
        for f in self._files.values():
            f.close()
        self._files.clear()

    def __repr__(self) -> str:
        return f"HFCheckpoint({self.path!r}, {len(self._names)} tensors)"
