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

import threading
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from assistant_axis.chat import ChatSession, Reply, with_sampling

__all__ = ["create_app", "run_server", "completion_body"]

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


def completion_body(reply: Reply, model_name: str, want_logprobs: bool) -> dict:
    """OpenAI's chat.completion object for one reply, plus `projection`."""
    logprobs = None
    if want_logprobs:
        logprobs = {
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
    n_out = len(reply.token_ids)
    message = {"role": "assistant", "content": reply.text}
    if reply.reasoning:  # as vLLM's server returns a thinking model's think block
        message["reasoning_content"] = reply.reasoning
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model_name,
        "choices": [{"index": 0, "message": message, "finish_reason": reply.finish_reason, "logprobs": logprobs}],
        "usage": {
            "prompt_tokens": reply.prompt_tokens,
            "completion_tokens": n_out,
            "total_tokens": reply.prompt_tokens + n_out,
        },
        "projection": {"layers": reply.layers, "values": reply.projection, "tau": reply.tau},
    }


def answer(session: ChatSession, body: Any, model_name: str) -> dict:
    """Validate one request body and generate its completion (the caller holds the model's lock)."""
    if not isinstance(body, dict):
        raise RequestError("body", "the request body must be a JSON object")
    if body.get("stream"):
        raise RequestError("stream", "streaming is not supported; send stream=false")
    n = _number(body, "n", int)
    if n not in (None, 1):
        raise RequestError("n", f"only n=1 is supported, got {n}")
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
    sampling = with_sampling(session, temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed)
    reply = session.complete(messages, sampling, top_logprobs=(top or 0) if want else None)
    return completion_body(reply, model_name, want)


def _error(status: int, message: str, param: str | None, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}}, status)


def create_app(session: ChatSession, model_name: str) -> FastAPI:
    """The FastAPI app: `POST /v1/chat/completions`, `GET /v1/models`, `GET /health`."""
    # FastAPI reads the endpoints' annotations (strings here): `Request` must be a module global.
    app = FastAPI(title="assistant-axis", description=__doc__)
    lock = threading.Lock()
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
        import json

        from starlette.concurrency import run_in_threadpool

        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return _error(400, f"the request body is not JSON ({exc})", "body")

        def locked() -> dict:
            with lock:  # one model: one generation at a time
                return answer(session, body, model_name)

        try:
            return await run_in_threadpool(locked)
        except RequestError as exc:
            return _error(400, exc.message, exc.param)

    return app


def run_server(session: ChatSession, model_name: str, host: str = "127.0.0.1", port: int = 8000) -> None:
    import uvicorn

    uvicorn.run(create_app(session, model_name), host=host, port=port, log_level="info")
