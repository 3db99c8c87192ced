"""Engine: prompt in, tokens out. Sampling, stop conditions, streaming and throughput stats."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from .model import Transformer
from .tokenizer import parse_tool_calls


class ContextOverflowError(ValueError):
    """The prompt (plus the tokens asked for) does not fit the context window."""


@dataclass
class SamplingParams:
    temperature: float = 0.6          # Kimi K2's recommended default
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0

    def validate(self) -> None:
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 <= self.min_p < 1:
            raise ValueError(f"min_p must be in [0, 1), got {self.min_p}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")


def sample(logits: torch.Tensor, p: SamplingParams, history: Sequence[int], gen: torch.Generator | None,
           suppress: torch.Tensor | None = None) -> int:
    """logits [vocab] fp32 -> token id. temperature 0 is greedy. `suppress` ids are never sampled."""
    logits = logits.float().clone()
    if suppress is not None:
        logits[suppress] = float("-inf")
    if p.repetition_penalty != 1.0 and len(history):
        prev = torch.tensor(sorted(set(history)))
        vals = logits[prev]
        logits[prev] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
    if p.temperature == 0:
        return int(logits.argmax())
    logits = logits / p.temperature
    if p.top_k > 0:
        kth = logits.topk(min(p.top_k, logits.numel()))[0][-1]
        logits[logits < kth] = float("-inf")
    probs = logits.softmax(-1)
    if p.min_p > 0:
        probs[probs < p.min_p * probs.max()] = 0
    if p.top_p < 1.0:
        sp, si = probs.sort(descending=True)
        drop = sp.cumsum(0) - sp > p.top_p   # keep the smallest prefix whose mass reaches top_p
        sp[drop] = 0
        probs = torch.zeros_like(probs).scatter_(0, si, sp)
    return int(torch.multinomial(probs.cpu(), 1, generator=gen))


@dataclass
class Stats:
    prompt_tokens: int = 0             # prefilled this turn
    reused_tokens: int = 0             # prompt prefix whose cached latents were reused
    generated_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    experts: dict | None = None        # the expert backend's counters (hybrid: cache hits, bytes copied, ...)

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tok_s(self) -> float:
        # the first generated token comes from prefill; the rest from decode steps
        steps = max(self.generated_tokens - 1, 0)
        return steps / self.decode_s if self.decode_s else 0.0

    def __str__(self) -> str:
        return (f"prefill {self.prompt_tokens} tok @ {self.prefill_tok_s:.1f} tok/s, "
                f"decode {self.generated_tokens} tok @ {self.decode_tok_s:.1f} tok/s")


@dataclass
class Generation:
    text: str                          # everything generated, tool-call markup included
    token_ids: list[int]
    finish_reason: str                 # "stop" (EOS / <|im_end|> / stop string) or "length"
    stats: Stats = field(default_factory=Stats)
    content: str = ""                  # text without the tool-call section
    tool_calls: list[dict] = field(default_factory=list)   # OpenAI-style, parsed from Kimi K2's markup

    def __str__(self) -> str:
        return self.text


def _inference(gen: Iterator) -> Iterator:
    """Run a generator's steps under inference_mode (a `with` around a yield would leak the mode to the caller)."""
    while True:
        with torch.inference_mode():
            try:
                item = next(gen)
            except StopIteration:
                return
        yield item


class Engine:
    def __init__(self, model: Transformer, tokenizer, *, ctx: int | None = None, experts=None, checkpoint=None,
                 recorder=None):
        self.model = model
        self.cfg = model.cfg
        self.tokenizer = tokenizer
        self.ctx = min(ctx or self.cfg.max_position_embeddings, self.cfg.max_position_embeddings)
        self.experts = experts
        self.checkpoint = checkpoint
        self.recorder = recorder     # routing trace, saved after each generate() and on close()
        self.stats = Stats()
        self._cache = None
        self._cached_ids: list[int] = []   # tokens whose latents sit in self._cache (reused as a prompt prefix)
        # reserved special ids carry no meaning: a trained model never emits them, an untrained one must not
        reserved = [i for n, i in (tokenizer.special_tokens.items() if tokenizer else ())
                    if n.startswith("<|reserved_token_") and i < self.cfg.vocab_size]
        self.suppressed_ids = torch.tensor(sorted(reserved), dtype=torch.long) if reserved else None

    @property
    def device(self) -> torch.device:
        return self.model.model.embed_tokens.weight.device

    def close(self) -> None:
        if self.recorder is not None and self.recorder.tokens:
            self.recorder.save()
        if self.experts is not None:
            self.experts.close()
        if self.checkpoint is not None:
            self.checkpoint.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- prompts ---------------------------------------------------------------------------------
    def encode_prompt(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(m, dict) for m in prompt):
            return self.tokenizer.encode_chat(list(prompt), add_generation_prompt=True)
        if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            ids = list(prompt)
            bad = [t for t in ids if not 0 <= t < self.cfg.vocab_size]
            if bad:
                raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary [0, {self.cfg.vocab_size})")
            return ids
        raise TypeError("prompt must be a string, a list of token ids, or a list of chat messages "
                        "({'role': ..., 'content': ...})")

    def _check_len(self, n_prompt: int, max_new_tokens: int) -> None:
        if n_prompt == 0:
            raise ValueError("prompt is empty")
        if n_prompt >= self.ctx:
            raise ContextOverflowError(
                f"prompt has {n_prompt} tokens but the context window is {self.ctx}; shorten the prompt "
                f"or load with a larger ctx (the model allows up to {self.cfg.max_position_embeddings})")

    def _cache_for(self, n: int, keep: int = 0):
        """A cache of at least n positions; the first `keep` positions survive a resize."""
        old = self._cache
        if old is None or old.max_len < n:
            self._cache = self.model.new_cache(n)
            if keep:
                self._cache.kv[:, :keep] = old.kv[:, :keep]
                self._cache.pe[:, :keep] = old.pe[:, :keep]
        return self._cache

    def reset(self) -> None:
        """Forget the cached prefix (the next prompt is prefilled from scratch)."""
        self._cached_ids = []

    # ---- evaluation ------------------------------------------------------------------------------
    def logits(self, token_ids: Sequence[int]) -> torch.Tensor:
        """fp32 logits [T, vocab] for a whole sequence, computed with a fresh cache."""
        ids = self.encode_prompt(list(token_ids))
        self._check_len(len(ids), 0)
        self._cached_ids = []
        cache = self._cache_for(len(ids))
        with torch.inference_mode():
            out = self.model(torch.tensor(ids, device=self.device), 0, cache)
        return out.cpu().clone()   # a normal tensor, not an inference one

    # ---- generation ------------------------------------------------------------------------------
    def generate(self, prompt, *, max_new_tokens: int = 256, temperature: float = 0.6, top_p: float = 1.0,
                 top_k: int = 0, min_p: float = 0.0, repetition_penalty: float = 1.0,
                 stop: str | Sequence[str] | None = None, seed: int | None = None, stream: bool = False):
        """Generate a continuation. Returns a `Generation`, or with stream=True an iterator of text pieces."""
        params = SamplingParams(temperature, top_p, top_k, min_p, repetition_penalty)
        params.validate()
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        ids = self.encode_prompt(prompt)
        self._check_len(len(ids), max_new_tokens)
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        it = _inference(self._run(ids, max_new_tokens, params, stops, seed))
        if stream:
            return (piece for piece in it if isinstance(piece, str))
        for item in it:
            if isinstance(item, Generation):
                return item
        raise AssertionError("generation ended without a result")

    def _run(self, ids: list[int], max_new: int, params: SamplingParams, stops: list[str],
             seed: int | None) -> Iterator[str | Generation]:
        tok = self.tokenizer
        max_new = min(max_new, self.ctx - len(ids))
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        # multi-turn chat resends the conversation: reuse the latents of the longest common prefix
        reuse = 0
        for a, b in zip(self._cached_ids, ids[:-1]):
            if a != b:
                break
            reuse += 1
        self._cached_ids = []        # invalid until this run has written its tokens
        cache = self._cache_for(min(self.ctx, len(ids) + max_new), keep=reuse)
        stop_ids = set(tok.stop_ids)
        stats = Stats()
        self.stats = stats
        decoder = tok.stream_decoder()
        out: list[int] = []
        text = ""
        emitted = 0          # chars of `text` already yielded (held back while a stop string may be forming)
        hold = max((len(s) for s in stops), default=1) - 1
        finish, cut = "length", -1

        t0 = time.perf_counter()
        logits = self.model(torch.tensor(ids[reuse:], device=self.device), reuse, cache, last_only=True)[-1].cpu()
        stats.prefill_s = time.perf_counter() - t0
        stats.prompt_tokens, stats.reused_tokens = len(ids) - reuse, reuse
        pos = len(ids)
        self._cached_ids = list(ids)
        t1 = time.perf_counter()
        while True:
            nxt = sample(logits, params, ids + out, gen, self.suppressed_ids)
            if nxt in stop_ids:
                finish = "stop"
                break
            out.append(nxt)
            stats.generated_tokens = len(out)
            text += decoder.push(nxt)
            cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
            if cut >= 0:
                text, finish = text[:cut], "stop"
                break
            if len(text) - hold > emitted:
                yield text[emitted:len(text) - hold]
                emitted = len(text) - hold
            if len(out) >= max_new:
                break
            logits = self.model(torch.tensor([nxt], device=self.device), pos, cache, last_only=True)[-1].cpu()
            self._cached_ids.append(nxt)
            pos += 1
        if cut < 0:
            text += decoder.flush()
        stats.decode_s = time.perf_counter() - t1
        stats.experts = self.experts.stats() if hasattr(self.experts, "stats") else None
        if len(text) > emitted:
            yield text[emitted:]
        if self.recorder is not None:
            self.recorder.save()
        content, calls = parse_tool_calls(text)
        yield Generation(text=text, token_ids=out, finish_reason=finish, stats=stats, content=content,
                         tool_calls=calls)
