"""The CPU runtime: one decode token as a fixed sequence of C calls, built once from a model's loaded weights.

`CPURuntime.build(model)` binds every layer's weights to the kernels' structs (checked there, once) and
makes the step's buffers; a step is then embedding row, per layer `hk2_attn_decode` (input norm, the
projections, latent MLA, o_proj, residual), `hk2_rms_norm`, `hk2_route`, `hk2_moe_forward` for the routed
experts and again, as one expert, for the shared expert or dense FFN, the residual adds; final norm and
`hk2_linear` for the logits. The model installs it with `Transformer.set_runtime(CPURuntime.build)` and builds
it again whenever a set_* method changes what it read; nothing here re-checks the weights per token.

It applies to a float32 model on the CPU with no routing recorder or expert deferral: matrices, dense and
routed, are GGML blocks (QuantLinear, CPUExperts) or float32 tensors, which the kernels read in place as F32
rows; the reference backend (experts='torch') only when asked for (`torch_experts`): by default it stays
torch ops, so that it can check this. Elsewhere `build` returns None and the modules run.
"""
from __future__ import annotations

import logging
import threading
import weakref

import numpy as np
import torch
from torch import nn

from . import kernels
from .experts.cpu import CPUExperts
from .experts.torch_backend import TorchExperts
from .qlinear import QuantLinear

log = logging.getLogger(__name__)
F32 = torch.float32


class NotApplicable(Exception):
    """Why the runtime does not apply to a model (build returns None and logs it)."""


def _f32(t: torch.Tensor, what: str) -> torch.Tensor:
    if not kernels.plain_cpu_tensors(t, (F32,)):
        raise NotApplicable(f"{what} is not a contiguous float32 CPU tensor")
    return t


def _matrix(m: nn.Module, what: str) -> tuple[np.ndarray, kernels.QType]:
    """(blocks [rows, row_bytes], type) of a projection: a QuantLinear's blocks, or a float32 Linear's weight
    read in place as F32 rows."""
    if isinstance(m, QuantLinear) and m.blocks is not None and m.bias is None:
        return m.blocks, m.qtype
    if type(m) is nn.Linear and m.bias is None:
        w = _f32(m.weight.detach(), what)
        return w.view(torch.uint8).numpy(), kernels.qtype("F32")
    raise NotApplicable(f"{what} is a {type(m).__name__}, not GGML blocks or a float32 Linear")


def swiglu_as_expert(mlp, what: str = "mlp") -> kernels.ExpertWeights:
    """A SwiGLU (model.MLP) as one expert of the routed experts' kernel, so that it is one C call. Run with
    h_residual off, its h = silu(g)·u enters down at 8 bits, as three separate linear calls (and llama.cpp)
    quantize every dense input."""
    (g, gt), (u, ut), (d, dt) = (_matrix(getattr(mlp, n), f"{what}.{n}") for n in ("gate_proj", "up_proj", "down_proj"))
    return kernels.ExpertWeights([g], [u], [d], gt, ut, dt)


def _routed(experts, i: int, where: str, torch_experts: bool):
    """(ExpertWeights, first-use check or None) of layer i's routed experts: a CPUExperts' blocks, or (when
    asked for) the reference backend's float32 tensors read in place as F32 rows."""
    if isinstance(experts, CPUExperts):
        # experts paged from disk: their scales are checked on first use, before the kernel reads them
        return experts.layers[i], experts.check_first_use if i in experts.pending_checks else None
    if torch_experts and isinstance(experts, TorchExperts):
        mats = [_f32(t, f"{where} experts").view(torch.uint8).numpy() for t in experts.layers[i]]
        return kernels.ExpertWeights(*mats, "F32"), None
    raise NotApplicable(f"{where}: routed experts are {type(experts).__name__}, not CPU or float32 CPU tensors")


class CPURuntime:
    def __init__(self, model, torch_experts: bool = False):
        self.torch_experts = torch_experts
        cfg, bb = model.cfg, model.model
        if model._rope is None or model._rope.device.type != "cpu":
            raise NotApplicable("no CPU RoPE table yet (Transformer.new_cache makes it)")
        self.lib = lib = kernels.default_lib()
        ffi = lib.ffi
        self.H, self.K = cfg.hidden_size, cfg.num_experts_per_tok
        self.embed = _f32(bb.embed_tokens.weight.detach(), "embed_tokens.weight")
        self.rope = model._rope
        self.rot = torch.view_as_real(self.rope)   # [positions, rope / 2, 2]
        # the step's buffers, never reallocated so their pointers are cast once; normal tensors even when built
        # under inference_mode, so a later no_grad step may write them
        with torch.inference_mode(False):
            self.x, self.xn, self.y, self.s, self.t = (torch.empty(1, self.H) for _ in range(5))
            self.ids, self.w = torch.empty(1, self.K, dtype=torch.int32), torch.empty(1, self.K)
        self.px, self.pxn, self.py, self.ps = (ffi.cast("float *", t.data_ptr()) for t in (self.x, self.xn, self.y, self.s))
        self.pw, self.pids = ffi.cast("float *", self.w.data_ptr()), ffi.cast("int32_t *", self.ids.data_ptr())
        self.one = (torch.zeros(1, 1, dtype=torch.int32), torch.ones(1, 1))   # a one-expert call's id and weight
        self.pone = (ffi.cast("const int32_t *", self.one[0].data_ptr()), ffi.cast("const float *", self.one[1].data_ptr()))
        self.lock = threading.Lock()   # one step at a time: the buffers and cache pointers are shared
        self.keep = []                 # the bound objects whose memory the C structs point into
        self.layers = [self._bind_layer(i, layer) for i, layer in enumerate(bb.layers)]
        self.norm = self._norm(bb.norm, "model.norm")
        blocks, t = _matrix(model.lm_head, "lm_head")
        self.head = lib.bind_linear(blocks, t)
        self.cache = None

    @classmethod
    def build(cls, model, *, torch_experts: bool = False) -> CPURuntime | None:
        """The runtime for this model as it is now, or None (and why, at debug level) where it does not apply."""
        try:
            return cls(model, torch_experts)
        except NotApplicable as e:
            log.debug("CPU runtime not used: %s", e)
            return None

    # ---- binding, once -------------------------------------------------------------------------
    def _norm(self, norm, what: str):
        w = _f32(norm.weight.detach(), what + ".weight")
        self.keep.append(w)
        return self.lib.ffi.cast("const float *", w.data_ptr()), float(norm.eps)

    def _bind_layer(self, i: int, layer):
        from .model import MoE
        where = f"model.layers.{i}"
        attn = layer.self_attn
        lora = hasattr(attn, "q_a_proj")
        kv_b = None if attn.kv_b_blocks is not None else _f32(attn.kv_b_proj.weight.detach(), f"{where}.kv_b_proj")
        kv_norm = _f32(attn.kv_a_layernorm.weight.detach(), f"{where}.kv_a_layernorm")
        mla = kernels.mla_decoder(kv_b, kv_norm, n_heads=attn.n_heads, nope=attn.nope, rope=attn.rope,
                                  v_dim=attn.v_dim, scale=attn.scale, eps=attn.kv_a_layernorm.eps,
                                  kv_b_blocks=attn.kv_b_blocks)
        mats = [_matrix(getattr(attn, n), f"{where}.self_attn.{n}") if hasattr(attn, n) else None
                for n in (("q_a_proj", "q_b_proj") if lora else ("q_a_proj", "q_proj"))]
        mats += [_matrix(attn.kv_a_proj_with_mqa, f"{where}.self_attn.kv_a_proj_with_mqa"),
                 _matrix(attn.o_proj, f"{where}.self_attn.o_proj")]
        in_norm = _f32(layer.input_layernorm.weight.detach(), f"{where}.input_layernorm")
        q_a_norm = _f32(attn.q_a_layernorm.weight.detach(), f"{where}.q_a_layernorm") if lora else None
        block = kernels.attn_decoder(mla, in_norm, layer.input_layernorm.eps, q_a_norm,
                                     attn.q_a_layernorm.eps if lora else 0.0, *mats)
        self.keep.append(block)
        post = self._norm(layer.post_attention_layernorm, f"{where}.post_attention_layernorm")
        mlp = layer.mlp
        if not isinstance(mlp, MoE):
            return block.cstruct, post, None, None, self._bind_mlp(mlp, f"{where}.mlp")
        if mlp.recorder is not None or mlp.defer or mlp.carry is not None:
            raise NotApplicable("a routing recorder or expert deferral needs the modules' MoE.forward")
        gate = mlp.gate
        bias = _f32(gate.e_score_correction_bias.detach(), f"{where}.gate.bias") if gate.has_bias else None
        router = kernels.router(_f32(gate.weight.detach(), f"{where}.gate.weight"), bias, top_k=gate.top_k,
                                n_group=gate.n_group, topk_group=gate.topk_group, softmax=gate.scoring != "sigmoid",
                                norm_topk=gate.norm, scaling=gate.scaling)
        routed, first_use = _routed(mlp.experts, i, where, self.torch_experts)
        self.keep += [router, routed]
        shared = self._bind_mlp(mlp.shared_experts, f"{where}.mlp.shared_experts") if mlp.shared_experts else None
        return block.cstruct, post, (router.cstruct, first_use), routed.cstruct(self.lib), shared

    def _bind_mlp(self, mlp, what: str):
        ew = swiglu_as_expert(mlp, what)
        self.keep.append(ew)
        return ew.cstruct(self.lib)

    def _bind_cache(self, cache) -> None:
        ffi, L = self.lib.ffi, len(self.layers)
        if (not kernels.plain_cpu_tensors(cache.kv, cache.pe, (F32, F32)) or cache.kv.shape[0] != L
                or cache.pe.shape[0] != L or cache.kv.shape[1] != cache.pe.shape[1]):
            raise ValueError(f"cache: kv {tuple(cache.kv.shape)} / pe {tuple(cache.pe.shape)} is not a float32 CPU "
                             f"cache of this model's {L} layers")
        # a weak reference: a cache the engine has replaced is freed now, not at the next decode step
        self.cache, self.cache_ptrs = weakref.ref(cache), (cache.kv.data_ptr(), cache.pe.data_ptr())
        self.kv = [ffi.cast("float *", cache.kv[i].data_ptr()) for i in range(L)]
        self.pe = [ffi.cast("float *", cache.pe[i].data_ptr()) for i in range(L)]
        self.max_pos = min(cache.kv.shape[1], self.rope.shape[0])   # positions the cache and the RoPE table hold

    # ---- one step --------------------------------------------------------------------------------
    def __call__(self, ids: torch.Tensor, pos: int, cache) -> torch.Tensor:
        """Logits float32 [1, vocab] of the one token in ids at position pos of this cache (row pos is written)."""
        token = int(ids[0])
        with self.lock:
            if self.cache is None or cache is not self.cache() or (cache.kv.data_ptr(), cache.pe.data_ptr()) != self.cache_ptrs:
                self._bind_cache(cache)
            if not 0 <= token < self.embed.shape[0]:
                raise ValueError(f"token id {token} is not in [0, {self.embed.shape[0]})")
            if not 0 <= pos < self.max_pos:
                raise ValueError(f"position {pos} is outside the cache and RoPE table ({self.max_pos} positions)")
            return self._step(token, pos)

    def _step(self, token: int, pos: int) -> torch.Tensor:
        lib, c, ffi = self.lib.lib, self.lib.check, self.lib.ffi
        x, px, pxn, H = self.x, self.px, self.pxn, self.H
        x.copy_(self.embed[token])
        rot = ffi.cast("const float *", self.rot[pos].data_ptr())
        residual = lib.HK2_MOE_H_RESIDUAL if kernels.h_residual_default(1) else 0   # as moe_forward's
        one_id, one_w = self.pone
        for i, (attn, (nw, eps), router, routed, mlp) in enumerate(self.layers):
            c(lib.hk2_attn_decode(attn, pos, px, rot, self.kv[i], self.pe[i], px), "attn_decode")
            c(lib.hk2_rms_norm(px, nw, 1, H, eps, pxn), "rms_norm")
            if router is not None:
                router, first_use = router
                c(lib.hk2_route(router, 1, pxn, self.pids, self.pw), "route")
                if first_use is not None:
                    first_use(i, self.ids)
                c(lib.hk2_moe_forward(routed, 1, self.K, pxn, self.pids, self.pw, self.py, residual), "moe_forward")
            if mlp is not None:   # shared expert (MoE) or the dense FFN
                c(lib.hk2_moe_forward(mlp, 1, 1, pxn, one_id, one_w, self.ps, 0), "moe_forward")
            if router is None:
                torch.add(x, self.s, out=x)                  # x + mlp(x)
            elif mlp is None:
                torch.add(x, self.y, out=x)                  # x + experts(x)
            else:
                torch.add(self.s, self.y, out=self.t)        # x + (shared(x) + experts(x)), MoE.forward's order
                torch.add(x, self.t, out=x)
        nw, eps = self.norm
        c(lib.hk2_rms_norm(px, nw, 1, H, eps, pxn), "rms_norm")
        return self.head.run(self.xn)
