"""Accuracy cost of expert deferral (load(..., defer_experts=n)), measured on the trained demo.

Teacher-forced decode, one token at a time (deferral applies to decode only), over held-out text (stdlib
files the demo never trained on, as bench_prefetch.py): mean next-token loss and top-1 agreement with n = 0.
What deferral buys — CPU expert work overlapping the next layer on an accelerator — needs a GPU to measure.

    python bench/bench_deferral.py [--tokens 1024] [--defer 0,1,2]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hybrid_k2  # noqa: E402
from bench_prefetch import held_out_text  # noqa: E402


def decode_logits(eng, ids: list[int]) -> torch.Tensor:
    """[len(ids) - 1, vocab]: the logits after each prefix, every position decoded as one token."""
    model = eng.model
    with torch.inference_mode():
        cache = model.new_cache(len(ids))
        out = [model(torch.tensor(ids[:1]), 0, cache)[-1]]
        for pos in range(1, len(ids) - 1):
            out.append(model(torch.tensor(ids[pos:pos + 1]), pos, cache)[-1])
    return torch.stack(out).float()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="demo")
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--defer", default="0,1,2")
    ap.add_argument("--experts", default="cpu", help="expert backend (cpu, torch)")
    args = ap.parse_args()
    torch.manual_seed(0)
    base = None
    for n in (int(v) for v in args.defer.split(",")):
        eng = hybrid_k2.load(args.model, device="cpu", experts=args.experts, defer_experts=n, progress=False)
        ids = eng.tokenizer.encode(held_out_text(args.tokens * 8))[:args.tokens]
        logits = decode_logits(eng, ids)
        target = torch.tensor(ids[1:])
        nll = float(torch.nn.functional.cross_entropy(logits, target))
        top1 = logits.argmax(-1)
        if base is None:
            base = top1
        agree = float((top1 == base).float().mean())
        acc = float((top1 == target).float().mean())
        print(f"defer_experts={n} (of top-{eng.cfg.num_experts_per_tok}): held-out loss {nll:.4f} nats/token, "
              f"next-token accuracy {acc:.3f}, top-1 agreement with defer 0: {agree:.3f}  ({len(ids) - 1} tokens)")
        eng.close()


if __name__ == "__main__":
    main()
