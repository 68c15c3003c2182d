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

One model serves one request at a time (a lock): requests queue. `n` must be 1 and `stream` false.
The request's `model` is not checked against the served name (harnesses send their own).

>>> run_server(session, "smollm2-135m-instruct", host="127.0.0.1", port=8000)
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from dataclasses import dataclass, replace
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from assistant_axis.backends import Sampling
from assistant_axis.chat import ChatSession, Reply, with_sampling
from assistant_axis.errors import InputError

__all__ = ["create_app", "run_server", "completion_body", "parse_request", "ChatRequest"]

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class RequestError(Exception):
    """A request the server cannot answer as asked: HTTP 400 naming the field (`param`)."""

    def __init__(self, param: str, message: str):
        self.param, self.message = param, message
        super().__init__(message)


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


def _error(status: int, message: str, param: str | None, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}}, status)


class _Transformers:
    """A `ChatSession` behind the server: one generation at a time (a lock), in a worker thread; a
    stream is the whole reply in one chunk."""

    def __init__(self, session: ChatSession):
        self.session, self.lock = session, threading.Lock()

    async def replies(self, request: ChatRequest) -> list[Reply]:
        from starlette.concurrency import run_in_threadpool

        def locked(seed: int) -> Reply:
            with self.lock:
                sampling = replace(request.sampling, seed=seed)
                top = request.top_logprobs if request.logprobs else None
                return self.session.complete(request.messages, sampling, top, request.setting)

        return [await run_in_threadpool(locked, seed) for seed in request.seeds()]

    def stream(self, request: ChatRequest):
        async def events():
            (reply,) = await self.replies(request)
            yield reply.text, None
            yield reply, None

        return events()


class _VLLM:
    """A `VLLMSession` behind the server: every request goes to the engine at once (continuous batching)."""

    def __init__(self, session):
        self.session = session

    def _submit(self, request: ChatRequest, seed: int):
        top = request.top_logprobs if request.logprobs else None
        sampling = replace(request.sampling, seed=seed)
        return self.session.submit(request.messages, sampling, top, request.setting, asyncio.get_running_loop())

    async def replies(self, request: ChatRequest) -> list[Reply]:
        streams = [self._submit(request, seed) for seed in request.seeds()]
        try:
            return [await _last(stream) for stream in streams]
        finally:  # a client that went away: its generations stop
            for stream in streams:
                stream.cancel()

    def stream(self, request: ChatRequest):
        stream = self._submit(request, request.sampling.seed)  # refused now (400), not mid-stream

        async def events():
            try:
                async for event in stream:
                    yield (event, None) if isinstance(event, Reply) else (event.text, event.telemetry.as_dict())
            finally:
                stream.cancel()

        return events()


async def _last(stream) -> Reply:
    async for event in stream:
        if isinstance(event, Reply):
            return event
    raise RuntimeError("the engine ended the request without a reply")


def create_app(session, model_name: str) -> FastAPI:
    """The FastAPI app: `POST /v1/chat/completions`, `GET /v1/models`, `GET /health`. `session` is a
    `chat.ChatSession` (transformers) or a `vllm_chat.VLLMSession`."""
    # FastAPI reads the endpoints' annotations (strings here): `Request` must be a module global.
    app = FastAPI(title="assistant-axis", description=__doc__)
    engine = _Transformers(session) if isinstance(session, ChatSession) else _VLLM(session)
    created = int(time.time())

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok"}

    @app.get("/v1/models")
    def models() -> dict:
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
        try:
            parsed = parse_request(session, body)
            if parsed.stream:
                events = _events(engine.stream(parsed), parsed, model_name)
                return StreamingResponse(events, media_type="text/event-stream")
            return completion_body(await engine.replies(parsed), model_name, parsed.logprobs)
        except RequestError as exc:
            return _error(400, exc.message, exc.param)
        except InputError as exc:
            return _error(400, str(exc), exc.field)

    return app


async def _events(stream, request: ChatRequest, model_name: str):
    """Server-sent events in OpenAI's chunk format; chunks carry the running projection, the last one
    the usage and the reply's telemetry."""
    cid = f"chatcmpl-{uuid.uuid4().hex}"
    yield _chunk(cid, model_name, {"role": "assistant", "content": ""})
    async for event, running in stream:
        if isinstance(event, Reply):
            extra = {"usage": _usage([event]), "projection": projection_body(event)}
            if request.logprobs:
                extra["logprobs"] = _logprobs_body(event)
            yield _chunk(cid, model_name, {}, event.finish_reason, **extra)
        elif event:
            yield _chunk(cid, model_name, {"content": event}, **({"projection": running} if running else {}))
    yield "data: [DONE]\n\n"


def run_server(session, model_name: str, host: str = "127.0.0.1", port: int = 8000) -> None:
    import uvicorn

    uvicorn.run(create_app(session, model_name), host=host, port=port, log_level="info")
