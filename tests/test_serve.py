"""`assistant-axis serve` on 127.0.0.1, called with the `openai` client: plain and capped.

The capped server is also steered away from the Assistant (-40 at layers 8-25, as in
test_steering.py), so its replies would fall below the capping floor without the cap; the in-process
test below shows that they do, and the server's `projection` field shows that capping holds them at
or above `tau` on every capped layer. The workflow's own `OpenAIJudge` is pointed at the plain server.
"""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from assistant_axis.axis import load_axis
from assistant_axis.engines import Sampling

from serve_helpers import CAPPED, MODEL, capping_config, tiny_paths
from servers import _serve, free_port

STEER = ["--steer", "-40", "--steer-layers", *map(str, range(8, 26))]
SERVER_KEY = "axis-serve-key-7f3e91c2d4"
PIRATE = [
    {"role": "system", "content": "You are a pirate. Always speak like a pirate."},
    {"role": "user", "content": "What do you like to do on a day off?"},
]


@pytest.fixture(scope="module")
def capping_file(tiny_run, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("capping") / "late-p25.safetensors"
    capping_config(tiny_run).save(path, percentile=25)
    return path


def _server(tiny_run: Path, log: Path, *extra: str, env: dict | None = None):
    model_dir, axis = tiny_paths(tiny_run)
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "assistant_axis.cli",
        "serve",
        "--model",
        str(model_dir),
        "--axis",
        str(axis),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--max-tokens",
        "24",
        *extra,
    ]
    return _serve(command, f"http://127.0.0.1:{port}/health", log, env), f"http://127.0.0.1:{port}/v1"


@pytest.fixture(scope="module")
def plain_url(tiny_run, tmp_path_factory):
    server, url = _server(tiny_run, tmp_path_factory.mktemp("serve") / "plain.log")
    with server:
        yield url


@pytest.fixture(scope="module")
def capped_url(tiny_run, tmp_path_factory, capping_file):
    server, url = _server(tiny_run, tmp_path_factory.mktemp("serve") / "capped.log", "--cap", str(capping_file), *STEER)
    with server:
        yield url


@pytest.fixture(scope="module")
def keyed(tiny_run, tmp_path_factory, capping_file):
    """A capped server whose API needs a key, given in the environment (out of the process list)."""
    log = tmp_path_factory.mktemp("serve") / "keyed.log"
    server, url = _server(tiny_run, log, "--cap", str(capping_file), env={"AXIS_API_KEY": SERVER_KEY})
    with server:
        yield url, log


def _client(url: str, key: str = "no-key"):
    from openai import OpenAI

    return OpenAI(base_url=url, api_key=key, timeout=120, max_retries=0)


def _check_logprobs(choice, completion_tokens: int, top: int) -> None:
    content = choice.logprobs.content
    assert isinstance(content, list) and len(content) == completion_tokens > 0
    for entry in content:
        assert entry.logprob <= 0 and isinstance(entry.token, str) and entry.bytes == list(entry.token.encode())
        assert len(entry.top_logprobs) == top
        ranked = [t.logprob for t in entry.top_logprobs]
        assert ranked == sorted(ranked, reverse=True) and all(lp <= 0 for lp in ranked)
        assert entry.logprob <= ranked[0] + 1e-6


def test_plain_server_answers_the_openai_client_with_logprobs(plain_url, bundled):
    client = _client(plain_url)
    assert [m.id for m in client.models.list().data] == [MODEL]
    completion = client.chat.completions.create(
        model=MODEL, messages=PIRATE, max_tokens=12, temperature=0, logprobs=True, top_logprobs=3
    )
    assert completion.object == "chat.completion" and completion.model == MODEL and completion.id
    choice = completion.choices[0]
    assert choice.index == 0 and choice.message.role == "assistant" and choice.message.content.strip()
    assert choice.finish_reason in ("stop", "length")
    assert completion.usage.completion_tokens <= 12 and completion.usage.prompt_tokens > 0
    _check_logprobs(choice, completion.usage.completion_tokens, 3)
    # Greedy: every generated token is the most likely one.
    for entry in choice.logprobs.content:
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob, abs=1e-6)
    projection = completion.model_extra["projection"]
    assert projection["layers"] == [15] and projection["tau"] is None
    assert isinstance(projection["values"][0], float)
    # Without `logprobs` none are returned; the same greedy request gives the same reply.
    again = client.chat.completions.create(model=MODEL, messages=PIRATE, max_tokens=12, temperature=0)
    assert again.choices[0].logprobs is None
    assert again.choices[0].message.content == choice.message.content
    # The reference: transformers' own greedy generation from the tokenizer's own chat template.
    model, tokenizer = bundled
    ids = tokenizer.apply_chat_template(PIRATE, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.inference_mode():
        out = model.generate(**ids, do_sample=False, max_new_tokens=12, pad_token_id=tokenizer.pad_token_id)
    expected = tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert choice.message.content.strip() == expected.strip()


def test_sampling_is_seeded(plain_url):
    client = _client(plain_url)
    ask = dict(model=MODEL, messages=PIRATE, max_tokens=8, temperature=1.0, top_p=0.95)
    first, second = (client.chat.completions.create(**ask, seed=7).choices[0].message.content for _ in range(2))
    assert first == second
    # And the seed is used: a server that ignored it would give one text for every seed (or vary without it).
    others = {client.chat.completions.create(**ask, seed=seed).choices[0].message.content for seed in (8, 9, 10)}
    assert len(others | {first}) >= 2, others


def test_unsupported_requests_get_a_400_naming_the_field(plain_url):
    import openai

    client = _client(plain_url)
    for extra, field in (
        ({"n": 17}, "n"),
        ({"stream": True, "n": 2}, "n"),
        ({"top_logprobs": 50, "logprobs": True}, "top_logprobs"),
        ({"extra_body": {"capping": "late-p25"}}, "capping"),  # the plain server has no capping loaded
    ):
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(model=MODEL, messages=PIRATE, max_tokens=4, **extra)
        assert caught.value.body["param"] == field and field in caught.value.body["message"]
    with pytest.raises(openai.BadRequestError, match="role"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "tool", "content": "x"}], max_tokens=4)


def test_streaming_gives_the_same_reply_and_n_gives_seeded_choices(plain_url):
    client = _client(plain_url)
    ask = dict(model=MODEL, messages=PIRATE, max_tokens=8, temperature=1.0, seed=11)
    plain = client.chat.completions.create(**ask).choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, **ask))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == plain
    assert chunks[-1].choices[0].finish_reason in ("stop", "length") and chunks[-1].usage.completion_tokens > 0
    assert chunks[-1].model_extra["projection"]["layers"] == [15]
    two = client.chat.completions.create(n=2, **ask)
    assert [c.message.content for c in two.choices][0] == plain  # choice i samples with seed + i
    assert (
        two.choices[1].message.content
        == client.chat.completions.create(**{**ask, "seed": 12}).choices[0].message.content
    )


def test_capped_replies_stay_at_or_above_tau(capped_url, tiny_run):
    config = capping_config(tiny_run)
    client = _client(capped_url)
    prompts = [PIRATE, [{"role": "user", "content": "Tell me about yourself."}]]
    for messages in prompts:
        for sampling in ({"temperature": 0}, {"temperature": 0.8, "seed": 3}):
            completion = client.chat.completions.create(
                model=MODEL, messages=messages, max_tokens=16, logprobs=True, top_logprobs=2, **sampling
            )
            choice = completion.choices[0]
            _check_logprobs(choice, completion.usage.completion_tokens, 2)
            projection = completion.model_extra["projection"]
            assert projection["layers"] == CAPPED
            assert projection["tau"] == pytest.approx(config.thresholds.tolist(), rel=1e-6)
            for value, tau in zip(projection["values"], projection["tau"], strict=True):
                assert value >= tau - 1e-4 * abs(tau), (projection, choice.message.content)


def test_the_workflow_openai_judge_talks_to_the_server(plain_url):
    from assistant_axis.judge import DEFAULT_TEMPLATE, JudgeItem, OpenAIJudge, render_prompt

    judge = OpenAIJudge(
        {
            "base_url": plain_url,
            "model": MODEL,
            "api_key_env": None,
            "cache": None,
            "scoring": "logprobs",
            "max_retries": 0,
        }
    )
    items = [
        JudgeItem("pirate", "A sea-faring pirate.", "How are you?", "Arr, I be fine, matey!"),
        JudgeItem("pirate", "A sea-faring pirate.", "How are you?", "As an AI, I have no feelings."),
    ]
    verdicts = judge.score_prompts([render_prompt(DEFAULT_TEMPLATE, item) for item in items])
    assert len(verdicts) == 2
    for verdict in verdicts:  # the 135M model is no judge: only the plumbing is tested
        assert verdict.score in (0, 1, 2, 3) and 0 <= verdict.expected_score <= 3, verdict.raw
        assert "digit_mass" in verdict.raw


def test_session_projection_is_post_cap_and_matches_project(bundled, tiny_run):
    """In process: steering alone drops a reply below tau; with the cap it stays at or above tau."""
    from assistant_axis.axis import unit_rows
    from assistant_axis.engines.transformers import TransformersSession
    from assistant_axis.steer import Steering
    from assistant_axis.templates import ChatTemplate

    model, tokenizer = bundled
    axis, layers, _ = load_axis(tiny_paths(tiny_run)[1])
    config = capping_config(tiny_run)
    steering = Steering.along(axis[8:26], list(range(8, 26)), -40.0)
    greedy = Sampling(temperature=0, max_tokens=16)
    units, template = unit_rows(axis, layers, CAPPED, 576), ChatTemplate(tokenizer)
    steered = TransformersSession(model, template, units, CAPPED, {}, steering, greedy)
    capped = TransformersSession(model, template, units, CAPPED, {"late-p25": config}, steering, greedy)
    low = steered.send(PIRATE[1]["content"])
    high = capped.send(PIRATE[1]["content"])
    assert any(v < t for v, t in zip(low.projection, config.thresholds.tolist(), strict=True)), low
    assert all(v >= t - 1e-4 * abs(t) for v, t in zip(high.projection, high.tau, strict=True)), high
    # The reference, written here from the formulas with plain forward hooks (not the package's): the reply's
    # tokens run through the model steered at 8-25 (and, capped, then floored at tau at the capped layers),
    # their block outputs averaged over the reply and projected on the unit axis.
    for session, reply, floors in ((steered, low, False), (capped, high, True)):
        expected = _by_hand(model, tokenizer, session.messages, axis, config, floors)
        assert reply.projection == pytest.approx(expected, rel=1e-4, abs=1e-3)


def _by_hand(model, tokenizer, messages, axis, config, floors: bool) -> list[float]:
    reply_ids = tokenizer(messages[-1]["content"], add_special_tokens=False)["input_ids"]
    prefix = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True)["input_ids"]
    full = tokenizer.apply_chat_template(messages)["input_ids"]
    assert full[len(prefix) : len(prefix) + len(reply_ids)] == reply_ids
    blocks, seen, handles = model.model.layers, {}, []

    def hidden_of(output):
        return output[0] if isinstance(output, tuple) else output

    def replaced(output, hidden):
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    def steer_hook(row):
        return lambda _m, _a, out: replaced(out, hidden_of(out) + -40.0 * row / row.norm())

    def floor_hook(unit, tau):
        def hook(_m, _a, out):
            h = hidden_of(out)
            below = (h @ unit - tau).clamp(max=0)
            return replaced(out, h - below[..., None] * unit)

        return hook

    def record(layer):
        return lambda _m, _a, out: seen.__setitem__(layer, hidden_of(out)[0].clone())

    try:
        for layer in range(8, 26):
            handles.append(blocks[layer].register_forward_hook(steer_hook(axis[layer].float())))  # row i: block i
        for k, layer in enumerate(CAPPED):
            if floors:
                unit = config.vectors[k] / config.vectors[k].norm()
                handles.append(blocks[layer].register_forward_hook(floor_hook(unit, float(config.thresholds[k]))))
            handles.append(blocks[layer].register_forward_hook(record(layer)))
        with torch.inference_mode():
            model(input_ids=torch.tensor([full]))
    finally:
        for handle in handles:
            handle.remove()
    span = slice(len(prefix), len(prefix) + len(reply_ids))
    units = {layer: axis[layer].float() / axis[layer].float().norm() for layer in CAPPED}
    return [float(seen[layer][span].mean(0) @ units[layer]) for layer in CAPPED]


def _get(url: str, key: str | None = None) -> tuple[int, bytes]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _post(url: str, body: dict, key: str | None = None) -> tuple[int, bytes]:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    request = urllib.request.Request(f"{url}/chat/completions", json.dumps(body).encode(), headers)
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _metrics(base: str) -> dict[tuple[str, tuple], float]:
    """Every sample of the server's /metrics, read with prometheus_client's own parser."""
    from prometheus_client.parser import text_string_to_metric_families

    status, body = _get(f"{base}/metrics", SERVER_KEY)
    assert status == 200
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }


def test_an_api_key_guards_the_api_and_metrics_but_not_health(keyed):
    """No key or a wrong one: 401 in OpenAI's format on every API route and /metrics; the key: 200;
    /health open; neither key appears in the server's log or in an answer."""
    import openai

    url, log = keyed
    base = url.removesuffix("/v1")
    wrong = "axis-wrong-key-0000"
    for key in (None, wrong):
        for route in ("/v1/models", "/metrics"):
            status, body = _get(base + route, key)
            error = json.loads(body)["error"]
            assert status == 401 and error["code"] == "invalid_api_key" and error["type"], (route, body)
            assert wrong.encode() not in body
        status, body = _post(url, {"model": MODEL, "messages": PIRATE, "max_tokens": 4}, key)
        assert status == 401 and json.loads(body)["error"]["code"] == "invalid_api_key" and wrong.encode() not in body
    with pytest.raises(openai.AuthenticationError) as refused:  # as OpenAI's own client sees it
        _client(url, wrong).chat.completions.create(model=MODEL, messages=PIRATE, max_tokens=4)
    assert refused.value.status_code == 401 and refused.value.code == "invalid_api_key"
    assert _get(base + "/v1/models", SERVER_KEY)[0] == 200 and _get(base + "/metrics", SERVER_KEY)[0] == 200
    completion = _client(url, SERVER_KEY).chat.completions.create(model=MODEL, messages=PIRATE, max_tokens=4)
    assert completion.choices[0].message.content
    assert _get(base + "/health")[0] == 200
    text = log.read_text()
    assert "GET /health" in text  # the log is written (uvicorn's access log)
    assert SERVER_KEY not in text and wrong not in text


def test_metrics_count_each_request_by_status_and_tokens_by_usage(keyed):
    """After N requests the request counter moved by exactly N, by status (200, 400, 401), and the token
    counters by the sums of the replies' usage; the streamed one timed its first token."""
    url, _ = keyed
    base = url.removesuffix("/v1")
    client = _client(url, SERVER_KEY)
    before = _metrics(base)
    prompt = completion = 0
    settings = set()
    for messages, n in ((PIRATE, 1), ([{"role": "user", "content": "Tell me about yourself."}], 2)):
        done = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, n=n, seed=1)
        prompt, completion = prompt + done.usage.prompt_tokens, completion + done.usage.completion_tokens
        settings |= {choice.model_extra["projection"]["capping"] for choice in done.choices}
    stream = client.chat.completions.create(model=MODEL, messages=PIRATE, max_tokens=12, stream=True)
    chunks = list(stream)
    usage = next(c for c in chunks if c.usage is not None).usage
    prompt, completion = prompt + usage.prompt_tokens, completion + usage.completion_tokens
    assert _get(f"{base}/v1/models", "wrong")[0] == 401  # not a chat completion: not counted
    assert _post(url, {"model": MODEL, "messages": PIRATE, "temperature": 9}, SERVER_KEY)[0] == 400
    assert _post(url, {"model": MODEL, "messages": PIRATE}, "wrong")[0] == 401
    after = _metrics(base)

    def moved(name: str, **labels) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert moved("axis_requests_total", status="200") == 3
    assert moved("axis_requests_total", status="400") == 1
    assert moved("axis_requests_total", status="401") == 1
    assert moved("axis_prompt_tokens_total") == prompt
    assert moved("axis_completion_tokens_total") == completion
    assert moved("axis_time_to_first_token_seconds_count") == 1
    assert moved("axis_time_per_output_token_seconds_count") == 4  # 1 + 2 choices + the stream
    assert after[("axis_requests_active", ())] == 0
    # The transformers engine does not measure its cap's firing while serving: no share to report.
    assert settings == {"late-p25"} and not [k for k in after if k[0].startswith("axis_cap_") and k[1]]
