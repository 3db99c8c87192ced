"""`hybrid_k2.load`: checkpoint (HF dir, .gguf, or preset) -> Engine, one tensor at a time."""
from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .checkpoint import CheckpointError, check_config_against, fetch, open_checkpoint
from .checkpoint.gguf import split_kv_b
from .config import PRESETS, ModelConfig
from .generate import Engine
from .model import Transformer
from .runtime import CPURuntime

log = logging.getLogger(__name__)

EXPERT_BACKENDS = ("auto", "torch", "cpu", "hybrid")
# dense_format: how the non-expert matrices (DENSE_MATRICES) are held.
#   'auto' (default; None means the same): on a CPU device GGML blocks in the C kernels ('native' for a GGUF,
#       'q8_0' for an HF checkpoint), unless experts='torch' (the reference: float); on an accelerator 'fp8'
#       when the checkpoint stores them FP8, else the compute dtype, as the planner fits them (resolve_dense_format).
#   'float': tensors in the compute dtype (torch matmuls); 'bf16': the same with a bfloat16 compute dtype.
#   'native' / 'q8_0' / 'q4_0': GGML blocks run by the CPU kernels (hybrid_k2.qlinear), device='cpu' only;
#       'native' reads a GGUF's stored blocks in place (others as q8_0), the rest quantize at load.
#   'fp8': FP8 with block scales (hybrid_k2.fp8linear): an FP8 checkpoint's matrices as stored, a float
#       checkpoint's quantized at load; lm_head stays float unless stored FP8 (Kimi K2 and DeepSeek-V3 store it
#       BF16). Not for a GGUF. Meant for accelerators; also runs on a CPU device (exact, but dequantizes per use).
DENSE_FORMATS = ("auto", "float", "native", "q8_0", "q4_0", "fp8", "bf16")
BLOCK_FORMATS = ("native", "q8_0", "q4_0")
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
         dense_format: str | None = "auto", defer_experts: int = 0, prefetch_heads=None,
         prefill_stream: bool | None = None) -> Engine:
    """Load a model and return an `Engine`. See DESIGN.md for the meaning of each argument; `dense_format`
    (DENSE_FORMATS; default 'auto', resolved by resolve_dense_format and kept as `engine.dense_format`) says how
    the attention, dense FFN, shared-expert and lm_head matrices are held; `defer_experts` (default 0, off) lets
    each decoded token's n lowest-weighted experts finish one layer late (Transformer.set_deferral);
    `prefetch_heads` (hybrid) is a learned routing-predictor .npz (RoutingPredictor.save_heads,
    bench/bench_prefetch.py writes one); `prefill_stream` (hybrid: None = when the cost model says streaming a
    long prompt's experts to the accelerator beats the CPU, True/False = always/never; HybridExperts).
    `ram_budget` (bytes or '256GiB', parsed like vram_budget; default the machine's MemAvailable) is the RAM the
    cpu backend may fill: when a GGUF's routed experts do not fit it they stay mapped in place from the file and
    are paged in from disk (CPUExperts.from_checkpoint says so in one line, and so does `engine.summary`).
    `engine.summary` (logged at INFO, printed to stderr with progress) says what runs where."""
    for name, value in (("prefetch_heads", prefetch_heads), ("prefill_stream", prefill_stream)):
        if value is not None and experts != "hybrid":
            raise ValueError(f"{name} applies to experts='hybrid' (the accelerator's expert cache)")
    if experts not in EXPERT_BACKENDS:
        raise ValueError(f"experts={experts!r}: expected one of {', '.join(EXPERT_BACKENDS)}")
    if ram_budget is not None:
        from . import placement
        ram_budget = placement.parse_size(ram_budget, "ram_budget")   # a bad one fails before anything loads
        if experts == "torch":
            raise ValueError("ram_budget applies to the experts kept in RAM (experts='cpu', 'hybrid' or 'auto'), "
                             "not experts='torch'")
    device = torch.device(device) if device is not None else default_device()
    dense_format = check_dense_format(dense_format, device)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    dtype = _compute_dtype(dense_format, dtype, device)
    if progress is None:
        progress = os.isatty(2)

    path = resolve_model_path(model)
    ckpt = open_checkpoint(path)
    try:
        cfg = (ModelConfig.from_dict(ckpt.config_dict(), source=str(path)) if hasattr(ckpt, "config_dict")
               else ModelConfig.from_json(path))
        check_config_against(ckpt, cfg)   # from the headers, before anything the config sizes is allocated
        if ctx is not None and not (isinstance(ctx, int) and not isinstance(ctx, bool) and ctx > 0):
            raise ValueError(f"ctx must be a positive number of tokens, got {ctx!r}")
        dense, dense_why = resolve_dense_format(dense_format, ckpt, cfg, device, dtype, experts=experts,
                                                vram_budget=vram_budget, ctx=ctx)
        tokenizer = _load_tokenizer(ckpt, path)
        net = build_model(cfg, ckpt, device, dtype, progress, dense_format=dense)
        net.set_deferral(defer_experts)   # checks the argument before the experts load
        backend = _load_experts(experts, ckpt, cfg, device, dtype, progress, expert_format, threads,
                                ram_budget=ram_budget, ram_used=resident_bytes(net, device),
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
        if device.type == "cpu":
            net.set_runtime(CPURuntime.build)   # (made once the first cache makes the RoPE table)
    except BaseException:
        ckpt.close()
        raise
    engine = Engine(net, tokenizer, ctx=ctx, experts=backend, checkpoint=ckpt, recorder=recorder)
    engine.dense_format = dense
    if device.type == "cpu" and (dense in BLOCK_FORMATS or backend is not None and backend.name != "torch"):
        # The C kernels' pool owns the cores. torch's OpenMP team spinning beside it slows both (by an order of
        # magnitude when anything else runs on the machine), and what is left to torch here is small.
        torch.set_num_threads(1)
    engine.summary = loading_summary("demo" if str(model) == "demo" else path.name, net, backend, device, dtype,
                                     dense, dense_why)
    log.info("%s", engine.summary)
    if progress:
        print(engine.summary, file=sys.stderr)
    return engine


def check_dense_format(dense_format, device) -> str:
    """The argument checked against the device (before anything loads); None is 'auto'."""
    if dense_format is None:
        return "auto"
    if not isinstance(dense_format, str) or dense_format not in DENSE_FORMATS:
        raise ValueError(f"dense_format={dense_format!r}: expected one of {', '.join(map(repr, DENSE_FORMATS))}")
    if dense_format in BLOCK_FORMATS and torch.device(device).type != "cpu":
        raise ValueError(f"dense_format={dense_format!r} runs the attention, dense FFN, shared-expert and lm_head "
                         f"matrices in the CPU kernels, so it needs device='cpu' (got device={str(device)!r}); "
                         f"on an accelerator use 'auto', 'fp8', 'bf16' or 'float'")
    return dense_format


def _compute_dtype(dense_format: str, dtype, device) -> torch.dtype:
    if dense_format == "bf16":   # 'bf16' names the compute dtype the float matrices are held in
        if dtype is not None and dtype != torch.bfloat16:
            raise ValueError(f"dense_format='bf16' holds the dense matrices in the compute dtype, but dtype={dtype}; "
                             f"pass dtype=torch.bfloat16 (or leave it unset), or dense_format='float'")
        return torch.bfloat16
    if dtype is None:
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return dtype


def _fp8_matrices(ckpt, cfg: ModelConfig) -> list[str]:
    """The covered matrices (DENSE_MATRICES) the checkpoint stores as FP8 with block scales."""
    return [n for n in ckpt.names() if n.endswith(".weight") and DENSE_MATRICES.fullmatch(n[:-len(".weight")])
            and ckpt.format(n) == "fp8_block"]


def resolve_dense_format(dense_format, ckpt, cfg: ModelConfig, device, dtype, *, experts: str = "auto",
                         vram_budget=None, ctx: int | None = None) -> tuple[str, str]:
    """(format, why): 'float', 'native', 'q8_0', 'q4_0' or 'fp8' for this checkpoint and device.

    'auto' on a CPU device: GGML blocks (a GGUF's own, else Q8_0 quantized at load), as llama.cpp runs them,
    unless experts='torch' asks for the reference (float). On an accelerator: the planner's choice for the VRAM
    (vram_budget, else the device's) and ctx: an FP8 checkpoint's own precision, else the compute dtype when it
    fits, else FP8 quantized at load (placement.choose_dense)."""
    device = torch.device(device)
    fmt = check_dense_format(dense_format, device)
    gguf = hasattr(ckpt, "raw_blocks")
    if fmt == "fp8" and gguf:
        raise CheckpointError(f"{ckpt.path}: dense_format='fp8' holds FP8 matrices with block scales, which a "
                              f"GGUF does not store; use dense_format='native' (device='cpu') or 'float'")
    if fmt == "bf16":
        return "float", "as asked (bf16)"
    if fmt != "auto":
        return fmt, "as asked"
    if experts == "torch":
        return "float", "the reference (experts='torch') runs float matrices"
    if device.type == "cpu":
        if gguf:
            return "native", "the GGUF's own blocks in place"
        return "q8_0", "quantized at load to Q8_0"
    from . import placement
    stored = "gguf" if gguf else ("fp8" if _fp8_matrices(ckpt, cfg) else None)
    compute = {torch.bfloat16: "bf16", torch.float16: "f16", torch.float32: "f32"}.get(dtype, "bf16")
    if vram_budget is not None:
        vram = placement.parse_size(vram_budget, "vram_budget")
    else:
        found = placement.cuda_vram_bytes() if device.type == "cuda" else None
        vram = found[1] if found else None
    if vram is None:   # nothing to size against: the checkpoint's own precision
        return ("fp8", "the checkpoint's own precision (FP8)") if stored == "fp8" else ("float", "the compute dtype")
    n = ctx or min(cfg.max_position_embeddings, placement.DEFAULT_CTX)
    chosen, why, fits = placement.choose_dense(cfg, vram=vram, ctx=n, stored=stored, compute=compute)
    if not fits:
        raise placement.PlacementError(f"{ckpt.path}: dense_format='auto': {why} (with a {n}-token KV cache and "
                                       f"workspace); pass a smaller ctx= or a larger vram_budget=, or a dense_format= "
                                       f"to load regardless")
    return ("fp8" if chosen == "fp8" else "float"), why


def loading_summary(name: str, net: Transformer, backend, device, dtype, dense: str, why: str) -> str:
    """One line: what runs where (device, dense format, expert backend and format, threads, ISA)."""
    from . import kernels
    from .fp8linear import FP8Linear
    from .qlinear import QuantLinear
    dt = str(dtype).removeprefix("torch.")
    covered = [m for n, m in net.named_modules() if DENSE_MATRICES.fullmatch(n)]
    kinds = sorted({m.qtype.name for m in covered if isinstance(m, QuantLinear)})
    if dense in BLOCK_FORMATS:
        held = f"dense {dense} blocks" + (f" {'/'.join(kinds)}" if dense == "native" else "") + ", C kernels"
        n_float = sum(not isinstance(m, QuantLinear) for m in covered)
        if n_float:
            held += f", {n_float} of {len(covered)} kept {dt}"
    elif dense == "fp8":
        n8 = sum(isinstance(m, FP8Linear) for m in covered)
        held = f"dense fp8, {n8} of {len(covered)} matrices (the rest {dt})"
    else:
        held = f"dense {dt} (torch)"
    held += f" ({why})"
    cfg = net.cfg
    shape = f"{cfg.n_routed_experts} x {len(cfg.moe_layers)} layers"
    if backend is None:
        experts = "no routed experts"
    elif backend.name == "torch":
        experts = f"experts torch {dt} ({shape})"
    else:
        layers = (backend.cpu if backend.name == "hybrid" else backend).layers.values()
        types = sorted({"/".join(dict.fromkeys((w.gate_type.name, w.up_type.name, w.down_type.name)))
                        for w in layers})
        experts = f"experts {backend.name} {', '.join(types)} ({shape})"
        cpu = backend.cpu if backend.name == "hybrid" else backend
        if getattr(cpu, "mapped", None):
            experts += " mapped in place from the file, paged from disk: they exceed the RAM budget"
    cpu_work = dense in BLOCK_FORMATS or (backend is not None and backend.name != "torch")
    threads = (f"{kernels.get_threads()} threads, {kernels.isa()}" if cpu_work
               else f"torch {torch.get_num_threads()} threads")
    if cpu_work and str(device) == "cpu":
        threads += " (torch 1 thread beside them)"
    return f"loaded {name}: {device} device; {held}; {experts}; {threads}"


def build_model(cfg: ModelConfig, ckpt, device, dtype, progress: bool = False, *,
                dense_format: str | None = "float") -> Transformer:
    """Instantiate on the meta device, then fill each parameter straight from the checkpoint.

    With a block dense_format the covered nn.Linear modules (DENSE_MATRICES) are swapped for QuantLinear while
    still on meta, so no float copy of those matrices is ever allocated; their blocks come from the GGUF in
    place ('native') or are quantized one tensor at a time. With 'fp8' they become FP8Linear modules filled
    from the checkpoint's FP8 bytes and block scales. 'auto' / None resolve as load's do with experts='auto'."""
    device = torch.device(device)
    dense_format, _ = resolve_dense_format(dense_format, ckpt, cfg, device, dtype)
    with torch.device("meta"):
        net = Transformer(cfg)
    quant = _swap_dense(net, cfg, ckpt, dense_format, dtype) if dense_format in BLOCK_FORMATS else {}
    fp8 = _swap_fp8(net, cfg, ckpt, dtype) if dense_format == "fp8" else {}
    net = net.to(dtype).to_empty(device=device)   # cast on meta: no fp32 copy is ever allocated (FP8Linear keeps its bits)
    params = list(net.named_parameters())
    bar = tqdm(total=len(params) + len(quant) + len(fp8), desc="weights", unit="tensor", disable=not progress)
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
        for name, (module, stored) in fp8.items():
            _fill_fp8(ckpt, _source(cfg, ckpt, name + ".weight"), module, stored)
            bar.update(1)
    if dense_format in BLOCK_FORMATS and dtype == torch.float32:   # the C decode step runs float32 models only
        _kv_b_blocks(net, cfg, ckpt, dense_format)
    net.eval().requires_grad_(False)   # inference; a training script turns grads back on
    return net


def _swap_fp8(net: Transformer, cfg: ModelConfig, ckpt, dtype) -> dict:
    """Replace the covered nn.Linear modules of a meta-device model by empty FP8Linear modules; returns
    {module name: (FP8Linear, stored as FP8 in the checkpoint)}. An FP8 checkpoint's FP8 matrices are kept as
    stored; every other covered matrix is quantized at load to 128x128 blocks (DeepSeek-V3's quantizer), except
    a float lm_head (as DeepSeek-V3 / Kimi K2 store it), which stays float."""
    from .fp8linear import FP8Linear
    stored = set(_fp8_matrices(ckpt, cfg))
    block = ckpt.fp8_block if stored else (128, 128)
    out = {}
    for name, m in list(net.named_modules()):
        if not (isinstance(m, nn.Linear) and DENSE_MATRICES.fullmatch(name)):
            continue
        src = _source(cfg, ckpt, name + ".weight")
        if src not in stored and name == "lm_head":
            continue
        q = FP8Linear(m.in_features, m.out_features, block, dtype=dtype)
        parent, _, child = name.rpartition(".")
        setattr(net.get_submodule(parent) if parent else net, child, q)
        out[name] = (q, src in stored)
    return out


def _fill_fp8(ckpt, src: str, module, stored: bool) -> None:
    shape = (module.out_features, module.in_features)
    try:
        if stored:   # the file's bytes and scales as they are (views of the mapping), copied in
            have = tuple(ckpt.shape(src))
            if have != shape:
                raise CheckpointError(f"{ckpt.path}: tensor {src!r} has shape {list(have)}, the model expects "
                                      f"{list(shape)}")
            module.set_weight(*ckpt.fp8_weight(src))
            ckpt.release(src)
        else:
            from .checkpoint.quantize import fp8_block_quantize
            w8, s = fp8_block_quantize(fetch(ckpt, src, shape), module.block)
            module.set_weight(w8, s)
    except ValueError as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{ckpt.path}: tensor {src!r}: {e}") from None


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
        if stored is not None and all(t in kernels.WEIGHT_IDS and kernels.qtype(t).block_size > 1
                                      for _, t in stored):   # not F16/F32 ones
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
            # a float tensor (F32/F16/BF16) becomes Q8_0 as the other formats' matrices: 2-4x fewer bytes per token
            if (stored is not None and stored.name in kernels.WEIGHT_QTYPES and stored.block_size > 1
                    and m.in_features % stored.block_size == 0):
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


def resident_bytes(net: Transformer, device) -> int:
    """Bytes of RAM the model's non-expert weights take on a CPU device (tensors, GGML blocks, kv_b blocks; blocks
    read in place from a GGUF count too: their pages are read every token); 0 on an accelerator."""
    if torch.device(device).type != "cpu":
        return 0
    from .qlinear import QuantLinear
    n = sum(t.nbytes for t in (*net.parameters(), *net.buffers()) if t.device.type == "cpu")
    for m in net.modules():
        if isinstance(m, QuantLinear) and m.blocks is not None:
            n += m.blocks.nbytes
        for b, _ in getattr(m, "kv_b_blocks", None) or ():
            n += b.nbytes
    return n


def _load_experts(kind: str, ckpt, cfg: ModelConfig, device, dtype, progress: bool, expert_format, threads, *,
                  ram_budget=None, ram_used: int = 0, vram_budget=None, ctx=None, cache_slots=None,
                  cache_policy="score", prefetch=True, lookahead=3,
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
            from .experts.hybrid import HybridConfig, HybridExperts
            config = HybridConfig(policy=cache_policy, prefetch=prefetch, lookahead=lookahead,
                                  predictor_heads=prefetch_heads, prefill_stream=prefill_stream)
            return HybridExperts.from_checkpoint(ckpt, cfg, expert_format, device=device, dtype=dtype,
                                                 n_slots=cache_slots, vram_budget=vram_budget, ctx=ctx,
                                                 threads=threads, progress=bar, ram_budget=ram_budget,
                                                 ram_used=ram_used, config=config)
        from .experts.cpu import CPUExperts
        # Overlap runs the experts in a worker while the accelerator computes the shared expert; on a CPU
        # device both would share the same cores (and the kernels' pool), so it would only add a handoff.
        return CPUExperts.from_checkpoint(ckpt, cfg, expert_format, threads=threads, progress=bar,
                                          overlap=torch.device(device).type != "cpu", ram_budget=ram_budget,
                                          ram_used=ram_used, lazy_check=True)
    finally:
        bar.close()
