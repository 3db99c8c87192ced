"""One CPU decode step as a fixed sequence of C calls on buffers made once.

When a one-token step runs wholly in the C kernels (float32 on the CPU, the dense matrices as GGML blocks
(dense_format=), the routed experts in the CPU backend), the module path still spends ~0.2 ms of Python per
layer re-deciding that and re-checking arguments (and the weight streams evict the interpreter from the caches
between calls, so each of those steps is slow): ~5% of a K2-shaped token, most of the demo's. CPUDecodeStep
takes the C objects the modules bind (MLA.cpu_block, Router.cpu_router, the CPU backend's expert layers,
MLP.cpu_expert, the QuantLinear lm_head) and replays their calls, so its logits are the module path's bit for
bit (tests/test_decode_step.py). Transformer.forward uses it when `build` succeeds and rebuilds it when `fits`
finds that a module, parameter, block array or setting it read is no longer the model's.
"""
from __future__ import annotations

import threading
import weakref

import torch

from . import kernels
from .experts.cpu import CPUExperts
from .qlinear import QuantLinear

F32 = torch.float32


class CPUDecodeStep:
    def __init__(self, model, cache):
        from .model import MoE
        self.rope = model._rope
        lib = self.lib = kernels._default
        ffi = lib.ffi
        cfg = model.cfg
        self.H, self.K = cfg.hidden_size, cfg.num_experts_per_tok
        # the step's buffers (never reallocated, so their pointers are cast once); normal tensors even when
        # built under inference_mode, so a later no_grad step may write them
        with torch.inference_mode(False):
            self.x, self.xn = torch.empty(1, self.H), torch.empty(1, self.H)
            self.y, self.s, self.t = torch.empty(1, self.H), torch.empty(1, self.H), torch.empty(1, self.H)
            self.ids, self.w = torch.empty(1, self.K, dtype=torch.int32), torch.empty(1, self.K)
        p = {n: ffi.cast("float *", getattr(self, n).data_ptr()) for n in ("x", "xn", "y", "s", "w")}
        self.px, self.pxn, self.py, self.ps, self.pw = p["x"], p["xn"], p["y"], p["s"], p["w"]
        self.pids = ffi.cast("int32_t *", self.ids.data_ptr())
        self.lock = threading.Lock()   # one step at a time: the buffers and cache pointers are shared
        self.layers = []       # per layer: (attn struct, (norm ptr, eps), router, routed struct, (mlp struct, ids, w))
        self.deps = []         # (mapping, key, value): what the model must still hold (modules, parameters, ...)
        self.watched = []      # float tensors read through raw pointers: same storage still
        self.moes = []         # MoE modules: no recorder, no deferral
        self.keep = []         # bound objects whose memory the C structs point into
        bb = model.model
        self._module(model, "model")
        self._module(bb, "embed_tokens")
        self.embed = self._param(bb.embed_tokens, "weight")
        self._module(bb, "layers")
        for i, layer in enumerate(bb.layers):
            self._module(bb.layers, str(i))
            for name in ("self_attn", "input_layernorm", "post_attention_layernorm", "mlp"):
                self._module(layer, name)
            self.layers.append(self._bind_layer(i, layer, cache, MoE))
        self._module(bb, "norm")
        self._module(model, "lm_head")
        norm, head = bb.norm, model.lm_head
        if not kernels.plain_cpu_tensors(norm.weight, (F32,)) or not _block_linear(head):
            raise _NotEligible
        self.norm = (ffi.cast("const float *", self._param(norm, "weight").data_ptr()), float(norm.eps))
        self.head = (head.qtype.id, head._op._w, head.out_features)
        self.deps.append((head.__dict__, "blocks", head.blocks))
        self.ptrs = self._ptrs()
        self.cache = None
        self._bind_cache(cache)

    @classmethod
    def build(cls, model, cache) -> CPUDecodeStep | None:
        """The step for this model and cache, or None when some op of a decode step would not run in C."""
        if (torch.is_grad_enabled() or model._rope is None or model._rope.device.type != "cpu"
                or not kernels.plain_cpu_tensors(model.model.embed_tokens.weight, cache.kv, cache.pe, (F32,) * 3)):
            return None
        try:
            return cls(model, cache)
        except _NotEligible:
            return None

    # ---- what the step reads, recorded as it binds ----------------------------------------------
    def _module(self, parent, name: str) -> None:
        self.deps.append((parent._modules, name, parent._modules[name]))

    def _param(self, module, name: str) -> torch.Tensor:
        p = module._parameters[name]
        self.deps.append((module._parameters, name, p))
        self.watched.append(p)
        return p

    def _blocks(self, *mods) -> None:
        self.deps += [(m.__dict__, "blocks", m.blocks) for m in mods]

    def _bind_layer(self, i: int, layer, cache, MoE):
        ffi = self.lib.ffi
        attn, post = layer.self_attn, layer.post_attention_layernorm
        block = attn.cpu_block(layer.input_layernorm, self.x, cache)
        if block is None or not kernels.plain_cpu_tensors(post.weight, (F32,)):
            raise _NotEligible
        self.keep.append(block)
        self._param(layer.input_layernorm, "weight")
        self._param(attn.kv_a_layernorm, "weight")
        self.deps.append((attn.__dict__, "kv_b_blocks", attn.kv_b_blocks))
        for name, child in attn.named_children():   # projections (QuantLinear), norms, kv_b_proj
            self._module(attn, name)
            if isinstance(child, QuantLinear):
                self._blocks(child)
        if "q_a_layernorm" in attn._modules:
            self._param(attn.q_a_layernorm, "weight")
        if attn.kv_b_blocks is None:
            self._param(attn.kv_b_proj, "weight")
        norm = (ffi.cast("const float *", self._param(post, "weight").data_ptr()), float(post.eps))
        mlp = layer.mlp
        if not isinstance(mlp, MoE):
            return block._a, norm, None, None, self._bind_mlp(mlp)
        if mlp.recorder is not None or mlp.defer or type(mlp.experts) is not CPUExperts:
            raise _NotEligible
        router = mlp.gate.cpu_router(self.xn)
        routed = mlp.experts.layers.get(i)
        if router is None or routed is None:
            raise _NotEligible
        self.moes.append(mlp)
        self.keep += [router, routed]
        self._module(mlp, "gate")
        self._param(mlp.gate, "weight")
        if mlp.gate.has_bias:
            self._param(mlp.gate, "e_score_correction_bias")
        self.deps += [(mlp.__dict__, "experts", mlp.experts), (mlp.experts.__dict__, "layers", mlp.experts.layers),
                      (mlp.experts.layers, i, routed)]
        self.deps.append((mlp._modules, "shared_experts", mlp.shared_experts))
        shared = self._bind_mlp(mlp.shared_experts) if mlp.shared_experts is not None else None
        return block._a, norm, router._r, routed._cstruct(self.lib), shared

    def _bind_mlp(self, mlp):
        """(struct, ids ptr, weights ptr) of an MLP's one-expert call (MLP.cpu_expert)."""
        expert = mlp.cpu_expert(self.xn)
        if expert is None:
            raise _NotEligible
        ew, ids, w = expert
        self.keep.append(expert)
        for name in ("gate_proj", "up_proj", "down_proj"):
            self._module(mlp, name)
        self._blocks(mlp.gate_proj, mlp.up_proj, mlp.down_proj)
        ffi = self.lib.ffi
        return ew._cstruct(self.lib), ffi.cast("const int32_t *", ids.data_ptr()), ffi.cast("const float *", w.data_ptr())

    def _ptrs(self) -> tuple:
        return tuple(t.data_ptr() for t in self.watched)

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
        # positions the cache rows and the RoPE table both hold
        self.max_pos = min(cache.kv.shape[1], self.rope.shape[0])
        self.rot_base, self.rot_stride = self.rope.data_ptr(), self.rope.stride(0) * self.rope.element_size()

    def fits(self, model) -> bool:
        """Whether this step still reads what the modules would: the same modules, parameters, blocks and
        backends, the weights in the same memory, no recorder or deferral set since."""
        return (model._rope is self.rope and all(d.get(k) is v for d, k, v in self.deps)
                and self._ptrs() == self.ptrs and all(m.recorder is None and not m.defer for m in self.moes))

    def __call__(self, cache, token: int, pos: int) -> torch.Tensor:
        """Logits float32 [1, vocab] of one token at position pos of this cache (its rows pos are written)."""
        with self.lock:
            if cache is not self.cache() or (cache.kv.data_ptr(), cache.pe.data_ptr()) != self.cache_ptrs:
                self._bind_cache(cache)
            return self._step(token, pos)

    def _step(self, token: int, pos: int) -> torch.Tensor:
        lib, c = self.lib.lib, self.lib._check
        ffi = self.lib.ffi
        if not 0 <= token < self.embed.shape[0]:
            raise ValueError(f"token id {token} is not in [0, {self.embed.shape[0]})")
        if not 0 <= pos < self.max_pos:
            raise ValueError(f"position {pos} is outside the cache and RoPE table ({self.max_pos} positions)")
        x, px, pxn, H = self.x, self.px, self.pxn, self.H
        x.copy_(self.embed[token])
        rot = ffi.cast("const float *", self.rot_base + pos * self.rot_stride)   # rope row pos as [rope / 2, 2]
        residual = lib.HK2_MOE_H_RESIDUAL if kernels.h_residual_default(1) else 0   # as moe_forward's
        for i, (attn, (nw, eps), router, routed, mlp) in enumerate(self.layers):
            c(lib.hk2_attn_decode(attn, pos, px, rot, self.kv[i], self.pe[i], px), "attn_decode")
            c(lib.hk2_rms_norm(px, nw, 1, H, eps, pxn), "rms_norm")
            if router is not None:
                c(lib.hk2_route(router, 1, pxn, self.pids, self.pw), "route")
                c(lib.hk2_moe_forward(routed, 1, self.K, pxn, self.pids, self.pw, self.py, residual), "moe_forward")
            if mlp is not None:   # shared experts (MoE) or the dense FFN, at 8 bits as MLP.forward
                c(lib.hk2_moe_forward(mlp[0], 1, 1, pxn, mlp[1], mlp[2], self.ps, 0), "moe_forward")
            if router is None:
                torch.add(x, self.s, out=x)                  # x + mlp(x)
            elif mlp is None:
                torch.add(x, self.y, out=x)                  # x + experts(x)
            else:
                torch.add(self.y, self.s, out=self.t)        # x + (experts(x) + shared(x)), the module path's order
                torch.add(x, self.t, out=x)
        nw, eps = self.norm
        c(lib.hk2_rms_norm(px, nw, 1, H, eps, pxn), "rms_norm")
        qt, w, V = self.head
        logits = torch.empty(1, V)
        c(lib.hk2_linear(qt, w, V, H, 1, pxn, ffi.cast("float *", logits.data_ptr())), "linear")
        return logits


class _NotEligible(Exception):
    pass


def _block_linear(m) -> bool:
    return isinstance(m, QuantLinear) and m.blocks is not None and m.bias is None
