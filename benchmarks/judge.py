"""The judge client: requests per second against a server that answers after 50 ms (concurrency 1 vs 64),
and against a real llama.cpp server on the bundled model."""

from __future__ import annotations

import importlib.util
import json
import logging
import subprocess
import sys
from contextlib import contextmanager

from assistant_axis.judge import DEFAULT_TEMPLATE, JudgeItem, OpenAIJudge, render_prompt
from assistant_axis.models import bundled_gguf
from benchmarks.harness import CACHE, ROOT, Table, best_of, require
from tests.servers import llama_cpp_server


@contextmanager
def delay_server(delay: float):
    """tests/fake_openai.py's judge in its own process (so that it takes no time from the client's), answering
    every request after `delay` s."""
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.fake_openai", "--delay", str(delay)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        yield f"http://127.0.0.1:{process.stdout.readline().strip()}/v1"
    finally:
        process.kill()
        process.wait()


def judge_rate(url: str, prompts: list[str], concurrency: int, repeat: int) -> float:
    judge = OpenAIJudge(
        {
            "base_url": url,
            "model": "m",
            "api_key_env": None,
            "cache": None,
            "max_retries": 0,
            "concurrency": concurrency,
            "requests_per_second": 100_000,
        }
    )
    seconds, results = best_of({"run": lambda: judge.score_prompts(prompts)}, repeat)
    failed = [v.raw for v in results["run"] if v.score is None]
    require(not failed, f"{len(failed)} requests without a score: {failed[:3]}")
    return len(prompts) / seconds["run"]


def run(quick: bool, repeat: int, table: Table) -> None:
    logging.getLogger("assistant_axis").setLevel(logging.WARNING)
    prompts = [f"Rate reply number {i}." for i in range(500 if quick else 2000)]
    with delay_server(0.05) as url:
        one = judge_rate(url, prompts[:40], 1, repeat)
        many = judge_rate(url, prompts, 64, repeat)
    table.report("judge client, concurrency 1 (50 ms server)", f"{one:.0f} req/s", "one request at a time")
    table.report(
        "judge client, concurrency 64 (50 ms server)",
        f"{many:.0f} req/s",
        f"{many / one:.0f}x; target 200 req/s (ideal {64 / 0.05:.0f})",
    )

    if importlib.util.find_spec("xllamacpp") is None:
        table.report("judge, real server (llama.cpp)", "skipped", "xllamacpp is not installed")
        return
    data = json.loads((CACHE / "responses.json").read_text()) if (CACHE / "responses.json").is_file() else []
    items = [JudgeItem("pirate", "A swashbuckling pirate.", c[-1]["content"], r) for c, r in data[:32]]
    real = [render_prompt(DEFAULT_TEMPLATE, item) for item in items] or prompts[:32]
    log = CACHE / "llama-server.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with llama_cpp_server(bundled_gguf("bundled:smollm2-135m-instruct"), log) as url:
        judge_rate(url, real[:4], 4, 1)  # warm up
        one = judge_rate(url, real, 1, repeat)
        four = judge_rate(url, real, 4, repeat)
    table.report(
        "judge, llama.cpp server, concurrency 1",
        f"{one:.1f} req/s",
        f"bundled model, {len(real)} real judge prompts, 1 token + top logprobs",
    )
    table.report(
        "judge, llama.cpp server, concurrency 4", f"{four:.1f} req/s", f"{four / one:.1f}x (the server's 4 slots)"
    )
