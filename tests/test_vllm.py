"""vLLM for real: its CPU build here (the CUDA build on a GPU machine), on the bundled model, no mocks.

The session's in-process engine (conftest) serves the in-process tests of this module; the workflow tests
start one in each of their jobs, as a cluster job does. Everything here skips only when vllm cannot be
imported, and `AXIS_STRICT=1` (set by CI) turns that skip into a failure.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from safetensors import safe_open
from test_vllm_activations import assert_means_close

from assistant_axis.activations import mean_activations
from assistant_axis.artifacts import read_tensors
from assistant_axis.engines import Generation, Sampling
from assistant_axis.engines.vllm import VLLMEngine
from assistant_axis.errors import InputError
from assistant_axis.judge import DEFAULT_TEMPLATE, JudgeItem, TransformersJudge, VLLMJudge, render_prompt
from assistant_axis.models import load_tokenizer
from assistant_axis.roles import load_bank, load_questions, stable_seed
from assistant_axis.stages import OPTIONAL_RESPONSE_COLUMNS, RESPONSE_COLUMNS, SCORE_COLUMNS
from assistant_axis.templates import ChatTemplate, build_messages

from conftest import need, tokenizer_with_template
from workflow_helpers import make_workspace, planned_jobs, snakemake, tiny_config

ROOT = Path(__file__).resolve().parents[1]
# A small explicit KV cache: on the CPU build the default share of RAM would take most of the machine.
ENGINE = {"kv_cache_memory_bytes": 256 * 2**20, "max_model_len": 2048, "enforce_eager": True}
# ChatML without a system role: the template refuses one, as Gemma's does.
NO_SYSTEM_CHATML = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _need_vllm() -> None:
    try:
        import vllm  # noqa: F401
    except Exception as exc:  # an ImportError, or a broken install (e.g. a CUDA torchvision beside a CPU torch)
        need(False, f"vllm cannot be imported ({type(exc).__name__}: {exc})")


@pytest.fixture(scope="module")
def llm(inprocess_llm):
    """The session's one in-process engine (conftest): a second engine started and shut down beside it
    would take the distributed state it runs on. Its defaults keep 20 top logprobs, as the judge tests need."""
    return inprocess_llm


def _conversations(n: int, offset: int = 0) -> list[list[dict]]:
    bank = load_bank(ROOT / "data/roles")
    questions = load_questions(ROOT / "data/questions/questions.jsonl")
    roles = sorted(r for r in bank if r != "default")
    return [
        build_messages(bank[roles[(i * 7) % len(roles)]].prompts[i % 5], questions[i % len(questions)].question)
        for i in range(offset, offset + n)
    ]


def _labelled(n: int) -> list[JudgeItem]:
    rows = [json.loads(line) for line in (ROOT / "tests/data/judge_labels.jsonl").read_text().splitlines()]
    return [JudgeItem(r["role"], r["description"], r["question"], r["response"]) for r in rows[:n]]


# ------------------------------------------------------------------------------------------ generation


def test_a_reply_depends_only_on_its_conversation_and_seed(llm, model_dir):
    backend = VLLMEngine({}, ChatTemplate(load_tokenizer(str(model_dir))), llm=llm, progress=False)
    assert backend.template.system_role
    sampling = Sampling(temperature=0.7, top_p=0.9, max_tokens=24)
    convs = _conversations(12)
    seeds = [stable_seed("test", i) for i in range(12)]
    first = backend.generate(convs, sampling, seeds)
    assert all(isinstance(g, Generation) and g.text and 1 <= g.n_tokens <= 24 for g in first)
    assert {g.finish_reason for g in first} <= {"stop", "length"}

    # Some of them again, in another order and batched with other conversations: the same replies.
    subset = [11, 3, 7, 0, 5]
    others = _conversations(6, offset=40)
    again = backend.generate(
        [convs[i] for i in subset] + others,
        sampling,
        [seeds[i] for i in subset] + [stable_seed("other", i) for i in range(6)],
    )
    assert again[: len(subset)] == [first[i] for i in subset]

    # Other seeds sample other replies.
    reseeded = backend.generate(convs, sampling, [s + 1 for s in seeds])
    assert sum(a.text != b.text for a, b in zip(first, reseeded, strict=True)) >= len(convs) // 2


def test_thinking_off_renders_in_vllm_as_in_the_activations_stage(llm, model_dir):
    """`model.chat_template_kwargs` reaches vLLM's rendering: the prompt it generated after carries the
    empty think block, token for token the activations stage's rendering (the backend checks every prompt)."""
    from vllm import SamplingParams

    tokenizer = tokenizer_with_template(load_tokenizer(str(model_dir)), "thinking")
    template = ChatTemplate(tokenizer, {"enable_thinking": False}, "thinking")
    backend = VLLMEngine({}, template, llm=llm, progress=False)
    convs = [template.conversation("You are a pirate.", q) for q in ("What do you love?", "Where were you born?")]
    replies = backend.generate(convs, Sampling(0.7, 0.9, 12), [1, 2])
    assert all(r.text and "<think>" not in r.text for r in replies)
    outputs = llm.chat(
        convs,
        SamplingParams(max_tokens=1),
        use_tqdm=False,
        chat_template=tokenizer.chat_template,
        chat_template_kwargs=template.options,
    )
    for conv, output in zip(convs, outputs, strict=True):
        assert tokenizer.decode(output.prompt_token_ids).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
        assert list(output.prompt_token_ids) == template.ids(conv, add_generation_prompt=True)
        # Each reply is then located exactly, after that think block.
        ids, start, end = template.reply_span(conv, replies[convs.index(conv)].text)
        assert tokenizer.decode(ids[start:end]) == replies[convs.index(conv)].text


def test_a_template_without_system_role_gets_the_prompt_in_the_user_turn(llm, tmp_path, model_dir):
    """A model folder whose template has no system role, served by the module's engine (same weights): the
    backend sends the folder's template with every request, as it does whatever the engine was started on."""
    from transformers import AutoTokenizer
    from vllm import SamplingParams

    folder = tmp_path / "no-system"
    folder.mkdir()
    for item in model_dir.iterdir():
        if item.name != "chat_template.jinja":
            (folder / item.name).symlink_to(item)
    (folder / "chat_template.jinja").write_text(NO_SYSTEM_CHATML)
    template = ChatTemplate(AutoTokenizer.from_pretrained(folder))
    assert not template.system_role and template.tokenizer.chat_template == NO_SYSTEM_CHATML

    backend = VLLMEngine({}, template, llm=llm, progress=False)
    # Built as the generate stage builds them, for this backend's template.
    questions = ("What do you love?", "Where were you born?")
    convs = [backend.template.conversation("You are a pirate.", q) for q in questions]
    assert convs[0] == [{"role": "user", "content": "You are a pirate.\n\nWhat do you love?"}]
    replies = backend.generate(convs, Sampling(0.7, 0.9, 16), [1, 2])
    assert all(r.text for r in replies)
    # The prompt vLLM generated after is the activations stage's rendering of the same conversation.
    outputs = llm.chat(convs, SamplingParams(max_tokens=1), use_tqdm=False, chat_template=NO_SYSTEM_CHATML)
    for conv, output in zip(convs, outputs, strict=True):
        assert list(output.prompt_token_ids) == template.ids(conv, add_generation_prompt=True)
    # A system message sent to this template is refused, not silently dropped.
    with pytest.raises(Exception, match="System role not supported"):
        llm.chat(
            [build_messages("You are a pirate.", "Hi", system_role=True)],
            SamplingParams(max_tokens=1),
            use_tqdm=False,
            chat_template=NO_SYSTEM_CHATML,
        )


# --------------------------------------------------------------------------------------------- judge


def test_vllm_judge_agrees_with_the_local_judge(llm, bundled, capsys):
    """Same weights, same rendered prompts: where vLLM's top 20 logprobs hold all four digits, the expected
    scores agree with the transformers judge, which reads all four from the full distribution."""
    model, tokenizer = bundled
    prompts = [render_prompt(DEFAULT_TEMPLATE, it) for it in _labelled(16)]
    local = TransformersJudge(model, tokenizer, "local", batch_size=4).score_prompts(prompts)
    judge = VLLMJudge({"min_digit_mass": 0.0, "top_logprobs": 20}, llm=llm, progress=False)
    verdicts = judge.score_prompts(prompts)
    raws = [json.loads(v.raw) for v in verdicts]
    assert all("digit_mass" in r for r in raws)
    complete = [(a, b) for a, b, r in zip(local, verdicts, raws, strict=True) if not r["missing"]]
    gaps = [abs(a.expected_score - b.expected_score) for a, b in complete]
    with capsys.disabled():
        print(
            f"\nvllm judge vs transformers judge on {len(prompts)} prompts: all four digits among vLLM's top 20 "
            f"logprobs on {len(complete)}; max |expected score difference| {max(gaps, default=0):.4f}"
        )
    assert len(complete) >= len(prompts) // 2
    assert max(gaps) <= 0.05


def test_a_judge_that_does_not_answer_with_digits_is_an_error(llm):
    # The bundled 135M model puts 1-19% of its probability on the digits: no judgement at the default 0.5.
    judge = VLLMJudge({}, llm=llm, progress=False)
    prompts = [render_prompt(DEFAULT_TEMPLATE, it) for it in _labelled(6)]
    with pytest.raises(InputError, match=r"judge.vllm.min_digit_mass: .* is not answering the rubric"):
        judge.score_prompts(prompts)


def test_judge_stage_with_the_vllm_backend(tmp_path, model_dir):
    """The stage builds its own engine from the config's settings and writes the same columns as every judge.
    It runs in a process of its own, as a job does (tests/bad_inputs/run_stage.py)."""
    _need_vllm()
    items = _labelled(8)
    frame = pd.DataFrame(
        {
            "role": "pirate",
            "prompt_index": 0,
            "question_index": list(range(len(items))),
            "question_id": [f"q{i}" for i in range(len(items))],
            "system_prompt": "You are a pirate.",
            "question": [it.question for it in items],
            "response": [it.response for it in items],
            "n_response_tokens": 10,
            "finish_reason": "stop",
        }
    )
    frame.loc[3, "response"] = "  "  # an empty reply keeps a null score, as with every judge
    frame.to_parquet(tmp_path / "responses.parquet")
    settings = {"model": str(model_dir), "dtype": "float32", "min_digit_mass": 0.0, **ENGINE}
    kwargs = {
        "responses": str(tmp_path / "responses.parquet"),
        "output": str(tmp_path / "scores.parquet"),
        "role": "pirate",
        "description": "A pirate.",
        "template": DEFAULT_TEMPLATE,
        "backend": "vllm",
        "settings": settings,
    }
    command = [sys.executable, str(ROOT / "tests/bad_inputs/run_stage.py"), "judge", str(tmp_path / "judge.log")]
    stage = subprocess.run([*command, json.dumps(kwargs)], capture_output=True, text=True, timeout=600)
    assert stage.returncode == 0, stage.stdout[-3000:] + stage.stderr[-3000:]
    scores = pd.read_parquet(tmp_path / "scores.parquet")
    assert list(scores.columns) == list(SCORE_COLUMNS)
    assert scores["judge"].eq(f"vllm:{model_dir}").all()
    assert scores["score"].isna().tolist() == [i == 3 for i in range(len(items))]
    assert scores["score"].dropna().between(0, 3).all()
    assert scores.loc[3, "raw"] == "empty response"


# ------------------------------------------------------------------------------------------ workflow


def _responses(work: Path, role: str) -> pd.DataFrame:
    return pd.read_parquet(work / f"results/smollm2-135m-instruct/responses/{role}.parquet")


def _separate_pass(bundled, responses: pd.DataFrame, layers: list[int], fed_back: bool):
    """The transformers means of a responses table (rows whose text tokenizes back to the generated
    tokens), over each reply's span or, `fed_back`, over the tokens generation fed back (a cut reply's
    last token is not): (rows, means)."""
    model, tokenizer = bundled
    template = ChatTemplate(tokenizer, {}, "smollm2-135m-instruct")
    rows, sequences, spans = [], [], []
    for i, row in enumerate(responses.itertuples()):
        ids, start, end = template.reply_span(build_messages(row.system_prompt, row.question), row.response.strip())
        cut = row.finish_reason == "length"
        if end - start == row.n_response_tokens - (not cut):
            rows.append(i)
            sequences.append(ids)
            spans.append((start, end - (cut and fed_back)))
    return rows, mean_activations(model, sequences, spans, layers, progress=False)


@pytest.mark.slow
def test_tiny_run_with_vllm_generation_capturing_activations(tmp_path, model_dir, tiny_run, bundled):
    """generate.backend: vllm through Snakemake, one engine per job, recording the activations as it
    generates (no activations jobs); then an edited role regenerates alone, and its unchanged replies come
    back token for token."""
    _need_vllm()
    roles = ["pirate"]  # and default: two generate jobs, each starting its own engine
    config = tiny_config(generate={"backend": "vllm", "vllm": ENGINE, "capture_activations": True})
    config["roles"]["include"] = roles
    work = make_workspace(tmp_path, model_dir, config, bank=roles)
    target = "results/smollm2-135m-instruct/axis.safetensors"
    assert not {job for job in planned_jobs(work, target) if job[0] == "activations"}
    snakemake(work, target)
    results = work / "results/smollm2-135m-instruct"
    assert not (work / "logs/smollm2-135m-instruct/activations").exists()
    compared = 0
    for role in ["default", *roles]:
        captured = read_tensors(results / f"activations/{role}.safetensors")[0]["activations"]
        rows, separate = _separate_pass(bundled, _responses(work, role), list(range(30)), fed_back=True)
        assert_means_close(captured[rows], separate)
        compared += len(rows)
    assert compared >= 6
    for role in ["default", *roles]:
        responses = _responses(work, role)
        assert tuple(responses.columns) == (*RESPONSE_COLUMNS, *OPTIONAL_RESPONSE_COLUMNS)
        assert len(responses) == 4 and responses["response"].str.len().gt(0).all()
        assert responses["n_response_tokens"].between(1, 16).all()
        assert set(responses["finish_reason"]) <= {"stop", "length"}
        with safe_open(results / f"activations/{role}.safetensors", "pt") as f:
            assert set(f.keys()) == {"activations", "layers"}
            assert tuple(f.get_tensor("activations").shape) == (4, 30, 576)
        with safe_open(results / f"vectors/{role}.safetensors", "pt") as f:
            assert set(f.keys()) == {"vector", "layers"} and tuple(f.get_tensor("vector").shape) == (30, 576)
    for role in roles:
        assert tuple(pd.read_parquet(results / f"scores/{role}.parquet").columns) == SCORE_COLUMNS
    axis = torch.load(results / "axis.pt", weights_only=True)
    reference = torch.load(tiny_run / "results/smollm2-135m-instruct/axis.pt", weights_only=True)
    assert axis.shape == reference.shape == (30, 576) and torch.isfinite(axis).all()
    log = (work / "logs/smollm2-135m-instruct/generate/pirate.log").read_text()
    assert "with vllm" in log

    # Edit the pirate's second prompt: only the pirate is generated again.
    before = {role: _responses(work, role) for role in ["default", *roles]}
    stamps = {"default": (results / "responses/default.parquet").stat().st_mtime_ns}
    role_file = work / "data/roles/pirate.yaml"
    data = yaml.safe_load(role_file.read_text())
    data["prompts"][1] = "You are a retired pirate captain who now keeps bees and speaks in sea shanties."
    role_file.write_text(yaml.safe_dump(data, sort_keys=False))
    assert {job for job in planned_jobs(work, target) if job[0] == "generate"} == {("generate", "pirate")}
    snakemake(work, target)
    for role, stamp in stamps.items():
        assert (results / f"responses/{role}.parquet").stat().st_mtime_ns == stamp
    after, old = _responses(work, "pirate"), before["pirate"]
    kept, changed = old["prompt_index"] == 0, old["prompt_index"] == 1
    columns = ["question_id", "system_prompt", "response", "n_response_tokens", "finish_reason"]
    assert after.loc[kept, columns].equals(old.loc[kept, columns])  # a new process, the same replies
    assert (after.loc[changed, "system_prompt"] == data["prompts"][1]).all()
    assert not after.loc[changed, "response"].equals(old.loc[changed, "response"])


@pytest.mark.slow
def test_tiny_run_with_vllm_activations(tmp_path, model_dir, tiny_run, bundled):
    """activations.backend: vllm on the tiny run's replies and scores: only activations (one shard: one
    engine for every role, as a cluster runs it), vectors and the axis run; the artifacts are the
    transformers run's, within the float32 tolerance."""
    _need_vllm()
    config = tiny_config(activations={"backend": "vllm", "vllm": ENGINE})
    config["shards"] = 1
    work = make_workspace(tmp_path, model_dir, config)
    ours, theirs = work / "results/smollm2-135m-instruct", tiny_run / "results/smollm2-135m-instruct"
    ours.mkdir(parents=True, exist_ok=True)
    shutil.copy(theirs / "model.json", ours / "model.json")
    for folder in ("responses", "scores"):
        shutil.copytree(theirs / folder, ours / folder)
    # Newer than the copied scripts and in the order they were made: nothing before the activations reruns.
    now = time.time()
    for age, path in enumerate([ours / "model.json", *ours.glob("responses/*"), *ours.glob("scores/*")]):
        os.utime(path, (now + age, now + age))
    target = "results/smollm2-135m-instruct/axis.safetensors"
    assert {rule for rule, _ in planned_jobs(work, target)} == {"activations_shard0", "vectors", "axis"}
    snakemake(work, target)
    assert "activations (vLLM)" in (work / "logs/smollm2-135m-instruct/activations_shard0.log").read_text()
    for path in sorted((theirs / "activations").glob("*.safetensors")):
        (mine, meta), (reference, reference_meta) = read_tensors(ours / "activations" / path.name), read_tensors(path)
        assert set(mine) == set(reference) == {"activations", "layers"}
        assert torch.equal(mine["layers"], reference["layers"])
        assert meta == reference_meta
        assert_means_close(mine["activations"], reference["activations"])
    axis = torch.load(ours / "axis.pt", weights_only=True)
    reference = torch.load(theirs / "axis.pt", weights_only=True)
    error = (axis - reference).norm(dim=-1) / reference.norm(dim=-1)
    assert float(error.max()) <= 1e-4  # a difference of means: relative to the smaller axis, not the means
