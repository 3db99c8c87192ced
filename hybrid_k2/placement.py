"""Placement planner: from VRAM/RAM budgets and a ModelConfig, decide what lives where.

Hybrid mode keeps every non-expert weight (embedding, attention, norms, routers, shared experts, dense
layers, lm_head) and the latent KV cache on the accelerator, all routed experts in RAM, and spends the
VRAM left over on whole-expert cache slots. TP mode (>= 16 GPUs, or the whole model fits in VRAM) puts
everything on the GPUs; it is reported here and built later.

Byte accounting is exact for the formats' storage (GGML blocks along each matrix row, i.e. the input
dimension); RMSNorm weights, routers and the router correction bias are counted in fp32. FP8 is counted at
1 byte/weight: its 128x128 fp32 block scales (1/4096 of the weight bytes) fall inside the workspace reserve.
With --dense fp8 the embedding, lm_head and kv_b_proj stay in the bf16 compute dtype, as the engine holds them
(FP8 checkpoints store the first two in bf16; the loader's FP8Linear covers the other projections).

--dense auto (the default) picks the format by choose_dense: an FP8 checkpoint's own precision (bf16 would only
upcast it), else the largest of bf16 / fp8 whose accelerator part fits the VRAM.

Decode roofline (per token, batch 1), with hit rate h of routed-expert reads served from the VRAM cache:
    t_cpu(layer) = (1 - h) * top_k * expert_bytes / ram_gbps           routed experts run by the CPU
    t_par(layer) = (shared_expert_bytes + h * top_k * expert_bytes) / gpu_gbps   GPU work overlapping t_cpu
    t_serial     = (all other accelerator bytes read: attention, norms, routers, dense FFN, lm_head,
                    one embedding row, the full KV cache at ctx) / gpu_gbps
    t_token      = t_serial + n_moe_layers * max(t_cpu(layer), t_par(layer))
i.e. a sum over layers (a layer's attention waits on the previous layer's FFN), a max inside each MoE
layer (the CPU experts and the GPU shared expert / cached experts run concurrently). PCIe copies are not
on the per-token path: under the uniform-routing default the cache content is static after warm-up.
TP mode: t_token = (all bytes read per token, active experts only) / (n_gpus * gpu_gbps), no comms cost.

Routed experts larger than the RAM budget: from a GGUF they are mapped in place (the file's own block layout,
no repack) and the OS pages them in from disk, as llama.cpp does; the plan reports the shortfall instead of
refusing. Under uniform routing the page cache (the budget less the reserve) holds a share f of the experts the
CPU reads, and the rest come from disk:
    t_cpu(layer) = (1 - h) * top_k * expert_bytes * (f / ram_gbps + (1 - f) / disk_gbps)
An HF checkpoint's experts are quantized into RAM at load, so they must fit; that plan is refused.
"""
from __future__ import annotations

import argparse
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field

from .config import ModelConfig, quantization_config

GiB = 1 << 30
MiB = 1 << 20

# (block weights, block bytes) for every format the engine can store.
FORMATS: dict[str, tuple[int, int]] = {
    "f32": (1, 4), "bf16": (1, 2), "f16": (1, 2), "fp8": (1, 1),
    "q8_0": (32, 34), "q4_0": (32, 18), "q4_k": (256, 144), "q6_k": (256, 210),
    # the community GGUF types (gguf.GGML_QUANT_SIZES), run in place by the CPU kernels
    "q2_k": (256, 84), "q3_k": (256, 110), "q5_k": (256, 176), "q4_1": (32, 20), "q5_0": (32, 22), "q5_1": (32, 24),
    "iq4_nl": (32, 18), "iq4_xs": (256, 136), "iq3_s": (256, 110), "iq3_xxs": (256, 98), "iq2_s": (256, 82),
    "iq2_xs": (256, 74), "iq2_xxs": (256, 66), "iq1_m": (256, 56), "iq1_s": (256, 50), "tq2_0": (256, 66),
    "tq1_0": (256, 54),
}
# Routed experts as the CPU backend holds them when that differs (kernels.REPACKED): q4_k as Q4_K_R8 (the 144 bytes
# per super-block plus 4 of unpacked scales), iq4_xs as IQ4_XS_R8 (136 plus 2 of unpacked scales).
EXPERT_HELD: dict[str, tuple[int, int]] = {"q4_k": (256, 148), "iq4_xs": (256, 138)}
FLOAT_FORMATS = ("f32", "bf16", "f16", "fp8")
FP8_COMPUTE = "bf16"       # what --dense fp8 keeps in float: embedding, lm_head, kv_b_proj (the compute dtype)
DEFAULT_CTX = 32768        # context the KV cache is sized for when none is given
# Presets whose released checkpoints store the dense matrices as FP8 (Kimi-K2-Instruct: 128x128 blocks).
PRESET_STORED = {"kimi-k2": "fp8"}
NORM_BYTES = 4             # RMSNorm weights, routers, correction bias: fp32
CUDA_OVERHEAD = 1 * GiB    # CUDA context, cuBLAS workspace, caching-allocator slack
RAM_RESERVE = 4 * GiB      # Python, torch, thread stacks, page-cache slack beside the experts
PREFILL_CHUNK = 128        # tokens per prefill step the workspace is sized for
PCIE_GBPS_ASSUMED = 25.0   # PCIe 4.0 x16, achieved host->device with pinned memory
GPU_GBPS_ASSUMED = 1000.0  # a conservative HBM figure (H100 PCIe ~2000, RTX 4090 ~1000)
DISK_GBPS_ASSUMED = 3.0    # page-fault reads of 25 MB experts from a PCIe 4.0 NVMe SSD (sequential ~7)


class PlacementError(ValueError):
    """The model does not fit the budgets; the message says by how much and what to change."""


# ---- sizes ---------------------------------------------------------------------------------------
def parse_size(value, what: str = "size") -> int:
    """Bytes from an int or a string: '24GiB', '80GB', '768 GiB', '1.5TiB', '512M' (bare K/M/G/T = binary)."""
    if isinstance(value, bool):
        raise ValueError(f"{what}: expected a size like '24GiB', got {value!r}")
    if isinstance(value, (int, float)):
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{what}: size must be a non-negative number of bytes, got {value!r}")
        return int(value)
    if not isinstance(value, str):
        raise ValueError(f"{what}: expected a size like '24GiB', got {value!r}")
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgtp]?)(i?)(b?)\s*", value, re.IGNORECASE)
    if not m:
        raise ValueError(f"{what}: cannot parse {value!r} as a size (examples: 24GiB, 80GB, 768GiB, 4096)")
    num, prefix, binary, b = m.groups()
    prefix = prefix.lower()
    if binary and not prefix:
        raise ValueError(f"{what}: cannot parse {value!r} as a size (examples: 24GiB, 80GB, 768GiB, 4096)")
    power = "kmgtp".index(prefix) + 1 if prefix else 0
    # 'GB' is decimal; 'GiB' and a bare 'G' are binary (as `free -g`, `ls -h` use them).
    base = 1000 if (prefix and b and not binary) else 1024
    n = float(num) * base ** power
    if not math.isfinite(n):
        raise ValueError(f"{what}: {value!r} is too large to be a size")
    return int(round(n))


def format_size(n: float) -> str:
    return f"{n / GiB:.1f} GiB" if abs(n) >= GiB else f"{n / MiB:.1f} MiB"


def bytes_per_weight(fmt: str) -> float:
    if fmt not in FORMATS:
        raise ValueError(f"unknown weight format {fmt!r}; known: {', '.join(FORMATS)}")
    block, nbytes = FORMATS[fmt]
    return nbytes / block


def tensor_bytes(rows: int, cols: int, fmt: str, name: str = "tensor") -> int:
    """Storage of a [rows, cols] matrix; block formats quantise along cols (the input dimension)."""
    bytes_per_weight(fmt)
    block, nbytes = FORMATS[fmt]
    if cols % block:
        raise PlacementError(f"format {fmt} stores blocks of {block} weights along each row, but {name} has rows "
                             f"of {cols}: pick a format with smaller blocks (q4_0, q8_0) for it")
    return rows * (cols // block) * nbytes


def embed_bytes(cfg: ModelConfig, fmt: str) -> int:
    return tensor_bytes(cfg.vocab_size, cfg.hidden_size, fmt, "model.embed_tokens.weight")


def lm_head_bytes(cfg: ModelConfig, fmt: str) -> int:
    return 0 if cfg.tie_word_embeddings else tensor_bytes(cfg.vocab_size, cfg.hidden_size, fmt, "lm_head.weight")


def _float_part(fmt: str) -> str:
    """The format of the matrices a dense format keeps in float (embedding, lm_head, kv_b_proj)."""
    return FP8_COMPUTE if fmt == "fp8" else fmt


def attention_layer_bytes(cfg: ModelConfig, fmt: str) -> int:
    """One layer's MLA projections plus its four RMSNorms (input, post-attention, q_a, kv_a) in fp32
    (kv_b_proj in the compute dtype under fp8)."""
    H, nh = cfg.hidden_size, cfg.num_attention_heads
    q_out = nh * cfg.qk_head_dim
    if cfg.q_lora_rank is None:
        q = tensor_bytes(q_out, H, fmt, "q_proj")
        q_norm = 0
    else:
        q = (tensor_bytes(cfg.q_lora_rank, H, fmt, "q_a_proj")
             + tensor_bytes(q_out, cfg.q_lora_rank, fmt, "q_b_proj"))
        q_norm = cfg.q_lora_rank * NORM_BYTES
    kv_a = tensor_bytes(cfg.kv_lora_rank + cfg.qk_rope_head_dim, H, fmt, "kv_a_proj_with_mqa")
    kv_b = tensor_bytes(nh * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank, _float_part(fmt), "kv_b_proj")
    o = tensor_bytes(H, nh * cfg.v_head_dim, fmt, "o_proj")
    norms = 2 * H * NORM_BYTES + q_norm + cfg.kv_lora_rank * NORM_BYTES
    return q + kv_a + kv_b + o + norms


def swiglu_bytes(H: int, inter: int, fmt: str, name: str) -> int:
    """gate/up [inter, H] and down [H, inter]."""
    return (2 * tensor_bytes(inter, H, fmt, f"{name}.gate_proj/up_proj")
            + tensor_bytes(H, inter, fmt, f"{name}.down_proj"))


def dense_ffn_bytes(cfg: ModelConfig, fmt: str) -> int:
    return swiglu_bytes(cfg.hidden_size, cfg.intermediate_size, fmt, "mlp")


def router_bytes(cfg: ModelConfig) -> int:
    """Gate [E, H] plus e_score_correction_bias [E], fp32."""
    bias = cfg.n_routed_experts if cfg.topk_method == "noaux_tc" else 0
    return (cfg.n_routed_experts * cfg.hidden_size + bias) * NORM_BYTES


def shared_expert_bytes(cfg: ModelConfig, fmt: str) -> int:
    if not cfg.n_shared_experts:
        return 0
    return swiglu_bytes(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts, fmt,
                        "mlp.shared_experts")


def expert_bytes(cfg: ModelConfig, fmt: str) -> int:
    """One routed expert (gate, up, down) as the CPU backend holds it (EXPERT_HELD)."""
    stored = swiglu_bytes(cfg.hidden_size, cfg.moe_intermediate_size, fmt, "mlp.experts.N")   # checks the blocks fit
    if fmt not in EXPERT_HELD:
        return stored
    (block, held), (_, nbytes) = EXPERT_HELD[fmt], FORMATS[fmt]
    return stored // nbytes * held


def routed_expert_bytes(cfg: ModelConfig, fmt: str) -> int:
    return len(cfg.moe_layers) * cfg.n_routed_experts * expert_bytes(cfg, fmt)


def kv_bytes_per_token(cfg: ModelConfig, fmt: str = "bf16") -> int:
    """Latent MLA cache: every layer keeps kv_lora_rank latents + qk_rope_head_dim rope dims per token."""
    return cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * int(bytes_per_weight(fmt))


def kv_cache_bytes(cfg: ModelConfig, ctx: int, fmt: str = "bf16") -> int:
    return ctx * kv_bytes_per_token(cfg, fmt)


def workspace_bytes(cfg: ModelConfig, ctx: int, act_bytes: int = 2, chunk: int = PREFILL_CHUNK) -> int:
    """Activation/workspace reserve on the accelerator:
        CUDA_OVERHEAD (1 GiB: context, cuBLAS workspace, allocator slack)
      + chunk * heads * ctx * 4 * 2      fp32 attention scores and probabilities of one prefill chunk
      + ctx * heads * (nope + v) * act   one layer's latents expanded to per-head K/V in prefill
      + chunk * vocab * 4                fp32 logits of one chunk
    """
    nh = cfg.num_attention_heads
    return (CUDA_OVERHEAD + chunk * nh * ctx * 4 * 2
            + ctx * nh * (cfg.qk_nope_head_dim + cfg.v_head_dim) * act_bytes
            + chunk * cfg.vocab_size * 4)


# ---- bandwidth probes ------------------------------------------------------------------------------
def measure_ram_gbps(nbytes: int = 512 * MiB, repeats: int = 3, threads: int | None = None) -> float:
    """Read bandwidth in GB/s: threads summing disjoint slices of a buffer larger than the caches
    (numpy reductions release the GIL). Best of `repeats`; a lower bound of what tuned kernels reach."""
    import numpy as np
    from concurrent.futures import ThreadPoolExecutor

    threads = threads or os.cpu_count() or 1
    n = max(nbytes // 8, threads * 1024)
    buf = np.ones(n, dtype=np.float64)        # ones, not empty: pages must be touched before timing
    slices = np.array_split(buf, threads)
    best = 0.0
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(repeats):
            t0 = time.perf_counter()
            total = sum(pool.map(np.sum, slices))
            dt = time.perf_counter() - t0
            if total != n:      # keeps the reads observable
                raise RuntimeError("RAM bandwidth probe read back wrong data")
            best = max(best, buf.nbytes / dt / 1e9)
    return best


def total_ram_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    raise PlacementError("/proc/meminfo has no MemTotal line; pass --ram")


def available_ram_bytes() -> int:
    """MemAvailable from /proc/meminfo: free memory plus what the kernel can reclaim without swapping (the page
    cache, a checkpoint's own pages included), i.e. what a load can take now."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    raise PlacementError("cannot read MemAvailable from /proc/meminfo; pass ram_budget= (e.g. '256GiB')")


def resolve_ram_budget(ram_budget, what: str = "ram_budget") -> tuple[int, str]:
    """(bytes, where from) for a load's RAM budget: parsed like vram_budget when given, else the machine's
    MemAvailable (available_ram_bytes)."""
    if ram_budget is None:
        return available_ram_bytes(), "MemAvailable"
    return parse_size(ram_budget, what), "given"


def cuda_vram_bytes() -> tuple[int, int] | None:
    """(n_gpus, bytes of the smallest one) from torch.cuda, or None without CUDA."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
        return None
    n = torch.cuda.device_count()
    return n, min(torch.cuda.get_device_properties(i).total_memory for i in range(n))


# ---- the plan --------------------------------------------------------------------------------------
@dataclass
class Component:
    name: str
    where: str          # "gpu" or "ram"
    nbytes: int
    detail: str = ""


@dataclass
class Plan:
    mode: str                       # "hybrid" or "tp"
    components: list[Component]
    vram_budget: int
    ram_budget: int
    ctx: int
    n_gpus: int
    dense_format: str
    expert_format: str
    kv_format: str
    expert_bytes: int               # one routed expert at expert_format
    n_moe_layers: int
    n_experts: int                  # routed experts per MoE layer
    top_k: int
    cache_slots: int                # whole experts the VRAM cache holds (hybrid); 0 in tp
    hit_rate: float                 # share of routed reads served from VRAM
    hit_rate_source: str
    ram_gbps: float
    pcie_gbps: float
    gpu_gbps: float
    bandwidth_sources: dict = field(default_factory=dict)
    t_cpu_s: float = 0.0            # per token, summed over MoE layers
    t_gpu_parallel_s: float = 0.0
    t_gpu_serial_s: float = 0.0
    t_token_s: float = 0.0
    dense_reason: str = "as asked"  # why dense_format (choose_dense's words under --dense auto)
    experts_mapped: bool = False    # routed experts mapped in place from the GGUF (they exceed the RAM budget)
    ram_shortfall: int = 0          # bytes the experts + reserve exceed the RAM budget by (mapped plans)
    disk_gbps: float = 0.0
    disk_read_share: float = 0.0    # share of the CPU's expert reads that come from disk (mapped plans)
    t_token_in_ram_s: float = 0.0   # the roofline were the experts in RAM (mapped plans: the slowdown's base)

    @property
    def vram_used(self) -> int:
        return sum(c.nbytes for c in self.components if c.where == "gpu")

    @property
    def ram_used(self) -> int:
        return sum(c.nbytes for c in self.components if c.where == "ram")

    @property
    def decode_tok_s(self) -> float:
        return 1.0 / self.t_token_s if self.t_token_s > 0 else float("inf")

    @property
    def copy_ms(self) -> float:
        return self.expert_bytes / (self.pcie_gbps * 1e9) * 1e3

    @property
    def cpu_expert_ms(self) -> float:
        return self.expert_bytes / (self.ram_gbps * 1e9) * 1e3

    def component(self, name: str) -> Component:
        for c in self.components:
            if c.name == name:
                return c
        raise KeyError(name)

    def render(self) -> str:
        width = max(len(c.name) for c in self.components)
        lines = [f"{'component':<{width}}  {'where':<5}  {'size':>11}  detail",
                 f"{'-' * width}  -----  -----------  ------"]
        for c in self.components:
            where = {"gpu": "VRAM", "ram": "RAM", "disk": "disk"}[c.where]
            lines.append(f"{c.name:<{width}}  {where:<5}  {format_size(c.nbytes):>11}  {c.detail}")
        lines.append("")
        lines.append(f"VRAM  {format_size(self.vram_used):>11} of {format_size(self.vram_budget)}"
                     f" ({self.n_gpus} GPU{'s' if self.n_gpus > 1 else ''})")
        lines.append(f"RAM   {format_size(self.ram_used):>11} of {format_size(self.ram_budget)}")
        lines.append(f"mode  {self.mode}")
        lines.append(f"dense {self.dense_format} ({self.dense_reason})")
        src = self.bandwidth_sources
        if self.experts_mapped:
            lines.append(f"RAM short  {format_size(self.ram_shortfall)} over the budget: routed experts "
                         f"{format_size(self.component('routed_experts').nbytes)} ({self.expert_format}, the file's "
                         f"layout) mapped in place from the GGUF and paged in from disk; "
                         f"{100 * self.disk_read_share:.0f}% of the CPU's expert reads from disk at "
                         f"{self.disk_gbps:.1f} GB/s ({src.get('disk', 'given')}) -> decode "
                         f"{self.t_token_s / self.t_token_in_ram_s:.1f}x slower than with the experts in RAM "
                         f"({1 / self.t_token_in_ram_s:.2f} tok/s)")
        lines.append(f"bandwidth  RAM {self.ram_gbps:.1f} GB/s ({src.get('ram', 'given')}), "
                     f"PCIe {self.pcie_gbps:.1f} GB/s ({src.get('pcie', 'given')}), "
                     f"GPU {self.gpu_gbps:.0f} GB/s ({src.get('gpu', 'given')})")
        if self.mode == "hybrid" and self.n_moe_layers:
            total = self.n_moe_layers * self.n_experts
            slot = self.component("expert_cache").nbytes // self.cache_slots if self.cache_slots else 0
            lines.append(f"expert cache  {self.cache_slots} slots of {format_size(slot)} (bf16; copied as "
                         f"{format_size(self.expert_bytes)} {self.expert_format}) "
                         f"= {100 * self.cache_slots / total:.2f}% of {total} experts; "
                         f"hit rate {100 * self.hit_rate:.1f}% ({self.hit_rate_source})")
            reuse = self.copy_ms / self.cpu_expert_ms if self.cpu_expert_ms else float("inf")
            lines.append(f"one expert: copy {self.copy_ms:.2f} ms over PCIe vs {self.cpu_expert_ms:.2f} ms on CPU "
                         f"-> a copy pays off after {reuse:.1f} reuses")
        if self.mode == "tp":
            lines.append(f"decode roofline  {self.decode_tok_s:.2f} tok/s ({1e3 * self.t_token_s:.2f} ms/token: "
                         f"bytes read / ({self.n_gpus} x GPU bandwidth), communication not modelled)")
        else:
            lines.append(f"decode roofline  {self.decode_tok_s:.2f} tok/s "
                         f"({1e3 * self.t_token_s:.1f} ms/token: GPU serial {1e3 * self.t_gpu_serial_s:.1f} ms + "
                         f"MoE max(CPU {1e3 * self.t_cpu_s:.1f} ms, GPU {1e3 * self.t_gpu_parallel_s:.1f} ms))")
        return "\n".join(lines)


def _check_formats(dense_format: str, expert_format: str, kv_format: str) -> None:
    for what, fmt in (("dense_format", dense_format), ("expert_format", expert_format)):
        if fmt not in FORMATS and not (what == "dense_format" and fmt == "auto"):
            raise ValueError(f"{what}: unknown format {fmt!r}; known: {', '.join(FORMATS)}")
    if kv_format not in ("f32", "bf16", "f16"):
        raise ValueError(f"kv_format: {kv_format!r} must be f32, bf16 or f16")


def _gpu_components(cfg: ModelConfig, ctx: int, dense: str, kv_format: str) -> list[Component]:
    n_moe = len(cfg.moe_layers)
    n_dense = cfg.num_hidden_layers - n_moe
    L = cfg.num_hidden_layers
    flt = _float_part(dense)
    comps = [
        Component("embed_tokens", "gpu", embed_bytes(cfg, flt), f"{cfg.vocab_size}x{cfg.hidden_size} {flt}"),
        Component("attention", "gpu", L * attention_layer_bytes(cfg, dense),
                  f"{L} layers, {dense}" + (f" (kv_b {flt})" if flt != dense else "") + ", norms fp32"),
        Component("dense_ffn", "gpu", n_dense * dense_ffn_bytes(cfg, dense) if n_dense else 0,
                  f"{n_dense} layers x 3x{cfg.hidden_size}x{cfg.intermediate_size} {dense}"),
        Component("routers", "gpu", n_moe * router_bytes(cfg),
                  f"{n_moe} x {cfg.n_routed_experts}x{cfg.hidden_size} fp32 + bias"),
        Component("shared_experts", "gpu", n_moe * shared_expert_bytes(cfg, dense),
                  f"{n_moe} x {cfg.n_shared_experts} shared, {dense}"),
        Component("final_norm", "gpu", cfg.hidden_size * NORM_BYTES, "fp32"),
        Component("lm_head", "gpu", lm_head_bytes(cfg, flt),
                  "tied to embed_tokens" if cfg.tie_word_embeddings else f"{cfg.vocab_size}x{cfg.hidden_size} {flt}"),
        Component("kv_cache", "gpu", kv_cache_bytes(cfg, ctx, kv_format),
                  f"{ctx} tokens x {L} layers x ({cfg.kv_lora_rank}+{cfg.qk_rope_head_dim}) {kv_format}"),
        Component("workspace", "gpu", workspace_bytes(cfg, ctx, int(bytes_per_weight(kv_format))),
                  f"1 GiB + prefill chunk {PREFILL_CHUNK} activations"),
    ]
    return comps


def _max_ctx_fitting(cfg, vram, dense, kv_format) -> int:
    """Largest context whose weights + KV + workspace fit `vram` (0 when nothing fits)."""
    def need(c):
        return sum(x.nbytes for x in _gpu_components(cfg, c, dense, kv_format))
    if need(1) > vram:
        return 0
    lo, hi = 1, 1
    while need(hi) <= vram and hi < (1 << 24):
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if need(mid) <= vram else (lo, mid)
    return lo


def _vram_error(cfg, ctx, dense, kv_format, vram, n_gpus, *, can_fp8: bool = True, tried: str = "") -> PlacementError:
    comps = _gpu_components(cfg, ctx, dense, kv_format)
    need = sum(c.nbytes for c in comps)
    weights = sum(c.nbytes for c in comps if c.name not in ("kv_cache", "workspace"))
    kv = next(c.nbytes for c in comps if c.name == "kv_cache")
    ws = next(c.nbytes for c in comps if c.name == "workspace")
    fixes = []
    max_ctx = _max_ctx_fitting(cfg, vram, dense, kv_format)
    if max_ctx >= 1:
        fixes.append(f"lower --ctx to {max_ctx}")
    for smaller in ("fp8",) if dense in ("f32", "bf16", "f16") and can_fp8 and not tried else ():
        if sum(c.nbytes for c in _gpu_components(cfg, ctx, smaller, kv_format)) <= vram:
            fixes.append(f"use --dense {smaller}")
    fixes.append(f"add {format_size(need - vram)} of VRAM")
    return PlacementError(
        tried + f"needs {format_size(need)} of VRAM for the non-expert weights ({format_size(weights)} {dense}), "
        f"a {ctx}-token KV cache ({format_size(kv)}) and workspace ({format_size(ws)}); budget is "
        f"{format_size(vram)} over {n_gpus} GPU{'s' if n_gpus > 1 else ''}, {format_size(need - vram)} over: "
        + ", or ".join(fixes))


def _resolve_vram(vram_budget, n_gpus, gpu_vram_each) -> tuple[int, int]:
    if not isinstance(n_gpus, int) or isinstance(n_gpus, bool) or n_gpus < 1:
        raise ValueError(f"n_gpus: must be a positive integer, got {n_gpus!r}")
    each = parse_size(gpu_vram_each, "gpu_vram_each") if gpu_vram_each is not None else None
    if vram_budget is None:
        if each is not None:
            return each * n_gpus, n_gpus
        found = cuda_vram_bytes()
        if found is None:
            raise ValueError("vram_budget: no CUDA device found, pass the VRAM budget (--vram 24GiB)")
        n_found, size = found
        return size * n_found, n_found
    total = parse_size(vram_budget, "vram_budget")
    if each is not None and total > each * n_gpus:
        raise ValueError(f"vram_budget {format_size(total)} exceeds n_gpus x gpu_vram_each = "
                         f"{n_gpus} x {format_size(each)}")
    return total, n_gpus


def choose_dense(cfg: ModelConfig, *, vram: int, ctx: int, stored: str | None = None, compute: str = "bf16",
                 kv_format: str = "bf16") -> tuple[str, str, bool]:
    """(format, why, fits) for the accelerator's dense weights under `vram` bytes (KV cache for ctx and the
    workspace included). `stored` is what the checkpoint holds (stored_dense): 'fp8' keeps it (bf16 would only
    upcast it), 'gguf' the compute dtype (a GGUF has no FP8), None (float or unknown) the compute dtype when it
    fits, else fp8. When none fits: the smallest, fits=False, and why says what each needs."""
    cands = ["fp8"] if stored == "fp8" else [compute] if stored == "gguf" or compute == "fp8" else [compute, "fp8"]
    need = {f: sum(c.nbytes for c in _gpu_components(cfg, ctx, f, kv_format)) for f in cands}
    budget = format_size(vram)
    for f in cands:
        if need[f] <= vram:
            fit = f"{format_size(need[f])} of {budget} VRAM with a {ctx}-token KV cache"
            if stored == "fp8":
                return f, f"the checkpoint's own precision: its matrices are FP8, {compute} would only upcast them; {fit}", True
            if f == cands[0]:
                gguf = ", a GGUF holds no FP8" if stored == "gguf" else ""
                return f, f"the largest precision that fits: {fit}{gguf}", True
            first = cands[0]
            return f, (f"{first} needs {format_size(need[first])}, {format_size(need[first] - vram)} over the {budget} "
                       f"VRAM budget; fp8 fits: {fit}"), True
    tried = ", ".join(f"{f} needs {format_size(need[f])}" for f in cands)
    return cands[-1], f"none fits the {budget} VRAM budget: {tried}", False


def stored_dense(model: str) -> str | None:
    """What a model argument's dense matrices are stored as: 'fp8' (a preset released in FP8, or an HF
    checkpoint whose config.json says quant_method fp8), 'gguf' (a .gguf file), else None (float or unknown)."""
    if model in PRESET_STORED:
        return PRESET_STORED[model]
    if model == "demo":
        return "fp8"   # the demo checkpoints are written in Kimi-K2-Instruct's FP8 layout
    if model.endswith(".gguf"):
        return "gguf"
    import json
    path = model if model.endswith(".json") else os.path.join(model, "config.json")
    try:
        with open(path) as f:
            qc = quantization_config(json.load(f)) or {}
    except (OSError, ValueError, AttributeError):
        return None
    return "fp8" if isinstance(qc, dict) and qc.get("quant_method") == "fp8" else None


def plan(cfg: ModelConfig, *, vram_budget=None, ram_budget=None, ctx: int, dense_format: str = "auto",
         expert_format: str = "q4_0", kv_format: str = "bf16", n_gpus: int = 1, gpu_vram_each=None,
         ram_gbps: float | None = None, pcie_gbps: float | None = None, gpu_gbps: float | None = None,
         hit_rate: float | None = None, mode: str = "auto", stored: str | None = None,
         disk_gbps: float | None = None) -> Plan:
    """Place the model; see the module docstring for the byte accounting and the roofline.

    dense_format 'auto' asks choose_dense, with `stored` the checkpoint's own (stored_dense; None: float or
    unknown). vram_budget is the total over all GPUs (or pass gpu_vram_each); None reads torch.cuda.
    ram_budget None reads /proc/meminfo MemTotal. ram_gbps None runs `measure_ram_gbps()`. disk_gbps (None:
    DISK_GBPS_ASSUMED) is the read bandwidth experts mapped in place from a GGUF (stored 'gguf') are paged in at
    when they exceed ram_budget. hit_rate None assumes uniform routing: cache_slots / (n_moe_layers * n_experts).
    """
    _check_formats(dense_format, expert_format, kv_format)
    if mode not in ("auto", "hybrid", "tp"):
        raise ValueError(f"mode: must be 'auto', 'hybrid' or 'tp', got {mode!r}")
    if not isinstance(ctx, int) or isinstance(ctx, bool) or ctx < 1:
        raise ValueError(f"ctx: must be a positive number of tokens, got {ctx!r}")
    if hit_rate is not None and not 0.0 <= hit_rate <= 1.0:
        raise ValueError(f"hit_rate: must be in [0, 1], got {hit_rate!r}")
    if stored not in (None, "fp8", "gguf"):
        raise ValueError(f"stored: expected None, 'fp8' or 'gguf', got {stored!r}")
    if dense_format == "fp8" and stored == "gguf":
        raise ValueError("dense_format fp8: a GGUF stores no FP8 matrices (its blocks are dequantized to bf16 on "
                         "an accelerator); use --dense bf16")
    vram, n_gpus = _resolve_vram(vram_budget, n_gpus, gpu_vram_each)
    ram = parse_size(ram_budget, "ram_budget") if ram_budget is not None else total_ram_bytes()
    tried, dense_reason = "", "as asked"
    if dense_format == "auto":
        dense_format, dense_reason, fits = choose_dense(cfg, vram=vram, ctx=ctx, stored=stored, kv_format=kv_format)
        if not fits and stored is None:   # both were tried: say so before the smaller one's shortfall
            tried = f"no dense format fits ({dense_reason}); with {dense_format} it "
    sources = {}
    for name, v in (("ram_gbps", ram_gbps), ("pcie_gbps", pcie_gbps), ("gpu_gbps", gpu_gbps),
                    ("disk_gbps", disk_gbps)):
        if v is not None and not (isinstance(v, (int, float)) and v > 0):
            raise ValueError(f"{name}: must be a positive number of GB/s, got {v!r}")
    if ram_gbps is None:
        ram_gbps, sources["ram"] = measure_ram_gbps(), "measured"
    if pcie_gbps is None:
        pcie_gbps, sources["pcie"] = PCIE_GBPS_ASSUMED, "assumed"
    if gpu_gbps is None:
        gpu_gbps, sources["gpu"] = GPU_GBPS_ASSUMED, "assumed"
    if disk_gbps is None:
        disk_gbps, sources["disk"] = DISK_GBPS_ASSUMED, "assumed"

    n_moe, E, K = len(cfg.moe_layers), cfg.n_routed_experts, cfg.num_experts_per_tok
    one_expert = expert_bytes(cfg, expert_format) if n_moe else 0
    all_experts = n_moe * E * one_expert
    gpu = _gpu_components(cfg, ctx, dense_format, kv_format)
    gpu_need = sum(c.nbytes for c in gpu)
    fits_all = gpu_need + all_experts <= vram
    if mode == "auto":
        mode = "tp" if (n_gpus >= 16 or fits_all) else "hybrid"

    kw = dict(vram_budget=vram, ram_budget=ram, ctx=ctx, n_gpus=n_gpus, dense_format=dense_format, dense_reason=dense_reason,
              expert_format=expert_format, kv_format=kv_format, expert_bytes=one_expert, n_moe_layers=n_moe,
              n_experts=E, top_k=K, ram_gbps=float(ram_gbps), pcie_gbps=float(pcie_gbps),
              gpu_gbps=float(gpu_gbps), disk_gbps=float(disk_gbps), bandwidth_sources=sources)
    weight_read = _gpu_bytes_read_per_token(cfg, gpu, dense_format)
    if mode == "tp":
        if not fits_all:
            need = gpu_need + all_experts
            raise PlacementError(
                f"tp mode needs {format_size(need)} of VRAM for all weights ({format_size(all_experts)} of them "
                f"routed experts at {expert_format}), a {ctx}-token KV cache and workspace; budget is "
                f"{format_size(vram)} over {n_gpus} GPUs, {format_size(need - vram)} over: add GPUs, "
                f"use a smaller --experts format, or use --mode hybrid")
        comps = gpu + [Component("routed_experts", "gpu", all_experts,
                                 f"{n_moe} layers x {E} x {format_size(one_expert)} {expert_format}, "
                                 f"sharded over {n_gpus} GPUs")]
        active = n_moe * K * one_expert
        t = (weight_read["serial"] + weight_read["shared"] + active) / (n_gpus * gpu_gbps * 1e9)
        return Plan(mode="tp", components=comps, cache_slots=0, hit_rate=1.0, hit_rate_source="all in VRAM",
                    t_cpu_s=0.0, t_gpu_parallel_s=0.0, t_gpu_serial_s=t, t_token_s=t, **kw)

    errors = []   # a plan that fits neither budget says both shortfalls
    if gpu_need > vram:
        errors.append(str(_vram_error(cfg, ctx, dense_format, kv_format, vram, n_gpus, can_fp8=stored != "gguf",
                                      tried=tried)))
    ram_need = all_experts + RAM_RESERVE
    in_place = ""   # how a GGUF's experts are held when their repacked layout does not fit
    if ram_need > ram and stored == "gguf" and n_moe:
        # the file's layout, mapped in place (repacked layouts only when they fit): in RAM when that fits, else
        # paged from disk
        one_expert = swiglu_bytes(cfg.hidden_size, cfg.moe_intermediate_size, expert_format, "mlp.experts.N")
        all_experts = n_moe * E * one_expert
        kw["expert_bytes"] = one_expert
        ram_need = all_experts + RAM_RESERVE
        in_place = "short" if ram_need > ram else "fits"
    if ram_need > ram and not in_place:
        fits = [f for f in ("q8_0", "q6_k", "q4_k", "q4_0")
                if f != expert_format and _expert_format_ok(cfg, f)
                and routed_expert_bytes(cfg, f) + RAM_RESERVE <= ram
                and routed_expert_bytes(cfg, f) < all_experts]
        fixes = [f"use --experts {f} ({format_size(routed_expert_bytes(cfg, f))})" for f in fits[:1]]
        fixes.append(f"add {format_size(ram_need - ram)} of RAM")
        fixes.append("use a GGUF of these experts, which is mapped in place and paged from disk (plan it with "
                     "--gguf)")
        errors.append(
            f"needs {format_size(ram_need)} of RAM for the routed experts ({n_moe} layers x {E} experts x "
            f"{one_expert / MiB:.1f} MiB {expert_format} = {format_size(all_experts)}) plus a "
            f"{format_size(RAM_RESERVE)} reserve; budget is {format_size(ram)}, {format_size(ram_need - ram)} over: "
            + ", or ".join(fixes))
    if errors:
        raise PlacementError("; and it ".join(errors))

    # hybrid slots hold experts dequantized to the compute dtype (bf16); copies move the quantized bytes
    slot = expert_bytes(cfg, "bf16") if n_moe else 0
    slots = min((vram - gpu_need) // slot, n_moe * E) if slot else 0
    if hit_rate is None:
        h, src = (slots / (n_moe * E) if n_moe else 0.0), "uniform routing"
    else:
        h, src = float(hit_rate), "given"
    layout = f"{n_moe} layers x {E} x {format_size(one_expert)} {expert_format}"
    if in_place == "short":
        cached = max(ram - RAM_RESERVE, 0)
        comps = gpu + [
            Component("expert_cache", "gpu", slots * slot,
                      f"{slots} slots x {format_size(slot)} bf16 (copied as {expert_format})"),
            Component("routed_experts", "disk", all_experts, f"{layout}, mapped in place from the GGUF"),
            Component("expert_page_cache", "ram", min(cached, all_experts),
                      "the experts' pages the OS keeps in RAM (the budget less the reserve)"),
            Component("ram_reserve", "ram", RAM_RESERVE, "Python, torch, threads, page-cache slack"),
        ]
    else:
        kept = ", the file's layout in place (repacked would not fit)" if in_place else ""
        comps = gpu + [
            Component("expert_cache", "gpu", slots * slot,
                      f"{slots} slots x {format_size(slot)} bf16 (copied as {expert_format})"),
            Component("routed_experts", "ram", all_experts, layout + kept),
            Component("ram_reserve", "ram", RAM_RESERVE, "Python, torch, threads, page-cache slack"),
        ]
    per_layer_reads = K * one_expert
    t_par = (weight_read["shared"] + n_moe * h * K * slot) / (gpu_gbps * 1e9)
    t_serial = weight_read["serial"] / (gpu_gbps * 1e9)
    t_cpu_ram = n_moe * (1 - h) * per_layer_reads / (ram_gbps * 1e9)
    # identical MoE layers: sum of per-layer maxes = max of the sums
    t_ram = t_serial + max(t_cpu_ram, t_par)
    if in_place != "short":
        return Plan(mode="hybrid", components=comps, cache_slots=int(slots), hit_rate=h, hit_rate_source=src,
                    t_cpu_s=t_cpu_ram, t_gpu_parallel_s=t_par, t_gpu_serial_s=t_serial, t_token_s=t_ram, **kw)
    # The CPU reads the experts the VRAM cache does not hold; the page cache keeps a share f of those
    working = (1 - h) * all_experts
    f = min(1.0, cached / working) if working else 1.0
    t_cpu = n_moe * (1 - h) * per_layer_reads * (f / (ram_gbps * 1e9) + (1 - f) / (disk_gbps * 1e9))
    return Plan(mode="hybrid", components=comps, cache_slots=int(slots), hit_rate=h, hit_rate_source=src,
                t_cpu_s=t_cpu, t_gpu_parallel_s=t_par, t_gpu_serial_s=t_serial, t_token_s=t_serial + max(t_cpu, t_par),
                experts_mapped=True, ram_shortfall=ram_need - ram, disk_read_share=1 - f, t_token_in_ram_s=t_ram,
                **kw)


def _expert_format_ok(cfg: ModelConfig, fmt: str) -> bool:
    try:
        expert_bytes(cfg, fmt)
    except PlacementError:
        return False
    return True


def _gpu_bytes_read_per_token(cfg: ModelConfig, gpu: list[Component], dense: str) -> dict[str, int]:
    """Accelerator bytes read per decode token: everything resident except the embedding table (one row is
    read) and the workspace; the KV cache is read in full (context assumed full)."""
    by = {c.name: c.nbytes for c in gpu}
    row = tensor_bytes(1, cfg.hidden_size, _float_part(dense), "embed row")
    shared = by["shared_experts"]
    serial = sum(by.values()) - by["embed_tokens"] - by["workspace"] - shared + row
    if cfg.tie_word_embeddings:
        serial += by["embed_tokens"]   # the tied table is read in full as lm_head
    return {"serial": serial, "shared": shared}


# ---- CLI -------------------------------------------------------------------------------------------
def load_config(model: str) -> ModelConfig:
    """A preset name, an HF checkpoint dir / config.json, or a .gguf file."""
    from .config import PRESETS, preset

    if model in PRESETS:
        return preset(model)
    if model == "demo":
        from .demo import demo_config
        return ModelConfig.from_dict(demo_config(), source="<demo>")   # the checkpoint load("demo") runs
    if model.endswith(".gguf"):
        if not os.path.isfile(model):
            raise FileNotFoundError(f"{model}: no such GGUF file")
        from .checkpoint import open_checkpoint
        ck = open_checkpoint(model)
        try:
            return ModelConfig.from_dict(ck.config_dict(), source=model)
        finally:
            ck.close()
    if os.path.isdir(model) or model.endswith(".json"):
        return ModelConfig.from_json(model)
    raise FileNotFoundError(f"{model}: not a preset (kimi-k2, demo), an HF checkpoint dir or a .gguf file")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hybrid-k2 plan", description="Show where each part of the model goes "
                                "for the given VRAM/RAM budgets, the expert-cache size and a decode roofline.")
    p.add_argument("model", help="preset (kimi-k2, demo), HF checkpoint dir, or .gguf file")
    p.add_argument("--vram", default=None, help="VRAM budget per GPU, e.g. 24GiB (default: what torch.cuda reports)")
    p.add_argument("--ram", default=None, help="RAM budget, e.g. 768GiB (default: MemTotal)")
    p.add_argument("--ctx", type=int, default=DEFAULT_CTX, help="context length the KV cache is sized for")
    p.add_argument("--gpus", type=int, default=1, help="number of GPUs, each with --vram")
    p.add_argument("--ram-gbps", type=float, default=None, help="RAM read bandwidth (default: measured)")
    p.add_argument("--pcie-gbps", type=float, default=None, help=f"host->GPU bandwidth (default {PCIE_GBPS_ASSUMED})")
    p.add_argument("--gpu-gbps", type=float, default=None, help=f"GPU memory bandwidth (default {GPU_GBPS_ASSUMED})")
    p.add_argument("--disk-gbps", type=float, default=None,
                   help=f"read bandwidth of the disk a GGUF's experts are paged in from when they exceed --ram "
                        f"(default {DISK_GBPS_ASSUMED}, an NVMe SSD)")
    p.add_argument("--gguf", action="store_true",
                   help="the experts come from a GGUF file (implied for a .gguf MODEL): mapped in place and paged "
                        "from disk when they exceed --ram, instead of refused")
    p.add_argument("--experts", default="q4_0", choices=list(FORMATS), help="routed-expert format")
    p.add_argument("--dense", default="auto", choices=["auto", *FORMATS],
                   help="format of the accelerator weights (default auto: an FP8 checkpoint's own precision, else "
                        "the largest of bf16 / fp8 that fits --vram; the plan says which and why)")
    p.add_argument("--kv", default="bf16", choices=["f32", "bf16", "f16"], help="KV cache dtype")
    p.add_argument("--hit-rate", type=float, default=None, help="expert-cache hit rate (default: uniform routing)")
    p.add_argument("--mode", default="auto", choices=["auto", "hybrid", "tp"])
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args.model)
        p = plan(cfg, gpu_vram_each=args.vram, ram_budget=args.ram, ctx=args.ctx, n_gpus=args.gpus,
                 dense_format=args.dense, expert_format=args.experts, kv_format=args.kv, ram_gbps=args.ram_gbps,
                 pcie_gbps=args.pcie_gbps, gpu_gbps=args.gpu_gbps, hit_rate=args.hit_rate, mode=args.mode,
                 stored="gguf" if args.gguf else stored_dense(args.model), disk_gbps=args.disk_gbps)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args.model}: {cfg.num_hidden_layers} layers, {len(cfg.moe_layers)} MoE x {cfg.n_routed_experts} "
          f"experts (top-{cfg.num_experts_per_tok}), ctx {args.ctx}")
    print(p.render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
