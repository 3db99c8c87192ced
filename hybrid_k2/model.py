"""The DeepSeek-V3 / Kimi K2 forward pass for one sequence, on any torch device.

Parameter names mirror the HF checkpoint names so loading is a walk over `named_parameters()`.
Routed experts are not parameters here: the MoE block hands them to an `ExpertBackend`.
Shapes: x is [T, hidden] for the T new tokens; `start_pos` is the position of the first one.
"""
from __future__ import annotations

import math
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .config import ModelConfig, yarn_mscale
from .decode_step import CPUDecodeStep
from .experts import ExpertBackend
from .qlinear import QuantLinear


def block_weights(*mods) -> tuple | None:
    """The GGML blocks of these modules when every one is a loaded QuantLinear without bias (what the C
    decode calls read), else None."""
    if not all(isinstance(m, QuantLinear) and m.blocks is not None and m.bias is None for m in mods):
        return None
    return tuple(m.blocks for m in mods)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x * rsqrt(mean(x^2) + eps) in fp32, then the weight in x's dtype (as HF); one fused op in fp32
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            if (x.shape[0] == 1 and not torch.is_grad_enabled()
                    and kernels.plain_cpu_tensors(x, self.weight, (torch.float32, torch.float32))):
                return kernels.rms_norm(x, self.weight, self.eps)   # decode: one C call, not ~8 ops
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        return self.weight * F.rms_norm(x.float(), self.weight.shape, eps=self.eps).to(x.dtype)


def rope_tables(cfg: ModelConfig, max_len: int, device=None) -> torch.Tensor:
    """complex64 [max_len, rope_dim/2]: (cos + i sin) * attention factor, with YaRN frequency blending."""
    dim, base, rs = cfg.qk_rope_head_dim, cfg.rope_theta, cfg.rope_scaling
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    attn_factor = 1.0
    if rs.type == "yarn":
        def corr_dim(rot):
            return dim * math.log(rs.original_max_position_embeddings / (rot * 2 * math.pi)) / (2 * math.log(base))
        low, high = corr_dim(rs.beta_fast), corr_dim(rs.beta_slow)
        if rs.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001
        ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
        extrapolate = 1 - ramp
        inv_freq = inv_freq / rs.factor * (1 - extrapolate) + inv_freq * extrapolate
        if rs.attention_factor is not None:
            attn_factor = rs.attention_factor
        elif rs.mscale and rs.mscale_all_dim:
            attn_factor = yarn_mscale(rs.factor, rs.mscale) / yarn_mscale(rs.factor, rs.mscale_all_dim)
        else:
            attn_factor = yarn_mscale(rs.factor)
    t = torch.arange(max_len, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)
    return torch.complex(freqs.cos() * attn_factor, freqs.sin() * attn_factor).to(device)


def apply_rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) as the checkpoint stores them: one complex multiply.
    x: [T, ..., d]; rope: complex [T, d/2]."""
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    rope = rope.view(rope.shape[0], *([1] * (xc.dim() - 2)), rope.shape[-1])
    return torch.view_as_real(xc * rope).flatten(-2).to(x.dtype)


class KVCache:
    """Latent MLA cache: per layer, kv_lora_rank normalised latents plus rope dims of the shared key."""

    def __init__(self, cfg: ModelConfig, max_len: int, device, dtype):
        L = cfg.num_hidden_layers
        self.max_len = max_len
        self.kv = torch.zeros(L, max_len, cfg.kv_lora_rank, device=device, dtype=dtype)
        self.pe = torch.zeros(L, max_len, cfg.qk_rope_head_dim, device=device, dtype=dtype)

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size() + self.pe.numel() * self.pe.element_size()


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_heads = cfg.num_attention_heads
        self.nope, self.rope, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.kv_rank = cfg.kv_lora_rank
        self.scale = cfg.softmax_scale
        q_out = self.n_heads * cfg.qk_head_dim
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(cfg.hidden_size, q_out, bias=False)
        else:
            self.q_a_proj = nn.Linear(cfg.hidden_size, cfg.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, q_out, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(cfg.hidden_size, cfg.kv_lora_rank + self.rope, bias=False)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, cfg.rms_norm_eps)
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, self.n_heads * (self.nope + self.v_dim), bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.v_dim, cfg.hidden_size, bias=False)
        # kv_b as GGML blocks for the CPU decode step, set by the loader with a dense_format: ((k_b blocks,
        # qtype), (v_b blocks, qtype)) in a GGUF's attn_k_b / attn_v_b layout (kernels.mla_decoder)
        self.kv_b_blocks: tuple | None = None
        self._decoder: kernels.MLADecoder | None = None
        self._block: kernels.AttnDecoder | None = None

    def cpu_decoder(self, x: torch.Tensor, cache: KVCache) -> kernels.MLADecoder | None:
        """The C decode step (kernels.mla_decoder) when this layer attends in float32 on the CPU without
        autograd, else None. Bound on first use, and again if the weights move to new memory."""
        blocks, nw = self.kv_b_blocks, self.kv_a_layernorm.weight
        w = None if blocks is not None else getattr(self.kv_b_proj, "weight", None)
        if (torch.is_grad_enabled() or x.device.type != "cpu" or x.dtype != torch.float32 or cache.kv.dtype != torch.float32
                or not kernels.plain_cpu_tensors(nw, (torch.float32,))
                or (blocks is None and not (isinstance(self.kv_b_proj, nn.Linear)
                                            and kernels.plain_cpu_tensors(w, (torch.float32,))))):
            return None
        if self._decoder is None or not self._decoder.binds(w, nw, blocks):
            self._decoder = kernels.mla_decoder(w, nw, n_heads=self.n_heads, nope=self.nope, rope=self.rope,
                                                v_dim=self.v_dim, scale=self.scale, eps=self.kv_a_layernorm.eps,
                                                kv_b_blocks=blocks)
        return self._decoder

    def cpu_block(self, norm: "RMSNorm", x: torch.Tensor, cache: KVCache) -> kernels.AttnDecoder | None:
        """The whole attention of a decode step, input norm to residual, as one C call (kernels.attn_decoder)
        when cpu_decoder applies and every projection is GGML blocks (QuantLinear, dense_format=); else None."""
        dec = self.cpu_decoder(x, cache)
        lora = hasattr(self, "q_a_proj")
        projs = ((self.q_a_proj, self.q_b_proj) if lora else (self.q_proj,)) + (self.kv_a_proj_with_mqa, self.o_proj)
        blocks = block_weights(*projs)
        q_a_norm = self.q_a_layernorm.weight if lora else None
        if (dec is None or blocks is None or not kernels.plain_cpu_tensors(norm.weight, (torch.float32,))
                or (lora and not kernels.plain_cpu_tensors(q_a_norm, (torch.float32,)))):
            return None
        if not lora:                     # q_a absent: q_proj takes q_b's place
            projs, blocks = (None,) + projs, (None,) + blocks
        if self._block is None or self._block.mla is not dec or not self._block.binds(norm.weight, q_a_norm, *blocks):
            mats = [None if p is None else (p.blocks, p.qtype) for p in projs]
            self._block = kernels.attn_decoder(dec, norm.weight, norm.eps, q_a_norm,
                                               self.q_a_layernorm.eps if lora else 0.0, *mats)
        return self._block

    def forward(self, x: torch.Tensor, start_pos: int, rope: torch.Tensor, cache: KVCache, absorb: bool) -> torch.Tensor:
        T = x.shape[0]
        end = start_pos + T
        if hasattr(self, "q_proj"):
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        decoder = self.cpu_decoder(x, cache) if absorb and T == 1 else None
        if decoder is not None:   # one C call does the rest, in place of ~30 small torch ops
            o = decoder(q, self.kv_a_proj_with_mqa(x), torch.view_as_real(rope), cache.kv[self.layer],
                        cache.pe[self.layer], start_pos)
            return self.o_proj(o.view(1, -1))
        q = q.view(T, self.n_heads, self.nope + self.rope)
        q_nope, q_pe = q.split([self.nope, self.rope], dim=-1)
        q_pe = apply_rope(q_pe, rope)
        kv, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_rank, self.rope], dim=-1)
        cache.kv[self.layer, start_pos:end] = self.kv_a_layernorm(kv)
        cache.pe[self.layer, start_pos:end] = apply_rope(k_pe, rope)
        kv_all, pe_all = cache.kv[self.layer, :end], cache.pe[self.layer, :end]

        wkv_b = self.kv_b_proj.weight.view(self.n_heads, self.nope + self.v_dim, self.kv_rank)
        H = self.n_heads
        if absorb:  # decode: attend in the latent space, never materialising per-head K/V (matmuls, not
            # einsum: decode runs these per layer per token and einsum's parsing costs more than the math)
            q_lat = torch.matmul(q_nope.transpose(0, 1), wkv_b[:, :self.nope]).transpose(0, 1)   # [T, H, kv_rank]
            scores = (q_lat.reshape(T * H, -1) @ kv_all.T + q_pe.reshape(T * H, -1) @ pe_all.T).view(T, H, end)
        else:       # prefill: expand the latents to per-head keys/values once
            kv_full = self.kv_b_proj(kv_all).view(end, self.n_heads, self.nope + self.v_dim)
            k_nope, v = kv_full.split([self.nope, self.v_dim], dim=-1)
            scores = torch.einsum("thd,shd->ths", q_nope, k_nope) + torch.einsum("thr,sr->ths", q_pe, pe_all)
        scores = scores.float() * self.scale
        if T > 1:
            pos_q = torch.arange(start_pos, end, device=x.device)
            pos_k = torch.arange(end, device=x.device)
            scores = scores.masked_fill((pos_k[None, :] > pos_q[:, None])[:, None, :], float("-inf"))
        p = scores.softmax(dim=-1).to(x.dtype)
        if absorb:
            o = (p.reshape(T * H, end) @ kv_all).view(T, H, -1)
            o = torch.matmul(o.transpose(0, 1), wkv_b[:, self.nope:].transpose(1, 2)).transpose(0, 1)
        else:
            o = torch.einsum("ths,shd->thd", p, v)
        return self.o_proj(o.reshape(T, self.n_heads * self.v_dim))


class MLP(nn.Module):
    """SwiGLU feed-forward: the dense layers and the shared experts."""

    def __init__(self, dim: int, inter: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, inter, bias=False)
        self.up_proj = nn.Linear(dim, inter, bias=False)
        self.down_proj = nn.Linear(inter, dim, bias=False)
        self._expert: tuple | None = None   # (blocks it reads, ExpertWeights, ids, weights): cpu_expert

    def cpu_expert(self, x: torch.Tensor):
        """At decode, when the three matrices are GGML blocks (QuantLinear, dense_format=) and x is one float32
        CPU row: the routed experts' kernel as a single expert, so the whole SwiGLU is one C call instead of three
        calls and the ops between them. h = silu(g)·u goes into down at 8 bits, as the three QuantLinear calls (and
        llama.cpp) quantize every dense input: dense_format's numerics, ~8% faster than the routed experts' ~15 bits."""
        mats = (self.gate_proj, self.up_proj, self.down_proj)
        blocks = block_weights(*mats)
        if x.shape[0] != 1 or x.dtype != torch.float32 or torch.is_grad_enabled() or blocks is None:
            return None
        if self._expert is None or any(a is not b for a, b in zip(self._expert[0], blocks)):
            ew = kernels.ExpertWeights(*([b] for b in blocks), *(m.qtype for m in mats))
            self._expert = (blocks, ew, torch.zeros(1, 1, dtype=torch.int32), torch.ones(1, 1))
        return self._expert[1:]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        expert = self.cpu_expert(x)
        if expert is not None:
            return kernels.moe_forward(expert[0], x, expert[1], expert[2], h_residual=False)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    """Sigmoid (or softmax) scores; the correction bias steers selection only; group-limited top-k."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.top_k, self.n_group, self.topk_group = cfg.num_experts_per_tok, cfg.n_group, cfg.topk_group
        self.scoring, self.norm, self.scaling = cfg.scoring_func, cfg.norm_topk_prob, cfg.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        self.has_bias = cfg.topk_method == "noaux_tc"
        if self.has_bias:
            self.e_score_correction_bias = nn.Parameter(torch.zeros(cfg.n_routed_experts))
        self._c: kernels.BoundRouter | None = None

    def cpu_router(self, x: torch.Tensor) -> kernels.BoundRouter | None:
        """The router in one C call when x and the weights are float32 on the CPU without autograd, else None."""
        bias = self.e_score_correction_bias if self.has_bias else None
        if (torch.is_grad_enabled() or not kernels.plain_cpu_tensors(x, self.weight, (torch.float32, torch.float32))
                or (bias is not None and not kernels.plain_cpu_tensors(bias, (torch.float32,)))):
            return None
        if self._c is None or not self._c.binds(self.weight, bias):
            self._c = kernels.router(self.weight, bias, top_k=self.top_k, n_group=self.n_group,
                                     topk_group=self.topk_group, softmax=self.scoring != "sigmoid",
                                     norm_topk=self.norm, scaling=self.scaling)
        return self._c

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.cpu_router(x)
        if c is not None:
            return c(x)
        logits = F.linear(x.float(), self.weight.float())
        scores = logits.sigmoid() if self.scoring == "sigmoid" else logits.softmax(dim=-1)
        choice = scores + self.e_score_correction_bias.float() if self.has_bias else scores
        if self.n_group > 1:
            T = x.shape[0]
            grouped = choice.view(T, self.n_group, -1)
            group_scores = (grouped.topk(2, dim=-1)[0].sum(-1) if self.has_bias else grouped.amax(-1))
            keep = torch.zeros_like(group_scores, dtype=torch.bool)
            keep.scatter_(1, group_scores.topk(self.topk_group, dim=-1)[1], True)
            choice = grouped.masked_fill(~keep[..., None], float("-inf")).view(T, -1)
        ids = choice.topk(self.top_k, dim=-1)[1]
        weights = scores.gather(1, ids)
        if self.norm and self.top_k > 1:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return ids, weights * self.scaling


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, experts: ExpertBackend | None):
        super().__init__()
        self.layer = layer
        self.gate = Router(cfg)
        self.shared_experts = (MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts)
                               if cfg.n_shared_experts else None)
        self.experts = experts
        self.recorder = None     # a RoutingRecorder when traces are asked for
        self.defer = 0           # expert deferral (Transformer.set_deferral)
        self.deferred = None     # waits for this layer's deferred experts; Transformer.forward collects it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids, weights = self.gate(x)
        if self.recorder is not None:
            self.recorder.record(self.layer, ids, weights, x)
        if self.defer and x.shape[0] == 1:   # decode: the lowest-weighted experts finish one layer late
            weights, order = weights.sort(dim=-1, descending=True)
            ids, k = ids.gather(-1, order), ids.shape[-1] - self.defer
            self.deferred = self.experts.submit(self.layer, x, ids[:, k:], weights[:, k:])
            ids, weights = ids[:, :k], weights[:, :k]
        return self.experts.run(self.layer, x, ids, weights, self.shared_experts)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, experts: ExpertBackend | None):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLA(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoE(cfg, layer, experts) if cfg.is_moe_layer(layer) else MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x, start_pos, rope, cache, absorb):
        block = self.self_attn.cpu_block(self.input_layernorm, x, cache) if absorb and x.shape[0] == 1 else None
        if block is not None:   # CPU decode: norm, projections, MLA and the residual add in one C call
            layer = self.self_attn.layer
            x = block(x, torch.view_as_real(rope), cache.kv[layer], cache.pe[layer], start_pos)
        else:
            x = x + self.self_attn(self.input_layernorm(x), start_pos, rope, cache, absorb)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig, experts: ExpertBackend | None):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i, experts) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, experts: ExpertBackend | None = None):
        super().__init__()
        self.cfg = cfg
        self.model = Backbone(cfg, experts)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self._rope: torch.Tensor | None = None   # complex rotations per position (rope_tables)
        self.decode_step = True   # one-token CPU steps as CPUDecodeStep's fixed C calls where they apply
        self._step: tuple = (None, None)   # (weakref to a cache, CPUDecodeStep or None): the last build for it

    def set_experts(self, experts: ExpertBackend) -> None:
        self._step = (None, None)
        for layer in self.model.layers:
            if isinstance(layer.mlp, MoE):
                layer.mlp.experts = experts

    def set_deferral(self, n: int) -> None:
        """KTransformers-style expert deferral, off (0) by default: at decode each token's n lowest-weighted
        routed experts of layer L run while layer L+1 does, and their output joins the residual after layer
        L+1 (not before it). With the CPU kernels in a worker and the layers on an accelerator the two overlap;
        the cost is accuracy (bench/bench_deferral.py measures it)."""
        if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n < self.cfg.num_experts_per_tok:
            raise ValueError(f"defer_experts: expected an int in [0, {self.cfg.num_experts_per_tok}) "
                             f"(num_experts_per_tok), got {n!r}")
        self._step = (None, None)
        for layer in self.model.layers:
            if isinstance(layer.mlp, MoE):
                layer.mlp.defer = n

    def set_recorder(self, recorder) -> None:
        self._step = (None, None)
        for layer in self.model.layers:
            if isinstance(layer.mlp, MoE):
                layer.mlp.recorder = recorder

    def _cpu_step(self, cache: KVCache) -> CPUDecodeStep | None:
        """The CPUDecodeStep for this model, built again when what it read changes; a failed build is
        remembered for its cache until a set_* method changes the model's settings."""
        if torch.is_grad_enabled():
            return None
        built_for, step = self._step
        if step is not None and step.fits(self):
            return step
        if step is None and built_for is not None and built_for() is cache:
            return None
        step = CPUDecodeStep.build(self, cache)
        self._step = (weakref.ref(cache), step)
        return step

    def new_cache(self, max_len: int) -> KVCache:
        p = self.model.embed_tokens.weight   # lm_head may be a QuantLinear; the embeddings stay float
        if self._rope is None or self._rope.shape[0] < max_len or self._rope.device != p.device:
            self._rope = rope_tables(self.cfg, max_len, p.device)
        return KVCache(self.cfg, max_len, p.device, p.dtype)

    def forward(self, ids: torch.Tensor, start_pos: int, cache: KVCache, *, last_only: bool = False,
                absorb: bool | None = None) -> torch.Tensor:
        """ids [T] -> fp32 logits [T, vocab] (or [1, vocab] when last_only). absorb defaults to T == 1."""
        T = ids.shape[0]
        if start_pos + T > cache.max_len:
            raise ValueError(f"sequence of {start_pos + T} tokens exceeds the cache of {cache.max_len}")
        if absorb is None:
            absorb = T == 1
        if T == 1 and absorb and self.decode_step and ids.device.type == "cpu":
            step = self._cpu_step(cache)
            if step is not None:
                return step(cache, int(ids[0]), start_pos)
        rope = self._rope[start_pos:start_pos + T]
        h = self.model.embed_tokens(ids)
        pending = None   # the previous MoE layer's deferred experts (set_deferral)
        for layer in self.model.layers:
            h = layer(h, start_pos, rope, cache, absorb)
            if pending is not None:
                h, pending = h + pending(), None
            if isinstance(layer.mlp, MoE) and layer.mlp.deferred is not None:
                pending, layer.mlp.deferred = layer.mlp.deferred, None
        if pending is not None:
            h = h + pending()
        if last_only:
            h = h[-1:]
        return self.lm_head(self.model.norm(h)).float()
