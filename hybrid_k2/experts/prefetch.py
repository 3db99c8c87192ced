"""Expert prefetch: predict the next layers' routing, decide which copies pay off, admit them to the cache.

RoutingPredictor  applies the routers of layers L+1..L+d to layer L's router input (the residual stream
                  changes slowly across layers, so the later gates already see roughly their own input);
                  selection is model.Router's (sigmoid + correction bias, group-limited top-k). Router
                  inputs are RMSNorm(h) x the layer's post_attention_layernorm weight w; given those weights,
                  the target router is rescaled by w_{L+d} / w_L so it sees w_{L+d} x RMSNorm(h_L). An optional
                  correction fitted by ridge least squares on recorded (h_L, h_{L+d}) pairs maps h_L to the
                  logits layer L+d would compute from h_{L+d}; it folds into a router weight W + C^T.
CostModel         a copy is worth it when expected uses x CPU time saved per use > copy time.
Prefetcher        ties the two to an ExpertCache: `plan_copies` for predicted ids, `after_access` for
                  demand admission of experts that just missed.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Mapping, Sequence

import numpy as np
import torch

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

    @torch.inference_mode()
    def predict(self, layer: int, hidden: torch.Tensor, d: int = 1) -> torch.Tensor | None:
        """Top-k ids [T, K] for layer L+d from the router input `hidden` [T, H] at layer L."""
        tgt = self.target(layer, d)
        if tgt is None:
            return None
        router = self._corrected.get((layer, tgt)) or self.base_router(layer, tgt)
        h = torch.as_tensor(hidden)
        if h.dim() == 1:
            h = h[None]
        ids, _ = router(h.to(router.weight.device))
        return ids

    def predict_ahead(self, layer: int, hidden: torch.Tensor, depth: int) -> dict[int, torch.Tensor]:
        """{L+d: ids [T, K]} for d = 1..depth, stopping at the last MoE layer."""
        out = {}
        for d in range(1, depth + 1):
            ids = self.predict(layer, hidden, d)
            if ids is None:
                break
            out[self.target(layer, d)] = ids
        return out

    @torch.inference_mode()
    def fit_correction(self, layer: int, d: int, h_src, h_dst, ridge: float = 1e-3) -> None:
        """Fit C [H, E] minimising ||h_src (B + C^T)^T - h_dst W^T||^2 + ridge * N * ||C||^2 from N recorded
        router-input pairs (h_L, h_{L+d}) [N, H], where W is the router of layer L+d and B its `base_router`
        for L; later predictions from L to L+d use B + C^T. The ridge term pulls the fit toward the plain
        predictor when pairs are few."""
        tgt = self.target(layer, d)
        if tgt is None:
            raise ValueError(f"RoutingPredictor: no MoE layer {d} after layer {layer}")
        x = torch.as_tensor(np.asarray(h_src, dtype=np.float64) if not torch.is_tensor(h_src) else h_src).double()
        y = torch.as_tensor(np.asarray(h_dst, dtype=np.float64) if not torch.is_tensor(h_dst) else h_dst).double()
        W = self.routers[tgt].weight.detach().double().cpu()
        B = self.base_router(layer, tgt).weight.detach().double().cpu()
        if x.dim() != 2 or x.shape != y.shape or x.shape[1] != W.shape[1]:
            raise ValueError(f"fit_correction: h_src and h_dst must both be [N, {W.shape[1]}], "
                             f"got {tuple(x.shape)} and {tuple(y.shape)}")
        n, H = x.shape
        resid = y @ W.T - x @ B.T                               # logits the plain predictor misses [N, E]
        gram = x.T @ x + ridge * max(n, 1) * torch.eye(H, dtype=torch.float64)
        C = torch.linalg.solve(gram, x.T @ resid)               # [H, E]
        base = self.routers[tgt]
        self._corrected[(layer, tgt)] = _clone_router(base, (B + C.T).to(base.weight.dtype))

    def clear_corrections(self) -> None:
        self._corrected.clear()

    def recall(self, hidden, ids, d: int = 1) -> float:
        """Recall@top-k of the d-layer-ahead prediction over a trace: hidden [T, n, H] router inputs and true
        ids [T, n, K], with layer j of the arrays = the j-th router key."""
        hidden, ids = np.asarray(hidden, dtype=np.float32), np.asarray(ids)
        n = len(self.layers)
        if hidden.ndim != 3 or hidden.shape[1] != n or ids.shape[:2] != hidden.shape[:2]:
            raise ValueError(f"recall: hidden must be [tokens, {n}, H] and ids [tokens, {n}, K]; "
                             f"got {hidden.shape} and {ids.shape}")
        preds, trues = [], []
        for j in range(n - d):
            preds.append(self.predict(self.layers[j], torch.from_numpy(hidden[:, j]), d).numpy())
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


class Prefetcher:
    """Decides copies into `cache`. Expected uses of an expert = predicted uses this token (x `confidence`,
    the predictor's precision) + its decayed use count (the cache's estimate of near-future uses).
    cost_model None admits whatever the cache policy accepts."""

    def __init__(self, cache: ExpertCache, predictor: RoutingPredictor | None = None,
                 cost_model: CostModel | None = None, *, lookahead: int = 1, confidence: float = 1.0):
        self.cache, self.predictor, self.cost_model = cache, predictor, cost_model
        self.lookahead, self.confidence = lookahead, confidence
        self.declined_by_cost = 0

    def predict(self, layer: int, hidden: torch.Tensor) -> dict[int, torch.Tensor]:
        if self.predictor is None or self.lookahead < 1:
            return {}
        return self.predictor.predict_ahead(layer, hidden, self.lookahead)

    def plan_copies(self, layer: int, predicted) -> list[tuple[int, int]]:
        """`predicted`: {target_layer: ids [T, K]} (as from `predict`). Admits the experts worth copying
        and returns their (layer, expert) keys in order; the caller copies each into `cache.slot_of`."""
        del layer  # the source layer only matters to the predictor
        copies = []
        for tgt, ids in predicted.items():
            uniq, counts = np.unique(_as_numpy(ids).reshape(-1), return_counts=True)
            for e, c in zip(uniq.tolist(), counts.tolist()):
                score = self.confidence * c
                if self.cache.resident(tgt, e) is not None:
                    self.cache.note_prediction(tgt, [e], score)   # protect it from eviction this token
                    continue
                if self._admit(tgt, e, score):
                    copies.append((tgt, e))
        return copies

    def after_access(self, layer: int, ids, hit_mask) -> list[tuple[int, int]]:
        """Demand admission: experts of `ids` that missed (the CPU ran them) and are worth keeping."""
        ids = _as_numpy(ids).reshape(-1)
        missed = np.unique(ids[~_as_numpy(hit_mask).astype(bool).reshape(-1)])
        return [(layer, int(e)) for e in missed.tolist() if self._admit(layer, int(e), 0.0)]

    def _admit(self, layer: int, e: int, predicted: float) -> bool:
        if self.cost_model is not None:
            expected = predicted + self.cache.expected_uses(layer, e)
            if not self.cost_model.worth_copying(expected):
                self.declined_by_cost += 1
                return False
        return self.cache.admit(layer, e, predicted_score=predicted) is not None
