"""Replay a routing trace through the expert cache + prefetcher and estimate decode time.

    python -m hybrid_k2.sim TRACE.npz --slots N --pcie-gbps X --ram-gbps Y --policy score|lru|static|belady
                            [--lookahead d] [--heads HEADS.npz] [--expert-bytes B]

Trace (.npz): `ids` integer [tokens, moe_layers, top_k] (written as int16); optional `weights` [same],
`n_experts` (scalar), `hidden` [tokens, moe_layers, H] router inputs and `routers` [moe_layers, E, H]
(+ optional `router_bias` [moe_layers, E], `norms` [moe_layers, H] post_attention_layernorm weights,
`n_group`, `topk_group` scalars) for predictor replay.

Timing model, per token and MoE layer, one decode token at a time:
  cpu_s  = expert_bytes / ram_gbps          one expert run by the CPU (memory-bound at batch 1)
  copy_s = expert_bytes / pcie_gbps         one host->VRAM copy; copies queue on one link
  gpu_s  = expert_bytes / gpu_gbps          one cached expert on the GPU (0 unless --gpu-gbps)
  layer  = gpu_layer_s + max(n_cpu * cpu_s, n_gpu * gpu_s)
The CPU runs the misses while the GPU runs the hits (concurrently, as the engine does). Only an expert whose
copy has landed when its layer starts counts as a hit and runs on the GPU; a resident expert whose copy has
not landed goes to the CPU ('late') and its copy lands for later use, as the engine does (HybridExperts: the
fill's event has not completed -> the kernels run it). Per layer, as in the engine: the cache records the
access, then the prefetches for layers L+1..L+d are planned and issued at the start of layer L (with
land_check, only those the link can land before their layer starts), and demand copies of the missed experts
when the layer ends. The CPU-only baseline is gpu_layer_s + top_k * cpu_s per layer. Copies are assumed not
to slow the CPU's RAM reads.
The first `warmup` tokens train the policies (and form the static profile) and are not measured; Belady
instead starts the measured window with the optimal preload (its free warm start).
"""
from __future__ import annotations

import argparse
import os
import sys
import zipfile
import zlib
from dataclasses import dataclass, field

import numpy as np

from .experts.cache import POLICIES, ExpertCache
from .experts.prefetch import CostModel, Link, Prefetcher, RoutingPredictor


class TraceError(ValueError):
    """A routing trace is malformed; the message names the file and the array."""


@dataclass
class Trace:
    ids: np.ndarray                         # int64 [tokens, layers, top_k]
    n_experts: int
    weights: np.ndarray | None = None
    hidden: np.ndarray | None = None        # float32 [tokens, layers, H]
    routers: np.ndarray | None = None       # float32 [layers, E, H]
    router_bias: np.ndarray | None = None   # float32 [layers, E]
    norms: np.ndarray | None = None         # float32 [layers, H] router-input RMSNorm weights
    n_group: int = 1
    topk_group: int = 1
    source: str = "<trace>"

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.ids.shape

    def predictor(self) -> RoutingPredictor | None:
        if self.hidden is None or self.routers is None:
            return None
        return RoutingPredictor.from_weights(self.routers, self.router_bias, top_k=self.shape[2],
                                             n_group=self.n_group, topk_group=self.topk_group,
                                             norm_weights=self.norms)


def _scalar_int(arrays, name, source, default):
    if name not in arrays:
        return default
    v = np.asarray(arrays[name])
    if v.size != 1 or not np.issubdtype(v.dtype, np.integer):
        raise TraceError(f"{source}: array {name!r} must be one integer, got dtype {v.dtype} shape {v.shape}")
    return int(v.reshape(()))


def _floats(arrays, name, source, shape, needs=None):
    """arrays[name] as float32 (None when absent), checked to be float of `shape` (a name: any extent)."""
    if name not in arrays:
        return None
    if needs is not None and needs not in arrays:
        raise TraceError(f"{source}: array {name!r} given without {needs!r}")
    a = np.asarray(arrays[name])
    if (a.ndim != len(shape) or not np.issubdtype(a.dtype, np.floating)
            or any(isinstance(want, int) and want != n for want, n in zip(shape, a.shape))):
        raise TraceError(f"{source}: array {name!r} must be float [{', '.join(map(str, shape))}], got {a.dtype} "
                         f"{a.shape}")
    return a.astype(np.float32)


def validate_trace(arrays, source: str = "<trace>") -> Trace:
    """Check a mapping of arrays (an opened .npz or a dict) and return a Trace."""
    if "ids" not in arrays:
        raise TraceError(f"{source}: no 'ids' array (expected int16 [tokens, moe_layers, top_k]); "
                         f"found {sorted(arrays.keys())}")
    ids = np.asarray(arrays["ids"])
    if not np.issubdtype(ids.dtype, np.integer):
        raise TraceError(f"{source}: array 'ids' must be an integer array (int16), got dtype {ids.dtype}")
    if ids.ndim != 3:
        raise TraceError(f"{source}: array 'ids' must have rank 3 [tokens, moe_layers, top_k], got shape {ids.shape}")
    if 0 in ids.shape:
        raise TraceError(f"{source}: array 'ids' is empty (shape {ids.shape})")
    T, L, K = ids.shape
    routers = _floats(arrays, "routers", source, (L, "n_experts", "hidden"))
    n_experts = _scalar_int(arrays, "n_experts", source, None)
    if routers is not None:
        if n_experts is not None and n_experts != routers.shape[1]:
            raise TraceError(f"{source}: 'n_experts' = {n_experts} but 'routers' has {routers.shape[1]} experts")
        n_experts = routers.shape[1]
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0:
        raise TraceError(f"{source}: array 'ids' has negative expert ids (min {lo})")
    if n_experts is None:
        n_experts = hi + 1
    elif hi >= n_experts:
        raise TraceError(f"{source}: array 'ids' has expert id {hi}, out of range for {n_experts} experts")
    if K > n_experts:
        raise TraceError(f"{source}: array 'ids' has top_k {K} > {n_experts} experts")
    weights = _floats(arrays, "weights", source, ids.shape)
    hidden = _floats(arrays, "hidden", source, (T, L, "hidden"))
    if hidden is not None and routers is not None and routers.shape[2] != hidden.shape[2]:
        raise TraceError(f"{source}: 'hidden' has width {hidden.shape[2]} but 'routers' expects {routers.shape[2]}")
    H = "hidden" if routers is None else routers.shape[2]
    bias = _floats(arrays, "router_bias", source, (L, n_experts), needs="routers")
    norms = _floats(arrays, "norms", source, (L, H), needs="routers")
    n_group = _scalar_int(arrays, "n_group", source, 1)
    topk_group = _scalar_int(arrays, "topk_group", source, 1)
    if n_group < 1 or n_experts % n_group or not 1 <= topk_group <= n_group:
        raise TraceError(f"{source}: n_group {n_group} / topk_group {topk_group} do not fit {n_experts} experts")
    return Trace(ids=ids.astype(np.int64), n_experts=n_experts, weights=weights, hidden=hidden, routers=routers,
                 router_bias=bias, norms=norms, n_group=n_group, topk_group=topk_group, source=source)


def load_trace(path: str | os.PathLike) -> Trace:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise TraceError(f"{path}: no such trace file")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    # what a damaged .npz raises from zipfile, zlib and numpy's .npy reader: a bad header, CRC or deflate
    # stream, a truncated member, an unsupported or encrypted entry, a shape larger than memory
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error, NotImplementedError, RuntimeError,
            MemoryError) as e:
        raise TraceError(f"{path}: not a readable .npz trace ({type(e).__name__}: {e})") from None
    return validate_trace(arrays, source=path)


@dataclass
class SimResult:
    policy: str
    slots: int
    tokens: int                  # measured tokens
    accesses: int
    hits: int                    # resident with the copy landed when the layer started: run from VRAM
    late: int                    # resident but the copy had not landed: run on the CPU
    admissions: int
    evictions: int
    bytes_copied: int
    time_s: float                # modelled decode time of the measured tokens
    cpu_only_time_s: float
    prefetches: int = 0          # admissions made by the predictor (the rest are demand admissions)
    declined_late: int = 0       # prefetches not planned: they could not land before their layer
    recall: dict = field(default_factory=dict)   # {lookahead: recall@top-k}

    @property
    def hit_rate(self) -> float:
        """Share of expert uses whose expert was in VRAM (copy complete) when its layer started."""
        return self.hits / self.accesses if self.accesses else 0.0

    @property
    def resident_rate(self) -> float:
        """Share of uses whose expert held a slot at all, landed or not (the cache-only view)."""
        return (self.hits + self.late) / self.accesses if self.accesses else 0.0

    @property
    def speedup(self) -> float:
        return self.cpu_only_time_s / self.time_s if self.time_s else float("inf")

    def render(self) -> str:
        n = max(self.tokens, 1)
        per_tok, base = 1e3 * self.time_s / n, 1e3 * self.cpu_only_time_s / n
        lines = [
            f"policy {self.policy}, {self.slots} slots, {self.tokens} measured tokens, {self.accesses} expert uses",
            f"hit rate        {100 * self.hit_rate:.2f}% (copy landed in time; resident incl. unlanded "
            f"{100 * self.resident_rate:.2f}%: late {self.late})",
            f"copies          {self.admissions} admitted ({self.prefetches} prefetched), {self.evictions} evicted, "
            f"{self.bytes_copied / 2**30:.2f} GiB copied ({self.bytes_copied / n / 2**20:.1f} MiB/token); "
            f"{self.declined_late} prefetch candidates declined as too late to land",
            f"decode estimate {per_tok:.3f} ms/token ({1e3 / per_tok if per_tok else float('inf'):.2f} tok/s) vs "
            f"CPU-only {base:.3f} ms/token ({1e3 / base if base else float('inf'):.2f} tok/s): x{self.speedup:.2f}",
        ]
        for d, r in sorted(self.recall.items()):
            lines.append(f"predictor recall@top-k, lookahead {d}: {100 * r:.1f}%")
        return "\n".join(lines)


def predicted_uses(trace: Trace, predictor, lookahead: int) -> dict[int, np.ndarray]:
    """{d: predictions for d layers ahead}: ids [tokens, layers, K] for the oracle, expected uses
    [tokens, layers, E] for a RoutingPredictor (rows for the last d layers are unused)."""
    T, L, K = trace.shape
    out = {}
    if isinstance(predictor, str) and predictor == "oracle":
        for d in range(1, lookahead + 1):
            p = np.zeros_like(trace.ids)
            p[:, :L - d] = trace.ids[:, d:]
            out[d] = p
        return out
    rp = predictor if isinstance(predictor, RoutingPredictor) else trace.predictor()
    if rp is None or trace.hidden is None:
        raise TraceError(f"{trace.source}: predictor 'router' needs the 'hidden' and 'routers' arrays")
    if rp.layers != list(range(L)):
        raise ValueError(f"simulate: the predictor's layers {rp.layers} are not the trace's 0..{L - 1}")
    import torch
    for d in range(1, lookahead + 1):
        p = np.zeros((T, L, trace.n_experts), np.float32)
        for l in range(L - d):
            p[:, l] = rp.predict_uses(l, torch.from_numpy(trace.hidden[:, l]), d).cpu().numpy()
        out[d] = p
    return out


def simulate(trace, *, slots: int, policy: str = "score", pcie_gbps: float = 25.0, ram_gbps: float = 100.0,
             expert_bytes: int = 24_772_608, gpu_gbps: float | None = None, gpu_layer_ms: float = 0.0,
             lookahead: int = 0, predictor="auto", heads=None, warmup: int | None = None, decay: float = 0.98,
             cost_model: bool = True, cpu_expert_ms: float | None = None, confidence: float = 1.0,
             min_uses: float = 0.0, max_copies: int | None = None, max_backlog_ms: float | None = None,
             max_demand_backlog_ms: float | None = None, predict_weight: float = 1.0,
             margin: float = 0.0, prefill_fit: int = 0, prefill_ridge: float = 0.3, land_check: bool = False,
             demand: bool = True, defer_demand: bool = False) -> SimResult:
    """Replay `trace` (a Trace, a .npz path or a dict of arrays); see the module docstring for the model.

    predictor: 'auto' (router replay when the trace has hidden + routers, else none), 'router', 'oracle'
    (the true future ids: an upper bound), 'none', or a RoutingPredictor keyed 0..layers-1 (e.g. with
    learned heads). heads: a predictor-heads .npz (RoutingPredictor.save_heads) loaded into the trace's
    routers. Belady never prefetches (demand-only optimum). cost_model False admits every expert the cache
    policy accepts. min_uses / max_copies / max_backlog_ms / max_demand_backlog_ms / confidence: the
    Prefetcher's gates; predict_weight / margin: the score policy's weight on predicted uses and its
    admission margin. land_check: plan a prefetch only if the modelled link can land it before its layer
    starts (Prefetcher.lead_times). demand: admit missed experts (demand copies). defer_demand: a layer's
    demand copies are decided when it has ended, after the next layer's prefetches (the same issue time).
    The result's `recall` is that of the predictor replayed, over the whole trace.
    prefill_fit: fit the router predictor's ridge corrections on the first `prefill_fit` tokens (<= warmup,
    never measured tokens), as HybridConfig.fit_on_prefill does on a prompt.
    """
    if not isinstance(trace, Trace):
        trace = load_trace(trace) if isinstance(trace, (str, os.PathLike)) else validate_trace(trace)
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}")
    for name, v in (("pcie_gbps", pcie_gbps), ("ram_gbps", ram_gbps), ("expert_bytes", expert_bytes)):
        if not v > 0:
            raise ValueError(f"{name} must be positive, got {v!r}")
    if not isinstance(predictor, RoutingPredictor) and predictor not in ("auto", "router", "oracle", "none"):
        raise ValueError(f"predictor must be auto, router, oracle, none or a RoutingPredictor, got {predictor!r}")
    T, L, K = trace.shape
    E = trace.n_experts
    if warmup is None:
        warmup = T // 10
    if not 0 <= warmup < T:
        raise ValueError(f"warmup must be in 0..{T - 1} tokens, got {warmup}")
    if lookahead < 0:
        raise ValueError(f"lookahead must be >= 0, got {lookahead}")
    has_router_data = trace.hidden is not None and trace.routers is not None
    if heads is not None:
        if isinstance(predictor, RoutingPredictor) or predictor in ("oracle", "none"):
            raise ValueError("simulate: heads go with predictor 'auto' or 'router'")
        rp = trace.predictor()
        if rp is None:
            raise TraceError(f"{trace.source}: learned heads need the trace's 'hidden' and 'routers' arrays")
        rp.load_heads(heads)
        predictor = rp
    if predictor == "auto":
        predictor = "router" if has_router_data else "none"
    if prefill_fit:
        if not 0 < prefill_fit <= warmup:
            raise ValueError(f"prefill_fit must be in 1..warmup ({warmup}) tokens, got {prefill_fit}")
        if predictor != "router" or heads is not None:
            raise ValueError("simulate: prefill_fit goes with the trace's router predictor (no heads)")
        predictor = trace.predictor()
        predictor.fit_corrections(trace.hidden[:prefill_fit].swapaxes(0, 1), max(lookahead, 1), prefill_ridge)
    if policy == "belady" or lookahead == 0:
        predictor = "none"
    preds = predicted_uses(trace, predictor, lookahead) if not (isinstance(predictor, str) and
                                                                predictor == "none") else {}

    cpu_s = (cpu_expert_ms / 1e3) if cpu_expert_ms else expert_bytes / (ram_gbps * 1e9)
    copy_s = expert_bytes / (pcie_gbps * 1e9)
    gpu_s = expert_bytes / (gpu_gbps * 1e9) if gpu_gbps else 0.0
    layer_s = gpu_layer_ms / 1e3

    start = warmup
    kw = dict(decay=decay, expert_bytes=expert_bytes, predict_weight=predict_weight, margin=margin)
    if policy == "belady":
        cache = ExpertCache(slots, L, E, "belady", future=trace.ids[start:], **kw)
        cache.warm_start()
        first = start
    elif policy == "static":
        counts = np.zeros((L, E))
        prof = trace.ids[:warmup] if warmup else trace.ids   # no warm-up: profile the whole trace (oracle-ish)
        np.add.at(counts, (np.broadcast_to(np.arange(L)[None, :, None], prof.shape), prof), 1)
        cache = ExpertCache(slots, L, E, "static", profile=counts, **kw)
        first = warmup
    else:
        cache = ExpertCache(slots, L, E, policy, **kw)
        first = 0
    timing = CostModel(expert_bytes, pcie_gbps, cpu_s * 1e3)
    pf = Prefetcher(cache, timing if cost_model and policy != "belady" else None, confidence=confidence,
                    min_uses=min_uses, max_copies=max_copies, max_backlog_ms=max_backlog_ms, timing=timing,
                    max_demand_backlog_ms=max_demand_backlog_ms, demand=demand, defer_demand=defer_demand)

    now = 0.0
    link = Link()
    ready = np.zeros(L * E)          # when each key's latest copy lands

    def send(copies, now) -> int:
        for tl, e in copies:
            ready[tl * E + e] = link.send(now, copy_s)
        return len(copies)
    cache.set_landed(lambda keys: ready[keys] <= now)   # landed by the time the cache asks
    late = prefetches = 0
    measured_time = 0.0
    for t in range(first, T):
        if t == start:
            cache.reset_stats()
            late, prefetches, measured_time = 0, 0, 0.0
            pf.declined_by_cost = pf.declined_by_link = pf.declined_late = 0
        t_token = now
        for l in range(L):
            ids = trace.ids[t, l]
            resident = cache.access(l, ids)
            keys = l * E + ids
            landed = resident & (ready[keys] <= now)         # the rest run on the CPU, their copies land later
            n_gpu = int(landed.sum())
            late += int(resident.sum()) - n_gpu
            dt = layer_s + max((len(ids) - n_gpu) * cpu_s, n_gpu * gpu_s)
            ahead = {l + d: p[t, l][None] for d, p in preds.items() if l + d < L}
            if ahead:                                 # prefetch for l + 1..l + d, issued at the start of layer l
                lead = pf.lead_times(l, 1e3 * dt, ahead, fixed_ms=1e3 * layer_s) if land_check else None
                prefetches += send(pf.plan_copies(l, ahead, backlog_ms=1e3 * link.backlog(now), lead_ms=lead), now)
            if defer_demand:                          # the previous layer's misses, now that it has ended
                send(pf.after_access(l, ids, resident, backlog_ms=1e3 * link.backlog(now)), now)
            now += dt
            if not defer_demand:                      # this layer's misses, as it ends
                send(pf.after_access(l, ids, resident, backlog_ms=1e3 * link.backlog(now)), now)
        cache.next_token()
        if t >= start:
            measured_time += now - t_token

    n_meas = T - start
    cpu_only = n_meas * L * (layer_s + K * cpu_s)
    recall = {}
    if has_router_data:
        rp = predictor if isinstance(predictor, RoutingPredictor) else trace.predictor()
        for d in range(1, max(2, lookahead) + 1):
            if L > d:
                recall[d] = rp.recall(trace.hidden, trace.ids, d)
    s = cache.stats()
    return SimResult(policy=policy, slots=slots, tokens=n_meas, accesses=s["hits"] + s["misses"],
                     hits=s["hits"] - late, late=late, admissions=s["admissions"],
                     evictions=s["evictions"], bytes_copied=s["bytes_copied"], time_s=measured_time,
                     cpu_only_time_s=cpu_only, prefetches=prefetches, declined_late=pf.declined_late, recall=recall)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m hybrid_k2.sim", description="Replay a routing trace through "
                                "the expert cache and prefetcher; print hit rate, copies and decode time.")
    p.add_argument("trace", help=".npz with ids int16 [tokens, moe_layers, top_k]")
    p.add_argument("--slots", type=int, required=True, help="VRAM expert slots")
    p.add_argument("--pcie-gbps", type=float, required=True)
    p.add_argument("--ram-gbps", type=float, required=True)
    p.add_argument("--policy", default="score", choices=POLICIES)
    p.add_argument("--lookahead", type=int, default=0, help="prefetch this many MoE layers ahead (0 = off)")
    p.add_argument("--predictor", default="auto", choices=["auto", "router", "oracle", "none"])
    p.add_argument("--heads", default=None, help="learned predictor heads .npz (RoutingPredictor.save_heads)")
    p.add_argument("--min-uses", type=float, default=0.0, help="prefetch only experts predicted this many uses")
    p.add_argument("--max-copies", type=int, default=None, help="prefetches per target layer and token")
    p.add_argument("--max-backlog-ms", type=float, default=None, help="skip prefetches while the link is "
                   "busy longer than this")
    p.add_argument("--max-demand-backlog-ms", type=float, default=None, help="skip demand copies while the link "
                   "is busy longer than this")
    p.add_argument("--prefill-fit", type=int, default=0, help="fit the router predictor's ridge corrections on "
                   "this many warm-up tokens first (as the engine does on a prompt)")
    p.add_argument("--expert-bytes", type=int, default=24_772_608, help="bytes of one expert (default: Kimi K2 q4_0)")
    p.add_argument("--gpu-gbps", type=float, default=None, help="GPU bandwidth for cached experts (default: free)")
    p.add_argument("--gpu-layer-ms", type=float, default=0.0, help="non-expert GPU time per MoE layer")
    p.add_argument("--cpu-expert-ms", type=float, default=None, help="measured CPU time per expert "
                   "(default: expert bytes / RAM bandwidth)")
    p.add_argument("--warmup", type=int, default=None, help="unmeasured warm-up tokens (default: 10%%)")
    p.add_argument("--decay", type=float, default=0.98, help="score policy: frequency decay per token")
    p.add_argument("--predict-weight", type=float, default=1.0, help="score policy: weight of a predicted use")
    p.add_argument("--land-check", action="store_true", help="prefetch only what can land before its layer")
    p.add_argument("--no-demand", action="store_true", help="no demand copies of missed experts")
    p.add_argument("--defer-demand", action="store_true", help="decide a layer's demand copies after the next "
                   "layer's prefetches")
    p.add_argument("--margin", type=float, default=0.0, help="score policy: admission margin (decayed uses)")
    p.add_argument("--admit-all", action="store_true", help="no cost model: admit whatever the policy accepts")
    return p


def main(argv=None) -> int:
    kw = vars(build_parser().parse_args(argv))
    trace = kw.pop("trace")
    kw["demand"], kw["cost_model"] = not kw.pop("no_demand"), not kw.pop("admit_all")   # the flags say "off"
    try:
        r = simulate(trace, **kw)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{trace}: {r.tokens} tokens measured")
    print(r.render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
