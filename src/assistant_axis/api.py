"""One client for every server that speaks OpenAI's `/v1/chat/completions` (OpenAI, `vllm serve`,
llama.cpp's server, `transformers serve`), used by the `openai` generation backend and judge.

- bounded concurrency and a requests-per-second limit;
- retries with exponential backoff and jitter on 429, 5xx, timeouts, dropped connections and
  unreadable bodies, honouring `Retry-After`; a per-request timeout;
- a job whose requests still fail after their retries fails with one line (how many, why); a status
  about the whole run (401, 403, 404, 405: the key, the model, the URL) is not retried and stops the job
  at once;
- a request the server rejects for itself (400, 409, 413, 422: a content filter, a prompt over the
  context) is "rejected": not retried, and, where the caller accepts rejections (`max_rejected_share`),
  recorded per item and kept in the cache so that a rerun does not pay for it again
  (`retry_rejected` asks again); the job fails only past that share of its items;
- a persistent cache keyed by the request (model, messages, parameters), written as each answer arrives
  (one file per answer, renamed into place), so a killed or failed job loses nothing already paid for
  and its rerun only asks for the rest;
- the API key is read from the environment variable the config names and never written anywhere:
  error texts are scrubbed of it.

>>> api = ChatAPI(APISettings(base_url="http://127.0.0.1:8080/v1", model="m", api_key_env=None))
>>> outcomes = api.run([{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8}])
"""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import json
import logging
import os
import random
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, fields
from pathlib import Path

from tqdm.auto import tqdm

from assistant_axis.errors import APIError, InputError

__all__ = ["APISettings", "Outcome", "ResponseCache", "ChatAPI", "request_key"]

log = logging.getLogger("assistant_axis")
# Client errors that a retry cannot fix: about the whole run (the key, the model, the URL), or about one
# request (its content, its size), which a caller may record per item.
RUN_STATUS = {401, 403, 404, 405}
ITEM_STATUS = {400, 409, 413, 422}


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
    cache: str | None = "cache/api"  # a folder outside the job outputs; null disables it
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
    rejected: str | None = None  # "HTTP 400: the server's message": the server rejected this request


def request_key(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


class ResponseCache:
    """Successful completions by request key: one JSON file per answer, `<folder>/<key[:2]>/<key>.json`.

    Each answer is written to a temporary file in its folder and renamed into place, so a reader sees a
    whole answer or none, a job killed mid-write leaves only a stray temporary file, and any number of
    jobs on any number of nodes can share the folder: rename within one directory is atomic on local and
    network filesystems (NFS included), with no lock and no database journal (SQLite's WAL, which needs
    shared memory, does not work across NFS clients).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if self.path.is_file():
            raise InputError(
                self.path,
                "cache",
                "is a file (the SQLite cache of an older version?): the cache "
                "is now a folder; give a folder path or delete the file",
            )
        self.path.mkdir(parents=True, exist_ok=True)

    def _file(self, key: str, kind: str = "json") -> Path:
        return self.path / key[:2] / f"{key}.{kind}"

    def get(self, keys: list[str]) -> dict[str, dict]:
        found: dict[str, dict] = {}
        for key in keys:
            try:
                found[key] = json.loads(self._file(key).read_text())
            except (FileNotFoundError, json.JSONDecodeError):
                continue  # not answered yet (or a file damaged by hand): asked again
        return found

    def rejected(self, keys: list[str]) -> dict[str, str]:
        """The requests the server rejected, by key: what it said."""
        found: dict[str, str] = {}
        for key in keys:
            try:
                found[key] = json.loads(self._file(key, "rejected").read_text())["rejected"]
            except (FileNotFoundError, json.JSONDecodeError, KeyError, TypeError):
                continue
        return found

    def put(self, key: str, response: dict, kind: str = "json") -> None:
        """Keep an answer (`kind` "json"), or a rejection (`kind` "rejected", `{"rejected": message}`)."""
        target = self._file(key, kind)
        target.parent.mkdir(exist_ok=True)
        handle, tmp = tempfile.mkstemp(prefix=f".{key[:8]}.", suffix=".tmp", dir=target.parent)
        try:
            with os.fdopen(handle, "w") as out:
                json.dump(response, out)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, target)
            if kind == "json":
                self._file(key, "rejected").unlink(missing_ok=True)  # answered after all
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


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
                raise InputError(
                    "config", f"{config_key}.api_key_env", f"environment variable {settings.api_key_env} is not set"
                )
        self.cache = ResponseCache(settings.cache) if settings.cache else None
        self.stats: Counter[str] = Counter()
        self._refused: str | None = None  # the first final refusal of this run: nothing more is sent
        self._per_item = False  # this run records rejections per item

    def scrub(self, text: str) -> str:
        return text.replace(self._key, "***") if self._key else text

    def _payload(self, request: dict) -> dict:
        payload = {"model": self.settings.model, **request}
        if self.settings.extra_body:
            payload = {**payload, **self.settings.extra_body}
        return payload

    def run(
        self,
        requests: list[dict],
        desc: str = "requests",
        max_rejected_share: float | None = None,
        retry_rejected: bool = False,
    ) -> list[Outcome]:
        """Send every request (cached ones are answered from the cache); outcomes in request order.

        Raises `APIError` if any request still failed after its retries, or the server refused one: the
        answers received up to then are in the cache, so a rerun asks only for the others.
        `max_rejected_share` None: a rejected request (`ITEM_STATUS`) is refused as the others are. A
        share: rejections are outcomes (no response, `rejected` set), cached as rejected and not sent
        again unless `retry_rejected`; more than that share of the requests rejected raises `APIError`.
        """
        payloads = [self._payload(r) for r in requests]
        keys = [request_key(p) for p in payloads]
        cached = self.cache.get(keys) if self.cache else {}
        outcomes: list[Outcome | None] = [Outcome(cached[k], cached=True) if k in cached else None for k in keys]
        if max_rejected_share is not None and self.cache and not retry_rejected:
            known = self.cache.rejected([k for k, o in zip(keys, outcomes, strict=True) if o is None])
            outcomes = [
                o or (Outcome(None, cached=True, rejected=known[k]) if k in known else None)
                for k, o in zip(keys, outcomes, strict=True)
            ]
        todo = [i for i, o in enumerate(outcomes) if o is None]
        self.stats.update(cached=len(keys) - len(todo))
        self._refused = None
        self._per_item = max_rejected_share is not None
        if todo:
            sent = asyncio.run(self._send_all([(payloads[i], keys[i]) for i in todo], desc))
            for i, outcome in zip(todo, sent, strict=True):
                outcomes[i] = outcome
        failed = [o for o in outcomes if o.response is None and o.rejected is None]
        rejected = [o for o in outcomes if o.rejected is not None]
        log.info(
            "%s: %d ok (%d from cache), %d retried, %d rejected, %d failed",
            desc,
            len(outcomes) - len(failed) - len(rejected),
            self.stats["cached"],
            self.stats["retried"],
            len(rejected),
            len(failed),
        )
        if failed:
            raise APIError(self._failure_line(failed, len(outcomes)))
        if rejected:
            line = self._rejection_line(rejected, len(outcomes), max_rejected_share)
            if len(rejected) > max_rejected_share * len(outcomes):
                raise APIError(line)
            log.warning("%s: %s", desc, line)
        return outcomes  # type: ignore[return-value]

    def _rejection_line(self, rejected: list[Outcome], total: int, share: float) -> str:
        """One line: how many the server rejected, per reason, and what a rerun does."""
        reasons = Counter(o.rejected[:120] for o in rejected if o.rejected)
        counts = "; ".join(f"{n} x {reason}" for reason, n in reasons.most_common(5))
        more = f"; {len(reasons) - 5} other reasons" if len(reasons) > 5 else ""
        kept = "kept in the cache as rejected (retry_rejected: true asks again)" if self.cache else "no cache is set"
        return (
            f"{self.settings.base_url}: the server rejected {len(rejected)} of {total} requests "
            f"({len(rejected) / total:.1%}, at most {share:.1%} allowed by max_rejected_share): {counts}{more}; {kept}"
        )

    def _failure_line(self, failed: list[Outcome], total: int) -> str:
        """One line: how many failed and why, and what a rerun will do."""
        url = self.settings.base_url
        kept = (
            ("the answers received are cached in " + str(self.settings.cache) + ": a rerun asks only for the others")
            if self.cache
            else "no cache is set: a rerun asks for every request again"
        )
        if self._refused is not None:
            return f"{url}: the server refused a request, so none more were sent ({self._refused}); {kept}"
        kinds = Counter(o.error.split(":", 1)[0] for o in failed if o.error)
        counts = ", ".join(f"{n} {kind}" for kind, n in kinds.most_common())
        return (
            f"{url}: {len(failed)} of {total} requests failed after {self.settings.max_retries} retries "
            f"({counts}; first: {failed[0].error}); {kept}"
        )

    async def _send_all(self, work: list[tuple[dict, str]], desc: str) -> list[Outcome]:
        # the OpenAI client only when requests are sent
        from openai import AsyncOpenAI

        client = AsyncOpenAI(
            api_key=self._key or "no-key", base_url=self.settings.base_url, timeout=self.settings.timeout, max_retries=0
        )
        gate = asyncio.Semaphore(self.settings.concurrency)
        limit = _RateLimit(self.settings.requests_per_second)
        bar = tqdm(total=len(work), desc=desc, unit="req")

        async def one(payload: dict, key: str) -> Outcome:
            async with gate:
                if self._refused is not None:  # the server refused one: a retry cannot fix the others
                    outcome = Outcome(None, error="not sent: the server refused an earlier request")
                else:
                    outcome = await self._send(client, limit, payload)
            if outcome.response is not None and self.cache:
                self.cache.put(key, outcome.response)  # kept at once: a killed job loses nothing received
            elif outcome.rejected is not None and self.cache:
                self.cache.put(key, {"rejected": outcome.rejected}, "rejected")
            bar.update()
            return outcome

        try:
            return await asyncio.gather(*(one(p, k) for p, k in work))
        finally:
            bar.close()
            await client.close()

    async def _send(self, client, limit: _RateLimit, payload: dict) -> Outcome:
        # the OpenAI client only when requests are sent
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
                    model=payload["model"], messages=payload["messages"], extra_body=extra or None, **body
                )
                response = completion.model_dump() if hasattr(completion, "model_dump") else None
                if not isinstance(response, dict) or not response.get("choices"):
                    raise ValueError(f"unreadable response body: {str(completion)[:200]!r}")
                if attempt > 1:
                    self.stats["retried"] += 1
                return Outcome(response, attempts=attempt)
            except openai.APIStatusError as exc:
                error = f"HTTP {exc.status_code}: {self.scrub(str(exc))[:300]}"
                if exc.status_code in ITEM_STATUS and self._per_item:
                    said = exc.body.get("message") if isinstance(exc.body, dict) else None
                    return Outcome(
                        None, attempts=attempt, rejected=f"HTTP {exc.status_code}: {self.scrub(str(said or exc))[:300]}"
                    )
                if exc.status_code in RUN_STATUS | ITEM_STATUS:
                    self._refused = self._refused or error
                    break
                wait = _retry_after(exc.response.headers, time.time())
            except (openai.APITimeoutError, openai.APIConnectionError) as exc:
                error = f"{type(exc).__name__}: {self.scrub(str(exc))[:300]}"
            except (openai.APIResponseValidationError, ValueError, json.JSONDecodeError) as exc:
                error = f"unreadable response: {self.scrub(str(exc))[:300]}"
            if attempt <= self.settings.max_retries:
                backoff = min(self.settings.max_backoff, self.settings.backoff * 2 ** (attempt - 1))
                await asyncio.sleep(
                    min(self.settings.max_backoff, wait) if wait is not None else backoff * random.uniform(0.5, 1.5)
                )
        self.stats["failed"] += 1
        return Outcome(None, error=error, attempts=attempt)


def _retry_after(headers, now: float) -> float | None:
    """Seconds to wait from a response's headers: `retry-after-ms` (OpenAI's), else `Retry-After` as
    seconds or as an HTTP date; None when absent or unreadable."""
    try:
        if headers.get("retry-after-ms") is not None:
            return max(0.0, float(headers["retry-after-ms"]) / 1000)
    except ValueError:
        pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - now)
    except (TypeError, ValueError):
        return None
