"""`hybrid-k2 convert HF_DIR OUT.gguf`: an HF DeepSeek-V3 / Kimi K2 checkpoint -> a llama.cpp `deepseek2` GGUF.

The file is what llama.cpp's convert_hf_to_gguf.py (`DeepseekV2Model`, Kimi K2 branch) writes, so
llama.cpp loads it (src/models/deepseek2.cpp), and what hybrid_k2's GGUFCheckpoint reads:
  * metadata: the deepseek2.* keys of DeepseekV2Model.set_gguf_parameters (MLA sizes in the
    key/value_length(_mla) form current llama.cpp expects, YaRN keys, expert routing keys);
  * tokenizer: tiktoken ranks as GPT-2 byte-to-unicode strings, merges recovered from the ranks,
    Kimi's 256 special tokens as CONTROL, pre-tokenizer 'kimi-k2';
  * tensors: `kv_b_proj` split into `attn_k_b` (transposed) + `attn_v_b`; routed experts stacked into
    3D `ffn_{gate,up,down}_exps` in the --experts format; router, norms and biases in F32; the rest
    in --other.
Tensors are produced one at a time and experts one expert at a time, streamed into the file, so peak
memory is about the largest single dense tensor (the embedding), not the model.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import stat
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

import gguf
from gguf import GGMLQuantizationType as QT
from gguf.constants import GGML_QUANT_SIZES

from . import kernels   # the project's one quantizer (C, GGML block formats byte for byte)
from .checkpoint import HFCheckpoint
from .checkpoint.gguf import split_kv_b
from .checkpoint.quantize import int4_to_q4_0
from .config import ModelConfig
from .tokenizer import Tokenizer

log = logging.getLogger("hybrid_k2.convert")

ARCH = "deepseek2"
EXPERT_FORMATS = {n.lower(): QT[n] for n in kernels.QUANTIZE_QTYPES if n != "F32"}   # every type our quantizer writes
OTHER_FORMATS = {"q8_0": QT.Q8_0, "bf16": QT.BF16, "f16": QT.F16, "f32": QT.F32}
_FT = gguf.LlamaFileType
FILE_TYPES = {"q4_0": _FT.MOSTLY_Q4_0, "q8_0": _FT.MOSTLY_Q8_0, "q4_k": _FT.MOSTLY_Q4_K_M, "q6_k": _FT.MOSTLY_Q6_K,
              "q2_k": _FT.MOSTLY_Q2_K, "q3_k": _FT.MOSTLY_Q3_K_M, "q5_k": _FT.MOSTLY_Q5_K_M, "q4_1": _FT.MOSTLY_Q4_1,
              "q5_0": _FT.MOSTLY_Q5_0, "q5_1": _FT.MOSTLY_Q5_1, "iq4_nl": _FT.MOSTLY_IQ4_NL,
              "iq4_xs": _FT.MOSTLY_IQ4_XS, "tq1_0": _FT.MOSTLY_TQ1_0, "tq2_0": _FT.MOSTLY_TQ2_0,
              "bf16": _FT.MOSTLY_BF16, "f16": _FT.MOSTLY_F16}
GGML_QUANT_VERSION = 2  # ggml.h GGML_QNT_VERSION, written by llama.cpp's quantizer
PRE_TOKENIZER = "kimi-k2"  # llama.cpp llama-vocab.cpp LLAMA_VOCAB_PRE_TYPE_KIMI_K2


@dataclass
class _Tensor:
    name: str                       # GGUF name
    shape: tuple[int, ...]          # numpy order (GGUF stores it reversed)
    qtype: QT
    chunks: Callable[[], Iterator[np.ndarray]]  # the encoded data, in order

    @property
    def nbytes(self) -> int:
        block, size = GGML_QUANT_SIZES[self.qtype]
        return math.prod(self.shape[:-1]) * (self.shape[-1] // block) * size


class _Stream:
    """Stands in for an ndarray in GGUFWriter.write_tensor_data (which only uses .nbytes and
    .tofile): writes the tensor chunk by chunk so a whole expert stack never sits in memory."""

    def __init__(self, t: _Tensor, bar):
        self.t, self.bar, self.nbytes = t, bar, t.nbytes

    def tofile(self, f) -> None:
        n = 0
        for chunk in self.t.chunks():
            raw = np.ascontiguousarray(chunk).reshape(-1).view(np.uint8)
            f.write(raw.data)
            n += raw.nbytes
            if self.bar is not None:
                self.bar.update(raw.nbytes)
        if n != self.nbytes:
            raise RuntimeError(f"{self.t.name}: wrote {n} bytes, planned {self.nbytes}")


# ---- encoding ------------------------------------------------------------------------------------
def encode(x: np.ndarray, qtype: QT) -> np.ndarray:
    """float32 [..., cols] -> the GGUF bytes of `qtype` (rows along the last dim)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if qtype == QT.F32:
        return x
    if qtype == QT.F16:
        return x.astype(np.float16)
    if qtype == QT.BF16:  # round to nearest even, as gguf.quants.BF16 and ggml do
        return torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy()
    return kernels.quantize(x.reshape(-1, x.shape[-1]), int(qtype))


# ---- tokenizer -----------------------------------------------------------------------------------
def _bpe_parts(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """tiktoken's merge loop run on `token` with only merges ranked below `max_rank`: the two parts
    left are the merge that created `token` (llama.cpp QwenModel.bpe, used for Kimi K2)."""
    parts = [token[i:i + 1] for i in range(len(token))]
    while len(parts) > 1:
        best, best_rank = -1, max_rank
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < best_rank:
                best, best_rank = i, r
        if best < 0:
            break
        parts[best:best + 2] = [parts[best] + parts[best + 1]]
    return parts


def tokenizer_arrays(ranks: dict[bytes, int], specials: dict[str, int], vocab_size: int
                     ) -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges) as llama.cpp's Kimi K2 converter builds them."""
    b2u = gguf.vocab.bytes_to_unicode()

    def to_str(b: bytes) -> str:
        return "".join(b2u[c] for c in b)

    tokens: list[str | None] = [None] * vocab_size
    types = [int(gguf.TokenType.UNUSED)] * vocab_size
    for b, r in ranks.items():
        if r >= vocab_size:
            raise ValueError(f"token rank {r} is outside vocab_size {vocab_size}")
        tokens[r], types[r] = to_str(b), int(gguf.TokenType.NORMAL)
    for s, i in specials.items():
        if not 0 <= i < vocab_size or tokens[i] is not None and types[i] != int(gguf.TokenType.UNUSED):
            raise ValueError(f"special token {s!r} id {i} collides with a BPE token or is outside vocab_size "
                             f"{vocab_size}")
        tokens[i], types[i] = s, int(gguf.TokenType.CONTROL)
    tokens = [t if t is not None else f"[PAD{i}]" for i, t in enumerate(tokens)]
    merges = []
    for b, r in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(b) > 1:
            parts = _bpe_parts(ranks, b, r)
            if len(parts) == 2:
                merges.append(f"{to_str(parts[0])} {to_str(parts[1])}")
    return tokens, types, merges


def _write_tokenizer(w: gguf.GGUFWriter, hf_dir: str, vocab_size: int) -> None:
    tok = Tokenizer.from_dir(hf_dir)
    ranks = {tok.token_bytes(i): i for i in range(tok.num_base_tokens)}
    tokens, types, merges = tokenizer_arrays(ranks, tok.special_tokens, vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(PRE_TOKENIZER)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    # bos/eos/pad ids, add_*_token flags and the chat template, as llama.cpp does (config.json ids,
    # tokenizer_config.json), then any of bos/eos/unk/pad still unset by name from tokenizer_config.
    sv = gguf.SpecialVocab(hf_dir, load_merges=False, n_vocab=vocab_size)
    cfg_path = os.path.join(hf_dir, "tokenizer_config.json")
    if os.path.isfile(cfg_path):
        with open(cfg_path, encoding="utf-8") as f:
            tcfg = json.load(f)
        for typ in ("bos", "eos", "unk", "pad"):
            entry = tcfg.get(f"{typ}_token")
            text = entry.get("content") if isinstance(entry, dict) else entry
            if typ not in sv.special_token_ids and isinstance(text, str) and text in tok.special_tokens:
                sv.special_token_ids[typ] = tok.special_tokens[text]
    sv.add_to_gguf(w, quiet=True)


# ---- metadata ------------------------------------------------------------------------------------
def _write_metadata(w: gguf.GGUFWriter, cfg, name: str, experts: str) -> None:
    """The keys convert_hf_to_gguf.py writes for DeepseekV2Model (TextModel.set_gguf_parameters +
    DeepseekV2Model.set_gguf_parameters) and llama.cpp's deepseek2 loader reads."""
    w.add_name(name)
    w.add_file_type(FILE_TYPES[experts])
    w.add_quantization_version(GGML_QUANT_VERSION)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(1)  # MLA with the absorption optimization is MQA over the latent
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_leading_dense_block_count(cfg.first_k_dense_replace)
    if cfg.q_lora_rank is not None:
        w.add_q_lora_rank(cfg.q_lora_rank)
    w.add_kv_lora_rank(cfg.kv_lora_rank)
    w.add_key_length(cfg.kv_lora_rank + cfg.qk_rope_head_dim)  # latent cache row: kv_lora + rope
    w.add_value_length(cfg.kv_lora_rank)
    w.add_key_length_mla(cfg.qk_nope_head_dim + cfg.qk_rope_head_dim)
    w.add_value_length_mla(cfg.v_head_dim)
    w.add_rope_dimension_count(cfg.qk_rope_head_dim)
    w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    if cfg.n_routed_experts:
        w.add_expert_count(cfg.n_routed_experts)
        w.add_expert_used_count(cfg.num_experts_per_tok)
    w.add_expert_shared_count(cfg.n_shared_experts)
    w.add_expert_group_count(cfg.n_group)
    w.add_expert_group_used_count(cfg.topk_group)
    w.add_expert_weights_scale(cfg.routed_scaling_factor)
    if cfg.norm_topk_prob:
        w.add_expert_weights_norm(True)
    w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID if cfg.scoring_func == "sigmoid"
                             else gguf.ExpertGatingFuncType.SOFTMAX)
    rs = cfg.rope_scaling
    if rs.type == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(rs.factor)
        w.add_rope_scaling_orig_ctx_len(rs.original_max_position_embeddings)
        w.add_rope_scaling_yarn_beta_fast(rs.beta_fast)
        w.add_rope_scaling_yarn_beta_slow(rs.beta_slow)
        if rs.attention_factor is not None:
            w.add_rope_scaling_yarn_attn_factor(rs.attention_factor)
        # [TAG_DEEPSEEK2_YARN_LOG_MUL_FIX]: deepseek2 stores 0.1 * mscale_all_dim; llama.cpp divides by 0.1
        w.add_rope_scaling_yarn_log_mul(0.1 * rs.mscale_all_dim)
        if rs.mscale != rs.mscale_all_dim:
            log.warning("rope_scaling.mscale %s != mscale_all_dim %s: GGUF (llama.cpp) keeps only "
                        "mscale_all_dim", rs.mscale, rs.mscale_all_dim)


# ---- tensor plan ---------------------------------------------------------------------------------
def _plan(ck, cfg, expert_qt: QT, other_qt: QT, int4_lossless: bool, stats: dict) -> list[_Tensor]:
    path = ck.path

    def need(name: str, shape: tuple[int, ...]) -> None:
        if name not in ck:
            raise ValueError(f"{path}: tensor {name!r} is missing")
        if tuple(ck.shape(name)) != shape:
            raise ValueError(f"{path}: tensor {name!r} has shape {list(ck.shape(name))}, expected {list(shape)}")

    def load(name: str) -> np.ndarray:
        return ck.get(name, torch.float32).numpy()

    def plain(gname: str, hf: str, shape: tuple[int, ...], qt: QT) -> _Tensor:
        need(hf, shape)
        if qt not in (QT.F32, QT.F16, QT.BF16) and shape[-1] % GGML_QUANT_SIZES[qt][0]:
            log.info("%s: %d columns do not fill %s blocks; stored as F32", gname, shape[-1], qt.name)
            qt = QT.F32
        return _Tensor(gname, shape, qt, lambda: iter([encode(load(hf), qt)]))

    def kv_b_split(layer: int) -> list[_Tensor]:
        # convert_hf_to_gguf.py DeepseekV2Model.modify_tensors: kv_b [n_head*(nope+v), kv_lora]
        # -> view [n_head, nope+v, kv_lora]; k_b = [:, :nope].transpose(1, 2), v_b = [:, nope:]
        hf = f"model.layers.{layer}.self_attn.kv_b_proj.weight"
        nh, nope, vh, kvr = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
        need(hf, (nh * (nope + vh), kvr))

        def part(which: str) -> Iterator[np.ndarray]:
            k_b, v_b = split_kv_b(load(hf), nh, nope)
            yield encode(k_b if which == "k" else v_b, qts[which])

        shapes = {"k": (nh, kvr, nope), "v": (nh, vh, kvr)}
        qts = {k: other_qt if other_qt in (QT.F32, QT.F16, QT.BF16) or s[-1] % GGML_QUANT_SIZES[other_qt][0] == 0
               else QT.F32 for k, s in shapes.items()}
        return [_Tensor(f"blk.{layer}.attn_{k}_b.weight", shapes[k], qts[k], lambda k=k: part(k)) for k in "kv"]

    def experts(layer: int, kind: str, rows: int, cols: int) -> _Tensor:
        gname = f"blk.{layer}.ffn_{kind}_exps.weight"
        block = GGML_QUANT_SIZES[expert_qt][0]
        if cols % block:
            raise ValueError(f"{gname}: rows of {cols} values do not fill {expert_qt.name} blocks of {block} "
                             f"(hidden/moe_intermediate sizes must be multiples of {block} for this format)")
        names = [f"model.layers.{layer}.mlp.experts.{e}.{kind}_proj.weight" for e in range(cfg.n_routed_experts)]
        for n in names:
            need(n, (rows, cols))

        def chunks() -> Iterator[np.ndarray]:
            for n in names:
                if int4_lossless and ck.format(n) == "int4_group":
                    iw = ck.get_int4(n)
                    if iw.group_size == 32:
                        blocks, inexact = int4_to_q4_0(iw.q.numpy(), iw.scale.numpy())
                        stats["int4_repacked"] += 1
                        stats["int4_inexact_scales"] += inexact
                        yield blocks
                        continue
                yield encode(load(n), expert_qt)

        return _Tensor(gname, (cfg.n_routed_experts, rows, cols), expert_qt, chunks)

    H, V = cfg.hidden_size, cfg.vocab_size
    nh, qk = cfg.num_attention_heads, cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    F32 = QT.F32
    out = [plain("token_embd.weight", "model.embed_tokens.weight", (V, H), other_qt)]
    for i in range(cfg.num_hidden_layers):
        b, p = f"blk.{i}.", f"model.layers.{i}."
        out.append(plain(b + "attn_norm.weight", p + "input_layernorm.weight", (H,), F32))
        if cfg.q_lora_rank is not None:
            qr = cfg.q_lora_rank
            out += [plain(b + "attn_q_a.weight", p + "self_attn.q_a_proj.weight", (qr, H), other_qt),
                    plain(b + "attn_q_a_norm.weight", p + "self_attn.q_a_layernorm.weight", (qr,), F32),
                    plain(b + "attn_q_b.weight", p + "self_attn.q_b_proj.weight", (nh * qk, qr), other_qt)]
        else:
            out.append(plain(b + "attn_q.weight", p + "self_attn.q_proj.weight", (nh * qk, H), other_qt))
        kvr = cfg.kv_lora_rank
        out += [plain(b + "attn_kv_a_mqa.weight", p + "self_attn.kv_a_proj_with_mqa.weight",
                      (kvr + cfg.qk_rope_head_dim, H), other_qt),
                plain(b + "attn_kv_a_norm.weight", p + "self_attn.kv_a_layernorm.weight", (kvr,), F32)]
        out += kv_b_split(i)
        out += [plain(b + "attn_output.weight", p + "self_attn.o_proj.weight", (H, nh * cfg.v_head_dim), other_qt),
                plain(b + "ffn_norm.weight", p + "post_attention_layernorm.weight", (H,), F32)]
        if not cfg.is_moe_layer(i):
            I = cfg.intermediate_size
            out += [plain(b + "ffn_gate.weight", p + "mlp.gate_proj.weight", (I, H), other_qt),
                    plain(b + "ffn_up.weight", p + "mlp.up_proj.weight", (I, H), other_qt),
                    plain(b + "ffn_down.weight", p + "mlp.down_proj.weight", (H, I), other_qt)]
            continue
        E, M = cfg.n_routed_experts, cfg.moe_intermediate_size
        out.append(plain(b + "ffn_gate_inp.weight", p + "mlp.gate.weight", (E, H), F32))
        if p + "mlp.gate.e_score_correction_bias" in ck:
            out.append(plain(b + "exp_probs_b.bias", p + "mlp.gate.e_score_correction_bias", (E,), F32))
        out += [experts(i, "gate", M, H), experts(i, "up", M, H), experts(i, "down", H, M)]
        if cfg.n_shared_experts:
            S = M * cfg.n_shared_experts
            out += [plain(b + "ffn_gate_shexp.weight", p + "mlp.shared_experts.gate_proj.weight", (S, H), other_qt),
                    plain(b + "ffn_up_shexp.weight", p + "mlp.shared_experts.up_proj.weight", (S, H), other_qt),
                    plain(b + "ffn_down_shexp.weight", p + "mlp.shared_experts.down_proj.weight", (H, S), other_qt)]
    out.append(plain("output_norm.weight", "model.norm.weight", (H,), F32))
    if not cfg.tie_word_embeddings:
        out.append(plain("output.weight", "lm_head.weight", (V, H), other_qt))
    return out


# ---- entry points --------------------------------------------------------------------------------
def convert(hf_dir: str | os.PathLike, out_path: str | os.PathLike, experts: str = "q4_0", other: str = "q8_0",
            progress: bool = True) -> str:
    """Convert the HF checkpoint in `hf_dir` to a deepseek2 GGUF at `out_path`; returns the path. A multimodal
    Kimi K2.5+ checkpoint (model_type kimi_k25) gives its text model: HFCheckpoint maps the prefixed names and
    skips the vision tower, whose tensors the deepseek2 architecture has no place for.

    experts: format of the routed experts (EXPERT_FORMATS); INT4 (compressed-tensors,
      group 32) experts become q4_0 without requantization. other: format of the remaining matrices
      ('q8_0', 'bf16', 'f16', 'f32'); norms, router and biases are always F32. The file is written
      to a temp file beside `out_path` and renamed over it only when complete (check_output)."""
    if experts not in EXPERT_FORMATS:
        raise ValueError(f"experts={experts!r}: expected one of {', '.join(EXPERT_FORMATS)}")
    if other not in OTHER_FORMATS:
        raise ValueError(f"other={other!r}: expected one of {', '.join(OTHER_FORMATS)}")
    hf_dir, out_path = os.fspath(hf_dir), os.fspath(out_path)
    cfg = ModelConfig.from_json(hf_dir)
    if cfg.moe_layer_freq != 1:
        raise ValueError(f"{cfg.source}: moe_layer_freq {cfg.moe_layer_freq} cannot be expressed in a deepseek2 GGUF")
    with HFCheckpoint(hf_dir) as ck:
        return write_gguf(ck, cfg, out_path, tokenizer_dir=hf_dir, name=_model_name(hf_dir), experts=experts,
                          other=other, progress=progress)


def _input_files(*paths) -> list[str]:
    """The files a conversion reads: each path, or a directory's files (shards, config, tokenizer)."""
    out = []
    for p in paths:
        if p is None:
            continue
        p = os.fspath(p)
        if os.path.isdir(p):
            out += [os.path.join(p, n) for n in os.listdir(p)]
        elif os.path.exists(p):
            out.append(p)
    return out


def check_output(out_path: str, inputs) -> None:
    """Refuse, before any work, an OUT the conversion must not replace: a directory, anything but a regular
    file (a device node, a FIFO, a socket), or one of the files it reads (by path or inode: hard and symbolic
    links included); and an OUT whose directory does not exist."""
    parent = os.path.dirname(os.path.abspath(out_path))
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"{out_path}: the directory {parent} does not exist")
    try:
        st = os.stat(out_path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        raise IsADirectoryError(f"{out_path}: is a directory; OUT names the .gguf file to write")
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"{out_path}: exists and is not a regular file (a device, FIFO or socket); refusing to "
                         f"replace it")
    for f in inputs:
        try:
            same = os.path.samefile(f, out_path)
        except OSError:
            continue
        if same:
            raise ValueError(f"{out_path}: is an input of this conversion ({f}); write the GGUF elsewhere")


def write_gguf(ck, cfg, out_path: str, *, tokenizer_dir: str, name: str, experts: str = "q4_0",
               other: str = "q8_0", progress: bool = True) -> str:
    """Write any Checkpoint (logical HF names) as a deepseek2 GGUF, tensor by tensor, into a temp file beside
    out_path that replaces it only once complete (a failed or interrupted run leaves neither)."""
    out_path = os.fspath(out_path)
    check_output(out_path, _input_files(getattr(ck, "path", None), tokenizer_dir))
    stats = {"int4_repacked": 0, "int4_inexact_scales": 0}
    plan = _plan(ck, cfg, EXPERT_FORMATS[experts], OTHER_FORMATS[other], experts == "q4_0", stats)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(out_path)}.", suffix=".part",
                               dir=os.path.dirname(os.path.abspath(out_path)))
    os.close(fd)
    w = gguf.GGUFWriter(tmp, ARCH)
    try:
        _write_metadata(w, cfg, name, experts)
        _write_tokenizer(w, tokenizer_dir, cfg.vocab_size)
        for t in plan:
            # a non-uint8 placeholder dtype makes the writer take `shape` as the logical shape
            w.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes, raw_dtype=t.qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=sum(t.nbytes for t in plan), unit="B", unit_scale=True, desc="convert")
        try:
            for t in plan:
                if bar is not None:
                    bar.set_postfix_str(t.name, refresh=False)
                w.write_tensor_data(_Stream(t, bar))
        finally:
            if bar is not None:
                bar.close()
        w.close()
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)           # mkstemp's 0600 -> what open() would have made
        check_output(out_path, ())               # OUT may have been replaced by a directory meanwhile
        os.replace(tmp, out_path)
    except BaseException:
        try:
            w.close()
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        raise
    if stats["int4_inexact_scales"]:
        log.warning("%d INT4 group scales are not exactly representable in fp16 (Q4_0's d); those groups "
                    "were rounded", stats["int4_inexact_scales"])
    return out_path


def _model_name(hf_dir: str) -> str:
    try:
        with open(os.path.join(hf_dir, "config.json")) as f:
            name = json.load(f).get("_name_or_path")
    except (OSError, ValueError):
        name = None
    return os.path.basename(name.rstrip("/")) if isinstance(name, str) and name else \
        os.path.basename(os.path.abspath(hf_dir))


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so a conversion unwinds (its temp file removed) as on Ctrl-C."""


def _on_sigterm(signum, frame):
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="hybrid-k2 convert",
                                description="Convert an HF DeepSeek-V3 / Kimi K2 checkpoint to a llama.cpp deepseek2 GGUF.")
    p.add_argument("hf_dir", help="HF checkpoint directory (config.json, *.safetensors, tiktoken.model)")
    p.add_argument("out", help="output .gguf file")
    p.add_argument("--experts", choices=list(EXPERT_FORMATS), default="q4_0",
                   help="routed-expert format (default q4_0; INT4 checkpoints convert to q4_0 losslessly)")
    p.add_argument("--other", choices=list(OTHER_FORMATS), default="q8_0",
                   help="format of attention, dense, shared-expert and embedding matrices (default q8_0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    previous = signal.signal(signal.SIGTERM, _on_sigterm) if threading.current_thread() is threading.main_thread() \
        else None
    try:
        out = convert(a.hf_dir, a.out, experts=a.experts, other=a.other, progress=not a.no_progress)
    except (ValueError, OSError) as e:
        print(f"hybrid-k2 convert: error: {e}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, Terminated) as e:
        print(f"hybrid-k2 convert: {'terminated' if isinstance(e, Terminated) else 'interrupted'}; nothing "
              f"written", file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
