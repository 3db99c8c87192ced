"""Kimi K2 tokenizer: tiktoken BPE + Kimi's special tokens + the K2 chat template in plain Python.

The checkpoint ships `tiktoken.model` (one "base64(token_bytes) rank" per line) and a
`tokenizer_config.json` whose `added_tokens_decoder` names the special ids. Kimi reserves 256 special
ids right after the BPE vocabulary (tokenization_kimi.py: `range(num_base_tokens, num_base_tokens + 256)`),
so the real 163,584-token vocabulary gives [BOS]=163584 ... [UNK]=163839 and vocab_size 163,840. We keep
the same layout as offsets from `num_base_tokens`, so a small demo vocabulary gets the same structure.

A checkpoint's own chat template (chat_template.py: HF's chat_template.jinja / tokenizer_config.json, a GGUF's
tokenizer.chat_template) is rendered with jinja's sandbox; without one, Kimi K2-0905's template is rendered by
render_chat_parts in plain Python, checked in the tests against the reference jinja text in
tests/data/kimi_chat_template.jinja rendered the way Hugging Face does.
"""
from __future__ import annotations

import base64
import binascii
import codecs
import json
import os
import re
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import tiktoken

# Kimi's pre-tokenisation pattern, verbatim from tokenization_kimi.py (moonshotai/Kimi-K2-Instruct).
# Han runs are their own pieces; `&&` class intersection is understood by tiktoken's regex engine.
KIMI_PAT_STR = "|".join([
    r"""[\p{Han}]+""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""",
    r""" ?[^\s\p{L}\p{N}]+[\r\n]*""",
    r"""\s*[\r\n]+""",
    r"""\s+(?!\S)""",
    r"""\s+""",
])

NUM_RESERVED_SPECIAL_TOKENS = 256

# Named special tokens as offsets from num_base_tokens, from Kimi K2's tokenizer_config.json
# added_tokens_decoder (163584 + offset). Unnamed slots are "<|reserved_token_{id}|>".
KIMI_SPECIAL_TOKEN_OFFSETS: dict[str, int] = {
    "[BOS]": 0,
    "[EOS]": 1,
    "<|im_end|>": 2,
    "<|im_user|>": 3,
    "<|im_assistant|>": 4,
    "<|start_header_id|>": 6,
    "<|end_header_id|>": 7,
    "[EOT]": 9,
    "<|im_system|>": 10,
    "<|tool_calls_section_begin|>": 11,
    "<|tool_calls_section_end|>": 12,
    "<|tool_call_begin|>": 13,
    "<|tool_call_argument_begin|>": 14,
    "<|tool_call_end|>": 15,
    "<|im_middle|>": 17,
    "[PAD]": 254,
    "[UNK]": 255,
}

# attribute name on Tokenizer -> special token text
SPECIAL_ID_ATTRS: dict[str, str] = {
    "bos_id": "[BOS]",
    "eos_id": "[EOS]",
    "im_end_id": "<|im_end|>",
    "im_user_id": "<|im_user|>",
    "im_assistant_id": "<|im_assistant|>",
    "start_header_id": "<|start_header_id|>",
    "end_header_id": "<|end_header_id|>",
    "eot_id": "[EOT]",
    "im_system_id": "<|im_system|>",
    "tool_calls_section_begin_id": "<|tool_calls_section_begin|>",
    "tool_calls_section_end_id": "<|tool_calls_section_end|>",
    "tool_call_begin_id": "<|tool_call_begin|>",
    "tool_call_argument_begin_id": "<|tool_call_argument_begin|>",
    "tool_call_end_id": "<|tool_call_end|>",
    "im_middle_id": "<|im_middle|>",
    "pad_id": "[PAD]",
    "unk_id": "[UNK]",
}

DEFAULT_SYSTEM_PROMPT = "You are Kimi, an AI assistant created by Moonshot AI."

# Kimi's encode() splits input the same way to stay inside tiktoken's limits (tiktoken issue #195).
_TIKTOKEN_MAX_ENCODE_CHARS = 400_000
_MAX_NO_WHITESPACES_CHARS = 25_000


def reserved_token_name(token_id: int) -> str:
    return f"<|reserved_token_{token_id}|>"


def load_tiktoken_ranks(path: str | os.PathLike) -> dict[bytes, int]:
    """Parse a tiktoken.model file; errors name the file and the 1-based line number."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"tiktoken model file not found: {path}")
    with open(path, "rb") as f:
        data = f.read()
    ranks: dict[bytes, int] = {}
    seen_ranks: dict[int, int] = {}
    for lineno, raw in enumerate(data.split(b"\n"), 1):
        line = raw.strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"{path}:{lineno}: expected '<base64 token> <rank>', got {raw[:80]!r}")
        try:
            token = base64.b64decode(parts[0], validate=True)
        except (binascii.Error, ValueError) as e:
            raise ValueError(f"{path}:{lineno}: bad base64 token {parts[0][:80]!r} ({e})") from None
        try:
            rank = int(parts[1])
        except ValueError:
            raise ValueError(f"{path}:{lineno}: rank is not an integer: {parts[1][:40]!r}") from None
        if not token:
            raise ValueError(f"{path}:{lineno}: empty token")
        if rank < 0:
            raise ValueError(f"{path}:{lineno}: negative rank {rank}")
        if token in ranks:
            raise ValueError(f"{path}:{lineno}: token {token!r} already has rank {ranks[token]}")
        if rank in seen_ranks:
            raise ValueError(f"{path}:{lineno}: rank {rank} already used on line {seen_ranks[rank]}")
        ranks[token] = rank
        seen_ranks[rank] = lineno
    if not ranks:
        raise ValueError(f"{path}: no tokens found")
    return ranks


def _check_dense(ranks: Mapping[bytes, int], where: str) -> None:
    # Special ids start at len(ranks); holes in the base ranks would collide with them.
    n = len(ranks)
    if max(ranks.values()) != n - 1 or min(ranks.values()) != 0:
        raise ValueError(f"{where}: ranks must be exactly 0..{n - 1} (got min {min(ranks.values())}, "
                         f"max {max(ranks.values())} for {n} tokens)")
    missing = [bytes([b]) for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise ValueError(f"{where}: byte-level BPE needs all 256 single bytes; missing {len(missing)} "
                         f"(first {missing[0]!r})")


def read_added_tokens(config_path: str | os.PathLike) -> dict[str, int] | None:
    """Special tokens {text: id} from a tokenizer_config.json's added_tokens_decoder, or None if absent."""
    config_path = os.fspath(config_path)
    try:
        with open(config_path, encoding="utf-8") as f:
            cfg = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_path}: invalid JSON ({e})") from None
    decoder = cfg.get("added_tokens_decoder") if isinstance(cfg, dict) else None
    if not decoder:
        return None
    out: dict[str, int] = {}
    for key, entry in decoder.items():
        try:
            token_id = int(key)
        except ValueError:
            raise ValueError(f"{config_path}: added_tokens_decoder key {key!r} is not an integer id") from None
        content = entry.get("content") if isinstance(entry, dict) else None
        if not isinstance(content, str) or not content:
            raise ValueError(f"{config_path}: added_tokens_decoder[{key}] has no 'content' string")
        if content in out:
            raise ValueError(f"{config_path}: special token {content!r} has two ids ({out[content]}, {token_id})")
        out[content] = token_id
    return out


def _split_long_runs(s: str, max_run: int) -> Iterator[str]:
    """Cut s so no piece holds more than max_run consecutive whitespace or non-whitespace chars."""
    run_len = 0
    run_is_space = s[0].isspace() if s else False
    start = 0
    for i, ch in enumerate(s):
        is_space = ch.isspace()
        if is_space != run_is_space:
            run_len = 1
            run_is_space = is_space
        else:
            run_len += 1
            if run_len > max_run:
                yield s[start:i]
                start = i
                run_len = 1
    yield s[start:]


# ---------------------------------------------------------------------------------------------------
# Chat template


class SpecialText(str):
    """A special-token string emitted by the chat template (as opposed to text that came from a message)."""


_MISSING = object()


def _jinja_str(v: Any) -> str:
    """What `{{ v }}` prints under Hugging Face's jinja environment (missing key -> empty string)."""
    if v is _MISSING:
        return ""
    return v if isinstance(v, str) else str(v)


def _tojson(v: Any) -> str:
    # Hugging Face overrides jinja's tojson with plain json.dumps(ensure_ascii=False) (no HTML escaping).
    return json.dumps(v, ensure_ascii=False)


def render_chat_parts(messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                      tools: Sequence[Mapping[str, Any]] | None = None) -> list[str]:
    """Kimi K2 chat template as a list of pieces; SpecialText pieces are the template's special tokens.

    Mirrors tests/data/kimi_chat_template.jinja (moonshotai/Kimi-K2-Instruct-0905 chat_template.jinja)
    piece for piece, including its whitespace quirks, so "".join(parts) equals the jinja rendering.
    """
    S = SpecialText
    parts: list[str] = []
    if tools:
        parts += [S("<|im_system|>"), "tool_declare", S("<|im_middle|>"),
                  "\n  # Tools\n  " + _tojson(tools),
                  S("<|im_end|>")]
    n = len(messages)
    for i, msg in enumerate(messages):
        if not isinstance(msg, Mapping):
            raise ValueError(f"messages[{i}] must be a dict, got {type(msg).__name__}")
        if "role" not in msg:
            raise ValueError(f"messages[{i}] has no 'role'")
        role = msg["role"]
        last = i == n - 1
        if i == 0 and role != "system":
            parts += [S("<|im_system|>"), "system", S("<|im_middle|>"), DEFAULT_SYSTEM_PROMPT, S("<|im_end|>")]
        role_name = _jinja_str(msg.get("name") or role)
        if role == "user":
            parts += [S("<|im_user|>"), role_name, S("<|im_middle|>")]
        elif role == "assistant":
            parts += [S("<|im_assistant|>"), role_name, S("<|im_middle|>")]
        else:  # system, tool and any other role
            parts += [S("<|im_system|>"), role_name, S("<|im_middle|>")]

        content = msg.get("content", _MISSING)
        tool_calls = msg.get("tool_calls")
        if role == "assistant" and tool_calls:
            if content is not _MISSING and content:
                parts.append(_jinja_str(content))
            parts.append(S("<|tool_calls_section_begin|>"))
            for j, call in enumerate(tool_calls):
                fn = call.get("function") if isinstance(call, Mapping) else None
                if not isinstance(fn, Mapping) or "arguments" not in fn:
                    raise ValueError(f"messages[{i}].tool_calls[{j}] needs a 'function' with 'arguments'")
                args = fn["arguments"]
                parts += [S("<|tool_call_begin|>"), _jinja_str(call.get("id", _MISSING)),
                          S("<|tool_call_argument_begin|>"),
                          args if isinstance(args, str) else _tojson(args), S("<|tool_call_end|>")]
            parts.append(S("<|tool_calls_section_end|>"))
        elif role == "tool":
            parts.append("## Return of " + _jinja_str(msg.get("tool_call_id", _MISSING)) + "\n    "
                         + _jinja_str(content))
        elif isinstance(content, str):
            parts.append(content)
        elif content is not None and content is not _MISSING:
            if isinstance(content, (str, bytes, Mapping)) or not isinstance(content, Iterable):
                raise ValueError(f"messages[{i}].content must be a string or a list of parts")
            for j, part in enumerate(content):
                if not isinstance(part, Mapping):
                    raise ValueError(f"messages[{i}].content[{j}] must be a dict part")
                if part.get("type") == "image" or "image" in part or "image_url" in part:
                    # the template's media placeholder; the newline after it is part of the reference output
                    parts.append("<|media_start|>image<|media_content|><|media_pad|><|media_end|>\n")
                else:
                    parts.append(_jinja_str(part.get("text", _MISSING)))
        # the reference leaves the final turn open when no generation prompt follows (prefill mode)
        if (last and add_generation_prompt) or not last:
            parts.append(S("<|im_end|>"))
    if add_generation_prompt:
        parts += [S("<|im_assistant|>"), "assistant", S("<|im_middle|>")]
    return parts


_SECTION_BEGIN, _SECTION_END = "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>"
_TOOL_CALL_RE = re.compile(
    r"\s*<\|tool_call_begin\|>\s*(?P<id>[^<]+?)\s*<\|tool_call_argument_begin\|>(?P<args>.*?)<\|tool_call_end\|>\s*",
    re.S)
_CALL_ID_RE = re.compile(r"(?:functions\.)?(?P<name>[A-Za-z0-9_.\-]+?)(?::(?P<idx>\d+))?")


class ToolCallWarning(UserWarning):
    """Tool-call markup in generated text was truncated or malformed; the text is kept as plain content."""


def parse_tool_calls(text: str) -> tuple[str, list[dict[str, Any]]]:
    """Split generated assistant text into (content, tool_calls) in OpenAI form.

    Kimi K2 writes <|tool_calls_section_begin|> (<|tool_call_begin|>functions.NAME:IDX
    <|tool_call_argument_begin|>{json}<|tool_call_end|>)+ <|tool_calls_section_end|>. Truncated or malformed
    markup never raises: the whole text comes back as content, with a ToolCallWarning saying what was wrong.
    """
    start = text.find(_SECTION_BEGIN)
    if start < 0:
        return text, []

    def reject(why: str) -> tuple[str, list]:
        warnings.warn(f"tool-call markup {why}; returned as text", ToolCallWarning, stacklevel=3)
        return text, []

    end = text.find(_SECTION_END, start)
    if end < 0:
        return reject("is truncated (no <|tool_calls_section_end|>)")
    body = text[start + len(_SECTION_BEGIN):end]
    calls, pos = [], 0
    for m in _TOOL_CALL_RE.finditer(body):
        if m.start() != pos:
            return reject(f"has unexpected text {body[pos:m.start()][:40]!r} between calls")
        pos = m.end()
        call_id, args = m.group("id"), m.group("args").strip()
        idm = _CALL_ID_RE.fullmatch(call_id)
        if idm is None:
            return reject(f"has a bad call id {call_id[:40]!r}")
        try:
            parsed = json.loads(args)
        except json.JSONDecodeError as e:
            return reject(f"has arguments that are not JSON in call {call_id!r} ({e.msg})")
        if not isinstance(parsed, dict):
            return reject(f"has arguments that are not a JSON object in call {call_id!r}")
        calls.append({"id": call_id, "type": "function",
                      "function": {"name": idm.group("name"), "arguments": args}})
    if pos != len(body) or not calls:
        return reject("has an incomplete or empty tool call")
    return text[:start] + text[end + len(_SECTION_END):], calls


# ---------------------------------------------------------------------------------------------------


class Tokenizer:
    """Kimi K2 tokenizer. Special ids live in [num_base_tokens, num_base_tokens + 256)."""

    def __init__(self, tiktoken_model_path: str | os.PathLike,
                 special_tokens: Mapping[str, int] | None = None):
        path = os.fspath(tiktoken_model_path)
        self._init(load_tiktoken_ranks(path), special_tokens, where=path)

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> "Tokenizer":
        """Load from a checkpoint directory: tiktoken.model, plus tokenizer_config.json ids if present."""
        path = os.fspath(path)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"tokenizer directory not found: {path}")
        model = os.path.join(path, "tiktoken.model")
        if not os.path.isfile(model):
            raise FileNotFoundError(f"tiktoken model file not found: {model}")
        config = os.path.join(path, "tokenizer_config.json")
        specials = read_added_tokens(config) if os.path.isfile(config) else None
        tok = cls.__new__(cls)
        tok._init(load_tiktoken_ranks(model), specials, where=model,
                  special_source=config if specials is not None else None)
        from .chat_template import template_from_dir
        tok.chat_template = template_from_dir(path, tok.special_token_map())
        return tok

    @classmethod
    def from_ranks(cls, ranks: Mapping[bytes, int], special_tokens: Mapping[str, int] | None = None,
                   name: str = "in-memory") -> "Tokenizer":
        tok = cls.__new__(cls)
        tok._init(dict(ranks), special_tokens, where=name)
        return tok

    def _init(self, ranks: dict[bytes, int], special_tokens: Mapping[str, int] | None, where: str,
              special_source: str | None = None) -> None:
        _check_dense(ranks, where)
        self.path = where
        self.num_base_tokens = len(ranks)
        self.vocab_size = self.num_base_tokens + NUM_RESERVED_SPECIAL_TOKENS
        base = self.num_base_tokens
        if special_tokens is None:
            named = {text: base + off for text, off in KIMI_SPECIAL_TOKEN_OFFSETS.items()}
        else:  # given ids win entirely, as in tokenization_kimi.py (unnamed slots become reserved)
            named = dict(special_tokens)
        src = special_source or "special_tokens"
        by_id: dict[int, str] = {}
        for text, token_id in named.items():
            if not isinstance(token_id, int) or not base <= token_id < self.vocab_size:
                raise ValueError(f"{src}: special token {text!r} has id {token_id}, outside the reserved "
                                 f"range [{base}, {self.vocab_size}) after {base} BPE tokens in {where}")
            if token_id in by_id:
                raise ValueError(f"{src}: id {token_id} given to both {by_id[token_id]!r} and {text!r}")
            by_id[token_id] = text
        self.special_tokens: dict[str, int] = {
            by_id.get(i, reserved_token_name(i)): i for i in range(base, self.vocab_size)}
        if len(self.special_tokens) != NUM_RESERVED_SPECIAL_TOKENS:
            raise ValueError(f"{src}: a special token name collides with a reserved slot name")
        self._special_by_id = {i: t for t, i in self.special_tokens.items()}
        for attr, text in SPECIAL_ID_ATTRS.items():
            setattr(self, attr, self.special_tokens.get(text))
        self._enc = tiktoken.Encoding(name=os.path.basename(where) or "kimi", pat_str=KIMI_PAT_STR,
                                      mergeable_ranks=ranks, special_tokens=self.special_tokens)
        self.chat_template = None   # the checkpoint's own (chat_template.ChatTemplate); None: K2-0905's, in Python
        self._special_re = re.compile("|".join(re.escape(t) for t in sorted(self.special_tokens, key=len,
                                                                             reverse=True)))

    def special_token_map(self) -> dict[str, str]:
        """bos_token, eos_token, ... -> text: what a chat template is given under those names."""
        names = {"bos_token": self.bos_id, "eos_token": self.eos_id, "unk_token": self.unk_id,
                 "pad_token": self.pad_id}
        return {k: self._special_by_id[i] for k, i in names.items() if i is not None}

    def set_chat_template(self, text: str | None, source: str) -> None:
        """Use `text` (jinja, from `source`: the file or field it came from, named in its errors) for chat."""
        from .chat_template import ChatTemplate
        self.chat_template = ChatTemplate(text, source, self.special_token_map()) if text else None

    # ------------------------------------------------------------------ basic encode / decode
    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Ids that end an assistant turn: <|im_end|> (chat) and [EOS]."""
        return tuple(i for i in (self.im_end_id, self.eos_id) if i is not None)

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        """Text -> ids. Special-token text becomes special ids only with allow_special=True."""
        if not isinstance(text, str):
            raise TypeError(f"encode() expects str, got {type(text).__name__}")
        ids: list[int] = []
        for i in range(0, len(text), _TIKTOKEN_MAX_ENCODE_CHARS):
            for piece in _split_long_runs(text[i:i + _TIKTOKEN_MAX_ENCODE_CHARS], _MAX_NO_WHITESPACES_CHARS):
                if allow_special:
                    ids.extend(self._enc.encode(piece, allowed_special="all"))
                else:
                    ids.extend(self._enc.encode_ordinary(piece))
        return ids

    def _check_ids(self, ids: Sequence[int]) -> list[int]:
        out = []
        for t in ids:
            t = int(t)
            if not 0 <= t < self.vocab_size:
                raise ValueError(f"token id {t} out of range [0, {self.vocab_size})")
            out.append(t)
        return out

    def token_bytes(self, token_id: int) -> bytes:
        return self._enc.decode_single_token_bytes(self._check_ids([token_id])[0])

    def is_special(self, token_id: int) -> bool:
        return token_id >= self.num_base_tokens

    def decode_bytes(self, ids: Sequence[int], skip_special: bool = False) -> bytes:
        ids = self._check_ids(ids)
        if skip_special:
            ids = [t for t in ids if t < self.num_base_tokens]
        return self._enc.decode_bytes(ids)

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        """Ids -> text; incomplete or invalid UTF-8 becomes U+FFFD."""
        return self.decode_bytes(ids, skip_special).decode("utf-8", errors="replace")

    def stream_decoder(self, skip_special: bool = False) -> "StreamDecoder":
        return StreamDecoder(self, skip_special)

    def decode_stream(self, ids: Iterable[int], skip_special: bool = False) -> Iterator[str]:
        """Yield text pieces as soon as they are complete UTF-8 (for streaming generation)."""
        dec = StreamDecoder(self, skip_special)
        for t in ids:
            piece = dec.push(t)
            if piece:
                yield piece
        tail = dec.flush()
        if tail:
            yield tail

    # ------------------------------------------------------------------ chat
    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                            tools: Sequence[Mapping[str, Any]] | None = None, **template_kwargs: Any) -> str:
        """The prompt text through the checkpoint's chat template (kwargs such as thinking=False go to it), or
        Kimi K2-0905's when the checkpoint has none (which takes no kwargs and ignores them)."""
        if self.chat_template is not None:
            return self.chat_template.render(messages, add_generation_prompt, tools, **template_kwargs)
        return "".join(render_chat_parts(messages, add_generation_prompt, tools))

    def encode_chat(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                    tools: Sequence[Mapping[str, Any]] | None = None, **template_kwargs: Any) -> list[int]:
        """Chat -> ids. Only the template's own markers become special ids; special-token text inside
        message content is encoded as ordinary text (no prompt injection of control tokens)."""
        if self.chat_template is not None:
            return self._encode_rendered(messages, add_generation_prompt, tools, template_kwargs)
        ids: list[int] = []
        text: list[str] = []
        for part in render_chat_parts(messages, add_generation_prompt, tools):
            special_id = self.special_tokens.get(part) if isinstance(part, SpecialText) else None
            if special_id is None:
                text.append(part)
                continue
            if text:
                ids += self.encode("".join(text))
                text = []
            ids.append(special_id)
        if text:
            ids += self.encode("".join(text))
        return ids

    def _encode_rendered(self, messages, add_generation_prompt, tools, template_kwargs) -> list[int]:
        """A jinja template renders one string. Special-token text in the data (messages, tools, kwargs) is
        marked first with a character found nowhere in the data or the template, so it cannot match a special
        token in the rendered text; the marks are taken out of the ordinary text before it is encoded."""
        seen = json.dumps([messages, tools, template_kwargs], ensure_ascii=False, default=str) \
            + self.chat_template.text
        mark = next((c for c in map(chr, range(0xE000, 0xF900)) if c not in seen), None)
        if mark is None:   # every private-use character is in the data: nothing safe to mark with
            raise ValueError("messages: cannot mark special-token text (the data holds every private-use character)")
        find = self._special_re

        def escape(s: str) -> str:
            return find.sub(lambda m: m.group()[0] + mark + m.group()[1:], s)
        rendered = self.chat_template.render(messages, add_generation_prompt, tools, escape=escape, **template_kwargs)
        ids: list[int] = []
        pos = 0
        for m in find.finditer(rendered):
            if m.start() > pos:
                ids += self.encode(rendered[pos:m.start()].replace(mark, ""))
            ids.append(self.special_tokens[m.group()])
            pos = m.end()
        if pos < len(rendered):
            ids += self.encode(rendered[pos:].replace(mark, ""))
        return ids

    def __repr__(self) -> str:
        return f"Tokenizer({self.path!r}, base={self.num_base_tokens}, vocab_size={self.vocab_size})"


class StreamDecoder:
    """Incremental ids -> text. push() returns only text whose UTF-8 is complete, holding back the
    trailing bytes of a character split across tokens (CJK, emoji); flush() ends the stream."""

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = False):
        self._tok = tokenizer
        self._skip_special = skip_special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        if self._skip_special and self._tok.is_special(token_id):
            return ""
        return self._utf8.decode(self._tok.token_bytes(token_id))

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)
