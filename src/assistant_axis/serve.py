"""An OpenAI-compatible `/v1/chat/completions` server for one model, optionally capped or steered.

Chat UIs and evaluation harnesses (the `openai` client, the workflow's own `openai` judge backend)
talk to a capped model through it. Beyond OpenAI's response format each completion carries an extra
top-level field `projection`: `{"layers": [...], "values": [...], "tau": [...] | null}`, the reply's mean
projection per layer measured under the same hooks that generated it (`tau`: the capping floor per
layer, null where a layer is not capped).

Logprobs are read from the logits `generate` computed for each generated token (`output_logits`),
under the active hooks: the model's own distribution (temperature 1, before top-p), which is what
OpenAI's API reports. No second forward pass is needed, and the tokens listed are exactly the ones
generated (not a re-tokenisation of the text). `bytes` is the token text's UTF-8.

What it refuses before any work (`Limits`, the `serve` flags): a body that is not JSON or not valid
(400 naming the field), a field it does not honour (400; fields that say nothing about generation, such
as `user`, and default values such as `presence_penalty: 0` pass), another model's name (404), a prompt
over `max_prompt_tokens` or prompt + `max_tokens` over the context (400 naming the limit), and any
request beyond `max_queue` admitted at once (429 with `Retry-After`). A reply longer than
`request_timeout` seconds is cut there (`finish_reason` "length", `"timed_out": true`); a client that
goes away stops its generation; SIGTERM stops accepting, lets replies run `grace` seconds, cuts the
rest and exits.

With an API key (`--api-key`, or the environment variable `AXIS_API_KEY`), the API routes (`/v1/...` and
`/metrics`) answer 401 in OpenAI's error format unless a request sends `Authorization: Bearer <key>`
(compared in constant time; the key is never logged); `/health` stays open. `/metrics` is Prometheus'
text format (`metrics.ServerMetrics`). The session is any engine's (`engines.Session`): the transformers
engine generates one reply at a time (requests queue), the vLLM engine batches them all.

>>> run_server(session, "smollm2-135m-instruct", host="127.0.0.1", port=8000)
"""

from __future__ import annotations

import asyncio
import collections
import hmac
import json
import math
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles

from assistant_axis.chat import with_sampling
from assistant_axis.engines import Chunk, Reply, Sampling, check_context
from assistant_axis.errors import InputError
from assistant_axis.metrics import CONTENT_TYPE_LATEST, ServerMetrics

__all__ = ["create_app", "run_server", "completion_body", "parse_request", "ChatRequest", "Limits", "API_KEY_ENV"]

API_KEY_ENV = "AXIS_API_KEY"  # where `serve` reads its key when --api-key is not given
PAGE = Path(__file__).with_name("page")  # the drift page's static files, shipped in the package
GUARDED = ("/v1/", "/metrics")  # the routes an API key guards, as vLLM's server guards its API

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
HONOURED = {
    "model",
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "seed",
    "n",
    "stream",
    "logprobs",
    "top_logprobs",
    "capping",
}
NO_EFFECT = {"user", "metadata", "store", "service_tier", "stream_options"}  # nothing about what is generated


@dataclass(frozen=True)
class Limits:
    """What one server takes on; each is a `serve` flag."""

    max_queue: int = 32  # --max-queue: requests admitted at once (generating or waiting); more get 429
    request_timeout: float = 600.0  # --request-timeout: seconds a reply may take before it is cut
    max_prompt_tokens: int | None = None  # --max-prompt-tokens: None = the model's context
    grace: float = 10.0  # --shutdown-grace: seconds replies may run on after SIGTERM


class RequestError(Exception):
    """A request the server cannot answer as asked: HTTP 400 naming the field (`param`)."""

    def __init__(self, param: str, message: str):
        self.param, self.message = param, message
        super().__init__(message)


def _asks_nothing(value: Any) -> bool:
    """An unsupported field at its default (`presence_penalty: 0`, `stop: null`, `tools: []`) asks for nothing."""
    if value is None or value is False or value in ([], {}, {"type": "text"}):
        return True
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0


def _text(content: Any, where: str) -> str:
    """Message content: a string, or a list of `{"type": "text", "text": ...}` parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return "".join(str(p.get("text", "")) for p in content)
    raise RequestError(where, "content must be a string or a list of text parts")


def parse_messages(raw: Any) -> list[dict]:
    if not isinstance(raw, list) or not raw:
        raise RequestError("messages", "messages must be a non-empty list")
    messages = []
    for i, message in enumerate(raw):
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ROLES:
            raise RequestError(f"messages[{i}].role", f"role must be one of {', '.join(ROLES)}, got {role!r}")
        messages.append({"role": ROLES[role], "content": _text(message.get("content"), f"messages[{i}].content")})
    return messages


def _number(body: dict, name: str, kind: type, low: float | None = None, high: float | None = None):
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
        raise RequestError(name, f"{name} must be a{'n integer' if kind is int else ' number'}, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise RequestError(name, f"{name} must be in [{low}, {high}], got {value!r}")
    return kind(value)


@dataclass(frozen=True)
class ChatRequest:
    """A validated request: what to generate, how, how many, under which capping setting."""

    messages: list[dict]
    sampling: Sampling
    n: int
    logprobs: bool
    top_logprobs: int
    stream: bool
    setting: str | None

    def seeds(self) -> list[int]:
        """Choice i samples with seed + i: n seeded choices differ, and each is reproducible alone."""
        return [self.sampling.seed + i for i in range(self.n)]


def parse_request(session, body: Any) -> ChatRequest:
    """Validate one request body against the session (its settings and sampling defaults)."""
    if not isinstance(body, dict):
        raise RequestError("body", "the request body must be a JSON object")
    for name, value in body.items():
        if name not in HONOURED | NO_EFFECT and not _asks_nothing(value):
            raise RequestError(name, f"{name} is not supported by this server (send it unset)")
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise RequestError("stream", f"stream must be true or false, got {stream!r}")
    n = _number(body, "n", int, 1, 16) or 1
    if stream and n > 1:
        raise RequestError("n", "stream=true takes n=1; send n requests to stream n replies")
    messages = parse_messages(body.get("messages"))
    max_tokens = _number(body, "max_completion_tokens", int, 1) or _number(body, "max_tokens", int, 1)
    temperature = _number(body, "temperature", float, 0, 2)
    top_p = _number(body, "top_p", float, 0, 1)
    if top_p == 0:
        raise RequestError("top_p", "top_p must be > 0")
    seed = _number(body, "seed", int)
    want = body.get("logprobs") or False
    if not isinstance(want, bool):
        raise RequestError("logprobs", f"logprobs must be true or false, got {want!r}")
    top = _number(body, "top_logprobs", int, 0, 20)
    if top is not None and not want:
        raise RequestError("top_logprobs", "top_logprobs needs logprobs=true")
    setting = body.get("capping")
    if setting is not None and setting not in session.settings:
        raise RequestError("capping", f"unknown capping {setting!r}; this server has: {', '.join(session.settings)}")
    sampling = with_sampling(session, temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed)
    return ChatRequest(messages, sampling, n, want, top or 0, stream, setting)


def _logprobs_body(reply: Reply) -> dict:
    return {
        "content": [
            {
                "token": t.token,
                "logprob": t.logprob,
                "bytes": list(t.token.encode()),
                "top_logprobs": [{"token": s, "logprob": lp, "bytes": list(s.encode())} for s, lp in t.top],
            }
            for t in reply.logprobs or []
        ],
        "refusal": None,
    }


def projection_body(reply: Reply) -> dict:
    """The reply's telemetry: projection per layer, tau, and (vLLM engine) how often the cap fired."""
    body = {"layers": reply.layers, "values": reply.projection, "tau": reply.tau, "capping": reply.setting}
    if reply.fired is not None:
        body |= {"fired": reply.fired, "correction": reply.correction}
    return body


def _message(reply: Reply) -> dict:
    message = {"role": "assistant", "content": reply.text}
    if reply.reasoning:  # as vLLM's server returns a thinking model's think block
        message["reasoning_content"] = reply.reasoning
    return message


def _usage(replies: list[Reply]) -> dict:
    prompt, out = replies[0].prompt_tokens, sum(len(r.token_ids) for r in replies)
    return {"prompt_tokens": prompt, "completion_tokens": out, "total_tokens": prompt + out}


def completion_body(replies: Reply | list[Reply], model_name: str, want_logprobs: bool) -> dict:
    """OpenAI's chat.completion object for the replies (choices in order), plus `projection` (the first
    reply's; each choice carries its own too)."""
    replies = [replies] if isinstance(replies, Reply) else replies
    choices = [
        {
            "index": i,
            "message": _message(r),
            "finish_reason": r.finish_reason,
            "logprobs": _logprobs_body(r) if want_logprobs else None,
            "projection": projection_body(r),
        }
        for i, r in enumerate(replies)
    ]
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model_name,
        "choices": choices,
        "usage": _usage(replies),
        "projection": projection_body(replies[0]),
    }


def _chunk(cid: str, model_name: str, delta: dict, finish: str | None = None, **extra) -> str:
    body = {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model_name,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
        **extra,
    }
    return f"data: {json.dumps(body)}\n\n"


def _error(
    status: int, message: str, param: str | None, kind: str = "invalid_request_error", code: str | None = None
) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status)


class Cut:
    """Ends a request's generation early, once, for a reason: "time" (its limit), "gone" (the client left)
    or "shutdown"; engines register what stops them (`on`) or poll it (`is_set`)."""

    def __init__(self):
        self.reason: str | None = None
        self._callbacks: list = []
        self._lock = threading.Lock()

    def __call__(self, reason: str) -> None:
        with self._lock:
            if self.reason is not None:
                return
            self.reason, callbacks = reason, list(self._callbacks)
        for callback in callbacks:
            callback()

    def on(self, callback) -> None:
        with self._lock:
            if self.reason is None:
                self._callbacks.append(callback)
                return
        callback()

    def is_set(self) -> bool:
        return self.reason is not None


class _Admission:
    """How many requests are in (generating or waiting), and how long they took: `Retry-After`."""

    def __init__(self, limits: Limits):
        self.limits, self.active, self.took = limits, 0, collections.deque(maxlen=32)

    def enter(self) -> bool:
        if self.active >= self.limits.max_queue:
            return False
        self.active += 1
        return True

    def leave(self, started: float) -> None:
        self.active -= 1
        self.took.append(time.monotonic() - started)

    def retry_after(self) -> int:
        """About one request's time: by then a place has likely come free."""
        return max(1, math.ceil(sum(self.took) / len(self.took))) if self.took else 1


def check_size(session, request: ChatRequest, limits: Limits) -> int:
    """The prompt's tokens, refused (400) past `max_prompt_tokens` or, with `max_tokens`, past the context."""
    template = session.template
    n = len(template.ids(template.fit(list(request.messages)), add_generation_prompt=True))
    if limits.max_prompt_tokens is not None and n > limits.max_prompt_tokens:
        raise RequestError(
            "messages", f"the prompt has {n} tokens; this server takes at most {limits.max_prompt_tokens}"
        )
    check_context(n, request.sampling.max_tokens, session.context_length)
    return n


async def _until_gone(request: Request, cut: Cut) -> None:
    """Cut the generation when the client disconnects (a non-streaming request is not told otherwise)."""
    while not await request.is_disconnected():
        await asyncio.sleep(0.25)
    cut("gone")


class _Guard:
    """The API key check and the request count, as plain ASGI middleware (streams and client disconnects
    pass through untouched, as they would not through Starlette's `BaseHTTPMiddleware`)."""

    def __init__(self, app, api_key: str | None, metrics: ServerMetrics):
        self.app, self.metrics = app, metrics
        self.expected = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        counted = scope["path"] == "/v1/chat/completions"

        async def sending(message):
            if counted and message["type"] == "http.response.start":
                self.metrics.answered(message["status"])
            await send(message)

        if self.expected is not None and scope["path"].startswith(GUARDED):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                message = "a valid API key is needed: send the header `Authorization: Bearer <key>`"
                return await _error(401, message, None, code="invalid_api_key")(scope, receive, sending)
        await self.app(scope, receive, sending)


def create_app(
    session,
    model_name: str,
    limits: Limits | None = None,
    aliases: tuple[str, ...] = (),
    api_key: str | None = None,
) -> FastAPI:
    """The FastAPI app: `POST /v1/chat/completions`, `GET /v1/models`, `GET /metrics`, `GET /health`.
    `session` is an engine's session (`engines.Session`); `aliases` are other names a request's `model`
    may use; `api_key` guards the API routes."""
    # FastAPI reads the endpoints' annotations (strings here): `Request` must be a module global.
    limits = limits or Limits()
    app = FastAPI(title="assistant-axis", description=__doc__)
    admission = _Admission(limits)
    metrics = ServerMetrics(lambda: admission.active)
    app.add_middleware(_Guard, api_key=api_key, metrics=metrics)
    names = (model_name, *aliases)
    created = int(time.time())

    @app.get("/health")
    async def health() -> dict:  # on the event loop: answers while any generation runs
        return {"status": "ok", "active": admission.active, "max_queue": limits.max_queue}

    # The drift page: open, as /health is; it sends the key with its API calls.
    app.mount("/page", StaticFiles(directory=PAGE), name="page")

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(PAGE / "index.html")

    @app.get("/v1/axis")
    async def axis() -> dict:
        """What the page plots against: the monitored layers and, per setting, its tau per layer."""
        return {
            "model": model_name,
            "layers": list(session.layers),
            "settings": {name: {"tau": session.tau(name)} for name in session.settings},
            "default": session.default_setting,
        }

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict:
        return {
            "object": "list",
            "data": [{"id": model_name, "object": "model", "created": created, "owned_by": "assistant-axis"}],
        }

    @app.post("/v1/chat/completions")
    async def completions(request: Request):
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return _error(400, f"the request body is not JSON ({exc})", "body")
        if isinstance(body, dict) and body.get("model") is not None and body["model"] not in names:
            message = f"the model {body['model']!r} does not exist; this server serves {model_name!r}"
            return _error(404, message, "model", code="model_not_found")
        try:
            parsed = parse_request(session, body)
            check_size(session, parsed, limits)
        except RequestError as exc:
            return _error(400, exc.message, exc.param)
        except InputError as exc:
            return _error(400, str(exc), exc.field)
        if not admission.enter():
            response = _error(
                429, f"the server is busy ({limits.max_queue} requests in); retry later", None, "rate_limit_error"
            )
            response.headers["Retry-After"] = str(admission.retry_after())
            return response
        loop, cut, started = asyncio.get_running_loop(), Cut(), time.monotonic()
        timers = [loop.call_later(limits.request_timeout, cut, "time")]
        released = []

        def release() -> None:  # once, however the request ends
            if not released:
                released.append(True)
                for timer in timers:
                    timer.cancel()
                cut("gone")  # stops a generation still running; nothing once the reply is done
                admission.leave(started)

        if parsed.stream:
            try:
                top = parsed.top_logprobs if parsed.logprobs else None
                stream = session.stream(parsed.messages, parsed.sampling, top, parsed.setting, cut)
                events = _events(stream, parsed, model_name, cut, metrics, started)
            except InputError as exc:
                release()
                return _error(400, str(exc), exc.field)
            # A stream the client leaves before it starts is never iterated: release it at the latest then.
            timers.append(loop.call_later(limits.request_timeout + 60, release))
            return StreamingResponse(_released(events, release), media_type="text/event-stream")
        watcher = asyncio.ensure_future(_until_gone(request, cut))
        try:
            top = parsed.top_logprobs if parsed.logprobs else None
            replies = await session.replies(parsed.messages, parsed.sampling, parsed.seeds(), top, parsed.setting, cut)
            body = completion_body(replies, model_name, parsed.logprobs)
            metrics.usage(body["usage"])
            for reply in replies:
                metrics.reply(reply, time.monotonic() - started, len(reply.token_ids))
            if cut.reason == "time":
                body["timed_out"] = True
            return body
        except InputError as exc:
            return _error(400, str(exc), exc.field)
        finally:
            watcher.cancel()
            release()

    return app


async def _released(events, release):
    """A stream that gives its place back when it ends, however it ends."""
    try:
        async for event in events:
            yield event
    finally:
        release()


async def _events(stream, request: ChatRequest, model_name: str, cut: Cut, metrics: ServerMetrics, started: float):
    """Server-sent events in OpenAI's chunk format; chunks carry the running projection, the last one
    the usage and the reply's telemetry."""
    cid = f"chatcmpl-{uuid.uuid4().hex}"
    first = None  # when the first text went out
    yield _chunk(cid, model_name, {"role": "assistant", "content": ""})
    async for event in stream:
        if isinstance(event, Reply):
            extra = {"usage": _usage([event]), "projection": projection_body(event)}
            metrics.usage(extra["usage"])
            if first is not None:
                metrics.reply(event, time.monotonic() - first, len(event.token_ids) - 1)
            if request.logprobs:
                extra["logprobs"] = _logprobs_body(event)
            if cut.reason == "time":
                extra["timed_out"] = True
            yield _chunk(cid, model_name, {}, event.finish_reason, **extra)
        elif isinstance(event, Chunk) and event.text:
            if first is None:
                first = time.monotonic()
                metrics.first_token.observe(first - started)
            extra = {"projection": event.telemetry} if event.telemetry else {}
            yield _chunk(cid, model_name, {"content": event.text}, **extra)
    yield "data: [DONE]\n\n"


def run_server(
    session,
    model_name: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    limits: Limits | None = None,
    aliases: tuple[str, ...] = (),
    api_key: str | None = None,
) -> None:
    """Serve until SIGTERM/SIGINT: then stop accepting, let replies run `limits.grace` seconds, cut the
    rest (each stops at its next token) and return."""
    # the server's parts only when serving
    import uvicorn

    limits = limits or Limits()
    app = create_app(session, model_name, limits, aliases, api_key)
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=limits.grace)
