"""One CPU decode step as a fixed sequence of C calls on buffers made once.

When a one-token step runs wholly in the C kernels (float32 on the CPU, the dense matrices as GGML blocks
(dense_format=), the routed experts in the CPU backend), the module path still spends ~0.2 ms of Python per
layer re-deciding that and re-checking arguments (and the weight streams evict the interpreter from the caches
between calls, so each of those steps is slow): ~3% of a K2-shaped token, half of the demo's. CPUDecodeStep
takes the C objects the modules bind (MLA.cpu_block, Router.cpu_router, the CPU backend's expert layers,
MLP.cpu_expert, the QuantLinear lm_head) and replays their calls, so its logits are the module path's bit for
bit (tests/test_decode_step.py). Transformer.forward uses it when `build` succeeds and rebuilds it when `fits`
says something it read has changed.
"""
from __future__ import annotations

import weakref

import torch

from . import kernels
from .experts.cpu import CPUExperts
from .qlinear import QuantLinear

F32 = torch.float32


class CPUDecodeStep:
    def __init__(self, model, cache):
        self.rope = model._rope
        lib = self.lib = kernels._default
        ffi = lib.ffi
        cfg = model.cfg
        self.H, self.K = cfg.hidden_size, cfg.num_experts_per_tok
        self.embed = model.model.embed_tokens.weight
        # the step's buffers (never reallocated, so their pointers are cast once); normal tensors even when
        # built under inference_mode, so a later no_grad step may write them
        with torch.inference_mode(False):
            self.x, self.xn = torch.empty(1, self.H), torch.empty(1, self.H)
            self.y, self.s, self.t = torch.empty(1, self.H), torch.empty(1, self.H), torch.empty(1, self.H)
            self.ids, self.w = torch.empty(1, self.K, dtype=torch.int32), torch.empty(1, self.K)
        p = {n: ffi.cast("float *", getattr(self, n).data_ptr()) for n in ("x", "xn", "y", "s", "w")}
        self.px, self.pxn, self.py, self.ps, self.pw = p["x"], p["xn"], p["y"], p["s"], p["w"]
        self.pids = ffi.cast("int32_t *", self.ids.data_ptr())
        self.layers = []                        # per layer: (attn struct, norm ptr, eps, router, routed, shared)
        self.watched = [self.embed]             # float tensors read through raw pointers
        self.deps = []                          # (object, attribute, value) that must stay as bound
        self.keep = []                          # bound objects whose memory the structs point into
        for i, layer in enumerate(model.model.layers):
            entry = self._bind_layer(i, layer, cache)
            if entry is None:
                raise _NotEligible
            self.layers.append(entry)
        norm, head = model.model.norm, model.lm_head
        if not kernels.plain_cpu_tensors(norm.weight, (F32,)) or not _block_linear(head):
            raise _NotEligible
        self.norm = (ffi.cast("const float *", norm.weight.data_ptr()), float(norm.eps))
        self.watched.append(norm.weight)
        self.head = (head.qtype.id, head._op._w, head.out_features)
        self.deps.append((head, "blocks", head.blocks))
        self.ptrs = self._ptrs()
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

    def _bind_layer(self, i: int, layer, cache):
        from .model import MoE
        ffi = self.lib.ffi
        block = layer.self_attn.cpu_block(layer.input_layernorm, self.x, cache)
        post = layer.post_attention_layernorm
        if block is None or not kernels.plain_cpu_tensors(post.weight, (F32,)):
            return None
        self.keep.append(block)
        self.watched += [w for w in block._watched if w is not None] + [post.weight]
        self.deps += [(layer.self_attn, "kv_b_blocks", layer.self_attn.kv_b_blocks)]
        self.deps += [(m, "blocks", m.blocks) for m in layer.self_attn.modules() if isinstance(m, QuantLinear)]
        norm = (ffi.cast("const float *", post.weight.data_ptr()), float(post.eps))
        mlp = layer.mlp
        if isinstance(mlp, MoE):
            if mlp.recorder is not None or mlp.defer or type(mlp.experts) is not CPUExperts:
                return None
            router = mlp.gate.cpu_router(self.xn)
            routed = mlp.experts.layers.get(i)
            if router is None or routed is None:
                return None
            self.keep += [router, routed]
            self.watched += [w for w in router._watched if w is not None]
            self.deps += [(mlp, "experts", mlp.experts), (mlp.experts, "layers", mlp.experts.layers)]
            shared = None
            if mlp.shared_experts is not None:
                shared = self._bind_mlp(mlp.shared_experts)
                if shared is None:
                    return None
            return block._a, norm, router._r, routed._cstruct(self.lib), shared
        dense = self._bind_mlp(mlp)
        return None if dense is None else (block._a, norm, None, None, dense)

    def _bind_mlp(self, mlp):
        """(struct, ids ptr, weights ptr) of an MLP's one-expert call (MLP.cpu_expert), or None."""
        expert = mlp.cpu_expert(self.xn)
        if expert is None:
            return None
        ew, ids, w = expert
        self.keep.append(expert)
        self.deps += [(m, "blocks", m.blocks) for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj)]
        ffi = self.lib.ffi
        return ew._cstruct(self.lib), ffi.cast("const int32_t *", ids.data_ptr()), ffi.cast("const float *", w.data_ptr())

    def _ptrs(self) -> tuple:
        return tuple(t.data_ptr() for t in self.watched)

    def _bind_cache(self, cache) -> None:
        ffi, L = self.lib.ffi, len(self.layers)
        # a weak reference: a cache the engine has replaced is freed now, not at the next decode step
        self.cache, self.max_len = weakref.ref(cache), cache.max_len
        self.cache_ptrs, self.cache_shape = (cache.kv.data_ptr(), cache.pe.data_ptr()), (cache.kv.shape[2], cache.pe.shape[2])
        self.kv = [ffi.cast("float *", cache.kv[i].data_ptr()) for i in range(L)]
        self.pe = [ffi.cast("float *", cache.pe[i].data_ptr()) for i in range(L)]
        self.rot_base, self.rot_stride = self.rope.data_ptr(), self.rope.stride(0) * self.rope.element_size()

    def fits(self, model, cache) -> bool:
        """Whether this step still reads what the modules would: same weights in the same memory, same
        blocks, backends and settings. A new cache of the model's is taken over here."""
        if (model._rope is not self.rope or self._ptrs() != self.ptrs
                or not all(getattr(o, a) is v for o, a, v in self.deps)):
            return False
        if cache is not self.cache() or (cache.kv.data_ptr(), cache.pe.data_ptr()) != self.cache_ptrs:
            if (not kernels.plain_cpu_tensors(cache.kv, cache.pe, (F32, F32)) or cache.kv.shape[0] != len(self.layers)
                    or (cache.kv.shape[2], cache.pe.shape[2]) != self.cache_shape):
                return False
            self._bind_cache(cache)
        return True

    def __call__(self, token: int, pos: int) -> torch.Tensor:
        """Logits float32 [1, vocab] of one token at position pos (its cache rows are written)."""
        lib, c = self.lib.lib, self.lib._check
        ffi = self.lib.ffi
        if not 0 <= token < self.embed.shape[0]:
            raise ValueError(f"token id {token} is not in [0, {self.embed.shape[0]})")
        if not 0 <= pos < self.max_len:
            raise ValueError(f"position {pos} is outside the cache of {self.max_len}")
        x, px, pxn, H = self.x, self.px, self.pxn, self.H
        x.copy_(self.embed[token])
        rot = ffi.cast("const float *", self.rot_base + pos * self.rot_stride)   # rope row pos as [rope / 2, 2]
        residual = lib.HK2_MOE_H_RESIDUAL if 1 <= kernels.H_RESIDUAL_MAX_TOKENS else 0   # as moe_forward at T=1
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
