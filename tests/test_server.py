"""`hybrid-k2 serve`: the real app served by uvicorn on 127.0.0.1, driven by the official `openai` client."""
import contextlib
import json
import socket
import threading
import time
import warnings

import httpx2 as httpx
import jsonschema
import openai
import pytest
import torch
import uvicorn

import hybrid_k2
from hybrid_k2.chat import ReplySplitter, split_reply
from hybrid_k2.server import Server
from hybrid_k2.tokenizer import ToolCallWarning

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 20}, "unit": {"type": "string", "enum": ["c", "f"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7}},
        "required": ["city", "unit", "days"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"tz": {"type": "string", "maxLength": 10}}, "required": ["tz"],
    "additionalProperties": False}}}
USER = [{"role": "user", "content": "What is the weather in Paris?"}]


@contextlib.contextmanager
def running(server: Server):
    """Serve `server.app` with uvicorn on a free 127.0.0.1 port in a thread; yields the base URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uv = uvicorn.Server(uvicorn.Config(server.app, host="127.0.0.1", port=port, log_level="warning"))
    t = threading.Thread(target=uv.run, daemon=True)
    t.start()
    deadline = time.monotonic() + 20
    while not uv.started:
        assert time.monotonic() < deadline and t.is_alive(), "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        uv.should_exit = True
        t.join(10)


@pytest.fixture(scope="module")
def engine():
    return hybrid_k2.load("demo", ctx=4096)


@pytest.fixture(scope="module")
def base(engine):
    # stream_interval=0: one SSE chunk per piece, so the tests see what each token brings
    with running(Server(engine, served_model_name="k2-demo", max_queue=8, stream_interval=0)) as url:
        yield url


@pytest.fixture(scope="module")
def client(base):
    return openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=30)


def chat(client, messages=USER, **kw):
    kw.setdefault("max_tokens", 12)
    return client.chat.completions.create(model="k2-demo", messages=messages, **kw)


def test_models_health_and_chat(client, base, engine):
    assert [m.id for m in client.models.list().data] == ["k2-demo"]
    assert httpx.get(base + "/health").status_code == 200
    r = chat(client, seed=3)
    c = r.choices[0]
    assert r.object == "chat.completion" and c.message.role == "assistant"
    assert c.finish_reason in ("stop", "length") and isinstance(c.message.content, str)
    prompt = engine.tokenizer.encode_chat(USER)
    assert r.usage.prompt_tokens == len(prompt)
    assert r.usage.completion_tokens == len(engine.tokenizer.encode(c.message.content)) or c.message.content
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.usage.prompt_tokens_details.cached_tokens >= 0


def test_stream_with_usage_matches_non_stream(client):
    whole = chat(client, temperature=0.9, seed=11, max_tokens=20)
    chunks = list(chat(client, temperature=0.9, seed=11, max_tokens=20, stream=True,
                       stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == whole.choices[0].message.content
    finals = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert all(ch.usage is None for ch in chunks[:-1])


def test_seed_reproducible_and_distinct(client):
    a, b, c = (chat(client, temperature=1.0, seed=s, max_tokens=16).choices[0].message.content for s in (5, 5, 6))
    assert a == b and a != c


def test_stop_strings(client):
    free = chat(client, temperature=0, max_tokens=30).choices[0].message.content
    stop = free[5:8]
    assert len(stop) == 3
    r = chat(client, temperature=0, max_tokens=30, stop=[stop, "\x00never"])
    assert r.choices[0].message.content == free[:free.find(stop)] and r.choices[0].finish_reason == "stop"


def check_call(call, idx, tool=WEATHER):
    fn = tool["function"]
    assert call.type == "function" and call.function.name == fn["name"]
    assert call.id == f"functions.{fn['name']}:{idx}"
    jsonschema.validate(json.loads(call.function.arguments), fn["parameters"])


def test_named_tool_choice_is_schema_valid(client):
    for seed in (1, 2):
        r = chat(client, tools=[WEATHER, TIME], tool_choice={"type": "function", "function": {"name": "get_weather"}},
                 temperature=1.0, seed=seed, max_tokens=80)
        c = r.choices[0]
        assert c.finish_reason == "tool_calls" and len(c.message.tool_calls) == 1
        check_call(c.message.tool_calls[0], 0)


def test_required_tool_streamed_ids_count_on_from_history(client):
    history = USER + [
        {"role": "assistant", "content": "", "tool_calls": [{"id": "functions.get_weather:0", "type": "function",
                                                              "function": {"name": "get_weather",
                                                                           "arguments": '{"city":"Paris"}'}}]},
        {"role": "tool", "tool_call_id": "functions.get_weather:0", "content": "sunny, 21 C"},
        {"role": "user", "content": "And the time there?"}]
    chunks = list(chat(client, history, tools=[TIME], tool_choice="required", temperature=0.8, seed=4,
                       max_tokens=60, stream=True))
    deltas = [d for ch in chunks for d in (ch.choices[0].delta.tool_calls or [])]
    heads = [d for d in deltas if d.id is not None]
    assert len(heads) == 1 and heads[0].function.name == "get_time" and heads[0].id == "functions.get_time:1"
    args = "".join(d.function.arguments or "" for d in deltas)
    jsonschema.validate(json.loads(args), TIME["function"]["parameters"])
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_named_tool_call_streams_argument_fragments(client):
    kw = dict(tools=[WEATHER, TIME], tool_choice={"type": "function", "function": {"name": "get_weather"}},
              temperature=1.0, seed=2)
    r = chat(client, max_tokens=80, **kw)
    whole = r.choices[0].message.tool_calls[0]
    chunks = list(chat(client, max_tokens=80, stream=True, **kw))
    deltas = [d for ch in chunks if ch.choices for d in (ch.choices[0].delta.tool_calls or [])]
    head = deltas[0]     # id and name once (arguments ""), then fragments as the tokens come
    assert (head.index, head.id, head.function.name, head.function.arguments) == (0, whole.id, "get_weather", "")
    frags = [d.function.arguments for d in deltas[1:]]
    assert all(d.index == 0 and d.id is None and d.function.name is None for d in deltas[1:])
    assert len(frags) > 3 and all(frags)
    assert "".join(frags) == whole.function.arguments
    check_call(whole, 0)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    # cut by max_tokens mid-arguments: the fragments sent stand (a prefix of the whole), finish_reason "length"
    cut = list(chat(client, max_tokens=r.usage.completion_tokens - 4, stream=True, **kw))
    cut_deltas = [d for ch in cut if ch.choices for d in (ch.choices[0].delta.tool_calls or [])]
    assert cut_deltas[0].id == whole.id
    got = "".join(d.function.arguments for d in cut_deltas)
    assert got and whole.function.arguments.startswith(got) and got != whole.function.arguments
    assert cut[-1].choices[0].finish_reason == "length"


def test_tool_result_round_trip_goes_through_the_template(client, engine):
    first = chat(client, tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "get_weather"}},
                 temperature=0.7, seed=9, max_tokens=80)
    call = first.choices[0].message.tool_calls[0]
    msgs = USER + [first.choices[0].message.model_dump(exclude_none=True),
                   {"role": "tool", "tool_call_id": call.id, "content": '{"forecast": "sunny"}'}]
    second = chat(client, msgs, tools=[WEATHER], temperature=0, max_tokens=10)
    sent = [{"role": "user", "content": USER[0]["content"]},
            {"role": "assistant", "content": "", "tool_calls": [
                {"id": call.id, "type": "function", "function": {"name": "get_weather",
                                                                 "arguments": call.function.arguments}}]},
            {"role": "tool", "tool_call_id": call.id, "content": '{"forecast": "sunny"}'}]
    assert second.usage.prompt_tokens == len(engine.tokenizer.encode_chat(sent, tools=[WEATHER]))
    assert "## Return of functions.get_weather:0" in engine.tokenizer.apply_chat_template(sent, tools=[WEATHER])
    # the tool call turn is a prefix of the next prompt: its latents are reused
    assert second.usage.prompt_tokens_details.cached_tokens > first.usage.prompt_tokens


def test_json_schema_and_json_object(client):
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 150},
                                               "tags": {"type": "array", "items": {"type": "string", "maxLength": 5},
                                                        "maxItems": 3}},
              "required": ["name", "age", "tags"], "additionalProperties": False}
    for seed in (1, 2, 3):
        r = chat(client, temperature=1.0, seed=seed, max_tokens=120,
                 response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema}})
        assert r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(r.choices[0].message.content), schema)
    r = chat(client, temperature=1.0, seed=1, max_tokens=120, response_format={"type": "json_object"})
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    else:    # cut by max_tokens: still a valid JSON prefix that starts an object
        assert r.choices[0].message.content.startswith("{")


def test_prefix_reuse_reports_cached_tokens(client):
    one = chat(client, temperature=0, max_tokens=8)
    msgs = USER + [{"role": "assistant", "content": one.choices[0].message.content},
                   {"role": "user", "content": "Thanks. And tomorrow?"}]
    two = chat(client, msgs, temperature=0, max_tokens=8)
    assert two.usage.prompt_tokens_details.cached_tokens >= one.usage.prompt_tokens
    assert two.usage.prompt_tokens > two.usage.prompt_tokens_details.cached_tokens


def test_logprobs_and_penalties(client, engine):
    r = chat(client, temperature=0, max_tokens=6, logprobs=True, top_logprobs=3)
    lp = r.choices[0].logprobs.content
    assert len(lp) == r.usage.completion_tokens and all(len(t.top_logprobs) == 3 for t in lp)
    for t in lp:    # greedy: the chosen token is the most likely one
        assert t.logprob <= 0 and abs(t.top_logprobs[0].logprob - t.logprob) < 1e-5
    assert "".join(t.token for t in lp) == r.choices[0].message.content
    # a strong frequency penalty changes a greedy answer that repeats tokens
    plain = engine.generate("a a a a a", max_new_tokens=24, temperature=0)
    if len(set(plain.token_ids)) < len(plain.token_ids):
        pen = client.completions.create(model="k2-demo", prompt="a a a a a", max_tokens=24, temperature=0,
                                        frequency_penalty=2.0)
        assert pen.choices[0].text != plain.text


def test_completions_text_and_stream(client, engine):
    g = engine.generate("Beautiful is better than", max_new_tokens=10, temperature=0)
    r = client.completions.create(model="k2-demo", prompt="Beautiful is better than", max_tokens=10, temperature=0,
                                  logprobs=2)
    assert r.choices[0].text == g.text and r.choices[0].finish_reason == g.finish_reason
    assert len(r.choices[0].logprobs.tokens) == len(g.token_ids)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="k2-demo", prompt="Beautiful is better than", max_tokens=10, temperature=0, stream=True))
    assert streamed == g.text


def test_stream_interval_merges_pieces_into_fewer_writes(engine):
    g = engine.generate("Beautiful is better than", max_new_tokens=40, temperature=0)
    assert len(g.token_ids) == 40
    with running(Server(engine, served_model_name="k2-demo", stream_interval=1.0)) as url:
        c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=30)
        t0 = time.monotonic()
        chunks = [ch.choices[0].text for ch in c.completions.create(
            model="k2-demo", prompt="Beautiful is better than", max_tokens=40, temperature=0, stream=True)]
        took = time.monotonic() - t0
    assert "".join(chunks) == g.text
    texts = [t for t in chunks if t]
    # 40 tokens take ~50 ms here: the first piece goes at once, the rest waits for the interval or the end,
    # and the end goes at once (not a second after the first piece)
    assert len(texts) <= 2 + int(took) and took < 1.0


def test_tokenize_detokenize_metrics(base, engine):
    r = httpx.post(base + "/tokenize", json={"prompt": "hello world"}).json()
    assert r["tokens"] == engine.tokenizer.encode("hello world") and r["count"] == len(r["tokens"])
    m = httpx.post(base + "/tokenize", json={"messages": USER}).json()
    assert m["tokens"] == engine.tokenizer.encode_chat(USER)
    assert httpx.post(base + "/detokenize", json={"tokens": r["tokens"]}).json() == {"prompt": "hello world"}
    text = httpx.get(base + "/metrics").text
    for name in ("hybrid_k2_requests_total{", "hybrid_k2_completion_tokens_total", "hybrid_k2_queue_depth",
                 "hybrid_k2_decode_tokens_per_second", "hybrid_k2_prefill_tokens_per_second"):
        assert name in text
    assert 'path="/v1/chat/completions",status="200"' in text


def test_metrics_count_unknown_paths_as_one_label(base):
    """Paths outside the API count as "other": a client cannot grow the metrics without bound or write into
    the Prometheus text through a path."""
    for i in range(3):
        assert httpx.get(base + f"/nope-{i}%22%7D%209999").status_code == 404
    text = httpx.get(base + "/metrics").text
    assert 'path="other",status="404"' in text and "nope" not in text and "9999" not in text


def test_server_leaves_the_process_warning_filters_alone(base, client):
    """The server never swaps the process-global warning filters (warnings.catch_warnings is not thread-safe:
    the engine thread and the event loop used it at once, and left simplefilter('always') recording into a
    dead list, so later warnings vanished)."""
    before = list(warnings.filters)
    for _ in range(3):
        list(chat(client, USER, max_tokens=8, stream=True))
    assert warnings.filters == before
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        warnings.warn("still shown", UserWarning)
    assert [str(x.message) for x in w] == ["still shown"]


def err(resp) -> dict:
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert "Traceback" not in body["error"]["message"]
    return body["error"]


@pytest.mark.parametrize("field,value,param", [
    ("n", 2, "n"), ("temperature", "hot", "temperature"), ("temperature", -1, "temperature"),
    ("top_p", 0, "top_p"), ("max_tokens", 0, "max_tokens"), ("stop", [""], "stop"), ("messages", [], "messages"),
    ("messages", [{"role": "wizard", "content": "x"}], "messages[0].role"),
    ("tool_choice", {"type": "function", "function": {"name": "nope"}}, "tool_choice"),
    ("response_format", {"type": "json_schema", "json_schema": {"schema": {"type": "foo"}}}, "response_format"),
    ("presence_penalty", 3, "presence_penalty"), ("seed", 1.5, "seed")])
def test_400_shapes(base, field, value, param):
    body = {"model": "k2-demo", "messages": USER, "max_tokens": 4, field: value}
    r = httpx.post(base + "/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    e = err(r)
    assert e["type"] == "invalid_request_error" and e["param"] == param, e


def test_openai_client_sees_errors(client, base):
    with pytest.raises(openai.BadRequestError) as ei:
        chat(client, n=2)
    assert ei.value.body["param"] == "n"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=USER, max_tokens=4)
    e = err(httpx.get(base + "/v1/nothing"))
    assert e["type"] == "not_found_error"
    r = httpx.post(base + "/v1/chat/completions", content=b"{not json")
    assert r.status_code == 400 and err(r)["code"] == "invalid_json"
    long = [{"role": "user", "content": "word " * 5000}]
    with pytest.raises(openai.BadRequestError) as ei:
        chat(client, long)
    assert ei.value.code == "context_length_exceeded"
    assert httpx.get(base + "/health").status_code == 200     # still serving


def test_401_413_and_loading_503(engine):
    release = threading.Event()

    def loader():
        release.wait(20)
        return engine
    with running(Server(loader=loader, served_model_name="k2-demo", api_key="sekret", max_body=4096)) as url:
        r = httpx.get(url + "/health")
        assert r.status_code == 503 and err(r)["code"] == "model_loading"
        release.set()
        deadline = time.monotonic() + 20
        while httpx.get(url + "/health").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        bad = openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.chat.completions.create(model="k2-demo", messages=USER, max_tokens=4)
        r = httpx.post(url + "/v1/chat/completions", json={"messages": USER})
        assert r.status_code == 401 and err(r)["code"] == "invalid_api_key"
        good = openai.OpenAI(base_url=url + "/v1", api_key="sekret", max_retries=0)
        assert good.chat.completions.create(model="k2-demo", messages=USER, max_tokens=4).choices
        r = httpx.post(url + "/v1/chat/completions", headers={"Authorization": "Bearer sekret"},
                       json={"messages": [{"role": "user", "content": "x" * 5000}]})
        assert r.status_code == 413 and err(r)["code"] == "request_too_large"


def test_429_when_queue_full_and_dropped_stream_frees_engine(engine):
    with running(Server(engine, served_model_name="k2-demo", max_queue=0)) as url:
        c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=30)
        long = dict(model="k2-demo", messages=USER, max_tokens=3500, temperature=1.0, seed=1)
        with c.chat.completions.create(stream=True, **long) as stream:
            it = iter(stream)
            for _ in range(3):
                next(it)
            with pytest.raises(openai.RateLimitError) as ei:     # one running, no room to wait
                c.chat.completions.create(model="k2-demo", messages=USER, max_tokens=4)
            assert ei.value.status_code == 429 and ei.value.code == "queue_full"
        # the client dropped the stream: the engine is free within a decode step, not after 3500 tokens
        t0 = time.monotonic()
        deadline = t0 + 5
        while True:
            try:
                r = c.chat.completions.create(model="k2-demo", messages=USER, max_tokens=4)
                break
            except openai.RateLimitError:    # the disconnect is seen within ~50 ms
                assert time.monotonic() < deadline
                time.sleep(0.02)
        assert r.choices[0].message.content is not None and time.monotonic() - t0 < 1.5
        assert engine.stats.generated_tokens <= 4


def test_grammar_mask_bans_exactly_what_the_matcher_refuses(engine):
    import torch
    from hybrid_k2.server.grammar import GrammarMask, json_grammar
    vocab = engine.cfg.vocab_size
    gm = GrammarMask(engine, json_grammar({"type": "object", "properties": {"a": {"type": "integer"}},
                                           "required": ["a"], "additionalProperties": False}))
    prefix = engine.tokenizer.encode('{"a":')
    for n in (0, len(prefix)):
        out = gm(prefix[:n], torch.zeros(vocab))
        probe = gm.matcher.deep_copy()
        allowed = {t for t in range(vocab) if probe.validate_tokens([t]) == 1}
        assert 0 < len(allowed) < vocab
        assert set(torch.nonzero(out == 0).flatten().tolist()) == allowed
        assert int(torch.isneginf(out).sum()) == vocab - len(allowed)


class FaultyEngine:
    """The real engine with a fault injected inside its decode loop (at the 3rd token) for the next request:
    the exception rises from within Engine.generate, as a kernel or backend failure would."""

    def __init__(self, engine):
        self.engine, self.fail_next = engine, False

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def generate_events(self, prompt, **kw):
        if self.fail_next:
            self.fail_next = False

            def boom(generated, logits):
                if len(generated) >= 3:
                    raise RuntimeError("injected fault in the decode loop")
                return logits
            kw["logits_processor"] = boom
        return self.engine.generate_events(prompt, **kw)


class CallingEngine:
    """The real engine, made to open a tool-call section at its 2nd token (the demo model seldom does on its
    own). Everything after that token is the model's, under the server's lazy tool grammar."""

    def __init__(self, engine):
        self.engine = engine

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def generate_events(self, prompt, **kw):
        inner = kw.get("logits_processor")
        begin = self.engine.tokenizer.special_tokens["<|tool_calls_section_begin|>"]

        def call_now(generated, logits):
            logits = inner(generated, logits) if inner is not None else logits
            if len(generated) == 1:
                logits = torch.full_like(logits, float("-inf"))
                logits[begin] = 0.0
            return logits
        kw["logits_processor"] = call_now
        return self.engine.generate_events(prompt, **kw)


def test_auto_tool_calls_are_constrained_and_stream_fragments(engine):
    with running(Server(CallingEngine(engine), served_model_name="k2-demo", stream_interval=0)) as url:
        c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=30)
        history = USER + [
            {"role": "assistant", "content": "", "tool_calls": [{"id": "functions.get_time:0", "type": "function",
                                                                  "function": {"name": "get_time",
                                                                               "arguments": '{"tz":"CET"}'}}]},
            {"role": "tool", "tool_call_id": "functions.get_time:0", "content": "12:00"},
            {"role": "user", "content": "And the weather?"}]
        # a first request prefills the history; the ones compared below all reuse it (a prefilled and a reused
        # prompt can differ in the last bits of the logits, which can flip a temperature-1 sample)
        chat(c, history, tools=[WEATHER, TIME], max_tokens=1)
        for seed in (1, 2, 3):
            kw = dict(tools=[WEATHER, TIME], temperature=1.0, seed=seed, max_tokens=200)   # tool_choice auto
            r = chat(c, history, **kw)
            msg = r.choices[0].message
            assert r.choices[0].finish_reason == "tool_calls" and msg.tool_calls, msg
            for i, call in enumerate(msg.tool_calls):    # schema-valid by construction, ids counted on
                tool = WEATHER if call.function.name == "get_weather" else TIME
                check_call(call, 1 + i, tool)
            chunks = list(chat(c, history, stream=True, **kw))
            deltas = [d for ch in chunks if ch.choices for d in (ch.choices[0].delta.tool_calls or [])]
            heads = [d for d in deltas if d.id is not None]
            assert [(h.index, h.id, h.function.name) for h in heads] == \
                [(i, t.id, t.function.name) for i, t in enumerate(msg.tool_calls)]
            for i, call in enumerate(msg.tool_calls):
                frags = [d.function.arguments for d in deltas if d.index == i and d.id is None]
                assert len(frags) > 1 and "".join(frags) == call.function.arguments
            text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
            assert text == (msg.content or "") and chunks[-1].choices[0].finish_reason == "tool_calls"


def test_engine_failure_is_a_500_and_the_server_goes_on(engine):
    faulty = FaultyEngine(engine)
    with running(Server(faulty, served_model_name="k2-demo")) as url:
        c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=30)
        want = chat(c, temperature=0, max_tokens=10).choices[0].message.content
        faulty.fail_next = True
        r = httpx.post(url + "/v1/chat/completions", json={"messages": USER, "max_tokens": 10, "temperature": 0})
        assert r.status_code == 500, r.text
        e = err(r)
        assert e["type"] == "server_error" and "RuntimeError" in e["message"]
        faulty.fail_next = True     # mid-stream: an error event, then [DONE]; the stream is not left hanging
        with httpx.stream("POST", url + "/v1/chat/completions", timeout=30,
                          json={"messages": USER, "max_tokens": 10, "temperature": 0, "stream": True}) as s:
            events = [line[6:] for line in s.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["type"] == "server_error"
        # the engine is free and its cached prefix sound: the same request gives the same answer
        assert chat(c, temperature=0, max_tokens=10).choices[0].message.content == want
        assert httpx.get(url + "/health").status_code == 200
        assert 'path="/v1/chat/completions",status="500"} 1' in httpx.get(url + "/metrics").text


# ---- the chat layer the REPL and the server share ---------------------------------------------------------------

CALL = ("<|tool_calls_section_begin|><|tool_call_begin|>functions.get_time:0<|tool_call_argument_begin|>"
        '{"tz": "UTC"}<|tool_call_end|><|tool_calls_section_end|>')


def pieces(text, n):
    return [text[i:i + n] for i in range(0, len(text), n)]


@pytest.mark.parametrize("n", [1, 3, 1000])
def test_reply_splitter_streams_like_the_whole(n):
    text = "<think>plan it</think>\nSure." + CALL
    sp = ReplySplitter(first_index=2)
    out = [d for p in pieces(text, n) for d in sp.push(p)]
    more, calls = sp.finish()
    joined = {k: "".join(t for kk, t in out + more if kk == k) for k in ("reasoning", "content")}
    assert joined == {"reasoning": "plan it", "content": "Sure."}
    assert [c["id"] for c in calls] == ["functions.get_time:2"] and calls[0]["function"]["arguments"] == '{"tz": "UTC"}'
    assert split_reply(text, [{"role": "assistant", "tool_calls": [{}, {}]}]) == ("plan it", "Sure.", calls)


def stream_split(text, n, first_index=0):
    sp = ReplySplitter(first_index, stream_tools=True)
    out = [d for p in pieces(text, n) for d in sp.push(p)]
    more, calls = sp.finish()
    return out + more, calls


def args_of(items, i):
    return "".join(v[1] for k, v in items if k == "tool_args" and v[0] == i)


TWO = ("<|tool_calls_section_begin|> <|tool_call_begin|> functions.get_time:0 <|tool_call_argument_begin|>"
       ' {"tz": "UTC",  "x": 1} \n<|tool_call_end|>\n<|tool_call_begin|>functions.get_weather:1'
       '<|tool_call_argument_begin|>{"city": "Oslo"}<|tool_call_end|><|tool_calls_section_end|>')


@pytest.mark.parametrize("n", [1, 2, 5, 1000])
def test_reply_splitter_streams_tool_arguments(n):
    text = "<think>hm</think>\nOk." + TWO
    _, want_content, want = split_reply(text, [{"role": "assistant", "tool_calls": [{}]}])
    items, calls = stream_split(text, n, first_index=1)
    assert calls == want and [c["id"] for c in calls] == ["functions.get_time:1", "functions.get_weather:2"]
    assert "".join(v for k, v in items if k == "content") == want_content == "Ok."
    kinds = [(k, v if k == "tool_call" else v[0]) for k, v in items if k.startswith("tool")]
    first_args = kinds.index(("tool_args", 0))
    assert kinds.index(("tool_call", 0)) < first_args < kinds.index(("tool_call", 1)) < kinds.index(("tool_args", 1))
    for i, c in enumerate(want):    # the fragments make up exactly the arguments the whole text parses to
        assert args_of(items, i) == c["function"]["arguments"]
    if n < 5:    # small pieces: the arguments go out as they come, not once the call is complete
        assert sum(1 for k, v in items if k == "tool_args" and v[0] == 0) > 3


def test_reply_splitter_streamed_tools_cut_or_broken():
    cut = "Hi" + CALL[:-len('"}<|tool_call_end|><|tool_calls_section_end|>')]
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        items, calls = stream_split(cut, 3)
    assert any(issubclass(x.category, ToolCallWarning) for x in w)
    assert calls[0]["function"]["arguments"] == args_of(items, 0) == '{"tz": "UTC'   # sent as far as it got
    # broken before any call went out: all of it is text, as without stream_tools
    broken = "Hi<|tool_calls_section_begin|>oops" + CALL
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        items, calls = stream_split(broken, 4)
    assert calls == [] and "".join(v for k, v in items if k == "content") == broken
    assert any(issubclass(x.category, ToolCallWarning) for x in w)
    # broken after a call went out: the call stands, the rest is text
    after = CALL.replace("<|tool_calls_section_end|>", "junk<|tool_calls_section_end|>")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        items, calls = stream_split(after, 2)
    assert [c["function"]["arguments"] for c in calls] == ['{"tz": "UTC"}']
    assert "".join(v for k, v in items if k == "content") == "junk<|tool_calls_section_end|>"


def test_reply_splitter_malformed_markup_is_text():
    broken = "Hi" + CALL[:60]
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert split_reply(broken) == ("", broken, [])
    assert any(issubclass(x.category, ToolCallWarning) for x in w)
    assert split_reply("no tools < here <thin") == ("", "no tools < here <thin", [])
