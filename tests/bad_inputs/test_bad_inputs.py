"""Hostile inputs: every bad role file, question file, config value or artifact fails with a non-zero
exit and one `error: FILE: FIELD: problem` line, and leaves every existing artifact byte for byte as it was.

Each case runs on a fresh copy of the session's finished tiny run. Inputs and config values go through a
real `snakemake` run, which must stop while planning: a job that starts has its old outputs deleted by
Snakemake. A bad artifact goes to the stage that reads it (`run_stage.py`, the workflow script's code),
with that stage's existing outputs as its outputs.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from fake_openai import FakeOpenAI, completion
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from workflow_helpers import SNAKEMAKE, TINY_ROLES, copy_run

HERE = Path(__file__).resolve().parent
M = "smollm2-135m-instruct"
R = f"results/{M}"
# The SLURM executor plugin runs `scontrol` when Snakemake starts; with no SLURM controller that waits
# ~9 s. These runs are local, so point it at an empty SLURM config: it fails at once.
NO_SLURM = {"SLURM_CONF": "/dev/null"}
pytestmark = pytest.mark.slow


# ------------------------------------------------------------------------------------------- edits


def edit_yaml(rel: str, change: Callable[[dict], None]) -> Callable[[Path], None]:
    def apply(work: Path) -> None:
        data = yaml.safe_load((work / rel).read_text())
        change(data)
        (work / rel).write_text(yaml.safe_dump(data, sort_keys=False))

    return apply


def write(rel: str, text: str) -> Callable[[Path], None]:
    return lambda work: (work / rel).write_text(text)


def edit_lines(rel: str, change: Callable[[list[str]], None]) -> Callable[[Path], None]:
    def apply(work: Path) -> None:
        lines = (work / rel).read_text().splitlines()
        change(lines)
        (work / rel).write_text("\n".join(lines) + "\n")

    return apply


def edit_question(index: int, change: Callable[[dict], None]) -> Callable[[Path], None]:
    def apply_line(lines: list[str]) -> None:
        row = json.loads(lines[index])
        change(row)
        lines[index] = json.dumps(row)

    return edit_lines("data/questions/questions.jsonl", apply_line)


def edit_parquet(rel: str, change: Callable[[pd.DataFrame], pd.DataFrame]) -> Callable[[Path], None]:
    return lambda work: change(pd.read_parquet(work / rel)).to_parquet(work / rel, index=False)


def edit_tensors(rel: str, change: Callable[[dict, dict], None]) -> Callable[[Path], None]:
    def apply(work: Path) -> None:
        with safe_open(str(work / rel), framework="pt") as handle:
            meta = dict(handle.metadata() or {})
        tensors = load_file(work / rel)
        change(tensors, meta)
        save_file(tensors, str(work / rel), metadata=meta)

    return apply


def truncate(rel: str) -> Callable[[Path], None]:
    def apply(work: Path) -> None:
        data = (work / rel).read_bytes()
        (work / rel).write_bytes(data[: len(data) // 2])

    return apply


def config(change: Callable[[dict], None]) -> Callable[[Path], None]:
    return edit_yaml("config/config.yaml", change)


def pirate(change: Callable[[dict], None]) -> Callable[[Path], None]:
    return edit_yaml("data/roles/pirate.yaml", change)


def foreign_activations(tensors: dict, meta: dict) -> None:
    """Activations of a 24-layer model with hidden size 896, under the same role."""
    tensors["activations"] = torch.randn(4, 24, 896)
    tensors["layers"] = torch.arange(24)
    meta.update(model="qwen2.5-0.5b-instruct", hidden_size="896")


def foreign_vector(tensors: dict, meta: dict) -> None:
    tensors["vector"] = torch.randn(24, 896)
    tensors["layers"] = torch.arange(24)
    meta["model"] = "qwen2.5-0.5b-instruct"


def wrong_hidden_size(tensors: dict, meta: dict) -> None:
    tensors["activations"] = torch.randn(4, 30, 512)
    meta["hidden_size"] = "512"


def drop_a_row(tensors: dict, meta: dict) -> None:
    tensors["activations"] = tensors["activations"][:3].clone()
    meta["n_responses"] = "3"


# ------------------------------------------------------------------------------------------- stages


def activations_stage(url: str) -> tuple[str, dict]:
    return "activations", {
        "model": f"{R}/model.json",
        "responses": [f"{R}/responses/pirate.parquet"],
        "outputs": [f"{R}/activations/pirate.safetensors"],
        "layers": "all",
    }


def vectors_stage(url: str) -> tuple[str, dict]:
    return "vectors", {
        "activations": f"{R}/activations/pirate.safetensors",
        "output": f"{R}/vectors/pirate.safetensors",
        "role": "pirate",
        "scores": f"{R}/scores/pirate.parquet",
        "min_score": 1,
        "min_count": 1,
        "model": f"{R}/model.json",
    }


def axis_stage(url: str) -> tuple[str, dict]:
    return "axis", {
        "vector_files": [f"{R}/vectors/{r}.safetensors" for r in ["default", *TINY_ROLES]],
        "output": f"{R}/axis.safetensors",
        "output_pt": f"{R}/axis.pt",
        "summary": f"{R}/vectors/summary.parquet",
        "model": f"{R}/model.json",
        "config_hash": "0",
    }


def judge_stage(backend: str, **settings) -> Callable[[str], tuple[str, dict]]:
    from assistant_axis.judge import DEFAULT_TEMPLATE

    def build(url: str) -> tuple[str, dict]:
        if backend == "openai":
            settings.update(base_url=url, model="fake", api_key_env=None, cache=None, max_retries=0)
        return "judge", {
            "responses": f"{R}/responses/pirate.parquet",
            "output": f"{R}/scores/pirate.parquet",
            "role": "pirate",
            "description": "A pirate.",
            "template": DEFAULT_TEMPLATE,
            "backend": backend,
            "settings": settings,
        }

    return build


def foreign_capping(work: Path) -> None:
    """A capping config made for another model (hidden size 896), next to a one-message conversation."""
    config = sorted((work / R / "capping").glob("*.safetensors"))[0]
    (work / "downloads").mkdir()
    shutil.copy(config, work / "downloads/qwen-capping.safetensors")

    def other_model(tensors: dict, meta: dict) -> None:
        tensors["vectors"] = torch.randn(len(tensors["layers"]), 896)
        meta.update(model="qwen2.5-0.5b-instruct", hidden_size="896")

    edit_tensors("downloads/qwen-capping.safetensors", other_model)(work)
    (work / "conversation.json").write_text(json.dumps([{"role": "user", "content": "Hello there."}]))


PROJECT_WITH_CAP = [
    sys.executable,
    "-m",
    "assistant_axis.cli",
    "project",
    "conversation.json",
    "--model",
    f"results/models/{M}",
    "--axis",
    f"{R}/axis.safetensors",
    "--cap",
    "downloads/qwen-capping.safetensors",
]


def nonsense_text(body: dict, auth: str) -> tuple[int, dict]:
    return 200, completion("Bananas are yellow.")


def nonsense_logprobs(body: dict, auth: str) -> tuple[int, dict]:
    return 200, completion("Ban", top_logprobs=[("Ban", -0.1), ("Yes", -2.5), ("The", -3.0)])


# -------------------------------------------------------------------------------------------- cases


@dataclass
class Case:
    id: str
    edit: Callable[[Path], None]
    expect: str  # the one error line contains this: the file, then the field or value
    stage: Callable[[str], tuple[str, dict]] | None = None  # None: a whole `snakemake` run
    args: tuple[str, ...] = ()  # extra snakemake arguments
    reply: Callable | None = None  # a scripted OpenAI-compatible server for the stage
    command: list[str] | None = None  # a command line instead of Snakemake or a stage


ROLE = "data/roles/pirate.yaml"
QUESTIONS = "data/questions/questions.jsonl"
CONFIG = "config/config.yaml"
CASES = [
    # role files
    Case("role-not-yaml", write(ROLE, "name: pirate\nprompts: [unclosed\n"), f"{ROLE}: line 3: not valid YAML"),
    Case("role-is-a-list", write(ROLE, "- pirate\n- ghost\n"), f"{ROLE}: file: expected a mapping of role fields"),
    Case("role-without-prompts", pirate(lambda d: d.pop("prompts")), f"{ROLE}: prompts: missing"),
    Case(
        "role-with-six-prompts",
        pirate(lambda d: d["prompts"].append("You are a pirate, again.")),
        f"{ROLE}: prompts: expected exactly 5 prompts, found 6",
    ),
    Case("role-empty-prompt", pirate(lambda d: d["prompts"].__setitem__(2, "  ")), f"{ROLE}: prompts[2]: empty prompt"),
    Case(
        "role-duplicate-prompt",
        pirate(lambda d: d["prompts"].__setitem__(3, d["prompts"][1])),
        f"{ROLE}: prompts[3]: duplicate of an earlier prompt",
    ),
    Case(
        "role-name-not-file-name",
        pirate(lambda d: d.update(name="buccaneer")),
        f"{ROLE}: name: 'buccaneer' does not match the file name 'pirate'",
    ),
    Case("role-misspelt-field", pirate(lambda d: d.update(promts=d["prompts"])), f"{ROLE}: promts: unknown field"),
    Case(
        "role-unknown-family", pirate(lambda d: d.update(family="pirates")), f"{ROLE}: family: unknown family 'pirates'"
    ),
    Case(
        "role-description-not-text",
        pirate(lambda d: d.update(description=["sails", "rum"])),
        f"{ROLE}: description: expected text, got list",
    ),
    Case(
        "role-unknown-placeholder",
        pirate(lambda d: d["prompts"].__setitem__(0, "You are {model}, a pirate.")),
        f"{ROLE}: prompts[0]: unknown placeholder {{model}}",
    ),
    Case(
        "role-judge-prompt-without-response",
        pirate(lambda d: d.update(judge_prompt="Is this pirate-like?")),
        f"{ROLE}: judge_prompt: has no {{response}} placeholder",
    ),
    Case(
        "role-prompt-of-another-role",
        lambda w: pirate(
            lambda d: d["prompts"].__setitem__(
                0, yaml.safe_load((w / "data/roles/ghost.yaml").read_text())["prompts"][0]
            )
        )(w),
        f"{ROLE}: prompts[0]: same prompt as role 'ghost'",
    ),
    Case(
        "default-role-missing",
        lambda w: (w / "data/roles/default.yaml").unlink(),
        "data/roles: default: the bank has no default.yaml",
    ),
    # question files
    Case(
        "questions-not-json",
        edit_lines(QUESTIONS, lambda lines: lines.__setitem__(1, '{"id": "x", "question": ')),
        f"{QUESTIONS}: line 2: not valid JSON",
    ),
    Case(
        "questions-not-an-object",
        edit_lines(QUESTIONS, lambda lines: lines.__setitem__(0, "[1, 2]")),
        f"{QUESTIONS}: line 1: expected a JSON object",
    ),
    Case(
        "question-without-text",
        edit_question(0, lambda q: q.pop("question")),
        f"{QUESTIONS}: line 1: question: missing or empty",
    ),
    Case(
        "question-id-twice",
        lambda w: edit_question(
            1, lambda q: q.update(id=json.loads((w / QUESTIONS).read_text().splitlines()[0])["id"])
        )(w),
        f"{QUESTIONS}: line 2: id: duplicate question id",
    ),
    Case("questions-empty", write(QUESTIONS, "\n"), f"{QUESTIONS}: file: no questions"),
    # config values
    Case(
        "config-unknown-backend",
        config(lambda c: c["generate"].update(backend="tgi")),
        f"{CONFIG}: generate.backend: 'tgi' is not one of",
    ),
    Case(
        "config-unknown-judge-backend",
        config(lambda c: c["judge"].update(backend="gpt4")),
        f"{CONFIG}: judge.backend: 'gpt4' is not one of",
    ),
    Case(
        "config-negative-max-tokens",
        config(lambda c: c["generate"].update(max_tokens=-5)),
        f"{CONFIG}: generate.max_tokens: -5 is less than the minimum of 1",
    ),
    Case("config-top-p-zero", config(lambda c: c["generate"].update(top_p=0)), f"{CONFIG}: generate.top_p: 0 is less"),
    Case(
        "config-layer-beyond-model",
        config(lambda c: c["activations"].update(layers=[10, 40])),
        f"{CONFIG}: activations.layers: layer 40 is outside the model's 30 layers",
    ),
    Case(
        "config-min-score-5",
        config(lambda c: c["vectors"].update(min_score=5)),
        f"{CONFIG}: vectors.min_score: 5 is greater than the maximum of 3",
    ),
    Case(
        "config-misspelt-key",
        config(lambda c: c["vectors"].update(min_scor=2)),
        f"{CONFIG}: vectors.min_scor: unknown key",
    ),
    Case(
        "config-role-not-in-bank",
        config(lambda c: c["roles"].update(include=["pirat"])),
        f"{CONFIG}: roles.include: no role 'pirat' in data/roles",
    ),
    Case(
        "config-more-questions-than-file",
        config(lambda c: c["questions"].update(n_questions=500)),
        f"{CONFIG}: questions.n_questions: 500 requested but {QUESTIONS} has 240",
    ),
    Case(
        "config-judge-api-misspelt-setting",
        config(
            lambda c: c["judge"].update(backend="openai", openai={"base_ur": "http://127.0.0.1:9/v1", "model": "m"})
        ),
        f"{CONFIG}: judge.openai.base_ur: unknown setting",
    ),
    Case(
        "config-judge-template-without-response",
        config(lambda c: c["judge"].update(template="Rate the {role}.")),
        f"{CONFIG}: judge.template: has no {{response}} placeholder",
    ),
    Case(
        "configfile-option-bad-value",
        write("config/extra.yaml", "generate:\n  max_tokens: 0\n"),
        "config/extra.yaml: generate.max_tokens: 0 is less than the minimum of 1",
        args=("--configfile", "config/extra.yaml"),
    ),
    Case(
        "model-manifest-corrupt",
        write(f"{R}/model.json", '{"name": "smollm2'),
        f"{R}/model.json: file: not a readable model manifest",
    ),
    # artifacts, given to the stage that reads them
    Case(
        "responses-missing-column",
        edit_parquet(f"{R}/responses/pirate.parquet", lambda f: f.drop(columns="response")),
        f"{R}/responses/pirate.parquet: response: column missing",
        activations_stage,
    ),
    Case(
        "responses-truncated",
        truncate(f"{R}/responses/pirate.parquet"),
        f"{R}/responses/pirate.parquet: file: not a readable Parquet table",
        judge_stage("embedding"),
    ),
    Case(
        "activations-wrong-hidden-size",
        edit_tensors(f"{R}/activations/pirate.safetensors", wrong_hidden_size),
        f"{R}/activations/pirate.safetensors: activations: hidden size 512",
        vectors_stage,
    ),
    Case(
        "activations-wrong-row-count",
        edit_tensors(f"{R}/activations/pirate.safetensors", drop_a_row),
        f"{R}/activations/pirate.safetensors: activations: 3 rows but {R}/scores/pirate.parquet has 4 scores",
        vectors_stage,
    ),
    Case(
        "activations-of-another-model",
        edit_tensors(f"{R}/activations/pirate.safetensors", foreign_activations),
        f"{R}/activations/pirate.safetensors: model: activations of model 'qwen2.5-0.5b-instruct'",
        vectors_stage,
    ),
    Case(
        "activations-truncated",
        truncate(f"{R}/activations/pirate.safetensors"),
        f"{R}/activations/pirate.safetensors: file: not a readable safetensors file",
        vectors_stage,
    ),
    Case(
        "activations-without-layers",
        edit_tensors(f"{R}/activations/pirate.safetensors", lambda t, m: t.pop("layers")),
        f"{R}/activations/pirate.safetensors: layers: tensor missing",
        vectors_stage,
    ),
    Case(
        "scores-missing-column",
        edit_parquet(f"{R}/scores/pirate.parquet", lambda f: f.drop(columns="score")),
        f"{R}/scores/pirate.parquet: score: column missing",
        vectors_stage,
    ),
    Case(
        "scores-out-of-range",
        edit_parquet(f"{R}/scores/pirate.parquet", lambda f: f.assign(score=7)),
        f"{R}/scores/pirate.parquet: score: 7 in row 0 is not a score 0-3",
        vectors_stage,
    ),
    Case(
        "vectors-of-another-model",
        edit_tensors(f"{R}/vectors/pirate.safetensors", foreign_vector),
        f"{R}/vectors/pirate.safetensors: model: vector of model 'qwen2.5-0.5b-instruct'",
        axis_stage,
    ),
    Case(
        "judge-answers-nonsense",
        lambda w: None,
        f"{R}/responses/pirate.parquet: judge: openai:fake:parse answered 4 responses without a usable score "
        "(no digit 0-3 in the judge's reply 'Bananas are yellow.')",
        judge_stage("openai", scoring="parse"),
        reply=nonsense_text,
    ),
    Case(
        "judge-logprobs-without-digits",
        lambda w: None,
        f"{R}/responses/pirate.parquet: judge: openai:fake:logprobs answered 4 responses without a usable score "
        "(no digit 0-3 among the top logprobs of 'Ban')",
        judge_stage("openai", scoring="logprobs"),
        reply=nonsense_logprobs,
    ),
    Case(
        "capping-config-of-another-model",
        foreign_capping,
        "downloads/qwen-capping.safetensors: model: capping config for model 'qwen2.5-0.5b-instruct', "
        "not 'smollm2-135m-instruct'",
        command=PROJECT_WITH_CAP,
    ),
]


# -------------------------------------------------------------------------------------------- running


def digests(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder` (the model link is not followed)."""
    found = {}
    for base, _dirs, files in os.walk(folder):
        for name in files:
            path = Path(base) / name
            found[str(path.relative_to(folder))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def _copy(run: Path, dest: Path) -> Path:
    return copy_run(run, dest)


def test_a_copy_of_the_finished_run_plans_nothing(tiny_run, tmp_path):
    """Else a case could rerun jobs (and delete their outputs) for reasons of its own."""
    work = _copy(tiny_run, tmp_path / "work")
    out = subprocess.run(
        [*SNAKEMAKE, "-n", "--cores", "2"], cwd=work, capture_output=True, text=True, env={**os.environ, **NO_SLURM}
    )
    assert out.returncode == 0 and "Nothing to be done" in out.stdout + out.stderr, out.stdout + out.stderr


def test_there_are_enough_cases():
    assert len(CASES) >= 25 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_fails_in_one_line_and_changes_nothing(case, tiny_run, tmp_path):
    work = _copy(tiny_run, tmp_path / "work")
    case.edit(work)
    before = digests(work / "results")
    with FakeOpenAI(case.reply) if case.reply else nullcontext() as server:
        if case.command:
            command = case.command
        elif case.stage is None:
            command = [*SNAKEMAKE, "--cores", "2", *case.args]
        else:
            stage, kwargs = case.stage(server.url if server else "")
            command = [
                sys.executable,
                str(HERE / "run_stage.py"),
                stage,
                str(tmp_path / "stage.log"),
                json.dumps(kwargs),
            ]
        out = subprocess.run(
            command, cwd=work, capture_output=True, text=True, timeout=600, env={**os.environ, **NO_SLURM}
        )
    text = out.stdout + out.stderr
    errors = [line for line in text.splitlines() if line.startswith("error: ")]
    print(f"{case.id}: {errors}")
    assert out.returncode != 0, text[-3000:]
    assert len(errors) == 1 and case.expect in errors[0], text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    assert digests(work / "results") == before
