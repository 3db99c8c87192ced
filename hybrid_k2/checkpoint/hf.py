"""HF safetensors checkpoint dir -> logical tensors under canonical HF names.

Storage forms understood (all dequantised in `get`, one tensor at a time, from the mmap):
  plain        X                      F32 / BF16 / F16 / F64
  fp8_block    X.weight F8_E4M3 + X.weight_scale_inv F32 [ceil(out/bo), ceil(in/bi)]
               (DeepSeek-V3 / Kimi-K2: w = fp8 * scale_inv per bo x bi block, edge blocks partial)
  int4_group   X.weight_packed I32 [out, ceil(in/8)] + X.weight_scale [out, ceil(in/g)]
               + X.weight_shape [2] (compressed-tensors "pack-quantized", Kimi-K2-Thinking experts)

Multimodal checkpoints (Kimi K2.5 / K2.6 / K2.7: KimiK25ForConditionalGeneration) hold the text model under a
prefix (text_model_name); their vision tower and projector are skipped.
"""
from __future__ import annotations

import glob
import json
import logging
import math
import os

import torch

from ..config import quantization_config
from . import Checkpoint, CheckpointError, Int4Weight
from .safetensors import SafetensorsFile

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
FLOAT_FORMATS = {"F32": "f32", "BF16": "bf16", "F16": "f16", "F64": "f64"}
INT4_PARTS = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point", "weight_g_idx")
DEFAULT_FP8_BLOCK = (128, 128)
DEFAULT_INT4_GROUP = 32
MAX_QUANT_BLOCK = 1 << 20   # no matrix side is larger (config.MAX_FFN); bigger blocks mean nothing
# Where multimodal wrappers keep the text model: Moonshot's files `language_model.` + the causal LM's names
# (language_model.model.layers.N..., language_model.lm_head.weight; some exports drop its `model.` level:
# language_model.layers.N...), transformers' composite layout `model.language_model.` + the decoder's names
# (model.language_model.layers.N..., lm_head.weight at the top)
TEXT_PREFIXES = ("language_model.", "model.language_model.")
CAUSAL_LM_PARTS = ("model.", "lm_head.")
VISION_PREFIXES = tuple(p + v for p in ("", "model.") for v in ("vision_tower.", "mm_projector.", "multi_modal_projector."))
IMAGES_NOTICE = "images are not supported; loading the text model"


def text_model_name(stored: str) -> str | None:
    """The canonical (DeepseekV3ForCausalLM) name of a stored tensor, None for the vision tower and projector."""
    if stored.startswith(VISION_PREFIXES):
        return None
    for prefix in TEXT_PREFIXES:
        if stored.startswith(prefix):
            rest = stored[len(prefix):]
            return rest if rest.startswith(CAUSAL_LM_PARTS) else "model." + rest
    return stored


def _size(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= MAX_QUANT_BLOCK


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _in_hf_blob_store(real: str) -> bool:
    """`real` is a file in a Hugging Face hub cache: .../models--ORG--NAME/blobs/HASH."""
    blobs = os.path.dirname(real)
    return os.path.basename(blobs) == "blobs" and os.path.basename(os.path.dirname(blobs)).startswith("models--")


def _finite_scales(s: torch.Tensor, path: str, name: str) -> torch.Tensor:
    """Block scales are read whole anyway; one that is NaN or infinite would turn its block into NaNs."""
    if not bool(torch.isfinite(s).all()):
        bad = int((~torch.isfinite(s)).sum())
        raise CheckpointError(f"{path}: tensor {name!r} holds {bad} scale(s) that are not finite (NaN or infinity)")
    return s


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
                if os.path.isdir(path):   # found by listing the directory (a file named by the caller is theirs)
                    self._confine(shard, f"{os.path.join(self.dir, shard)}")
                for n in self._file(shard).names():
                    if n in self._where:
                        raise CheckpointError(f"{path}: tensor {n!r} is in both {self._where[n]} and {shard}")
                    self._where[n] = shard
        self._map_text_model()
        self._build_logical()

    # ---- physical layer ------------------------------------------------------------------
    def _map_text_model(self) -> None:
        """Key the physical tensors by their canonical names (self._stored: canonical -> stored name where they
        differ), dropping the vision tower and projector with one notice."""
        where, stored, heads, skipped = {}, {}, {}, 0
        for s, shard in self._where.items():
            c = text_model_name(s)
            if c is None:
                skipped += 1
                continue
            if c in where:
                raise CheckpointError(f"{self.path}: tensors {stored.get(c, c)!r} ({where[c]}) and {s!r} ({shard}) "
                                      f"are both the text model's {c!r}; which one is it?")
            where[c] = shard
            if c != s:
                stored[c] = s
                head = next(h for h in CAUSAL_LM_PARTS if c.startswith(h))
                heads.setdefault(head, s[: len(s) - len(c) + len(head)])
        self._where, self._stored, self._heads = where, stored, heads
        self.vision_tensors = skipped
        if skipped:
            log.warning("%s: %s", self.path, IMAGES_NOTICE)

    def stored_name(self, name: str) -> str:
        """The name a canonical tensor has in the files (for a missing one: would have, by this checkpoint's
        prefix), e.g. language_model.model.layers.0.mlp.gate.weight for model.layers.0.mlp.gate.weight."""
        for suffix in ("", "_packed"):
            s = self._stored.get(name + suffix)
            if s is not None:
                return s[: len(s) - len(suffix)]
            if name + suffix in self._where:
                return name
        head = next((h for h in CAUSAL_LM_PARTS if name.startswith(h)), None)
        return self._heads[head] + name[len(head):] if head in self._heads else name

    def _named(self, name: str) -> str:
        """A tensor for messages: its stored name, and the canonical one beside it when they differ."""
        s = self.stored_name(name)
        return repr(s) if s == name else f"{s!r} ({name})"

    def _read_index(self, index_path: str) -> dict[str, str]:
        try:
            with open(index_path) as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:
            raise CheckpointError(f"{index_path}: unreadable index (needs a weight_map of name -> shard): {e!r}") from e
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            bad = next((k for k, v in weight_map.items() if not isinstance(v, str)), None) \
                if isinstance(weight_map, dict) else None
            raise CheckpointError(f"{index_path}: weight_map must map tensor names to shard file names"
                                  + (f"; entry {bad!r} is {weight_map[bad]!r}" if bad is not None else
                                     f", got {type(weight_map).__name__}"))
        first = {}
        for name, shard in weight_map.items():
            first.setdefault(shard, name)
        for shard, name in sorted(first.items()):
            self._confine(shard, f"{index_path}: weight_map entry {name!r} -> {shard!r}")
            if not os.path.isfile(os.path.join(self.dir, shard)):
                raise CheckpointError(f"{index_path}: shard {shard!r} named in the index is missing from {self.dir}")
        return weight_map

    def _confine(self, shard: str, where: str) -> None:
        """A shard must be a file of this directory: a relative name without '..' (so an index cannot point
        at /etc/passwd or ../other), whose real path (symlinks resolved) is inside the directory, or in a
        Hugging Face hub cache's blob store (the snapshot and --local-dir layouts of huggingface_hub link
        their files there)."""
        parts = shard.replace("\\", "/").split("/")
        if (not shard or "\0" in shard or os.path.isabs(shard) or shard.startswith(("/", "\\"))
                or any(p in ("", ".", "..") for p in parts) or os.path.splitdrive(shard)[0]):
            raise CheckpointError(f"{where}: a shard must be a relative path inside {self.dir} "
                                  f"(no absolute path, no '..')")
        root = os.path.realpath(self.dir)
        real = os.path.realpath(os.path.join(self.dir, shard))
        if _inside(real, root) or _in_hf_blob_store(real):
            return
        raise CheckpointError(f"{where}: the shard resolves to {real}, outside {root} (a symbolic link out of the "
                              f"checkpoint directory); copy the file into the directory instead")

    def _file(self, shard: str) -> SafetensorsFile:
        f = self._files.get(shard)
        if f is None:
            if self._closed:
                raise CheckpointError(f"{self.path}: checkpoint is closed")
            f = self._files[shard] = SafetensorsFile(os.path.join(self.dir, shard))
        return f

    def _locate(self, phys: str) -> tuple[SafetensorsFile, str]:
        """The open shard holding a physical tensor (canonical name) and its name there."""
        shard = self._where.get(phys)
        if shard is None:
            raise CheckpointError(f"{self.path}: no tensor {self._named(phys)}")
        f = self._file(shard)
        stored = self._stored.get(phys, phys)
        if stored not in f:
            raise CheckpointError(f"{f.path}: tensor {stored!r} is listed in {INDEX_FILE} but not in the shard")
        return f, stored

    def raw(self, phys: str) -> torch.Tensor:
        """Zero-copy read-only view of a physical tensor (canonical name), e.g. 'X.weight_packed'."""
        f, stored = self._locate(phys)
        return f.view(stored)

    def raw_info(self, phys: str) -> tuple[str, tuple[int, ...]]:
        f, stored = self._locate(phys)
        return f.info(stored)

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
                    raise CheckpointError(f"{self.path}: both {self._named(base)} and {self._named(n)} are stored; "
                                          f"which one is the weight?")
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
            raise CheckpointError(f"{self.path}: checkpoint has no tensor {self._named(name)}")

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
        self.release(name)
        return w

    def release(self, name: str) -> None:
        """Drop the file pages of a tensor (and its scales) once a copy is made: loading walks the whole
        checkpoint once, so only the loaded copy should stay resident."""
        for phys in (name, name + "_scale_inv", name + "_packed", name + "_scale"):
            if phys in self._where:
                f, stored = self._locate(phys)
                f.release(stored)

    @property
    def fp8_block(self) -> tuple[int, int]:
        """The FP8 weights' block (config.json quantization_config.weight_block_size; 128x128 by default)."""
        return tuple(self._quant_config()["fp8_block"])

    def fp8_weight(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """An FP8 matrix as stored: (float8_e4m3fn view of the file mapping, float32 block scales), checked as
        get() checks them. release(name) once it is copied."""
        self._check(name)
        sdtype, _ = self.raw_info(name)
        _, _, _, _, scale_name = self._fp8_layout(name, sdtype)
        if sdtype != "F8_E4M3":
            raise CheckpointError(f"{self.path}: tensor {self._named(name)} is {sdtype}; FP8 matrices are held as "
                                  f"F8_E4M3 only")
        return self.raw(name), _finite_scales(self.raw(scale_name).to(torch.float32), self.path,
                                              self.stored_name(scale_name))

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
                raise CheckpointError(f"{self.path}: tensor {self._named(name)} is stored as {sdtype}, not a float "
                                      f"weight")
        return w.to(dtype)

    def check_tensor(self, name: str) -> None:
        """Check from the headers (no data is read) that `name` is stored in a form `get` can read: a float
        dtype, FP8 with a block scale of the right shape, or INT4 with its packed words and group scales."""
        self._check(name)
        if name in self._int4:
            self._int4_layout(name)
            return
        sdtype, _ = self.raw_info(name)
        if sdtype in ("F8_E4M3", "F8_E5M2"):
            self._fp8_layout(name, sdtype)
        elif sdtype not in FLOAT_FORMATS:
            raise CheckpointError(f"{self.path}: tensor {self._named(name)} is stored as {sdtype}, not a float weight")

    # ---- FP8 block ------------------------------------------------------------------------
    def _fp8_layout(self, name: str, sdtype: str) -> tuple[int, int, int, int, str]:
        """(out, in, block rows, block cols, scale tensor name), checked from the headers."""
        scale_name = name + "_scale_inv"
        if sdtype != "F8_E4M3" or scale_name not in self._where:
            raise CheckpointError(
                f"{self.path}: tensor {self._named(name)} is {sdtype} without a {self._named(scale_name)} block scale; "
                "only F8_E4M3 with weight_scale_inv is supported")
        _, shape = self.raw_info(name)
        if len(shape) != 2:
            raise CheckpointError(f"{self.path}: FP8 tensor {self._named(name)} has shape {shape}, expected 2-D")
        out, inp = shape
        bo, bi = self._quant_config()["fp8_block"]
        s_dtype, s_shape = self.raw_info(scale_name)
        want = (math.ceil(out / bo), math.ceil(inp / bi))
        if s_dtype not in FLOAT_FORMATS or s_shape != want:
            raise CheckpointError(
                f"{self.path}: {self._named(scale_name)} is {s_dtype}{list(s_shape)}, expected float {list(want)} "
                f"for {self._named(name)} [{out}, {inp}] with {bo}x{bi} blocks")
        return out, inp, bo, bi, scale_name

    def _fp8_get(self, name: str, sdtype: str, device) -> torch.Tensor:
        out, inp, bo, bi, scale_name = self._fp8_layout(name, sdtype)
        s = _finite_scales(self.raw(scale_name).to(device=device, dtype=torch.float32), self.path,
                           self.stored_name(scale_name))
        w = self.raw(name).to(device).to(torch.float32)
        bo, bi = min(bo, out), min(bi, inp)   # a block larger than the matrix: one scale covers it
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
            raise CheckpointError(f"{self.path}: INT4 tensor {self._named(name)} has no {self._named(shape_name)}")
        sdtype, sshape = self.raw_info(shape_name)
        if sdtype not in ("I32", "I64") or sshape != (2,):
            raise CheckpointError(f"{self.path}: {self._named(shape_name)} is {sdtype}{list(sshape)}, expected "
                                  f"I32/I64 [2]")
        out, inp = (int(v) for v in self.raw(shape_name).tolist())
        if out <= 0 or inp <= 0:
            raise CheckpointError(f"{self.path}: {self._named(shape_name)} holds a bad shape ({out}, {inp})")
        return out, inp

    def _int4_layout(self, name: str) -> tuple[int, int, int]:
        """(out, in, group size) of an INT4 tensor, its packed words and scales checked from the headers."""
        out, inp = self._int4_shape(name)
        packed_name, scale_name = name + "_packed", name + "_scale"
        pdtype, pshape = self.raw_info(packed_name)
        if pdtype != "I32" or pshape != (out, math.ceil(inp / 8)):
            raise CheckpointError(
                f"{self.path}: {self._named(packed_name)} is {pdtype}{list(pshape)}, expected I32 "
                f"[{out}, {math.ceil(inp / 8)}]")
        for extra in ("_zero_point", "_g_idx"):
            if name + extra in self._where:
                raise CheckpointError(f"{self.path}: {self._named(name + extra)}: asymmetric / act-order INT4 is "
                                      f"not supported")
        if scale_name not in self._where:
            raise CheckpointError(f"{self.path}: INT4 tensor {self._named(name)} has no {self._named(scale_name)}")
        sdtype, sshape = self.raw_info(scale_name)
        q = self._quant_config()
        if q["int4_bits"] != 4:
            raise CheckpointError(f"{self.path}: {self._named(packed_name)}: only 4-bit pack-quantized is supported, "
                                  f"config says num_bits={q['int4_bits']}")
        group = next((g or inp for g in q["int4_groups"] if sshape == (out, math.ceil(inp / (g or inp)))), None)
        if sdtype not in FLOAT_FORMATS or group is None:
            raise CheckpointError(
                f"{self.path}: {self._named(scale_name)} is {sdtype}{list(sshape)}, expected float "
                f"[{out}, ceil({inp}/group)] "
                f"for group size in {q['int4_groups']}")
        return out, inp, group

    def get_int4(self, name: str) -> Int4Weight:
        """Unsigned nibbles q uint8 [out, in] (value = q - 8), scale f32 [out, ngroups], group size."""
        self._check(name)
        if name not in self._int4:
            raise CheckpointError(f"{self.path}: tensor {self._named(name)} is {self.format(name)}, not INT4 "
                                  f"pack-quantized")
        out, inp, group = self._int4_layout(name)
        packed_name, scale_name = name + "_packed", name + "_scale"
        # pack_to_int32 (compressed-tensors, pack_quantized.py): q + 8 as an unsigned nibble, columns
        # zero-padded to a multiple of 8, nibble i of word j (bits 4i..4i+3) = column 8j + i. On a
        # little-endian host byte k of word j therefore holds columns 8j+2k (low) and 8j+2k+1 (high).
        # Groups: scale has ceil(in/g) columns (compressed-tensors' strategy_cdiv; older versions
        # required in % g == 0), so a last partial group is allowed.
        scale = _finite_scales(self.raw(scale_name).to(torch.float32), self.path, self.stored_name(scale_name))
        b = self.raw(packed_name).view(torch.uint8)  # [out, 4 * words]
        nib = torch.empty(out, b.shape[1] * 2, dtype=torch.uint8)
        torch.bitwise_and(b, 0x0F, out=nib[:, 0::2])
        torch.bitwise_right_shift(b, 4, out=nib[:, 1::2])
        nib = nib[:, :inp].contiguous() if nib.shape[1] != inp else nib
        return Int4Weight(nib, scale, group)

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
                        d = json.load(f)
                    if not isinstance(d, dict):
                        raise ValueError(f"the config is a JSON {type(d).__name__}, not an object")
                    qc = quantization_config(d) or {}   # text_config's own, else the wrapper's
                except (OSError, ValueError, AttributeError, RecursionError) as e:
                    raise CheckpointError(f"{cfg_path}: unreadable config: {e!r}") from e
            try:
                if not isinstance(qc, dict):
                    raise TypeError(f"quantization_config is {type(qc).__name__}, not an object")
                block = tuple(qc.get("weight_block_size") or DEFAULT_FP8_BLOCK)
                groups_cfg = qc.get("config_groups") or {}
                weights = [g.get("weights") or {} for g in groups_cfg.values()]
                ints = [w for w in weights if w.get("type", "int") == "int"]
                groups = [w.get("group_size") for w in ints]
                bits = {w.get("num_bits", 4) for w in ints} or {4}
            except (AttributeError, TypeError, ValueError) as e:
                raise CheckpointError(f"{cfg_path}: malformed quantization_config: {e!r}") from e
            if len(block) != 2 or not all(_size(b) for b in block):
                raise CheckpointError(f"{cfg_path}: quantization_config.weight_block_size must be two integers in "
                                      f"1..{MAX_QUANT_BLOCK}, got {list(block)}")
            if not all(g is None or _size(g) for g in groups) or not all(_size(b) for b in bits):
                raise CheckpointError(f"{cfg_path}: quantization_config.config_groups: group_size must be null or an "
                                      f"integer in 1..{MAX_QUANT_BLOCK} and num_bits an integer, got group sizes "
                                      f"{groups}, num_bits {sorted(bits, key=repr)}")
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
