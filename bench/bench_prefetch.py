"""Routing predictor recall and expert-cache hit rates, measured on a model's real routing.

Records a routing trace (router inputs included) from MODEL (default: the demo model) over held-out text — files
of the Python standard library, which the trained demo never saw if it holds them out — then reports
  * predictor recall@top-k at lookahead 1 and 2 (the next layers' routers applied to the current hidden state),
  * cache hit rate of the score / LRU / static / Belady policies at slots = 2 x top-k per MoE layer,
through the same cache/prefetch code the engine runs (hybrid_k2.sim.simulate).

    python bench/bench_prefetch.py [--model demo] [--tokens 2048]
"""
from __future__ import annotations

import argparse
import sys
import sysconfig
import tempfile
from pathlib import Path

import hybrid_k2
from hybrid_k2.sim import load_trace, simulate

HELD_OUT = ["zipfile/__init__.py", "tarfile.py", "argparse.py", "difflib.py"]   # stdlib files, read in order


def held_out_text(n_chars: int) -> str:
    root = Path(sysconfig.get_paths()["stdlib"])
    text = ""
    for name in HELD_OUT:
        p = root / name
        if p.is_file():
            text += p.read_text(errors="replace")
        if len(text) >= n_chars:
            break
    return text[:n_chars]


def record(model: str, tokens: int, chunk: int, path: Path) -> None:
    eng = hybrid_k2.load(model, device="cpu", experts="cpu", record_routing=path, record_hidden=True,
                         progress=False)
    ids = eng.tokenizer.encode(held_out_text(tokens * 8))[:tokens]
    for i in range(0, len(ids), chunk):        # routing is per token: chunked prefill records every token
        eng.logits(ids[i:i + chunk])
    eng.close()                                # saves the trace


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="demo")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--trace", default=None, help="use (or write) this trace instead of a temporary one")
    args = ap.parse_args(argv)

    path = Path(args.trace) if args.trace else Path(tempfile.mkdtemp()) / "trace.npz"
    if not path.exists():
        record(args.model, args.tokens, args.chunk, path)
    t = load_trace(path)
    T, L, K = t.ids.shape
    print(f"trace: {T} tokens x {L} MoE layers x top-{K} of {t.n_experts} experts ({args.model})")
    pred = t.predictor()
    for d in (1, 2):
        if L > d:
            print(f"predictor recall@top-{K}, lookahead {d}: {pred.recall(t.hidden, t.ids, d):.3f}")
    slots = 2 * K * L
    hits = {}
    for policy in ("score", "lru", "static", "belady"):
        r = simulate(t, slots=slots, policy=policy, lookahead=1 if policy != "belady" else 0)
        hits[policy] = r.hit_rate
        print(f"policy {policy:<7} slots {slots} (2 x top-k per layer): hit rate {r.hit_rate:.3f}, "
              f"copied {r.bytes_copied / 2**30:.2f} GiB of K2-sized experts, decode estimate "
              f"{r.time_s / max(r.tokens, 1) * 1e3:.1f} ms/token vs CPU-only {r.cpu_only_time_s / max(r.tokens, 1) * 1e3:.1f}")
    if hits["lru"]:
        print(f"score / LRU hit-rate ratio: {hits['score'] / hits['lru']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
