"""Server overhead and grammar cost.

1. Time to first token and decode tok/s of one prompt through `hybrid-k2 serve` (real HTTP, the `openai`
   client in its own process, streaming) vs Engine.generate directly, same prompt, same greedy tokens; and
   the engine's own decode speed inside the server (what CPU and GIL sharing with the HTTP side cost it).
2. Decode time per token with a JSON schema's grammar mask (an answer as long as --tokens) vs without, vs
   the same tokens replayed without it, and with tool_choice auto's tool grammar waiting for a section.

    python bench/bench_server.py [MODEL] [--tokens 128] [--repeats 5] [--threads N] [--stream-interval S]

MODEL is anything load() takes with a tokenizer, e.g. the K2-shaped GGUF `hybrid-k2 bench` writes
(~/.cache/hybrid_k2/bench/k2shaped-L3-E32-V4352-q4_0.gguf), whose per-token cost is a real model's.
"""
from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import threading
import time


def _direct(engine, ids, n):
    t0 = time.perf_counter()
    first = None
    gen = None
    for ev in engine.generate_events(ids, max_new_tokens=n, temperature=0):
        if first is None and isinstance(ev, str):
            first = time.perf_counter()
        gen = ev
    end = time.perf_counter()
    return first - t0, (gen.stats.generated_tokens - 1) / (end - first), gen.stats.generated_tokens


# The client runs in its own process, as a real one does: in the server's process it would share the GIL
# with the engine's thread and the event loop, and its SSE parsing would be counted as server overhead.
_CLIENT = r"""
import json, sys, time
import openai
url, model, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
ids = json.loads(sys.argv[4])
client = openai.OpenAI(base_url=url, api_key="x", max_retries=0)
for line in sys.stdin:
    t0 = time.perf_counter()
    first = usage = None
    for ch in client.completions.create(model=model, prompt=ids, max_tokens=n, temperature=0, stream=True,
                                        stream_options={"include_usage": True}):
        if first is None and ch.choices and ch.choices[0].text:
            first = time.perf_counter()
        if ch.usage is not None:
            usage = ch.usage
    end = time.perf_counter()
    print(json.dumps([first - t0, (usage.completion_tokens - 1) / (end - first), usage.completion_tokens]),
          flush=True)
"""


def _served(client):
    client.stdin.write("go\n")
    client.stdin.flush()
    return tuple(json.loads(client.stdout.readline()))


def _per_token(engine, ids, n, proc):
    kw = {"logits_processor": proc} if proc is not None else {}
    g = engine.generate(ids, max_new_tokens=n, temperature=0, **kw)
    return g.stats.decode_s / max(g.stats.generated_tokens - 1, 1), g.token_ids


def _replay(tokens):
    """A processor that makes the model write `tokens` again, without a grammar: a constrained run writes other
    tokens than a free one, and those cost their own (other experts, other text), which is not the mask's."""
    import torch

    def f(generated, logits):
        t = tokens[len(generated)] if len(generated) < len(tokens) else tokens[-1]
        out = torch.full_like(logits, float("-inf"))
        out[t] = 0.0
        return out
    return f


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", nargs="?", default="demo")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--ctx", type=int, default=4096)
    ap.add_argument("--stream-interval", type=float, default=None,
                    help="the server's stream_interval in s (default: the server's own)")
    ap.add_argument("--threads", type=int, default=None,
                    help="kernel threads (default: all cores; fewer leave a core to the event loop and the client)")
    args = ap.parse_args(argv)
    import uvicorn

    import hybrid_k2
    from hybrid_k2.server import Server
    from hybrid_k2.server.grammar import GrammarMask, LazyToolMask, json_grammar

    engine = hybrid_k2.load(args.model, ctx=args.ctx, threads=args.threads)
    ids = engine.tokenizer.encode("Beautiful is better than ugly. Explicit is better than implicit. Simple is")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = Server(engine, served_model_name="bench",
                    **({} if args.stream_interval is None else {"stream_interval": args.stream_interval}))
    uv = uvicorn.Server(uvicorn.Config(server.app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=uv.run, daemon=True).start()
    while not uv.started:
        time.sleep(0.02)
    client = subprocess.Popen([sys.executable, "-c", _CLIENT, f"http://127.0.0.1:{port}/v1", "bench",
                               str(args.tokens), json.dumps(ids)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    rows = {"direct": [], "server": []}
    for r in range(args.repeats + 1):            # the first round warms up
        for name, fn in (("direct", lambda: _direct(engine, ids, args.tokens)),
                         ("server", lambda: _served(client))):
            engine.reset()                          # both prefill the whole prompt
            out = fn()
            if name == "server":    # the engine's own decode speed inside the server (CPU contention shows here)
                out = out + (server.metrics.decode_tok_s,)
            if r:
                rows[name].append(out)
    print(f"{args.model}: {len(ids)}-token prompt, {rows['direct'][0][2]} tokens, median of {args.repeats}")
    med = {k: (statistics.median(x[0] for x in v), statistics.median(x[1] for x in v)) for k, v in rows.items()}
    for k, (ttft, tps) in med.items():
        print(f"  {k:7s} TTFT {ttft * 1e3:7.2f} ms   decode {tps:8.1f} tok/s")
    inner = statistics.median(x[3] for x in rows["server"])
    print(f"  the engine's own decode inside the server {inner:8.1f} tok/s (the rest is the HTTP path)")
    print(f"  server overhead: TTFT {(med['server'][0] / med['direct'][0] - 1):+.1%}, "
          f"decode {(1 - med['server'][1] / med['direct'][1]):+.1%} slower")

    tools = [("get_weather", {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]})]
    # a schema whose answer runs to --tokens (json_object lets a model stop after "{}")
    long_json = {"type": "object", "properties": {"text": {"type": "string", "minLength": 16 * args.tokens}},
                 "required": ["text"]}
    free, masked, replayed, idle = [], [], [], []
    for r in range(args.repeats + 1):
        engine.reset()
        f = _per_token(engine, ids, args.tokens, None)
        engine.reset()
        m = _per_token(engine, ids, args.tokens, GrammarMask(engine, json_grammar(long_json)))
        engine.reset()      # the constrained run's tokens, without the mask
        p = _per_token(engine, ids, args.tokens, _replay(m[1]))
        engine.reset()      # tool_choice auto: the tool grammar waits for a section the model does not open
        i = _per_token(engine, ids, args.tokens, LazyToolMask(engine, tools, 0))
        if r:
            free.append(f[0])
            masked.append(m[0])
            replayed.append(p[0])
            idle.append(i[0])
    a, b, p, c = (statistics.median(x) for x in (free, masked, replayed, idle))
    print(f"  decode per token: unconstrained {a * 1e3:.3f} ms, a JSON schema's grammar {b * 1e3:.3f} ms "
          f"({b / a - 1:+.1%}), its tokens replayed without the mask {p * 1e3:.3f} ms (the mask itself "
          f"{b / p - 1:+.1%}, {(b - p) * 1e3:.3f} ms a token); auto's idle tool grammar {c * 1e3:.3f} ms "
          f"({c / a - 1:+.1%})")
    client.stdin.close()
    client.wait()
    uv.should_exit = True


if __name__ == "__main__":
    main()
