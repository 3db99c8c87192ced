"""A checkpoint's own chat template (jinja), rendered the way Hugging Face transformers renders it.

Where it is found: an HF checkpoint directory's `chat_template.jinja`, else `tokenizer_config.json`'s
`chat_template` (a string, or a list of {"name", "template"} of which "default" is used); a GGUF file's
`tokenizer.chat_template`. Rendering uses jinja2's ImmutableSandboxedEnvironment with the settings and
helpers transformers gives templates (trim_blocks, lstrip_blocks, loop controls, `{% generation %}`,
raise_exception, strftime_now, a tojson that does not HTML-escape), so the template is the only thing taken
from the checkpoint and it can reach nothing but the plain data it is given. A checkpoint without a template
is rendered by tokenizer.render_chat_parts (Kimi K2-0905's template in Python).
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")   # names a message's reasoning comes under
# names the renderer sets itself; template kwargs may not replace them
RESERVED_NAMES = frozenset({"messages", "tools", "documents", "add_generation_prompt"})


class ChatTemplateError(ValueError):
    """A chat template that does not compile or fails while rendering; the message names its source."""


def _plain(v: Any, where: str, esc=None) -> Any:
    """A fresh copy of v made of JSON types only (what the template may see; the sandbox gets no objects).
    esc: applied to every string, keys included (see ChatTemplate.render)."""
    if isinstance(v, str):
        v = str.__str__(v)
        return esc(v) if esc is not None else v
    if v is None or type(v) in (int, float, bool):
        return v
    if isinstance(v, int):
        return int.__int__(v)
    if isinstance(v, float):
        return float.__float__(v)
    if isinstance(v, Mapping):
        return {_plain(k, where, esc): _plain(x, where, esc) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x, where, esc) for x in v]
    raise ValueError(f"{where}: a chat template is given JSON values only, got {type(v).__name__}")


def _alias_reasoning(msg: dict) -> dict:
    # as transformers does: reasoning under any of its names is given to the template under all of them
    r = next((msg[k] for k in _REASONING_FIELDS if msg.get(k) is not None), None)
    return msg if r is None else {"thinking": r, **msg, "reasoning_content": r}


def _environment():
    try:
        import jinja2
        from jinja2.ext import Extension
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise ImportError("this checkpoint has its own chat template, which needs jinja2 (pip install 'jinja2>=3.1.6')"
                          ) from None
    major, minor, patch = (int("".join(c for c in p if c.isdigit()) or 0) for p in
                           (jinja2.__version__.split(".") + ["0", "0"])[:3])
    if (major, minor, patch) < (3, 1, 6):   # older releases have known sandbox escapes
        raise ImportError(f"rendering a checkpoint's chat template needs jinja2>=3.1.6 (installed: {jinja2.__version__})")

    class Generation(Extension):
        """`{% generation %}...{% endgeneration %}` (transformers' assistant-mask tag): renders its body."""
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    class Namespace(jinja2.utils.Namespace):
        """jinja's namespace() that refuses underscore names (no reaching CPython internals through it)."""
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"a chat template may not set {name!r} on a namespace")

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # transformers' tojson: plain json.dumps, no HTML escaping, its options exposed
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now, namespace=Namespace,
                       dict=lambda *a, **k: dict(*a, **k))
    return env


class ChatTemplate:
    """A compiled jinja chat template. `source` (a file, or file:field) is named in every error."""

    def __init__(self, text: str, source: str, special_tokens: Mapping[str, str] | None = None):
        if not isinstance(text, str) or not text.strip():
            raise ChatTemplateError(f"{source}: the chat template is empty or not a string")
        self.text, self.source = text, source
        # bos_token, eos_token, ... as transformers passes its special_tokens_map to the template
        self.special_tokens = {k: v for k, v in (special_tokens or {}).items() if isinstance(v, str)}
        env = _environment()   # first: it says what to install when jinja2 is missing
        import jinja2
        try:
            self._template = env.from_string(text)
        except jinja2.TemplateSyntaxError as e:
            raise ChatTemplateError(f"{source}: the chat template does not compile: {e.message} "
                                    f"(template line {e.lineno})") from None

    def render(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
               tools: Sequence[Mapping[str, Any]] | None = None, escape=None, **kwargs: Any) -> str:
        """The prompt text, as transformers' apply_chat_template(tokenize=False) renders it.

        escape: a str -> str applied to every string of the data (messages, tools, kwargs) before the template
        sees it; Tokenizer.encode_chat marks special-token text in the data with it, so that only the
        template's own markers become control tokens."""
        if not isinstance(messages, (list, tuple)):
            raise ValueError(f"messages must be a list of dicts, got {type(messages).__name__}")
        for i, m in enumerate(messages):
            if not isinstance(m, Mapping):
                raise ValueError(f"messages[{i}] must be a dict, got {type(m).__name__}")
        taken = RESERVED_NAMES.intersection(kwargs)
        if taken:
            raise ValueError(f"chat template kwargs may not set {', '.join(sorted(taken))}")
        data = dict(self.special_tokens)
        data.update(_plain(kwargs, "chat template kwargs", escape))
        data.update(messages=[_alias_reasoning(m) for m in _plain(list(messages), "messages", escape)],
                    tools=_plain(list(tools), "tools", escape) if tools is not None else None, documents=None,
                    add_generation_prompt=bool(add_generation_prompt))
        import jinja2
        try:
            return self._template.render(**data)
        except jinja2.TemplateError as e:   # raise_exception(), sandbox refusals, undefined calls
            raise ChatTemplateError(f"{self.source}: the chat template refused the conversation: {e}") from None
        except Exception as e:   # noqa: BLE001  (a template error of any kind is the template's, said as such)
            raise ChatTemplateError(f"{self.source}: the chat template failed: {type(e).__name__}: {e}") from None

    def __repr__(self) -> str:
        return f"ChatTemplate({self.source!r})"


def _token_text(v: Any) -> str | None:
    # tokenizer_config.json writes a special token as a string or as a serialized AddedToken {"content": ...}
    if isinstance(v, str):
        return v
    if isinstance(v, Mapping) and isinstance(v.get("content"), str):
        return v["content"]
    return None


def _pick_named(value: Any, where: str) -> str:
    """tokenizer_config.json's chat_template: a string, or named templates of which 'default' is the chat one."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {}
        for i, t in enumerate(value):
            if not isinstance(t, Mapping) or not isinstance(t.get("name"), str) \
                    or not isinstance(t.get("template"), str):
                raise ChatTemplateError(f"{where}[{i}] must be {{'name': str, 'template': str}}")
            named[t["name"]] = t["template"]
        if "default" not in named:
            raise ChatTemplateError(f"{where}: named templates {', '.join(sorted(named)) or '(none)'} have no "
                                    f"'default' (the one used for chat)")
        return named["default"]
    raise ChatTemplateError(f"{where} must be a string or a list of named templates, got {type(value).__name__}")


def template_from_dir(path: str | os.PathLike, special_tokens: Mapping[str, str] | None = None
                      ) -> ChatTemplate | None:
    """An HF checkpoint directory's chat template (chat_template.jinja first, as transformers reads it), or None.

    special_tokens: the tokenizer's bos/eos/... texts, used where tokenizer_config.json does not name them."""
    path = os.fspath(path)
    specials = dict(special_tokens or {})
    config_path = os.path.join(path, "tokenizer_config.json")
    cfg: dict = {}
    if os.path.isfile(config_path):
        try:
            with open(config_path, encoding="utf-8") as f:
                cfg = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ChatTemplateError(f"{config_path}: invalid JSON ({e})") from None
        if not isinstance(cfg, dict):
            raise ChatTemplateError(f"{config_path}: must be a JSON object")
        for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
            text = _token_text(cfg.get(key))
            if text is not None:
                specials[key] = text
    jinja_path = os.path.join(path, "chat_template.jinja")
    if os.path.isfile(jinja_path):
        try:
            with open(jinja_path, encoding="utf-8") as f:
                text = f.read()
        except UnicodeDecodeError as e:
            raise ChatTemplateError(f"{jinja_path}: not UTF-8 text ({e})") from None
        return ChatTemplate(text, jinja_path, specials)
    if cfg.get("chat_template") is not None:
        where = f"{config_path}: chat_template"
        return ChatTemplate(_pick_named(cfg["chat_template"], where), where, specials)
    return None
