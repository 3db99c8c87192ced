"""Expert prefetch: predict the next layers' routing, decide which copies pay off, admit them to the cache.

RoutingPredictor  applies the routers of layers L+1..L+d to layer L's router input (the residual stream
                  changes slowly across layers, so the later gates already see roughly their own input);
                  selection is model.Router's (sigmoid + correction bias, group-limited top-k). Router
                  inputs are RMSNorm(h) x the layer's post_attention_layernorm weight w; given those weights,
                  the target router is rescaled by w_{L+d} / w_L so it sees w_{L+d} x RMSNorm(h_L). An optional
                  correction fitted by ridge least squares on recorded (h_L, h_{L+d}) pairs maps h_L to the
                  logits layer L+d would compute from h_{L+d}; it folds into a router weight W + C^T.
                  The same fit runs online on a prompt's prefill (HybridConfig.fit_on_prefill: no files).
                  A learned PredictorHead per (L, d) (the rescaled router's choice scores plus a small MLP on
                  h_L, trained on recorded traces to give the probability that each expert is in layer L+d's
                  top-k) replaces the router when fitted or loaded (`fit_heads`, `save_heads`, `load_heads`:
                  an .npz that the engine and the simulator both read).
CostModel         a copy is worth it when expected uses x CPU time saved per use > copy time.
Link              the copy link's queue: when a copy lands, how long a new one waits.
Prefetcher        admits copies to an ExpertCache: `plan_copies` for predicted ids or probabilities,
                  `after_access` for demand admission of experts that just missed. A copy lasts about as long
                  as a decode layer, so with `lead_ms` (`lead_times`: when each target layer will start, from the
                  current layer's CPU work and the predicted misses of the layers between) a prefetch is planned
                  only if it can land before its layer starts; candidates of all target layers compete for the
                  link by priority (decayed uses + predict_weight x predicted uses), best first.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..model import Router
from .cache import ExpertCache


def _router_from_weights(weight, bias, *, top_k: int, n_group: int = 1, topk_group: int = 1,
                         scoring: str = "sigmoid", norm: bool = True, scaling: float = 1.0) -> Router:
    """A model.Router holding the given gate weight [E, H] and correction bias [E] (None: no bias)."""
    weight = torch.as_tensor(np.asarray(weight, dtype=np.float32) if not torch.is_tensor(weight) else weight)
    weight = weight.detach().float()
    if weight.dim() != 2:
        raise ValueError(f"router weight must be [n_experts, hidden], got shape {tuple(weight.shape)}")
    E, H = weight.shape
    # Router reads only these ModelConfig fields.
    spec = SimpleNamespace(num_experts_per_tok=top_k, n_group=n_group, topk_group=topk_group, scoring_func=scoring,
                           norm_topk_prob=norm, routed_scaling_factor=scaling, n_routed_experts=E, hidden_size=H,
                           topk_method="noaux_tc" if bias is not None else "greedy")
    with torch.device(weight.device):     # predict where the model's routers live (the accelerator)
        r = Router(spec)
    with torch.no_grad():
        r.weight.copy_(weight)
        if bias is not None:
            b = torch.as_tensor(np.asarray(bias, dtype=np.float32) if not torch.is_tensor(bias) else bias).float()
            if b.shape != (E,):
                raise ValueError(f"router correction bias must be [{E}], got shape {tuple(b.shape)}")
            r.e_score_correction_bias.copy_(b)
    return r.requires_grad_(False)


def _clone_router(r: Router, weight: torch.Tensor) -> Router:
    return _router_from_weights(weight, r.e_score_correction_bias if r.has_bias else None, top_k=r.top_k,
                                n_group=r.n_group, topk_group=r.topk_group, scoring=r.scoring, norm=r.norm,
                                scaling=r.scaling)


def _as_numpy(ids) -> np.ndarray:
    return ids.detach().cpu().numpy() if torch.is_tensor(ids) else np.asarray(ids)


def recall_at_k(pred, true) -> float:
    """Mean share of the true top-k ids found in the predicted top-k; pred/true [..., K]."""
    pred, true = np.asarray(pred), np.asarray(true)
    if pred.shape != true.shape or pred.size == 0:
        raise ValueError(f"recall_at_k: shapes differ or empty: {pred.shape} vs {true.shape}")
    found = (pred[..., :, None] == true[..., None, :]).any(-1)
    return float(found.mean())


HEADS_VERSION = 1


class PredictorHead:
    """A learned correction of the router prediction for one (source layer, lookahead) pair:
        logits = scale x prior + W2 gelu(W1 x + b1) + b2,
    where x is the source layer's router input and prior [T, E] the plain predictor's choice scores for the
    target layer (its rescaled router: sigmoid(x B^T) + correction bias). Trained with binary cross-entropy
    on membership in the target layer's top-k, so sigmoid(logits) estimates the probability that each expert
    is used there. W2 starts at zero, so an untrained or lightly trained head ranks as the router does."""

    def __init__(self, w1, b1, w2, b2, scale):
        w1, b1, w2, b2, scale = (torch.as_tensor(_as_numpy(a)).float() for a in (w1, b1, w2, b2, scale))
        if (w1.dim() != 2 or b1.shape != (w1.shape[0],) or w2.dim() != 2 or w2.shape[1] != w1.shape[0]
                or b2.shape != (w2.shape[0],) or scale.numel() != 1):
            raise ValueError(f"PredictorHead: shapes must be w1 [width, H], b1 [width], w2 [E, width], b2 [E], "
                             f"scale [1]; got {tuple(w1.shape)}, {tuple(b1.shape)}, {tuple(w2.shape)}, "
                             f"{tuple(b2.shape)}, {tuple(scale.shape)}")
        self.w1, self.b1, self.w2, self.b2, self.scale = w1, b1, w2, b2, scale.reshape(1)

    @property
    def n_experts(self) -> int:
        return self.w2.shape[0]

    def to(self, device) -> "PredictorHead":
        self.w1, self.b1, self.w2, self.b2, self.scale = (
            a.to(device) for a in (self.w1, self.b1, self.w2, self.b2, self.scale))
        return self

    @staticmethod
    def _forward(x, prior, w1, b1, w2, b2, scale):
        return scale * prior + F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)

    @torch.inference_mode()
    def logits(self, x: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
        x = torch.as_tensor(x).to(self.w1.device, torch.float32)
        return self._forward(x, prior.to(x.device, torch.float32), self.w1, self.b1, self.w2, self.b2, self.scale)

    @classmethod
    def fit(cls, x, prior, ids, *, width: int = 512, epochs: int = 10, lr: float = 1e-2,
            weight_decay: float = 1e-4, batch: int = 256, seed: int = 0, scale: float = 10.0) -> "PredictorHead":
        """Train on router inputs x [N, H], the plain predictor's choice scores prior [N, E] and the target
        layer's chosen ids [N, K] (AdamW, one-cycle lr, deterministic for a seed)."""
        x = torch.as_tensor(_as_numpy(x), dtype=torch.float32)
        prior = torch.as_tensor(_as_numpy(prior), dtype=torch.float32)
        ids = torch.as_tensor(_as_numpy(ids), dtype=torch.int64)
        if x.dim() != 2 or ids.dim() != 2 or prior.dim() != 2 or not len(x) == len(ids) == len(prior) or not len(x):
            raise ValueError(f"PredictorHead.fit: x must be [N, H], prior [N, E] and ids [N, K] with N > 0, got "
                             f"{tuple(x.shape)}, {tuple(prior.shape)} and {tuple(ids.shape)}")
        E = prior.shape[1]
        if ids.min() < 0 or ids.max() >= E:
            raise ValueError(f"PredictorHead.fit: ids must be in 0..{E - 1}")
        y = torch.zeros(len(ids), E).scatter_(1, ids, 1.0)
        g = torch.Generator().manual_seed(seed)
        H = x.shape[1]
        params = [torch.randn(width, H, generator=g) * H ** -0.5, torch.zeros(width), torch.zeros(E, width),
                  torch.zeros(E), torch.full((1,), float(scale))]
        params = [p.requires_grad_() for p in params]
        opt = torch.optim.AdamW(params, lr, weight_decay=weight_decay)
        n = len(x)
        steps = max(1, epochs * ((n + batch - 1) // batch))
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps)
        with torch.inference_mode(False), torch.enable_grad():
            for _ in range(epochs):
                perm = torch.randperm(n, generator=g)
                for i in range(0, n, batch):
                    j = perm[i:i + batch]
                    loss = F.binary_cross_entropy_with_logits(cls._forward(x[j], prior[j], *params), y[j])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
        return cls(*(p.detach() for p in params))


class RoutingPredictor:
    """Predicts top-k ids of later MoE layers from the router input at the current one.

    `routers` maps a layer key (model layer number, or MoE index) to its model.Router; "L + d" means the
    d-th MoE layer after L in key order. `norm_weights` (same keys, [H] each) are the RMSNorm weights that
    produce each router's input; without them router inputs are used as they are.
    """

    def __init__(self, routers: Mapping[int, Router] | Sequence[Router], norm_weights=None):
        if not isinstance(routers, Mapping):
            routers = dict(enumerate(routers))
        if not routers:
            raise ValueError("RoutingPredictor: no routers given")
        self.routers = dict(sorted(routers.items()))
        self.layers = list(self.routers)
        self._index = {l: i for i, l in enumerate(self.layers)}
        self.norm_weights = None
        if norm_weights is not None:
            if not isinstance(norm_weights, Mapping):
                norm_weights = dict(enumerate(norm_weights))
            if sorted(norm_weights) != self.layers:
                raise ValueError("RoutingPredictor: norm_weights must have one entry per router layer")
            self.norm_weights = {}
            for l, w in norm_weights.items():
                w = torch.as_tensor(_as_numpy(w), dtype=torch.float32)
                H = self.routers[l].weight.shape[1]
                if w.shape != (H,):
                    raise ValueError(f"RoutingPredictor: norm weight of layer {l} must be [{H}], got {tuple(w.shape)}")
                self.norm_weights[l] = w
        self._base: dict[tuple[int, int], Router] = {}
        self._corrected: dict[tuple[int, int], Router] = {}
        self.heads: dict[tuple[int, int], PredictorHead] = {}    # (layer, target layer) -> learned head

    @classmethod
    def from_weights(cls, weights, bias=None, *, top_k: int, n_group: int = 1, topk_group: int = 1,
                     scoring: str = "sigmoid", norm_weights=None) -> "RoutingPredictor":
        """weights [n_layers, E, H], bias [n_layers, E] or None, norm_weights [n_layers, H] or None;
        keys 0..n_layers-1."""
        weights = np.asarray(weights, dtype=np.float32)
        if weights.ndim != 3:
            raise ValueError(f"RoutingPredictor: router weights must be [layers, experts, hidden], got {weights.shape}")
        if bias is not None:
            bias = np.asarray(bias, dtype=np.float32)
            if bias.shape != weights.shape[:2]:
                raise ValueError(f"RoutingPredictor: router bias must be {weights.shape[:2]}, got {bias.shape}")
        return cls([_router_from_weights(weights[i], None if bias is None else bias[i], top_k=top_k,
                                         n_group=n_group, topk_group=topk_group, scoring=scoring)
                    for i in range(weights.shape[0])], norm_weights=norm_weights)

    @classmethod
    def from_model(cls, model) -> "RoutingPredictor":
        """The routers of a model.Transformer (and their input norms), keyed by model layer number."""
        moe = {i: layer for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "gate")}
        return cls({i: b.mlp.gate for i, b in moe.items()},
                   norm_weights={i: b.post_attention_layernorm.weight.detach().float().cpu() for i, b in moe.items()})

    def base_router(self, layer: int, tgt: int) -> Router:
        """The router of `tgt` adapted to inputs normalised for `layer` (rescaled by the norm-weight ratio)."""
        if self.norm_weights is None or layer == tgt:
            return self.routers[tgt]
        if (layer, tgt) not in self._base:
            w_src, w_tgt = self.norm_weights[layer], self.norm_weights[tgt]
            # x_L = w_L * n(h_L), so w_tgt * n(h_L) = x_L * w_tgt / w_L; a zero w_L carries no information
            ratio = torch.where(w_src.abs() > 1e-12, w_tgt / torch.where(w_src == 0, 1.0, w_src), 0.0)
            r = self.routers[tgt]
            self._base[(layer, tgt)] = _clone_router(r, r.weight.detach().float() * ratio.to(r.weight.device))
        return self._base[(layer, tgt)]

    def target(self, layer: int, d: int) -> int | None:
        """The layer key d MoE layers after `layer`, or None past the last one."""
        if layer not in self._index:
            raise ValueError(f"RoutingPredictor: layer {layer} has no router "
                             f"(known: {self.layers[0]}..{self.layers[-1]})")
        if d < 1:
            raise ValueError(f"RoutingPredictor: lookahead must be >= 1, got {d}")
        i = self._index[layer] + d
        return self.layers[i] if i < len(self.layers) else None

    def _source(self, layer: int, hidden, d: int):
        """(target layer, router input as [T, H], its learned head or None), or None past the last MoE layer."""
        tgt = self.target(layer, d)
        if tgt is None:
            return None
        h = torch.as_tensor(hidden)
        return tgt, (h[None] if h.dim() == 1 else h), self.heads.get((layer, tgt))

    @torch.inference_mode()
    def predict(self, layer: int, hidden: torch.Tensor, d: int = 1) -> torch.Tensor | None:
        """Top-k ids [T, K] for layer L+d from the router input `hidden` [T, H] at layer L."""
        src = self._source(layer, hidden, d)
        if src is None:
            return None
        tgt, h, head = src
        if head is not None:
            return head.logits(h, self.prior(layer, tgt, h)).topk(self.routers[tgt].top_k, dim=-1)[1]
        router = self._corrected.get((layer, tgt)) or self.base_router(layer, tgt)
        ids, _ = router(h.to(router.weight.device))
        return ids

    @torch.inference_mode()
    def predict_uses(self, layer: int, hidden: torch.Tensor, d: int = 1) -> torch.Tensor | None:
        """Expected use of each expert of layer L+d per token, float [T, E]: a learned head's probabilities,
        else 1 for the router's top-k ids and 0 elsewhere."""
        src = self._source(layer, hidden, d)
        if src is None:
            return None
        tgt, h, head = src
        if head is not None:
            return head.logits(h, self.prior(layer, tgt, h)).sigmoid()
        ids = self.predict(layer, h, d)
        E = self.routers[tgt].weight.shape[0]
        return torch.zeros(ids.shape[0], E, device=ids.device).scatter_(1, ids, 1.0)

    @torch.inference_mode()
    def prior(self, layer: int, tgt: int, hidden: torch.Tensor) -> torch.Tensor:
        """The plain predictor's choice scores [T, E] for layer `tgt` from router inputs at `layer` (selection
        scores before group limiting: sigmoid/softmax of the rescaled router's logits + correction bias); a
        learned head corrects these, so ridge corrections do not enter."""
        r = self.base_router(layer, tgt)
        logits = F.linear(torch.as_tensor(hidden).to(r.weight.device, torch.float32), r.weight.float())
        scores = logits.sigmoid() if r.scoring == "sigmoid" else logits.softmax(dim=-1)
        return scores + r.e_score_correction_bias.float() if r.has_bias else scores

    def predict_ahead(self, layer: int, hidden: torch.Tensor, depth: int,
                      uses: bool = False) -> dict[int, torch.Tensor]:
        """{L+d: ids [T, K]} (uses=True: expected uses [T, E], see predict_uses) for d = 1..depth, stopping at
        the last MoE layer."""
        out = {}
        for d in range(1, depth + 1):
            ids = self.predict_uses(layer, hidden, d) if uses else self.predict(layer, hidden, d)
            if ids is None:
                break
            out[self.target(layer, d)] = ids
        return out

    @torch.inference_mode()
    def fit_correction(self, layer: int, d: int, h_src, h_dst, ridge: float = 1e-3) -> None:
        """Fit C [H, E] minimising ||h_src (B + C^T)^T - h_dst W^T||^2 + ridge * N * ||C||^2 from N recorded
        router-input pairs (h_L, h_{L+d}) [N, H], where W is the router of layer L+d and B its `base_router`
        for L; later predictions from L to L+d use B + C^T. The ridge term pulls the fit toward the plain
        predictor when pairs are few. Solved where the routers live (float64 on the CPU, float32 on an
        accelerator), in the dual form X^T (X X^T + ridge N I)^-1 R when N < H (a prompt's prefill)."""
        tgt = self.target(layer, d)
        if tgt is None:
            raise ValueError(f"RoutingPredictor: no MoE layer {d} after layer {layer}")
        base = self.routers[tgt]
        dev = base.weight.device
        dt = torch.float64 if dev.type == "cpu" else torch.float32
        x = torch.as_tensor(_as_numpy(h_src) if not torch.is_tensor(h_src) else h_src).to(dev, dt)
        y = torch.as_tensor(_as_numpy(h_dst) if not torch.is_tensor(h_dst) else h_dst).to(dev, dt)
        W = base.weight.detach().to(dt)
        B = self.base_router(layer, tgt).weight.detach().to(dev, dt)
        if x.dim() != 2 or x.shape != y.shape or x.shape[1] != W.shape[1]:
            raise ValueError(f"fit_correction: h_src and h_dst must both be [N, {W.shape[1]}], "
                             f"got {tuple(x.shape)} and {tuple(y.shape)}")
        n, H = x.shape
        resid = y @ W.T - x @ B.T                               # logits the plain predictor misses [N, E]
        lam = ridge * max(n, 1)
        if n < H:
            C = x.T @ torch.linalg.solve(x @ x.T + lam * torch.eye(n, dtype=dt, device=dev), resid)
        else:
            C = torch.linalg.solve(x.T @ x + lam * torch.eye(H, dtype=dt, device=dev), x.T @ resid)   # [H, E]
        # float32 like the rescaled base routers: a bf16 model's routers (accelerator default) would round the fit
        self._corrected[(layer, tgt)] = _clone_router(base, (B + C.T).float())

    def fit_corrections(self, hidden, depth: int, ridge: float = 1e-3) -> None:
        """fit_correction for every (L, d <= depth) pair from one set of router inputs per layer, `hidden[j]`
        [N, H] at the j-th router key (a trace's hidden[:, j], or a prompt's prefill as the engine keeps it)."""
        n = len(self.layers)
        for j in range(n):
            for d in range(1, depth + 1):
                if j + d < n:
                    self.fit_correction(self.layers[j], d, hidden[j], hidden[j + d], ridge=ridge)

    def clear_corrections(self) -> None:
        """Drop fitted linear corrections and learned heads: back to the plain routers."""
        self._corrected.clear()
        self.heads.clear()

    # ---- learned heads -----------------------------------------------------------------------------
    def _check_trace(self, hidden, ids, what: str):
        hidden, ids = np.asarray(hidden, dtype=np.float32), np.asarray(ids)
        n = len(self.layers)
        if hidden.ndim != 3 or hidden.shape[1] != n or ids.ndim != 3 or ids.shape[:2] != hidden.shape[:2]:
            raise ValueError(f"{what}: hidden must be [tokens, {n}, H] and ids [tokens, {n}, K]; "
                             f"got {hidden.shape} and {ids.shape}")
        H = self.routers[self.layers[0]].weight.shape[1]
        if hidden.shape[2] != H:
            raise ValueError(f"{what}: hidden has width {hidden.shape[2]}, the routers expect {H}")
        return hidden, ids

    def fit_heads(self, hidden, ids, depth: int = 2, **fit_kw) -> None:
        """Train a PredictorHead for every (L, d <= depth) pair on a recorded trace: router inputs hidden
        [T, n, H] and chosen ids [T, n, K], layer j of the arrays = the j-th router key. Fit on text other
        than what you evaluate on. fit_kw: PredictorHead.fit's options."""
        hidden, ids = self._check_trace(hidden, ids, "fit_heads")
        dev = self.routers[self.layers[0]].weight.device
        for j, layer in enumerate(self.layers):
            x = torch.from_numpy(hidden[:, j])
            for d in range(1, depth + 1):
                if j + d >= len(self.layers):
                    break
                tgt = self.layers[j + d]
                head = PredictorHead.fit(x, self.prior(layer, tgt, x).cpu(), ids[:, j + d], **fit_kw)
                self.heads[(layer, tgt)] = head.to(dev)

    def save_heads(self, path) -> str:
        """Write the learned heads to an .npz (keyed by MoE-layer index and lookahead, so a file fitted on a
        trace loads into the engine's model-layer-keyed predictor)."""
        if not self.heads:
            raise ValueError(f"{path}: no learned heads to save (fit_heads or load_heads first)")
        pairs, tensors = [], [[], [], [], [], []]
        for (layer, tgt), head in sorted(self.heads.items()):
            pairs.append((self._index[layer], self._index[tgt] - self._index[layer]))
            for lst, a in zip(tensors, (head.w1, head.b1, head.w2, head.b2, head.scale)):
                lst.append(a.detach().float().cpu().numpy())
        if len({a.shape for a in tensors[0]}) != 1:
            raise ValueError(f"{path}: heads differ in shape; save_heads stores one width")
        first = self.routers[self.layers[0]]
        np.savez(path, version=np.int64(HEADS_VERSION), n_layers=np.int64(len(self.layers)),
                 top_k=np.int64(first.top_k), pairs=np.array(pairs, np.int64),
                 **{k: np.stack(v) for k, v in zip(("w1", "b1", "w2", "b2", "scale"), tensors)})
        return str(path)

    def load_heads(self, path) -> None:
        """Read heads written by save_heads; checks that they fit these routers (layers, experts, width)."""
        src = str(path)
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except (ValueError, OSError) as e:
            raise ValueError(f"{src}: not a readable predictor-heads .npz ({e})") from None
        missing = [k for k in ("version", "n_layers", "pairs", "w1", "b1", "w2", "b2", "scale") if k not in arrays]
        if missing:
            raise ValueError(f"{src}: predictor heads lack array(s) {', '.join(missing)}")
        if int(arrays["version"]) != HEADS_VERSION:
            raise ValueError(f"{src}: predictor heads version {int(arrays['version'])}, expected {HEADS_VERSION}")
        n = len(self.layers)
        if int(arrays["n_layers"]) != n:
            raise ValueError(f"{src}: heads were fitted for {int(arrays['n_layers'])} MoE layers, "
                             f"this model has {n}")
        E, H = self.routers[self.layers[0]].weight.shape
        pairs = np.asarray(arrays["pairs"])
        P = len(pairs)
        w1, b1, w2, b2, scale = (np.asarray(arrays[k], np.float32) for k in ("w1", "b1", "w2", "b2", "scale"))
        if (pairs.ndim != 2 or pairs.shape[1] != 2 or w1.ndim != 3 or w1.shape[0] != P or w1.shape[2] != H
                or w2.shape != (P, E, w1.shape[1]) or b2.shape != (P, E) or b1.shape != w1.shape[:2]
                or scale.shape != (P, 1)):
            raise ValueError(f"{src}: head arrays do not fit {P} pairs of {E} experts x hidden {H}: pairs "
                             f"{pairs.shape}, w1 {w1.shape}, b1 {b1.shape}, w2 {w2.shape}, b2 {b2.shape}, "
                             f"scale {scale.shape}")
        dev = self.routers[self.layers[0]].weight.device
        heads = {}
        for i, (j, d) in enumerate(pairs.tolist()):
            if not (0 <= j < n and d >= 1 and j + d < n):
                raise ValueError(f"{src}: pair {i} (layer index {j}, lookahead {d}) is outside {n} MoE layers")
            heads[(self.layers[j], self.layers[j + d])] = PredictorHead(w1[i], b1[i], w2[i], b2[i], scale[i]).to(dev)
        self.heads.update(heads)

    def head_depth(self) -> int:
        """The largest d such that every MoE layer with a layer d ahead has a learned head for it (and for each
        smaller lookahead); 0 without heads."""
        n, depth = len(self.layers), 0
        for d in range(1, n):
            if not all((self.layers[j], self.layers[j + d]) in self.heads for j in range(n - d)):
                break
            depth = d
        return depth

    def recall(self, hidden, ids, d: int = 1) -> float:
        """Recall@top-k of the d-layer-ahead prediction over a trace: hidden [T, n, H] router inputs and true
        ids [T, n, K], with layer j of the arrays = the j-th router key."""
        hidden, ids = self._check_trace(hidden, ids, "recall")
        n = len(self.layers)
        preds, trues = [], []
        for j in range(n - d):
            preds.append(self.predict(self.layers[j], torch.from_numpy(hidden[:, j]), d).cpu().numpy())
            trues.append(ids[:, j + d])
        if not preds:
            raise ValueError(f"recall: lookahead {d} leaves no layer pairs among {n} layers")
        return recall_at_k(np.stack(preds), np.stack(trues))


@dataclass(frozen=True)
class CostModel:
    """Copy-vs-CPU decision for one expert. cpu_expert_ms: CPU time to run one expert at batch 1
    (the roofline value is expert_bytes / RAM bandwidth; pass a measured one when known)."""
    expert_bytes: int
    pcie_gbps: float
    cpu_expert_ms: float

    def __post_init__(self):
        if self.expert_bytes <= 0 or self.pcie_gbps <= 0 or self.cpu_expert_ms <= 0:
            raise ValueError(f"CostModel: expert_bytes, pcie_gbps and cpu_expert_ms must be positive, got "
                             f"{self.expert_bytes}, {self.pcie_gbps}, {self.cpu_expert_ms}")

    @classmethod
    def from_bandwidth(cls, expert_bytes: int, pcie_gbps: float, ram_gbps: float) -> "CostModel":
        return cls(expert_bytes, pcie_gbps, expert_bytes / (ram_gbps * 1e9) * 1e3)

    @property
    def copy_ms(self) -> float:
        return self.expert_bytes / (self.pcie_gbps * 1e9) * 1e3

    @property
    def break_even_uses(self) -> float:
        return self.copy_ms / self.cpu_expert_ms

    def worth_copying(self, expected_uses: float) -> bool:
        return expected_uses * self.cpu_expert_ms > self.copy_ms


class Link:
    """The host -> device copy link, carrying one copy at a time (the engine's copier thread, and the simulator's
    model of it): `send` queues a copy issued at `now` (seconds on any clock) and returns when it lands;
    `backlog` is how long a copy issued at `now` would wait."""
    __slots__ = ("free",)

    def __init__(self):
        self.free = 0.0

    def send(self, now: float, duration: float) -> float:
        self.free = max(now, self.free) + duration
        return self.free

    def backlog(self, now: float) -> float:
        return max(0.0, self.free - now)


class Prefetcher:
    """Decides copies into `cache`. Expected uses of an expert = predicted uses this token (x `confidence`)
    + its decayed use count (the cache's estimate of near-future uses). cost_model None admits whatever the
    cache policy accepts.

    Predictions are ids [T, K] (each counts one use) or expected uses [T, E] (a learned head's probabilities);
    an expert is a prefetch candidate when its predicted uses reach `min_uses`, at most `max_copies` per
    target layer and call; candidates of every target layer go best first by the cache's priority with the
    prediction (decayed uses + predict_weight x predicted uses). `max_backlog_ms`: skip prefetches while the
    copy link is busy longer than this; `lead_ms` (plan_copies): skip a copy that cannot land before its
    target layer starts (it would reach the GPU after the CPU has run the expert, and hold up the copies that
    can still make it). The caller passes the backlog it sees. `timing` (default: cost_model): the copy and
    CPU-expert times `lead_times` and the landing check use. `demand` False: no demand admissions.
    `defer_demand`: a layer's misses are admitted at the next call of after_access (the caller makes it
    right after the next layer's plan_copies, when the first layer has ended), so the next layer's
    prefetches, which can still land for this token, go on the link before them."""

    def __init__(self, cache: ExpertCache, cost_model: CostModel | None = None, *, confidence: float = 1.0,
                 min_uses: float = 0.0, max_copies: int | None = None, max_backlog_ms: float | None = None,
                 max_demand_backlog_ms: float | None = None, timing: CostModel | None = None, demand: bool = True,
                 defer_demand: bool = False):
        self.cache, self.cost_model, self.confidence = cache, cost_model, confidence
        self.min_uses, self.max_copies, self.max_backlog_ms = min_uses, max_copies, max_backlog_ms
        self.max_demand_backlog_ms = max_demand_backlog_ms
        self.timing, self.demand, self.defer_demand = timing, bool(demand), bool(defer_demand)
        self._pending: tuple[int, list[int]] | None = None     # deferred misses: (layer, expert ids)
        self.declined_by_cost = self.declined_by_link = self.declined_late = 0

    @staticmethod
    def _uses(pred) -> tuple[np.ndarray, np.ndarray]:
        """(expert ids, predicted uses) of one target's prediction: ids [T, K] or expected uses [T, E]."""
        a = _as_numpy(pred)
        if np.issubdtype(a.dtype, np.floating):
            uses = a.reshape(-1, a.shape[-1]).sum(0).astype(np.float64)
            return np.arange(uses.size), uses
        uniq, counts = np.unique(a.reshape(-1), return_counts=True)
        return uniq, counts.astype(np.float64)

    def lead_times(self, layer: int, layer_ms: float, predicted, fixed_ms: float = 0.0) -> dict[int, float]:
        """{target layer: ms from now until it starts}: the current layer (MoE index `layer`) lasts `layer_ms`;
        each layer in between lasts fixed_ms + its predicted misses (predicted uses of non-resident experts)
        x the CPU time of one expert; a layer in between without a prediction counts as all misses. Needs
        `timing` (or a cost model)."""
        t = self.timing or self.cost_model
        if t is None:
            raise ValueError("Prefetcher.lead_times: no timing (CostModel) to estimate layer times with")
        est = {}
        for tgt, pred in predicted.items():
            ids, uses = self._uses(pred)
            resident = self.cache.slot_of(tgt, ids) >= 0
            est[tgt] = fixed_ms + float((uses * ~resident).sum()) * t.cpu_expert_ms
        out = {}
        for tgt in predicted:
            ms = layer_ms
            for j in range(layer + 1, tgt):      # no prediction for j: as many misses as the largest one
                ms += est[j] if j in est else (
                    fixed_ms + max(float(self._uses(p)[1].sum()) for p in predicted.values()) * t.cpu_expert_ms)
            out[tgt] = ms
        return out

    def plan_copies(self, layer: int, predicted, backlog_ms: float = 0.0,
                    lead_ms: Mapping[int, float] | None = None) -> list[tuple[int, int]]:
        """`predicted`: {target_layer: ids [T, K] or expected uses [T, E]} (RoutingPredictor.predict_ahead).
        Admits the experts worth copying and returns their (layer, expert) keys in the order the link should
        carry them; the caller copies each into `cache.slot_of`. backlog_ms: how long the copy link is already busy;
        lead_ms: {target layer: ms until it starts} (see lead_times), None: no landing check."""
        del layer  # the source layer only matters to the predictor
        cands = []
        for tgt, pred in predicted.items():
            ids, uses = self._uses(pred)
            keep = uses >= max(self.min_uses, 1e-9)
            for e, c in zip(ids[keep].tolist(), uses[keep].tolist()):
                score = self.confidence * c
                if self.cache.resident(tgt, e) is not None:
                    self.cache.note_prediction(tgt, [e], score)   # protect it from eviction this token
                    continue
                benefit = self.cache.expected_uses(tgt, e) + self.cache.predict_weight * score
                cands.append((-benefit, len(cands), tgt, e, score))
        cands.sort()
        copies, per_target = [], {}
        # each planned copy delays the next by its copy time (known to a cost model, or to `timing` when the
        # landing check needs it)
        t = self.cost_model or (self.timing if lead_ms else None)
        copy_ms = None if t is None else t.copy_ms
        for _, _, tgt, e, score in cands:
            if self.max_copies is not None and per_target.get(tgt, 0) >= self.max_copies:
                continue
            if self.max_backlog_ms is not None and backlog_ms > self.max_backlog_ms:
                self.declined_by_link += 1
                continue
            # a tie (the copy landing exactly as its layer starts) counts as late: floating-point sums of
            # layer times decide it either way, and a planned copy must not depend on their rounding
            if lead_ms is not None and copy_ms is not None and backlog_ms + copy_ms >= lead_ms.get(tgt, np.inf) - 1e-6:
                self.declined_late += 1
                continue
            if self._admit(tgt, e, score):
                copies.append((tgt, e))
                per_target[tgt] = per_target.get(tgt, 0) + 1
                if copy_ms is not None:
                    backlog_ms += copy_ms
        return copies

    def after_access(self, layer: int, ids, hit_mask, backlog_ms: float = 0.0, defer: bool | None = None,
                     on_device=()) -> list[tuple[int, int]]:
        """Demand admission: experts of `ids` that missed (the CPU ran them) and are worth keeping, while the
        copy link's backlog stays within max_demand_backlog_ms. Nothing when `demand` is off. With
        defer_demand (or `defer` True), admits the misses of the previous call instead and keeps these for the
        next; `defer` False admits both now (a layer whose experts must be decided at once). `on_device`:
        experts of `layer` already on the device (streamed): their admission takes no link time."""
        if not self.demand:
            self._pending = None
            return []
        ids = _as_numpy(ids).reshape(-1)
        missed = np.unique(ids[~_as_numpy(hit_mask).astype(bool).reshape(-1)]).tolist()
        groups = [(layer, missed)]
        if self._pending is not None:              # the previous call's misses, unless admitted meanwhile
            l0, m0 = self._pending
            groups.insert(0, (l0, [e for e in m0 if self.cache.resident(l0, e) is None]))
            self._pending = None
        if (self.defer_demand if defer is None else defer):
            self._pending = groups.pop()
        out = []
        copy_ms = self.cost_model.copy_ms if self.cost_model is not None else None   # as the link gate always has
        free = set(on_device)
        for g_layer, missed in groups:
            if self.max_demand_backlog_ms is not None and len(missed) > 1 and self.cache.policy == "score":
                missed.sort(key=lambda e: -self.cache.priority(g_layer, e))   # the link may take only some: best first
            for e in missed:
                linkless = g_layer == layer and e in free
                if (not linkless and self.max_demand_backlog_ms is not None
                        and backlog_ms > self.max_demand_backlog_ms):
                    self.declined_by_link += 1
                    continue
                if self._admit(g_layer, int(e), 0.0):
                    out.append((g_layer, int(e)))
                    if copy_ms is not None and not linkless:
                        backlog_ms += copy_ms
        return out

    def _admit(self, layer: int, e: int, predicted: float) -> bool:
        if self.cost_model is not None:
            expected = predicted + self.cache.expected_uses(layer, e)
            if not self.cost_model.worth_copying(expected):
                self.declined_by_cost += 1
                return False
        return self.cache.admit(layer, e, predicted_score=predicted) is not None
