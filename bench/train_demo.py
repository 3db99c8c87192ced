"""Train the packaged demo model: a small Kimi-K2-architecture MoE on the Python standard library's source.

    python bench/train_demo.py --out hybrid_k2/demo_model --minutes 20

The corpus is on every machine that runs Python: the stdlib's *.py files (sorted; site-packages, tests,
idlelib, encodings tables and pydoc_data left out). Every 20th file is held out. A byte-level BPE
(hybrid_k2.bpe_train) is trained on the training files; Kimi's 256 special ids follow it.

The forward is hybrid_k2.model.Transformer itself, so the exported weights are exactly what the engine runs.
Only two things differ from inference: the routed experts are a differentiable backend (stacked parameters,
the math of experts.torch_backend.TorchExperts), and the latent cache keeps each layer's tensor instead of
writing into one buffer (autograd cannot differentiate through those in-place writes).

Routing is learned as in DeepSeek-V3: gradients reach the router through the gate weights of the chosen
experts; balance comes from the auxiliary-loss-free correction bias (after each step
bias_e += gamma * sign(mean_load - load_e)) plus a tiny sequence-wise balance loss.

The result is exported in the real formats (FP8 e4m3 128x128 block-scaled linears, BF16 embeddings/norms/
router/lm_head, fp32 correction bias, tiktoken.model), reloaded through hybrid_k2.load and checked: held-out
loss after export, and samples from the `torch` and `cpu` expert backends, written to TRAINING.json.

Deterministic: fixed seeds, 2 threads, a fixed step count. --minutes is a guard: if the machine is so slow
that the steps do not fit, training stops early (with a warning), and the result is not the committed one.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import shutil
import sys
import sysconfig
import time
from pathlib import Path

# Idle OpenMP workers sleep instead of spinning: on a shared 2-core machine spinning threads make every op
# wait for a descheduled peer (measured 10x slower under load). Set before torch loads libgomp.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from a checkout without installing

import hybrid_k2   # noqa: E402
import hybrid_k2.experts.cpu   # noqa: E402,F401   (imported now: the checks after training load it)
import hybrid_k2.experts.torch_backend   # noqa: E402,F401
import hybrid_k2.routing   # noqa: E402,F401
from hybrid_k2.bpe_train import train_bpe, write_tiktoken_model   # noqa: E402
from hybrid_k2.checkpoint.quantize import fp8_block_quantize, save_safetensors   # noqa: E402
from hybrid_k2.config import ModelConfig   # noqa: E402
from hybrid_k2.demo import DEMO_CONFIG   # noqa: E402
from hybrid_k2.experts import ExpertBackend, expert_names   # noqa: E402
from hybrid_k2.model import MoE, Router, Transformer   # noqa: E402
from hybrid_k2.tokenizer import Tokenizer   # noqa: E402

SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idlelib", "encodings",
             "pydoc_data", "lib2to3", "turtledemo", "ensurepip"}
HOLDOUT_EVERY = 20          # file i is held out when i % 20 == 10: ~5% of files
BPE_TOKENS = 4096

MODEL = dict(
    hidden_size=256, intermediate_size=768, moe_intermediate_size=128, num_hidden_layers=6,
    num_attention_heads=4, q_lora_rank=128, kv_lora_rank=128, qk_nope_head_dim=32, qk_rope_head_dim=16,
    v_head_dim=32, n_routed_experts=32, n_shared_experts=1, num_experts_per_tok=4, first_k_dense_replace=1,
)

SAMPLE_PROMPTS = ["import os\nimport sys\n\n\ndef ", "class Parser:\n    def __init__(self"]


# ---------------------------------------------------------------------------------------------- data
def corpus_files(stdlib: Path) -> list[Path]:
    files = []
    for f in sorted(stdlib.rglob("*.py")):
        if set(f.relative_to(stdlib).parts[:-1]) & SKIP_DIRS:
            continue
        try:
            f.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            continue
        files.append(f)
    if not files:
        raise SystemExit(f"no *.py files found under {stdlib}")
    return files


def token_stream(tok: Tokenizer, texts: list[str]) -> torch.Tensor:
    """Each file as [BOS] text [EOS], concatenated."""
    ids: list[int] = []
    for t in texts:
        ids += [tok.bos_id] + tok.encode(t) + [tok.eos_id]
    return torch.tensor(ids, dtype=torch.long)


# ---------------------------------------------------------------------------------------------- training pieces
class TrainExperts(ExpertBackend):
    """Differentiable routed experts: per MoE layer gate/up [E,I,H], down [E,H,I] as Parameters.

    Same math as TorchExperts (silu(x gate^T) * (x up^T) down^T, weighted sum), computed as three batched
    matmuls over tokens grouped by expert (padded to the busiest expert's count). Also adds DeepSeek-V3's
    sequence-wise balance loss, which needs every expert's score, so it holds the routers.
    """
    name = "train"

    def __init__(self, cfg: ModelConfig, routers: dict[int, Router], gen: torch.Generator, std: float,
                 out_std: float, balance_alpha: float):
        E, I, H = cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.hidden_size
        self.E, self.K = E, cfg.num_experts_per_tok
        self.routers, self.alpha = routers, balance_alpha
        self.params: dict[int, tuple[torch.nn.Parameter, ...]] = {}
        for layer in routers:
            self.params[layer] = (torch.nn.Parameter(torch.randn(E, I, H, generator=gen) * std),
                                  torch.nn.Parameter(torch.randn(E, I, H, generator=gen) * std),
                                  torch.nn.Parameter(torch.randn(E, H, I, generator=gen) * out_std))
        self.aux: list[torch.Tensor] = []
        self.seq_len = 1                                         # tokens per sequence in the batch
        self.load = {layer: torch.zeros(E) for layer in routers}   # tokens routed per expert since last reset

    def parameters(self):
        return [p for ps in self.params.values() for p in ps]

    def forward(self, layer, x, ids, weights):
        gate, up, down = self.params[layer]
        T, K = ids.shape
        flat = ids.reshape(-1)
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=self.E)
        starts = counts.cumsum(0) - counts
        e_sorted = flat[order]
        slot = torch.arange(T * K) - starts[e_sorted]
        tok = order // K
        cap = int(counts.max())
        xe = x.new_zeros(self.E, cap, x.shape[1])
        xe = xe.index_put((e_sorted, slot), x.index_select(0, tok))
        h = F.silu(torch.bmm(xe, gate.transpose(1, 2))) * torch.bmm(xe, up.transpose(1, 2))
        out = torch.bmm(h, down.transpose(1, 2))[e_sorted, slot]          # [T*K, H] in sorted order
        y = torch.zeros_like(x).index_add(0, tok, out * weights.reshape(-1)[order, None])
        self.load[layer] += counts.float()
        if self.alpha and torch.is_grad_enabled():                         # per sequence of seq_len tokens
            n = T // self.seq_len
            s = torch.sigmoid(F.linear(x, self.routers[layer].weight)).view(n, self.seq_len, self.E)
            p = (s / s.sum(-1, keepdim=True)).mean(1)                        # P_i per sequence
            hits = F.one_hot(ids.view(n, -1), self.E).sum(1).float()         # tokens per expert per sequence
            f = hits * self.E / (K * self.seq_len)                           # f_i
            self.aux.append(self.alpha * (f * p).sum(-1).mean())
        return y


@torch.no_grad()
def check_experts(experts: TrainExperts, gen: torch.Generator) -> None:
    """TrainExperts computes what the engine's reference backend (TorchExperts) computes."""
    from hybrid_k2.experts.torch_backend import TorchExperts
    ref = TorchExperts({layer: tuple(p.detach() for p in ps) for layer, ps in experts.params.items()})
    layer = next(iter(experts.params))
    H = experts.params[layer][0].shape[2]
    x = torch.randn(37, H, generator=gen)
    ids = torch.rand(37, experts.E, generator=gen).topk(experts.K, dim=-1)[1]
    w = torch.rand(37, experts.K, generator=gen)
    load = experts.load[layer].clone()
    got, want = experts.forward(layer, x, ids, w), ref.forward(layer, x, ids, w)
    experts.load[layer] = load                   # leave the balancing counts as they were
    if not torch.allclose(got, want, rtol=1e-4, atol=1e-6):
        raise AssertionError(f"training experts differ from TorchExperts by {float((got - want).abs().max())}")


class _LayerSlots:
    """Stands in for KVCache.kv / .pe in training: `[layer, 0:T] = v` keeps v itself (no in-place write)."""

    def __init__(self):
        self.t: dict[int, torch.Tensor] = {}

    def __setitem__(self, key, value):
        layer, sl = key
        if sl.start not in (0, None):
            raise ValueError("the training cache holds whole sequences only")
        self.t[layer] = value

    def __getitem__(self, key):
        layer, sl = key
        return self.t[layer][sl]


class TrainCache:
    def __init__(self, max_len: int):
        self.max_len = max_len
        self.kv, self.pe = _LayerSlots(), _LayerSlots()


def init_weights(net: Transformer, gen: torch.Generator, std: float, out_std: float) -> None:
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("e_score_correction_bias"):
                p.zero_()
            elif p.dim() == 1:                               # RMSNorm gains
                p.fill_(1.0)
            elif name == "model.embed_tokens.weight":        # unit scale: a 0.02 embedding learned ~10x slower
                p.copy_(torch.randn(p.shape, generator=gen))
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                p.copy_(torch.randn(p.shape, generator=gen) * out_std)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * std)


def forward_batch(net: Transformer, ids: torch.Tensor) -> torch.Tensor:
    """ids [B, T] -> fp32 logits [B, T, vocab]: Transformer.forward for B sequences at once.

    The modules are the model's own; only Block.forward's two residual lines are spelled out here so that
    everything but attention (norms, dense FFN, router, experts, lm_head) runs on all B*T tokens in one call.
    check_forward_batch() asserts this equals Transformer.forward sequence by sequence.
    """
    B, T = ids.shape
    rope = net._rope[:T]
    caches = [TrainCache(T) for _ in range(B)]
    h = net.model.embed_tokens(ids)
    for layer in net.model.layers:
        a = layer.input_layernorm(h)
        h = h + torch.stack([layer.self_attn(a[b], 0, rope, caches[b], False) for b in range(B)])
        h = h + layer.mlp(layer.post_attention_layernorm(h).reshape(B * T, -1)).view_as(h)
    return net.lm_head(net.model.norm(h)).float()


@torch.no_grad()
def check_forward_batch(net: Transformer, ids: torch.Tensor) -> None:
    batched = forward_batch(net, ids)
    for b in range(ids.shape[0]):
        ref = net(ids[b], 0, TrainCache(ids.shape[1]))
        err = float((batched[b] - ref).abs().max())
        if err > 1e-4 * float(ref.abs().max()):
            raise AssertionError(f"batched training forward differs from Transformer.forward by {err}")


@torch.no_grad()
def eval_windows(stream: torch.Tensor, T: int, n: int) -> list[torch.Tensor]:
    """Non-overlapping windows of T+1 tokens spread evenly over the stream (deterministic)."""
    total = (len(stream) - 1) // T
    picks = sorted({int(i * total / n) for i in range(n)}) if total > n else range(total)
    return [stream[i * T:i * T + T + 1] for i in picks]


@torch.no_grad()
def mean_loss(logits_fn, windows: list[torch.Tensor]) -> float:
    tot, cnt = 0.0, 0
    for w in windows:
        logits = logits_fn(w[:-1])
        tot += float(F.cross_entropy(logits.float(), w[1:], reduction="sum"))
        cnt += len(w) - 1
    return tot / cnt


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


# ---------------------------------------------------------------------------------------------- export
def export(net: Transformer, experts: TrainExperts, cfg_dict: dict, out: Path) -> None:
    tensors: dict[str, torch.Tensor] = {}
    linear_names = {n for n, m in net.named_modules() if isinstance(m, torch.nn.Linear)} - {"lm_head"}
    for name, p in net.named_parameters():
        p = p.detach().float()
        module = name.rsplit(".", 1)[0]
        if name.endswith("e_score_correction_bias"):
            tensors[name] = p.clone()                                   # fp32, as in Kimi K2
        elif module in linear_names:
            tensors[name], tensors[module + ".weight_scale_inv"] = fp8_block_quantize(p)
        else:                                                           # embeddings, norms, router, lm_head
            tensors[name] = p.to(torch.bfloat16)
    for layer, ps in experts.params.items():
        for e in range(experts.E):
            for name, w in zip(expert_names(layer, e), ps):
                tensors[name], tensors[name.rsplit(".", 1)[0] + ".weight_scale_inv"] = \
                    fp8_block_quantize(w.detach()[e].float())
    save_safetensors(out / "model.safetensors", tensors, metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg_dict, indent=2) + "\n")


def routing_stats(ids: torch.Tensor, E: int) -> dict:
    """ids [tokens, K] for one layer -> load balance and how token-dependent the choice is."""
    load = torch.bincount(ids.reshape(-1), minlength=E).float()
    frac = load / load.sum()
    ent = float(-(frac[frac > 0] * frac[frac > 0].log()).sum() / math.log(E))
    return dict(max_over_mean_load=round(float(load.max() / load.mean()), 3),
                min_over_mean_load=round(float(load.min() / load.mean()), 3),
                load_entropy_norm=round(ent, 4),
                distinct_expert_sets=len({tuple(sorted(r)) for r in ids.tolist()}))


def training_md(summary: dict) -> str:
    """A short human-readable account of TRAINING.json."""
    t, loss, m = summary["training"], summary["loss_nats_per_token"], summary["model"]
    c = summary["corpus"]
    routing = summary["exported"]["torch"]["routing"]
    lines = [
        "# The demo model", "",
        "A small Kimi-K2-architecture MoE (MLA attention, first layer dense, sigmoid router with correction bias, "
        "1 shared + top-k routed experts) trained on the Python standard library's source by "
        "`bench/train_demo.py`. Files are in the real formats: FP8 e4m3 linears with 128x128 `weight_scale_inv`, "
        "BF16 embeddings/norms/router/lm_head, fp32 `e_score_correction_bias`, `tiktoken.model`. "
        "Full record: TRAINING.json.", "",
        f"Reproduce: `{summary['command']}` (Python {summary['python']}, torch {summary['torch']}; "
        f"corpus sha256 {c['sha256'][:16]}...; another Python version has another stdlib, hence another model).", "",
        f"- sizes: hidden {m['hidden_size']}, {m['num_hidden_layers']} layers (first {m['first_k_dense_replace']} "
        f"dense, intermediate {m['intermediate_size']}), {m['num_attention_heads']} heads, "
        f"{m['n_routed_experts']} experts top-{m['num_experts_per_tok']} + {m['n_shared_experts']} shared, "
        f"moe_intermediate {m['moe_intermediate_size']}, vocab {m['vocab_size']}; "
        f"{summary['parameters'] / 1e6:.1f}M parameters, {summary['active_parameters'] / 1e6:.1f}M active",
        f"- corpus: {c['train_files']} train files ({c['train_tokens']} tokens), {c['held_out_files']} held out "
        f"({c['held_out_tokens']} tokens)",
        f"- training: {t['steps']} steps x {t['batch']} x {t['ctx']} tokens = {t['tokens']} tokens, AdamW lr "
        f"{t['lr']} cosine, bias gamma {t['gamma']}, balance alpha {t['balance_alpha']}, {t['minutes']} min",
        f"- loss (nats/token): train {loss['train_fp32']}, held-out {loss['held_out_fp32']} (fp32); after FP8 "
        f"export {loss['held_out_exported_torch']} (experts=torch), {loss['held_out_exported_cpu']} (experts=cpu, "
        f"Q8_0); over {loss['eval_tokens']} held-out tokens",
        "- routing on held-out text (max/min expert load over mean): " + ", ".join(
            f"layer {k} {v['max_over_mean_load']}/{v['min_over_mean_load']}" for k, v in routing.items()),
        "", "Samples (experts=cpu):", "",
    ]
    for key, text in summary["exported"]["cpu"]["samples"].items():
        how, prompt = key.split(": ", 1) if key.startswith("temperature") else ("greedy", key)
        lines += [f"{how}, prompt {prompt!r}:", "```python", prompt + text, "```", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("hybrid_k2/demo_model"))
    ap.add_argument("--minutes", type=float, default=20.0, help="guard on training wall time (see module doc)")
    ap.add_argument("--steps", type=int, default=640)
    ap.add_argument("--batch", type=int, default=4, help="sequences per step")
    ap.add_argument("--ctx", type=int, default=256, help="tokens per training sequence")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--gamma", type=float, default=3e-3, help="correction-bias update speed")
    ap.add_argument("--balance-alpha", type=float, default=1e-4, help="sequence-wise balance loss weight")
    ap.add_argument("--eval-windows", type=int, default=48)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stdlib", type=Path, default=Path(sysconfig.get_paths()["stdlib"]))
    ap.add_argument("--layers", type=int, default=MODEL["num_hidden_layers"])
    ap.add_argument("--threads", type=int, default=2, help="torch threads (results can depend on it)")
    ap.add_argument("--bench", type=int, default=0, help="time this many steps and exit (sizing aid)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)    # else index backward accumulates in a racy order on 2 threads
    torch.manual_seed(args.seed)
    t_start = time.perf_counter()

    # ---- corpus and tokenizer
    files = corpus_files(args.stdlib)
    held = [f for i, f in enumerate(files) if i % HOLDOUT_EVERY == HOLDOUT_EVERY // 2]
    train = [f for i, f in enumerate(files) if i % HOLDOUT_EVERY != HOLDOUT_EVERY // 2]
    train_texts = [f.read_text(encoding="utf-8") for f in train]
    held_texts = [f.read_text(encoding="utf-8") for f in held]
    digest = hashlib.sha256()
    for f, t in zip(train + held, train_texts + held_texts):
        digest.update(str(f.relative_to(args.stdlib)).encode() + b"\0" + t.encode())
    work = args.out.with_name(args.out.name + ".partial")    # built here, moved into --out file by file at the end
    work.mkdir(parents=True, exist_ok=True)
    ranks = train_bpe("".join(train_texts), BPE_TOKENS)
    write_tiktoken_model(work / "tiktoken.model", ranks)
    tok = Tokenizer(work / "tiktoken.model")
    train_ids, held_ids = token_stream(tok, train_texts), token_stream(tok, held_texts)
    print(f"corpus: {len(train)} train files ({len(train_ids)} tokens), {len(held)} held out "
          f"({len(held_ids)} tokens); BPE {BPE_TOKENS} + 256 special; {time.perf_counter() - t_start:.0f}s",
          flush=True)

    # ---- model
    cfg_dict = dict(DEMO_CONFIG, **dict(MODEL, num_hidden_layers=args.layers), vocab_size=tok.vocab_size,
                    bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    cfg = ModelConfig.from_dict(cfg_dict, source="train_demo")
    gen = torch.Generator().manual_seed(args.seed)
    std, out_std = 0.02, 0.02 / math.sqrt(2 * cfg.num_hidden_layers)
    net = Transformer(cfg)
    init_weights(net, gen, std, out_std)
    routers = {i: layer.mlp.gate for i, layer in enumerate(net.model.layers) if isinstance(layer.mlp, MoE)}
    experts = TrainExperts(cfg, routers, gen, std, out_std, args.balance_alpha)
    net.set_experts(experts)
    net.new_cache(args.ctx)                      # builds the rope tables
    experts.seq_len = args.ctx
    check_forward_batch(net, torch.randint(0, BPE_TOKENS, (2, 64), generator=gen))   # its routing counts join step 0's
    check_experts(experts, gen)                  # `gen` is not used after this: the check changes no result
    biases = [r.e_score_correction_bias for r in routers.values()]
    for b in biases:
        b.requires_grad_(False)                  # moved by the balancing rule, never by gradients
    decay = [p for n, p in net.named_parameters() if p.requires_grad and p.dim() >= 2] + experts.parameters()
    no_decay = [p for n, p in net.named_parameters() if p.requires_grad and p.dim() < 2]
    opt = torch.optim.AdamW([dict(params=decay, weight_decay=0.1), dict(params=no_decay, weight_decay=0.0)],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    n_params = sum(p.numel() for p in decay + no_decay)
    active = n_params - sum(p.numel() for p in experts.parameters()) * (1 - cfg.num_experts_per_tok / cfg.n_routed_experts)
    print(f"model: {n_params / 1e6:.2f}M parameters ({active / 1e6:.2f}M active per token)", flush=True)

    # ---- train
    steps = args.bench or args.steps
    warmup = max(1, steps // 30)
    data_gen = torch.Generator().manual_seed(args.seed + 1)
    held_windows = eval_windows(held_ids, args.ctx, args.eval_windows)
    log, stopped_early = [], None
    t_train = time.perf_counter()
    for step in range(steps):
        lr = lr_at(step, steps, args.lr, warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        starts = torch.randint(0, len(train_ids) - args.ctx - 1, (args.batch,), generator=data_gen)
        batch = torch.stack([train_ids[s:s + args.ctx + 1] for s in starts.tolist()])
        opt.zero_grad(set_to_none=True)
        experts.aux.clear()
        logits = forward_batch(net, batch[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        aux = torch.stack(experts.aux).sum() if experts.aux else 0.0
        (loss + aux).backward()
        train_loss = float(loss.detach())
        torch.nn.utils.clip_grad_norm_(decay + no_decay, 1.0)
        opt.step()
        with torch.no_grad():                    # auxiliary-loss-free balancing (DeepSeek-V3 sec. 2.1.2)
            for layer, b in zip(routers, biases):
                load = experts.load[layer]
                b += args.gamma * torch.sign(load.mean() - load)
                load.zero_()
        elapsed = time.perf_counter() - t_train
        if step % 25 == 0 or step == steps - 1:
            tok_s = (step + 1) * args.batch * args.ctx / elapsed
            print(f"step {step:5d}  loss {train_loss:.3f}  lr {lr:.2e}  {tok_s:.0f} tok/s  "
                  f"{elapsed / 60:.1f} min", flush=True)
            log.append(dict(step=step, train_loss=round(train_loss, 4)))
        if elapsed > args.minutes * 60 and step < steps - 1:
            stopped_early = step + 1
            print(f"WARNING: --minutes {args.minutes} reached after {step + 1}/{steps} steps; stopping early, "
                  "so this run does not reproduce the committed model", flush=True)
            break
    train_s = time.perf_counter() - t_train
    tokens_trained = (stopped_early or steps) * args.batch * args.ctx
    if args.bench:
        print(f"bench: {tokens_trained / train_s:.0f} tok/s, {train_s / steps:.2f} s/step")
        shutil.rmtree(work)
        return 0

    # ---- evaluate the fp32 model
    net.eval()
    with torch.no_grad():
        fp32_logits = lambda ids: net(ids, 0, TrainCache(len(ids)))   # noqa: E731   (Transformer.forward)
        held_fp32 = mean_loss(fp32_logits, held_windows)
        train_fp32 = mean_loss(fp32_logits, eval_windows(train_ids, args.ctx, args.eval_windows))
    print(f"fp32: train loss {train_fp32:.4f}, held-out loss {held_fp32:.4f} nats/token", flush=True)

    # ---- export and check through the engine
    export(net, experts, cfg_dict, work)
    report: dict = {}
    for backend in ("torch", "cpu"):
        trace = work / f".routing-{backend}.npz"
        eng = hybrid_k2.load(work, device="cpu", dtype=torch.float32, experts=backend, threads=2,
                             ctx=2 * args.ctx, record_routing=trace if backend == "torch" else None)
        held_q = mean_loss(lambda ids: eng.logits(ids.tolist()), held_windows)
        samples = {p: eng.generate(p, max_new_tokens=80, temperature=0).text for p in SAMPLE_PROMPTS}
        for p in SAMPLE_PROMPTS:
            samples["temperature 0.7, seed 0: " + p] = eng.generate(
                p, max_new_tokens=160, temperature=0.7, top_p=0.95, seed=0).text
        stats = None
        if eng.recorder is not None:
            eng.recorder.save()
            ids = torch.from_numpy(np.load(trace)["ids"].astype("int64"))
            stats = {str(layer): routing_stats(ids[:, j], cfg.n_routed_experts)
                     for j, layer in enumerate(cfg.moe_layers)}
            eng.recorder = None
            os.remove(trace)
        eng.close()
        report[backend] = dict(held_out_loss=round(held_q, 4), samples=samples, **({"routing": stats} if stats else {}))
        print(f"exported, experts={backend}: held-out loss {held_q:.4f}", flush=True)
        for p, text in samples.items():
            print(f"--- {p!r}\n{text}", flush=True)

    sizes = {f.name: f.stat().st_size for f in sorted(work.iterdir()) if f.is_file()}
    summary = dict(
        command=" ".join(["python bench/train_demo.py", *(sys.argv[1:] if argv is None else argv)]),
        python=platform.python_version(), torch=torch.__version__,
        corpus=dict(root="sysconfig.get_paths()['stdlib']", train_files=len(train), held_out_files=len(held),
                    train_tokens=len(train_ids), held_out_tokens=len(held_ids), sha256=digest.hexdigest()),
        model={k: cfg_dict[k] for k in (*MODEL, "vocab_size")}, parameters=n_params, active_parameters=int(active),
        training=dict(steps=steps, stopped_early_at=stopped_early, batch=args.batch, ctx=args.ctx,
                      tokens=tokens_trained, lr=args.lr, gamma=args.gamma, balance_alpha=args.balance_alpha,
                      seed=args.seed, minutes=round(train_s / 60, 2), log=log),
        loss_nats_per_token=dict(train_fp32=round(train_fp32, 4), held_out_fp32=round(held_fp32, 4),
                                 held_out_exported_torch=report["torch"]["held_out_loss"],
                                 held_out_exported_cpu=report["cpu"]["held_out_loss"],
                                 eval_tokens=sum(len(w) - 1 for w in held_windows)),
        exported=report, file_bytes=sizes, total_minutes=round((time.perf_counter() - t_start) / 60, 2),
    )
    (work / "TRAINING.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    (work / "TRAINING.md").write_text(training_md(summary))
    args.out.mkdir(parents=True, exist_ok=True)
    for f in sorted(work.iterdir()):
        os.replace(f, args.out / f.name)
    work.rmdir()
    print(f"wrote {args.out} ({sum(sizes.values()) / 1e6:.1f} MB) in {summary['total_minutes']} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
