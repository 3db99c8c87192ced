"""Routing predictor recall and expert-cache hit rates, measured on a model's real routing.

Records a routing trace (router inputs included) from MODEL (default: the demo model) over evaluation text
(HELD_OUT: files of the Python standard library), and a second trace over other stdlib files (FIT_FILES,
disjoint from HELD_OUT) on which the predictor's learned heads are fitted (RoutingPredictor.fit_heads; saved as
an .npz next to the trace, which the engine loads with load(prefetch_heads=...)). Then reports
  * predictor recall@top-k at lookahead 1 and 2: the plain next-layer routers on the current router input,
    a ridge correction per (layer, lookahead) (fit_correction) fitted on the fit trace, the same fitted
    online on the evaluation trace's first PREFILL tokens (a prompt's prefill, as HybridExperts does; recall
    then counted on the tokens after them) and the learned heads,
  * per policy (score / LRU / static / Belady) at slots = 2 x top-k per MoE layer, without and with
    prefetching: the hit rate (expert in VRAM with its copy landed when its layer starts, by the simulator's
    PCIe timing), the resident rate (in a slot at all, landed or not), bytes copied and the modelled decode
    time, through the same cache/prefetch code the engine runs (hybrid_k2.sim.simulate). Every policy gets
    the same prefetcher settings (SIM), tuned on a third text (TUNE_FILES), never on the evaluation tokens;
    LRU, static and score are also shown with the previous settings (SIM_BEFORE), LRU with SIM's prefetcher
    but prefetch-only / without deferral / without the landing check, and score is compared with every LRU
    row, the best of them included.

    python bench/bench_prefetch.py [--model demo] [--tokens 2048] [--fit-tokens 65536] [--trace PATH] [--tune]

--tune records TUNE_FILES (next to the trace, .tune.npz) and prints the score policy's hit rate there over a
small grid of decay x margin x predict_weight and single changes of SIM (the search behind SIM); it never reads
the evaluation trace.
"""
from __future__ import annotations

import argparse
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import torch

import hybrid_k2
from hybrid_k2.sim import load_trace, simulate

def _demo_held_out() -> list[str]:
    """The stdlib files the demo never trained on (train_demo.py holds out file i when i % 20 == 10), largest first."""
    from train_demo import HOLDOUT_EVERY, corpus_files
    root = Path(sysconfig.get_paths()["stdlib"])
    held = [f for i, f in enumerate(corpus_files(root)) if i % HOLDOUT_EVERY == HOLDOUT_EVERY // 2]
    return [str(f.relative_to(root)) for f in sorted(held, key=lambda f: -f.stat().st_size)]


HELD_OUT = _demo_held_out()   # evaluation text, read in order
# Fit text: other stdlib files (never the evaluation ones); missing ones (another Python version) are skipped.
FIT_FILES = ["inspect.py", "typing.py", "subprocess.py", "pathlib.py", "shutil.py", "configparser.py",
             "logging/__init__.py", "threading.py", "dataclasses.py", "enum.py", "ast.py", "pickle.py",
             "datetime.py", "_pyio.py", "doctest.py", "optparse.py"]
FIT_FILES = [f for f in FIT_FILES if f not in HELD_OUT]   # training text of the demo, never evaluation text
# Tuning text: neither fit nor evaluation text.
TUNE_FILES = ["email/_header_value_parser.py", "urllib/request.py", "http/cookiejar.py"]
# Prefetcher / score-policy settings, tuned on a 2,048-token trace of TUNE_FILES (--tune): prefetch 3 MoE layers
# ahead (a copy lasts about one decode layer: two layers ahead rarely leave it time) the experts with >= 0.3
# predicted uses, best first by decayed uses + 10 x predicted uses, each only if the link can land it before its
# layer starts (land_check); demand copies of missed experts only while the link is idle, decided after the next
# layer's prefetches (defer_demand); a newcomer must beat the lowest landed resident by 2 decayed uses (margin);
# frequencies decay by 0.98 per token.
SIM = dict(lookahead=3, decay=0.98, predict_weight=10.0, margin=2.0, min_uses=0.3, max_backlog_ms=None,
           land_check=True, max_demand_backlog_ms=0.0, defer_demand=True, warmup=256)
# The settings before (lookahead 2, prefetch and demand copies only while the link is idle, no landing check,
# decay 0.99, a predicted use weighted 1, no margin), kept for the baselines.
SIM_BEFORE = dict(lookahead=2, decay=0.99, min_uses=0.3, max_backlog_ms=0.0, max_demand_backlog_ms=0.0, warmup=256)
TUNE_GRID = dict(decay=(0.97, 0.98, 0.99), predict_weight=(3.0, 10.0, 30.0), margin=(0.0, 2.0))
PREFILL = 256     # the warm-up tokens double as a prompt: ridge corrections fitted on them (no files)
HEADS = dict(width=512, epochs=10)
HEADS_DEPTH = 3   # learned heads for lookahead 1..3


def stdlib_text(names: list[str], n_chars: int) -> str:
    root = Path(sysconfig.get_paths()["stdlib"])
    text = ""
    for name in names:
        p = root / name
        if p.is_file():
            text += p.read_text(errors="replace")
        if len(text) >= n_chars:
            break
    return text[:n_chars]


def held_out_text(n_chars: int) -> str:
    return stdlib_text(HELD_OUT, n_chars)


def record(model: str, tokens: int, chunk: int, path: Path, files: list[str] = HELD_OUT) -> int:
    eng = hybrid_k2.load(model, device="cpu", experts="cpu", record_routing=path, record_hidden=True,
                         progress=False)
    ids = eng.tokenizer.encode(stdlib_text(files, tokens * 8))[:tokens]
    for i in range(0, len(ids), chunk):        # routing is per token: chunked prefill records every token
        eng.logits(ids[i:i + chunk])
    eng.close()                                # saves the trace
    return len(ids)


def row(name: str, r) -> str:
    n = max(r.tokens, 1)
    return (f"  {name:<26} hit {r.hit_rate:.3f}  resident {r.resident_rate:.3f}  copied {r.bytes_copied / 2**30:7.2f} GiB "
            f"({r.admissions} copies, {r.prefetches} prefetched)  {1e3 * r.time_s / n:.2f} ms/token "
            f"(CPU-only {1e3 * r.cpu_only_time_s / n:.2f})")


def tune(args, path: Path, heads_path: Path, slots: int) -> None:
    """The score policy over TUNE_GRID on the tuning text (never the evaluation trace), then one setting of SIM
    changed at a time; LRU with SIM and SIM_BEFORE for scale."""
    tune_path = path.with_suffix(".tune.npz")
    if not tune_path.exists():
        record(args.model, args.tokens, args.chunk, tune_path, TUNE_FILES)
    tt = load_trace(tune_path)
    print(f"tuning trace: {tt.ids.shape[0]} tokens of {', '.join(TUNE_FILES)}; learned-heads prefetch")

    def hit(policy="score", **kw):
        return simulate(tt, slots=slots, policy=policy, heads=heads_path, **dict(SIM, **kw)).hit_rate

    print(f"  lru: SIM {hit('lru'):.3f}, SIM_BEFORE {hit('lru', **SIM_BEFORE):.3f}; score: SIM {hit():.3f}")
    for decay in TUNE_GRID["decay"]:
        for margin in TUNE_GRID["margin"]:
            print(f"  score, decay {decay}, margin {margin:g}: " + ", ".join(
                f"predict_weight {pw:g} {hit(decay=decay, margin=margin, predict_weight=pw):.3f}"
                for pw in TUNE_GRID["predict_weight"]))
    for change in (dict(lookahead=2), dict(land_check=False), dict(defer_demand=False), dict(demand=False),
                   dict(max_backlog_ms=0.0), dict(min_uses=0.15), dict(min_uses=0.5)):
        print(f"  score, SIM with {change}: {hit(**change):.3f}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="demo")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--fit-tokens", type=int, default=65536)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--trace", default=None, help="use (or write) this trace instead of a temporary one; the fit "
                    "trace and the heads go next to it (.fit.npz, .heads.npz)")
    ap.add_argument("--tune", action="store_true", help="record TUNE_FILES (.tune.npz) and print the search "
                    "behind SIM on it")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)      # small matmuls: a second thread only adds barriers on a shared machine

    path = Path(args.trace) if args.trace else Path(tempfile.mkdtemp()) / "trace.npz"
    fit_path, heads_path = path.with_suffix(".fit.npz"), path.with_suffix(f".heads-d{HEADS_DEPTH}.npz")
    if not path.exists():
        record(args.model, args.tokens, args.chunk, path)
    if not fit_path.exists():
        record(args.model, args.fit_tokens, args.chunk, fit_path, FIT_FILES)
    t, fit = load_trace(path), load_trace(fit_path)
    T, L, K = t.ids.shape
    print(f"eval trace: {T} tokens x {L} MoE layers x top-{K} of {t.n_experts} experts ({args.model}); "
          f"fit trace: {fit.ids.shape[0]} tokens of other files")

    plain, ridge, heads = t.predictor(), t.predictor(), t.predictor()
    depths = [d for d in range(1, HEADS_DEPTH + 1) if d < L]
    ridge.fit_corrections(fit.hidden.swapaxes(0, 1), HEADS_DEPTH, ridge=1e-2)
    if heads_path.exists():
        heads.load_heads(heads_path)
    else:
        t0 = time.perf_counter()
        heads.fit_heads(fit.hidden, fit.ids, depth=HEADS_DEPTH, **HEADS)
        heads.save_heads(heads_path)
        print(f"fitted learned heads in {time.perf_counter() - t0:.0f} s -> {heads_path}")
    online = t.predictor()
    online.fit_corrections(t.hidden[:PREFILL].swapaxes(0, 1), HEADS_DEPTH, ridge=0.3)
    rest = slice(PREFILL, None)
    for name, rp, span in (("plain routers", plain, slice(None)), ("ridge correction", ridge, slice(None)),
                           ("plain routers, after the prefill", plain, rest),
                           (f"ridge fitted on a {PREFILL}-token prefill", online, rest),
                           ("learned heads", heads, slice(None))):
        rec = [rp.recall(t.hidden[span], t.ids[span], d) for d in depths]
        print(f"predictor recall@top-{K} ({name}): " + ", ".join(f"lookahead {d}: {r:.3f}"
                                                                  for d, r in zip(depths, rec)))

    slots = 2 * K * L
    if args.tune:
        tune(args, path, heads_path, slots)
    print(f"cache: {slots} slots (2 x top-k per MoE layer), K2-sized experts over PCIe 25 GB/s, RAM 100 GB/s; "
          f"settings {SIM}")
    hits = {}
    for policy in ("score", "lru", "static", "belady"):
        print(f"policy {policy}")
        r = simulate(t, slots=slots, policy=policy, **dict(SIM, lookahead=0))
        print(row("no prefetch", r))
        if policy != "belady":      # Belady is the demand-only optimum
            if policy == "score":
                print(row("prefetch, plain routers", simulate(t, slots=slots, policy=policy, **SIM)))
                print(row("prefetch, prefill-fitted", simulate(t, slots=slots, policy=policy, prefill_fit=PREFILL,
                                                              **SIM)))
                print(row("prefetch, oracle (bound)", simulate(t, slots=slots, policy=policy, predictor="oracle",
                                                              **SIM)))
            r = simulate(t, slots=slots, policy=policy, heads=heads_path, **SIM)
            print(row("prefetch, learned heads", r))
        hits[policy] = r.hit_rate
    print(f"baselines with the previous settings {SIM_BEFORE}, and LRU with variants of SIM:")
    lru_rows = {"lru, SIM": hits["lru"]}
    for policy in ("lru", "static", "score"):
        for name, kw in (("no prefetch", dict(SIM_BEFORE, lookahead=0)), ("prefetch, learned heads",
                                                                           dict(SIM_BEFORE, heads=heads_path))):
            r = simulate(t, slots=slots, policy=policy, **kw)
            print(row(f"{policy}, before: {name}", r))
            if policy == "lru":
                lru_rows[f"lru, before, {name}"] = r.hit_rate
    for name, change in (("prefetch only", dict(demand=False)), ("no deferral", dict(defer_demand=False)),
                         ("no landing check", dict(land_check=False))):
        r = simulate(t, slots=slots, policy="lru", heads=heads_path, **dict(SIM, **change))
        print(row(f"lru, SIM, {name}", r))
        lru_rows[f"lru, SIM, {name}"] = r.hit_rate
    legacy = simulate(t, slots=slots, policy="lru", lookahead=1, warmup=SIM["warmup"])
    print(row("lru, old bench settings", legacy) + "  (plain routers, lookahead 1, no link gate)")
    print("score (SIM, learned heads) / LRU hit rate: " + "; ".join(
        f"{name} {hits['score'] / h:.2f}" if h else f"{name} inf" for name, h in lru_rows.items()))
    best = max(lru_rows, key=lru_rows.get)
    print(f"vs the best LRU row ({best}, hit {lru_rows[best]:.3f}): {hits['score'] / lru_rows[best]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
