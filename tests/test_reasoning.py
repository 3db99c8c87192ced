"""Thinking models: <think>...</think> comes back apart from the answer (Generation.reasoning, the server's
reasoning_content, dimmed in the REPL). The demo model never writes <think> by itself, so the tests force the
tokens through generate()'s logits_processor, or use a thinking template whose generation prompt opens <think>
(everything the model writes is then reasoning until </think>)."""
import io
import json
import os
import shutil
import sys

import openai
import pexpect
import pytest

import hybrid_k2
from hybrid_k2.chat import ChatSession, ReplySplitter, opens_reasoning, split_reasoning
from hybrid_k2.demo import trained_demo
from hybrid_k2.server import Server
from test_chat_template import THINKING_TEMPLATE
from test_server import running

# the template raises when asked to (a template's own refusal, for the error path)
TEMPLATE = "{%- if fail is defined -%}{{ raise_exception('refused: ' ~ fail) }}{%- endif -%}\n" + THINKING_TEMPLATE
USER = [{"role": "user", "content": "Hello there"}]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("thinking")
    for name in ("config.json", "model.safetensors", "tiktoken.model"):
        shutil.copyfile(os.path.join(trained_demo(), name), d / name)
    (d / "chat_template.jinja").write_text(TEMPLATE)
    return d


@pytest.fixture(scope="module")
def engine(ckpt):
    with hybrid_k2.load(str(ckpt), ctx=2048) as e:
        yield e


@pytest.fixture(scope="module")
def plain():
    with hybrid_k2.load("demo", ctx=2048) as e:   # no template of its own: K2-0905's
        yield e


def forcing(tok, text: str):
    """A logits processor that makes the model write `text` (special-token text as special ids), then stop."""
    ids = tok.encode(text, allow_special=True) + [tok.im_end_id]

    def proc(out, logits):
        logits.fill_(float("-inf"))
        logits[ids[len(out)]] = 0
        return logits
    return proc


def test_generation_reasoning_apart_from_the_answer(plain):
    tok = plain.tokenizer
    text = "<think>plan it: 1, 2</think>\n\nThe answer."
    g = plain.generate(USER, max_new_tokens=64, logits_processor=forcing(tok, text))
    assert g.finish_reason == "stop" and g.text == text
    assert g.reasoning == "plan it: 1, 2" and g.content == "The answer." and g.tool_calls == []
    # reasoning, then a tool call
    text = ("<think>use the tool</think><|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0"
            "<|tool_call_argument_begin|>{\"city\": \"Paris\"}<|tool_call_end|><|tool_calls_section_end|>")
    g = plain.generate(USER, max_new_tokens=64, logits_processor=forcing(tok, text))
    assert g.reasoning == "use the tool" and g.content == ""
    assert [c["function"]["name"] for c in g.tool_calls] == ["get_weather"]
    # no <think>: all answer, exactly as before
    g = plain.generate(USER, max_new_tokens=8, temperature=0)
    assert g.reasoning == "" and g.content == g.text


def test_prompt_that_opens_think(engine):
    tok = engine.tokenizer
    assert opens_reasoning(tok, engine.encode_prompt(USER))
    assert not opens_reasoning(tok, engine.encode_prompt(USER, {"thinking": False}))
    g = engine.generate(USER, max_new_tokens=64, logits_processor=forcing(tok, "step one</think>\nDone."))
    assert (g.reasoning, g.content) == ("step one", "Done.")
    free = engine.generate(USER, max_new_tokens=10, temperature=0)        # never closes </think>: all reasoning
    assert free.text and free.reasoning == free.text and free.content == ""
    off = engine.generate(USER, max_new_tokens=10, temperature=0, chat_template_kwargs={"thinking": False})
    assert off.reasoning == "" and off.content == off.text


@pytest.mark.parametrize("text,opened", [
    ("<think>plan it: 1, 2</think>\n\nThe answer.", False),
    ("  <think>\nmulti\nline</think>answer <b>bold</b>", False),
    ("reasoning only, cut short", True),
    ("why</think>\n\nbecause", True),
    ("<thinking is not a marker> plain", False),
    ("<thi", False),
])
def test_splitter_on_the_real_token_stream(plain, text, opened):
    """The REPL and the server split a stream one decoded token at a time (markers arrive in pieces: <think>
    is several BPE tokens here); the result is the whole reply's split."""
    tok = plain.tokenizer
    ids = tok.encode(text, allow_special=True)
    sp = ReplySplitter(opened=opened)
    got = {"reasoning": "", "content": ""}
    for piece in tok.decode_stream(ids):
        for kind, t in sp.push(piece):
            got[kind] += t
    for kind, t in sp.finish()[0]:
        got[kind] += t
    assert (got["reasoning"], got["content"]) == split_reasoning(text, opened)
    assert len(tok.encode("<think>")) > 1      # the marker arrives split across tokens


# ---- the server --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def client(engine):
    with running(Server(engine, served_model_name="k2-think", stream_interval=0)) as url:
        yield openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)


def ask(client, **kw):
    kw = {"max_tokens": 10, "temperature": 0, **kw}
    return client.chat.completions.create(model="k2-think", messages=USER, **kw)


def test_server_reasoning_content(client, engine):
    want = engine.generate(USER, max_new_tokens=10, temperature=0)
    msg = ask(client).choices[0].message
    assert msg.reasoning_content == want.reasoning == want.text and msg.content == ""
    chunks = list(ask(client, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == want.reasoning
    assert "".join(d.content or "" for d in deltas) == ""


def test_server_thinking_off(client, engine):
    want = engine.generate(USER, max_new_tokens=10, temperature=0, chat_template_kwargs={"thinking": False})
    msg = ask(client, extra_body={"chat_template_kwargs": {"thinking": False}}).choices[0].message
    assert msg.content == want.content == want.text and getattr(msg, "reasoning_content", None) is None


def test_server_grammar_answers_after_an_empty_reasoning(client, engine):
    """A forced tool call or a JSON answer starts at once: the prompt's open <think> is closed first."""
    r = ask(client, max_tokens=60, response_format={"type": "json_object"}, seed=1, temperature=0.8)
    msg = r.choices[0].message
    assert getattr(msg, "reasoning_content", None) is None
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(msg.content), dict)
    assert r.usage.prompt_tokens == len(engine.encode_prompt(USER) + engine.tokenizer.encode("</think>"))
    tool = {"type": "function", "function": {"name": "get_time", "parameters": {
        "type": "object", "properties": {"tz": {"type": "string", "maxLength": 5}}, "required": ["tz"],
        "additionalProperties": False}}}
    r = ask(client, max_tokens=40, tools=[tool], tool_choice="required")
    msg = r.choices[0].message
    assert [c.function.name for c in msg.tool_calls] == ["get_time"] and r.choices[0].finish_reason == "tool_calls"
    assert getattr(msg, "reasoning_content", None) is None


def test_server_reasoning_in_history_reaches_the_template(client, engine):
    import httpx2 as httpx
    msgs = [{"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": "", "reasoning_content": "need the tool", "tool_calls": [
                {"id": "functions.get_weather:0", "type": "function",
                 "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
            {"role": "tool", "tool_call_id": "functions.get_weather:0", "content": "sunny"}]
    base = str(client.base_url).removesuffix("/v1/")
    r = httpx.post(base + "/tokenize", json={"messages": msgs})
    assert r.status_code == 200, r.text
    ids = r.json()["tokens"]
    assert ids == engine.tokenizer.encode_chat(msgs)
    assert "<think>need the tool</think>" in engine.tokenizer.decode(ids)
    r = client.chat.completions.create(model="k2-think", messages=msgs, max_tokens=4, temperature=0)
    assert r.usage.prompt_tokens == len(ids)


def test_server_template_errors(client, ckpt):
    with pytest.raises(openai.BadRequestError) as e:
        ask(client, extra_body={"chat_template_kwargs": {"fail": "no way"}})
    assert "chat_template.jinja" in str(e.value) and "refused: no way" in str(e.value)
    with pytest.raises(openai.BadRequestError, match="chat_template_kwargs"):
        ask(client, extra_body={"chat_template_kwargs": {"messages": []}})
    with pytest.raises(openai.BadRequestError, match="chat_template_kwargs"):
        ask(client, extra_body={"chat_template_kwargs": ["thinking"]})


# ---- the REPL ------------------------------------------------------------------------------------------
def test_repl_records_reasoning_without_ansi_off_a_tty(engine):
    out = io.StringIO()
    s = ChatSession(engine, out=out, temperature=0, max_new_tokens=6)
    s.answer("Hello there")
    want = engine.generate(USER, max_new_tokens=6, temperature=0)
    assert s.messages[-1] == {"role": "assistant", "content": "", "reasoning_content": want.reasoning}
    assert want.reasoning in out.getvalue() and "\x1b" not in out.getvalue()


def test_repl_dims_reasoning_on_a_terminal(ckpt, tmp_path):
    env = {"HYBRID_K2_CACHE": str(tmp_path), "PATH": "/usr/bin:/bin", "PYTHONUNBUFFERED": "1", "TERM": "dumb"}
    child = pexpect.spawn(sys.executable, ["-m", "hybrid_k2", "chat", str(ckpt), "--device", "cpu", "-n", "6",
                                           "--temperature", "0"], env=env, encoding="utf-8", timeout=120,
                          dimensions=(40, 200))
    child.expect(">>> ")
    child.sendline("Hello there")
    child.expect(">>> ")
    assert "\x1b[2m" in child.before and "\x1b[0m" in child.before       # the reasoning, dimmed
    child.sendline("/thinking off")
    child.expect(r"\[thinking off\]")
    child.expect(">>> ")
    child.sendline("Hello there")
    child.expect(">>> ")
    assert "\x1b[" not in child.before                                    # an answer: plain text
    transcript = tmp_path / "t.json"
    child.sendline(f"/save {transcript}")
    child.expect("saved 4 messages")
    child.expect(">>> ")
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    first, second = [m for m in json.loads(transcript.read_text()) if m["role"] == "assistant"]
    assert first["content"] == "" and first["reasoning_content"]
    assert second["content"] and "reasoning_content" not in second
