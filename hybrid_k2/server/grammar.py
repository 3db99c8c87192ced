"""Grammar-constrained sampling with llguidance over the checkpoint's tiktoken vocabulary.

A `GrammarMask` is an Engine.generate logits_processor: before each sample it feeds the matcher the tokens
generated since its last call and sets every token the grammar forbids to -inf, so the output parses by
construction (JSON matching a schema, or Kimi K2's tool-call markup around such JSON). Once the grammar is
complete only the stop tokens stay allowed and the turn ends."""
from __future__ import annotations

import json
import threading

import numpy as np
import torch

_TOKENIZERS: dict[int, tuple[object, object]] = {}   # id(Tokenizer) -> (Tokenizer, LLTokenizer); slow, built once
_LOCK = threading.Lock()
# the JSON llguidance writes: compact (no free whitespace, which a small model can spin in forever)
_JSON_OPTIONS = {"whitespace_flexible": False}


class GrammarError(ValueError):
    """A schema (response_format or a tool's parameters) the grammar compiler refuses."""


def _lltokenizer(tokenizer, n_vocab: int):
    import llguidance
    with _LOCK:
        hit = _TOKENIZERS.get(id(tokenizer))
        if hit is None or hit[0] is not tokenizer:
            enc = tokenizer._enc
            llt = llguidance.LLTokenizer.from_tiktoken(
                encoder=enc._mergeable_ranks, special_tokens=tokenizer.special_tokens, pattern=enc._pat_str,
                eos_token=list(tokenizer.stop_ids), n_vocab=n_vocab)
            hit = _TOKENIZERS[id(tokenizer)] = (tokenizer, llt)
        return hit[1]


def json_grammar(schema: dict) -> str:
    import llguidance
    try:
        return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=_JSON_OPTIONS)
    except ValueError as e:
        raise GrammarError(f"the JSON schema is not usable: {e}") from None


def tool_call_grammar(functions: list[tuple[str, dict]], index: int, max_calls: int = 1) -> str:
    """A Kimi K2 tool-call section of 1..max_calls calls to `functions` ((name, parameters schema) pairs), the
    calls' ids counting on from IDX `index`."""
    import llguidance
    rules = []
    for k, (_, params) in enumerate(functions):
        compact = dict(params, **{"x-guidance": _JSON_OPTIONS})   # the schema's own compiler options
        rules.append(f"a{k}: %json {json.dumps(compact, ensure_ascii=False)}")
    for i in range(max_calls):    # call i has id IDX index+i; the next call is optional
        alts = [f'<|tool_call_begin|> "functions.{name}:{index + i}" <|tool_call_argument_begin|> a{k} '
                f"<|tool_call_end|>" for k, (name, _) in enumerate(functions)]
        more = f" call{i + 1}?" if i + 1 < max_calls else ""
        rules.append(f"call{i}: ({' | '.join(alts)}){more}")
    lark = "start: <|tool_calls_section_begin|> call0 <|tool_calls_section_end|>\n" + "\n".join(rules) + "\n"
    return llguidance.LLMatcher.grammar_from_lark(lark)


class GrammarMask:
    """logits_processor(generated_ids, logits) that keeps only the tokens the grammar allows next."""

    def __init__(self, engine, grammar: str, fed: int = 0):
        import llguidance
        self._llg = llguidance
        self.tokenizer = _lltokenizer(engine.tokenizer, engine.cfg.vocab_size)
        self.matcher = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0)
        if self.matcher.is_error():
            raise GrammarError(f"the grammar does not compile: {self.matcher.get_error()}")
        self.vocab = engine.cfg.vocab_size
        # buffers reused every token: the matcher's bitmask (bit i of word w = token 32w+i) and its inverse
        self.words = np.empty((self.vocab + 31) // 32, dtype=np.uint32)
        self._banned_words = np.empty_like(self.words)
        self.fed = fed      # generated tokens before the grammar's first (a lazy mask starts mid-reply)

    def __call__(self, generated: list[int], logits: torch.Tensor) -> torch.Tensor:
        m = self.matcher
        for t in generated[self.fed:]:
            if not m.consume_token(t):
                raise RuntimeError(f"grammar rejected token {t}: {m.get_error()}")
        self.fed = len(generated)
        m.unsafe_compute_mask_ptr(self.words.ctypes.data, self.words.nbytes)
        if m.is_error():
            raise RuntimeError(f"grammar error: {m.get_error()}")
        np.invert(self.words, out=self._banned_words)
        # little-endian words, bytes unpacked low bit first: one byte per token, in token order
        banned = np.unpackbits(self._banned_words.astype("<u4", copy=False).view(np.uint8), count=self.vocab,
                               bitorder="little").view(np.bool_)
        return logits.masked_fill_(torch.from_numpy(banned), float("-inf"))


class LazyToolMask:
    """tool_choice auto: free text until the model opens a tool-call section, then the tool-call grammar.

    Before <|tool_calls_section_begin|> it costs one comparison a token; from it on, the section is
    constrained like a required tool_choice's (the declared functions, ids counted on, arguments matching
    their schemas), so it parses by construction and its arguments can stream as they are generated. The
    matcher is built up front (a schema it cannot compile is known before the first token)."""

    MAX_CALLS = 8    # parallel calls in one section

    def __init__(self, engine, functions: list[tuple[str, dict]], index: int):
        self.trigger = engine.tokenizer.special_tokens["<|tool_calls_section_begin|>"]
        self.mask = GrammarMask(engine, tool_call_grammar(functions, index, self.MAX_CALLS))
        self.on = False

    def __call__(self, generated: list[int], logits: torch.Tensor) -> torch.Tensor:
        if not self.on:
            if not generated or generated[-1] != self.trigger:
                return logits
            self.on = True
            self.mask.fed = len(generated) - 1     # the matcher starts at the section's first token
        return self.mask(generated, logits)
