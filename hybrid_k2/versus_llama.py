"""Decode and prefill tok/s: hybrid_k2 vs llama.cpp (llama-cpp-python, CPU, same threads) on the same GGUF.

Models:
  k2-shaped  Kimi K2's real expert matrices (hidden 7168, expert 2048, top-8, 1 shared) and MLA dims, a few MoE
             layers, fewer experts and heads and a small vocab so it fits this machine; written by this script
             (random weights, Q4_0 experts, Q8_0 elsewhere) through hybrid_k2.convert.write_gguf.
  demo       the demo checkpoint converted to GGUF (also run through HF transformers from its HF dir).
Prints prefill/decode tok/s for each engine (medians over rounds in which the engines take turns, so a drift in the
machine's memory bandwidth lands on both) and the ratios, plus the machine's read bandwidth. hybrid_k2 is loaded
with load()'s defaults, as a user gets them (attention, dense FFN, shared experts and lm_head from the GGUF's own
Q8_0 blocks in the C kernels, as llama.cpp runs them; torch then gets 1 thread for what is left), and when
llama-cpp-python is present the bench also prints how often our top-1 token on the prompt agrees with llama.cpp's
(both engines quantize activations to 8 bits, in different places, so a flat random-weight model agrees less than
a trained one would).

    pip install -e ".[bench]"         # llama-cpp-python: builds llama.cpp from source (minutes)
    hybrid-k2 bench --threads 2       # or: python bench/bench_decode.py --threads 2
"""
from __future__ import annotations

import argparse
import gc
import inspect
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

import hybrid_k2
from hybrid_k2 import kernels
from hybrid_k2.config import ModelConfig, preset
from hybrid_k2.convert import EXPERT_FORMATS, convert, write_gguf
from hybrid_k2.demo import cache_dir, ensure_demo
from hybrid_k2.synthetic import SyntheticCheckpoint


def k2_shaped_config(n_layers: int, n_experts: int, vocab: int) -> ModelConfig:
    k2 = preset("kimi-k2")
    return k2.replace(num_hidden_layers=n_layers + 1, n_routed_experts=n_experts, num_attention_heads=8,
                      vocab_size=vocab, first_k_dense_replace=1, intermediate_size=2048,
                      bos_token_id=vocab - 256, eos_token_id=vocab - 255, source="<k2-shaped bench>")


def build_k2_gguf(n_layers: int, n_experts: int, experts: str = "q4_0") -> Path:
    demo = ensure_demo()
    ranks = sum(1 for line in open(demo / "tiktoken.model") if line.strip())
    cfg = k2_shaped_config(n_layers, n_experts, ranks + 256)
    out = cache_dir() / "bench" / f"k2shaped-L{n_layers}-E{n_experts}-V{cfg.vocab_size}-{experts}.gguf"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        print(f"writing {out} ...", file=sys.stderr)
        write_gguf(SyntheticCheckpoint(cfg), cfg, str(out), tokenizer_dir=str(demo), name="k2-shaped-bench",
                   experts=experts, other="q8_0", progress=True)
    return out


def build_demo_gguf() -> Path:
    src = ensure_demo()
    out = cache_dir() / "bench" / f"demo-{src.name}-{os.stat(src / 'model.safetensors').st_size}-q8_0.gguf"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        convert(ensure_demo(), out, experts="q8_0", other="q8_0", progress=False)
    return out


def prompt_ids(vocab_base: int, n: int) -> list[int]:
    g = torch.Generator().manual_seed(1)
    return torch.randint(1, vocab_base, (n,), generator=g).tolist()


# ---- engines -------------------------------------------------------------------------------------
class HybridRunner:
    """hybrid_k2 on a GGUF, timed a round at a time (Rounds alternate with llama.cpp's, see main)."""

    def __init__(self, path: Path, prompt: list[int], n_decode: int, threads: int, dense_format: str = "auto"):
        # load()'s defaults, as a user gets them; with the kernels running the model, load() leaves torch one
        # thread (the caller, which is also the pool's thread 0): `threads` threads in all, as llama.cpp gets.
        self.eng = hybrid_k2.load(path, device="cpu", threads=threads, progress=False, dense_format=dense_format)
        self.torch_threads = torch.get_num_threads()   # restored each round (the other engines set their own)
        self.prompt, self.n_decode = prompt, n_decode
        self.round(warm_up=True)

    def round(self, warm_up: bool = False) -> tuple[float, float]:
        """(prefill tok/s of the prompt, decode tok/s of n_decode greedy tokens after it) on a fresh cache."""
        torch.set_num_threads(self.torch_threads)
        model, prompt = self.eng.model, self.prompt
        with torch.inference_mode():
            cache = model.new_cache(len(prompt) + self.n_decode + 1)
            if warm_up:   # first-call costs (allocations, the kernels' threads) stay outside the timed rounds
                model(torch.tensor(prompt[:-1]), 0, cache, last_only=True)
                model(torch.tensor(prompt[-1:]), len(prompt) - 1, cache, last_only=True)
                return 0.0, 0.0
            t0 = time.perf_counter()
            logits = model(torch.tensor(prompt), 0, cache, last_only=True)[-1]
            prefill = len(prompt) / (time.perf_counter() - t0)
            pos, tok = len(prompt), int(logits.argmax())
            t0 = time.perf_counter()
            for _ in range(self.n_decode):                                  # greedy, no stop tokens
                logits = model(torch.tensor([tok]), pos, cache, last_only=True)[-1]
                tok, pos = int(logits.argmax()), pos + 1
            return prefill, self.n_decode / (time.perf_counter() - t0)

    def prompt_logits(self) -> torch.Tensor:
        """logits [len(prompt), vocab] of an untimed full-prompt pass."""
        with torch.inference_mode():
            model = self.eng.model
            return model(torch.tensor(self.prompt), 0, model.new_cache(len(self.prompt))).float().clone()

    def close(self) -> None:
        self.eng.close()


def llama_cpp_rope_args(path: str | Path) -> dict:
    """llama-cpp-python's Llama() passes YaRN beta_fast=32, beta_slow=1 unless told, overriding the GGUF's own
    rope.scaling.yarn_beta_* (Kimi K2: 1 and 1), which changes the RoPE frequencies: its logits then drift from
    the reference model's with position. Pass the file's values."""
    from hybrid_k2.checkpoint import open_checkpoint
    with open_checkpoint(path) as ck:
        rs = ck.config().rope_scaling
    return dict(yarn_beta_fast=rs.beta_fast, yarn_beta_slow=rs.beta_slow) if rs.type == "yarn" else {}


# llama.cpp's extra weight buffer types (its repacked CPU layouts, AMX) abort in its scheduler on some CPUs for a
# deepseek2 GGUF (GGML_ASSERT(*cur_backend_id != -1), seen on an AMX Xeon). A probe in a child process says whether
# they work for a file; where they abort, llama.cpp runs with them off and the bench says so.
_EXTRA_BUFTS_PROBE = """
import sys, llama_cpp
llm = llama_cpp.Llama(model_path=sys.argv[1], n_threads=1, n_ctx=64, n_batch=32, n_gpu_layers=0, logits_all=True, verbose=False)
llm.eval(list(range(1, 33)))
"""
_extra_bufts_ok: dict[str, bool] = {}


def llama_cpp_extra_bufts(path: Path) -> bool:
    key = str(path)
    if key not in _extra_bufts_ok:
        import subprocess
        r = subprocess.run([sys.executable, "-c", _EXTRA_BUFTS_PROBE, key], capture_output=True, text=True)
        _extra_bufts_ok[key] = r.returncode == 0
        if r.returncode:
            cause = next((l for l in r.stderr.splitlines() if "GGML_ASSERT" in l), f"exit {r.returncode}")
            print(f"llama.cpp: its extra buffer types (repack/AMX) fail on this CPU for {path.name} "
                  f"({cause.strip()[-80:]}): running llama.cpp with use_extra_bufts=False", flush=True)
    return _extra_bufts_ok[key]


def llama_cpp_llama(path: Path, **kw):
    """llama_cpp.Llama on `path`, with llama.cpp's extra buffer types off where they abort (see above)."""
    import llama_cpp
    import llama_cpp.llama as mod
    if llama_cpp_extra_bufts(path):
        return llama_cpp.Llama(model_path=str(path), **kw)
    default = mod.llama_cpp.llama_model_default_params

    def without_extra_bufts():
        p = default()
        p.use_extra_bufts = False
        return p
    mod.llama_cpp.llama_model_default_params = without_extra_bufts   # Llama() takes no such argument
    try:
        return llama_cpp.Llama(model_path=str(path), **kw)
    finally:
        mod.llama_cpp.llama_model_default_params = default


def llama_cpp_quantize(src: str | Path, dst: str | Path, ftype: str, *, threads: int = 2, pure: bool = False) -> Path:
    """llama.cpp's own quantizer (llama_model_quantize, as llama-quantize runs it) on a GGUF: ftype is a
    llama-quantize name ('Q2_K', 'Q3_K_M', 'IQ4_XS', ...); pure: every tensor in that type where the rows allow it,
    instead of llama.cpp's per-tensor mix. A file that exists is reused."""
    import llama_cpp
    dst = Path(dst)
    if dst.exists():
        return dst
    code = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype.upper()}", None)
    if code is None:
        raise ValueError(f"ftype={ftype!r}: not a llama.cpp quantization type")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread, params.pure, params.allow_requantize = code, threads, pure, True
    part = dst.with_name(dst.name + ".part")
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(part).encode(), params)
    if rc != 0 or not part.exists():
        raise RuntimeError(f"llama_model_quantize {src} -> {ftype} failed (return code {rc})")
    os.replace(part, dst)
    return dst


def llama_cpp_prompt_logits(path: Path, prompt: list[int], threads: int) -> torch.Tensor | None:
    """llama.cpp's logits [len(prompt), vocab] for the prompt (a separate instance: logits_all slows the timed runs)."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return None
    llm = llama_cpp_llama(path, n_threads=threads, n_threads_batch=threads, n_ctx=len(prompt) + 16,
                          n_batch=len(prompt), n_gpu_layers=0, logits_all=True, verbose=False, seed=0,
                          **llama_cpp_rope_args(path))
    llm.eval(prompt)
    out = torch.from_numpy(np.array(llm.scores[:len(prompt)], dtype=np.float32))
    del llm
    gc.collect()
    return out


class LlamaCppRunner:
    """llama.cpp (llama-cpp-python) on the same GGUF with the same threads, timed a round at a time."""

    def __init__(self, path: Path, prompt: list[int], n_decode: int, threads: int):
        import llama_cpp
        self.llm = llama_cpp_llama(path, n_threads=threads, n_threads_batch=threads,
                                   n_ctx=len(prompt) + n_decode + 16, n_batch=max(len(prompt), 8), n_gpu_layers=0,
                                   verbose=False, seed=0, **llama_cpp_rope_args(path))
        self.prompt, self.n_decode = prompt, n_decode
        n_vocab = self.llm.n_vocab()
        # llama-cpp-python >= 0.3 keeps no scores without logits_all: read the context's last logits
        self.last_argmax = lambda: int(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.llm.ctx, -1),
                                                             shape=(n_vocab,)).argmax())
        self.llm.eval(prompt[:8])                                           # warm-up

    def round(self) -> tuple[float, float]:
        llm = self.llm
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(self.prompt)
        prefill = len(self.prompt) / (time.perf_counter() - t0)
        tok = self.last_argmax()
        t0 = time.perf_counter()
        for _ in range(self.n_decode):
            llm.eval([tok])
            tok = self.last_argmax()
        return prefill, self.n_decode / (time.perf_counter() - t0)

    def close(self) -> None:
        del self.llm
        gc.collect()


def run_rounds(runners: list, rounds: int) -> list[list[tuple[float, float]]]:
    """Per runner, (prefill, decode) tok/s of each round; the runners take turns, so a change in the machine's
    memory bandwidth (a VM's neighbours) lands on all of them instead of on whichever ran then."""
    out: list[list[tuple[float, float]]] = [[] for _ in runners]
    for _ in range(rounds):
        for i, r in enumerate(runners):
            time.sleep(0.3)    # the other engine's idle threads stop spinning first
            out[i].append(r.round())
    return out


def median(xs: list[float]) -> float:
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2


def run_transformers(hf_dir: Path, prompt: list[int], n_decode: int, threads: int) -> tuple[float, float] | None:
    try:
        from transformers import DeepseekV3Config, DeepseekV3ForCausalLM
    except ImportError:
        return None
    import json
    from hybrid_k2.checkpoint import open_checkpoint
    torch.set_num_threads(threads)
    d = json.loads((hf_dir / "config.json").read_text())
    d.pop("quantization_config", None)          # weights are dequantized here; HF's FP8 path wants a GPU
    d["model_type"] = "deepseek_v3"
    model = DeepseekV3ForCausalLM(DeepseekV3Config(**d))
    want = model.state_dict()
    with open_checkpoint(hf_dir) as ck:       # the same FP8 weights, dequantized
        sd = {n: ck.get(n) for n in ck.names() if n in want}
        for n in want:                        # transformers 5 fuses each layer's experts into 3-D tensors
            if n.endswith("mlp.experts.gate_up_proj") or n.endswith("mlp.experts.down_proj"):
                p, E = n.rsplit("experts.", 1)[0] + "experts.", d["n_routed_experts"]
                parts = (["gate_proj", "up_proj"] if n.endswith("gate_up_proj") else ["down_proj"])
                sd[n] = torch.stack([torch.cat([ck.get(f"{p}{e}.{q}.weight") for q in parts]) for e in range(E)])
    model.load_state_dict(sd, strict=True)
    model.eval()
    ids = torch.tensor([prompt])
    with torch.no_grad():
        t0 = time.perf_counter()
        out = model(ids, use_cache=True)
        prefill = len(prompt) / (time.perf_counter() - t0)
        # transformers 5 names the KV cache `cache`; 4.x `past_key_values`
        key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        past, tok = getattr(out, key), out.logits[0, -1].argmax().view(1, 1)
        t0 = time.perf_counter()
        for _ in range(n_decode):
            out = model(tok, use_cache=True, **{key: past})
            past, tok = getattr(out, key), out.logits[0, -1].argmax().view(1, 1)
        decode = n_decode / (time.perf_counter() - t0)
    return prefill, decode


def fmt(r):
    return "   n/a" if r is None else f"{r:6.1f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="hybrid-k2 bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--layers", type=int, default=3, help="MoE layers of the K2-shaped model")
    ap.add_argument("--experts", type=int, default=32, help="routed experts per layer of the K2-shaped model")
    ap.add_argument("--expert-format", default="q4_0", choices=list(EXPERT_FORMATS),
                    help="block format of the K2-shaped model's routed experts (written by our quantizer)")
    ap.add_argument("--prompt", type=int, default=64, help="prompt tokens (prefill)")
    ap.add_argument("--decode", type=int, default=32, help="decoded tokens per round")
    ap.add_argument("--rounds", type=int, default=5,
                    help="rounds per engine, taking turns (tok/s are medians over the rounds)")
    ap.add_argument("--models", default="k2-shaped,demo")
    ap.add_argument("--dense-format", default="auto", choices=["auto", "native", "q8_0", "float"],
                    help="hybrid_k2's non-expert matrices: auto = load()'s default (the GGUF's own blocks), "
                         "float = float32 torch")
    args = ap.parse_args(argv)
    if args.rounds < 1 or args.decode < 1 or args.prompt < 8:
        ap.error("--rounds and --decode must be at least 1, --prompt at least 8")
    # checked here, before the bandwidth probe and the model build (minutes), not by what they would raise
    if not 1 <= args.threads <= 1024:
        ap.error(f"--threads must be in [1, 1024], got {args.threads}")
    if args.layers < 1:
        ap.error(f"--layers must be at least 1, got {args.layers}")
    top_k = preset("kimi-k2").num_experts_per_tok
    if args.experts < top_k:
        ap.error(f"--experts must be at least Kimi K2's top-{top_k}, got {args.experts}")
    unknown = [m for m in args.models.split(",") if m not in ("k2-shaped", "demo")]
    if unknown:
        ap.error(f"--models: unknown model {unknown[0]!r}; expected k2-shaped and/or demo, comma-separated")
    kernels.set_threads(args.threads)

    buf = np.ones(1 << 30, dtype=np.uint8)
    kernels.read_probe(buf)
    t0 = time.perf_counter()
    for _ in range(3):
        kernels.read_probe(buf)
    bw = 3 * buf.nbytes / (time.perf_counter() - t0) / 1e9
    del buf
    print(f"machine: {os.cpu_count()} cores, kernels ISA {kernels.isa()}, {args.threads} threads, "
          f"read bandwidth {bw:.1f} GB/s (probe)")
    try:
        import llama_cpp
        print(f"llama.cpp: llama-cpp-python {llama_cpp.__version__}")
    except ImportError:
        print("llama.cpp: llama-cpp-python not installed (pip install llama-cpp-python); its columns read n/a")

    rows = []
    for name in args.models.split(","):
        if name == "k2-shaped":
            path, hf_dir = build_k2_gguf(args.layers, args.experts, args.expert_format), None
            label = (f"k2-shaped ({args.layers} MoE layers x {args.experts} experts, 7168x2048, top-8, "
                     f"{args.expert_format.upper()})")
        elif name == "demo":
            path, hf_dir = build_demo_gguf(), ensure_demo()
            label = "demo (Q8_0 GGUF)"
        else:
            raise SystemExit(f"unknown model {name!r}")
        base = sum(1 for line in open(ensure_demo() / "tiktoken.model") if line.strip())
        prompt = prompt_ids(base, args.prompt)
        runners = [HybridRunner(path, prompt, args.decode, args.threads, args.dense_format)]
        try:
            runners.append(LlamaCppRunner(path, prompt, args.decode, args.threads))
        except ImportError:
            pass
        try:
            per_round = run_rounds(runners, args.rounds)
            our_logits = runners[0].prompt_logits()
        finally:
            for r in runners:
                r.close()
        ours = tuple(median([x[k] for x in per_round[0]]) for k in (0, 1))
        ref = tuple(median([x[k] for x in per_round[1]]) for k in (0, 1)) if len(runners) > 1 else None
        round_ratios = ([(a[0] / b[0], a[1] / b[1]) for a, b in zip(per_round[0], per_round[1])]
                        if ref is not None else [])
        ref_logits = llama_cpp_prompt_logits(path, prompt, args.threads)
        agree = None
        if ref_logits is not None:
            n_vocab = min(our_logits.shape[-1], ref_logits.shape[-1])
            agree = float((our_logits[:, :n_vocab].argmax(-1) == ref_logits[:, :n_vocab].argmax(-1)).float().mean())
        hf = run_transformers(hf_dir, prompt, args.decode, args.threads) if hf_dir is not None else None
        rows.append((label, ours, ref, hf, agree, round_ratios))

    print(f"\nhybrid_k2 dense matrices: {runners[0].eng.dense_format if runners else args.dense_format}")
    print(f"{'model':<72} {'engine':<14} {'prefill tok/s':>13} {'decode tok/s':>12}")
    for label, ours, ref, hf, agree, round_ratios in rows:
        print(f"{label:<72} {'hybrid_k2':<14} {fmt(ours[0]):>13} {fmt(ours[1]):>12}")
        print(f"{'':<72} {'llama.cpp':<14} {fmt(ref and ref[0]):>13} {fmt(ref and ref[1]):>12}")
        if hf is not None:
            print(f"{'':<72} {'transformers':<14} {fmt(hf[0]):>13} {fmt(hf[1]):>12}")
        if ref is not None:
            print(f"{'':<72} {'ratio ours/llama.cpp':<22} prefill {ours[0] / ref[0]:.2f}  decode {ours[1] / ref[1]:.2f}")
            print(f"{'':<72} per round: prefill {' '.join(f'{r[0]:.2f}' for r in round_ratios)}  "
                  f"decode {' '.join(f'{r[1]:.2f}' for r in round_ratios)}")
        if agree is not None:
            print(f"{'':<72} top-1 agreement with llama.cpp on the {args.prompt}-token prompt: {agree:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
