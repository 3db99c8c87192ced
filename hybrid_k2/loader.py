"""`hybrid_k2.load`: checkpoint (HF dir, .gguf, or preset) -> Engine, one tensor at a time."""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .checkpoint import CheckpointError, fetch, open_checkpoint
from .checkpoint.gguf import split_kv_b
from .config import PRESETS, ModelConfig
from .generate import Engine
from .model import Transformer

log = logging.getLogger(__name__)

EXPERT_BACKENDS = ("auto", "torch", "cpu", "hybrid")
# dense_format: how the non-expert matrices are held. None: float tensors in `dtype` (torch matmuls);
# 'q8_0' / 'q4_0': quantized at load; 'native': a GGUF's stored blocks in place (others as q8_0).
# The quantized forms run in the CPU kernels (hybrid_k2.qlinear), so they need device='cpu'.
DENSE_FORMATS = (None, "native", "q8_0", "q4_0")
# The matrices dense_format covers. kv_b_proj stays a float tensor for prefill (its decode-step blocks are
# MLA.kv_b_blocks, see _kv_b_blocks); not the routers, norms or embeddings.
DENSE_MATRICES = re.compile(r"lm_head|model\.layers\.\d+\.(self_attn\.(q_a_proj|q_b_proj|q_proj|kv_a_proj_with_mqa|o_proj)"
                            r"|mlp\.(shared_experts\.)?(gate_proj|up_proj|down_proj))")


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_model_path(model: str | os.PathLike) -> Path:
    name = str(model)
    if name == "demo":
        from .demo import ensure_demo
        return ensure_demo()
    if name in PRESETS:
        raise ValueError(f"preset {name!r} describes sizes only (for `hybrid-k2 plan`); to run it, pass the "
                         "path of a checkpoint directory or a .gguf file")
    path = Path(name).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"model {name!r}: no such file or directory (expected an HF checkpoint directory, "
                                f"a .gguf file, or the preset 'demo')")
    return path


def load(model: str | os.PathLike, *, device=None, dtype=None, experts: str = "auto", expert_format: str | None = None,
         vram_budget=None, ram_budget=None, threads: int | None = None, mode: str = "auto",
         record_routing=None, ctx: int | None = None, progress: bool | None = None, cache_slots: int | None = None,
         cache_policy: str = "score", prefetch: bool = True, lookahead: int = 3, record_hidden: bool = False,
         dense_format: str | None = None, defer_experts: int = 0, prefetch_heads=None,
         prefill_stream: bool | None = None) -> Engine:
    """Load a model and return an `Engine`. See DESIGN.md for the meaning of each argument; `dense_format`
    (None, 'native', 'q8_0', 'q4_0', device='cpu' only) keeps the non-expert matrices quantized (DENSE_FORMATS);
    `defer_experts` (default 0, off) lets each decoded token's n lowest-weighted experts finish one layer late
    (Transformer.set_deferral); `prefetch_heads` (hybrid) is a learned routing-predictor .npz
    (RoutingPredictor.save_heads, bench/bench_prefetch.py writes one); `prefill_stream` (hybrid: None = when
    the cost model says streaming a long prompt's experts to the accelerator beats the CPU, True/False = always/
    never; HybridExperts)."""
    for name, value in (("prefetch_heads", prefetch_heads), ("prefill_stream", prefill_stream)):
        if value is not None and experts != "hybrid":
            raise ValueError(f"{name} applies to experts='hybrid' (the accelerator's expert cache)")
    if experts not in EXPERT_BACKENDS:
        raise ValueError(f"experts={experts!r}: expected one of {', '.join(EXPERT_BACKENDS)}")
    device = torch.device(device) if device is not None else default_device()
    check_dense_format(dense_format, device)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if progress is None:
        progress = os.isatty(2)

    path = resolve_model_path(model)
    ckpt = open_checkpoint(path)
    try:
        cfg = (ModelConfig.from_dict(ckpt.config_dict(), source=str(path)) if hasattr(ckpt, "config_dict")
               else ModelConfig.from_json(path))
        if ctx is not None and not 0 < ctx:
            raise ValueError(f"ctx must be positive, got {ctx}")
        tokenizer = _load_tokenizer(ckpt, path)
        net = build_model(cfg, ckpt, device, dtype, progress, dense_format=dense_format)
        net.set_deferral(defer_experts)   # checks the argument before the experts load
        backend = _load_experts(experts, ckpt, cfg, device, dtype, progress, expert_format, threads,
                                vram_budget=vram_budget, ctx=ctx, cache_slots=cache_slots,
                                cache_policy=cache_policy, prefetch=prefetch, lookahead=lookahead,
                                prefetch_heads=prefetch_heads, prefill_stream=prefill_stream)
        net.set_experts(backend)
        if hasattr(backend, "attach"):   # the prefetcher reads the next layers' routers
            backend.attach(net)
        recorder = None
        if record_routing is not None:
            from .routing import RoutingRecorder
            recorder = RoutingRecorder(record_routing, net, hidden=record_hidden)
            net.set_recorder(recorder)
    except BaseException:
        ckpt.close()
        raise
    return Engine(net, tokenizer, ctx=ctx, experts=backend, checkpoint=ckpt, recorder=recorder)


def check_dense_format(dense_format, device) -> None:
    if dense_format not in DENSE_FORMATS:
        raise ValueError(f"dense_format={dense_format!r}: expected None, 'native', 'q8_0' or 'q4_0'")
    if dense_format is not None and torch.device(device).type != "cpu":
        raise ValueError(f"dense_format={dense_format!r} runs the attention, dense FFN, shared-expert and lm_head "
                         f"matrices in the CPU kernels, so it needs device='cpu' (got device={str(device)!r}); "
                         f"leave dense_format=None on an accelerator")


def build_model(cfg: ModelConfig, ckpt, device, dtype, progress: bool = False, *,
                dense_format: str | None = None) -> Transformer:
    """Instantiate on the meta device, then fill each parameter straight from the checkpoint.

    With a dense_format, the covered nn.Linear modules (DENSE_MATRICES) are swapped for QuantLinear while
    still on meta, so no float copy of those matrices is ever allocated; their blocks come from the GGUF in
    place ('native') or are quantized one tensor at a time."""
    device = torch.device(device)
    check_dense_format(dense_format, device)
    with torch.device("meta"):
        net = Transformer(cfg)
    quant = _swap_dense(net, cfg, ckpt, dense_format, dtype) if dense_format is not None else {}
    net = net.to(dtype).to_empty(device=device)   # cast on meta: no fp32 copy is ever allocated
    params = list(net.named_parameters())
    bar = tqdm(total=len(params) + len(quant), desc="weights", unit="tensor", disable=not progress)
    with bar:
        for name, p in params:
            p.data.copy_(fetch(ckpt, _source(cfg, ckpt, name), tuple(p.shape)))
            bar.update(1)
        for name, (module, native) in quant.items():
            src = _source(cfg, ckpt, name + ".weight")
            try:
                if native:
                    module.set_blocks(ckpt.raw_blocks(src)[0])    # a view of the file mapping
                else:
                    from . import kernels
                    w = fetch(ckpt, src, (module.out_features, module.in_features))
                    module.set_blocks(kernels.quantize(w.numpy(), module.qtype))
                    del w
            except ValueError as e:
                if isinstance(e, CheckpointError):
                    raise
                raise CheckpointError(f"{ckpt.path}: tensor {src!r}: {e}") from None
            bar.update(1)
    if dense_format is not None and dtype == torch.float32:   # the C decode step runs float32 models only
        _kv_b_blocks(net, cfg, ckpt, dense_format)
    net.eval().requires_grad_(False)   # inference; a training script turns grads back on
    return net


def _kv_b_blocks(net: Transformer, cfg: ModelConfig, ckpt, dense_format: str) -> None:
    """Give each attention its kv_b as GGML blocks for the CPU decode step (MLA.kv_b_blocks): a GGUF's own
    attn_k_b / attn_v_b in place ('native'), else quantized from the loaded kv_b_proj. kv_b_proj stays a float
    tensor for prefill. In float32, kv_b is the largest attention read of a CPU decode step with many heads
    (Kimi K2: 32 MiB per layer; 8.5 MiB as Q8_0)."""
    from . import kernels
    H, nope, v, R = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    want = kernels.qtype("Q4_0" if dense_format == "q4_0" else "Q8_0")
    for layer in net.model.layers:
        attn = layer.self_attn
        name = f"model.layers.{attn.layer}.self_attn.kv_b_proj.weight"
        stored = ckpt.kv_b_blocks(name) if dense_format == "native" and hasattr(ckpt, "kv_b_blocks") else None
        if stored is not None and all(t in kernels.WEIGHT_IDS for _, t in stored):   # not F16/F32 ones
            types = [kernels.qtype(t) for _, t in stored]
            if nope % types[0].block_size == 0 and R % types[1].block_size == 0:
                for (b, _), t, part, rows, cols in zip(stored, types, ("attn_k_b", "attn_v_b"), (H * R, H * v), (nope, R)):
                    if b.shape != (rows, t.row_bytes(cols)):
                        raise CheckpointError(f"{ckpt.path}: tensor 'blk.{attn.layer}.{part}.weight' holds {b.shape[0]} "
                                              f"rows of {b.shape[1]} bytes; the config needs {rows} rows of {cols} "
                                              f"{t.name} values ({t.row_bytes(cols)} bytes)")
                attn.kv_b_blocks = tuple((b, t) for (b, _), t in zip(stored, types))
                continue
        if nope % want.block_size or R % want.block_size:
            log.info("%s: nope=%d / kv_lora_rank=%d do not fill %s blocks; the decode step reads it as a float "
                     "tensor", name, nope, R, want.name)
            continue
        k_b, v_b = split_kv_b(attn.kv_b_proj.weight.detach().float().numpy(), H, nope)
        attn.kv_b_blocks = tuple((kernels.quantize(np.ascontiguousarray(m.reshape(-1, m.shape[-1])), want), want)
                                 for m in (k_b, v_b))


def _source(cfg: ModelConfig, ckpt, name: str) -> str:
    if name == "lm_head.weight" and name not in ckpt and cfg.tie_word_embeddings:
        return "model.embed_tokens.weight"
    return name


def _swap_dense(net: Transformer, cfg: ModelConfig, ckpt, dense_format: str, dtype) -> dict:
    """Replace the covered nn.Linear modules of a meta-device model by empty QuantLinear modules; returns
    {module name: (QuantLinear, read the checkpoint's blocks in place)}."""
    from . import kernels
    from .qlinear import QuantLinear
    out = {}
    for name, m in list(net.named_modules()):
        if not (isinstance(m, nn.Linear) and DENSE_MATRICES.fullmatch(name)):
            continue
        src = _source(cfg, ckpt, name + ".weight")
        qt, native = None, False
        if dense_format == "native" and hasattr(ckpt, "raw_blocks"):
            stored = kernels.QTYPES.get(ckpt.format(src).upper()) if src in ckpt else None
            if stored is not None and stored.name in kernels.WEIGHT_QTYPES and m.in_features % stored.block_size == 0:
                qt, native = stored, True
        if qt is None:
            qt = kernels.qtype("Q4_0" if dense_format == "q4_0" else "Q8_0")
            if m.in_features % qt.block_size:
                log.warning("%s: %d columns do not fill %s blocks; kept as a %s tensor", name, m.in_features,
                            qt.name, dtype)
                continue
        q = QuantLinear(m.in_features, m.out_features, qt, dtype=dtype)
        parent, _, child = name.rpartition(".")
        setattr(net.get_submodule(parent) if parent else net, child, q)
        out[name] = (q, native)
    return out


def _load_tokenizer(ckpt, path: Path):
    from .tokenizer import Tokenizer
    if hasattr(ckpt, "tokenizer_vocab"):
        ranks, specials = ckpt.tokenizer_vocab()
        return Tokenizer.from_ranks(ranks, specials) if ranks else None
    if (path / "tiktoken.model").is_file():
        return Tokenizer.from_dir(path)
    return None   # weights-only checkpoints still serve Engine.logits


def _load_experts(kind: str, ckpt, cfg: ModelConfig, device, dtype, progress: bool, expert_format, threads, *,
                  vram_budget=None, ctx=None, cache_slots=None, cache_policy="score", prefetch=True, lookahead=3,
                  prefetch_heads=None, prefill_stream=None):
    if not cfg.moe_layers:
        return None
    if kind == "auto":
        kind = "cpu"
    total = len(cfg.moe_layers) * cfg.n_routed_experts
    bar = tqdm(total=total, desc=f"experts ({kind})", unit="expert", disable=not progress)
    try:
        if kind == "torch":
            if expert_format not in (None, "native"):
                raise ValueError("expert_format applies to the cpu backend; the torch backend keeps exact weights")
            from .experts.torch_backend import TorchExperts
            return TorchExperts.from_checkpoint(ckpt, cfg, device, dtype, bar)
        if kind == "hybrid":
            from .experts.hybrid import HybridExperts
            return HybridExperts.from_checkpoint(ckpt, cfg, expert_format, device=device, dtype=dtype,
                                                 n_slots=cache_slots, vram_budget=vram_budget, ctx=ctx,
                                                 threads=threads, progress=bar, policy=cache_policy,
                                                 prefetch=prefetch, lookahead=lookahead, predictor_heads=prefetch_heads,
                                                 prefill_stream=prefill_stream)
        from .experts.cpu import CPUExperts
        # Overlap runs the experts in a worker while the accelerator computes the shared expert; on a CPU
        # device both would share the same cores (and the kernels' pool), so it would only add a handoff.
        return CPUExperts.from_checkpoint(ckpt, cfg, expert_format, threads=threads, progress=bar,
                                          overlap=torch.device(device).type != "cpu")
    finally:
        bar.close()
