"""The DeepSeek-V3 / Kimi K2 forward pass for one sequence, on any torch device: the reference model.

Parameter names mirror the HF checkpoint names so loading is a walk over `named_parameters()`.
Routed experts are not parameters here: the MoE block hands them to an `ExpertBackend`.
How a step runs faster than these modules (the CPU runtime's fixed C calls) is built outside, from the
loaded weights (`Transformer.set_runtime`); this file knows tensors and modules only.
Shapes: x is [T, hidden] for the T new tokens; `start_pos` is the position of the first one.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig, yarn_mscale
from .experts import ExpertBackend


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x * rsqrt(mean(x^2) + eps) in fp32, then the weight in x's dtype (as HF); one fused op in fp32
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
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
        # kv_b as GGML blocks for the CPU runtime, set by the loader with a dense_format: ((k_b blocks, qtype),
        # (v_b blocks, qtype)) in a GGUF's attn_k_b / attn_v_b layout; kv_b_proj stays float for prefill
        self.kv_b_blocks: tuple | None = None

    def forward(self, x: torch.Tensor, start_pos: int, rope: torch.Tensor, cache: KVCache, absorb: bool) -> torch.Tensor:
        T = x.shape[0]
        end = start_pos + T
        if hasattr(self, "q_proj"):
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
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

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
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
        self.defer = 0           # expert deferral (Transformer.set_deferral): experts this layer hands on
        self.carry = None        # the list the MoE layers hand deferred experts on through (None: off)
        self.first = layer == cfg.moe_layers[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids, weights = self.gate(x)
        if self.recorder is not None:
            self.recorder.record(self.layer, ids, weights, x)
        late = None
        if self.defer and x.shape[0] == 1:   # decode: the lowest-weighted experts finish one MoE layer late
            weights, order = weights.sort(dim=-1, descending=True)
            ids, k = ids.gather(-1, order), ids.shape[-1] - self.defer
            late = self.experts.submit(self.layer, x, ids[:, k:], weights[:, k:])
            ids, weights = ids[:, :k], weights[:, :k]
        routed = self.experts.submit(self.layer, x, ids, weights)
        y = routed.result() if self.shared_experts is None else self.shared_experts(x) + routed.result()
        if self.carry is not None:
            if self.first:        # nothing comes before it (a forward cut short may have left one)
                self.carry.clear()
            earlier = self.carry.pop() if self.carry else None   # the previous MoE layer's late experts
            if late is not None:
                self.carry.append(late)
            if earlier is not None:
                y = y + earlier.result()
        return y


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, experts: ExpertBackend | None):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLA(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoE(cfg, layer, experts) if cfg.is_moe_layer(layer) else MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x, start_pos, rope, cache, absorb):
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
        self._make_runtime = None   # set_runtime's factory
        self.runtime = None         # its one-token step for these weights and settings, or None (these modules)

    def moe_layers(self) -> list[MoE]:
        return [layer.mlp for layer in self.model.layers if isinstance(layer.mlp, MoE)]

    def set_runtime(self, make) -> None:
        """make(model) -> a one-token step `step(ids, start_pos, cache) -> logits` built from the weights as they
        are now (or None where it does not apply), e.g. `runtime.CPURuntime.build`; None: these modules. The
        set_* methods build it again; after changing weights another way, call this again."""
        self._make_runtime = make
        self.runtime = make(self) if make is not None else None

    def _settings_changed(self) -> None:
        self.set_runtime(self._make_runtime)

    def set_experts(self, experts: ExpertBackend) -> None:
        for moe in self.moe_layers():
            moe.experts = experts
        self._settings_changed()

    def set_deferral(self, n: int) -> None:
        """KTransformers-style expert deferral, off (0) by default: at decode each token's n lowest-weighted
        routed experts of an MoE layer run while the next one does, and their output joins the residual after
        that layer (not before it). With the CPU kernels in a worker and the layers on an accelerator the two
        overlap; the cost is accuracy (bench/bench_deferral.py measures it). The last MoE layer defers none:
        no layer is left to overlap them with."""
        if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n < self.cfg.num_experts_per_tok:
            raise ValueError(f"defer_experts: expected an int in [0, {self.cfg.num_experts_per_tok}) "
                             f"(num_experts_per_tok), got {n!r}")
        moes, carry = self.moe_layers(), [] if n else None
        for i, moe in enumerate(moes):
            moe.defer, moe.carry = (n if i < len(moes) - 1 else 0), carry
        self._settings_changed()

    def set_recorder(self, recorder) -> None:
        for moe in self.moe_layers():
            moe.recorder = recorder
        self._settings_changed()

    def new_cache(self, max_len: int) -> KVCache:
        p = self.model.embed_tokens.weight   # lm_head may be a QuantLinear; the embeddings stay float
        if self._rope is None or self._rope.shape[0] < max_len or self._rope.device != p.device:
            self._rope = rope_tables(self.cfg, max_len, p.device)
            self._settings_changed()   # a runtime reads the table in place
        return KVCache(self.cfg, max_len, p.device, p.dtype)

    def forward(self, ids: torch.Tensor, start_pos: int, cache: KVCache, *, last_only: bool = False,
                absorb: bool | None = None) -> torch.Tensor:
        """ids [T] -> fp32 logits [T, vocab] (or [1, vocab] when last_only). absorb defaults to T == 1."""
        T = ids.shape[0]
        if start_pos + T > cache.max_len:
            raise ValueError(f"sequence of {start_pos + T} tokens exceeds the cache of {cache.max_len}")
        if absorb is None:
            absorb = T == 1
        if T == 1 and absorb and self.runtime is not None and not torch.is_grad_enabled():
            return self.runtime(ids, start_pos, cache)
        if start_pos + T > self._rope.shape[0]:   # a cache made directly, longer than new_cache's table
            raise ValueError(f"position {start_pos + T - 1} is outside the RoPE table ({self._rope.shape[0]} "
                             f"positions; Transformer.new_cache makes one for its cache)")
        rope = self._rope[start_pos:start_pos + T]
        h = self.model.embed_tokens(ids)
        for layer in self.model.layers:
            h = layer(h, start_pos, rope, cache, absorb)
        if last_only:
            h = h[-1:]
        return self.lm_head(self.model.norm(h)).float()
