"""`hybrid_k2.load`: checkpoint (HF dir, .gguf, or preset) -> Engine, one tensor at a time."""
from __future__ import annotations

import os
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .checkpoint import fetch, open_checkpoint
from .config import PRESETS, ModelConfig
from .generate import Engine
from .model import Transformer

EXPERT_BACKENDS = ("auto", "torch", "cpu", "hybrid")


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
         cache_policy: str = "score", prefetch: bool = True, lookahead: int = 1, record_hidden: bool = False) -> Engine:
    """Load a model and return an `Engine`. See DESIGN.md for the meaning of each argument."""
    if experts not in EXPERT_BACKENDS:
        raise ValueError(f"experts={experts!r}: expected one of {', '.join(EXPERT_BACKENDS)}")
    device = torch.device(device) if device is not None else default_device()
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
        net = build_model(cfg, ckpt, device, dtype, progress)
        backend = _load_experts(experts, ckpt, cfg, device, dtype, progress, expert_format, threads,
                                vram_budget=vram_budget, ctx=ctx, cache_slots=cache_slots,
                                cache_policy=cache_policy, prefetch=prefetch, lookahead=lookahead)
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


def build_model(cfg: ModelConfig, ckpt, device, dtype, progress: bool = False) -> Transformer:
    """Instantiate on the meta device, then fill each parameter straight from the checkpoint."""
    with torch.device("meta"):
        net = Transformer(cfg)
    net = net.to(dtype).to_empty(device=device)   # cast on meta: no fp32 copy is ever allocated
    params = list(net.named_parameters())
    for name, p in tqdm(params, desc="weights", unit="tensor", disable=not progress):
        src = name
        if name == "lm_head.weight" and name not in ckpt and cfg.tie_word_embeddings:
            src = "model.embed_tokens.weight"
        p.data.copy_(fetch(ckpt, src, tuple(p.shape)))
    net.eval().requires_grad_(False)   # inference; a training script turns grads back on
    return net


def _load_tokenizer(ckpt, path: Path):
    from .tokenizer import Tokenizer
    if hasattr(ckpt, "tokenizer_vocab"):
        ranks, specials = ckpt.tokenizer_vocab()
        return Tokenizer.from_ranks(ranks, specials) if ranks else None
    if (path / "tiktoken.model").is_file():
        return Tokenizer.from_dir(path)
    return None   # weights-only checkpoints still serve Engine.logits


def _load_experts(kind: str, ckpt, cfg: ModelConfig, device, dtype, progress: bool, expert_format, threads, *,
                  vram_budget=None, ctx=None, cache_slots=None, cache_policy="score", prefetch=True, lookahead=1):
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
                                                 prefetch=prefetch, lookahead=lookahead)
        from .experts.cpu import CPUExperts
        return CPUExperts.from_checkpoint(ckpt, cfg, expert_format, threads=threads, progress=bar)
    finally:
        bar.close()
