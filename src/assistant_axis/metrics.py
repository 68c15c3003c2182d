"""What `serve` exposes at `/metrics`, in Prometheus' text format (`prometheus_client`), one registry per
server so that two servers in one process count apart:

- `axis_requests_total{status}`: chat completion requests answered, by HTTP status (401, 429 included);
- `axis_prompt_tokens_total`, `axis_completion_tokens_total`: the sums of the replies' `usage`;
- `axis_requests_active`: requests admitted (generating or waiting), the queue `--max-queue` bounds;
- `axis_time_to_first_token_seconds`: streamed requests, from arrival to the first text sent (a reply
  returned whole has no first token to time);
- `axis_time_per_output_token_seconds`: per reply, after its first token when streamed, else over all;
- `axis_cap_tokens_total{setting}`, `axis_cap_fired_tokens_total{setting}` and their ratio
  `axis_cap_fired_share{setting}`: tokens generated under a capping setting and how many of them the cap
  lifted (averaged over its layers: a reply's `fired_share` times its tokens), where the engine measures
  it while serving (the vLLM engine; the transformers engine measures firing only in the evaluate stage).
"""

from __future__ import annotations

import math
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from assistant_axis.engines import Reply

__all__ = ["ServerMetrics", "CONTENT_TYPE_LATEST"]

# Seconds: decoding a token takes milliseconds on a GPU, up to a second on a small CPU.
_TOKEN_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
_FIRST_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ServerMetrics:
    def __init__(self, active: Callable[[], float]):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("axis_requests", "Chat completion requests by HTTP status", ["status"], registry=r)
        self.prompt_tokens = Counter("axis_prompt_tokens", "Prompt tokens (usage)", registry=r)
        self.completion_tokens = Counter("axis_completion_tokens", "Generated tokens (usage)", registry=r)
        Gauge("axis_requests_active", "Requests admitted, generating or waiting", registry=r).set_function(active)
        self.first_token = Histogram(
            "axis_time_to_first_token_seconds",
            "Streamed requests: arrival to first text",
            buckets=_FIRST_BUCKETS,
            registry=r,
        )
        self.per_token = Histogram(
            "axis_time_per_output_token_seconds", "Seconds per generated token", buckets=_TOKEN_BUCKETS, registry=r
        )
        self.cap_tokens = Counter("axis_cap_tokens", "Tokens generated under a cap", ["setting"], registry=r)
        self.cap_fired = Counter("axis_cap_fired_tokens", "Of those, tokens the cap lifted", ["setting"], registry=r)
        self._cap: dict[str, list[float]] = {}  # per setting: tokens, fired tokens (the gauge's ratio)
        self.cap_share = Gauge("axis_cap_fired_share", "Share of capped tokens the cap lifted", ["setting"], registry=r)

    def answered(self, status: int) -> None:
        self.requests.labels(str(status)).inc()

    def usage(self, usage: dict) -> None:
        self.prompt_tokens.inc(usage["prompt_tokens"])
        self.completion_tokens.inc(usage["completion_tokens"])

    def reply(self, reply: Reply, seconds: float, timed: int) -> None:
        """One reply done: `timed` of its tokens took `seconds` (streamed: those after the first; else
        all of them since the request came) and, under a cap, how often the cap fired."""
        if timed > 0:
            self.per_token.observe(seconds / timed)
        tokens = len(reply.token_ids)
        share = reply.fired_share
        if reply.setting not in (None, "none") and share is not None and math.isfinite(share) and tokens:
            self.cap_tokens.labels(reply.setting).inc(tokens)
            self.cap_fired.labels(reply.setting).inc(share * tokens)
            totals = self._cap.setdefault(reply.setting, [0.0, 0.0])
            totals[0], totals[1] = totals[0] + tokens, totals[1] + share * tokens
            self.cap_share.labels(reply.setting).set(totals[1] / totals[0])

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
