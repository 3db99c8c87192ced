"""`hybrid-k2 chat`: a multi-turn REPL over Engine.generate.

Line editing and history come from readline; `\"\"\"` opens and closes a multi-line message, as does a trailing
backslash. Ctrl-C stops the answer being streamed (the session stays); Ctrl-D quits.
"""
from __future__ import annotations

import json
import os
import sys
import warnings

from .generate import Engine

HELP = """commands:
  /reset               forget the conversation (keeps the system prompt)
  /system TEXT         set the system prompt and reset
  /set NAME VALUE      sampling: temperature, top_p, top_k, min_p, repetition_penalty, max_new_tokens, seed
  /stats               tok/s of the last answer, expert-cache hit rate, memory
  /save PATH           write the transcript (.json, or markdown otherwise)
  /thinking on|off|default   a thinking model's reasoning (the chat template's `thinking`)
  /help                this text
  \"\"\" ... \"\"\"          multi-line message (or end a line with \\\\ to continue it)
  Ctrl-C stops an answer, Ctrl-D quits"""

SETTINGS = {"temperature": float, "top_p": float, "top_k": int, "min_p": float, "repetition_penalty": float,
            "max_new_tokens": int, "seed": int}


def _check_sampling(opts: dict) -> None:
    """ValueError naming the setting that generate() would refuse."""
    from .generate import SamplingParams
    SamplingParams(opts["temperature"], opts["top_p"], opts["top_k"], opts["min_p"],
                   opts["repetition_penalty"]).validate()
    if opts["max_new_tokens"] < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {opts['max_new_tokens']}")


# ---- the chat layer the REPL and the server share: templating, tool-call parsing, reasoning split ----------

THINK_BEGIN, THINK_END = "<think>", "</think>"   # thinking models (K2-Thinking, K2.5+) wrap reasoning in these


def encode_chat(tokenizer, messages: list[dict], tools: list[dict] | None = None,
                template_kwargs: dict | None = None) -> list[int]:
    """The prompt ids of a conversation through the checkpoint's chat template (tool declarations included;
    template_kwargs such as {"thinking": False} go to the template)."""
    return tokenizer.encode_chat(messages, add_generation_prompt=True, tools=tools or None, **(template_kwargs or {}))


def opens_reasoning(tokenizer, ids) -> bool:
    """Whether the prompt ends inside an open <think> (a thinking template's generation prompt), so the reply
    starts with reasoning and has no <think> of its own."""
    if tokenizer is None or not ids:
        return False
    return tokenizer.decode(list(ids[-16:])).rstrip().endswith(THINK_BEGIN)


def split_reasoning(text: str, opened: bool = False) -> tuple[str, str]:
    """A whole reply -> (reasoning, the rest), as ReplySplitter splits it: reasoning is what sits between a
    leading <think> (or the prompt's, `opened`) and </think>; the newlines after </think> belong to neither.
    Without </think> the whole reply is reasoning (it was cut short)."""
    if not opened:
        lead = text.lstrip()
        if not lead.startswith(THINK_BEGIN):
            return "", text
        text = lead[len(THINK_BEGIN):]
    end = text.find(THINK_END)
    if end < 0:
        return text, ""
    return text[:end], text[end + len(THINK_END):].lstrip("\n")


def count_tool_calls(messages) -> int:
    """Tool calls already in the history: a new call's id is functions.NAME:IDX with IDX counting on from here."""
    return sum(len(m.get("tool_calls") or ()) for m in messages
               if isinstance(m, dict) and m.get("role") == "assistant")


def _held(text: str, marker: str) -> int:
    """Length of the longest end of `text` that could be the start of `marker` (held back while streaming)."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


CALL_BEGIN, ARG_BEGIN, CALL_END = "<|tool_call_begin|>", "<|tool_call_argument_begin|>", "<|tool_call_end|>"


class ReplySplitter:
    """Splits an assistant reply, streamed piece by piece, into reasoning, content and tool calls.

    push() returns ("reasoning" | "content", text) deltas as soon as they cannot be part of a marker. By
    default the tool-call section is held until it is complete, then finish() parses it
    (tokenizer.parse_tool_calls) and numbers the calls on from `first_index`; malformed or truncated markup
    comes back as content, with a ToolCallWarning (the conversation goes on).

    stream_tools=True parses the section as it arrives: ("tool_call", i) once call i's header has parsed
    (self.calls[i] holds its id and name), then ("tool_args", (i, fragment)) as the arguments are generated.
    Fragments already sent cannot be taken back, so this is for output whose markup a grammar enforces (the
    server's required/named tool_choice, and auto's grammar that starts at the section), where only
    truncation can go wrong: a cut call stays as far as it got (finish_reason "length", as OpenAI does) with
    a ToolCallWarning. Markup that breaks before any call has streamed still falls back to text; after one
    has, the rest is content."""

    def __init__(self, first_index: int = 0, stream_tools: bool = False, collect_warnings: bool = False,
                 opened: bool = False):
        self.first_index = first_index
        # collect_warnings: ToolCallWarning texts go to self.warnings instead of warnings.warn (the server reads
        # them on its event loop; warnings.catch_warnings is process-global, so it cannot be used beside a thread)
        self.collect_warnings = collect_warnings
        self.warnings: list[str] = []
        # start -> (reasoning ->) content -> tools (-> tail, with stream_tools); opened: the prompt ended in <think>
        self.state = "reasoning" if opened else "start"
        self.buf = ""
        self.after_think = False   # the newlines after </think> separate; they are not content
        self.stream_tools = stream_tools
        self.calls: list[dict] = []   # stream_tools: the calls streamed so far (arguments as far as they got)
        self.part = "between"         # stream_tools, in the section: between -> header -> args -> between ...
        self.pos = 0                  # stream_tools: how far into buf (the section's text) has been parsed

    def push(self, piece: str) -> list[tuple[str, str]]:
        self.buf += piece
        out: list[tuple[str, str]] = []
        while True:
            if self.state == "start":
                lead = self.buf.lstrip()
                if lead.startswith(THINK_BEGIN):
                    self.buf, self.state = lead[len(THINK_BEGIN):], "reasoning"
                elif THINK_BEGIN.startswith(lead) and self.buf:
                    return out                    # could still become <think>
                else:
                    self.state = "content"
                continue
            if self.state == "reasoning":
                end = self.buf.find(THINK_END)
                if end >= 0:
                    if end:
                        out.append(("reasoning", self.buf[:end]))
                    self.buf, self.state = self.buf[end + len(THINK_END):], "content"
                    self.after_think = True
                    continue
                keep = _held(self.buf, THINK_END)
            elif self.state == "content":
                from .tokenizer import _SECTION_BEGIN
                if self.after_think:
                    self.buf = self.buf.lstrip("\n")
                    if not self.buf:
                        return out
                    self.after_think = False
                begin = self.buf.find(_SECTION_BEGIN)
                if begin >= 0:
                    if begin:
                        out.append(("content", self.buf[:begin]))
                    self.buf, self.state = self.buf[begin:], "tools"
                    self.pos = len(_SECTION_BEGIN)
                    continue
                keep = _held(self.buf, _SECTION_BEGIN)
            elif self.state == "tools":   # held until finish(), or parsed as it comes with stream_tools
                if self.stream_tools:
                    self._section(out)
                    if self.state == "tail":
                        continue
                return out
            else:   # tail: what follows a streamed section is content
                keep = 0
            if len(self.buf) > keep:
                out.append(("content" if self.state == "tail" else self.state, self.buf[:len(self.buf) - keep]))
                self.buf = self.buf[len(self.buf) - keep:]
            return out

    def _section(self, out: list) -> None:
        """stream_tools: parse the tool-call section in self.buf from self.pos as far as it is complete."""
        from .tokenizer import _CALL_ID_RE, _SECTION_END
        buf = self.buf
        while True:
            if self.part == "between":
                while self.pos < len(buf) and buf[self.pos].isspace():
                    self.pos += 1
                rest = buf[self.pos:]
                if rest.startswith(CALL_BEGIN):
                    self.pos += len(CALL_BEGIN)
                    self.part = "header"
                elif rest.startswith(_SECTION_END):
                    self._close(out, buf[self.pos + len(_SECTION_END):])
                    return
                elif not rest or CALL_BEGIN.startswith(rest) or _SECTION_END.startswith(rest):
                    return
                else:
                    return self._broken(out, f"has unexpected text {rest[:40]!r} between calls")
            elif self.part == "header":
                end = buf.find(ARG_BEGIN, self.pos)
                head = buf[self.pos:end if end >= 0 else len(buf)]
                lt = head.find("<")
                if end < 0:
                    if lt >= 0 and not ARG_BEGIN.startswith(head[lt:]):
                        return self._broken(out, f"has a bad call id {head[:40]!r}")
                    return
                m = _CALL_ID_RE.fullmatch(head.strip())
                if m is None or lt >= 0:
                    return self._broken(out, f"has a bad call id {head.strip()[:40]!r}")
                name = m.group("name")
                self.calls.append({"id": f"functions.{name}:{self.first_index + len(self.calls)}",
                                   "type": "function", "function": {"name": name, "arguments": ""}})
                out.append(("tool_call", len(self.calls) - 1))
                self.pos, self.part = end + len(ARG_BEGIN), "args"
            else:   # args: sent as they come, less what may be <|tool_call_end|> or whitespace around them
                end = buf.find(CALL_END, self.pos)
                done = end >= 0
                stop = end if done else len(buf) - _held(buf[self.pos:], CALL_END)
                call = self.calls[-1]["function"]
                seg = buf[self.pos:stop]
                if not call["arguments"]:          # leading whitespace is not part of the arguments
                    lead = len(seg) - len(seg.lstrip())
                    self.pos += lead
                    seg = seg[lead:]
                frag = seg.rstrip()                # trailing whitespace waits: more arguments follow, or the end
                if frag:
                    call["arguments"] += frag
                    out.append(("tool_args", (len(self.calls) - 1, frag)))
                    self.pos += len(frag)
                if not done:
                    return
                self.pos, self.part = end + len(CALL_END), "between"
                self._check_args(call)

    def _check_args(self, call: dict) -> None:
        try:
            ok = isinstance(json.loads(call["arguments"]), dict)
        except json.JSONDecodeError:
            ok = False
        if not ok:   # already sent: it stays (a grammar rules this out); the client is told by the log
            self._warn(f"tool call {call['name']!r} has arguments that are not a JSON object")

    def _warn(self, message: str) -> None:
        if self.collect_warnings:
            self.warnings.append(message)
        else:
            from .tokenizer import ToolCallWarning
            warnings.warn(message, ToolCallWarning, stacklevel=3)

    def _close(self, out: list, rest: str) -> None:
        if not self.calls:
            return self._broken(out, "has an incomplete or empty tool call")
        self.buf, self.state = rest, "tail"

    def _broken(self, out: list, why: str) -> None:
        """Markup gone wrong mid-stream: all of it is text if no call has been sent, else what is left is."""
        self._warn(f"tool-call markup {why}; returned as text")
        self.buf, self.state = (self.buf if not self.calls else self.buf[self.pos:]), "tail"

    def finish(self) -> tuple[list[tuple[str, str]], list[dict]]:
        """The last deltas and the tool calls (OpenAI form, ids numbered across the conversation).
        With stream_tools the calls are those already streamed (push() sent them); a cut one is kept."""
        from .tokenizer import parse_tool_calls
        if self.state == "tools" and self.stream_tools:
            deltas = []
            if self.calls:
                self._warn("tool-call markup is truncated; the last call is cut")
                if self.part == "args" and self.pos < len(self.buf):   # what was held back: sent as it is
                    rest = self.buf[self.pos:]
                    if not self.calls[-1]["function"]["arguments"]:
                        rest = rest.lstrip()
                    if rest:
                        self.calls[-1]["function"]["arguments"] += rest
                        deltas.append(("tool_args", (len(self.calls) - 1, rest)))
                self.buf = ""
                return deltas, self.calls
            parse_tool_calls(self.buf)   # nothing sent yet: the section is text, as without stream_tools (warns)
            rest, self.buf = self.buf, ""
            return ([("content", rest)] if rest else []), []
        if self.state == "tail":
            rest, self.buf = self.buf, ""
            return ([("content", rest)] if rest else []), self.calls
        rest, self.buf = self.buf, ""
        if self.state == "tools":
            content, calls = parse_tool_calls(rest)
        else:
            content, calls = rest, []
        kind = "reasoning" if self.state == "reasoning" else "content"
        deltas = [(kind, content)] if content else []
        for i, c in enumerate(calls):
            c["id"] = f"functions.{c['function']['name']}:{self.first_index + i}"
        return deltas, calls


def split_reply(text: str, history=(), opened: bool = False) -> tuple[str, str, list[dict]]:
    """A whole assistant reply -> (reasoning, content, tool_calls), call ids counting on from `history`
    (opened: the prompt ended in an open <think>)."""
    sp = ReplySplitter(count_tool_calls(history), opened=opened)
    deltas = sp.push(text)
    more, calls = sp.finish()
    parts = {"reasoning": [], "content": []}
    for kind, t in deltas + more:
        parts[kind].append(t)
    return "".join(parts["reasoning"]), "".join(parts["content"]), calls


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


class ChatSession:
    def __init__(self, engine: Engine, system: str | None = None, out=sys.stdout, **sampling):
        self.engine = engine
        self.system = system
        self.out = out
        self.sampling = {"temperature": 0.6, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0,
                         "max_new_tokens": 512, "seed": None}
        self.sampling.update({k: v for k, v in sampling.items() if v is not None})
        self.template_kwargs: dict = {}   # given to the checkpoint's chat template (e.g. thinking)
        self.messages: list[dict] = []
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self.engine.reset()

    def say(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()

    # ---- commands ------------------------------------------------------------------------------
    def command(self, line: str) -> None:
        name, _, arg = line[1:].partition(" ")
        arg = arg.strip()
        if name == "reset":
            self.reset()
            self.say("[conversation reset]")
        elif name == "system":
            self.system = arg or None
            self.reset()
            self.say(f"[system prompt {'set' if arg else 'cleared'}; conversation reset]")
        elif name == "set":
            key, _, value = arg.partition(" ")
            if key not in SETTINGS:
                self.say(f"[unknown setting {key!r}; one of {', '.join(SETTINGS)}]")
                return
            try:
                v = None if value.strip() == "none" and key == "seed" else SETTINGS[key](value)
            except ValueError:
                self.say(f"[{key} needs a {SETTINGS[key].__name__}, got {value!r}]")
                return
            try:
                _check_sampling(dict(self.sampling, **{key: v}))
            except ValueError as e:
                self.say(f"[{e}; {key} stays {self.sampling[key]}]")
                return
            self.sampling[key] = v
            self.say(f"[{key} = {self.sampling[key]}]")
        elif name == "stats":
            self.say(self.stats_text())
        elif name == "save":
            if not arg:
                self.say("[usage: /save PATH]")
                return
            self.save(arg)
            self.say(f"[saved {len(self.messages)} messages to {arg}]")
        elif name == "thinking":
            if arg not in ("on", "off", "default"):
                self.say("[usage: /thinking on|off|default]")
                return
            self.template_kwargs.pop("thinking", None)
            if arg != "default":
                self.template_kwargs["thinking"] = arg == "on"
            self.say(f"[thinking {arg}]")
        elif name in ("help", "?"):
            self.say(HELP)
        else:
            self.say(f"[unknown command /{name}; /help lists them]")

    def stats_text(self) -> str:
        s = self.engine.stats
        lines = [f"[last answer: {s}" + (f", {s.reused_tokens} prompt tokens reused" if s.reused_tokens else "") + "]"]
        backend = self.engine.experts
        if backend is not None and hasattr(backend, "stats"):
            st = backend.stats()
            if "hit_rate" in st:
                lines.append(f"[expert cache: hit rate {st['hit_rate']:.1%}, {st.get('bytes_copied', 0) / 2**20:.1f} "
                             "MiB copied]")
        else:
            lines.append(f"[experts: {backend.name if backend else 'none'} backend, no VRAM cache]")
        mem = f"[memory: RSS {_rss_bytes() / 2**30:.2f} GiB"
        try:
            import torch
            if self.engine.device.type == "cuda":
                mem += f", VRAM {torch.cuda.memory_allocated(self.engine.device) / 2**30:.2f} GiB"
        except Exception:   # noqa: BLE001  (stats must never break the session)
            pass
        lines.append(mem + "]")
        return "\n".join(lines)

    def save(self, path: str) -> None:
        if path.endswith(".json"):
            with open(path, "w") as f:
                json.dump(self.messages, f, ensure_ascii=False, indent=2)
            return
        with open(path, "w") as f:
            for m in self.messages:
                if m.get("reasoning_content"):
                    f.write(f"### {m['role']} (reasoning)\n\n{m['reasoning_content']}\n\n")
                f.write(f"### {m['role']}\n\n{m['content']}\n\n")

    # ---- a turn --------------------------------------------------------------------------------
    def answer(self, text: str) -> None:
        """One turn. A turn that fails (a conversation past the context window, a bad setting) prints
        `error: ...` and is taken back: the conversation stays as it was before it."""
        n = len(self.messages)
        try:
            self._answer(text)
        except Exception as e:   # noqa: BLE001  (one bad turn must not end the session and lose the conversation)
            del self.messages[n:]
            self.out.write("\n")
            self.say(f"error: {e}")

    def _answer(self, text: str) -> None:
        self.messages.append({"role": "user", "content": text})
        opts = dict(self.sampling)
        max_new = opts.pop("max_new_tokens")
        tok = self.engine.tokenizer
        ids = encode_chat(tok, self.messages, None, self.template_kwargs)
        splitter = ReplySplitter(count_tool_calls(self.messages), opened=opens_reasoning(tok, ids))
        # reasoning is shown dimmed on a terminal (each piece wrapped: an interrupted answer leaves no dim on)
        dim = getattr(self.out, "isatty", lambda: False)() and "NO_COLOR" not in os.environ
        shown = {"reasoning": False, "content": False}
        parts = {"reasoning": [], "content": []}

        def show(deltas) -> None:
            for kind, piece in deltas:
                parts[kind].append(piece)
                if kind == "content" and shown["reasoning"] and not shown["content"]:
                    self.out.write("\n")          # the answer starts on its own line below the reasoning
                shown[kind] = True
                self.out.write(f"\x1b[2m{piece}\x1b[0m" if kind == "reasoning" and dim else piece)
            self.out.flush()
        interrupted = False
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            stream = None
            try:
                stream = self.engine.generate(ids, max_new_tokens=max_new, stream=True, **opts)
                for piece in stream:
                    show(splitter.push(piece))
            except KeyboardInterrupt:   # Ctrl-C before or during the stream: the answer so far stands
                interrupted = True
            finally:
                if stream is not None:
                    stream.close()
            last, calls = splitter.finish()
            show(last)
        self.out.write("\n")
        if interrupted:
            self.say("[stopped]")
        for w in caught:
            self.say(f"[warning: {w.message}]")
        for c in calls:
            self.say(f"[tool call {c['id']}] {c['function']['name']}({c['function']['arguments']})")
        msg = {"role": "assistant", "content": "".join(parts["content"])}
        if parts["reasoning"]:    # thinking templates keep the reasoning of an unfinished tool-call turn
            msg["reasoning_content"] = "".join(parts["reasoning"])
        if calls:
            msg["tool_calls"] = calls
        self.messages.append(msg)

    # ---- the loop ------------------------------------------------------------------------------
    def read_message(self) -> str | None:
        """One user message (None at EOF). Ctrl-C at the prompt discards the line being typed."""
        lines: list[str] = []
        multi = False
        while True:
            try:
                line = input("... " if (multi or lines) else ">>> ")
            except KeyboardInterrupt:
                self.out.write("\n")
                lines, multi = [], False
                continue
            except EOFError:
                return None
            if multi:
                if line.rstrip().endswith('"""'):
                    lines.append(line.rstrip()[:-3])
                    return "\n".join(lines)
                lines.append(line)
            elif not lines and line.strip().startswith('"""'):
                rest = line.strip()[3:]
                if rest.endswith('"""') and len(rest) >= 3:
                    return rest[:-3]
                multi, lines = True, [rest] if rest else []
            elif line.endswith("\\"):
                lines.append(line[:-1])
            else:
                lines.append(line)
                return "\n".join(lines)

    def loop(self) -> int:
        _enable_history()
        self.say("hybrid-k2 chat — /help for commands, Ctrl-C stops an answer, Ctrl-D quits")
        while True:
            text = self.read_message()
            if text is None:
                self.out.write("\n")
                return 0
            if not text.strip():
                continue
            try:
                if text.startswith("/"):
                    self.command(text.strip())
                else:
                    self.answer(text)
            except KeyboardInterrupt:   # a Ctrl-C that lands outside the stream still keeps the session
                self.out.write("\n")
                self.say("[stopped]")
                if self.messages and self.messages[-1]["role"] == "user":
                    self.messages.append({"role": "assistant", "content": ""})
            except Exception as e:   # noqa: BLE001  (a failed command, e.g. /save to a bad path, keeps the session)
                self.say(f"error: {e}")


def _enable_history() -> None:
    try:
        import atexit
        import readline
    except ImportError:       # no line editing on this platform; input() still works
        return
    from .demo import cache_dir
    path = cache_dir() / "chat_history"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            readline.read_history_file(path)
    except OSError:
        return
    readline.set_history_length(1000)
    atexit.register(lambda: _save_history(readline, path))


def _save_history(readline, path) -> None:
    try:
        readline.write_history_file(path)
    except OSError:
        pass
