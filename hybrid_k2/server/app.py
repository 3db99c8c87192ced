"""The OpenAI-compatible HTTP app (Starlette, served by uvicorn) in front of one Engine.

Requests queue FIFO for a single worker thread that owns the engine (one sequence at a time); the queue is
bounded (429 when full). A client that goes away sets its job's cancel flag, which Engine.generate checks
before every decode step, so the next request starts within one step."""
from __future__ import annotations

import asyncio
import collections
import contextlib
import hmac
import json
import logging
import queue
import threading
import time
import uuid

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from .. import __version__
from ..chat import THINK_END, ReplySplitter, count_tool_calls, encode_chat, opens_reasoning
from ..generate import ContextOverflowError, Generation, SamplingParams
from .schemas import ApiError, GenRequest, bad, parse_chat, parse_completion

log = logging.getLogger("hybrid_k2.server")
MAX_BODY = 32 * 2**20          # bytes of request JSON (a full 256k-token context is a few MiB of text)
_STARTED, _DONE = object(), object()


class Job:
    """A request's events, from the engine's thread to its handler. The handler takes everything pending at
    once (one SSE write), at most once per `interval` s while text flows; the end (the Generation, an error,
    _DONE) goes at once. The engine's thread wakes the event loop only when the handler sleeps waiting for
    what it just put, not once per token."""

    def __init__(self, req: GenRequest, loop: asyncio.AbstractEventLoop, interval: float = 0.0):
        self.req, self.loop, self.interval = req, loop, interval
        self.send_at = 0.0          # loop.time() before which pieces gather (the first goes at once)
        self.items: collections.deque = collections.deque()
        self.final = False          # the end is among the items
        self.wake_on = None         # what the sleeping handler waits for: "any" item, or the "final" one
        self.ready = asyncio.Event()
        self.stream_tools = False   # set by the engine's thread before _STARTED (see Server._processor)
        self.check_at = loop.time() + 0.05
        self.cancelled = threading.Event()

    def put(self, item) -> None:   # from the worker thread
        final = not isinstance(item, str) and item is not _STARTED
        self.items.append(item)
        if final:
            self.final = True
        wake = self.wake_on        # read after the append: the handler sets it before its last look (GIL order)
        if wake == "any" or (final and wake == "final"):
            try:
                self.loop.call_soon_threadsafe(self.ready.set)
            except RuntimeError:   # the event loop has closed (server shutting down): nobody is waiting
                self.cancelled.set()

    async def take(self, request: Request, paced: bool = True) -> list | None:
        """All pending events (at least one); None when the client has gone away (the job is then cancelled)."""
        while True:
            now = self.loop.time()
            if now >= self.check_at:    # a client gone mid-generation is seen within 50 ms, events or not
                self.check_at = now + 0.05
                if await request.is_disconnected():
                    self.cancelled.set()
                    return None
            if self.items and (not paced or self.final or now >= self.send_at):
                if paced:
                    self.send_at = now + self.interval
                items = self.items
                return [items.popleft() for _ in range(len(items))]
            if self.items:     # pacing: the engine's thread keeps adding without waking the loop, until the end
                self.wake_on, until = "final", min(self.send_at, self.check_at)
                asleep = not self.final
            else:
                self.wake_on, until = "any", self.check_at
                asleep = not self.items
            if asleep:
                timer = self.loop.call_at(until, self.ready.set)
                await self.ready.wait()
                timer.cancel()
                self.ready.clear()
            self.wake_on = None


class Metrics:
    PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics", "/tokenize",
             "/detokenize")

    def __init__(self):
        self.lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = {}   # by route: any other path counts as "other" (bounded)
        self.prompt_tokens = self.cached_tokens = self.completion_tokens = 0
        self.prefill_tok_s = self.decode_tok_s = 0.0

    def count(self, path: str, status: int) -> None:
        path = path if path in self.PATHS else "other"
        with self.lock:
            self.requests[(path, status)] = self.requests.get((path, status), 0) + 1

    def generation(self, g: Generation) -> None:
        s = g.stats
        with self.lock:
            self.prompt_tokens += s.prompt_tokens + s.reused_tokens
            self.cached_tokens += s.reused_tokens
            self.completion_tokens += s.generated_tokens
            if s.prefill_s:
                self.prefill_tok_s = s.prefill_tok_s
            if s.decode_s and s.generated_tokens > 1:
                self.decode_tok_s = s.decode_tok_s


class Server:
    def __init__(self, engine=None, *, loader=None, served_model_name: str = "hybrid-k2", api_key: str | None = None,
                 max_queue: int = 64, max_body: int = MAX_BODY, stream_interval: float = 0.02):
        if engine is None and loader is None:
            raise ValueError("Server needs an engine or a loader")
        if isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 0:
            raise ValueError(f"max_queue must be an int >= 0, got {max_queue!r}")
        self.engine, self.loader = engine, loader
        self.load_error: str | None = None
        self.name, self.api_key, self.max_queue = served_model_name, api_key, max_queue
        self.metrics = Metrics()
        self.max_body = max_body
        # A stream writes at most once per stream_interval s (the first piece and the end at once): pieces
        # generated meanwhile go out as one SSE write: a slow model's tokens still go out one by one, a fast
        # model's spare the engine's thread an event-loop wakeup (and the GIL it takes) per token.
        if not (isinstance(stream_interval, (int, float)) and 0 <= stream_interval <= 1):
            raise ValueError(f"stream_interval must be seconds in [0, 1], got {stream_interval!r}")
        self.stream_interval = float(stream_interval)
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.waiting = 0               # jobs queued, not yet started
        self.running = 0
        self.count_lock = threading.Lock()
        self.created = int(time.time())
        self.worker = threading.Thread(target=self._work, name="hybrid-k2-engine", daemon=True)
        self.app = self._build_app()

    # ---- lifecycle ---------------------------------------------------------------------------------
    def _start(self):
        self.worker.start()
        if self.engine is None:
            threading.Thread(target=self._load, name="hybrid-k2-load", daemon=True).start()

    def _load(self):
        try:
            self.engine = self.loader()
        except Exception as e:   # noqa: BLE001  (/health reports it; the process stays up to say so)
            log.error("loading the model failed: %s", e)
            self.load_error = str(e) or type(e).__name__

    def _stop(self):
        self.jobs.put(None)

    # ---- the engine's thread -----------------------------------------------------------------------
    def _work(self):
        while True:
            job = self.jobs.get()
            if job is None:
                return
            with self.count_lock:
                self.waiting -= 1
                self.running += 1
            try:
                if not job.cancelled.is_set():
                    self._run(job)
            finally:
                with self.count_lock:
                    self.running -= 1
                job.put(_DONE)

    def _run(self, job: Job):
        req, engine = job.req, self.engine
        try:
            kw = dict(req.kwargs, cancel=job.cancelled.is_set, logprobs=req.logprobs)
            proc = self._processor(job)
            if proc is not None:
                kw["logits_processor"] = proc
            it = engine.generate_events(req.prompt, **kw)   # argument errors raise here
            job.put(_STARTED)
            for ev in it:
                job.put(ev)
                if isinstance(ev, Generation):
                    self.metrics.generation(ev)
        except Exception as e:   # noqa: BLE001  (delivered to the request's handler, which shapes the error)
            job.put(e)

    def _processor(self, job: Job):
        """The request's logits processor, and whether its tool-call arguments can stream as they come
        (job.stream_tools: only where a grammar enforces the section, since a sent fragment cannot be taken
        back; an unconstrained section is held until it has parsed, so malformed markup can become text)."""
        from .grammar import GrammarError, GrammarMask, LazyToolMask, json_grammar, tool_call_grammar
        req = job.req
        if req.grammar == "json":
            return GrammarMask(self.engine, json_grammar(req.schema))
        if req.grammar == "tool":
            job.stream_tools = True
            return GrammarMask(self.engine, tool_call_grammar(req.forced_functions, count_tool_calls(req.messages)))
        if req.tools and req.tool_choice == "auto" and req.messages:
            functions = [(t["function"]["name"], t["function"].get("parameters") or {"type": "object"})
                         for t in req.tools]
            try:
                mask = LazyToolMask(self.engine, functions, count_tool_calls(req.messages))
            except (GrammarError, ValueError) as e:   # auto worked without a grammar: keep it so, sections held
                log.warning("tool_choice auto runs unconstrained: %s", e)
                return None
            job.stream_tools = True
            return mask
        if req.tool_choice == "none" and req.messages:
            banned = self.engine.tokenizer.special_tokens["<|tool_calls_section_begin|>"]

            def no_tools(_, logits):
                logits[banned] = float("-inf")
                return logits
            return no_tools
        return None

    # ---- HTTP ----------------------------------------------------------------------------------------
    def _build_app(self) -> Starlette:
        routes = [Route("/v1/chat/completions", self.chat, methods=["POST"]),
                  Route("/v1/completions", self.completions, methods=["POST"]),
                  Route("/v1/models", self.models, methods=["GET"]),
                  Route("/health", self.health, methods=["GET"]),
                  Route("/metrics", self.metrics_text, methods=["GET"]),
                  Route("/tokenize", self.tokenize, methods=["POST"]),
                  Route("/detokenize", self.detokenize, methods=["POST"])]

        async def http_error(request, exc: HTTPException):
            return self._error(ApiError(exc.status_code, exc.detail or "error"), request)

        async def server_error(request, exc: Exception):
            log.exception("unhandled error on %s", request.url.path)
            return self._error(ApiError(500, f"internal error ({type(exc).__name__})"), request)

        @contextlib.asynccontextmanager
        async def lifespan(app):
            self._start()
            yield
            self._stop()

        return Starlette(routes=routes, exception_handlers={HTTPException: http_error, Exception: server_error},
                         lifespan=lifespan)

    def _error(self, e: ApiError, request: Request | None = None) -> JSONResponse:
        if request is not None:
            self.metrics.count(request.url.path, e.status)
        return JSONResponse(e.body(), status_code=e.status)

    def _ok(self, request: Request, body, status: int = 200) -> JSONResponse:
        self.metrics.count(request.url.path, status)
        return JSONResponse(body, status_code=status)

    async def _body(self, request: Request, *, auth: bool = True) -> dict:
        if auth and self.api_key is not None:
            header = request.headers.get("authorization", "")
            if not hmac.compare_digest(header.encode(), f"Bearer {self.api_key}".encode()):
                raise ApiError(401, "invalid or missing API key (send Authorization: Bearer KEY)",
                               code="invalid_api_key")
        if self.engine is None:
            raise ApiError(503, f"the model failed to load: {self.load_error}" if self.load_error
                           else "the model is still loading", code="model_loading")
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            raise ApiError(413, f"request body over {self.max_body} bytes", code="request_too_large")
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > self.max_body:
                raise ApiError(413, f"request body over {self.max_body} bytes", code="request_too_large")
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not JSON ({e})", code="invalid_json") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
        model = body.get("model")
        if model is not None and model != self.name:
            raise ApiError(404, f"model {model!r} does not exist; this server serves {self.name!r}", "model",
                           "model_not_found")
        return body

    def _check(self, req: GenRequest) -> None:
        """What Engine.generate would refuse, found before the request queues (400 at once)."""
        k = req.kwargs
        for name in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
                     "frequency_penalty"):
            try:
                SamplingParams(**{name: k[name]}).validate()
            except (TypeError, ValueError) as e:
                raise bad(name, str(e)) from None
        engine = self.engine
        if isinstance(req.prompt, list):
            bad_ids = [t for t in req.prompt if not 0 <= t < engine.cfg.vocab_size]
            if bad_ids:
                raise bad("prompt", f"token id {bad_ids[0]} is outside the vocabulary [0, {engine.cfg.vocab_size})")
            n = len(req.prompt)
        else:
            req.prompt = engine.tokenizer.encode(req.prompt)
            n = len(req.prompt)
        if n == 0:
            raise bad("prompt", "is empty")
        if n >= engine.ctx:
            raise ApiError(400, f"the prompt has {n} tokens but the context window is {engine.ctx}", "messages",
                           "context_length_exceeded")
        if k["max_new_tokens"] is None:      # OpenAI's default: up to the end of the context window
            k["max_new_tokens"] = engine.ctx - n

    async def _submit(self, request: Request, req: GenRequest) -> Job:
        self._check(req)
        job = Job(req, asyncio.get_running_loop(), self.stream_interval)
        with self.count_lock:
            if self.waiting + self.running > self.max_queue:   # one on the engine, max_queue waiting
                raise ApiError(429, f"the server is busy ({self.waiting} requests waiting); retry later",
                               code="queue_full")
            self.waiting += 1
        self.jobs.put(job)
        while True:       # up to _STARTED: argument errors are a plain error response, not a broken stream
            first = await job.take(request, paced=False)
            if first is None:
                job.items.append(_DONE)
                return job
            if isinstance(first[0], Exception):
                raise _shape(first[0])
            if first[0] is _STARTED or first[0] is _DONE:   # cancelled before it started: the end stays there
                job.items.extendleft(reversed(first[first[0] is _STARTED:]))
                return job

    async def _batches(self, job: Job, request: Request):
        """The job's events a batch at a time (the text pieces in a batch joined) up to its end; stops early
        when the client has gone away."""
        while True:
            evs = await job.take(request)
            if evs is None:
                return
            out, text = [], []
            for ev in evs:
                if isinstance(ev, str):
                    text.append(ev)
                    continue
                if text:
                    out.append("".join(text))
                    text = []
                if ev is _DONE:
                    yield out
                    return
                out.append(ev)
            if text:
                out.append("".join(text))
            yield out

    # ---- endpoints -----------------------------------------------------------------------------------
    async def chat(self, request: Request) -> Response:
        try:
            body = await self._body(request)
            req = parse_chat(body, None)
            if self.engine.tokenizer is None:
                raise ApiError(400, "this checkpoint has no tokenizer (tiktoken.model); use /v1/completions "
                               "with token ids")
            try:
                req.prompt = encode_chat(self.engine.tokenizer, req.messages,
                                         req.tools if req.tool_choice != "none" else None, req.template_kwargs)
            except ValueError as e:   # the template's errors (raise_exception, ...) name its source file
                raise bad("messages", str(e)) from None
            req.opened = opens_reasoning(self.engine.tokenizer, req.prompt)
            if req.opened and req.grammar is not None:
                # the grammar shapes the answer from its first token (a forced tool call, JSON): close the prompt's
                # open <think>, as a thinking template's non-thinking mode does, so the answer is not reasoning
                req.prompt = req.prompt + self.engine.tokenizer.encode(THINK_END, allow_special=True)
                req.opened = False
            job = await self._submit(request, req)
        except ApiError as e:
            return self._error(e, request)
        rid = "chatcmpl-" + uuid.uuid4().hex[:24]
        if req.stream:
            return self._sse_response(request, self._chat_stream(request, job, rid))
        gen = await self._result(request, job)
        if isinstance(gen, Response):
            return gen
        splitter = ReplySplitter(count_tool_calls(req.messages), collect_warnings=True, opened=req.opened)
        parts = {"reasoning": [], "content": []}
        deltas = splitter.push(gen.text)
        more, calls = splitter.finish()
        _log_warnings(splitter)
        for kind, t in deltas + more:
            parts[kind].append(t)
        msg = {"role": "assistant", "content": "".join(parts["content"]) or (None if calls else "")}
        if parts["reasoning"]:
            msg["reasoning_content"] = "".join(parts["reasoning"])
        if calls:
            msg["tool_calls"] = calls
        choice = {"index": 0, "message": msg, "logprobs": None,
                  "finish_reason": "tool_calls" if calls else gen.finish_reason}
        if gen.logprobs is not None:
            choice["logprobs"] = {"content": [self._lp_entry(t, lp, alts) for t, lp, alts in gen.logprobs]}
        return self._ok(request, {"id": rid, "object": "chat.completion", "created": int(time.time()),
                                  "model": self.name, "system_fingerprint": f"hybrid_k2-{__version__}",
                                  "choices": [choice], "usage": _usage(gen)})

    async def _result(self, request: Request, job: Job):
        """The Generation of a non-streaming job (or an error response)."""
        gen, done = None, False
        async for batch in self._batches(job, request):
            for ev in batch:
                if isinstance(ev, Exception):
                    return self._error(_shape(ev), request)
                if isinstance(ev, Generation):
                    gen = ev
            done = gen is not None
        if not done and job.cancelled.is_set():
            return Response(status_code=499)          # the client is gone; nobody reads this
        if gen is None:
            return self._error(ApiError(500, "the generation ended without a result"), request)
        return gen

    def _lp_entry(self, token: int, lp: float, alts) -> dict:
        tok = self.engine.tokenizer

        def one(t, v):
            b = tok.token_bytes(t)
            return {"token": b.decode("utf-8", errors="replace"), "logprob": v, "bytes": list(b)}
        return dict(one(token, lp), top_logprobs=[one(t, v) for t, v in alts])

    def _sse_response(self, request: Request, events) -> StreamingResponse:
        self.metrics.count(request.url.path, 200)
        return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def _sse(self, request: Request, job: Job, render, done: list):
        """A job's text pieces as SSE, one write per batch (`render`: piece -> SSE text); the final Generation
        goes into `done`; an engine error becomes an error event and ends the pieces."""
        async for batch in self._batches(job, request):
            sse = ""
            for ev in batch:
                if isinstance(ev, Exception):
                    sse += f"data: {json.dumps(_shape(ev).body())}\n\n"
                    break
                if isinstance(ev, Generation):
                    done.append(ev)
                else:
                    sse += render(ev)
            if sse:
                yield sse

    async def _chat_stream(self, request: Request, job: Job, rid: str):
        req = job.req
        created = int(time.time())

        head, tail = _chunk_template(rid, "chat.completion.chunk", created, self.name, req.include_usage)

        def chunk(delta: dict, finish=None) -> str:
            return f'{head}{_dumps(delta)},"logprobs":null,"finish_reason":{_dumps(finish)}{tail}'

        # Argument fragments stream as they are generated only where a grammar enforces the markup (required,
        # named, and auto's lazy grammar, see Server._processor): a fragment cannot be taken back.
        splitter = ReplySplitter(count_tool_calls(req.messages), stream_tools=job.stream_tools, collect_warnings=True,
                                 opened=req.opened)
        key = {"content": "content", "reasoning": "reasoning_content"}

        def deltas(items) -> str:
            out = []
            for kind, v in items:
                if kind == "tool_call":   # id and name once, then the argument fragments
                    c = splitter.calls[v]
                    out.append(chunk({"tool_calls": [{"index": v, "id": c["id"], "type": "function", "function": {
                        "name": c["function"]["name"], "arguments": ""}}]}))
                elif kind == "tool_args":
                    out.append(chunk({"tool_calls": [{"index": v[0], "function": {"arguments": v[1]}}]}))
                else:
                    out.append(f'{head}{{"{key[kind]}":{_dumps(v)}}},"logprobs":null,"finish_reason":null{tail}')
            return "".join(out)
        def render(piece: str) -> str:
            items = splitter.push(piece)
            _log_warnings(splitter)
            return deltas(items)
        try:
            yield chunk({"role": "assistant", "content": ""})
            done: list[Generation] = []
            async for sse in self._sse(request, job, render, done):
                yield sse
            gen = done[0] if done else None
            if job.cancelled.is_set() and gen is None:
                return
            if gen is not None:
                last, calls = splitter.finish()
                _log_warnings(splitter)
                if not splitter.stream_tools:    # a held section: its calls come whole, once it has parsed
                    last += [x for i, c in enumerate(calls)
                             for x in (("tool_call", i), ("tool_args", (i, c["function"]["arguments"])))]
                    splitter.calls = calls
                yield deltas(last)
                cut = splitter.stream_tools and splitter.state == "tools"   # a streamed call cut short: "length"
                yield chunk({}, "tool_calls" if calls and not cut else gen.finish_reason)
                if req.include_usage:
                    yield f"data: {json.dumps(_usage_chunk(rid, created, self.name, gen))}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            job.cancelled.set()      # a no-op once the job is done; stops it if the client left mid-way

    async def completions(self, request: Request) -> Response:
        try:
            body = await self._body(request)
            req = parse_completion(body, None)
            if isinstance(req.prompt, str) and self.engine.tokenizer is None:
                raise bad("prompt", "this checkpoint has no tokenizer; send token ids")
            job = await self._submit(request, req)
        except ApiError as e:
            return self._error(e, request)
        rid = "cmpl-" + uuid.uuid4().hex[:24]
        if req.stream:
            return self._sse_response(request, self._completion_stream(request, job, rid))
        gen = await self._result(request, job)
        if isinstance(gen, Response):
            return gen
        choice = {"index": 0, "text": gen.text if gen.text is not None else "", "logprobs": None,
                  "finish_reason": gen.finish_reason}
        if self.engine.tokenizer is None:
            choice["token_ids"] = gen.token_ids
        if gen.logprobs is not None:
            tok = self.engine.tokenizer
            name = (lambda t: tok.token_bytes(t).decode("utf-8", errors="replace")) if tok else str
            tokens = [name(t) for t, _, _ in gen.logprobs]
            offsets, pos = [], 0
            for t in tokens:
                offsets.append(pos)
                pos += len(t)
            choice["logprobs"] = {"tokens": tokens, "token_logprobs": [lp for _, lp, _ in gen.logprobs],
                                  "top_logprobs": [{name(t): v for t, v in alts} for _, _, alts in gen.logprobs],
                                  "text_offset": offsets}
        return self._ok(request, {"id": rid, "object": "text_completion", "created": int(time.time()),
                                  "model": self.name, "system_fingerprint": f"hybrid_k2-{__version__}",
                                  "choices": [choice], "usage": _usage(gen)})

    async def _completion_stream(self, request: Request, job: Job, rid: str):
        created = int(time.time())

        head, tail = _chunk_template(rid, "text_completion", created, self.name, job.req.include_usage, "text")

        def chunk(text: str, finish=None) -> str:
            return f'{head}{_dumps(text)},"logprobs":null,"finish_reason":{_dumps(finish)}{tail}'
        try:
            done: list[Generation] = []
            async for sse in self._sse(request, job, chunk, done):
                yield sse
            gen = done[0] if done else None
            if gen is not None:
                yield chunk("", gen.finish_reason)
                if job.req.include_usage:
                    u = _usage_chunk(rid, created, self.name, gen)
                    u["object"] = "text_completion"
                    yield f"data: {json.dumps(u)}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            job.cancelled.set()

    async def models(self, request: Request) -> Response:
        try:
            await self._check_auth_only(request)
        except ApiError as e:
            return self._error(e, request)
        card = {"id": self.name, "object": "model", "created": self.created, "owned_by": "hybrid_k2"}
        if self.engine is not None:
            card["max_model_len"] = self.engine.ctx
        return self._ok(request, {"object": "list", "data": [card]})

    async def _check_auth_only(self, request: Request) -> None:
        if self.api_key is not None:
            header = request.headers.get("authorization", "")
            if not hmac.compare_digest(header.encode(), f"Bearer {self.api_key}".encode()):
                raise ApiError(401, "invalid or missing API key (send Authorization: Bearer KEY)",
                               code="invalid_api_key")

    async def health(self, request: Request) -> Response:
        if self.engine is None:
            msg = f"the model failed to load: {self.load_error}" if self.load_error else "the model is still loading"
            return self._error(ApiError(503, msg, code="model_loading"), request)
        return self._ok(request, {"status": "ok", "model": self.name})

    async def metrics_text(self, request: Request) -> Response:
        try:
            await self._check_auth_only(request)
        except ApiError as e:
            return self._error(e, request)
        m = self.metrics
        lines = ["# HELP hybrid_k2_requests_total HTTP requests by path and status.",
                 "# TYPE hybrid_k2_requests_total counter"]
        with m.lock:
            for (path, status), n in sorted(m.requests.items()):
                lines.append(f'hybrid_k2_requests_total{{path="{path}",status="{status}"}} {n}')
            scalars = [("prompt_tokens_total", "counter", "Prompt tokens (cached included).", m.prompt_tokens),
                       ("cached_prompt_tokens_total", "counter", "Prompt tokens whose KV was reused.",
                        m.cached_tokens),
                       ("completion_tokens_total", "counter", "Generated tokens.", m.completion_tokens),
                       ("prefill_tokens_per_second", "gauge", "Prefill speed of the last request.", m.prefill_tok_s),
                       ("decode_tokens_per_second", "gauge", "Decode speed of the last request.", m.decode_tok_s)]
        with self.count_lock:
            scalars += [("queue_depth", "gauge", "Requests waiting for the engine.", self.waiting),
                        ("requests_running", "gauge", "Requests on the engine (0 or 1).", self.running)]
        experts = getattr(self.engine, "experts", None)
        st = experts.stats() if hasattr(experts, "stats") else {}
        if "hit_rate" in st:
            scalars.append(("expert_cache_hit_rate", "gauge", "Hybrid expert-cache hit rate.", st["hit_rate"]))
        for name, kind, help_, v in scalars:
            lines += [f"# HELP hybrid_k2_{name} {help_}", f"# TYPE hybrid_k2_{name} {kind}", f"hybrid_k2_{name} {v}"]
        self.metrics.count(request.url.path, 200)
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    async def tokenize(self, request: Request) -> Response:
        try:
            body = await self._body(request)
            tok = self._tokenizer()
            if "messages" in body:
                from .schemas import parse_messages, parse_template_kwargs, parse_tools
                tools, _ = parse_tools(body)
                ids = encode_chat(tok, parse_messages(body["messages"]), tools, parse_template_kwargs(body))
            elif isinstance(body.get("prompt"), str):
                ids = tok.encode(body["prompt"])
            else:
                raise bad("prompt", "send a string prompt or chat messages", "invalid_type")
        except ApiError as e:
            return self._error(e, request)
        except ValueError as e:
            return self._error(bad("messages", str(e)), request)
        return self._ok(request, {"tokens": ids, "count": len(ids), "max_model_len": self.engine.ctx})

    async def detokenize(self, request: Request) -> Response:
        try:
            body = await self._body(request)
            tok = self._tokenizer()
            ids = body.get("tokens")
            if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
                raise bad("tokens", "must be a list of token ids", "invalid_type")
            bad_ids = [t for t in ids if not 0 <= t < tok.vocab_size]
            if bad_ids:
                raise bad("tokens", f"token id {bad_ids[0]} is outside the vocabulary [0, {tok.vocab_size})")
        except ApiError as e:
            return self._error(e, request)
        return self._ok(request, {"prompt": tok.decode(ids)})

    def _tokenizer(self):
        if self.engine.tokenizer is None:
            raise ApiError(400, "this checkpoint has no tokenizer (tiktoken.model)")
        return self.engine.tokenizer


def _shape(e: Exception) -> ApiError:
    """An exception from the engine's thread as the error a client gets."""
    from .grammar import GrammarError
    if isinstance(e, ApiError):
        return e
    if isinstance(e, ContextOverflowError):
        return ApiError(400, str(e), "messages", "context_length_exceeded")
    if isinstance(e, GrammarError):
        return ApiError(400, str(e), "response_format", "invalid_schema")
    if isinstance(e, (TypeError, ValueError)):
        msg = str(e)
        param = msg.split(" ", 1)[0]
        return ApiError(400, msg, param if param.isidentifier() else None, "invalid_value")
    log.error("generation failed: %s: %s", type(e).__name__, e, exc_info=e)
    return ApiError(500, f"the generation failed ({type(e).__name__})")


_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def _chunk_template(rid: str, obj: str, created: int, model: str, usage: bool, field: str = "delta"):
    """The fixed text around a streamed chunk's one variable field (encoded once per stream, not per token)."""
    head = _dumps({"id": rid, "object": obj, "created": created, "model": model,
                   "system_fingerprint": f"hybrid_k2-{__version__}"})[:-1]
    return (f'data: {head},"choices":[{{"index":0,"{field}":',
            "}]" + (',"usage":null' if usage else "") + "}\n\n")


def _usage(g: Generation) -> dict:
    s = g.stats
    prompt = s.prompt_tokens + s.reused_tokens
    return {"prompt_tokens": prompt, "completion_tokens": s.generated_tokens,
            "total_tokens": prompt + s.generated_tokens,
            "prompt_tokens_details": {"cached_tokens": s.reused_tokens}}


def _usage_chunk(rid: str, created: int, model: str, g: Generation) -> dict:
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [],
            "usage": _usage(g)}


def create_app(engine=None, **kw) -> Starlette:
    """The ASGI app over an Engine (or `loader=`, a callable that returns one; /health is 503 until it has)."""
    return Server(engine, **kw).app


def _log_warnings(splitter: ReplySplitter) -> None:
    for message in splitter.warnings:
        log.warning("%s", message)
    splitter.warnings.clear()


def serve(engine=None, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info", **kw) -> None:
    import uvicorn
    server = Server(engine, **kw)
    uvicorn.run(server.app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
