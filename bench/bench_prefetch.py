"""Routing predictor recall and expert-cache hit rates, measured on a model's real routing.

Records a routing trace (router inputs included) from MODEL (default: the demo model) over evaluation text
(HELD_OUT: files of the Python standard library), and a second trace over other stdlib files (FIT_FILES,
disjoint from HELD_OUT) on which the predictor's learned heads are fitted (RoutingPredictor.fit_heads; saved as
an .npz next to the trace, which the engine loads with HybridExperts.load_predictor_heads). Then reports
  * predictor recall@top-k at lookahead 1 and 2: the plain next-layer routers on the current router input,
    a ridge correction per (layer, lookahead) (fit_correction) fitted on the fit trace, the same fitted
    online on the evaluation trace's first PREFILL tokens (a prompt's prefill, as HybridExperts does; recall
    then counted on the tokens after them) and the learned heads,
  * per policy (score / LRU / static / Belady) at slots = 2 x top-k per MoE layer, without and with
    prefetching: the hit rate (expert in VRAM with its copy landed when its layer starts, by the simulator's
    PCIe timing), the resident rate (in a slot at all, landed or not), bytes copied and the modelled decode
    time, through the same cache/prefetch code the engine runs (hybrid_k2.sim.simulate). Every policy gets
    the same prefetcher settings (SIM), tuned on a third text (see SIM), never on the evaluation tokens.

    python bench/bench_prefetch.py [--model demo] [--tokens 2048] [--fit-tokens 65536] [--trace PATH]
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
# Prefetcher / score-policy settings, tuned on a trace of email/_header_value_parser.py, urllib/request.py and
# http/cookiejar.py (neither fit nor evaluation text): copy only while the link is idle (a queued copy lands
# after the layer that wanted it), prefetch 2 MoE layers ahead the experts with >= 0.3 predicted uses.
SIM = dict(lookahead=2, decay=0.99, min_uses=0.3, max_backlog_ms=0.0, max_demand_backlog_ms=0.0, warmup=256)
PREFILL = 256     # the warm-up tokens double as a prompt: ridge corrections fitted on them (no files)
HEADS = dict(width=512, epochs=10)


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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="demo")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--fit-tokens", type=int, default=65536)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--trace", default=None, help="use (or write) this trace instead of a temporary one; the fit "
                    "trace and the heads go next to it (.fit.npz, .heads.npz)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)      # small matmuls: a second thread only adds barriers on a shared machine

    path = Path(args.trace) if args.trace else Path(tempfile.mkdtemp()) / "trace.npz"
    fit_path, heads_path = path.with_suffix(".fit.npz"), path.with_suffix(".heads.npz")
    if not path.exists():
        record(args.model, args.tokens, args.chunk, path)
    if not fit_path.exists():
        record(args.model, args.fit_tokens, args.chunk, fit_path, FIT_FILES)
    t, fit = load_trace(path), load_trace(fit_path)
    T, L, K = t.ids.shape
    print(f"eval trace: {T} tokens x {L} MoE layers x top-{K} of {t.n_experts} experts ({args.model}); "
          f"fit trace: {fit.ids.shape[0]} tokens of other files")

    plain, ridge, heads = t.predictor(), t.predictor(), t.predictor()
    for d in (1, 2):
        for j in range(L - d):
            ridge.fit_correction(j, d, fit.hidden[:, j], fit.hidden[:, j + d], ridge=1e-2)
    if heads_path.exists():
        heads.load_heads(heads_path)
    else:
        t0 = time.perf_counter()
        heads.fit_heads(fit.hidden, fit.ids, depth=2, **HEADS)
        heads.save_heads(heads_path)
        print(f"fitted learned heads in {time.perf_counter() - t0:.0f} s -> {heads_path}")
    online = t.predictor()
    for d in (1, 2):
        for j in range(L - d):
            online.fit_correction(j, d, t.hidden[:PREFILL, j], t.hidden[:PREFILL, j + d], ridge=0.3)
    rest = slice(PREFILL, None)
    for name, rp, span in (("plain routers", plain, slice(None)), ("ridge correction", ridge, slice(None)),
                           ("plain routers, after the prefill", plain, rest),
                           (f"ridge fitted on a {PREFILL}-token prefill", online, rest),
                           ("learned heads", heads, slice(None))):
        rec = [rp.recall(t.hidden[span], t.ids[span], d) for d in (1, 2) if L > d]
        print(f"predictor recall@top-{K} ({name}): " + ", ".join(f"lookahead {d + 1}: {r:.3f}"
                                                                  for d, r in enumerate(rec)))

    slots = 2 * K * L
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
    legacy = simulate(t, slots=slots, policy="lru", lookahead=1, warmup=SIM["warmup"])
    print(row("lru, old bench settings", legacy) + "  (plain routers, lookahead 1, no link gate)")
    vs_legacy = f"{hits['score'] / legacy.hit_rate:.2f}" if legacy.hit_rate else "inf (its hit rate is 0)"
    print(f"score / LRU hit-rate ratio (same prefetcher): {hits['score'] / hits['lru']:.2f}; "
          f"vs the old bench settings' LRU: {vs_legacy}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
