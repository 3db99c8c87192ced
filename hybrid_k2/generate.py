"""Engine: prompt in, tokens out. Sampling, stop conditions, streaming and throughput stats."""
from __future__ import annotations

import logging
import math
import numbers
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from .model import Transformer
from .tokenizer import parse_tool_calls


log = logging.getLogger(__name__)

CACHE_CHUNK = 256   # the KV cache grows with the sequence in multiples of this (and at least doubles)


class ContextOverflowError(ValueError):
    """The prompt (plus the tokens asked for) does not fit the context window."""


class StreamAbandonedError(RuntimeError):
    """A streaming generation was resumed after another caller took the engine over (see Engine)."""


def _number(name: str, v, kind=float):
    """An int (kind=int) or a real number (kind=float), numpy's included, never a bool or a string."""
    if isinstance(v, bool) or not isinstance(v, numbers.Integral if kind is int else numbers.Real):
        raise TypeError(f"{name} must be {'an int' if kind is int else 'a number'}, got {type(v).__name__} {v!r}")
    return v


@dataclass
class SamplingParams:
    temperature: float = 0.6          # Kimi K2's recommended default
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0     # OpenAI's: subtracted once from every token already generated
    frequency_penalty: float = 0.0    # OpenAI's: subtracted per occurrence in the generated tokens

    def validate(self) -> None:
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
            _number(name, getattr(self, name))
        _number("top_k", self.top_k, int)
        if not 0 <= self.temperature < math.inf:
            raise ValueError(f"temperature must be finite and >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 <= self.min_p < 1:
            raise ValueError(f"min_p must be in [0, 1), got {self.min_p}")
        if not 0 < self.repetition_penalty < math.inf:
            raise ValueError(f"repetition_penalty must be finite and > 0, got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")


def sample(logits: torch.Tensor, p: SamplingParams, history: Sequence[int], gen: torch.Generator | None,
           suppress: torch.Tensor | None = None, generated: Sequence[int] = ()) -> int:
    """logits [vocab] fp32 -> token id. temperature 0 is greedy. `suppress` ids are never sampled.
    `generated` (the tokens of this completion) is what the presence/frequency penalties count."""
    logits = logits.float().clone()
    if suppress is not None:
        logits[suppress] = float("-inf")
    if (p.presence_penalty or p.frequency_penalty) and len(generated):
        ids, counts = torch.tensor(list(generated)).unique(return_counts=True)
        logits[ids] -= p.presence_penalty + p.frequency_penalty * counts.float()
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
    text: str | None                   # everything generated, tool-call markup included (None: no tokenizer)
    token_ids: list[int]
    finish_reason: str                 # "stop" (EOS / <|im_end|> / stop string), "length" or "cancelled"
    stats: Stats = field(default_factory=Stats)
    content: str | None = ""           # the answer: text less reasoning and tool-call section (None: no tokenizer)
    tool_calls: list[dict] = field(default_factory=list)   # OpenAI-style, parsed from Kimi K2's markup
    # with generate(logprobs=K): per generated token (id, logprob, [(id, logprob)] * K), from the distribution
    # the token was drawn from before temperature/top-p (the model's, less suppressed and masked ids)
    logprobs: list[tuple[int, float, list[tuple[int, float]]]] | None = None
    # a thinking model's reasoning: the text between <think> and </think> (also when the prompt opened <think>)
    reasoning: str | None = ""

    def __str__(self) -> str:
        return self.text or ""


class _Turn:
    """One caller's hold on an Engine (a whole generate()/logits() call, or a stream from first step to end)."""
    __slots__ = ("idle_since", "revoked")

    def __init__(self):
        self.idle_since: float | None = None   # monotonic time a stream last yielded; None while it computes
        self.revoked = False


class _EngineLock:
    """Serialises the callers of one Engine (its KV cache, prefix and stats are per engine).

    A stream holds the engine from its first step until it ends, is closed, or is garbage-collected (its
    finally runs). A stream left open and un-iterated would otherwise block every later caller forever, so
    a stream that has sat at a yield for `idle_timeout` seconds while another caller waits loses the engine:
    the waiter proceeds and the stream raises StreamAbandonedError when next resumed. A stream that is being
    consumed (or a blocking call, which never yields) is waited for, however long it takes."""

    def __init__(self, idle_timeout: float):
        self.idle_timeout = idle_timeout
        self._cond = threading.Condition(threading.Lock())
        self._owner: _Turn | None = None

    def acquire(self, take_idle: bool = False) -> _Turn:
        """Wait for the engine. take_idle (close()): an idle stream is taken over at once, not after the timeout."""
        with self._cond:
            while self._owner is not None:
                idle = self._owner.idle_since
                if idle is None:
                    self._cond.wait()
                    continue
                left = 0 if take_idle else idle + self.idle_timeout - time.monotonic()
                if left <= 0:
                    self._owner.revoked = True
                    if not take_idle:
                        log.warning("an open generate(stream=True) iterator sat unread %.0f s while another call "
                                    "waited; it was abandoned (close() streams you stop reading)", self.idle_timeout)
                    break
                self._cond.wait(left)
            self._owner = turn = _Turn()
            return turn

    def release(self, turn: _Turn) -> None:
        with self._cond:
            if self._owner is turn:
                self._owner = None
                self._cond.notify_all()

    def suspend(self, turn: _Turn) -> None:
        with self._cond:
            turn.idle_since = time.monotonic()
            self._cond.notify_all()      # waiters start timing the idle stream

    def resume(self, turn: _Turn) -> None:
        with self._cond:
            if turn.revoked:
                raise StreamAbandonedError(
                    f"this generate(stream=True) iterator sat unread while another call waited for the engine "
                    f"(over {self.idle_timeout:g} s) or the engine was closed; the stream cannot continue")
            turn.idle_since = None


class _Hold:
    def __init__(self, lock: _EngineLock, take_idle: bool = False):
        self.lock, self.take_idle = lock, take_idle

    def __enter__(self):
        self.turn = self.lock.acquire(self.take_idle)

    def __exit__(self, *exc):
        self.lock.release(self.turn)


class Engine:
    """Generation over one loaded model.

    Thread-safe: callers are served one at a time, in full (one KV cache and cached prefix per engine). A
    generate(stream=True) iterator holds the engine from its first step until it is exhausted, closed or
    garbage-collected; one that is left open and unread for `stream_idle_timeout` seconds while another caller
    waits is taken over (it raises StreamAbandonedError if read again), so an abandoned stream cannot block the
    engine forever; close() takes over an unread stream at once."""

    stream_idle_timeout = 60.0   # seconds an open, un-iterated stream may keep a waiting caller out

    def __init__(self, model: Transformer, tokenizer, *, ctx: int | None = None, experts=None, checkpoint=None,
                 recorder=None):
        self.model = model
        self.cfg = model.cfg
        self.tokenizer = tokenizer
        limit = self.cfg.max_position_embeddings
        if ctx is not None and (isinstance(ctx, bool) or not isinstance(ctx, int) or ctx < 1):
            raise ValueError(f"ctx must be a positive int (tokens), got {ctx!r}")
        self.ctx = min(ctx or limit, limit)
        self.experts = experts
        self.checkpoint = checkpoint
        self.recorder = recorder     # routing trace, saved after each generate() and on close()
        self.stats = Stats()
        self._lock = _EngineLock(self.stream_idle_timeout)
        self._cache = None
        self._cached_ids: list[int] = []   # tokens whose latents sit in self._cache (reused as a prompt prefix)
        V = self.cfg.vocab_size
        suppressed = []
        if tokenizer is not None and getattr(tokenizer, "chat_template", False) is None \
                and callable(getattr(checkpoint, "chat_template", None)):
            # a GGUF carries its template in its metadata (an HF directory's is read by Tokenizer.from_dir)
            try:
                tokenizer.set_chat_template(checkpoint.chat_template(),
                                            f"{getattr(checkpoint, 'path', 'checkpoint')}: tokenizer.chat_template")
            except BaseException:   # a template that does not compile: the load fails, nothing is left open
                self.close()
                raise
        if tokenizer is not None:
            if tokenizer.vocab_size > V:   # its special ids (the chat template's) would not embed
                raise ValueError(f"{tokenizer.path}: the tokenizer has {tokenizer.vocab_size} ids "
                                 f"({tokenizer.num_base_tokens} BPE + 256 special) but the model's vocab_size is {V}")
            # reserved special ids carry no meaning: a trained model never emits them, an untrained one must not;
            # ids past a smaller tokenizer (padding rows of the embedding) have no text and are never sampled
            suppressed = [i for n, i in tokenizer.special_tokens.items() if n.startswith("<|reserved_token_")]
            suppressed += range(tokenizer.vocab_size, V)
            self.stop_ids = frozenset(tokenizer.stop_ids)
        else:   # ids in, ids out: stop at the config's EOS
            eos = self.cfg.eos_token_id
            self.stop_ids = frozenset([eos] if isinstance(eos, int) and 0 <= eos < V else [])
        self.suppressed_ids = torch.tensor(sorted(suppressed), dtype=torch.long) if suppressed else None

    @property
    def device(self) -> torch.device:
        return self.model.model.embed_tokens.weight.device

    def close(self) -> None:
        with _Hold(self._lock, take_idle=True):   # not under a generation running in another thread
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
    def _need_tokenizer(self, what: str):
        if self.tokenizer is None:
            raise ValueError(f"this checkpoint has no tokenizer (no tiktoken.model), so {what} cannot be encoded; "
                             f"pass the prompt as a list of token ids")
        return self.tokenizer

    def encode_prompt(self, prompt, chat_template_kwargs: dict | None = None) -> list[int]:
        """Prompt ids. Chat messages go through the checkpoint's chat template, given chat_template_kwargs
        (e.g. {"thinking": False} for a thinking model's template)."""
        if chat_template_kwargs is not None and not isinstance(chat_template_kwargs, dict):
            raise TypeError(f"chat_template_kwargs must be a dict, got {type(chat_template_kwargs).__name__}")
        if isinstance(prompt, str):
            return self._need_tokenizer("a text prompt").encode(prompt)
        if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(m, dict) for m in prompt):
            return self._need_tokenizer("a chat prompt").encode_chat(list(prompt), add_generation_prompt=True,
                                                                     **(chat_template_kwargs or {}))
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
        """A cache of at least n positions (n <= ctx); the first `keep` positions survive a resize.

        The cache grows with the sequence, not with max_new_tokens: to n rounded up to CACHE_CHUNK and at least
        double the old size (so a long generation copies its prefix O(log n) times), capped at ctx."""
        old = self._cache
        if old is None or old.max_len < n:
            size = max(n, 2 * old.max_len if old is not None else 0)
            size = min(self.ctx, -(-size // CACHE_CHUNK) * CACHE_CHUNK)
            if not keep:                # nothing to copy: let the old cache go before the new one is allocated
                self._cache = old = None
            new = self.model.new_cache(size)
            if keep:
                new.kv[:, :keep] = old.kv[:, :keep]
                new.pe[:, :keep] = old.pe[:, :keep]
            self._cache = new
        return self._cache

    def reset(self) -> None:
        """Forget the cached prefix (the next prompt is prefilled from scratch)."""
        with _Hold(self._lock):
            self._cached_ids = []

    # ---- evaluation ------------------------------------------------------------------------------
    def logits(self, token_ids: Sequence[int]) -> torch.Tensor:
        """fp32 logits [T, vocab] for a whole sequence, computed with a fresh cache."""
        ids = self.encode_prompt(list(token_ids))
        self._check_len(len(ids), 0)
        with _Hold(self._lock):
            self._cached_ids = []
            cache = self._cache_for(len(ids))
            with torch.inference_mode():
                out = self.model(torch.tensor(ids, device=self.device), 0, cache)
            return out.cpu().clone()   # a normal tensor, not an inference one

    # ---- generation ------------------------------------------------------------------------------
    def generate(self, prompt, *, max_new_tokens: int = 256, temperature: float = 0.6, top_p: float = 1.0,
                 top_k: int = 0, min_p: float = 0.0, repetition_penalty: float = 1.0,
                 stop: str | Sequence[str] | None = None, seed: int | None = None, stream: bool = False,
                 presence_penalty: float = 0.0, frequency_penalty: float = 0.0, logprobs: int | None = None,
                 logits_processor=None, cancel=None, chat_template_kwargs: dict | None = None):
        """Generate a continuation. Returns a `Generation`, or with stream=True an iterator of text pieces.

        Without a tokenizer the prompt must be token ids; the Generation then has token_ids and text None
        (stop strings and stream=True need text, so they are refused).

        logprobs=K: Generation.logprobs with the K most likely alternatives of each token. logits_processor:
        called before each sample as f(generated_ids, logits) -> logits (e.g. a grammar's token mask; it may
        edit logits in place). cancel: a callable checked before each step; when it returns true the
        generation ends with finish_reason "cancelled". chat_template_kwargs: given to the checkpoint's chat
        template with chat messages (e.g. {"thinking": False}).

        Generation.reasoning is what a thinking model wrote between <think> and </think> (the prompt may
        have opened the <think>, as K2.5's template does); Generation.content is the answer after it.
        stream=True yields the raw text, markers included (chat.ReplySplitter splits it as it comes)."""
        params = SamplingParams(temperature, top_p, top_k, min_p, repetition_penalty, presence_penalty,
                                frequency_penalty)
        params.validate()
        _number("max_new_tokens", max_new_tokens, int)
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if seed is not None:
            _number("seed", seed, int)
        stops = [stop] if isinstance(stop, str) else stop
        if stops is None:
            stops = []
        elif not isinstance(stops, (list, tuple)) or not all(isinstance(s, str) for s in stops):
            raise TypeError(f"stop must be a string or a list of strings, got {stop!r}")
        if "" in stops:
            raise ValueError("stop strings must be non-empty (an empty one would match before the first token)")
        stops = list(stops)
        if self.tokenizer is None:
            if stream:
                raise ValueError("stream=True yields text, and this checkpoint has no tokenizer (no tiktoken.model); "
                                 "call generate(token_ids) without stream for the generated ids")
            if stops:
                raise ValueError("stop strings need a tokenizer, and this checkpoint has none (no tiktoken.model)")
        if logprobs is not None:
            _number("logprobs", logprobs, int)
            if not 0 <= logprobs <= 20:
                raise ValueError(f"logprobs must be in [0, 20], got {logprobs}")
        for name, f in (("logits_processor", logits_processor), ("cancel", cancel)):
            if f is not None and not callable(f):
                raise TypeError(f"{name} must be callable, got {type(f).__name__}")
        ids = self.encode_prompt(prompt, chat_template_kwargs)
        self._check_len(len(ids), max_new_tokens)
        run = self._run(ids, max_new_tokens, params, stops, seed, logprobs, logits_processor, cancel)
        if stream == "events":   # generate_events(): the text pieces, then the Generation
            return self._stream(run, events=True)
        if stream:
            return self._stream(run)
        with _Hold(self._lock), torch.inference_mode():
            for item in run:
                if isinstance(item, Generation):
                    return item
        raise AssertionError("generation ended without a result")

    def generate_events(self, prompt, **kw) -> Iterator[str | Generation]:
        """generate(stream=True) that ends with the Generation (finish reason, token ids, stats, tool calls)."""
        if "stream" in kw:
            raise TypeError("generate_events() always streams; do not pass stream")
        return self.generate(prompt, stream="events", **kw)

    def _stream(self, run: Iterator, events: bool = False) -> Iterator[str]:
        """The text pieces of `run`, holding the engine from the first step until the end (or close/GC)."""
        lock = self._lock
        turn = lock.acquire()
        try:
            while True:
                lock.resume(turn)
                with torch.inference_mode():   # per step: a `with` around the yield would leak into the caller
                    try:
                        item = next(run)
                    except StopIteration:
                        return
                if events or isinstance(item, str):
                    lock.suspend(turn)
                    yield item
        finally:
            run.close()
            lock.release(turn)

    def _run(self, ids: list[int], max_new: int, params: SamplingParams, stops: list[str],
             seed: int | None, n_logprobs: int | None = None, processor=None,
             cancel=None) -> Iterator[str | Generation]:
        tok = self.tokenizer
        max_new = min(max_new, self.ctx - len(ids))
        gen = torch.Generator().manual_seed(int(seed)) if seed is not None else None
        # multi-turn chat resends the conversation: reuse the latents of the longest common prefix
        reuse = 0
        for a, b in zip(self._cached_ids, ids[:-1]):
            if a != b:
                break
            reuse += 1
        self._cached_ids = []        # invalid until this run has written its tokens
        cache = self._cache_for(len(ids) + 1, keep=reuse)   # grown below as the sequence does
        stop_ids = self.stop_ids
        stats = Stats()
        self.stats = stats
        decoder = tok.stream_decoder() if tok is not None else None
        out: list[int] = []
        text = ""
        emitted = 0          # chars of `text` already yielded (held back while a stop string may be forming)
        longest = max((len(s) for s in stops), default=1)
        hold = longest - 1
        finish, cut = "length", -1

        t0 = time.perf_counter()
        logits = self.model(torch.tensor(ids[reuse:], device=self.device), reuse, cache, last_only=True)[-1].cpu()
        stats.prefill_s = time.perf_counter() - t0
        stats.prompt_tokens, stats.reused_tokens = len(ids) - reuse, reuse
        pos = len(ids)
        self._cached_ids = list(ids)
        t1 = time.perf_counter()
        lps = [] if n_logprobs is not None else None
        while True:
            if cancel is not None and cancel():
                finish = "cancelled"
                break
            if processor is not None:
                logits = processor(out, logits)
            nxt = sample(logits, params, ids + out, gen, self.suppressed_ids, out)
            if nxt in stop_ids:
                finish = "stop"
                break
            if lps is not None:
                lps.append(self._logprobs(logits, nxt, n_logprobs))
            out.append(nxt)
            stats.generated_tokens = len(out)
            if decoder is not None:
                start = max(0, len(text) - longest + 1)    # a new match ends in the new text
                text += decoder.push(nxt)
                cut = min((i for i in (text.find(s, start) for s in stops) if i >= 0), default=-1)
                if cut >= 0:
                    text, finish = text[:cut], "stop"
                    break
                if len(text) - hold > emitted:
                    yield text[emitted:len(text) - hold]
                    emitted = len(text) - hold
            if len(out) >= max_new:
                break
            if pos >= cache.max_len:
                cache = self._cache_for(pos + 1, keep=pos)
            logits = self.model(torch.tensor([nxt], device=self.device), pos, cache, last_only=True)[-1].cpu()
            self._cached_ids.append(nxt)
            pos += 1
        if decoder is not None and cut < 0:
            text += decoder.flush()
        stats.decode_s = time.perf_counter() - t1
        stats.experts = self.experts.stats() if hasattr(self.experts, "stats") else None
        if len(text) > emitted:
            yield text[emitted:]
        if self.recorder is not None:
            self.recorder.save()
        if decoder is None:
            yield Generation(text=None, token_ids=out, finish_reason=finish, stats=stats, content=None,
                             logprobs=lps, reasoning=None)
            return
        from .chat import opens_reasoning, split_reasoning   # chat imports this module
        reasoning, answer = split_reasoning(text, opens_reasoning(tok, ids))
        content, calls = parse_tool_calls(answer)
        yield Generation(text=text, token_ids=out, finish_reason=finish, stats=stats, content=content,
                         tool_calls=calls, logprobs=lps, reasoning=reasoning)

    def _logprobs(self, logits: torch.Tensor, token: int, k: int) -> tuple[int, float, list[tuple[int, float]]]:
        lp = logits.float()
        if self.suppressed_ids is not None:
            lp = lp.clone()
            lp[self.suppressed_ids] = float("-inf")
        lp = lp.log_softmax(-1)
        top = lp.topk(k) if k else None
        alts = [(int(i), float(v)) for v, i in zip(*top)] if top is not None else []
        return token, float(lp[token]), alts
