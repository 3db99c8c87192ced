"""GGUFCheckpoint: a llama.cpp `deepseek2` GGUF file read under the canonical HF DeepseekV3 names.

The layout and metadata follow llama.cpp (src/models/deepseek2.cpp `load_arch_hparams` /
`load_arch_tensors`, convert_hf_to_gguf.py `DeepseekV2Model`):
  * tensor dims are stored reversed (ne0 = the contiguous row length first); `shape()` here is the
    numpy/torch order, so `blk.N.ffn_gate_exps` with ne [H, inter, E] is [E, inter, H];
  * MLA: current converters split HF `kv_b_proj` [n_head*(nope+v), kv_lora] into
    `attn_k_b` [n_head, kv_lora, nope] (k part transposed) and `attn_v_b` [n_head, v, kv_lora];
    old files carry `attn_kv_b` as is. Either way `...self_attn.kv_b_proj.weight` is exposed;
  * routed experts are 3D stacks `ffn_{gate,up,down}_exps` (or a fused `ffn_gate_up_exps`, gate rows
    first); each expert is exposed as `model.layers.L.mlp.experts.E.{gate,up,down}_proj.weight` and
    `expert_blocks(L)` hands the raw quantized stacks to the CPU kernels without a copy.
"""
from __future__ import annotations

import mmap
import os
import re
import struct
import weakref

import numpy as np
import torch

from ..config import ConfigError
from . import Checkpoint, CheckpointConfigError, CheckpointError, check_config_against, mapped

try:
    import gguf
    from gguf import GGMLQuantizationType, GGUFReader
    from gguf.constants import GGML_QUANT_SIZES
except ImportError as e:  # pragma: no cover - gguf is a hard dependency (setup.py)
    raise ImportError("reading .gguf files needs the `gguf` package (pip install gguf)") from e

ARCH = "deepseek2"

# llama.cpp LLAMA_EXPERT_GATING_FUNC_TYPE_*: 1 softmax, 2 sigmoid (0 = unset -> softmax, llama.cpp's
# fallback for DeepSeek-V2 files written before the key existed).
GATING_FUNCS = {1: "softmax", 2: "sigmoid"}

_GLOBAL = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# blk.N.<key> -> model.layers.N.<value>
_LAYER = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q_a.weight": "self_attn.q_a_proj.weight",
    "attn_q_a_norm.weight": "self_attn.q_a_layernorm.weight",
    "attn_q_b.weight": "self_attn.q_b_proj.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_kv_a_mqa.weight": "self_attn.kv_a_proj_with_mqa.weight",
    "attn_kv_a_norm.weight": "self_attn.kv_a_layernorm.weight",
    "attn_kv_b.weight": "self_attn.kv_b_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "ffn_gate_inp.weight": "mlp.gate.weight",
    "exp_probs_b.bias": "mlp.gate.e_score_correction_bias",
    "ffn_gate_shexp.weight": "mlp.shared_experts.gate_proj.weight",
    "ffn_up_shexp.weight": "mlp.shared_experts.up_proj.weight",
    "ffn_down_shexp.weight": "mlp.shared_experts.down_proj.weight",
}
_EXPERT_STACKS = {"ffn_gate_exps.weight": "gate", "ffn_up_exps.weight": "up", "ffn_down_exps.weight": "down"}
_FUSED_GATE_UP = "ffn_gate_up_exps.weight"
_BLK = re.compile(r"blk\.(\d+)\.(.+)")
_EXPERT = re.compile(r"model\.layers\.(0|[1-9]\d{0,8})\.mlp\.experts\.(0|[1-9]\d{0,8})\.(gate|up|down)_proj\.weight")


def _layer_index(digits: str) -> int:
    return int(digits) if len(digits) <= 9 else 1 << 40   # (int() refuses 4300+ digits; any such index is too big)

# HF config field -> the GGUF metadata it is read from (config_dict), for messages
_CONFIG_KEYS = {
    "vocab_size": f"{ARCH}.vocab_size / tokenizer.ggml.tokens", "hidden_size": f"{ARCH}.embedding_length",
    "intermediate_size": f"{ARCH}.feed_forward_length", "moe_intermediate_size": f"{ARCH}.expert_feed_forward_length",
    "num_hidden_layers": f"{ARCH}.block_count", "num_attention_heads": f"{ARCH}.attention.head_count",
    "q_lora_rank": f"{ARCH}.attention.q_lora_rank", "kv_lora_rank": f"{ARCH}.attention.kv_lora_rank",
    "qk_nope_head_dim": f"{ARCH}.attention.key_length_mla - {ARCH}.rope.dimension_count",
    "qk_rope_head_dim": f"{ARCH}.rope.dimension_count", "v_head_dim": f"{ARCH}.attention.value_length_mla",
    "n_routed_experts": f"{ARCH}.expert_count", "num_experts_per_tok": f"{ARCH}.expert_used_count",
    "n_shared_experts": f"{ARCH}.expert_shared_count", "first_k_dense_replace": f"{ARCH}.leading_dense_block_count",
    "n_group": f"{ARCH}.expert_group_count", "topk_group": f"{ARCH}.expert_group_used_count",
    "routed_scaling_factor": f"{ARCH}.expert_weights_scale", "rms_norm_eps": f"{ARCH}.attention.layer_norm_rms_epsilon",
    "rope_theta": f"{ARCH}.rope.freq_base", "max_position_embeddings": f"{ARCH}.context_length",
    "num_nextn_predict_layers": f"{ARCH}.nextn_predict_layers",
    "rope_scaling.factor": f"{ARCH}.rope.scaling.factor",
    "rope_scaling.original_max_position_embeddings": f"{ARCH}.rope.scaling.original_context_length",
    "rope_scaling.beta_fast": f"{ARCH}.rope.scaling.yarn_beta_fast",
    "rope_scaling.beta_slow": f"{ARCH}.rope.scaling.yarn_beta_slow",
    "rope_scaling.mscale": f"{ARCH}.rope.scaling.yarn_log_multiplier",
    "rope_scaling.mscale_all_dim": f"{ARCH}.rope.scaling.yarn_log_multiplier",
    "rope_scaling.attention_factor": f"{ARCH}.rope.scaling.yarn_attn_factor",
    "bos_token_id": "tokenizer.ggml.bos_token_id", "eos_token_id": "tokenizer.ggml.eos_token_id",
}

# tokenizer.ggml.token_type values (llama.cpp llama_token_type)
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6


def qtype_name(qtype: int) -> str:
    return GGMLQuantizationType(qtype).name.lower()


# GGUF metadata value type ids (gguf GGUFValueType): bytes of each scalar; 8 = string, 9 = array
_SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY, _UINT32 = 8, 9, 4
_QUANT_SIZES = {int(k): v for k, v in GGML_QUANT_SIZES.items()}
MAX_DIMS = 4   # GGML_MAX_DIMS


class _BadHeader(Exception):
    pass


class _Cursor:
    def __init__(self, buf):
        self.buf, self.pos, self.size = buf, 0, len(buf)

    def take(self, n: int, what: str) -> int:
        if n > self.size - self.pos:
            raise _BadHeader(f"{what} at byte {self.pos} needs {n} bytes; the file has {self.size} (truncated?)")
        p, self.pos = self.pos, self.pos + n
        return p

    def u32(self, what: str) -> int:
        return struct.unpack_from("<I", self.buf, self.take(4, what))[0]

    def u64(self, what: str) -> int:
        return struct.unpack_from("<Q", self.buf, self.take(8, what))[0]

    def string(self, what: str, decode: bool = True) -> str | None:
        n = self.u64(f"{what} (length)")
        p = self.take(n, what)
        if not decode:
            return None
        try:
            return bytes(self.buf[p:p + n]).decode("utf-8")
        except UnicodeDecodeError:
            raise _BadHeader(f"{what} at byte {p} is not valid UTF-8") from None


def scan_header(buf) -> list[tuple[str, int, tuple[int, ...], int, int]]:
    """Validate a GGUF file's whole header against the file before anything is parsed into objects, so that no
    count, length or size read from it can make the reader loop or allocate past what the file holds; returns
    [(tensor name, GGML type, dims (ne order), data offset, bytes)]. Rules are llama.cpp's (ggml/src/gguf.cpp):
    version 2 or 3, little-endian; no nested arrays; known value and tensor types; at most 4 dims, rows of whole
    blocks, sizes that fit int64; general.alignment a power of two; and the tensors stored in header order,
    each at the aligned end of the one before (a retyped or resized tensor, or an offset into another tensor,
    breaks that chain and is refused), all inside the file."""
    h = _Cursor(buf)
    if h.size < 8 or bytes(buf[:4]) != b"GGUF":
        raise _BadHeader("no GGUF magic")
    h.take(4, "magic")
    version = h.u32("version")
    if version & 0xFFFF == 0 and version:
        raise _BadHeader("big-endian GGUF files are not supported")
    if version not in (2, 3):
        raise _BadHeader(f"GGUF version {version} is not supported (2 or 3)")
    n_tensors, n_kv = h.u64("tensor count"), h.u64("metadata key count")
    room = h.size - h.pos
    if n_kv > room // 13 or n_tensors > room // 24:   # smallest key-value: 13 bytes; tensor info: 24
        raise _BadHeader(f"the header claims {n_tensors} tensors and {n_kv} metadata keys; a {h.size}-byte file "
                         f"cannot hold that many")
    keys: dict[str, int] = {}
    alignment = 32   # GGUF_DEFAULT_ALIGNMENT
    for i in range(n_kv):
        key = h.string(f"metadata key {i}")
        if key in keys:
            raise _BadHeader(f"metadata key {key!r} appears twice")
        vtype = h.u32(f"type of metadata key {key!r}")
        if vtype == _ARRAY:
            itype, count = h.u32(f"item type of {key!r}"), h.u64(f"item count of {key!r}")
            if itype == _STRING:
                if count > (h.size - h.pos) // 8:
                    raise _BadHeader(f"metadata key {key!r} claims {count} strings; the file cannot hold them")
                for j in range(count):
                    h.string(f"{key!r}[{j}]", decode=False)
            elif itype in _SCALAR_BYTES:
                h.take(count * _SCALAR_BYTES[itype], f"the {count} values of {key!r}")
            else:
                raise _BadHeader(f"metadata key {key!r} is an array of type {itype}"
                                 f"{' (nested arrays are not supported)' if itype == _ARRAY else ', unknown'}")
        elif vtype == _STRING:
            h.string(f"value of {key!r}", decode=False)
        elif vtype in _SCALAR_BYTES:
            p = h.take(_SCALAR_BYTES[vtype], f"value of {key!r}")
            if key == "general.alignment":
                alignment = struct.unpack_from("<I", buf, p)[0] if vtype == _UINT32 else None
                if alignment is None or alignment == 0 or alignment & (alignment - 1):
                    raise _BadHeader("general.alignment must be a uint32 power of two")
        else:
            raise _BadHeader(f"metadata key {key!r} has unknown value type {vtype}")
        keys[key] = vtype
    tensors, names = [], set()
    for i in range(n_tensors):
        name = h.string(f"name of tensor {i}")
        if name in names:
            raise _BadHeader(f"tensor {name!r} appears twice")
        names.add(name)
        nd = h.u32(f"dimension count of tensor {name!r}")
        if nd > MAX_DIMS:
            raise _BadHeader(f"tensor {name!r} has {nd} dimensions; GGML has at most {MAX_DIMS}")
        dims = tuple(h.u64(f"dimension {j} of tensor {name!r}") for j in range(nd))
        qtype, offset = h.u32(f"type of tensor {name!r}"), h.u64(f"data offset of tensor {name!r}")
        if qtype not in _QUANT_SIZES:
            raise _BadHeader(f"tensor {name!r} has unknown GGML type id {qtype}")
        block, type_size = _QUANT_SIZES[qtype]
        n = 1
        for d in dims:
            n *= max(d, 1)
        if n >= 1 << 63:
            raise _BadHeader(f"tensor {name!r} dimensions {list(dims)} overflow int64")
        if (dims[0] if dims else 1) % block:
            raise _BadHeader(f"tensor {name!r}: rows of {dims[0] if dims else 1} values are not whole "
                             f"{GGMLQuantizationType(qtype).name} blocks of {block}")
        n = 0 if 0 in dims else n
        tensors.append((name, qtype, dims, offset, n // block * type_size))
    data_start = -(-h.pos // alignment) * alignment
    expected, before = 0, None
    for name, qtype, dims, offset, nbytes in tensors:
        if offset != expected:
            after = f"the aligned end of {before!r}" if before else "the start of the data section"
            raise _BadHeader(f"tensor {name!r} has data offset {offset}, but {after} is {expected}: tensors are "
                             f"stored in header order without gaps, so a tensor before it was retyped or resized, "
                             f"or this offset points elsewhere (into another tensor?)")
        end = data_start + offset + nbytes
        if end > h.size:
            raise _BadHeader(f"tensor {name!r}: data ends at byte {end} but the file has {h.size} bytes (truncated?)")
        expected, before = offset + -(-nbytes // alignment) * alignment, name
    # writers (gguf-py, llama.cpp) pad every tensor, the last one too, so the file ends at `expected`:
    # anything after it means the last tensor was retyped or resized smaller (or bytes were appended)
    if tensors and h.size > data_start + expected:
        raise _BadHeader(f"{h.size - data_start - expected} bytes after the last tensor {before!r} (which ends at "
                         f"byte {data_start + expected} with its padding): was it retyped or resized?")
    return tensors


# Where each GGML block keeps its scales (ggml-common.h block_* layouts): byte offsets of float16 fields (Q8_K:
# one float32). Every block's scale multiplies all its values, so one NaN/inf scale is a block of NaNs.
SCALE_FIELDS = {
    GGMLQuantizationType.Q4_0: (0,), GGMLQuantizationType.Q4_1: (0, 2), GGMLQuantizationType.Q5_0: (0,),
    GGMLQuantizationType.Q5_1: (0, 2), GGMLQuantizationType.Q8_0: (0,), GGMLQuantizationType.Q2_K: (80, 82),
    GGMLQuantizationType.Q3_K: (108,), GGMLQuantizationType.Q4_K: (0, 2), GGMLQuantizationType.Q5_K: (0, 2),
    GGMLQuantizationType.Q6_K: (208,), GGMLQuantizationType.IQ4_NL: (0,), GGMLQuantizationType.IQ4_XS: (0,),
    GGMLQuantizationType.Q8_K: (0,), GGMLQuantizationType.IQ2_XXS: (0,), GGMLQuantizationType.IQ2_XS: (0,),
    GGMLQuantizationType.IQ2_S: (0,), GGMLQuantizationType.IQ3_XXS: (0,), GGMLQuantizationType.IQ3_S: (0,),
    GGMLQuantizationType.IQ1_S: (0,), GGMLQuantizationType.TQ1_0: (52,), GGMLQuantizationType.TQ2_0: (64,),
}   # IQ1_M spreads its scale over four words' top nibbles: not checked here


def nonfinite_scales(blocks: np.ndarray, qtype: int, chunk: int = 1 << 22) -> int:
    """How many of the block scales in `blocks` (raw bytes of whole blocks of `qtype`) are NaN or infinite;
    0 for types without a table entry (float types, exotic ones). A float16 is NaN/inf when its exponent bits,
    0x7C of its high byte, are all set: that byte is copied out in chunks and tested in place (memory-bound).
    Every page of `blocks` is read: for tensors copied at load (dequantized, repacked) they are read anyway; for
    blocks the kernels run in place from the mapping this is what makes the load read the whole tensor."""
    qt = GGMLQuantizationType(qtype)
    fields = SCALE_FIELDS.get(qt)
    if not fields:
        return 0
    type_size = GGML_QUANT_SIZES[qt][1]
    rows = blocks.reshape(-1).view(np.uint8).reshape(-1, type_size)
    if qt == GGMLQuantizationType.Q8_K:   # float32 d: exponent 0x7F800000
        v = rows[:, 0:4].view(np.uint32)
        return int(np.count_nonzero((v & 0x7F800000) == 0x7F800000))
    col = np.empty(min(chunk, rows.shape[0]), np.uint8)
    bad = 0
    for start in range(0, rows.shape[0], chunk):   # bounded temporaries on 100 GB files
        part = rows[start:start + chunk]
        c = col[:part.shape[0]]
        for off in fields:
            np.copyto(c, part[:, off + 1])   # the high byte (little-endian)
            np.bitwise_and(c, 0x7C, out=c)
            bad += int(np.count_nonzero(c == 0x7C))
    return bad


class GGUFCheckpoint(Checkpoint):
    """A deepseek2 GGUF mapped read-only. Logical names are the canonical HF ones."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self._reader, self._mapped, self._scales_ok = None, None, set()
        if not os.path.isfile(self.path):
            raise CheckpointError(f"{self.path}: GGUF file not found")
        try:
            with open(self.path, "rb") as f:
                self._size = os.fstat(f.fileno()).st_size
                if self._size == 0:
                    raise _BadHeader("the file is empty")
                with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                    scan_header(buf)
            self._reader = GGUFReader(self.path, "r")
        except _BadHeader as e:
            raise CheckpointError(f"{self.path}: not a readable GGUF file: {e}") from None
        except (ValueError, IndexError, KeyError, OverflowError, UnicodeDecodeError, OSError) as e:
            raise CheckpointError(f"{self.path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
        self._mapped = mapped.register(self.path, self._size)
        try:
            arch = self._meta("general.architecture", None)
            if arch != ARCH:
                raise CheckpointError(f"{self.path}: GGUF architecture is {arch!r}; only {ARCH!r} "
                                      f"(DeepSeek-V3 / Kimi K2) is supported")
            self._tensors = {t.name: t for t in self._reader.tensors}
            self.cfg = self.config()   # every size bounded and checked by name before any loop over it
            self.n_layer = self.cfg.num_hidden_layers
            self._index()
            self._validate()
        except BaseException:
            self.close()
            raise

    # ---- metadata --------------------------------------------------------------------------------
    def _meta(self, key: str, default=KeyError):
        f = self._reader.get_field(key)
        if f is None:
            if default is KeyError:
                raise CheckpointError(f"{self.path}: metadata key {key!r} is missing")
            return default
        try:
            return f.contents()
        except UnicodeDecodeError:
            raise CheckpointError(f"{self.path}: metadata key {key!r} holds invalid UTF-8") from None

    def _arch(self, key: str, default=KeyError):
        return self._meta(f"{ARCH}.{key}", default)

    def _meta_int(self, key: str, default=KeyError) -> int | None:
        v = self._arch(key, default)
        if isinstance(v, list):  # per-layer arrays (feed_forward_length, head_count): take the first
            if not v and default is KeyError:
                raise CheckpointError(f"{self.path}: metadata key {ARCH}.{key} is an empty array")
            v = v[0] if v else None
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, int):
            raise CheckpointError(f"{self.path}: metadata key {ARCH}.{key} must be an integer, got {v!r}")
        return int(v)

    def _meta_float(self, key: str, default=KeyError) -> float | None:
        v = self._arch(key, default)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise CheckpointError(f"{self.path}: metadata key {ARCH}.{key} must be a number, got {v!r}")
        return _f32_to_decimal(v)

    def metadata(self) -> dict:
        """Every metadata key except the (large) tokenizer arrays, for inspection."""
        skip = ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges",
                "tokenizer.ggml.scores")
        return {k: self._meta(k) for k in self._reader.fields
                if not k.startswith("GGUF.") and k not in skip}

    def config_dict(self) -> dict:
        """An HF-style config (DeepSeek-V3 / Kimi K2 config.json keys) rebuilt from the metadata the
        way llama.cpp's deepseek2 loader reads it; `ModelConfig.from_dict` accepts it."""
        m = self._meta_int
        n_head = m("attention.head_count")
        rope_dim = m("rope.dimension_count")
        # Current converters write the MLA head sizes under *_mla and the latent-cache sizes
        # (kv_lora+rope, kv_lora) under key/value_length; older files only had key/value_length
        # = the MLA head sizes. llama.cpp: n_embd_head_k_mla() = key_length_mla ?: key_length.
        k_head = m("attention.key_length_mla", None) or m("attention.key_length")
        v_head = m("attention.value_length_mla", None) or m("attention.value_length")
        n_expert = m("expert_count", None) or 0
        has_bias = any(n.endswith(".exp_probs_b.bias") for n in self._tensors)
        n_group = m("expert_group_count", None) or 1
        gating = m("expert_gating_func", None) or 1
        if gating not in GATING_FUNCS:
            raise CheckpointError(f"{self.path}: {ARCH}.expert_gating_func {gating} is not supported "
                                  f"(1 = softmax, 2 = sigmoid)")
        vocab = m("vocab_size", None)
        if vocab is None:
            tokens = self._reader.get_field("tokenizer.ggml.tokens")
            embd = self._tensors.get("token_embd.weight")
            if tokens is not None:
                vocab = len(tokens.data)
            elif embd is not None and len(embd.shape) == 2:
                vocab = int(embd.shape[1])
            else:
                raise CheckpointError(f"{self.path}: no {ARCH}.vocab_size, tokenizer.ggml.tokens or 2-D "
                                      f"token_embd.weight to take the vocabulary size from")
        d = {
            "model_type": "kimi_k2" if self._meta("tokenizer.ggml.pre", None) == "kimi-k2" else "deepseek_v3",
            "vocab_size": vocab,
            "hidden_size": m("embedding_length"),
            "intermediate_size": m("feed_forward_length", None) or 0,
            "moe_intermediate_size": m("expert_feed_forward_length", None) or 0,
            "num_hidden_layers": m("block_count"),
            "num_attention_heads": n_head,
            "num_key_value_heads": n_head,
            "q_lora_rank": m("attention.q_lora_rank", None) or None,
            "kv_lora_rank": m("attention.kv_lora_rank"),
            "qk_nope_head_dim": k_head - rope_dim,
            "qk_rope_head_dim": rope_dim,
            "v_head_dim": v_head,
            "n_routed_experts": n_expert,
            "num_experts_per_tok": m("expert_used_count", None) or 0,
            "n_shared_experts": m("expert_shared_count", None) or 0,
            "first_k_dense_replace": m("leading_dense_block_count", None) or 0,
            "moe_layer_freq": 1,
            "n_group": n_group,
            "topk_group": m("expert_group_used_count", None) or 1,
            "topk_method": "noaux_tc" if has_bias else ("group_limited_greedy" if n_group > 1 else "greedy"),
            "scoring_func": GATING_FUNCS[gating],
            "norm_topk_prob": self._meta_bool("expert_weights_norm", False),
            "routed_scaling_factor": self._meta_float("expert_weights_scale", None) or 1.0,
            "rms_norm_eps": self._meta_float("attention.layer_norm_rms_epsilon"),
            "rope_theta": self._meta_float("rope.freq_base", None) or 10000.0,
            "max_position_embeddings": m("context_length", None) or 4096,
            "tie_word_embeddings": "output.weight" not in self._tensors,
            "hidden_act": "silu",
        }
        nextn = m("nextn_predict_layers", None)
        if nextn:
            d["num_nextn_predict_layers"] = nextn
        rope_type = self._arch("rope.scaling.type", None)
        if rope_type == "yarn":
            rs = {"type": "yarn",
                  "factor": self._meta_float("rope.scaling.factor"),
                  "original_max_position_embeddings": m("rope.scaling.original_context_length")}
            log_mul = self._meta_float("rope.scaling.yarn_log_multiplier", None)
            if log_mul is not None:
                # [TAG_DEEPSEEK2_YARN_LOG_MUL_FIX] in llama.cpp: the deepseek2 converter stores
                # 0.1 * mscale_all_dim and the loader divides by 0.1 again.
                mad = _f32_to_decimal(round(log_mul / 0.1, 6))
                # GGUF has no separate `mscale`; llama.cpp's graph equals HF's when mscale ==
                # mscale_all_dim (cos/sin factor 1), true for DeepSeek-V2/V3 and Kimi K2.
                rs.update(mscale=mad, mscale_all_dim=mad)
            for key, hf in (("rope.scaling.yarn_beta_fast", "beta_fast"), ("rope.scaling.yarn_beta_slow", "beta_slow"),
                            ("rope.scaling.yarn_attn_factor", "attention_factor")):
                v = self._meta_float(key, None)
                if v is not None:
                    rs[hf] = v
            d["rope_scaling"] = rs
        elif rope_type not in (None, "none"):
            raise CheckpointError(f"{self.path}: {ARCH}.rope.scaling.type {rope_type!r} is not supported")
        for key, hf in (("tokenizer.ggml.bos_token_id", "bos_token_id"), ("tokenizer.ggml.eos_token_id", "eos_token_id"),
                        ("tokenizer.ggml.padding_token_id", "pad_token_id")):
            v = self._meta(key, None)
            if v is not None:
                if isinstance(v, bool) or not isinstance(v, int):
                    raise CheckpointError(f"{self.path}: metadata key {key} must be an integer, got {v!r}")
                d[hf] = v
        return d

    def _meta_bool(self, key: str, default) -> bool:
        v = self._arch(key, default)
        if not isinstance(v, bool):
            raise CheckpointError(f"{self.path}: metadata key {ARCH}.{key} must be a bool, got {v!r}")
        return v

    def config(self):
        """The validated ModelConfig; a value it refuses is reported under its GGUF metadata key."""
        from ..config import ModelConfig

        try:
            return ModelConfig.from_dict(self.config_dict(), source=self.path)
        except ConfigError as e:
            if isinstance(e, CheckpointError):
                raise
            key = _CONFIG_KEYS.get(e.field or "")
            where = f" (GGUF metadata {key})" if key else ""
            raise CheckpointConfigError(f"{e}{where}", e.field) from None

    # ---- tokenizer -------------------------------------------------------------------------------
    def tokenizer_vocab(self) -> tuple[dict[bytes, int], dict[str, int]]:
        """(mergeable ranks, special tokens) recovered from tokenizer.ggml.tokens/token_type: NORMAL
        tokens are GPT-2 byte-to-unicode strings (decoded back to bytes; rank = id, as in tiktoken),
        CONTROL / USER_DEFINED tokens are the specials, UNUSED ids ([PADn]) are dropped."""
        model = self._meta("tokenizer.ggml.model", None)
        if model != "gpt2":
            raise CheckpointError(f"{self.path}: tokenizer.ggml.model is {model!r}; only 'gpt2' (byte-level BPE) "
                                  f"vocabularies can be turned into a tiktoken tokenizer")
        tokens = self._meta("tokenizer.ggml.tokens")
        if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
            raise CheckpointError(f"{self.path}: tokenizer.ggml.tokens must be an array of strings")
        types = self._meta("tokenizer.ggml.token_type", None) or [TOKEN_NORMAL] * len(tokens)
        if not isinstance(types, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in types):
            raise CheckpointError(f"{self.path}: tokenizer.ggml.token_type must be an array of integers")
        if len(types) != len(tokens):
            raise CheckpointError(f"{self.path}: tokenizer.ggml.token_type has {len(types)} entries for "
                                  f"{len(tokens)} tokens")
        decoder = {c: b for b, c in gguf.vocab.bytes_to_unicode().items()}
        ranks: dict[bytes, int] = {}
        specials: dict[str, int] = {}
        for i, (tok, typ) in enumerate(zip(tokens, types)):
            if typ in (TOKEN_NORMAL, TOKEN_BYTE):
                try:
                    b = bytes(decoder[c] for c in tok)
                except KeyError as e:
                    raise CheckpointError(f"{self.path}: token {i} {tok!r} has character {e.args[0]!r} outside "
                                          f"the GPT-2 byte alphabet") from None
                if b in ranks:
                    raise CheckpointError(f"{self.path}: token {i} duplicates token {ranks[b]} ({b!r})")
                ranks[b] = i
            elif typ in (TOKEN_CONTROL, TOKEN_USER_DEFINED):
                specials[tok] = i
        return ranks, specials

    def chat_template(self) -> str | None:
        t = self._meta("tokenizer.chat_template", None)
        if t is not None and not isinstance(t, str):
            raise CheckpointError(f"{self.path}: tokenizer.chat_template must be a string, got {type(t).__name__}")
        return t

    # ---- tensor index ----------------------------------------------------------------------------
    def _index(self) -> None:
        """Logical name -> ('plain', t) | ('kv_b', k_b, v_b); routed experts are looked up in the per-layer
        stacks (`_stacks`: layer -> {kind: (t, row0, row1)}) on demand, not listed one by one."""
        ent: dict[str, tuple] = {}
        stacks: dict[int, dict[str, tuple]] = {}
        split_kv: dict[int, dict[str, object]] = {}
        nextn = self.cfg.num_nextn_predict_layers
        for name, t in self._tensors.items():
            if name in _GLOBAL:
                ent[_GLOBAL[name]] = ("plain", t)
                continue
            mm = _BLK.fullmatch(name)
            if mm is None:
                continue  # rope_freqs etc.: not part of the HF model
            layer, key = _layer_index(mm.group(1)), mm.group(2)
            if layer >= self.n_layer:
                if layer < self.n_layer + nextn:
                    continue  # NextN / MTP blocks appended after the trunk: not run here
                raise CheckpointConfigError(
                    f"{self.path}: tensor {name!r} is in block {layer}, but {ARCH}.block_count is {self.n_layer} "
                    f"({ARCH}.nextn_predict_layers {nextn}): the model would silently leave layers of the file out",
                    "num_hidden_layers")
            pre = f"model.layers.{layer}."
            if key in _LAYER:
                ent[pre + _LAYER[key]] = ("plain", t)
            elif key in _EXPERT_STACKS or key == _FUSED_GATE_UP:
                if len(t.shape) != 3:
                    raise CheckpointError(f"{self.path}: expert stack {name!r} has shape {list(_np_shape(t))}, "
                                          f"expected 3-D [experts, rows, cols]")
                if key == _FUSED_GATE_UP:
                    rows = int(t.shape[1])  # ne [H, 2*inter, E]: gate rows first, then up
                    if rows % 2:
                        raise CheckpointError(f"{self.path}: fused expert stack {name!r} has {rows} rows; gate and "
                                              f"up need an even number")
                    stacks.setdefault(layer, {}).update(gate=(t, 0, rows // 2), up=(t, rows // 2, rows))
                else:
                    stacks.setdefault(layer, {})[_EXPERT_STACKS[key]] = (t, 0, None)
            elif key in ("attn_k_b.weight", "attn_v_b.weight"):
                if len(t.shape) != 3:
                    raise CheckpointError(f"{self.path}: tensor {name!r} has shape {list(_np_shape(t))}, expected 3-D "
                                          f"[n_head, rows, cols]")
                split_kv.setdefault(layer, {})[key[5]] = t
        for layer, kv in split_kv.items():
            name = f"model.layers.{layer}.self_attn.kv_b_proj.weight"
            if name in ent:
                continue  # files with both forms: the unsplit tensor is exact
            if set(kv) != {"k", "v"}:
                missing = "attn_v_b" if "k" in kv else "attn_k_b"
                raise CheckpointError(f"{self.path}: tensor 'blk.{layer}.{missing}.weight' is missing "
                                      f"(needed with its pair to rebuild {name})")
            (n_head, kvr, _), (n_head_v, _, kvr_v) = _np_shape(kv["k"]), _np_shape(kv["v"])
            if (n_head, kvr) != (n_head_v, kvr_v):
                raise CheckpointError(f"{self.path}: tensors 'blk.{layer}.attn_k_b.weight' {list(_np_shape(kv['k']))} "
                                      f"and 'blk.{layer}.attn_v_b.weight' {list(_np_shape(kv['v']))} do not pair up "
                                      f"(heads and kv_lora_rank must agree)")
            ent[name] = ("kv_b", kv["k"], kv["v"])
        self._stacks = stacks
        self._entries = ent

    def _validate(self) -> None:
        """Required tensors and shapes, as llama.cpp's load_arch_tensors creates them (check_config_against,
        the loader's own check), then what only a GGUF can get wrong."""
        check_config_against(self, self.cfg)
        for layer, st in self._stacks.items():
            if set(st) != {"gate", "up", "down"}:
                raise CheckpointError(f"{self.path}: layer {layer} has expert stacks {sorted(st)}; "
                                      f"need gate, up and down")

    # ---- Checkpoint interface --------------------------------------------------------------------
    def names(self) -> list[str]:
        out = list(self._entries)
        for layer, st in self._stacks.items():
            for kind, (t, _, _) in st.items():
                out += [f"model.layers.{layer}.mlp.experts.{e}.{kind}_proj.weight" for e in range(_np_shape(t)[0])]
        return out

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self._lookup(name) is not None

    def _lookup(self, name: str) -> tuple | None:
        ent = self._entries.get(name)
        if ent is None and "experts" in name:
            m = _EXPERT.fullmatch(name)
            st = self._stacks.get(int(m.group(1))) if m else None
            if st is not None and m.group(3) in st:
                t, r0, r1 = st[m.group(3)]
                e = int(m.group(2))
                if e < _np_shape(t)[0]:
                    return ("expert", t, e, r0, r1)
        return ent

    def _entry(self, name: str) -> tuple:
        ent = self._lookup(name)
        if ent is None:
            raise CheckpointError(f"{self.path}: tensor {name!r} is not in this GGUF")
        return ent

    def gguf_name(self, name: str) -> str:
        """The GGUF tensor(s) a logical name comes from (for messages)."""
        ent = self._lookup(name)
        if ent is None:
            for g, hf in _GLOBAL.items():
                if hf == name:
                    return g
            mm = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
            if mm:
                inv = {v: k for k, v in _LAYER.items()}
                em = re.fullmatch(r"mlp\.experts\.\d+\.(gate|up|down)_proj\.weight", mm.group(2))
                key = f"ffn_{em.group(1)}_exps.weight" if em else inv.get(mm.group(2), mm.group(2))
                return f"blk.{mm.group(1)}.{key}"
            return name
        if ent[0] == "kv_b":
            return f"{ent[1].name} + {ent[2].name}"
        return ent[1].name

    def shape(self, name: str) -> tuple[int, ...]:
        ent = self._entry(name)
        if ent[0] == "plain":
            return _np_shape(ent[1])
        if ent[0] == "expert":
            _, t, _, r0, r1 = ent
            E, rows, cols = _np_shape(t)
            return ((r1 if r1 is not None else rows) - r0, cols)
        _, k, v = ent
        n_head, kvr, nope = _np_shape(k)
        return (n_head * (nope + _np_shape(v)[1]), kvr)

    def format(self, name: str) -> str:
        ent = self._entry(name)
        return qtype_name(ent[1].tensor_type)

    def qtype(self, name: str) -> int:
        """GGML type id of the stored tensor (k_b's for a recombined kv_b_proj)."""
        return int(self._entry(name)[1].tensor_type)

    def _readable(self, *tensors) -> None:
        """Before handing out data: the file has not shrunk since open (a read would be a SIGBUS), and each
        tensor's block scales are finite (checked once per tensor; the pages are read right after anyway)."""
        mapped.check_size(self.path, self._reader.data._mmap, self._size, f"tensor {tensors[0].name!r}")
        for t in tensors:
            if t.name not in self._scales_ok:
                bad = nonfinite_scales(t.data, int(t.tensor_type))
                if bad:
                    raise CheckpointError(f"{self.path}: tensor {t.name!r} ({qtype_name(t.tensor_type)}) has {bad} "
                                          f"block scale(s) that are not finite (NaN or infinity)")
                self._scales_ok.add(t.name)

    def get(self, name: str, dtype: torch.dtype = torch.float32, device="cpu") -> torch.Tensor:
        ent = self._entry(name)
        self._readable(*ent[1:3] if ent[0] == "kv_b" else ent[1:2])
        if ent[0] == "plain":
            arr = self._dequant(ent[1], ent[1].data)
        elif ent[0] == "expert":
            _, t, e, r0, r1 = ent
            arr = self._dequant(t, t.data[e, r0:r1])
        else:
            _, k, v = ent
            arr = join_kv_b(self._dequant(k, k.data), self._dequant(v, v.data))
        return torch.from_numpy(np.ascontiguousarray(arr)).to(device=device, dtype=dtype)

    def _dequant(self, t, data: np.ndarray) -> np.ndarray:
        """Fresh float32 copy of `data` (a view of tensor `t`), in numpy dim order."""
        qt = GGMLQuantizationType(int(t.tensor_type))
        try:
            if qt == GGMLQuantizationType.F32:
                return np.array(data, dtype=np.float32)
            from hybrid_k2 import kernels
            if qt.name in kernels.WEIGHT_QTYPES and GGML_QUANT_SIZES[qt][0] > 1:
                return kernels.dequantize(np.ascontiguousarray(data), qt.name)   # C, threaded: gguf's values
            out = gguf.quants.dequantize(np.asarray(data), qt)
        except NotImplementedError:
            raise CheckpointError(f"{self.path}: tensor {t.name!r} has type {qt.name}, which cannot be "
                                  f"dequantized here") from None
        return np.asarray(out, dtype=np.float32)

    # ---- raw block access for the CPU kernels ----------------------------------------------------
    def raw_blocks(self, name: str) -> tuple[np.ndarray, int]:
        """(blocks, qtype) of a matrix as stored: a read-only uint8 view [rows, row_bytes] straight into the
        file mapping (no copy) and its GGML type id. For 2-D tensors stored as one GGUF tensor (not experts,
        not a recombined kv_b_proj); F32/F16 matrices come back as their raw bytes too."""
        ent = self._entry(name)
        if ent[0] != "plain":
            raise CheckpointError(f"{self.path}: tensor {name!r} ({self.gguf_name(name)}) is not stored as one "
                                  f"GGUF tensor, so it has no raw blocks")
        t = ent[1]
        shape = _np_shape(t)
        if len(shape) != 2:
            raise CheckpointError(f"{self.path}: tensor {t.name!r} ({name}) has shape {list(shape)}; raw blocks "
                                  f"are for 2-D matrices")
        self._readable(t)
        data = t.data
        if data.dtype != np.uint8:   # F32/F16/BF16: same bytes, viewed as bytes
            data = data.view(np.uint8)
        return data.reshape(shape[0], -1), int(t.tensor_type)

    def kv_b_blocks(self, name: str) -> tuple[tuple[np.ndarray, int], tuple[np.ndarray, int]] | None:
        """A split kv_b_proj as stored: ((attn_k_b blocks [n_head * kv_lora, row_bytes], qtype), (attn_v_b
        blocks [n_head * v_head, row_bytes], qtype)), read-only views into the file mapping; None when the file
        stores kv_b_proj whole (attn_kv_b)."""
        ent = self._entry(name)
        if ent[0] != "kv_b":
            return None
        self._readable(*ent[1:])
        out = []
        for t in ent[1:]:
            shape = _np_shape(t)
            data = t.data if t.data.dtype == np.uint8 else t.data.view(np.uint8)
            out.append((data.reshape(shape[0] * shape[1], -1), int(t.tensor_type)))
        return out[0], out[1]

    def moe_layers(self) -> list[int]:
        return sorted(self._stacks)

    def expert_types(self, layer: int) -> dict[str, tuple[str, int]]:
        """{'gate' | 'up' | 'down': (GGUF tensor name, qtype)} for one MoE layer, from the header alone."""
        st = self._stacks.get(layer)
        if st is None:
            raise CheckpointError(f"{self.path}: layer {layer} has no routed experts "
                                  f"(MoE layers: {self.moe_layers()})")
        return {kind: (st[kind][0].name, int(st[kind][0].tensor_type)) for kind in ("gate", "up", "down")}

    def expert_blocks(self, layer: int, *, check_scales: bool = True) -> dict[str, tuple[np.ndarray, int]]:
        """{'gate' | 'up' | 'down': (blocks, qtype)} for one MoE layer. `blocks` is a read-only uint8
        view [n_experts, rows, row_bytes] straight into the file mapping (no copy); each expert's
        [rows, row_bytes] slab is contiguous (rows of a fused gate_up stack are split per expert).
        check_scales=False skips the finite-scale scan (which reads every page): for a caller that checks
        each expert before its first use (experts paged from disk)."""
        st = self._stacks.get(layer)
        if st is None:
            raise CheckpointError(f"{self.path}: layer {layer} has no routed experts "
                                  f"(MoE layers: {self.moe_layers()})")
        tensors = {id(v[0]): v[0] for v in st.values()}.values()
        if check_scales:
            self._readable(*tensors)
        else:
            mapped.check_size(self.path, self._reader.data._mmap, self._size, f"tensor {next(iter(tensors)).name!r}")
        out = {}
        for kind in ("gate", "up", "down"):
            t, r0, r1 = st[kind]
            data = t.data
            if data.dtype != np.uint8:  # F32/F16 stacks: same bytes, viewed as bytes
                data = data.view(np.uint8)
            out[kind] = (data[:, r0:r1], int(t.tensor_type))
        return out

    def release_experts(self, layer: int, kinds=("gate", "up", "down")) -> None:
        """Drop a layer's expert pages of these kinds from this process's RSS once they have been copied out
        (they stay in the page cache); views stay valid and fault the pages back in if read. A tensor shared
        with a kind not named (a fused gate_up) is kept."""
        r, st = self._reader, self._stacks.get(layer)
        mm = getattr(getattr(r, "data", None), "_mmap", None)
        if st is None or mm is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        base = r.data.ctypes.data
        tensors = {id(v[0]): v[0] for k, v in st.items() if k in kinds}
        tensors = {i: t for i, t in tensors.items() if all(k in kinds for k, v in st.items() if id(v[0]) == i)}
        for t in tensors.values():
            begin = t.data.ctypes.data - base
            start = begin // mmap.PAGESIZE * mmap.PAGESIZE
            mm.madvise(mmap.MADV_DONTNEED, start, begin + t.data.nbytes - start)

    def close(self) -> None:
        r, token = getattr(self, "_reader", None), getattr(self, "_mapped", None)
        self._mapped = None
        mm = getattr(getattr(r, "data", None), "_mmap", None)
        if r is not None:
            self._tensors = {}
            self._entries = {}
            self._stacks = {}
            self._reader = None
            del r
        # Not mm.close(): it unmaps under the numpy views handed out (experts run in place from them), and a read
        # would then segfault. The mapping goes with its last view, and stays named for a SIGBUS until then.
        if mm is None:
            mapped.unregister(token)
        else:
            weakref.finalize(mm, mapped.unregister, token)


def split_kv_b(kv_b: np.ndarray, n_head: int, nope: int) -> tuple[np.ndarray, np.ndarray]:
    """kv_b_proj [n_head * (nope + v), kv_lora] -> (attn_k_b [n_head, kv_lora, nope], attn_v_b [n_head, v, kv_lora])
    as views, the split of convert_hf_to_gguf.py's DeepseekV2Model (k part transposed)."""
    kv = kv_b.reshape(n_head, -1, kv_b.shape[-1])
    return kv[:, :nope].transpose(0, 2, 1), kv[:, nope:]


def join_kv_b(k_b: np.ndarray, v_b: np.ndarray) -> np.ndarray:
    """split_kv_b's inverse: kv_b_proj [n_head * (nope + v), kv_lora]."""
    return np.concatenate([k_b.transpose(0, 2, 1), v_b], axis=1).reshape(-1, k_b.shape[1])


def _np_shape(t) -> tuple[int, ...]:
    return tuple(int(d) for d in reversed(t.shape.tolist()))


def _f32_to_decimal(v) -> float:
    """The shortest decimal that rounds to the same float32: metadata floats are stored as f32, so
    2.827 comes back as 2.8269999..; this returns 2.827 again."""
    if isinstance(v, int):
        return float(v)
    return float(np.format_float_positional(np.float32(v), unique=True, trim="0"))
