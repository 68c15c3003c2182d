"""Production backends against real loopback servers: llama.cpp's server and `transformers serve`.

Also: the fault-injecting proxy (retries, recorded reasons, cache-only reruns), the API key never
written anywhere, and the vLLM backend's engine settings (vLLM itself runs in test_vllm.py).
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pandas as pd
import pytest

from assistant_axis.api import APISettings, ChatAPI
from assistant_axis.engines import Sampling
from assistant_axis.engines.openai import OpenAIEngine
from assistant_axis.engines.vllm import VLLMEngine
from assistant_axis.engines.vllm.engine import vllm_engine_args
from assistant_axis.errors import APIError, InputError
from assistant_axis.judge import DEFAULT_TEMPLATE, JudgeItem, OpenAIJudge, TransformersJudge, render_prompt
from assistant_axis.models import bundled_gguf

from conftest import need, need_package
from servers import CONTENT_FILTER, REFUSALS, FaultProxy, find_command, llama_cpp_server, transformers_server
from workflow_helpers import make_workspace, snakemake, tiny_config

ROOT = Path(__file__).resolve().parents[1]
SENTINEL = "sk-axis-sentinel-5b1c0e7d9a"
KEY_ENV = "AXIS_TEST_API_KEY"


@pytest.fixture(scope="module")
def llama_url(tmp_path_factory):
    need_package("xllamacpp")  # llama.cpp's server
    log = tmp_path_factory.mktemp("llama") / "server.log"
    with llama_cpp_server(bundled_gguf("bundled:smollm2-135m-instruct"), log) as url:
        yield url


@pytest.fixture(scope="module")
def llama_f32_url(tmp_path_factory):
    """llama.cpp serving a float32 copy of the bundled GGUF: the weights transformers runs, in float32."""
    from f32_gguf import write_f32_copy

    need_package("xllamacpp")  # llama.cpp's server
    folder = tmp_path_factory.mktemp("llama_f32")
    gguf = write_f32_copy(bundled_gguf("bundled:smollm2-135m-instruct"), folder / "smollm2-f32.gguf")
    with llama_cpp_server(gguf, folder / "server.log") as url:
        yield url


@pytest.fixture(scope="module")
def hf_url(tmp_path_factory, model_dir):
    need(
        find_command("transformers") is not None and importlib.util.find_spec("fastapi") is not None,
        "transformers serve needs transformers[serving]",
    )
    log = tmp_path_factory.mktemp("hfserve") / "server.log"
    with transformers_server(model_dir, log) as url:
        yield url


@pytest.fixture
def key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, SENTINEL)
    return SENTINEL


def _labelled(n: int) -> list[JudgeItem]:
    rows = [json.loads(line) for line in (ROOT / "tests/data/judge_labels.jsonl").read_text().splitlines()]
    return [JudgeItem(r["role"], r["description"], r["question"], r["response"]) for r in rows[:n]]


def _grep_tree(root: Path, needle: str) -> list[Path]:
    hits = []
    for folder in ("results", "logs", ".snakemake/log", "cache"):
        for path in (root / folder).rglob("*"):
            if path.is_file() and not path.is_symlink() and needle.encode() in path.read_bytes():
                hits.append(path)
    return hits


# ------------------------------------------------------------------------------------- end to end


# The stages a server takes part in: every role's generation and judging. The stages after them read
# only these files, as they do with any backend (test_security.py runs them all through an API).
# Through a real server: one role's replies and scores, and the default replies (the server answers one
# request at a time on this machine, so more roles would only repeat the same calls).
SERVED_ROLES = ["pirate"]
SERVED = [f"results/smollm2-135m-instruct/scores/{role}.parquet" for role in SERVED_ROLES] + [
    "results/smollm2-135m-instruct/responses/default.parquet"
]


def _api(url: str, model: str, cache: str | None = "cache/api", **more) -> dict:
    return {"base_url": url, "model": model, "api_key_env": KEY_ENV, "cache": cache, "concurrency": 4, **more}


@pytest.mark.slow
def test_tiny_run_through_llama_cpp(tmp_path, model_dir, llama_url, key):
    config = tiny_config(
        generate={"backend": "openai", "openai": _api(llama_url, "smollm2")},
        judge={"backend": "openai", "openai": _api(llama_url, "smollm2", scoring="logprobs")},
    )
    work = make_workspace(tmp_path, model_dir, config)
    snakemake(work, *SERVED, env={KEY_ENV: key})
    results = work / "results/smollm2-135m-instruct"
    for role in SERVED_ROLES:
        scores = pd.read_parquet(results / f"scores/{role}.parquet")
        assert scores["judge"].eq("openai:smollm2:logprobs").all()
        assert scores["score"].notna().all(), scores["raw"].tolist()
        assert all("digit_mass" in json.loads(r) for r in scores["raw"])
    for role in ["pirate", "default"]:
        responses = pd.read_parquet(results / f"responses/{role}.parquet")
        assert responses["response"].str.len().gt(0).all() and responses["n_response_tokens"].between(1, 16).all()
    assert _grep_tree(work, key) == []


@pytest.mark.slow
def test_tiny_run_through_transformers_serve(tmp_path, model_dir, hf_url, key):
    # transformers serve samples only when told so through its own generation_config.
    sampling = {"generation_config": json.dumps({"do_sample": True, "temperature": 0.7, "top_p": 0.9})}
    config = tiny_config(
        generate={"backend": "openai", "openai": _api(hf_url, str(model_dir), extra_body=sampling)},
        judge={"backend": "openai", "openai": _api(hf_url, str(model_dir), scoring="parse")},
    )
    work = make_workspace(tmp_path, model_dir, config)
    snakemake(work, *SERVED, env={KEY_ENV: key})
    results = work / "results/smollm2-135m-instruct"
    for role in SERVED_ROLES:
        scores = pd.read_parquet(results / f"scores/{role}.parquet")
        assert scores["judge"].str.endswith(":parse").all()
        # Each row's score is the first digit 0-3 of the judge's own reply recorded beside it; a row without
        # one records a reply that has no such digit.
        for score, raw in zip(scores["score"], scores["raw"], strict=True):
            if pd.isna(score):
                assert raw.startswith("no digit 0-3 in the judge's reply") and not re.search(r"[0-3]", raw[34:]), raw
            else:
                assert re.search(r"[0-3]", json.loads(raw)["text"]).group() == str(score), (score, raw)
    assert pd.read_parquet(results / "responses/default.parquet")["response"].str.len().gt(0).all()
    assert _grep_tree(work, key) == []


@pytest.mark.slow
def test_llama_cpp_logprobs_match_the_local_judge(bundled, llama_url, llama_f32_url, key, capsys):
    """Same weights, same rendered prompts: expected scores agree wherever all four digits are returned.

    Served from the bundled Q4_1 file, llama.cpp multiplies by quantised activations and differs from
    the float32 transformers judge by up to ~0.09 (printed, not asserted); served from the float32 copy of the
    same weights, it computes what transformers computes, and the two agree to 0.05.
    """
    model, tokenizer = bundled
    prompts = [render_prompt(DEFAULT_TEMPLATE, it) for it in _labelled(24)]
    local = TransformersJudge(model, tokenizer, "local", batch_size=4).score_prompts(prompts)

    def differences(url: str) -> list[float]:
        remote = OpenAIJudge(_api(url, "smollm2", cache=None, scoring="logprobs")).score_prompts(prompts)
        return [
            abs(a.expected_score - b.expected_score)
            for a, b in zip(local, remote, strict=True)
            if not json.loads(b.raw)["missing"]
        ]

    f32, q4 = differences(llama_f32_url), differences(llama_url)
    with capsys.disabled():
        print(
            f"\nlogprob judge vs transformers judge on {len(prompts)} prompts: all four digits among the top logprobs "
            f"on {len(f32)} (float32 GGUF) and {len(q4)} (Q4_1 GGUF); max |expected score difference| "
            f"{max(f32, default=0):.4f} (float32) and {max(q4, default=0):.4f} (Q4_1, quantised arithmetic)"
        )
    assert len(f32) >= len(prompts) // 2
    assert max(f32) <= 0.05


# -------------------------------------------------------------------------------------- faults


@pytest.fixture
def responses_file(tmp_path) -> Path:
    items = _labelled(12)
    frame = pd.DataFrame(
        {
            "role": "pirate",
            "prompt_index": [i % 2 for i in range(len(items))],
            "question_index": list(range(len(items))),
            "question_id": [f"q{i}" for i in range(len(items))],
            "system_prompt": "You are a pirate.",
            "question": [it.question for it in items],
            "response": [it.response for it in items],
            "n_response_tokens": 10,
            "finish_reason": "stop",
        }
    )
    path = tmp_path / "responses.parquet"
    frame.to_parquet(path)
    return path


def _judge_stage(responses: Path, output: Path, settings: dict) -> pd.DataFrame:
    from assistant_axis import stages

    stages.judge(
        str(responses),
        str(output),
        role="pirate",
        description="A pirate.",
        template=DEFAULT_TEMPLATE,
        backend="openai",
        settings=settings,
    )
    return pd.read_parquet(output)


# What each fault the proxy injects looks like to the client, as the job's error line counts it.
CLIENT_KINDS = {
    "500": "HTTP 500",
    "429": "HTTP 429",
    "hang": "APITimeoutError",
    "drop": "APIConnectionError",
    "garbage": "unreadable response",
}


@pytest.mark.slow
def test_failed_requests_fail_the_job_and_a_rerun_only_asks_for_the_missing(tmp_path, llama_url, responses_file, key):
    cache = tmp_path / "cache"
    # A timeout far above a real answer's time (well under a second), so that only the injected hang meets it.
    settings = _api(
        llama_url, "smollm2", cache=str(cache), scoring="logprobs", timeout=10.0, max_retries=0, concurrency=2
    )
    # share 0.6 and seed 4: the first 12 draws hold every retryable fault kind at least once.
    with FaultProxy(llama_url, share=0.6, seed=4, hang_seconds=12.0) as proxy:
        settings["base_url"] = proxy.url
        with pytest.raises(APIError) as failure:
            _judge_stage(responses_file, tmp_path / "scores.parquet", settings)
        line = str(failure.value)
        print(f"injected at the proxy: {dict(proxy.faults)}; the job's error: {line}")
        n = len(pd.read_parquet(responses_file))
        assert sum(proxy.calls.values()) == n  # one attempt each
        assert set(proxy.faults) == set(CLIENT_KINDS), proxy.faults
        n_failed = sum(proxy.faults.values())
        assert f"{n_failed} of {n} requests failed after 0 retries" in line
        for kind, count in proxy.faults.items():  # the client saw each kind as often as it was injected
            assert f"{count} {CLIENT_KINDS[kind]}" in line, (kind, line)
        assert key not in line and "\n" not in line
        assert not (tmp_path / "scores.parquet").exists()
        # Every answer received is in the cache already.
        assert len(list(cache.rglob("*.json"))) == n - n_failed == sum(proxy.forwarded.values())

        # The rerun finds the answered prompts in the cache and asks only for the missing ones.
        proxy.reset_counts()
        proxy.share = 0.0
        second = _judge_stage(responses_file, tmp_path / "scores2.parquet", {**settings, "max_retries": 3})
        assert sum(proxy.calls.values()) == sum(proxy.forwarded.values()) == n_failed
        assert second["score"].notna().all()


@pytest.mark.slow
@pytest.mark.parametrize("kind", REFUSALS)
def test_a_refused_request_stops_the_job_at_once(tmp_path, llama_url, responses_file, key, kind):
    settings = _api(llama_url, "smollm2", cache=None, scoring="logprobs", max_retries=5, concurrency=2)
    with FaultProxy(llama_url, share=1.0, kinds=(kind,)) as proxy:
        settings["base_url"] = proxy.url
        with pytest.raises(APIError, match=rf"the server refused a request, so none more were sent \(HTTP {kind}"):
            _judge_stage(responses_file, tmp_path / "scores.parquet", settings)
    # Not retried, and nothing sent after the refusal beyond what was already in flight.
    assert proxy.faults[kind] == sum(proxy.calls.values()) <= settings["concurrency"]
    assert not proxy.forwarded


@pytest.mark.slow
def test_rejected_prompts_get_a_null_score_and_are_not_paid_for_again(tmp_path, llama_url, responses_file, key, caplog):
    """Two replies a content filter rejects (400): past the allowed share the job fails naming them, every
    other answer and both rejections cached; within it the job finishes with the two scores null and the
    server's message; a rerun sends nothing, and `retry_rejected` sends exactly those two again."""
    frame = pd.read_parquet(responses_file)
    marker = "[[filtered reply]]"
    frame.loc[[2, 7], "response"] = frame.loc[[2, 7], "response"] + " " + marker
    frame.to_parquet(responses_file)
    cache = tmp_path / "cache"
    settings = _api(llama_url, "smollm2", cache=str(cache), scoring="logprobs", concurrency=2)
    n = len(frame)
    with FaultProxy(llama_url, share=0.0, reject=(marker,)) as proxy:
        settings["base_url"] = proxy.url
        with pytest.raises(APIError) as failure:  # 2 of 12 is past the default 5%
            _judge_stage(responses_file, tmp_path / "scores.parquet", settings)
        line = str(failure.value)
        assert f"rejected 2 of {n} requests" in line and f"2 x HTTP 400: {CONTENT_FILTER}" in line, line
        assert key not in line and "\n" not in line
        assert not (tmp_path / "scores.parquet").exists()
        assert proxy.faults["reject"] == 2 and sum(proxy.forwarded.values()) == n - 2  # each asked once
        assert len(list(cache.rglob("*.json"))) == n - 2 and len(list(cache.rglob("*.rejected"))) == 2

        proxy.reset_counts()
        with caplog.at_level("WARNING", logger="assistant_axis"):
            scores = _judge_stage(responses_file, tmp_path / "scores.parquet", {**settings, "max_rejected_share": 0.2})
        assert not proxy.calls  # the answers and the rejections, all from the cache
        rejected = scores[scores["score"].isna()]
        assert list(rejected.index) == [2, 7] and scores.drop(index=[2, 7])["score"].notna().all()
        assert all(CONTENT_FILTER in raw for raw in rejected["raw"])
        assert f"rejected 2 of {n} requests" in caplog.text

        again = {**settings, "max_rejected_share": 0.2, "retry_rejected": True}
        _judge_stage(responses_file, tmp_path / "scores2.parquet", again)
        assert sum(proxy.calls.values()) == proxy.faults["reject"] == 2  # only the two, asked again


@pytest.mark.slow
def test_a_cut_body_is_retried_and_never_cached(tmp_path, llama_url, responses_file, key):
    """The server's answer cut off halfway (the connection drops mid-body): a fault, retried; the cache
    holds one whole answer per prompt, and every score is read."""
    cache = tmp_path / "cache"
    settings = _api(llama_url, "smollm2", cache=str(cache), scoring="logprobs", max_retries=8, backoff=0.05)
    with FaultProxy(llama_url, share=0.5, seed=3, kinds=("cut",)) as proxy:
        settings["base_url"] = proxy.url
        scores = _judge_stage(responses_file, tmp_path / "scores.parquet", settings)
    n = len(scores)
    assert proxy.faults["cut"] >= 3 and sum(proxy.forwarded.values()) == n + proxy.faults["cut"]
    answers = [json.loads(a.read_text()) for a in cache.rglob("*.json")]
    assert len(answers) == n and all(a["choices"][0]["logprobs"]["content"] for a in answers)
    assert scores["score"].notna().all()


@pytest.mark.slow
def test_the_cache_keeps_every_answer_of_a_killed_job(tmp_path, llama_url, responses_file, key):
    """kill -9 mid-job: every answer received before the kill is in the cache; the rerun asks for the rest."""
    import os
    import signal
    import subprocess
    import time

    cache = tmp_path / "cache"
    settings = _api(llama_url, "smollm2", cache=str(cache), scoring="logprobs", concurrency=1, requests_per_second=4.0)
    with FaultProxy(llama_url, share=0.0) as proxy:
        settings["base_url"] = proxy.url
        script = (
            "import json, sys\nfrom assistant_axis import stages\n"
            "stages.judge(sys.argv[1], sys.argv[2], role='pirate', description='A pirate.', "
            "template=sys.argv[3], backend='openai', settings=json.loads(sys.argv[4]))\n"
        )
        job = subprocess.Popen(
            [
                sys.executable,
                "-c",
                script,
                str(responses_file),
                str(tmp_path / "scores.parquet"),
                DEFAULT_TEMPLATE,
                json.dumps(settings),
            ],
            env={**os.environ},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 120
        while len(list(cache.rglob("*.json"))) < 3 and time.monotonic() < deadline and job.poll() is None:
            time.sleep(0.05)
        os.kill(job.pid, signal.SIGKILL)
        job.wait()
        kept = len(list(cache.rglob("*.json")))
        answered = sum(proxy.forwarded.values())
        n = len(pd.read_parquet(responses_file))
        assert 3 <= kept < n and kept >= answered - 1  # at most the one in flight was lost
        assert not (tmp_path / "scores.parquet").exists()

        proxy.reset_counts()
        scores = _judge_stage(responses_file, tmp_path / "scores.parquet", settings)
        assert sum(proxy.forwarded.values()) == n - kept and scores["score"].notna().all()


@pytest.mark.slow
def test_retries_with_backoff_get_every_score(tmp_path, llama_url, responses_file, key):
    settings = _api(
        llama_url, "smollm2", cache=None, scoring="logprobs", timeout=15.0, max_retries=8, backoff=0.05, concurrency=2
    )
    with FaultProxy(llama_url, share=0.3, seed=11, hang_seconds=20.0) as proxy:
        settings["base_url"] = proxy.url
        scores = _judge_stage(responses_file, tmp_path / "scores.parquet", settings)
        assert scores["score"].notna().all()
        n = len(scores)
        assert sum(proxy.forwarded.values()) == n  # each prompt reached the server exactly once
        assert sum(proxy.calls.values()) == n + sum(proxy.faults.values())


def test_retry_after_is_honoured(tmp_path, key):
    """A 429 with Retry-After: 1 delays the next attempt by at least a second, whatever the backoff."""
    import time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from threading import Thread

    seen: list[float] = []

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def do_POST(self):  # noqa: N802
            self.rfile.read(int(self.headers["Content-Length"]))
            seen.append(time.monotonic())
            if len(seen) == 1:
                body, status, extra = b'{"error": {"message": "busy"}}', 429, {"Retry-After": "1"}
            else:
                body = json.dumps(
                    {
                        "id": "x",
                        "object": "chat.completion",
                        "created": 0,
                        "model": "m",
                        "choices": [
                            {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "3"}}
                        ],
                    }
                ).encode()
                status, extra = 200, {}
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            for k, v in extra.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/v1"
        api = ChatAPI(APISettings(url, "m", KEY_ENV, cache=None, backoff=0.01))
        [outcome] = api.run([{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}])
    finally:
        server.shutdown()
    assert outcome.response is not None and outcome.attempts == 2
    assert seen[1] - seen[0] >= 1.0
    assert api.stats["retried"] == 1


def test_missing_key_is_one_line_naming_the_config_key(monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(InputError, match=f"judge.openai.api_key_env: environment variable {KEY_ENV} is not set"):
        OpenAIJudge({"base_url": "http://127.0.0.1:9/v1", "model": "m", "api_key_env": KEY_ENV})


def test_an_unreachable_judge_fails_the_stage_in_one_line(tmp_path, responses_file, key):
    """A judge pointed at a closed port: the stage exits 1 with one line, and writes no scores."""
    import subprocess

    settings = {
        "base_url": "http://127.0.0.1:9/v1",
        "model": "m",
        "api_key_env": KEY_ENV,
        "cache": None,
        "max_retries": 1,
        "backoff": 0.01,
        "timeout": 1,
    }
    script = (
        "import json, sys\nfrom assistant_axis import stages\nwith stages.logged(None):\n"
        "    stages.judge(sys.argv[1], sys.argv[2], role='pirate', description='A pirate.', "
        "template=sys.argv[3], backend='openai', settings=json.loads(sys.argv[4]))\n"
    )
    out = tmp_path / "scores.parquet"
    job = subprocess.run(
        [sys.executable, "-c", script, str(responses_file), str(out), DEFAULT_TEMPLATE, json.dumps(settings)],
        capture_output=True,
        text=True,
    )
    n = len(pd.read_parquet(responses_file))
    errors = [line for line in job.stderr.splitlines() if line.startswith("error:")]
    print(errors[0] if errors else job.stderr[-2000:])
    assert job.returncode == 1 and not out.exists()
    assert len(errors) == 1 and errors[0].startswith(
        f"error: http://127.0.0.1:9/v1: {n} of {n} requests failed after 1 retries ({n} APIConnectionError; first: "
    )


@pytest.mark.parametrize(
    "headers, seconds",
    [
        ({"retry-after": "3"}, 3.0),
        ({"retry-after": "0.5"}, 0.5),
        ({"retry-after-ms": "250", "retry-after": "9"}, 0.25),  # OpenAI's milliseconds win
        ({"retry-after": "Wed, 02 Dec 2026 10:00:07 GMT"}, 7.0),  # an HTTP date, 7 s after `now`
        ({"retry-after": "Wed, 02 Dec 2026 09:59:00 GMT"}, 0.0),  # already past
        ({"retry-after": "soon"}, None),
        ({}, None),
    ],
)
def test_retry_after_in_seconds_milliseconds_and_as_a_date(headers, seconds):
    import email.utils

    from assistant_axis.api import _retry_after

    now = email.utils.parsedate_to_datetime("Wed, 02 Dec 2026 10:00:00 GMT").timestamp()
    assert _retry_after(headers, now) == seconds


# ------------------------------------------------------------------------------------------- vLLM


def test_vllm_requests_are_built_from_config():
    settings = {"seed": 7, "vllm": {"tensor_parallel_size": 4, "gpu_memory_utilization": 0.85, "max_model_len": 4096}}
    args = vllm_engine_args("/models/qwen", settings["vllm"], "generate.vllm", "bfloat16", settings["seed"], False)
    assert args == {
        "model": "/models/qwen",
        "dtype": "bfloat16",
        "seed": 7,
        "trust_remote_code": False,
        "tensor_parallel_size": 4,
        "gpu_memory_utilization": 0.85,
        "max_model_len": 4096,
    }
    params = VLLMEngine.sampling_params(Sampling(0.7, 0.9, 512, 7), [11, 12])
    assert params == [
        {"n": 1, "temperature": 0.7, "top_p": 0.9, "max_tokens": 512, "seed": 11},
        {"n": 1, "temperature": 0.7, "top_p": 0.9, "max_tokens": 512, "seed": 12},
    ]
    with pytest.raises(InputError, match="generate.vllm.tensor_paralel_size: unknown vLLM setting"):
        vllm_engine_args("m", {"tensor_paralel_size": 2}, "generate.vllm", "auto")
    # Template options are the model's, for every stage: the old vLLM-only place says where they went.
    with pytest.raises(InputError, match="move them to model.chat_template_kwargs"):
        vllm_engine_args("m", {"chat_template_kwargs": {"enable_thinking": False}}, "generate.vllm", "auto")


def test_openai_generation_requests_carry_per_response_seeds():
    convs = [[{"role": "user", "content": "a"}], [{"role": "user", "content": "b"}]]
    requests = OpenAIEngine.requests(convs, Sampling(0.7, 0.9, 64, 1), [5, 6])
    assert [r["seed"] for r in requests] == [5, 6] and requests[1]["messages"] == convs[1]
    assert all(r["max_tokens"] == 64 and r["temperature"] == 0.7 for r in requests)
    assert all("chat_template_kwargs" not in r for r in requests)  # only sent when a config sets options


def test_vllm_missing_is_one_clear_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # what `import vllm` meets where it is not installed
    with pytest.raises(InputError, match=r"generate.backend: needs the vllm package: pip install '.\[vllm\]'"):
        VLLMEngine({"model": "m"}, None, "generate")._started("plain")


def test_vllm_jobs_ask_for_their_gpus_and_cores():
    """A vLLM job asks SLURM for its tensor-parallel GPUs and 2 + GPUs cores (vLLM's own processes)."""
    import yaml

    from assistant_axis.plan import Plan, validate_config

    config = yaml.safe_load((ROOT / "config/paper.yaml").read_text())
    config["judge"] = {"backend": "vllm", "vllm": {"model": "/models/judge", "tensor_parallel_size": 4}}
    validate_config(config, ROOT / "workflow/schemas/config.schema.yaml")
    plan = Plan.from_config(config, ROOT)
    assert plan.jobs.resources("generate")["gpu"] == 2 and plan.jobs.threads("generate", 2) == 4
    assert plan.jobs.resources("judge")["gpu"] == 4 and plan.jobs.threads("judge", 1) == 6
    assert "gpu" not in plan.jobs.resources("vectors") and plan.jobs.threads("vectors", 1) == 1
    config["judge"] = {"backend": "embedding"}
    validate_config(config, ROOT / "workflow/schemas/config.schema.yaml")
    plan = Plan.from_config(config, ROOT)
    assert "gpu" not in plan.jobs.resources("judge") and plan.jobs.threads("judge", 1) == 1


@pytest.mark.parametrize("section", ["generate", "judge"])
def test_a_misspelt_vllm_setting_stops_planning(section):
    import yaml

    from assistant_axis.plan import validate_config

    config = yaml.safe_load((ROOT / "config/config.yaml").read_text())
    config[section]["backend"] = "vllm"
    config[section]["vllm"] = {"tensor_paralel_size": 2}
    with pytest.raises(InputError, match=rf"config.yaml: {section}.vllm.tensor_paralel_size: unknown key"):
        validate_config(config, ROOT / "workflow/schemas/config.schema.yaml", ["config/config.yaml"])


def test_the_schema_lists_the_engine_settings_the_backend_passes():
    import yaml

    from assistant_axis.engines.vllm.engine import VLLM_ENGINE_KEYS
    from assistant_axis.judge import VLLMJudge

    schema = yaml.safe_load((ROOT / "workflow/schemas/config.schema.yaml").read_text())
    generate = set(schema["properties"]["generate"]["properties"]["vllm"]["properties"])
    judge = set(schema["properties"]["judge"]["properties"]["vllm"]["properties"])
    assert generate == set(VLLM_ENGINE_KEYS)
    assert judge == {*VLLM_ENGINE_KEYS, *VLLMJudge.SETTINGS}
