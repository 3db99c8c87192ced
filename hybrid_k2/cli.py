"""`hybrid-k2` command line: generate | chat | serve | plan | bench | convert."""
from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import threading

MODEL_HELP = "an HF checkpoint directory, a .gguf file, or the preset 'demo' (written on first use, no download)"


def _add_load_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("--device", default=None, help="torch device for attention/shared experts (default: cuda if present, else cpu)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="accelerator compute dtype (default: bfloat16 on cuda, float32 on cpu)")
    p.add_argument("--experts", default="auto",
                   help="routed-expert backend: cpu (C kernels), hybrid (VRAM expert cache + CPU kernels), "
                        "torch (reference, dequantized on the device), auto (= cpu)")
    p.add_argument("--expert-format", default=None,
                   help="quantisation of routed experts at load: q4_0, q8_0, q4_k, q6_k, or native")
    p.add_argument("--dense-format", default="auto", choices=["auto", "float", "native", "q8_0", "q4_0", "fp8", "bf16"],
                   help="attention / dense FFN / shared-expert / lm_head matrices. CPU device: auto = GGML blocks "
                        "(a GGUF's own, an HF checkpoint's quantized to Q8_0), float = float tensors in torch; "
                        "accelerator: auto = the checkpoint's FP8 when it fits, else bf16")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for the expert kernels")
    p.add_argument("--ctx", type=int, default=None, help="context window in tokens (default: the model's)")
    p.add_argument("--vram", default=None, help="VRAM budget for the hybrid expert cache, e.g. 24GiB")
    p.add_argument("--cache-slots", type=int, default=None, help="hybrid: expert-cache slots (default: from --vram)")
    p.add_argument("--cache-policy", default="score", choices=["score", "lru", "static"],
                   help="hybrid: admission/eviction policy (default score = decayed frequency + predicted use)")
    p.add_argument("--no-prefetch", action="store_true", help="hybrid: do not prefetch predicted experts")
    p.add_argument("--lookahead", type=int, default=3,
                   help="hybrid: layers ahead the predictor prefetches (a copy takes about a layer's time)")
    p.add_argument("--prefill-stream", default="auto", choices=["auto", "on", "off"],
                   help="hybrid: stream a long prompt's experts to the accelerator when the cost model says it beats "
                        "the CPU (auto), always, or never")
    p.add_argument("--defer-experts", type=int, default=0,
                   help="decode: each token's N lowest-weighted experts finish one layer late (default 0 = off; "
                        "bench/bench_deferral.py measures the accuracy cost)")


class UsageError(ValueError):
    """An argument (or a model) the command cannot work with: an `error:` line and exit 2. The arguments are
    checked before anything is loaded (a load can take minutes)."""


def _check_device(name: str | None) -> None:
    if name is None:
        return
    import torch
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {name!r}: expected cpu, cuda or cuda:N") from None
    if dev.type == "cpu":
        return
    if dev.type != "cuda":
        raise UsageError(f"--device {name!r}: expected cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise UsageError(f"--device {name!r}: torch sees no CUDA device (torch {torch.__version__}, CUDA build "
                         f"{torch.version.cuda}); use --device cpu")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UsageError(f"--device {name!r}: there are {torch.cuda.device_count()} CUDA devices")


def _check_load_args(args) -> None:
    """Everything about the load flags that can be known without reading the model (a load can take minutes)."""
    if args.threads is not None and not 1 <= args.threads <= 1024:
        raise UsageError(f"--threads must be in [1, 1024], got {args.threads}")
    if args.ctx is not None and args.ctx < 1:
        raise UsageError(f"--ctx must be >= 1, got {args.ctx}")
    for flag, v in (("--cache-slots", args.cache_slots), ("--lookahead", args.lookahead),
                    ("--defer-experts", args.defer_experts)):
        if v is not None and v < 0:
            raise UsageError(f"{flag} must be >= 0, got {v}")
    _check_device(args.device)
    args.vram_bytes = None
    if args.vram is not None:
        from .placement import parse_size
        try:
            vram = parse_size(args.vram, "--vram")
        except OverflowError:
            vram = math.inf
        if not 0 <= vram < 2**63:
            raise UsageError(f"--vram {args.vram!r}: not a size this machine can have")
        args.vram_bytes = vram


def _check_sampling_args(args) -> None:
    from .generate import SamplingParams
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    try:
        SamplingParams(args.temperature, args.top_p, args.top_k, args.min_p, args.repetition_penalty).validate()
    except ValueError as e:
        raise UsageError(f"--{str(e).replace('_', '-')}") from None
    if args.stop is not None and "" in args.stop:
        raise UsageError("--stop: a stop string must be non-empty")


def _load(args):
    import hybrid_k2
    vram = args.vram_bytes
    engine = hybrid_k2.load(args.model, device=args.device, dtype=args.dtype, experts=args.experts,
                            expert_format=args.expert_format, dense_format=args.dense_format, threads=args.threads,
                            ctx=args.ctx, progress=True,
                            vram_budget=vram, cache_slots=args.cache_slots, cache_policy=args.cache_policy,
                            prefetch=not args.no_prefetch, lookahead=args.lookahead, defer_experts=args.defer_experts,
                            prefill_stream=None if args.experts != "hybrid" or args.prefill_stream == "auto"
                            else args.prefill_stream == "on")
    return engine


def _add_sampling_flags(p: argparse.ArgumentParser, max_new: int) -> None:
    p.add_argument("-n", "--max-new-tokens", type=int, default=max_new)
    p.add_argument("--temperature", type=float, default=0.6, help="0 = greedy (default 0.6, Kimi K2's recommendation)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None, help="same seed, same output")
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")


def _sampling(args) -> dict:
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                top_k=args.top_k, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                seed=args.seed, stop=args.stop)


def cmd_generate(args) -> int:
    _check_load_args(args)
    _check_sampling_args(args)
    if not args.chat and not args.prompt:
        raise UsageError("--prompt is empty")
    engine = _load(args)
    try:
        if engine.tokenizer is None:
            raise UsageError(f"{args.model} has no tokenizer (tiktoken.model); cannot generate text")
        prompt = [{"role": "user", "content": args.prompt}] if args.chat else args.prompt
        stream = engine.generate(prompt, stream=True, **_sampling(args))
        try:
            for piece in stream:
                sys.stdout.write(piece)
                sys.stdout.flush()
        finally:
            stream.close()      # an interrupted stream lets go of the engine now, not when the traceback dies
            sys.stdout.write("\n")
            sys.stdout.flush()
        print(f"[{engine.stats}]", file=sys.stderr)
    finally:
        engine.close()
    return 0


def cmd_chat(args) -> int:
    from .chat import ChatSession
    _check_load_args(args)
    _check_sampling_args(args)
    engine = _load(args)
    try:
        if engine.tokenizer is None:
            raise UsageError(f"{args.model} has no tokenizer (tiktoken.model); cannot chat")
        sampling = _sampling(args)
        sampling.pop("stop")
        return ChatSession(engine, system=args.system, **sampling).loop()
    finally:
        engine.close()


def cmd_serve(args) -> int:
    _check_load_args(args)
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be in [0, 65535], got {args.port}")
    if args.max_queue < 0:
        raise UsageError(f"--max-queue must be >= 0, got {args.max_queue}")
    if args.api_key is not None and not args.api_key:
        raise UsageError("--api-key is empty")
    try:
        from .server import serve
    except ImportError as e:
        raise UsageError(f"serve needs the server extra: pip install 'hybrid_k2[server]' ({e})") from None
    holder = {}

    def loader():   # in a thread: the port answers (/health 503) while the model loads
        holder["engine"] = _load(args)
        return holder["engine"]
    try:
        serve(loader=loader, host=args.host, port=args.port, served_model_name=args.served_model_name,
              api_key=args.api_key, max_queue=args.max_queue, stream_interval=args.stream_interval)
    finally:
        if "engine" in holder:
            holder["engine"].close()
    return 0


def cmd_convert(args) -> int:
    from .convert import convert
    convert(args.hf_dir, args.out, experts=args.experts, other=args.other, progress=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="hybrid-k2", description="Kimi K2 inference with routed experts on CPU kernels.")
    sub = ap.add_subparsers(dest="cmd", required=True)

    g = sub.add_parser("generate", help="complete a prompt and print tok/s",
                       description="Complete a prompt, streaming tokens; prints prefill/decode tok/s to stderr.")
    _add_load_flags(g)
    g.add_argument("-p", "--prompt", required=True, help="prompt text")
    g.add_argument("--chat", action="store_true", help="wrap the prompt as one user turn of the chat template")
    _add_sampling_flags(g, 64)
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("chat", help="interactive multi-turn chat")
    _add_load_flags(c)
    c.add_argument("--system", default=None, help="system prompt")
    _add_sampling_flags(c, 512)
    c.set_defaults(func=cmd_chat)

    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server (chat/completions, tools, streaming, JSON)",
                       description="Serve the model over the OpenAI API: /v1/chat/completions, /v1/completions, "
                                   "/v1/models, /health, /metrics, /tokenize, /detokenize.")
    _add_load_flags(s)
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` (else 401)")
    s.add_argument("--served-model-name", default="hybrid-k2", help="the model id clients name (default hybrid-k2)")
    s.add_argument("--max-queue", type=int, default=64,
                   help="requests that may wait for the engine; more get 429 (default 64)")
    s.add_argument("--stream-interval", type=float, default=0.02,
                   help="seconds between a stream's writes (pieces generated meanwhile go out together; default 0.02)")
    s.set_defaults(func=cmd_serve)

    pl = sub.add_parser("plan", add_help=False, help="placement under VRAM/RAM budgets and predicted tok/s",
                        description="See `hybrid-k2 plan --help`.")
    pl.add_argument("rest", nargs=argparse.REMAINDER)

    b = sub.add_parser("bench", add_help=False, help="decode/prefill tok/s vs llama.cpp on the same GGUF",
                       description="See `hybrid-k2 bench --help`.")
    b.add_argument("rest", nargs=argparse.REMAINDER)

    v = sub.add_parser("convert", help="HF checkpoint -> GGUF with quantised experts")
    v.add_argument("hf_dir")
    v.add_argument("out", help="output .gguf path")
    v.add_argument("--experts", default="q4_0", help="routed expert format: q4_0, q8_0, q4_k, q6_k")
    v.add_argument("--other", default="q8_0", help="format of the other matrices: q8_0, bf16, f16, f32")
    v.set_defaults(func=cmd_convert)
    return ap


PASSTHROUGH = {"plan": "hybrid_k2.placement", "bench": "hybrid_k2.versus_llama"}   # commands with their own parsers


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so the command unwinds (streams closed, files removed) as on Ctrl-C.
    A BaseException, like KeyboardInterrupt, so no `except Exception` on the way swallows it."""


def _on_sigterm(signum, frame):
    raise Terminated


def main(argv=None) -> int:
    as_command = argv is None and threading.current_thread() is threading.main_thread()
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in PASSTHROUGH:   # argparse.REMAINDER would not pass `--help` through
        import importlib
        return importlib.import_module(PASSTHROUGH[argv[0]]).main(argv[1:])
    args = build_parser().parse_args(argv)
    restore = signal.signal(signal.SIGTERM, _on_sigterm) if as_command else None
    try:
        return args.func(args)
    except (ValueError, OSError, MemoryError) as e:   # CheckpointError and ConfigError are ValueErrors
        if isinstance(e, BrokenPipeError):   # `hybrid-k2 generate ... | head`: the reader left; say nothing
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 141
        print(f"error: {str(e) or type(e).__name__}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hybrid-k2: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("hybrid-k2: terminated (SIGTERM)", file=sys.stderr)
        return 143
    finally:
        if restore is not None:
            signal.signal(signal.SIGTERM, restore)


if __name__ == "__main__":
    sys.exit(main())
