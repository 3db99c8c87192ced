"""Small deterministic byte-level BPE trainer, used to make the demo model's tiktoken.model.

Ranks 0..255 are the single bytes; each further rank is the concatenation of the most frequent
adjacent pair. Training runs on pre-token counts (text split by Kimi's pattern, identical pieces
counted once), with incremental pair counts and a lazy max-heap, so thousands of merges over a few
MB of text take seconds. Ties on frequency go to the pair whose (left bytes, right bytes) sorts first.

    python -m hybrid_k2.bpe_train corpus.txt --vocab-size 4096 --out tiktoken.model
"""
from __future__ import annotations

import argparse
import base64
import heapq
import os
import sys
from collections import Counter, defaultdict
from collections.abc import Mapping

from .tokenizer import KIMI_PAT_STR


def _compile_pattern(pat_str: str):
    # Python's `re` has no \p{...}; the `regex` module does, and its VERSION1 mode understands the
    # `[A&&[^B]]` set intersection Kimi's pattern uses (tiktoken's Rust engine accepts it natively).
    try:
        import regex
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("hybrid_k2.bpe_train needs the 'regex' package (pip install regex)") from e
    return regex.compile(pat_str, flags=regex.VERSION1)


def pretokenize(text: str, pat_str: str = KIMI_PAT_STR) -> list[str]:
    """Split text into pre-tokens the way tiktoken does before BPE."""
    return _compile_pattern(pat_str).findall(text)


def train_bpe(text: str, vocab_size: int, pat_str: str = KIMI_PAT_STR) -> dict[bytes, int]:
    """Deterministic byte-level BPE: returns {token_bytes: rank} with ranks exactly 0..vocab_size-1."""
    if not isinstance(text, str):
        raise TypeError(f"train_bpe() expects str text, got {type(text).__name__}")
    if vocab_size < 256:
        raise ValueError(f"vocab_size must be at least 256 (the single bytes), got {vocab_size}")

    token_bytes: list[bytes] = [bytes([b]) for b in range(256)]
    id_of: dict[bytes, int] = {t: i for i, t in enumerate(token_bytes)}

    counts = Counter(p.encode("utf-8") for p in pretokenize(text, pat_str))
    # sorted so word order (and thus every later step) does not depend on hash seeds
    words: list[list[int]] = []
    freqs: list[int] = []
    for piece, f in sorted(counts.items()):
        if len(piece) > 1:  # single bytes never take part in a merge
            words.append(list(piece))
            freqs.append(f)

    pair_count: dict[tuple[int, int], int] = defaultdict(int)
    pair_words: dict[tuple[int, int], set[int]] = defaultdict(set)
    for w, (word, f) in enumerate(zip(words, freqs)):
        for p in zip(word, word[1:]):
            pair_count[p] += f
            pair_words[p].add(w)

    def heap_entry(p: tuple[int, int]):
        return (-pair_count[p], token_bytes[p[0]], token_bytes[p[1]], p)

    heap = [heap_entry(p) for p in pair_count]
    heapq.heapify(heap)

    while len(token_bytes) < vocab_size:
        # pop the best pair whose recorded count is still current (stale entries are skipped)
        while heap:
            neg, _, _, pair = heapq.heappop(heap)
            if pair_count.get(pair, 0) == -neg and neg < 0:
                break
        else:
            raise ValueError(f"corpus too small: learned {len(token_bytes)} tokens, {vocab_size} requested "
                             f"(every pre-token is already a single token)")
        a, b = pair
        merged = token_bytes[a] + token_bytes[b]
        new_id = id_of.get(merged)
        if new_id is None:  # the same bytes can arise from two different pairs; keep one token
            new_id = len(token_bytes)
            token_bytes.append(merged)
            id_of[merged] = new_id

        changed: set[tuple[int, int]] = set()
        for w in sorted(pair_words.pop(pair)):
            word = words[w]
            f = freqs[w]
            out: list[int] = []
            i = 0
            hit = False
            while i < len(word):
                if i + 1 < len(word) and word[i] == a and word[i + 1] == b:
                    out.append(new_id)
                    i += 2
                    hit = True
                else:
                    out.append(word[i])
                    i += 1
            if not hit:  # stale index entry: the pair left this word in an earlier merge
                continue
            for p in zip(word, word[1:]):
                pair_count[p] -= f
                changed.add(p)
            for p in zip(out, out[1:]):
                pair_count[p] += f
                pair_words[p].add(w)
                changed.add(p)
            words[w] = out
        for p in changed:
            if pair_count[p] > 0:
                heapq.heappush(heap, heap_entry(p))
            else:
                del pair_count[p]
                pair_words.pop(p, None)

    return {t: i for i, t in enumerate(token_bytes)}


def write_tiktoken_model(path: str | os.PathLike, ranks: Mapping[bytes, int]) -> None:
    """Write ranks as tiktoken.model lines "base64(token) rank", in rank order."""
    items = sorted(ranks.items(), key=lambda kv: kv[1])
    if [r for _, r in items] != list(range(len(items))):
        raise ValueError("ranks must be exactly 0..N-1")
    tmp = os.fspath(path) + ".tmp"
    with open(tmp, "w", encoding="ascii") as f:
        for token, rank in items:
            f.write(f"{base64.b64encode(token).decode('ascii')} {rank}\n")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("inputs", nargs="+", help="UTF-8 text files to train on")
    ap.add_argument("--vocab-size", type=int, required=True, help="number of BPE tokens (>= 256)")
    ap.add_argument("--out", required=True, help="output tiktoken.model path")
    args = ap.parse_args(argv)
    text = "".join(open(p, encoding="utf-8").read() for p in args.inputs)
    ranks = train_bpe(text, args.vocab_size)
    write_tiktoken_model(args.out, ranks)
    print(f"wrote {len(ranks)} tokens to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
