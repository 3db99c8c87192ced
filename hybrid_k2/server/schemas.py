"""OpenAI request bodies -> checked generation requests; errors in OpenAI's shape.

Each field is checked once here, by name (wrong type -> 400 naming it); unknown fields are ignored, as OpenAI
does. Value ranges the Engine checks itself (temperature, top_p, ...) come back from it as ValueError -> 400."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from numbers import Integral, Real

FUNCTION_NAME = re.compile(r"[A-Za-z0-9_\-.]{1,64}")   # OpenAI's rule; also what Kimi's call ids can hold
ROLES = ("system", "developer", "user", "assistant", "tool")


class ApiError(Exception):
    """An error response: {"error": {"message", "type", "param", "code"}} with an HTTP status."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             413: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "unavailable_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}


def bad(param: str, message: str, code: str = "invalid_value") -> ApiError:
    return ApiError(400, f"{param}: {message}", param, code)


def _get(body: dict, name: str, kinds, what: str, default=None):
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) and bool not in kinds or not isinstance(v, kinds):
        raise bad(name, f"must be {what}, got {type(v).__name__}", "invalid_type")
    return v


def _num(body, name, default=None):
    return _get(body, name, (Real,), "a number", default)


def _int(body, name, default=None):
    return _get(body, name, (Integral,), "an integer", default)


def _bool(body, name, default=False):
    return _get(body, name, (bool,), "a boolean", default)


@dataclass
class GenRequest:
    """What one request asks of the engine (kwargs for Engine.generate) and how to answer it."""
    prompt: object                       # token ids (chat: templated here) or text (completions)
    kwargs: dict
    stream: bool = False
    include_usage: bool = False
    logprobs: int | None = None          # top alternatives per token; None = no logprobs
    messages: list = field(default_factory=list)
    tools: list | None = None
    tool_choice: object = "auto"         # "auto" | "none" | "required" | {"type": "function", ...}
    grammar: str | None = None           # "json_object" / "json_schema" / "tool"; see build_grammar
    schema: dict | None = None
    forced_functions: list | None = None  # [(name, parameters)] a tool call must pick from
    template_kwargs: dict | None = None  # chat_template_kwargs, for the checkpoint's chat template (thinking, ...)
    opened: bool = False                 # the prompt ends in an open <think>: the reply starts with reasoning


def _sampling(body: dict, max_default: int | None) -> dict:
    n = _int(body, "n", 1)
    if n != 1:
        raise bad("n", f"only n=1 is supported (one sequence per request), got {n}", "unsupported_value")
    max_tokens = _int(body, "max_completion_tokens")
    if max_tokens is None:
        max_tokens = _int(body, "max_tokens")
    if max_tokens is None:
        max_tokens = max_default
    elif max_tokens < 1:
        raise bad("max_tokens", f"must be >= 1, got {max_tokens}")
    stop = body.get("stop")
    if stop is not None:
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise bad("stop", "must be a string or a list of strings", "invalid_type")
        if "" in stop:
            raise bad("stop", "stop strings must be non-empty")
    kw = dict(max_new_tokens=max_tokens, temperature=_num(body, "temperature", 0.6), top_p=_num(body, "top_p", 1.0),
              top_k=_int(body, "top_k", 0), min_p=_num(body, "min_p", 0.0),
              repetition_penalty=_num(body, "repetition_penalty", 1.0),
              presence_penalty=_num(body, "presence_penalty", 0.0),
              frequency_penalty=_num(body, "frequency_penalty", 0.0), seed=_int(body, "seed"), stop=stop or None)
    return kw


def _stream_opts(body: dict) -> tuple[bool, bool]:
    stream = _bool(body, "stream")
    opts = _get(body, "stream_options", (dict,), "an object", {})
    include = _get(opts, "include_usage", (bool,), "a boolean", False) if opts else False
    return stream, include


def _text_content(content, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        out = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad(f"{where}[{j}]", "only text parts ({'type': 'text', 'text': ...}) are supported",
                          "unsupported_value")
            out.append(part["text"])
        return "".join(out)
    raise bad(where, f"must be a string or a list of text parts, got {type(content).__name__}", "invalid_type")


def parse_messages(raw) -> list[dict]:
    if not isinstance(raw, list) or not raw:
        raise bad("messages", "must be a non-empty list of messages", "invalid_type")
    out = []
    for i, m in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad(where, "must be an object", "invalid_type")
        role = m.get("role")
        if role not in ROLES:
            raise bad(f"{where}.role", f"must be one of {', '.join(ROLES)}, got {role!r}")
        msg = {"role": "system" if role == "developer" else role}
        content = m.get("content")
        if content is not None:
            msg["content"] = _text_content(content, f"{where}.content")
        elif role not in ("assistant",):
            raise bad(f"{where}.content", "is required")
        if isinstance(m.get("name"), str):
            msg["name"] = m["name"]
        if role == "assistant":   # a thinking model's reasoning sent back (its template may render it)
            for key in ("reasoning_content", "reasoning"):
                r = m.get(key)
                if r is not None:
                    if not isinstance(r, str):
                        raise bad(f"{where}.{key}", f"must be a string, got {type(r).__name__}", "invalid_type")
                    msg.setdefault("reasoning_content", r)
        if role == "tool":
            if not isinstance(m.get("tool_call_id"), str):
                raise bad(f"{where}.tool_call_id", "a tool message needs the id of the call it answers")
            msg["tool_call_id"] = m["tool_call_id"]
        if role == "assistant" and m.get("tool_calls"):
            calls = m["tool_calls"]
            if not isinstance(calls, list):
                raise bad(f"{where}.tool_calls", "must be a list", "invalid_type")
            msg["tool_calls"] = []
            for j, c in enumerate(calls):
                fn = c.get("function") if isinstance(c, dict) else None
                if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) \
                        or not isinstance(fn.get("arguments"), str):
                    raise bad(f"{where}.tool_calls[{j}]", "needs function.name and function.arguments (a string)")
                msg["tool_calls"].append({"id": c.get("id") if isinstance(c.get("id"), str) else "",
                                          "type": "function",
                                          "function": {"name": fn["name"], "arguments": fn["arguments"]}})
        elif role == "assistant" and content is None:
            raise bad(f"{where}.content", "an assistant message needs content or tool_calls")
        out.append(msg)
    return out


def parse_tools(body: dict) -> tuple[list | None, object]:
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            raise bad("tools", "must be a list", "invalid_type")
        for i, t in enumerate(tools):
            fn = t.get("function") if isinstance(t, dict) and t.get("type", "function") == "function" else None
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) \
                    or not FUNCTION_NAME.fullmatch(fn["name"]):
                raise bad(f"tools[{i}].function.name", "a function tool needs a name of 1-64 letters, digits, _ - .")
            params = fn.get("parameters", {"type": "object"})
            if not isinstance(params, dict):
                raise bad(f"tools[{i}].function.parameters", "must be a JSON schema object", "invalid_type")
        tools = tools or None
    choice = body.get("tool_choice")
    if choice is None:
        choice = "auto" if tools else "none"
    if isinstance(choice, str):
        if choice not in ("auto", "none", "required"):
            raise bad("tool_choice", f"must be auto, none, required or a named function, got {choice!r}")
        if choice == "required" and not tools:
            raise bad("tool_choice", "required needs tools")
    elif isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name") if isinstance(choice.get("function"), dict) else None
        names = [t["function"]["name"] for t in tools or ()]
        if name not in names:
            raise bad("tool_choice", f"names function {name!r}, which is not in tools ({', '.join(names) or 'none'})")
    else:
        raise bad("tool_choice", "must be a string or an object", "invalid_type")
    return tools, choice


def _response_format(body: dict) -> tuple[str | None, dict | None]:
    rf = body.get("response_format")
    if rf is None:
        return None, None
    if not isinstance(rf, dict) or rf.get("type") not in ("text", "json_object", "json_schema"):
        raise bad("response_format", "must be {'type': 'text' | 'json_object' | 'json_schema', ...}")
    if rf["type"] == "text":
        return None, None
    if rf["type"] == "json_object":
        return "json", {"type": "object"}
    js = rf.get("json_schema")
    if not isinstance(js, dict) or not isinstance(js.get("schema", {}), dict):
        raise bad("response_format.json_schema", "must be an object with a 'schema' (a JSON schema object)")
    return "json", js.get("schema", {})


def parse_template_kwargs(body: dict) -> dict | None:
    """chat_template_kwargs (vLLM's and SGLang's name), e.g. {"thinking": false}: extra variables for the
    checkpoint's chat template."""
    from ..chat_template import RESERVED_NAMES
    kw = _get(body, "chat_template_kwargs", (dict,), "an object")
    if kw is None:
        return None
    for k in kw:
        if not isinstance(k, str) or not k.isidentifier() or k in RESERVED_NAMES:
            raise bad("chat_template_kwargs", f"{k!r} cannot be set (a template variable name, not one of "
                      f"{', '.join(sorted(RESERVED_NAMES))})")
    return kw


def parse_chat(body: dict, max_default: int | None) -> GenRequest:
    messages = parse_messages(body.get("messages"))
    kwargs = _sampling(body, max_default)
    stream, include = _stream_opts(body)
    tools, choice = parse_tools(body)
    lp = _bool(body, "logprobs")
    top = _int(body, "top_logprobs")
    if top is not None and not lp:
        raise bad("top_logprobs", "needs logprobs: true")
    if top is not None and not 0 <= top <= 20:
        raise bad("top_logprobs", f"must be in [0, 20], got {top}")
    if lp and stream:
        raise bad("logprobs", "logprobs are not available when streaming", "unsupported_value")
    req = GenRequest(prompt=None, kwargs=kwargs, stream=stream, include_usage=include,
                     logprobs=(top or 0) if lp else None, messages=messages, tools=tools, tool_choice=choice,
                     template_kwargs=parse_template_kwargs(body))
    kind, schema = _response_format(body)
    forced = choice == "required" or isinstance(choice, dict)
    if kind and forced:
        raise bad("response_format", "cannot be combined with a forced tool_choice (the output is a tool call)")
    if forced:
        wanted = None if choice == "required" else choice["function"]["name"]
        req.grammar = "tool"
        req.forced_functions = [(t["function"]["name"], t["function"].get("parameters") or {"type": "object"})
                                for t in tools if wanted in (None, t["function"]["name"])]
    elif kind:
        req.grammar, req.schema = kind, schema
    return req


def parse_completion(body: dict, max_default: int | None) -> GenRequest:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]       # a batch of one
    ok = isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(
        isinstance(t, int) and not isinstance(t, bool) for t in prompt))
    if not ok:
        raise bad("prompt", "must be a string or a list of token ids (one prompt per request)", "invalid_type")
    if _bool(body, "echo"):
        raise bad("echo", "echo is not supported", "unsupported_value")
    if body.get("suffix") is not None:
        raise bad("suffix", "suffix (fill-in-the-middle) is not supported", "unsupported_value")
    if _int(body, "best_of", 1) != 1:
        raise bad("best_of", "only best_of=1 is supported", "unsupported_value")
    kwargs = _sampling(body, max_default)
    stream, include = _stream_opts(body)
    lp = _int(body, "logprobs")
    if lp is not None and not 0 <= lp <= 20:
        raise bad("logprobs", f"must be in [0, 20], got {lp}")
    if lp is not None and stream:
        raise bad("logprobs", "logprobs are not available when streaming", "unsupported_value")
    return GenRequest(prompt=prompt, kwargs=kwargs, stream=stream, include_usage=include, logprobs=lp)
