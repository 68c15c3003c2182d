"""`assistant-axis serve` refuses what it cannot serve and never lets one request block the rest: real
servers on 127.0.0.1 (the bundled model, the transformers engine), real HTTP clients."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from test_serve import PIRATE, _client, _server

from serve_helpers import MODEL

LIMITS = ["--max-queue", "3", "--max-prompt-tokens", "300", "--request-timeout", "60"]
LONG = 3000  # tokens: about a minute of generation here, past any time limit below


@pytest.fixture(scope="module")
def url(tiny_run, tmp_path_factory):
    server, url = _server(tiny_run, tmp_path_factory.mktemp("serve") / "limits.log", *LIMITS)
    with server:
        yield url


def _post(url: str, body: dict | bytes, timeout: float = 120) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(
        f"{url}/chat/completions", content=content, headers={"Content-Type": "application/json"}, timeout=timeout
    )


def _ask(**extra) -> dict:
    return {"model": MODEL, "messages": PIRATE, "max_tokens": 32, "temperature": 0, **extra}


def _health(url: str) -> dict:
    return httpx.get(url.removesuffix("/v1") + "/health", timeout=5).json()


def _wait_until_generating(url: str, seconds: float = 60) -> None:
    """Until the server says a request holds the model (polled: how soon it starts depends on the machine)."""
    deadline = time.monotonic() + seconds
    while _health(url)["active"] != 1:
        assert time.monotonic() < deadline, "the request never started generating"
        time.sleep(0.02)


def test_bad_requests_are_refused_at_once_while_a_normal_one_is_served(url):
    with ThreadPoolExecutor(1) as pool:
        normal = pool.submit(_post, url, _ask(max_tokens=64))  # a few seconds of generation here
        _wait_until_generating(url)  # it holds the model now
        start = time.monotonic()
        refusals = [
            (_ask(max_tokens=100_000), 400, "max_tokens", "context of 8192 tokens"),
            (_ask(model="nope"), 404, "model", "'nope' does not exist"),
            (_ask(stop=["\n"]), 400, "stop", "not supported"),
            (_ask(tools=[{"type": "function", "function": {"name": "f"}}]), 400, "tools", "not supported"),
            (_ask(messages=[{"role": "user", "content": "word " * 400}]), 400, "messages", "at most 300"),
            (b'{"messages": [', 400, "body", "not JSON"),
        ]
        for body, status, param, words in refusals:
            response = _post(url, body, timeout=10)
            error = response.json()["error"]
            assert response.status_code == status and error["param"] == param and words in error["message"], error
        assert time.monotonic() - start < 3, "refusals waited for the running generation"
        assert not normal.done()
        reply = normal.result().json()
    assert reply["choices"][0]["message"]["content"].strip()
    # Fields at their defaults ask for nothing and pass; the normal reply is the model's, asked alone.
    alone = _post(url, _ask(max_tokens=64, presence_penalty=0, stop=None, user="someone", stream_options=None)).json()
    assert alone["choices"][0]["message"]["content"] == reply["choices"][0]["message"]["content"]


def test_overload_gets_429_with_retry_after_and_the_rest_are_answered(url):
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda i: _post(url, _ask(max_tokens=24, seed=i)), range(8)))
    codes = sorted(r.status_code for r in responses)
    assert codes == [200] * 3 + [429] * 5, codes
    for response in responses:
        if response.status_code == 429:
            assert int(response.headers["Retry-After"]) >= 1 and response.json()["error"]["type"] == "rate_limit_error"
        else:
            assert response.json()["choices"][0]["message"]["content"].strip()
    assert _post(url, _ask(max_tokens=4)).status_code == 200  # the places came back


def test_streaming_arrives_token_by_token_and_equals_the_whole_reply(url):
    client = _client(url)
    ask = dict(model=MODEL, messages=PIRATE, max_tokens=24, temperature=1.0, seed=5)
    whole = client.chat.completions.create(**ask).choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, **ask))
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 3 and "".join(pieces) == whole
    last = chunks[-1]
    assert last.choices[0].finish_reason in ("stop", "length") and last.usage.completion_tokens > 0
    assert last.model_extra["projection"]["layers"] == [15] and last.model_extra["projection"]["values"][0] is not None


def test_a_reply_past_the_time_limit_is_cut_and_flagged(tiny_run, tmp_path):
    server, url = _server(tiny_run, tmp_path / "timeout.log", "--request-timeout", "3")
    with server:
        start = time.monotonic()
        body = _post(url, _ask(max_tokens=LONG)).json()
        took = time.monotonic() - start
        with httpx.stream("POST", f"{url}/chat/completions", json=_ask(max_tokens=LONG, stream=True), timeout=30) as r:
            chunks = [line for line in r.iter_lines() if line.startswith("data: {")]
    assert 2.5 < took < 10, took
    assert body["timed_out"] is True and body["choices"][0]["finish_reason"] == "length"
    assert 0 < body["usage"]["completion_tokens"] < LONG
    last = json.loads(chunks[-1].removeprefix("data: "))
    assert last["timed_out"] is True and last["choices"][0]["finish_reason"] == "length"
    assert len(chunks) > 3  # it streamed what it had until the cut


def test_a_client_that_goes_away_stops_its_generation(url):
    with pytest.raises(httpx.ReadTimeout):
        _post(url, _ask(max_tokens=LONG, temperature=0.7), timeout=1.0)
    # Its generation stopped within moments: the model is free for the next request long before the
    # 60 s time limit would have cut the first.
    start = time.monotonic()
    assert _post(url, _ask(max_tokens=4)).status_code == 200
    assert time.monotonic() - start < 5


def test_sigterm_during_a_long_generation_exits_within_the_grace_period(tiny_run, tmp_path):
    limits = ["--request-timeout", "600", "--shutdown-grace", "2"]
    server, url = _server(tiny_run, tmp_path / "sigterm.log", *limits)
    with server as process:
        outcome: dict = {}

        def long_request():
            try:
                outcome["status"] = _post(url, _ask(max_tokens=LONG), timeout=60).status_code
            except httpx.HTTPError as exc:
                outcome["error"] = type(exc).__name__

        client = threading.Thread(target=long_request)
        client.start()
        _wait_until_generating(url)
        start = time.monotonic()
        os.killpg(process.pid, signal.SIGTERM)
        refused = False  # no longer accepting while it finishes: seen before it exits
        while process.poll() is None and not refused:
            try:
                _health(url)
            except httpx.ConnectError:
                refused = process.poll() is None
            except httpx.TransportError:  # a connection it closed while shutting down: ask again
                pass
            time.sleep(0.02)
        assert refused, "the server answered until it exited"
        process.wait(timeout=30)
        took = time.monotonic() - start
        client.join(timeout=10)
    assert took < 2 + 5, f"exited {took:.1f} s after SIGTERM (grace 2 s)"
    assert not client.is_alive() and outcome, outcome
