"""Expert cache policies, prefetch predictor/cost model, and the trace simulator."""
import itertools

import numpy as np
import pytest
import torch

from hybrid_k2.experts.cache import ExpertCache
from hybrid_k2.experts.prefetch import CostModel, Prefetcher, RoutingPredictor, recall_at_k
from hybrid_k2.sim import TraceError, load_trace, main as sim_main, simulate, validate_trace


def replay_single(cache, seq, layer=0):
    """One expert per token, admit every miss; returns the hit list."""
    hits = []
    for e in seq:
        hit = bool(cache.access(layer, [e])[0])
        if not hit:
            cache.admit(layer, e)
        hits.append(hit)
        cache.next_token()
    return hits


def skewed_trace(rng, T, L, E, K, alpha=1.1):
    """Zipf-like popularity, a different hot order per layer, K distinct experts per (token, layer)."""
    ids = np.zeros((T, L, K), dtype=np.int16)
    for l in range(L):
        p = 1.0 / np.arange(1, E + 1) ** alpha
        p = p[rng.permutation(E)]
        p /= p.sum()
        for t in range(T):
            ids[t, l] = rng.choice(E, K, replace=False, p=p)
    return ids


# ---- cache policies -------------------------------------------------------------------------------
def test_lru_known_sequence():
    c = ExpertCache(2, 1, 5, "lru", expert_bytes=1000)
    #          a  b  a  c  b  a  b  c
    seq = [0, 1, 0, 2, 1, 0, 1, 2]
    # a,b fill; a hits; c evicts b; b evicts a; a evicts c; b hits; c evicts a
    assert replay_single(c, seq) == [False, False, True, False, False, False, True, False]
    assert (c.hits, c.misses, c.admissions, c.evictions) == (2, 6, 6, 4)
    assert c.bytes_copied == 6000
    assert sorted(c.residents()) == [(0, 1), (0, 2)]
    assert c.resident(0, 1) is not None and c.resident(0, 0) is None
    assert list(c.lookup(0, [0, 1, 2])) == [False, True, True]
    slots = c.slot_of(0, [1, 2, 3])
    assert slots[2] == -1 and sorted(slots[:2]) == [0, 1]


def test_admit_returns_slot_and_existing_slot():
    c = ExpertCache(1, 2, 4, "lru")
    s = c.admit(1, 3)
    assert s == 0 and c.admit(1, 3) == 0 and c.admissions == 1
    assert c.admit(0, 2) == 0 and c.resident(1, 3) is None and c.evictions == 1
    assert ExpertCache(0, 1, 4, "lru").admit(0, 1) is None


def _optimal_hits(seq, n_slots, n_keys):
    """Brute force: best hit count of any policy that may start with any content and, after each access,
    may load the accessed key (evicting anything) or not."""
    best = {frozenset(s): 0 for s in itertools.combinations(range(n_keys), n_slots)}
    for e in seq:
        nxt = {}
        for state, h in best.items():
            h2 = h + (e in state)
            options = [state]
            if e not in state:
                options += [state - {v} | {e} for v in state]
            for s in options:
                nxt[s] = max(nxt.get(s, -1), h2)
        best = nxt
    return max(best.values())


def test_belady_matches_brute_force_optimum():
    rng = np.random.default_rng(1)
    for trial in range(30):
        seq = rng.choice(5, size=12, p=[0.4, 0.25, 0.15, 0.1, 0.1]).tolist()
        c = ExpertCache(2, 1, 5, "belady", future=np.array(seq)[:, None, None])
        c.warm_start()
        assert sum(replay_single(c, seq)) == _optimal_hits(seq, 2, 5), seq


@pytest.mark.parametrize("seed,shape,slots", [(0, (120, 6, 32, 4), 40), (1, (100, 4, 64, 6), 60),
                                              (2, (150, 3, 16, 2), 10)])
def test_belady_beats_every_policy(seed, shape, slots):
    ids = skewed_trace(np.random.default_rng(seed), *shape)
    trace = dict(ids=ids, n_experts=np.int64(shape[2]))
    # the cache-only view (resident when used, landed or not): Belady's optimality ignores copy timing
    rates = {p: simulate(trace, slots=slots, policy=p, cost_model=False, warmup=10, expert_bytes=10**6).resident_rate
             for p in ("score", "lru", "static", "belady")}
    assert rates["belady"] >= max(rates.values())
    assert rates["belady"] > rates["lru"]                   # strictly better than LRU on skewed traces


def test_static_policy_uses_profile():
    profile = np.zeros((2, 6))
    profile[0, [1, 4]] = [10, 7]
    profile[1, 2] = 9
    profile[1, 5] = 1
    c = ExpertCache(3, 2, 6, "static", profile=profile)
    assert sorted(c.residents()) == [(0, 1), (0, 4), (1, 2)]
    c.reset_stats()
    assert list(c.access(0, [1, 2, 4])) == [True, False, True]
    assert c.admit(0, 2) is None and c.admit(1, 5) is None     # not in the set / never evicts
    assert sorted(c.residents()) == [(0, 1), (0, 4), (1, 2)] and c.evictions == 0
    with pytest.raises(ValueError, match="profile must have shape"):
        ExpertCache(3, 2, 6, "static", profile=np.zeros((6, 2)))


def test_score_beats_lru_on_hot_set_plus_scan():
    """Layer 0 reuses 4 hot experts every token; layer 1 scans 4 never-seen experts per token."""
    T = 50
    ids = np.zeros((T, 2, 4), dtype=np.int16)
    ids[:, 0] = [0, 1, 2, 3]
    ids[:, 1] = np.arange(4 * T).reshape(T, 4)
    trace = dict(ids=ids, n_experts=np.int64(4 * T))
    lru = simulate(trace, slots=4, policy="lru", cost_model=False, warmup=1)
    score = simulate(trace, slots=4, policy="score", cost_model=False, warmup=1)
    assert lru.resident_rate == 0                            # the scan flushes the hot set every token
    assert score.resident_rate == 0.5
    # honest hits: the hot set's copies (1 ms each, queued behind each other) land during tokens 1-2
    assert 4 * (T - 3) <= score.hits < 4 * (T - 1) and score.hits + score.late == 4 * (T - 1)
    assert score.time_s < lru.time_s


def test_score_policy_prediction_and_decay():
    c = ExpertCache(1, 1, 8, "score", decay=0.5)
    c.access(0, [1])
    c.admit(0, 1)
    c.next_token()
    assert c.expected_uses(0, 1) == pytest.approx(0.5)
    assert c.admit(0, 2) is None                       # newcomer (0 uses) loses to resident (0.5)
    assert c.admit(0, 2, predicted_score=1.0) == 0     # predicted use this token wins
    assert c.resident(0, 1) is None
    c.next_token()                                     # the prediction expires with the token
    assert c.priority(0, 2) == pytest.approx(0.0)
    # lazy decay survives renormalisation: a steady 1 use/token converges to 1 / (1 - decay)
    c = ExpertCache(1, 1, 2, "score", decay=0.9)
    for _ in range(20000):
        c.access(0, [0])
        c.next_token()
    assert c.expected_uses(0, 0) == pytest.approx(0.9 / (1 - 0.9), rel=1e-9)


def test_cache_errors():
    with pytest.raises(ValueError, match="policy"):
        ExpertCache(2, 1, 4, "fifo")
    with pytest.raises(ValueError, match="future"):
        ExpertCache(2, 1, 4, "belady")
    with pytest.raises(ValueError, match="profile"):
        ExpertCache(2, 1, 4, "static")
    c = ExpertCache(2, 2, 4, "lru")
    with pytest.raises(ValueError, match="layer 2"):
        c.access(2, [0])
    with pytest.raises(ValueError, match=r"0\.\.3"):
        c.admit(0, 4)
    b = ExpertCache(2, 1, 4, "belady", future=np.array([[[0]], [[1]]]))
    with pytest.raises(ValueError, match="differs from the future trace"):
        b.access(0, [3])


# ---- prefetch ---------------------------------------------------------------------------------------
def test_cost_model():
    cm = CostModel.from_bandwidth(24_772_608, pcie_gbps=25.0, ram_gbps=200.0)
    assert cm.copy_ms == pytest.approx(24_772_608 / 25e9 * 1e3)
    assert cm.break_even_uses == pytest.approx(8.0)
    assert cm.worth_copying(8.5) and not cm.worth_copying(7.5)
    with pytest.raises(ValueError):
        CostModel(0, 25.0, 0.1)


def test_prefetcher_plans_copies_through_cost_model():
    cache = ExpertCache(4, 3, 8, "score")
    pf = Prefetcher(cache, cost_model=CostModel(1000, pcie_gbps=1.0, cpu_expert_ms=0.0005))   # needs >2 uses
    ids = torch.tensor([[1, 2], [1, 3], [1, 4]])                                                # 3 tokens
    assert pf.plan_copies(0, {1: ids}) == [(1, 1)]          # expert 1: 3 predicted uses; others: 1
    assert cache.resident(1, 1) is not None and pf.declined_by_cost == 3
    free = Prefetcher(ExpertCache(4, 3, 8, "lru"))
    assert free.plan_copies(0, {2: ids}) == [(2, 1), (2, 2), (2, 3), (2, 4)]
    hit = free.cache.access(2, [1, 5])
    assert list(hit) == [True, False]
    assert free.after_access(2, [1, 5], hit) == [(2, 5)]


def np_route(h, W, bias, k, n_group=1, topk_group=1):
    """Independent numpy re-derivation of the DeepSeek-V3 noaux_tc selection."""
    choice = 1 / (1 + np.exp(-(h @ W.T))) + bias
    if n_group > 1:
        g = choice.reshape(len(h), n_group, -1)
        gscore = np.sort(g, -1)[..., -2:].sum(-1)
        drop = np.argsort(-gscore, -1)[:, topk_group:]
        np.put_along_axis(g, drop[..., None], -np.inf, axis=1)
        choice = g.reshape(len(h), -1)
    return np.argsort(-choice, -1)[:, :k]


def router_trace(rng, T, L, E, K, H, same_hidden, n_group=1, topk_group=1):
    W = rng.standard_normal((L, E, H)).astype(np.float32) / np.sqrt(H)
    bias = (0.1 * rng.standard_normal((L, E))).astype(np.float32)
    base = rng.standard_normal((T, H)).astype(np.float32)
    hidden = (np.repeat(base[:, None], L, 1) if same_hidden
              else rng.standard_normal((T, L, H)).astype(np.float32))
    ids = np.stack([np_route(hidden[:, l], W[l], bias[l], K, n_group, topk_group) for l in range(L)], 1)
    return dict(ids=ids.astype(np.int16), hidden=hidden, routers=W, router_bias=bias,
                n_group=np.int64(n_group), topk_group=np.int64(topk_group))


@pytest.mark.parametrize("n_group,topk_group", [(1, 1), (4, 2)])
def test_predictor_recall(n_group, topk_group):
    rng = np.random.default_rng(3)
    same = validate_trace(router_trace(rng, 64, 5, 32, 6, 24, True, n_group, topk_group))
    rp = same.predictor()
    assert rp.recall(same.hidden, same.ids, 1) == 1.0 and rp.recall(same.hidden, same.ids, 2) == 1.0
    diff = validate_trace(router_trace(rng, 64, 5, 32, 6, 24, False, n_group, topk_group))
    assert diff.predictor().recall(diff.hidden, diff.ids, 1) < 0.6
    ahead = rp.predict_ahead(2, torch.from_numpy(same.hidden[:, 2]), 5)
    assert list(ahead) == [3, 4] and np.array_equal(ahead[4].numpy(), same.ids[:, 4])


def test_predictor_rescales_by_norm_weights():
    """Router inputs w_l * RMSNorm(h) with a shared h but different norm weights per layer."""
    rng = np.random.default_rng(7)
    T, L, E, K, H = 64, 4, 32, 6, 24
    W = rng.standard_normal((L, E, H)).astype(np.float32) / np.sqrt(H)
    w = np.exp(rng.standard_normal((L, H))).astype(np.float32)
    h = rng.standard_normal((T, H)).astype(np.float32)
    n = h / np.sqrt((h ** 2).mean(-1, keepdims=True) + 1e-6)
    hidden = w[None] * n[:, None]
    ids = np.stack([np_route(hidden[:, l], W[l], np.zeros(E), K) for l in range(L)], 1)
    plain = RoutingPredictor.from_weights(W, np.zeros((L, E)), top_k=K)
    normed = RoutingPredictor.from_weights(W, np.zeros((L, E)), top_k=K, norm_weights=w)
    assert plain.recall(hidden, ids, 1) < 0.9
    assert normed.recall(hidden, ids, 1) == 1.0 and normed.recall(hidden, ids, 2) == 1.0


def test_predictor_from_model(device):
    """The engine's predictor from a model on the test device: routers (and their rescaled copies) stay there."""
    from hybrid_k2.config import ModelConfig
    from hybrid_k2.model import Transformer
    cfg = ModelConfig.from_dict(dict(
        model_type="kimi_k2", vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
        num_hidden_layers=4, num_attention_heads=2, q_lora_rank=None, kv_lora_rank=16, qk_nope_head_dim=8,
        qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4,
        n_group=4, topk_group=2, first_k_dense_replace=1))
    model = Transformer(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if p.dim() == 1 else 0.0))
    model.to(device)
    rp = RoutingPredictor.from_model(model)
    assert rp.layers == [1, 2, 3] and rp.target(1, 2) == 3 and rp.target(2, 2) is None
    x = torch.randn(10, 32, generator=g)
    w1, w3 = (model.model.layers[i].post_attention_layernorm.weight.detach().cpu().numpy() for i in (1, 3))
    gate3 = model.model.layers[3].mlp.gate
    ref = np_route(x.numpy() / w1 * w3, gate3.weight.detach().cpu().numpy(),
                   gate3.e_score_correction_bias.detach().cpu().numpy(), 4, n_group=4, topk_group=2)
    got = rp.predict(1, x.to(device), 2)
    assert got.device == device and rp.base_router(1, 3).weight.device == device
    assert np.array_equal(got.cpu().numpy(), ref)
    uses = rp.predict_uses(1, x.to(device), 2)        # what the Prefetcher reads (expected uses [T, E])
    ids, n = Prefetcher._uses(uses)
    assert np.array_equal(n, np.bincount(ref.ravel(), minlength=16)[ids])


def test_fit_correction_learns_linear_drift(device):
    """Routers on the test device: the fit is solved there (float32 on an accelerator, float64 on the CPU)."""
    from hybrid_k2.experts.prefetch import _router_from_weights
    rng = np.random.default_rng(4)
    H, E, K, N = 24, 16, 4, 3000
    W = rng.standard_normal((2, E, H)).astype(np.float32) / np.sqrt(H)
    drift = np.eye(H) + 0.6 * rng.standard_normal((H, H)) / np.sqrt(H)
    h0 = rng.standard_normal((N, H))
    h1 = h0 @ drift + 0.01 * rng.standard_normal((N, H))
    true = np_route(h1[N // 2:], W[1], np.zeros(E), K)
    rp = RoutingPredictor([_router_from_weights(torch.from_numpy(w).to(device), np.zeros(E, np.float32), top_k=K)
                           for w in W])
    test_h = torch.tensor(h0[N // 2:], dtype=torch.float32, device=device)
    plain = recall_at_k(rp.predict(0, test_h, 1).cpu().numpy(), true)
    rp.fit_correction(0, 1, h0[:N // 2], h1[:N // 2])
    assert rp._corrected[(0, 1)].weight.device == device
    fitted = recall_at_k(rp.predict(0, test_h, 1).cpu().numpy(), true)
    assert plain < 0.8 and fitted > 0.95
    rp.clear_corrections()
    assert recall_at_k(rp.predict(0, test_h, 1).cpu().numpy(), true) == plain


def test_fit_correction_keeps_float32_with_bf16_routers():
    """A bf16 model's routers (the accelerator default): the fitted B + C^T is kept in float32, as the plain
    predictor's rescaled routers are, not rounded to the routers' bf16 (~3 significant digits)."""
    from hybrid_k2.experts.prefetch import _router_from_weights
    rng = np.random.default_rng(5)
    H, E, K, N = 24, 16, 4, 400
    W = rng.standard_normal((2, E, H)).astype(np.float32) / np.sqrt(H)
    rp = RoutingPredictor([_router_from_weights(w, None, top_k=K).to(torch.bfloat16) for w in W])
    x = rng.standard_normal((N, H))
    y = x @ (np.eye(H) + 0.3 * rng.standard_normal((H, H)) / np.sqrt(H))
    rp.fit_correction(0, 1, x, y, ridge=0.1)
    B = rp.routers[1].weight.detach().double().numpy()        # the bf16 router's values, exactly
    C = np.linalg.solve(x.T @ x + 0.1 * N * np.eye(H), x.T @ (y @ B.T - x @ B.T))
    got = rp._corrected[(0, 1)].weight.detach()
    assert got.dtype == torch.float32
    assert np.abs(got.double().numpy() - (B + C.T)).max() <= 1e-6 * np.abs(B + C.T).max()


# ---- simulator ------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(40, 26, 64, 6), (30, 3, 160, 6), (25, 60, 384, 8)])
def test_sim_accounting_other_shapes(shape):
    T, L, E, K = shape
    ids = skewed_trace(np.random.default_rng(5), *shape)
    trace = dict(ids=ids, n_experts=np.int64(E))
    eb = 2_000_000
    r = simulate(trace, slots=L * 4, policy="score", ram_gbps=50.0, pcie_gbps=20.0, expert_bytes=eb, warmup=5)
    assert r.tokens == T - 5 and r.accesses == (T - 5) * L * K
    assert r.bytes_copied == r.admissions * eb
    assert r.cpu_only_time_s == pytest.approx((T - 5) * L * K * eb / 50e9)
    assert 0 < r.time_s <= r.cpu_only_time_s * (1 + 1e-9)
    # no slots: nothing cached, exactly the CPU-only time
    z = simulate(trace, slots=0, policy="lru", ram_gbps=50.0, expert_bytes=eb, warmup=5)
    assert z.hits == 0 and z.bytes_copied == 0 and z.time_s == pytest.approx(z.cpu_only_time_s)
    # every expert cached (static from the whole-trace profile): all hits, time = GPU expert time only
    full = simulate(trace, slots=L * E, policy="static", ram_gbps=50.0, gpu_gbps=1000.0, expert_bytes=eb, warmup=0)
    assert full.hit_rate == 1.0 and full.time_s == pytest.approx(T * L * K * eb / 1000e9)


def test_sim_copy_timing_known_answers():
    """2 layers, 1 expert each; oracle prefetch of layer 1 issued at layer 0, then a demand copy of
    layer 0's expert queues behind it. cpu = 0.1 ms per expert."""
    trace = dict(ids=np.array([[[0], [1]]], dtype=np.int16), n_experts=np.int64(2))
    kw = dict(slots=2, policy="lru", ram_gbps=10.0, expert_bytes=10**6, lookahead=1, predictor="oracle",
              warmup=0, cost_model=False, demand=True)
    on_time = simulate(trace, pcie_gbps=20.0, **kw)             # copy 0.05 ms lands before layer 1
    assert (on_time.hits, on_time.late) == (1, 0)
    assert on_time.hit_rate == 0.5 and on_time.resident_rate == 0.5
    assert on_time.time_s == pytest.approx(1e-4) and on_time.cpu_only_time_s == pytest.approx(2e-4)
    assert on_time.admissions == 2 and on_time.prefetches == 1 and on_time.bytes_copied == 2 * 10**6
    for gbps in (1e6 / 1.5e-4 / 1e9, 4.0):                      # copy 0.15 / 0.25 ms: lands during / after layer 1
        late = simulate(trace, pcie_gbps=gbps, **kw)            # not landed when the layer starts: the CPU runs
        assert (late.hits, late.late) == (0, 1) and late.time_s == pytest.approx(2e-4)    # it (as the engine)
        assert late.hit_rate == 0.0 and late.resident_rate == 0.5
        checked = simulate(trace, pcie_gbps=gbps, land_check=True, **kw)   # landing check: not prefetched (both demand-copied)
        assert (checked.prefetches, checked.declined_late, checked.late, checked.admissions) == (0, 1, 0, 2)
    # the same check lets the on-time copy through; demand off: the prefetch is the only copy
    only = simulate(trace, pcie_gbps=20.0, land_check=True, **dict(kw, demand=False))
    assert (only.hits, only.prefetches, only.admissions, only.declined_late) == (1, 1, 1, 0)


def test_sim_with_router_replay_and_cli(tmp_path, capsys):
    rng = np.random.default_rng(6)
    arrays = router_trace(rng, 40, 6, 32, 4, 16, same_hidden=True)
    path = tmp_path / "trace.npz"
    np.savez(path, **arrays)
    r = simulate(path, slots=8, policy="score", lookahead=2, cost_model=False, expert_bytes=10**6,
                 pcie_gbps=1000.0, warmup=4)
    assert r.recall == {1: 1.0, 2: 1.0}
    none = simulate(path, slots=8, policy="score", lookahead=0, cost_model=False, expert_bytes=10**6, warmup=4)
    assert r.hits > none.hits                               # perfect prediction + fast link: more hits
    assert sim_main([str(path), "--slots", "8", "--pcie-gbps", "25", "--ram-gbps", "100", "--policy", "belady"]) == 0
    out = capsys.readouterr().out
    assert "hit rate" in out and "CPU-only" in out and "recall@top-k, lookahead 2: 100.0%" in out


def test_bad_traces(tmp_path, capsys):
    def write(name, **arrays):
        p = tmp_path / name
        np.savez(p, **arrays)
        return p
    good = np.zeros((4, 3, 2), dtype=np.int16)
    good[..., 1] = 1
    cases = [
        (write("f.npz", ids=good.astype(np.float32)), "'ids' must be an integer"),
        (write("r.npz", ids=good[0]), "rank 3"),
        (write("o.npz", ids=good + 7, n_experts=np.int64(8)), "expert id 8, out of range for 8"),
        (write("n.npz", ids=good - 1), "negative"),
        (write("m.npz", weights=good.astype(np.float32)), "no 'ids' array"),
        (write("h.npz", ids=good, hidden=np.zeros((4, 2, 8), np.float32)), "'hidden' must be float"),
        (write("w.npz", ids=good, weights=np.zeros((4, 3), np.float32)), "'weights' must be float"),
    ]
    for path, msg in cases:
        with pytest.raises(TraceError, match=msg) as ei:
            load_trace(path)
        assert str(path) in str(ei.value)
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip file")
    with pytest.raises(TraceError, match="junk.npz"):
        load_trace(junk)
    with pytest.raises(TraceError, match="no such trace"):
        load_trace(tmp_path / "absent.npz")
    assert sim_main([str(cases[0][0]), "--slots", "2", "--pcie-gbps", "25", "--ram-gbps", "100"]) == 2
    assert "f.npz" in capsys.readouterr().err


def test_lru_prefetched_newcomer_is_not_next_victim():
    """An expert admitted ahead of use (prefetch) counts as just used, so the next admission evicts an older one."""
    c = ExpertCache(2, 1, 8, "lru")
    for e in (0, 1):
        c.access(0, [e])
        c.admit(0, e)
    c.admit(0, 5)                      # prefetched: evicts 0 (least recently used)
    c.admit(0, 6)                      # evicts 1, not the just-prefetched 5
    assert sorted(c.residents()) == [(0, 5), (0, 6)]


def test_next_token_by_many_tokens_matches_single_steps():
    a, b = ExpertCache(2, 1, 4, "score", decay=0.9), ExpertCache(2, 1, 4, "score", decay=0.9)
    for c in (a, b):
        c.access(0, [1, 1, 2])
    a.next_token(7)
    for _ in range(7):
        b.next_token()
    assert a.token == b.token == 7 and a.expected_uses(0, 1) == pytest.approx(b.expected_uses(0, 1)) \
        == pytest.approx(2 * 0.9 ** 7)
    a.next_token(100_000)              # a long prefill: decays to nothing without overflow
    assert a.expected_uses(0, 1) == 0.0 and np.isfinite(a._freq).all()
    with pytest.raises(ValueError, match="positive integer"):
        a.next_token(0)


def test_predictor_routers_stay_on_the_weights_device(device):
    """Routers built for prediction live where their weights do (the accelerator), not on the CPU."""
    from hybrid_k2.experts.prefetch import _router_from_weights
    r = _router_from_weights(torch.zeros(8, 4, device="meta"), np.zeros(8, np.float32), top_k=2)
    assert r.weight.device.type == "meta" and r.e_score_correction_bias.device.type == "meta"
    bias = np.zeros(8, np.float32)
    bias[[2, 6]] = 1.0
    r = _router_from_weights(torch.zeros(8, 4, device=device), bias, top_k=2)
    assert r.weight.device == device and r.e_score_correction_bias.device == device
    ids, w = r(torch.randn(3, 4, device=device))
    assert ids.device == device and sorted(ids.cpu()[0].tolist()) == [2, 6]


def test_prefetcher_gates_uses_and_link_backlog():
    """Expected uses [T, E] (a learned head's probabilities): candidates by min_uses, most likely first,
    at most max_copies per layer; no prefetch while the link is busier than max_backlog_ms, and each admitted
    copy adds its copy time to the backlog the next decision sees."""
    cm = CostModel(10**6, pcie_gbps=1.0, cpu_expert_ms=10.0)        # copy 1 ms; any predicted use pays
    uses = np.zeros((2, 8), np.float32)
    uses[:, 3], uses[:, 5], uses[:, 1] = [0.9, 0.8], [0.3, 0.2], [0.1, 0.05]
    pf = Prefetcher(ExpertCache(8, 2, 8, "score"), cost_model=cm, min_uses=0.3)
    assert pf.plan_copies(0, {1: uses}) == [(1, 3), (1, 5)]            # 1.7 and 0.5 uses; expert 1 (0.15) not
    assert pf.cache.priority(1, 3) == pytest.approx(1.7)
    one = Prefetcher(ExpertCache(8, 2, 8, "score"), cost_model=cm, max_copies=1)
    assert one.plan_copies(0, {1: uses}) == [(1, 3)]
    link = Prefetcher(ExpertCache(8, 2, 8, "score"), cost_model=cm, max_backlog_ms=1.5)
    assert link.plan_copies(0, {1: uses}, backlog_ms=2.0) == [] and link.declined_by_link == 3
    assert link.plan_copies(0, {1: uses}, backlog_ms=0.0) == [(1, 3), (1, 5)]   # 0 -> 1 -> 2 ms: the third waits
    # demand admissions: the same gate; the score policy sends its most used missed expert first
    c = ExpertCache(8, 1, 8, "score")
    for _ in range(3):
        c.access(0, [6])
    c.access(0, [2])
    demand = Prefetcher(c, cost_model=None, max_demand_backlog_ms=0.5)
    hit = c.access(0, [2, 6])
    assert demand.after_access(0, [2, 6], hit, backlog_ms=0.0) == [(0, 6), (0, 2)]
    assert Prefetcher(ExpertCache(8, 1, 8, "score"), max_demand_backlog_ms=0.5).after_access(
        0, [2], [False], backlog_ms=1.0) == []


def test_score_margin_keeps_near_equal_experts_from_trading_places():
    c = ExpertCache(1, 1, 4, "score", margin=1.0)
    c.access(0, [0])
    c.admit(0, 0)
    c.access(0, [1])
    c.access(0, [1])                    # 2 uses vs 1: beats the resident, but not by the margin
    assert c.admit(0, 1) is None and c.resident(0, 0) is not None
    c.access(0, [1])                    # 3 vs 1: by more than the margin
    assert c.admit(0, 1) == 0 and c.resident(0, 0) is None
    with pytest.raises(ValueError, match="margin"):
        ExpertCache(1, 1, 4, "score", margin=-1)


def test_score_never_evicts_a_copy_in_flight():
    """The "landed?" predicate (the engine's fill events, the simulator's link model): the score policy picks
    its victim among landed residents only, and declines when every resident is still in flight; LRU is
    unchanged (it evicts its least recently used, landed or not)."""
    in_flight = set()
    c = ExpertCache(2, 1, 8, "score")
    c.set_landed(lambda keys: np.array([int(k) not in in_flight for k in keys], dtype=bool))
    for e, uses in ((0, 1), (1, 3)):
        for _ in range(uses):
            c.access(0, [e])
        c.admit(0, e)
    in_flight.add(0)                         # expert 0 (1 use) is the lowest, but its copy is on the link
    assert list(c.landed(0, [0, 1, 2])) == [False, True, False]
    for _ in range(5):
        c.access(0, [2])
    assert c.admit(0, 2) is not None and sorted(c.residents()) == [(0, 0), (0, 2)]   # 1 went, not 0
    in_flight.update({2})
    for _ in range(9):
        c.access(0, [3])
    assert c.admit(0, 3) is None and c.rejected == 1                                # all in flight: declined
    in_flight.clear()
    assert c.admit(0, 3) is not None and c.resident(0, 0) is None                  # landed: 0 is the victim
    lru = ExpertCache(1, 1, 8, "lru")
    lru.set_landed(lambda keys: np.zeros(len(keys), dtype=bool))
    lru.admit(0, 4)
    assert lru.admit(0, 5) == 0 and lru.residents() == [(0, 5)]
    with pytest.raises(TypeError, match="callable"):
        c.set_landed(3)


def test_prefetcher_lead_times_and_landing_check():
    """lead_times by hand: the current layer's 0.5 ms, then layer 1's predicted misses x 0.25 ms. A copy (1 ms)
    is planned only if the backlog plus its own time fits before its target layer starts; candidates of all
    target layers go best first by decayed uses + predict_weight x predicted uses."""
    cm = CostModel(10**6, pcie_gbps=1.0, cpu_expert_ms=0.25)               # copy 1 ms
    c = ExpertCache(8, 4, 8, "score", predict_weight=10.0)
    c.access(2, [6])                                                        # a decayed use: ranks 6 first
    c.admit(1, 0)                                                           # resident at layer 1
    pf = Prefetcher(c, cost_model=None, timing=cm)
    u1 = np.zeros((1, 8), np.float32)
    u1[0, [0, 1, 2]] = [1.0, 0.8, 0.6]                                      # 0 resident: 1.4 predicted misses
    u2 = np.zeros((1, 8), np.float32)
    u2[0, [5, 6]] = [0.9, 0.9]
    lead = pf.lead_times(0, 0.5, {1: u1, 2: u2})
    assert lead == pytest.approx({1: 0.5, 2: 0.5 + 1.4 * 0.25})
    assert pf.lead_times(0, 0.5, {2: u2}, fixed_ms=0.1)[2] == pytest.approx(0.5 + 0.1 + 0.9 * 0.25 + 0.9 * 0.25)
    # layer 1's copies cannot land in 0.5 ms; layer 2's first (expert 6, one decayed use) lands at 1 <= 0.85? no
    assert pf.plan_copies(0, {1: u1, 2: u2}, lead_ms=lead) == [] and pf.declined_late == 4
    longer = {1: 0.5, 2: 1.5}
    assert pf.plan_copies(0, {1: u1, 2: u2}, lead_ms=longer) == [(2, 6)]   # then 1 ms backlog: 5 would be late
    assert pf.declined_late == 4 + 3
    free = Prefetcher(ExpertCache(8, 4, 8, "score", predict_weight=10.0), timing=cm)   # no landing check
    assert free.plan_copies(0, {1: u1, 2: u2}) == [(1, 0), (2, 5), (2, 6), (1, 1), (1, 2)]   # 10 > 9 > 8 > 6
    with pytest.raises(ValueError, match="no timing"):
        Prefetcher(c).lead_times(0, 0.5, {1: u1})
    # demand off: no demand admissions at all
    assert Prefetcher(ExpertCache(4, 1, 8, "lru"), demand=False).after_access(0, [1, 2], [False, False]) == []


def test_sim_landing_check_on_a_trace():
    """A skewed trace, the oracle predictor, prefetch only, a copy about as long as a layer: with the landing
    check no planned copy is ever late (nothing resident is unlanded) and more land in time than without it
    (late copies hold up the link). A tie (a copy due exactly as its layer starts) counts as late."""
    ids = skewed_trace(np.random.default_rng(9), 300, 4, 16, 2)
    trace = dict(ids=ids, n_experts=np.int64(16))
    kw = dict(slots=8, policy="score", ram_gbps=80.0, pcie_gbps=25.0, lookahead=3, predictor="oracle", warmup=30,
              predict_weight=10.0)
    checked = simulate(trace, land_check=True, demand=False, **kw)
    unchecked = simulate(trace, land_check=False, demand=False, **kw)
    assert checked.late == 0 and checked.declined_late > 0          # prefetch-only: nothing resident is unlanded
    assert unchecked.late > 0                                       # without the check, copies land too late
    assert checked.hit_rate > unchecked.hit_rate
    # cpu 1/4 of a copy, 2 experts per layer: two layers of misses end exactly as a lookahead-2 copy lands
    ties = simulate(trace, land_check=True, demand=False, **dict(kw, ram_gbps=100.0, lookahead=2))
    assert ties.prefetches == 0 and ties.declined_late > 0


def test_demand_deferral_and_linkless_admissions():
    """defer_demand: a call admits the previous call's misses (those still absent) and keeps its own; defer=False
    admits both now. Experts already on the device (a streamed layer) are admitted past a busy link and add no
    copy time; the others wait for the link."""
    cm = CostModel(10**6, pcie_gbps=1.0, cpu_expert_ms=10.0)                  # copy 1 ms
    pf = Prefetcher(ExpertCache(8, 3, 8, "lru"), timing=cm, defer_demand=True, max_demand_backlog_ms=5.0)
    assert pf.after_access(0, [1, 2], [False, True]) == []                    # kept: (0, 1)
    pf.cache.admit(1, 4)
    assert pf.after_access(1, [4, 5], [False, False]) == [(0, 1)]             # (1, 4) is resident meanwhile
    assert pf.after_access(2, [6], [False], defer=False) == [(1, 5), (2, 6)]
    assert pf.after_access(2, [7], [False]) == [] and pf._pending == (2, [7])
    used = ExpertCache(8, 1, 8, "lru")
    used.access(0, [1, 2, 3])                                                 # one use each: worth a copy
    busy = Prefetcher(used, cost_model=cm, max_demand_backlog_ms=0.0)
    assert busy.after_access(0, [1, 2, 3], [False] * 3, backlog_ms=0.0) == [(0, 1)]   # then the link is busy
    used = ExpertCache(8, 1, 8, "lru")
    used.access(0, [1, 2, 3])
    free = Prefetcher(used, cost_model=cm, max_demand_backlog_ms=0.0)
    assert free.after_access(0, [1, 2, 3], [False] * 3, backlog_ms=2.0, on_device={1, 3}) == [(0, 1), (0, 3)]
