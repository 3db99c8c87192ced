"""Checkpoint readers: one interface over HF safetensors dirs and GGUF files.

Every reader maps tensors lazily from disk and hands out one dequantised tensor at a time under the canonical HF
DeepseekV3 names (`model.layers.N.self_attn.kv_a_proj_with_mqa.weight`, ...). `CheckpointError` and `Checkpoint` are
defined here, before the submodules are imported, so that the readers can import them from the package.
"""
from __future__ import annotations

import os
import re
from typing import NamedTuple

import torch

from ..config import ConfigError


class CheckpointError(ValueError):
    """A checkpoint file is missing, malformed or inconsistent; the message names the file/tensor."""


class CheckpointConfigError(CheckpointError, ConfigError):
    """The config and the checkpoint disagree (or a GGUF's metadata is not a valid config): the message names
    the file, the tensor or metadata key, and the config field. Catchable as either parent."""


class Int4Weight(NamedTuple):
    """Raw symmetric INT4 weight, lossless: w[r, c] = (q[r, c] - 8) * scale[r, c // group_size].

    `q` is uint8 [out, in] holding the unsigned nibble 0..15, i.e. exactly the nibble GGML
    Q4_0 stores (Q4_0 also decodes as (nibble - 8) * d); with group_size 32 a converter only
    regroups nibbles into Q4_0's layout and rounds `scale` to fp16 for d.
    `scale` is float32 [out, ceil(in / group_size)]; the last group may be partial.
    """
    q: torch.Tensor
    scale: torch.Tensor
    group_size: int


class Checkpoint:
    """Interface shared by HFCheckpoint and GGUFCheckpoint (names are logical/canonical)."""

    path: str

    def names(self) -> list[str]:
        raise NotImplementedError

    def __contains__(self, name: object) -> bool:
        raise NotImplementedError

    def shape(self, name: str) -> tuple[int, ...]:
        raise NotImplementedError

    def format(self, name: str) -> str:
        """'f32', 'bf16', 'f16', 'fp8_block', 'int4_group' (readers may add their own)."""
        raise NotImplementedError

    def get(self, name: str, dtype: torch.dtype = torch.float32, device="cpu") -> torch.Tensor:
        """Dequantised copy of one tensor (never a view of the file)."""
        raise NotImplementedError

    def get_int4(self, name: str) -> Int4Weight:
        raise CheckpointError(f"{self.path}: tensor {name!r} is not stored as INT4")

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __iter__(self):
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())


from .safetensors import SafetensorsFile  # noqa: E402  (needs CheckpointError above)
from .hf import HFCheckpoint  # noqa: E402


def fetch(ckpt: Checkpoint, name: str, shape: tuple[int, ...], dtype: torch.dtype = torch.float32,
          device="cpu") -> torch.Tensor:
    """`ckpt.get(name)` after checking the stored shape is the one the model expects."""
    have = tuple(ckpt.shape(name))
    if have != tuple(shape):
        raise CheckpointError(f"{ckpt.path}: tensor {name!r} has shape {list(have)}, the model expects {list(shape)}")
    return ckpt.get(name, dtype=dtype, device=device)


def expected_tensors(cfg) -> list[tuple[str, tuple[int, ...], tuple[str, ...], str]]:
    """(name, shape, the config field(s) each dimension comes from, the field(s) that make the tensor exist) for
    every tensor the model built from `cfg` loads: the parameters of model.Transformer (build_model fills them)
    and the routed experts (the expert backends read them). lm_head.weight is listed even when tied;
    check_config_against allows it absent then."""
    V, H, L = cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers
    nh, nope, rope, vh = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    qr, kvr, E, I, F = (cfg.q_lora_rank, cfg.kv_lora_rank, cfg.n_routed_experts, cfg.moe_intermediate_size,
                        cfg.intermediate_size)
    h, v = "hidden_size", "vocab_size"
    out = [("model.embed_tokens.weight", (V, H), (v, h), "vocab_size"), ("model.norm.weight", (H,), (h,), "hidden_size"),
           ("lm_head.weight", (V, H), (v, h), "tie_word_embeddings")]
    q_out, q_f = nh * (nope + rope), "num_attention_heads*(qk_nope_head_dim+qk_rope_head_dim)"
    kv_f, o_f = "num_attention_heads*(qk_nope_head_dim+v_head_dim)", "num_attention_heads*v_head_dim"
    moe_why = "num_hidden_layers, n_routed_experts, first_k_dense_replace, moe_layer_freq"
    S, s_f = I * cfg.n_shared_experts, "moe_intermediate_size*n_shared_experts"
    for i in range(L):
        w = [("input_layernorm.weight", (H,), (h,), "num_hidden_layers"),
             ("post_attention_layernorm.weight", (H,), (h,), "num_hidden_layers")]
        if qr is None:
            w.append(("self_attn.q_proj.weight", (q_out, H), (q_f, h), "q_lora_rank (null)"))
        else:
            w += [("self_attn.q_a_proj.weight", (qr, H), ("q_lora_rank", h), "q_lora_rank"),
                  ("self_attn.q_a_layernorm.weight", (qr,), ("q_lora_rank",), "q_lora_rank"),
                  ("self_attn.q_b_proj.weight", (q_out, qr), (q_f, "q_lora_rank"), "q_lora_rank")]
        w += [("self_attn.kv_a_proj_with_mqa.weight", (kvr + rope, H), ("kv_lora_rank+qk_rope_head_dim", h),
               "num_hidden_layers"),
              ("self_attn.kv_a_layernorm.weight", (kvr,), ("kv_lora_rank",), "num_hidden_layers"),
              ("self_attn.kv_b_proj.weight", (nh * (nope + vh), kvr), (kv_f, "kv_lora_rank"), "num_hidden_layers"),
              ("self_attn.o_proj.weight", (H, nh * vh), (h, o_f), "num_hidden_layers")]
        if cfg.is_moe_layer(i):
            w.append(("mlp.gate.weight", (E, H), ("n_routed_experts", h), moe_why))
            if cfg.topk_method == "noaux_tc":
                w.append(("mlp.gate.e_score_correction_bias", (E,), ("n_routed_experts",), "topk_method (noaux_tc)"))
            if S:
                w += [("mlp.shared_experts.gate_proj.weight", (S, H), (s_f, h), "n_shared_experts"),
                      ("mlp.shared_experts.up_proj.weight", (S, H), (s_f, h), "n_shared_experts"),
                      ("mlp.shared_experts.down_proj.weight", (H, S), (h, s_f), "n_shared_experts")]
            for e in range(E):
                x = f"mlp.experts.{e}."
                w += [(x + "gate_proj.weight", (I, H), ("moe_intermediate_size", h), moe_why),
                      (x + "up_proj.weight", (I, H), ("moe_intermediate_size", h), moe_why),
                      (x + "down_proj.weight", (H, I), (h, "moe_intermediate_size"), moe_why)]
        else:
            why = "num_hidden_layers, first_k_dense_replace, moe_layer_freq, n_routed_experts (a dense layer)"
            w += [("mlp.gate_proj.weight", (F, H), ("intermediate_size", h), why),
                  ("mlp.up_proj.weight", (F, H), ("intermediate_size", h), why),
                  ("mlp.down_proj.weight", (H, F), (h, "intermediate_size"), why)]
        out += [(f"model.layers.{i}.{n}", shape, dims, why) for n, shape, dims, why in w]
    return out


_LAYER_NAME = re.compile(r"model\.layers\.(\d+)\.(.+)")
# The tensor only a DeepSeek-V3 multi-token-prediction layer has: a layer past the trunk holding it is an MTP
# layer even where config.json's num_nextn_predict_layers leaves it out
MTP_MARK = "eh_proj.weight"
_EXPERT_PART = re.compile(r"mlp\.experts\.(\d+)\..+")
_DENSE_MLP = re.compile(r"mlp\.(gate|up|down)_proj\..+")


def _index(digits: str) -> int:
    """A layer / expert number from a tensor name (int() refuses 4300+ digits; any 10-digit one is too big)."""
    return int(digits) if len(digits) <= 9 else 1 << 40


def check_config_against(ckpt: Checkpoint, cfg) -> None:
    """Check, from the headers alone (no tensor data is read, nothing is allocated), that `ckpt` holds every
    tensor the config implies (expected_tensors) with the expected shape and a readable storage form, and
    nothing the config would silently leave out: layers past num_hidden_layers (other than MTP layers: those
    num_nextn_predict_layers counts, and any holding MTP_MARK), experts past n_routed_experts, experts in layers
    the config makes dense (or dense FFNs in MoE layers), shared experts or a correction bias the config does not use. Raises CheckpointConfigError
    naming the file, the tensor and the config field. Run it after the config is parsed and before the model
    is built: what the loader then allocates is sized by tensors that exist, not by what a config asks for."""
    src, L, mtp = cfg.source, cfg.num_hidden_layers, cfg.num_nextn_predict_layers
    # name tensors as the files do: a GGUF's blk.* names, a multimodal checkpoint's prefixed ones
    label = getattr(ckpt, "gguf_name", None) or getattr(ckpt, "stored_name", None)

    def named(name):
        g = label(name) if label is not None else name
        return f"{g!r} ({name})" if g != name else repr(name)

    def fail(msg, fld):
        raise CheckpointConfigError(f"{ckpt.path}: {msg}", fld)

    layers, beyond, mtp_marked = set(), {}, set()
    for name in ckpt.names():
        m = _LAYER_NAME.fullmatch(name)
        if m is None:
            continue
        layer, rest = _index(m.group(1)), m.group(2)
        layers.add(layer)
        if layer >= L:   # multi-token-prediction layers, not run here; anything else past L is refused below
            beyond.setdefault(layer, name)
            if rest == MTP_MARK:
                mtp_marked.add(layer)
            continue
        if not rest.startswith("mlp."):
            continue
        moe = cfg.is_moe_layer(layer)
        if moe == bool(_DENSE_MLP.fullmatch(rest)):
            fail(f"tensor {named(name)} is {'a dense-FFN' if moe else 'a mixture-of-experts'} tensor in layer {layer}, "
                 f"which the config ({src}) makes {'an MoE' if moe else 'a dense'} layer (fields "
                 f"first_k_dense_replace={cfg.first_k_dense_replace}, moe_layer_freq={cfg.moe_layer_freq}, "
                 f"n_routed_experts={cfg.n_routed_experts})", "first_k_dense_replace")
        e = _EXPERT_PART.fullmatch(rest)
        if e is not None and _index(e.group(1)) >= cfg.n_routed_experts:
            fail(f"tensor {named(name)} is expert {_index(e.group(1))}, but field 'n_routed_experts' is "
                 f"{cfg.n_routed_experts} in {src}", "n_routed_experts")
        if rest.startswith("mlp.shared_experts.") and not cfg.n_shared_experts:
            fail(f"tensor {named(name)} is a shared expert, but field 'n_shared_experts' is 0 in {src}",
                 "n_shared_experts")
        if rest == "mlp.gate.e_score_correction_bias" and cfg.topk_method != "noaux_tc":
            fail(f"tensor {named(name)} is a routing correction bias, which field 'topk_method' "
                 f"{cfg.topk_method!r} in {src} does not use (noaux_tc does)", "topk_method")
    for layer, name in sorted(beyond.items()):
        if layer >= L + mtp and layer not in mtp_marked:
            fail(f"tensor {named(name)} is in layer {layer}, but field 'num_hidden_layers' is {L} "
                 f"(num_nextn_predict_layers {mtp}) in {src}, and the layer is no multi-token-prediction layer "
                 f"(no {MTP_MARK}): the model would silently leave out layers of the checkpoint", "num_hidden_layers")
    missing_layers = sorted(set(range(L)) - layers)
    if missing_layers:
        fail(f"field 'num_hidden_layers' is {L} in {src}, but the checkpoint has no tensors for layer "
             f"{missing_layers[0]}{' (nor ' + str(len(missing_layers) - 1) + ' more)' if len(missing_layers) > 1 else ''}",
             "num_hidden_layers")
    check = getattr(ckpt, "check_tensor", None)
    for name, shape, dims, why in expected_tensors(cfg):
        if name not in ckpt:
            if name == "lm_head.weight" and cfg.tie_word_embeddings:
                continue
            fail(f"tensor {named(name)} is missing; the config ({src}) implies it through {why}",
                 why.split(",")[0].split(" ")[0])
        got = tuple(ckpt.shape(name))
        if got != shape:
            if len(got) != len(shape):
                fail(f"tensor {named(name)} has shape {list(got)}, expected {list(shape)} ({' x '.join(dims)}) "
                     f"from the config ({src})", dims[0])
            d = next(i for i in range(len(shape)) if got[i] != shape[i])
            fail(f"tensor {named(name)} has shape {list(got)}, expected {list(shape)} from the config ({src}): "
                 f"dimension {d} is {got[d]}, field {dims[d]} gives {shape[d]}", dims[d])
        if check is not None:
            check(name)


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """HF checkpoint dir (or single .safetensors file) -> HFCheckpoint; .gguf file -> GGUFCheckpoint."""
    path = os.fspath(path)
    if path.endswith(".gguf"):
        from .gguf import GGUFCheckpoint  # lazy: only GGUF users pay for the gguf package

        return GGUFCheckpoint(path)
    return HFCheckpoint(path)


__all__ = ["Checkpoint", "CheckpointError", "CheckpointConfigError", "Int4Weight", "SafetensorsFile", "HFCheckpoint",
           "check_config_against", "expected_tensors", "fetch", "open_checkpoint"]
