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

import numpy as np
import torch

from . import Checkpoint, CheckpointError

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

# tokenizer.ggml.token_type values (llama.cpp llama_token_type)
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6


def qtype_name(qtype: int) -> str:
    return GGMLQuantizationType(qtype).name.lower()


class _Reader(GGUFReader):
    """GGUFReader that checks every tensor lies inside the file before mapping it, so a truncated
    file is reported by tensor name instead of as a numpy reshape error."""

    def _build_tensors(self, start_offs, fields):  # noqa: D401 - GGUFReader hook
        size = len(self.data)
        for field in fields:
            _, name_data, _, dims, raw_dtype, offset_tensor = field.parts
            name = bytes(name_data).decode("utf-8", "replace")
            try:
                block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(int(raw_dtype[0]))]
            except (ValueError, KeyError):
                raise _BadTensor(name, f"unknown GGML type id {int(raw_dtype[0])}") from None
            n = int(np.prod(dims.astype(np.uint64))) if len(dims) else 1
            if n % block:
                raise _BadTensor(name, f"{n} elements is not a multiple of the block size {block}")
            end = start_offs + int(offset_tensor[0]) + n // block * type_size
            if end > size:
                raise _BadTensor(name, f"data ends at byte {end} but the file has {size} bytes (truncated?)")
        super()._build_tensors(start_offs, fields)


class _BadTensor(Exception):
    def __init__(self, name: str, why: str):
        super().__init__(f"tensor {name!r}: {why}")


class GGUFCheckpoint(Checkpoint):
    """A deepseek2 GGUF mapped read-only. Logical names are the canonical HF ones."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise CheckpointError(f"{self.path}: GGUF file not found")
        try:
            self._reader = _Reader(self.path, "r")
        except _BadTensor as e:
            raise CheckpointError(f"{self.path}: {e}") from None
        except (ValueError, IndexError, KeyError, OverflowError, UnicodeDecodeError, OSError) as e:
            raise CheckpointError(f"{self.path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
        arch = self._meta("general.architecture", None)
        if arch != ARCH:
            raise CheckpointError(f"{self.path}: GGUF architecture is {arch!r}; only {ARCH!r} "
                                  f"(DeepSeek-V3 / Kimi K2) is supported")
        self._tensors = {t.name: t for t in self._reader.tensors}
        self.n_layer = self._meta_int("block_count")
        self._index()
        self._validate()

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
            vocab = len(tokens.data) if tokens is not None else int(self._tensors["token_embd.weight"].shape[1])
        d = {
            "model_type": "kimi_k2" if self._meta("tokenizer.ggml.pre", None) == "kimi-k2" else "deepseek_v3",
            "vocab_size": vocab,
            "hidden_size": m("embedding_length"),
            "intermediate_size": m("feed_forward_length", None) or 0,
            "moe_intermediate_size": m("expert_feed_forward_length", None) or 0,
            "num_hidden_layers": self.n_layer,
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
            "norm_topk_prob": bool(self._arch("expert_weights_norm", False)),
            "routed_scaling_factor": self._meta_float("expert_weights_scale", None) or 1.0,
            "rms_norm_eps": self._meta_float("attention.layer_norm_rms_epsilon"),
            "rope_theta": self._meta_float("rope.freq_base", None) or 10000.0,
            "max_position_embeddings": m("context_length", None) or 4096,
            "tie_word_embeddings": "output.weight" not in self._tensors,
            "hidden_act": "silu",
        }
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
                d[hf] = int(v)
        return d

    def config(self):
        from ..config import ModelConfig

        return ModelConfig.from_dict(self.config_dict(), source=self.path)

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
        types = self._meta("tokenizer.ggml.token_type", None) or [TOKEN_NORMAL] * len(tokens)
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
        return self._meta("tokenizer.chat_template", None)

    # ---- tensor index ----------------------------------------------------------------------------
    def _index(self) -> None:
        """Logical name -> ('plain', t) | ('expert', t, e, row0, row1) | ('kv_b', k_b, v_b)."""
        ent: dict[str, tuple] = {}
        stacks: dict[int, dict[str, tuple]] = {}
        split_kv: dict[int, dict[str, object]] = {}
        for name, t in self._tensors.items():
            if name in _GLOBAL:
                ent[_GLOBAL[name]] = ("plain", t)
                continue
            mm = _BLK.fullmatch(name)
            if mm is None:
                continue  # rope_freqs etc.: not part of the HF model
            layer, key = int(mm.group(1)), mm.group(2)
            if layer >= self.n_layer:
                continue  # NextN / MTP blocks appended after the trunk
            pre = f"model.layers.{layer}."
            if key in _LAYER:
                ent[pre + _LAYER[key]] = ("plain", t)
            elif key in _EXPERT_STACKS:
                stacks.setdefault(layer, {})[_EXPERT_STACKS[key]] = (t, 0, None)
            elif key == _FUSED_GATE_UP:
                rows = int(t.shape[1]) // 2  # ne [H, 2*inter, E]: gate rows first, then up
                stacks.setdefault(layer, {}).update(gate=(t, 0, rows), up=(t, rows, 2 * rows))
            elif key in ("attn_k_b.weight", "attn_v_b.weight"):
                split_kv.setdefault(layer, {})[key[5]] = t
        for layer, kv in split_kv.items():
            name = f"model.layers.{layer}.self_attn.kv_b_proj.weight"
            if name in ent:
                continue  # files with both forms: the unsplit tensor is exact
            if set(kv) != {"k", "v"}:
                missing = "attn_v_b" if "k" in kv else "attn_k_b"
                raise CheckpointError(f"{self.path}: tensor 'blk.{layer}.{missing}.weight' is missing "
                                      f"(needed with its pair to rebuild {name})")
            ent[name] = ("kv_b", kv["k"], kv["v"])
        self._stacks = stacks
        for layer in sorted(stacks):
            st = stacks[layer]
            n_exp = int(next(iter(st.values()))[0].shape[-1])
            for e in range(n_exp):
                for kind in ("gate", "up", "down"):
                    if kind in st:
                        t, r0, r1 = st[kind]
                        ent[f"model.layers.{layer}.mlp.experts.{e}.{kind}_proj.weight"] = ("expert", t, e, r0, r1)
        self._entries = ent

    def _validate(self) -> None:
        """Required tensors and shapes, as llama.cpp's load_arch_tensors creates them."""
        c = self.config_dict()
        H, V, n_head = c["hidden_size"], c["vocab_size"], c["num_attention_heads"]
        nope, rope, vh = c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"]
        qr, kvr = c["q_lora_rank"], c["kv_lora_rank"]
        E, inter, moe = c["n_routed_experts"], c["intermediate_size"], c["moe_intermediate_size"]
        shexp = moe * c["n_shared_experts"]
        if nope <= 0:
            raise CheckpointError(f"{self.path}: attention key length {nope + rope} is not larger than "
                                  f"rope.dimension_count {rope}")
        want = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,)}
        if not c["tie_word_embeddings"]:
            want["lm_head.weight"] = (V, H)
        for i in range(self.n_layer):
            p = f"model.layers.{i}."
            w = {"input_layernorm.weight": (H,), "post_attention_layernorm.weight": (H,),
                 "self_attn.kv_a_proj_with_mqa.weight": (kvr + rope, H), "self_attn.kv_a_layernorm.weight": (kvr,),
                 "self_attn.kv_b_proj.weight": (n_head * (nope + vh), kvr),
                 "self_attn.o_proj.weight": (H, n_head * vh)}
            if qr:
                w.update({"self_attn.q_a_proj.weight": (qr, H), "self_attn.q_a_layernorm.weight": (qr,),
                          "self_attn.q_b_proj.weight": (n_head * (nope + rope), qr)})
            else:
                w["self_attn.q_proj.weight"] = (n_head * (nope + rope), H)
            if i < c["first_k_dense_replace"] or E == 0:
                w.update({"mlp.gate_proj.weight": (inter, H), "mlp.up_proj.weight": (inter, H),
                          "mlp.down_proj.weight": (H, inter)})
            else:
                w["mlp.gate.weight"] = (E, H)
                if f"{p}mlp.gate.e_score_correction_bias" in self._entries:
                    w["mlp.gate.e_score_correction_bias"] = (E,)
                if shexp:
                    w.update({"mlp.shared_experts.gate_proj.weight": (shexp, H),
                              "mlp.shared_experts.up_proj.weight": (shexp, H),
                              "mlp.shared_experts.down_proj.weight": (H, shexp)})
                for e in range(E):
                    w.update({f"mlp.experts.{e}.gate_proj.weight": (moe, H), f"mlp.experts.{e}.up_proj.weight": (moe, H),
                              f"mlp.experts.{e}.down_proj.weight": (H, moe)})
            want.update({p + k: v for k, v in w.items()})
        for name, shape in want.items():
            if name not in self._entries:
                raise CheckpointError(f"{self.path}: tensor {self.gguf_name(name)!r} ({name}) is missing")
            got = self.shape(name)
            if got != shape:
                raise CheckpointError(f"{self.path}: tensor {self.gguf_name(name)!r} ({name}) has shape "
                                      f"{list(got)}, expected {list(shape)}")
        for layer, st in self._stacks.items():
            if set(st) != {"gate", "up", "down"}:
                raise CheckpointError(f"{self.path}: layer {layer} has expert stacks {sorted(st)}; "
                                      f"need gate, up and down")

    # ---- Checkpoint interface --------------------------------------------------------------------
    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def _entry(self, name: str) -> tuple:
        try:
            return self._entries[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: tensor {name!r} is not in this GGUF") from None

    def gguf_name(self, name: str) -> str:
        """The GGUF tensor(s) a logical name comes from (for messages)."""
        ent = self._entries.get(name)
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

    def get(self, name: str, dtype: torch.dtype = torch.float32, device="cpu") -> torch.Tensor:
        ent = self._entry(name)
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
        out = []
        for t in ent[1:]:
            shape = _np_shape(t)
            if len(shape) != 3:
                raise CheckpointError(f"{self.path}: tensor {t.name!r} has shape {list(shape)}, expected 3-D "
                                      f"[n_head, rows, cols]")
            data = t.data if t.data.dtype == np.uint8 else t.data.view(np.uint8)
            out.append((data.reshape(shape[0] * shape[1], -1), int(t.tensor_type)))
        return out[0], out[1]

    def moe_layers(self) -> list[int]:
        return sorted(self._stacks)

    def expert_blocks(self, layer: int) -> dict[str, tuple[np.ndarray, int]]:
        """{'gate' | 'up' | 'down': (blocks, qtype)} for one MoE layer. `blocks` is a read-only uint8
        view [n_experts, rows, row_bytes] straight into the file mapping (no copy); each expert's
        [rows, row_bytes] slab is contiguous (rows of a fused gate_up stack are split per expert)."""
        st = self._stacks.get(layer)
        if st is None:
            raise CheckpointError(f"{self.path}: layer {layer} has no routed experts "
                                  f"(MoE layers: {self.moe_layers()})")
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
        r = getattr(self, "_reader", None)
        if r is not None:
            mm = getattr(r.data, "_mmap", None)
            self._tensors = {}
            self._entries = {}
            self._stacks = {}
            self._reader = None
            del r
            if mm is not None:
                try:
                    mm.close()
                except BufferError:
                    pass  # views handed out are still alive; the mapping goes when they do


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
