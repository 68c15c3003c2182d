"""A scripted OpenAI-compatible server on 127.0.0.1: each POST to /v1/chat/completions is answered by a
Python function, so tests can play a judge that answers nonsense or a server that echoes the API key.

`python -m tests.fake_openai --delay 0.05` (from the checkout) serves a judge that answers "3" with
logprobs after 50 ms, in a process of its own, and prints its port: the judge client benchmark's server.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# reply(request body, Authorization header) -> (HTTP status, JSON body)
Reply = Callable[[dict, str], tuple[int, dict]]


def completion(text: str, top_logprobs: list[tuple[str, float]] | None = None) -> dict:
    """A chat completion with `text` as the reply and, optionally, the first token's top logprobs."""
    choice = {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}
    if top_logprobs is not None:
        top = [{"token": t, "logprob": lp, "bytes": None} for t, lp in top_logprobs]
        choice["logprobs"] = {
            "content": [{"token": top[0]["token"], "logprob": top[0]["logprob"], "bytes": None, "top_logprobs": top}]
        }
    return {
        "id": "fake",
        "object": "chat.completion",
        "created": 0,
        "model": "fake",
        "choices": [choice],
        "usage": {"prompt_tokens": 1, "completion_tokens": len(text.split()), "total_tokens": 1},
    }


class _Discard(list):
    def append(self, _item) -> None:
        pass


class FakeOpenAI:
    """`with FakeOpenAI(reply) as api:` serves at `api.url` (a /v1 base URL) and records every request."""

    def __init__(self, reply: Reply, delay: float = 0.0):
        self.requests: list[dict] = []
        self.authorizations: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # else headers and body go out in two segments and wait for an ACK

            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):  # noqa: N802 (http.server's naming)
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                auth = self.headers.get("Authorization", "")
                server.requests.append(body)
                server.authorizations.append(auth)
                time.sleep(delay)
                status, answer = reply(body, auth)
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        ThreadingHTTPServer.request_queue_size = 1024  # many clients at once (the benchmark's 64)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeOpenAI:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="a judge that answers '3' with logprobs after --delay s")
    parser.add_argument("--delay", type=float, default=0.0)
    args = parser.parse_args()
    answer = completion("3", [(d, -1.0 - int(d)) for d in "3012"])
    fake = FakeOpenAI(lambda _body, _auth: (200, answer), delay=args.delay)
    fake.requests = fake.authorizations = _Discard()  # a long benchmark would keep every request otherwise
    print(fake.server.server_address[1], flush=True)
    fake.server.serve_forever()
