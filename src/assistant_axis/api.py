"""One client for every server that speaks OpenAI's `/v1/chat/completions` (OpenAI, `vllm serve`,
llama.cpp's server, `transformers serve`), used by the `openai` generation backend and judge.

- bounded concurrency and a requests-per-second limit;
- retries with exponential backoff and jitter on 429, 5xx, timeouts, dropped connections and
  unreadable bodies, honouring `Retry-After`; a per-request timeout;
- a request that still fails becomes an `Outcome` with its reason: one bad request never fails a stage;
- a persistent cache keyed by the request (model, messages, parameters), so no paid call is made twice;
- the API key is read from the environment variable the config names and never written anywhere:
  error texts are scrubbed of it.

>>> api = ChatAPI(APISettings(base_url="http://127.0.0.1:8080/v1", model="m", api_key_env=None))
>>> outcomes = api.run([{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8}])
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import random
import sqlite3
import time
from collections import Counter
from dataclasses import dataclass, fields
from pathlib import Path

from tqdm.auto import tqdm

from assistant_axis.errors import InputError

__all__ = ["APISettings", "Outcome", "ResponseCache", "ChatAPI", "request_key"]

log = logging.getLogger("assistant_axis")
# Client errors that a retry cannot fix.
_FINAL_STATUS = {400, 401, 403, 404, 405, 409, 413, 422}


@dataclass(frozen=True)
class APISettings:
    base_url: str
    model: str
    api_key_env: str | None = "OPENAI_API_KEY"  # null: the server needs no key (a local server)
    concurrency: int = 16
    requests_per_second: float = 20.0
    timeout: float = 60.0
    max_retries: int = 6
    backoff: float = 0.5  # first retry waits about this long; doubles each time
    max_backoff: float = 30.0
    cache: str | None = "cache/api.sqlite"  # outside the job outputs; null disables it
    extra_body: dict | None = None  # passed through to the server (e.g. transformers serve's generation_config)

    @classmethod
    def from_config(cls, settings: dict, key: str, **defaults) -> APISettings:
        """Build from a config mapping, naming `key.field` in any error."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(settings) - known)
        if unknown:
            raise InputError("config", f"{key}.{unknown[0]}", f"unknown setting (known: {', '.join(sorted(known))})")
        values = {**defaults, **settings}
        for required in ("base_url", "model"):
            if not values.get(required):
                raise InputError("config", f"{key}.{required}", "missing")
        for name in ("concurrency", "requests_per_second", "timeout"):
            if name in values and not values[name] > 0:
                raise InputError("config", f"{key}.{name}", f"must be > 0, got {values[name]!r}")
        return cls(**values)


@dataclass
class Outcome:
    response: dict | None  # the server's JSON completion, or None when the request failed
    error: str | None = None
    attempts: int = 0
    cached: bool = False


def request_key(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


class ResponseCache:
    """Successful completions by request key, in SQLite (safe for several jobs at once)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.execute("CREATE TABLE IF NOT EXISTS responses (key TEXT PRIMARY KEY, response TEXT NOT NULL)")

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=60)
        db.execute("PRAGMA journal_mode=WAL")
        return db

    def get(self, keys: list[str]) -> dict[str, dict]:
        found: dict[str, dict] = {}
        with self._connect() as db:
            for start in range(0, len(keys), 500):
                chunk = keys[start : start + 500]
                marks = ",".join("?" * len(chunk))
                for key, value in db.execute(f"SELECT key, response FROM responses WHERE key IN ({marks})", chunk):
                    found[key] = json.loads(value)
        return found

    def put(self, key: str, response: dict) -> None:
        with self._connect() as db:
            db.execute("INSERT OR REPLACE INTO responses VALUES (?, ?)", (key, json.dumps(response)))


class _RateLimit:
    """At most `rate` request starts per second, spaced evenly."""

    def __init__(self, rate: float):
        self.interval, self.next_start, self.lock = 1.0 / rate, 0.0, asyncio.Lock()

    async def wait(self) -> None:
        async with self.lock:
            now = time.monotonic()
            start = max(now, self.next_start)
            self.next_start = start + self.interval
        if start > now:
            await asyncio.sleep(start - now)


class ChatAPI:
    def __init__(self, settings: APISettings, config_key: str = "api"):
        self.settings = settings
        self._key = None
        if settings.api_key_env:
            self._key = os.environ.get(settings.api_key_env)
            if not self._key:
                raise InputError("config", f"{config_key}.api_key_env",
                                 f"environment variable {settings.api_key_env} is not set")
        self.cache = ResponseCache(settings.cache) if settings.cache else None
        self.stats: Counter[str] = Counter()

    def scrub(self, text: str) -> str:
        return text.replace(self._key, "***") if self._key else text

    def _payload(self, request: dict) -> dict:
        payload = {"model": self.settings.model, **request}
        if self.settings.extra_body:
            payload = {**payload, **self.settings.extra_body}
        return payload

    def run(self, requests: list[dict], desc: str = "requests") -> list[Outcome]:
        """Send every request (cached ones are answered from the cache); outcomes in request order."""
        payloads = [self._payload(r) for r in requests]
        keys = [request_key(p) for p in payloads]
        cached = self.cache.get(keys) if self.cache else {}
        outcomes: list[Outcome | None] = [Outcome(cached[k], cached=True) if k in cached else None for k in keys]
        todo = [i for i, o in enumerate(outcomes) if o is None]
        self.stats.update(cached=len(keys) - len(todo))
        if todo:
            for i, outcome in zip(todo, asyncio.run(self._send_all([payloads[i] for i in todo], desc)), strict=True):
                outcomes[i] = outcome
                if outcome.response is not None and self.cache:
                    self.cache.put(keys[i], outcome.response)
        log.info("%s: %d ok (%d from cache), %d retried, %d failed", desc,
                 sum(o.response is not None for o in outcomes), self.stats["cached"], self.stats["retried"],
                 self.stats["failed"])
        return outcomes  # type: ignore[return-value]

    async def _send_all(self, payloads: list[dict], desc: str) -> list[Outcome]:
        from openai import AsyncOpenAI

        client = AsyncOpenAI(api_key=self._key or "no-key", base_url=self.settings.base_url,
                             timeout=self.settings.timeout, max_retries=0)
        gate = asyncio.Semaphore(self.settings.concurrency)
        limit = _RateLimit(self.settings.requests_per_second)
        bar = tqdm(total=len(payloads), desc=desc, unit="req")

        async def one(payload: dict) -> Outcome:
            async with gate:
                outcome = await self._send(client, limit, payload)
            bar.update()
            return outcome

        try:
            return await asyncio.gather(*(one(p) for p in payloads))
        finally:
            bar.close()
            await client.close()

    async def _send(self, client, limit: _RateLimit, payload: dict) -> Outcome:
        import openai

        body = {k: v for k, v in payload.items() if k not in ("model", "messages")}
        known = {"max_tokens", "temperature", "top_p", "seed", "logprobs", "top_logprobs", "stop", "n"}
        extra = {k: body.pop(k) for k in list(body) if k not in known}
        error = "no attempt made"
        for attempt in range(1, self.settings.max_retries + 2):
            await limit.wait()
            wait = None
            try:
                completion = await client.chat.completions.create(
                    model=payload["model"], messages=payload["messages"], extra_body=extra or None, **body)
                response = completion.model_dump() if hasattr(completion, "model_dump") else None
                if not isinstance(response, dict) or not response.get("choices"):
                    raise ValueError(f"unreadable response body: {str(completion)[:200]!r}")
                if attempt > 1:
                    self.stats["retried"] += 1
                return Outcome(response, attempts=attempt)
            except openai.APIStatusError as exc:
                error = f"HTTP {exc.status_code}: {self.scrub(str(exc))[:300]}"
                if exc.status_code in _FINAL_STATUS:
                    break
                wait = _retry_after(exc.response.headers.get("retry-after"))
            except (openai.APITimeoutError, openai.APIConnectionError) as exc:
                error = f"{type(exc).__name__}: {self.scrub(str(exc))[:300]}"
            except (openai.APIResponseValidationError, ValueError, json.JSONDecodeError) as exc:
                error = f"unreadable response: {self.scrub(str(exc))[:300]}"
            if attempt <= self.settings.max_retries:
                backoff = min(self.settings.max_backoff, self.settings.backoff * 2 ** (attempt - 1))
                await asyncio.sleep(min(self.settings.max_backoff, wait) if wait is not None
                                    else backoff * random.uniform(0.5, 1.5))
        self.stats["failed"] += 1
        return Outcome(None, error=error, attempts=attempt)


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None
