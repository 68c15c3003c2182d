"""`assistant-axis serve --engine vllm` on 127.0.0.1 (vLLM's CPU build here), called concurrently.

One server serves the whole module, with the tiny run's late-p25 capping config loaded and steering
away from the Assistant (-40 at layers 8-25, as test_serve.py), so capped replies would fall below tau
without the cap. The reference for the engine's numbers is the transformers `ChatSession`, in process.
"""

from __future__ import annotations

import json
import sys
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import pytest
from test_vllm import _need_vllm

from assistant_axis.axis import load_axis
from assistant_axis.backends import Sampling

from serve_helpers import CAPPED, MODEL, capping_config, tiny_paths
from servers import _serve, free_port

STEER = ["--steer", "-40", "--steer-layers", *map(str, range(8, 26))]
ENGINE = {"kv_cache_memory_bytes": 256 * 2**20, "max_model_len": 2048}
QUESTIONS = [
    "What do you like to do on a day off?",
    "Tell me about yourself.",
    "Who are you, really?",
    "Describe your favourite place.",
]


@pytest.fixture(scope="module")
def capping_file(tiny_run, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("capping") / "late-p25.safetensors"
    capping_config(tiny_run).save(path, percentile=25)
    return path


@pytest.fixture(scope="module")
def url(tiny_run, tmp_path_factory, capping_file):
    _need_vllm()
    model_dir, axis = tiny_paths(tiny_run)
    port = free_port()
    command = [
        *(sys.executable, "-m", "assistant_axis.cli", "serve", "--engine", "vllm"),
        *("--model", str(model_dir), "--axis", str(axis), "--cap", str(capping_file), *STEER),
        *("--engine-args", json.dumps(ENGINE), "--port", str(port), "--max-tokens", "24"),
    ]
    log = tmp_path_factory.mktemp("serve") / "vllm.log"
    with _serve(command, f"http://127.0.0.1:{port}/health", log):
        yield f"http://127.0.0.1:{port}/v1"


def _client(url: str):
    from openai import OpenAI

    return OpenAI(base_url=url, api_key="no-key", timeout=300, max_retries=0)


def _messages(i: int) -> list[dict]:
    return [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]


def _post(url: str, body: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(f"{url}/chat/completions", body, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _streamed(client, **ask) -> tuple[str, dict]:
    """The text of a streamed reply and its last chunk's extra fields (usage, projection)."""
    text, last = "", None
    for chunk in client.chat.completions.create(stream=True, **ask):
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
        last = chunk
    assert last.choices[0].finish_reason in ("stop", "length")
    return text, last.model_extra


def test_32_concurrent_requests_all_arrive_and_bad_ones_get_a_400(url, tiny_run):
    tau = capping_config(tiny_run).thresholds.tolist()
    client = _client(url)

    def good(i: int):
        ask = dict(model=MODEL, messages=_messages(i), max_tokens=8 + i % 5 * 4, temperature=0.8, seed=100 + i)
        ask["extra_body"] = {"capping": "none" if i % 2 else "late-p25"}
        if i % 4 == 0:
            return "stream", i, _streamed(client, **ask)
        completion = client.chat.completions.create(**ask)
        return "plain", i, (completion.choices[0].message.content, completion.model_extra)

    bad = [
        (b'{"messages": [', 400, "body"),
        (json.dumps({"messages": _messages(0), "capping": "late-p99"}).encode(), 400, "capping"),
        (json.dumps({"messages": _messages(0), "max_tokens": 100_000}).encode(), 400, "max_tokens"),
    ]
    with ThreadPoolExecutor(40) as pool:
        answers = [pool.submit(good, i) for i in range(32)]
        refusals = [pool.submit(_post, url, body) for body, _, _ in bad]
        results = [a.result() for a in answers]
        for (_, status, field), refusal in zip(bad, refusals, strict=True):
            code, body = refusal.result()
            assert code == status and body["error"]["param"] == field, body
            assert body["error"]["message"]
    assert len(results) == 32
    for kind, i, (text, extra) in results:
        assert text.strip(), (kind, i)
        projection = extra["projection"]
        assert projection["layers"] == CAPPED and projection["capping"] == ("none" if i % 2 else "late-p25")
        if i % 2 == 0:  # capped: every layer's mean at or above tau, and the cap fired
            assert all(v >= t - 1e-3 for v, t in zip(projection["values"], tau, strict=True)), projection
            assert max(projection["fired"]) > 0
        else:
            assert set(projection["fired"]) == {0.0}
    # Streaming and non-streaming give the same text for the same seed, also alone.
    for kind, i, (text, _) in results:
        if kind == "stream":
            ask = dict(model=MODEL, messages=_messages(i), max_tokens=8 + i % 5 * 4, temperature=0.8, seed=100 + i)
            ask["extra_body"] = {"capping": "none" if i % 2 else "late-p25"}
            assert client.chat.completions.create(**ask).choices[0].message.content == text


def test_n_choices_and_logprobs(url):
    client = _client(url)
    completion = client.chat.completions.create(
        model=MODEL, messages=_messages(1), max_tokens=10, temperature=0.9, seed=5, n=3, logprobs=True, top_logprobs=2
    )
    assert [c.index for c in completion.choices] == [0, 1, 2]
    texts = [c.message.content for c in completion.choices]
    assert len(set(texts)) >= 2  # choice i samples with seed + i
    alone = client.chat.completions.create(model=MODEL, messages=_messages(1), max_tokens=10, temperature=0.9, seed=6)
    assert alone.choices[0].message.content == texts[1]
    for choice in completion.choices:
        for entry in choice.logprobs.content:
            ranked = [t.logprob for t in entry.top_logprobs]
            assert len(ranked) == 2 and ranked == sorted(ranked, reverse=True) and entry.logprob <= ranked[0] + 1e-5


def test_greedy_replies_and_telemetry_equal_the_transformers_session(url, bundled, tiny_run):
    """The same steered (and capped) greedy requests in process through transformers: the same tokens and,
    over the tokens vLLM measures (the fed-back ones: all but the last generated), the same projections."""
    import torch

    from assistant_axis.activations import mean_activations
    from assistant_axis.axis import unit_rows
    from assistant_axis.chat import ChatSession
    from assistant_axis.steer import Steering

    model, tokenizer = bundled
    axis, layers, _ = load_axis(tiny_paths(tiny_run)[1])
    config = replace(capping_config(tiny_run), source="late-p25.safetensors")  # named as the server names it
    steering = Steering.along(axis[8:26], list(range(8, 26)), -40.0)
    greedy = Sampling(temperature=0, max_tokens=32)
    session = ChatSession(model, tokenizer, axis, layers, CAPPED, config, steering, greedy)
    units = unit_rows(axis, layers, CAPPED, 576)
    client = _client(url)
    same = []
    for i in range(3):
        for setting in ("none", "late-p25"):
            reference = session.complete(_messages(i), greedy, setting=setting)
            served = client.chat.completions.create(
                model=MODEL, messages=_messages(i), max_tokens=32, temperature=0, extra_body={"capping": setting}
            )
            same.append(served.choices[0].message.content == reference.text)
            if not same[-1]:
                continue
            prompt = session.template.ids(_messages(i), add_generation_prompt=True)
            ids = prompt + reference.token_ids
            fed_back = len(reference.token_ids) - (reference.finish_reason == "length")
            with session.hooks(setting):
                means = mean_activations(model, [ids], [(len(prompt), len(prompt) + fed_back)], CAPPED, progress=False)
            expected = torch.einsum("lh,lh->l", means[0], units).tolist()
            values = served.model_extra["projection"]["values"]
            assert values == pytest.approx(expected, rel=1e-3, abs=1e-2), (setting, i)
    # float32 on both sides: greedy paths may part only where two tokens are within rounding of each other
    print(f"greedy: {sum(same)}/{len(same)} replies the same text")
    assert sum(same) >= len(same) - 1, same
