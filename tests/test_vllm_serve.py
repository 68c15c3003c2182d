"""Capping inside vLLM (its CPU build here): the hooks in an in-process engine, and
`assistant-axis serve --engine vllm` / `chat --engine vllm` on 127.0.0.1, called concurrently.

One server serves the whole module, with the tiny run's late-p25 capping config loaded and steering
away from the Assistant (-40 at layers 8-25, as test_serve.py), so capped replies would fall below tau
without the cap. The reference for the engine's numbers is the transformers engine's session, in process.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_vllm import _conversations, _need_vllm
from test_vllm_activations import assert_means_close

from assistant_axis.activations import mean_activations
from assistant_axis.axis import load_axis
from assistant_axis.engines import Sampling
from assistant_axis.engines.vllm.hooks import EXTRA_ARGS_KEY, EngineHooks
from assistant_axis.interop import load_capping
from assistant_axis.models import find_blocks
from assistant_axis.steer import Steering
from assistant_axis.templates import ChatTemplate

from serve_helpers import CAPPED, MODEL, capping_config, tiny_paths
from servers import _serve, free_port

STEER = ["--steer", "-40", "--steer-layers", *map(str, range(8, 26))]
ENGINE = {"kv_cache_memory_bytes": 256 * 2**20, "max_model_len": 2048, "enforce_eager": True}
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


@pytest.fixture(scope="module")
def llm(inprocess_llm):
    """The session's in-process engine (conftest), for the interventions tests."""
    return inprocess_llm


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
    from assistant_axis.activations import mean_activations
    from assistant_axis.axis import unit_rows
    from assistant_axis.engines.transformers import TransformersSession
    from assistant_axis.steer import Steering
    from assistant_axis.templates import ChatTemplate

    model, tokenizer = bundled
    axis, layers, _ = load_axis(tiny_paths(tiny_run)[1])
    config = replace(capping_config(tiny_run), source="late-p25.safetensors")  # named as the server names it
    steering = Steering.along(axis[8:26], list(range(8, 26)), -40.0)
    greedy = Sampling(temperature=0, max_tokens=32)
    units = unit_rows(axis, layers, CAPPED, 576)
    session = TransformersSession(model, ChatTemplate(tokenizer), units, CAPPED, {"late-p25": config}, steering, greedy)
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


def test_chat_on_the_vllm_engine_keeps_the_conversation_and_shows_the_capped_projection(tiny_run, capping_file):
    import subprocess

    model_dir, axis = tiny_paths(tiny_run)
    command = [
        *(sys.executable, "-m", "assistant_axis.cli", "chat", "--engine", "vllm", "--engine-args", json.dumps(ENGINE)),
        *("--model", str(model_dir), "--axis", str(axis), "--cap", str(capping_file), *STEER),
        *("--temperature", "0", "--max-tokens", "12"),
    ]
    stdin = "/system You are a pirate.\nWho are you?\nAnd your ship?\n/quit\n"
    result = subprocess.run(command, input=stdin, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout.splitlines()
    assert "capped at layers 21 22 23 24 25" in result.stdout and "(new conversation; system prompt set)" in out
    replies = [line for line in out if line.startswith("assistant> ")]
    projections = [line for line in out if line.startswith("[projection L21 ")]
    assert len(replies) == 2 and len(projections) == 2, result.stdout
    assert all("(tau " in p and " !)" not in p for p in projections), projections  # steered down, capped back up


# ---------------------------------------------------------------------------------- interventions in vLLM


@pytest.fixture(scope="module")
def capped_setting(tiny_run):
    """The tiny run's axis, and its late-p25 capping config (unit vectors), as the server loads them."""
    from assistant_axis.axis import load_axis, unit_rows

    results = tiny_run / "results/smollm2-135m-instruct"
    axis, axis_layers, _ = load_axis(results / "axis.safetensors")
    capping = load_capping(results / "capping/late-p25.safetensors").normalized()
    return unit_rows(axis, axis_layers, capping.layers, 576), capping


def _stream_recorder(layers, store):
    """Forward hooks keeping each layer's residual stream (hidden + residual) over every step's real rows
    (the worker's half of the EngineHooks says, in its `step`, how many rows are real)."""

    def install(worker):
        blocks = find_blocks(worker.model_runner.get_model())

        def hook_for(layer):
            def hook(_m, _a, output):
                rows = worker.axis_ops.step_rows
                if rows:
                    hidden, residual = output
                    store.setdefault(layer, []).append((hidden + residual)[:rows].detach().clone())

            return hook

        return [blocks[layer].register_forward_hook(hook_for(layer)) for layer in layers]

    return install


def test_vllm_cap_floors_exactly_what_is_below_tau_and_nothing_else(llm, capped_setting):
    units, capping = capped_setting
    before, after, ref, handles = {}, {}, {}, []
    try:
        # Registered before the hooks, a recorder sees the block's own output; registered after, the capped one.
        handles += llm.collective_rpc(_stream_recorder(capping.layers, before))[0]
        ref["hooks"] = EngineHooks(llm, units, capping.layers, {"cap": [capping]})
        handles += llm.collective_rpc(_stream_recorder(capping.layers, after))[0]
        params = [ref["hooks"].sampling_params("cap", f"x{i}", temperature=0, max_tokens=16) for i in range(4)]
        llm.chat(_conversations(4), params, use_tqdm=False)
    finally:
        for handle in handles:
            handle.remove()
        if "hooks" in ref:
            ref["hooks"].remove()
    n_capped = n_kept = 0
    for k, layer in enumerate(capping.layers):
        v, tau = capping.vectors[k], float(capping.thresholds[k])
        pre, post = torch.cat(before[layer]), torch.cat(after[layer])
        assert pre.shape == post.shape and len(pre) > 4 * 16
        proj, proj_post = pre @ v, post @ v
        above = proj >= tau
        assert torch.equal(post[above], pre[above])  # untouched, bit for bit
        below = ~above
        n_capped, n_kept = n_capped + int(below.sum()), n_kept + int(above.sum())
        # float32 rounding of a dot product grows with the row's norm (the first token's is in the thousands)
        slack = 1e-6 * pre.norm(dim=-1) + 1e-4
        assert bool((proj_post >= tau - slack).all())
        assert bool(((proj_post[below] - tau).abs() <= slack[below]).all())
        orth_pre = pre[below] - (pre[below] @ v)[:, None] * v
        orth_post = post[below] - (post[below] @ v)[:, None] * v
        torch.testing.assert_close(orth_post, orth_pre, rtol=1e-5, atol=1e-4 * float(pre.norm(dim=-1).max()))
    assert n_capped > 0 and n_kept > 0


def test_vllm_telemetry_of_a_request_does_not_depend_on_its_batch(llm, capped_setting):
    """8 requests of different lengths, capped and not, in one batch: each one's tokens and telemetry are
    those of the same request served alone."""
    units, capping = capped_setting
    hooks = EngineHooks(llm, units, capping.layers, {"none": [], "late-p25": [capping]})
    try:
        convs = _conversations(8)
        settings = ["late-p25" if i % 2 else "none" for i in range(8)]
        lengths = [8 + 5 * i for i in range(8)]

        def params(i, key):
            return hooks.sampling_params(settings[i], key, temperature=0, max_tokens=lengths[i])

        together = llm.chat(convs, [params(i, f"b{i}") for i in range(8)], use_tqdm=False)
        batched = [hooks.pop(f"b{i}") for i in range(8)]
        for i in range(8):
            (alone,) = llm.chat([convs[i]], [params(i, f"a{i}")], use_tqdm=False)
            single = hooks.pop(f"a{i}")
            assert list(alone.outputs[0].token_ids) == list(together[i].outputs[0].token_ids)
            assert batched[i].tokens == single.tokens == len(alone.outputs[0].token_ids) - 1
            torch.testing.assert_close(
                torch.tensor(batched[i].projection), torch.tensor(single.projection), rtol=1e-4, atol=1e-3
            )
            assert batched[i].fired == single.fired
            if settings[i] == "none":
                assert set(single.fired) == {0.0}
        capped = [t for t, s in zip(batched, settings, strict=True) if s != "none"]
        assert all(0 < max(t.fired) <= 1 for t in capped)
        # The floor holds on average too: no capped layer's mean projection is below its tau.
        taus = capping.thresholds.tolist()
        assert all(p >= tau - 1e-3 for t in capped for p, tau in zip(t.projection, taus, strict=True))
    finally:
        hooks.remove()


@pytest.fixture(scope="module")
def vllm_stages(tiny_run, tmp_path_factory) -> Path:
    """A copy of the tiny run with evaluate.backend: vllm: evaluate and drift (which runs in the evaluate
    stage's engine) run again, nothing else, each in its own vLLM engine."""
    import shutil

    import yaml

    from workflow_helpers import copy_run, planned_jobs, snakemake

    _need_vllm()
    work = tmp_path_factory.mktemp("vllm-stages") / "work"
    copy_run(tiny_run, work)
    root = Path(__file__).resolve().parents[1]
    shutil.copy(root / "Snakefile", work / "Snakefile")  # the workflow as it is (a reused tiny run may be older)
    shutil.copytree(
        root / "workflow", work / "workflow", dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__")
    )
    config_file = work / "config/config.yaml"
    config = yaml.safe_load(config_file.read_text())
    config.setdefault("evaluate", {}).update({"backend": "vllm", "vllm": ENGINE})
    config_file.write_text(yaml.safe_dump(config, sort_keys=False))
    targets = [f"results/smollm2-135m-instruct/{name}.parquet" for name in ("evaluation/responses", "drift/summary")]
    # What the config change reruns (a reused tiny run's scripts may be older: their code is not the question).
    triggers = ["--rerun-triggers", "mtime", "params", "input", "software-env"]
    assert {job[0] for job in planned_jobs(work, *targets, *triggers)} == {"evaluate", "drift"}
    snakemake(work, *targets, *triggers)
    return work


def test_evaluate_stage_runs_every_setting_in_one_vllm_engine(tiny_run, vllm_stages):
    """evaluate.backend: vllm: its greedy replies are the transformers evaluation's, setting by setting."""
    import pandas as pd

    target = "results/smollm2-135m-instruct/evaluation/responses.parquet"
    ours = pd.read_parquet(vllm_stages / target).set_index(["setting", "id"]).sort_index()
    reference = pd.read_parquet(tiny_run / target).set_index(["setting", "id"]).sort_index()
    assert list(ours.index) == list(reference.index) and tuple(ours.columns) == tuple(reference.columns)
    same = ours["response"] == reference["response"]
    print(f"evaluate in vLLM: {int(same.sum())}/{len(same)} replies as with transformers")
    assert same.mean() >= 0.9, ours.loc[~same, "response"]
    checked = same & reference["correct"].notna()
    assert (ours.loc[checked, "correct"] == reference.loc[checked, "correct"]).all()
    # The cap's firing share from the engine's telemetry (the fed-back tokens) and from the transformers
    # evaluation's second pass (the reply's tokens) measure the same thing, up to the last token of a cut reply.
    fired, fired_reference = ours.loc["late-p25", "fired"], reference.loc["late-p25", "fired"]
    assert fired.between(0, 1).all() and ours.loc["uncapped", "fired"].isna().all()
    assert abs(fired.mean() - fired_reference.mean()) < 0.1, (fired.mean(), fired_reference.mean())
    assert "settings in vllm" in (vllm_stages / "logs/smollm2-135m-instruct/evaluate.log").read_text()


def _first_divergence(ours: list[dict], reference: list[dict]) -> str | None:
    for turn, (a, b) in enumerate(zip(ours, reference, strict=True)):
        if a["content"] != b["content"]:
            common = next((k for k, (x, y) in enumerate(zip(a["content"], b["content"], strict=False)) if x != y), None)
            return f"turn {turn} ({a['role']}), character {common if common is not None else 'end'}"
    return None


def test_drift_runs_in_vllm_and_projects_the_transformers_transcripts_alike(tiny_run, vllm_stages, bundled, llm):
    """Drift in vLLM (evaluate.backend: vllm): its greedy transcripts are the transformers run's up to the
    first divergence (reported), and, teacher-forced, the transformers run's transcripts fed through a vLLM
    session give every turn's projection within 1e-4 of the activation's norm of the transformers run's."""
    import pandas as pd

    from assistant_axis.activations import mean_activations
    from assistant_axis.axis import load_axis, unit_rows
    from assistant_axis.drift import transcript
    from assistant_axis.engines.transformers import TransformersSession
    from assistant_axis.engines.vllm import VLLMEngine
    from assistant_axis.templates import ChatTemplate

    results = "results/smollm2-135m-instruct/drift"
    said = {run: pd.read_parquet(root / results / "transcripts.parquet") for run, root in
            (("vllm", vllm_stages), ("transformers", tiny_run))}  # fmt: skip
    reference = pd.read_parquet(tiny_run / results / "trajectories.parquet")
    keys = sorted(set(zip(said["transformers"]["setting"], said["transformers"]["scenario"], strict=True)))
    assert keys == sorted(set(zip(said["vllm"]["setting"], said["vllm"]["scenario"], strict=True)))
    for setting, scenario in keys:
        ours, theirs = (transcript(said[run], setting, scenario) for run in ("vllm", "transformers"))
        print(f"drift {setting} {scenario}: first divergence {_first_divergence(ours, theirs)}")
    ours = pd.read_parquet(vllm_stages / results / "trajectories.parquet")
    assert ours["projection"].notna().all() and len(ours) == len(reference)

    model, tokenizer = bundled
    axis, axis_layers, _ = load_axis(tiny_run / "results/smollm2-135m-instruct/axis.safetensors")
    capping = load_capping(tiny_run / "results/smollm2-135m-instruct/capping/late-p25.safetensors")
    layers = sorted(reference["layer"].unique().tolist())
    units = unit_rows(axis, axis_layers, layers, 576)
    template = ChatTemplate(tokenizer)
    session = VLLMEngine({}, template, llm=llm, progress=False).session(units, layers, {"late-p25": capping})
    hooks = TransformersSession(model, template, units, layers, {"late-p25": capping})
    worst = 0.0
    try:
        for setting, scenario in keys:
            messages = transcript(said["transformers"], setting, scenario)
            name = "none" if setting == "uncapped" else setting
            got = session.conversation_projections(messages, name)
            want = reference[(reference["setting"] == setting) & (reference["scenario"] == scenario)]
            assert got[["turn", "role", "layer"]].values.tolist() == want[["turn", "role", "layer"]].values.tolist()
            with hooks.hooks(name):  # each turn's mean activation under the same setting: its norm
                spans = [template.turn_span(messages[:i], m) for i, m in enumerate(messages)]
                acts = mean_activations(model, [s[0] for s in spans], [s[1:] for s in spans], layers, progress=False)
            norms = acts.norm(dim=-1).flatten().tolist()
            for a, b, norm in zip(got["projection"], want["projection"], norms, strict=True):
                assert abs(a - b) <= 1e-4 * norm, (setting, scenario, a, b, norm)
                worst = max(worst, abs(a - b) / norm)
    finally:
        session.close()
    print(f"drift teacher-forced in vLLM: largest |difference| / norm {worst:.2e} over {len(reference)} projections")


def test_the_vllm_servers_metrics_count_the_caps_firing_per_setting(url):
    """The vLLM engine measures its cap's firing while serving: /metrics counts each capped reply's tokens
    under its setting, and how many the cap lifted (its `fired` share over the capped layers times its
    tokens); uncapped replies count nowhere there."""
    from prometheus_client.parser import text_string_to_metric_families

    def samples() -> dict:
        with urllib.request.urlopen(url.removesuffix("/v1") + "/metrics", timeout=30) as response:
            text = response.read().decode()
        return {
            (s.name, tuple(s.labels.items())): s.value for f in text_string_to_metric_families(text) for s in f.samples
        }

    before, client = samples(), _client(url)
    tokens = fired = 0.0
    for i, setting in enumerate(("late-p25", "none", "late-p25")):
        ask = dict(model=MODEL, messages=_messages(i), max_tokens=16, temperature=0, extra_body={"capping": setting})
        done = client.chat.completions.create(**ask)
        if setting != "none":
            shares = [f for f in done.model_extra["projection"]["fired"] if f is not None]
            tokens += done.usage.completion_tokens
            fired += sum(shares) / len(shares) * done.usage.completion_tokens
    after = samples()
    key = (("setting", "late-p25"),)
    assert after[("axis_cap_tokens_total", key)] - before.get(("axis_cap_tokens_total", key), 0) == tokens > 0
    moved = after[("axis_cap_fired_tokens_total", key)] - before.get(("axis_cap_fired_tokens_total", key), 0)
    assert moved == pytest.approx(fired, rel=1e-6, abs=1e-6)
    assert 0 <= after[("axis_cap_fired_share", key)] <= 1
    assert not [k for k in after if k[0].startswith("axis_cap_") and ("setting", "none") in k[1]]


def test_the_drift_page_plots_the_vllm_engines_replies_and_where_its_cap_fired(url, tiny_run, capping_file, tmp_path):
    """The drift page on the vLLM server (no API key): two streamed turns under the cap plot what `assistant-axis
    project` computes from the saved transcript under the same setting (the cap and the steering), and each
    reply notes the share of its tokens the cap fired on at each capped layer (this engine measures it)."""
    from page_helpers import TURNS, Page, browser, messages, project

    driver = browser(tmp_path)
    try:
        page = Page(driver, url.removesuffix("/v1"), tmp_path)
        page.type("#max-tokens", "64")
        page.choose("#setting", "late-p25")
        for text in TURNS:
            page.send(text)
        finished = page.finished("late-p25")
        assert len(finished) == 2 and set(finished) <= {"stop", "length"}, finished
        plotted = page.points("late-p25")
        notes = [n.text for n in driver.find_elements(page.by.CSS_SELECTOR, ".column .fired")]
        saved = page.download("#save", "conversation.json")
    finally:
        driver.quit()
    assert len(notes) == 2 and all(note.startswith("cap fired: L21 ") for note in notes), notes
    model_dir, axis = tiny_paths(tiny_run)
    expected = project(saved, model_dir, axis, "--cap", str(capping_file), *STEER)
    assert plotted.keys() == expected.keys() and len(messages(saved)) == 4
    for key, value in plotted.items():
        assert value == pytest.approx(expected[key], rel=1e-4, abs=1e-3), key


def test_the_vllm_server_refuses_another_model_and_unsupported_fields(url):
    code, body = _post(url, json.dumps({"model": "nope", "messages": _messages(0)}).encode())
    assert code == 404 and body["error"]["code"] == "model_not_found" and "'nope'" in body["error"]["message"]
    code, body = _post(url, json.dumps({"model": MODEL, "messages": _messages(0), "stop": ["\n"]}).encode())
    assert code == 400 and body["error"]["param"] == "stop"
    ok = {"model": MODEL, "messages": _messages(0), "max_tokens": 4, "presence_penalty": 0, "user": "u"}
    assert _post(url, json.dumps(ok).encode())[0] == 200


def test_a_vllm_request_finished_early_delivers_its_reply_so_far(llm, capped_setting, tiny_run):
    """What the server's time limit and shutdown call: the engine stops the request where it is and the
    reply so far arrives, cut ("length"), with its telemetry; the engine goes on serving the others."""
    import asyncio

    from assistant_axis.engines import Chunk
    from assistant_axis.engines.vllm.session import VLLMSession
    from assistant_axis.templates import ChatTemplate

    units, capping = capped_setting
    template = ChatTemplate(llm.get_tokenizer())
    session = VLLMSession(llm, template, units, capping.layers, {"late-p25": capping})
    long = Sampling(temperature=0.0, top_p=1.0, max_tokens=1500, seed=0)

    async def run():
        stream = session.submit(_messages(1), long, setting="late-p25", loop=asyncio.get_running_loop())
        other = session.submit(_messages(2), replace(long, max_tokens=8), setting="none")
        chunks = 0
        async for event in stream:
            if isinstance(event, Chunk):
                chunks += 1
                if chunks == 5:
                    stream.finish()
            else:
                return event, other.result()

    try:
        reply, other = asyncio.run(asyncio.wait_for(run(), 300))
    finally:
        session.close()
    assert reply.finish_reason == "length" and 5 <= len(reply.token_ids) < 100 and reply.text.strip()
    assert reply.setting == "late-p25" and all(v is not None for v in reply.projection) and max(reply.fired) > 0
    assert other.finish_reason in ("stop", "length") and other.text.strip()


def test_a_stop_token_fed_back_after_the_end_of_turn_is_not_measured(llm, capped_setting):
    """Async scheduling (vLLM's GPU default; the CPU build forces it off) gives a reply that sampled its
    end-of-turn token one more step, which feeds that token back. Made here by construction: one decode
    step of request "a" feeds the end-of-turn token in place of the token it sampled. That row is not
    measured; request "b", in the same batch, is measured as before."""
    units, capping = capped_setting
    stop = llm.get_tokenizer().eos_token_id
    hooks = EngineHooks(llm, units, capping.layers, {"none": [], "late-p25": [capping]})
    fed = {"decodes": 0, "at": None}

    def feed_stop_token(worker):  # wraps the hooks' forward: they see the row as the runner would feed it
        runner = worker.model_runner
        forward = runner._model_forward

        def forward_feeding(*args, **kwargs):
            batch = runner.input_batch
            ids = batch.req_ids[: batch.num_reqs]
            keys = [runner.requests[r].sampling_params.extra_args[EXTRA_ARGS_KEY]["key"] for r in ids]
            if "a" in keys:
                i = keys.index("a")
                row, end = (int(x) for x in runner.query_start_loc.np[i : i + 2])
                if end - row == 1:  # a decode step
                    fed["decodes"] += 1
                    if fed["decodes"] == 3:
                        kwargs["input_ids"] = kwargs["input_ids"].clone()
                        kwargs["input_ids"][row] = stop
                        fed["at"] = int(kwargs["positions"][row])
            return forward(*args, **kwargs)

        runner._model_forward = forward_feeding
        return forward

    def restore(forward):
        def put_back(worker):
            worker.model_runner._model_forward = forward

        return put_back

    try:
        convs = _conversations(2)

        def run():
            asked = (("late-p25", "a"), ("none", "b"))
            params = [hooks.sampling_params(s, k, temperature=0, max_tokens=12) for s, k in asked]
            outs = llm.chat(convs, params, use_tqdm=False)
            # Fed back: every generated token but the last (an end-of-turn token or the 12th).
            return [len(o.outputs[0].token_ids) - 1 for o in outs], hooks.pop("a"), hooks.pop("b")

        plain_fed, plain_a, plain_b = run()
        (forward,) = llm.collective_rpc(feed_stop_token)
        try:
            fed_back, fed_a, fed_b = run()
        finally:
            llm.collective_rpc(restore(forward))
        assert fed["at"] is not None, "no decode step of request a was fed the end-of-turn token"
        assert [plain_a.tokens, plain_b.tokens] == plain_fed and plain_fed[0] > 3
        assert fed_a.tokens == fed_back[0] - 1, f"the end-of-turn token fed back at position {fed['at']} was measured"
        assert fed_b.tokens == fed_back[1] == plain_b.tokens
        b, plain = torch.tensor(fed_b.projection), torch.tensor(plain_b.projection)
        torch.testing.assert_close(b, plain, rtol=1e-5, atol=1e-4)
    finally:
        hooks.remove()


def _run_engine_checks(tiny_run, capping_file, out: Path, tensor_parallel: int = 1, mode: str = "compiled") -> dict:
    _need_vllm()
    model_dir, axis = tiny_paths(tiny_run)
    script = Path(__file__).with_name("vllm_engine_checks.py")
    env = {**os.environ, "VLLM_USE_V2_MODEL_RUNNER": "1"}
    dump = out.with_name("compiled.log")  # what torch.compile traced and inductor made of it
    env.update(TORCH_LOGS="graph_code,output_code", TORCH_LOGS_OUT=str(dump))
    if tensor_parallel > 1:  # the CPU build binds each worker to a NUMA node of its own unless told not to
        env.update(VLLM_CPU_OMP_THREADS_BIND="nobind", OMP_NUM_THREADS="1")
    command = [
        sys.executable,
        str(script),
        str(model_dir),
        str(axis),
        str(capping_file),
        str(out),
        str(tensor_parallel),
        mode,
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return {**json.loads(out.read_text()), "dump": str(dump)}


@pytest.fixture(scope="module")
def engine_checks(tiny_run, capping_file, tmp_path_factory):
    """What tests/vllm_engine_checks.py saw: a hooked engine set up as a GPU user gets one (Model Runner V2
    asked for, prefix caching on, prefills in chunks, a KV cache that preempts), in a process of its own."""
    return _run_engine_checks(tiny_run, capping_file, tmp_path_factory.mktemp("engine_checks") / "seen.json")


@pytest.fixture(scope="module")
def engine_checks_tp3(tiny_run, capping_file, tmp_path_factory):
    """The same engine with tensor parallel 3 (worker processes of their own; the bundled model's 9
    attention heads and 3 KV heads split 3 ways, not 2): its tensor-parallel and steer-last checks. Eager:
    compiled, its three workers compile on this machine's two cores and the checks take 289 s instead of
    136 (measured 2026-12-06), past the suite's budget; compiled it passes the same tests (run by hand,
    the closing note of issue 36), and the ops are the same in both modes."""
    out = tmp_path_factory.mktemp("engine_checks_tp3") / "seen.json"
    return _run_engine_checks(tiny_run, capping_file, out, tensor_parallel=3, mode="eager")


def test_a_hooked_engine_runs_model_runner_v1_whatever_the_environment_asks(engine_checks):
    assert engine_checks["runner"] == {"use_v2_model_runner": False, "setting": "0"}


def test_the_runner_check_names_the_setting_before_an_engine_starts(tiny_run):
    """A setting that forces Model Runner V2 (watermarking) is one line naming it, before vLLM starts."""
    _need_vllm()
    from assistant_axis.engines.vllm.engine import check_runner, vllm_engine_args
    from assistant_axis.errors import InputError

    args = {**vllm_engine_args(str(tiny_paths(tiny_run)[0]), ENGINE, "test", "float32"), "watermark_config": {"key": 7}}
    with pytest.raises(InputError, match="Model Runner V2") as caught:
        check_runner(args, "--engine-args")
    assert "--engine-args" in str(caught.value) and "\n" not in str(caught.value)


def test_a_capped_request_never_reuses_kv_computed_under_another_setting(engine_checks):
    """The prompt is many KV blocks long; asked uncapped first (as the evaluate stage submits it), the
    capped request computes its own blocks: its tokens and telemetry are those of the capped request
    alone. The same setting asked again is served from the cache, and gives the same reply."""
    seen = engine_checks["prefix"]
    full_blocks = (seen["prompt_tokens"] - 1) // 32 * 32
    assert full_blocks >= 8 * 32
    assert seen["hits_capped_after_uncapped"] == 0
    assert seen["hits_capped_again"] >= full_blocks
    alone = seen["capped_alone"]
    for name in ("capped_after_uncapped", "capped_again"):
        assert seen[name]["tokens"] == alone["tokens"], name
        assert seen[name]["measured"] == alone["measured"] == len(alone["tokens"]) - 1, name
        torch.testing.assert_close(
            torch.tensor(seen[name]["projection"]), torch.tensor(alone["projection"]), rtol=1e-5, atol=1e-5
        )
    # The uncapped reply differs: the cap acts on this prompt (else the comparison above shows nothing).
    assert seen["uncapped"]["projection"] != alone["projection"]


def test_preempted_requests_are_measured_and_recorded_once_per_position(engine_checks):
    """8 replies generated at once in a KV cache that holds about half of them (vLLM preempts and
    recomputes), against the same replies one at a time: the telemetry measures each fed-back token once
    and the recorder records each once, with the same values."""
    seen = engine_checks["preemption"]
    assert seen["preemptions"] > 0 and seen["recorder_preemptions"] > 0, "nothing was preempted"
    same = 0
    for together, alone in zip(seen["together"], seen["one_by_one"], strict=True):
        for reply in (together, alone):  # all fed-back tokens: all but the last of a cut reply
            assert reply["measured"] == len(reply["tokens"]) - (len(reply["tokens"]) == 64)
        if together["tokens"] == alone["tokens"]:  # the same token ids: the same numbers
            same += 1
            torch.testing.assert_close(
                torch.tensor(together["projection"]), torch.tensor(alone["projection"]), rtol=1e-5, atol=1e-4
            )
    for tokens, count, single_tokens, single_count, diff in zip(
        seen["recorder_tokens"],
        seen["recorder_counts"],
        seen["recorder_single_tokens"],
        seen["recorder_single_counts"],
        seen["recorder_max_diff"],
        strict=True,
    ):
        assert count == len(tokens) - 1 and single_count == len(single_tokens) - 1
        if tokens == single_tokens:
            same += 1
            assert diff <= 1e-5, f"recorded means differ by {diff} of their norm"
    assert same >= 8, "too few replies had the same tokens preempted and alone to compare their numbers"


def test_a_settings_own_steering_is_not_counted_as_its_cap_firing(llm, capped_setting, tiny_run):
    """Two settings steer and then cap the same layers, in one batch: the second one's cap sits far below
    every projection, so it never acts, and its telemetry says so (fired 0 at every layer), whatever the
    first setting does to its own rows before it."""
    from assistant_axis.steer import Steering

    units, capping = capped_setting
    axis, layers, _ = load_axis(tiny_paths(tiny_run)[1])
    steering = Steering.along(axis[8:26], list(range(8, 26)), -40.0)
    never = replace(capping, thresholds=torch.full_like(capping.thresholds, -1e6))
    settings = {"steer-cap": [steering, capping], "steer-never": [steering, never]}
    hooks = EngineHooks(llm, units, capping.layers, settings)
    try:
        convs = _conversations(4)
        asked = ["steer-cap", "steer-never", "steer-cap", "steer-never"]
        params = [hooks.sampling_params(s, f"k{i}", temperature=0, max_tokens=8) for i, s in enumerate(asked)]
        llm.chat(convs, params, use_tqdm=False)
        seen = [hooks.pop(f"k{i}") for i in range(4)]
        assert all(0 < max(t.fired) for t, s in zip(seen, asked, strict=True) if s == "steer-cap")
        assert all(
            set(t.fired) == {0.0} and set(t.correction) == {0.0}
            for t, s in zip(seen, asked, strict=True)
            if s == "steer-never"
        )
    finally:
        hooks.remove()


def test_tensor_parallel_ranks_cap_and_measure_as_one_process(engine_checks, engine_checks_tp3, tiny_run):
    """Uncapped, capped, and steered-then-capped requests in one batch, greedy: with tensor parallel 3
    every rank edits its copy of the stream and rank 0 measures; the tokens and, on the same token ids,
    the running telemetry after every step equal tensor parallel 1's within 1e-5 of the stream's norm.
    (A token whose projection lies within rounding of tau may fire on one path and not the other: one
    such token per reply is allowed in the fired share.)"""
    default = load_file(tiny_run / f"results/{MODEL}/activations/default.safetensors")["activations"]
    norms = default[:, CAPPED].float().norm(dim=-1).mean(0).double()
    one, three = engine_checks["tensor_parallel"], engine_checks_tp3["tensor_parallel"]
    assert one.keys() == three.keys() and {r["setting"] for r in one.values()} == {
        "none",
        "late-p25",
        "steered-late-p25",
    }
    compared = 0
    for key, alone in one.items():
        split = three[key]
        same = next((i for i, (a, b) in enumerate(zip(alone["tokens"], split["tokens"], strict=False)) if a != b), None)
        same = min(len(alone["tokens"]), len(split["tokens"])) if same is None else same
        assert same >= 12, f"{key}: the greedy tokens part after {same}"
        by_count = {step["tokens"]: step for step in split["steps"]}
        for step in alone["steps"]:
            n = step["tokens"]
            if n > same:  # measured over tokens that differ between the two
                break
            other = by_count[n]
            values, others = torch.tensor(step["values"], dtype=torch.float64), torch.tensor(other["values"])
            assert ((values - others).abs() <= 1e-5 * norms).all(), (key, n, values - others)
            fired, fired_other = torch.tensor(step["fired"]) * n, torch.tensor(other["fired"]) * n
            assert ((fired - fired_other).abs() <= 1 + 1e-9).all(), (key, n)
            compared += 1
    assert compared >= 6 * 12
    capped = [r["steps"][-1]["fired"] for r in one.values() if r["setting"] != "none"]
    assert all(max(f) > 0 for f in capped), "the cap never fired: the comparison shows nothing of it"


@pytest.mark.parametrize("tensor_parallel", [1, 3])
def test_steering_the_last_position_of_a_chunked_prompt_moves_one_row(
    engine_checks, engine_checks_tp3, tensor_parallel
):
    """`--steer-positions last` steers the prompt's last token and each token after it. The prompt here
    is prefilled in chunks of 128 tokens, whose last rows are not the prompt's last: recorded after the
    hooks at the steered layer, the steered prompt differs from the plain one by one steering vector."""
    seen = (engine_checks if tensor_parallel == 1 else engine_checks_tp3)["steer_last"]
    assert seen["prompt_tokens"] > 2 * seen["chunk"]
    assert seen["counts"] == [seen["prompt_tokens"]] * 2
    assert abs(seen["steered_rows"] - 1) < 0.01 and seen["off_steering"] < 0.01, seen


def test_an_end_of_turn_token_from_the_generation_config_ends_the_reply_and_is_not_in_it(llm, capped_setting):
    """Gemma's <end_of_turn> is in its generation_config's eos list, not its tokenizer's eos: vLLM stops on
    it as a stop token id and names it as the stop reason. Made here by construction: the engine's
    generation config names the 4th token of a greedy reply an end of turn; the reply is the 3 before it
    (token ids, hence usage and the evaluation's counts), ending "stop", measured over those 3."""
    from assistant_axis.engines.vllm.session import VLLMSession
    from assistant_axis.templates import ChatTemplate

    units, capping = capped_setting
    session = VLLMSession(llm, ChatTemplate(llm.get_tokenizer()), units, capping.layers, {"late-p25": capping})
    greedy = Sampling(temperature=0.0, top_p=1.0, max_tokens=12, seed=0)
    processor = llm.llm_engine.input_processor
    kept = processor.generation_config_fields
    try:
        plain = session.complete(_messages(0), greedy, setting="late-p25")
        end = plain.token_ids[3]
        assert end not in plain.token_ids[:3]
        processor.generation_config_fields = {**kept, "eos_token_id": [llm.get_tokenizer().eos_token_id, end]}
        reply = session.complete(_messages(0), greedy, setting="late-p25")
    finally:
        processor.generation_config_fields = kept
        session.close()
    assert reply.finish_reason == "stop" and reply.token_ids == plain.token_ids[:3]
    assert reply.text and end not in reply.token_ids


# ---------------------------------------------------------------------- compiled (the engine checks' engine)


def _close_to_norm(got: list, want: list, norms: list, tolerance: float = 1e-5) -> None:
    """Each layer's value within `tolerance` of the stream's norm there."""
    for g, w, n in zip(got, want, norms, strict=True):
        assert abs(g - w) <= tolerance * n, f"{g} vs {w}: {abs(g - w) / n:.2e} of the norm {n:.1f}"


def test_the_default_engine_is_compiled_with_the_ops_in_its_one_graph(engine_checks):
    """The engine a GPU user gets compiles the model (vLLM's default; on this CPU build one Dynamo trace
    with inductor), and the trace it compiled is one graph holding every op the layout asked for, traced
    inline (the default): edits and telemetry at the 5 capped layers, recording there and at layer 3, each
    named by its source line in the graph's comments. In inductor's output every telemetry and recording
    sum is still written, as an atomic add into its buffer (a mutation the compiler thought unused would
    be gone)."""
    assert engine_checks["compilation"] != 0  # CompilationMode.NONE
    dump = Path(engine_checks["dump"]).read_text()
    traced = dump.split("TRACED GRAPH")
    assert len(traced) == 2, f"{len(traced) - 1} traced graphs: the model's forward broke into pieces"
    graph, output = traced[1].split("Output code", 1) if "Output code" in traced[1] else (traced[1], "")
    # Each op's first line, which runs once per call (a source line is named once per run of its nodes).
    firsts = {
        "edit_rows": "fired = torch.zeros(",
        "measure_rows": "after = stream.float() @ unit",
        "record_rows": "sums",
    }
    for (op, line), count in zip(firsts.items(), (5, 5, 6), strict=True):
        calls = len(re.findall(rf"ops\.py:\d+ in {op}, code: {re.escape(line)}", graph))
        assert calls == count, f"{op}: {calls} calls in the traced graph"
    sums = re.findall(r"atomic_add(?:_vec<[^>]*>)?\(", output)
    assert len(sums) == 5 + 6, f"{len(sums)} sums written in inductor's output"


def test_compiled_telemetry_equals_the_eager_engines_on_the_same_tokens(
    engine_checks, llm, capped_setting, capping_file, tiny_run
):
    """Four settings in one batch (none, a cap, steering then the cap, steering alone) over the same token
    ids, teacher-forced, in the compiled engine and in the eager one: the same telemetry within 1e-5 of the
    stream's norm; then a setting added after the compiled engine started applies (a floor 2 higher: the
    trace kept no value of the tables it read) and holds every token of its greedy reply at or above tau."""
    from vllm_engine_checks import mixed_settings  # imports vLLM: a test that runs it has it

    units, _ = capped_setting
    capping = load_capping(capping_file).normalized()  # the one the engine checks ran with
    steering = Steering.along(units[0], capping.layers[:1], 4.0)
    template = ChatTemplate(llm.get_tokenizer(), {}, MODEL)
    eager = mixed_settings(llm, template, units, capping, steering)
    compiled = engine_checks["mixed"]
    default = load_file(tiny_run / f"results/{MODEL}/activations/default.safetensors")["activations"]
    norms = default[:, CAPPED].float().norm(dim=-1).mean(0).tolist()  # the stream's norm at each capped layer
    for part in ("first", "added"):
        assert compiled[part].keys() == eager[part].keys()
        for key, want in eager[part].items():
            got = compiled[part][key]
            assert got["tokens"] == want["tokens"] > 20, key
            _close_to_norm(got["values"], want["values"], norms)
            _close_to_norm(got["correction"], want["correction"], norms)
            assert got["fired"] == pytest.approx(want["fired"], abs=1 / want["tokens"]), key
    first, added = compiled["first"], compiled["added"]
    assert all(set(first[f"m-none-{i}"]["fired"]) == {0.0} for i in range(3))
    assert any(max(first[f"m-late-p25-{i}"]["fired"]) > 0 for i in range(3))
    for i in range(3):
        assert added[f"a-late-p25-{i}"]["values"] == pytest.approx(first[f"m-late-p25-{i}"]["values"], abs=1e-4)
        assert added[f"a-tight-{i}"]["values"] != pytest.approx(added[f"a-late-p25-{i}"]["values"], abs=1e-2)
    tau = compiled["tight_tau"]
    assert len(compiled["tight_tokens"]) >= 8
    for projections in compiled["tight_tokens"]:
        assert all(p >= t - 1e-4 * abs(t) - 1e-4 for p, t in zip(projections, tau, strict=True)), projections


def test_compiled_recording_of_a_chunked_prompt_equals_the_transformers_path(engine_checks, bundled):
    """A prompt of several prefill chunks (128 tokens each), recorded at three layers (not all of them) over
    most of its tokens by the compiled engine: the transformers path's means of the same span."""
    seen = engine_checks["long_recording"]
    start, end = seen["span"]
    assert len(seen["ids"]) > 3 * 128 and seen["count"] == end - start
    want = mean_activations(bundled[0], [seen["ids"]], [(start, end)], seen["layers"], progress=False)
    assert_means_close(torch.tensor([seen["means"]]), want)
