"""Security: no pickle on any load path, remote code only when the config asks for it, and an API key that
never reaches a file (results, logs, Snakemake's records, the API cache, the report)."""

from __future__ import annotations

import ast
import inspect
import json
import os
import subprocess
from importlib import import_module
from pathlib import Path

import pytest
import yaml
from fake_openai import FakeOpenAI, completion

from workflow_helpers import ROOT, SNAKEMAKE, make_workspace, tiny_config

SENTINEL = "sk-axis-sentinel-0d15ea5e-security"
KEY_ENV = "AXIS_SECURITY_TEST_KEY"
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


# ------------------------------------------------------------------------------------- static scan


def unsafe_calls(source: str, name: str = "<source>") -> list[str]:
    """Pickle imports, pickle readers, torch.load without weights_only=True, weights_only=False,
    allow_pickle=True, trust_remote_code=True, and a transformers model loaded without
    use_safetensors=True (which would unpickle a pytorch_model.bin), found by the syntax tree."""
    found = []
    for node in ast.walk(ast.parse(source)):
        where = f"{name}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            found += [f"{where}: import {a.name}" for a in node.names if a.name.split(".")[0] in UNSAFE_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNSAFE_MODULES:
            found.append(f"{where}: from {node.module} import")
        elif isinstance(node, ast.Attribute) and node.attr in ("read_pickle", "to_pickle"):
            found.append(f"{where}: {node.attr}")
        elif isinstance(node, ast.Call):
            keywords = {k.arg: k.value for k in node.keywords}
            func = node.func
            if isinstance(func, ast.Attribute) and func.attr == "load" and getattr(func.value, "id", "") == "torch":
                value = keywords.get("weights_only")
                if not (isinstance(value, ast.Constant) and value.value is True):
                    found.append(f"{where}: torch.load without weights_only=True")
            if (
                isinstance(func, ast.Attribute)
                and func.attr == "from_pretrained"
                and getattr(func.value, "id", "").startswith("AutoModel")
                and "gguf_file" not in keywords
            ):
                value = keywords.get("use_safetensors")
                if not (isinstance(value, ast.Constant) and value.value is True):
                    found.append(f"{where}: {func.value.id}.from_pretrained without use_safetensors=True")
            for key, unsafe in (("weights_only", False), ("allow_pickle", True), ("trust_remote_code", True)):
                value = keywords.get(key)
                if isinstance(value, ast.Constant) and value.value is unsafe:
                    found.append(f"{where}: {key}={unsafe}")
    return found


def package_sources() -> list[Path]:
    return sorted((ROOT / "src/assistant_axis").rglob("*.py")) + sorted((ROOT / "workflow/scripts").glob("*.py"))


def test_the_scan_finds_what_it_looks_for():
    bad = (
        "import pickle\nfrom joblib import load\nimport torch, pandas as pd\n"
        "torch.load('a.pt')\ntorch.load('b.pt', weights_only=False)\npd.read_pickle('c')\n"
        "np.load('d.npy', allow_pickle=True)\nAutoModel.from_pretrained('m', trust_remote_code=True)\n"
    )
    assert len(unsafe_calls(bad)) == 9  # the last line twice: remote code, and no use_safetensors
    good = (
        "torch.load('axis.pt', weights_only=True)\nload_model(p, trust_remote_code=flag)\n"
        "AutoModelForCausalLM.from_pretrained(p, use_safetensors=True)\n"
        "AutoModel.from_pretrained(d, gguf_file=f)\n"
    )
    assert unsafe_calls(good) == []


def test_no_pickle_and_no_unasked_remote_code_in_the_package():
    found = [hit for path in package_sources() for hit in unsafe_calls(path.read_text(), str(path.relative_to(ROOT)))]
    assert found == []
    # The rules and the Snakefile are not plain Python: a text check there.
    for path in [ROOT / "Snakefile", *sorted((ROOT / "workflow").rglob("*.smk"))]:
        text = path.read_text()
        assert "pickle" not in text and "weights_only=False" not in text and "trust_remote_code=True" not in text, path


def test_trust_remote_code_is_off_unless_the_config_turns_it_on():
    from assistant_axis.plan import validate_config

    # Every function of the package that takes the flag leaves it off by default.
    for path in sorted((ROOT / "src/assistant_axis").glob("*.py")):
        module = import_module(f"assistant_axis.{path.stem}")
        for name, obj in vars(module).items():
            for func in [obj, *(vars(obj).values() if inspect.isclass(obj) else [])]:
                func = getattr(func, "__func__", func)
                if inspect.isfunction(func) and getattr(func, "__module__", "") == module.__name__:
                    param = inspect.signature(func).parameters.get("trust_remote_code")
                    # False, or no default at all (every caller must say).
                    assert param is None or param.default in (False, param.empty), f"{module.__name__}.{name}"
    # The config's default, and the shipped configs leave it off.
    config = tiny_config()
    config["model"].pop("trust_remote_code", None)
    validate_config(config, ROOT / "workflow/schemas/config.schema.yaml")
    assert config["model"]["trust_remote_code"] is False
    for shipped in ("config/config.yaml", "config/paper.yaml"):
        assert not yaml.safe_load((ROOT / shipped).read_text())["model"].get("trust_remote_code", False)
    # The configuration reference says what turning it on means.
    reference = (ROOT / "docs/configuration.md").read_text()
    assert "`trust_remote_code`" in reference and "runs Python code shipped with the weights" in reference


# --------------------------------------------------------------------------------- the API key


def _fake_api(question: str, poison: dict):
    """Generation gets a short reply, the judge a '3' with logprobs. While `poison["on"]`, a request about
    `question` from the ghost (generation) always fails with a 500 that echoes the key, as some proxies do:
    the job fails, and the error it reports must have the key scrubbed."""

    def reply(body: dict, auth: str) -> tuple[int, dict]:
        text = " ".join(m["content"] for m in body["messages"])
        judging = body.get("max_tokens") == 1
        if poison["on"] and not judging and question in text and "ghost" in text.lower():
            return 500, {"error": {"message": f"upstream failed for {auth}"}}
        if judging:
            return 200, completion("3", top_logprobs=[("3", -0.1), ("2", -2.5), ("1", -4.0), ("0", -5.0)])
        return 200, completion(f"Reply {body.get('seed')}: the tide turns and I answer in kind.")

    return reply


@pytest.mark.slow
def test_api_key_never_reaches_a_file(tmp_path, model_dir):
    questions = [json.loads(line) for line in (ROOT / "data/questions/questions.jsonl").read_text().splitlines()]
    question = questions[0]["question"]
    env = {**os.environ, KEY_ENV: SENTINEL, "SLURM_CONF": "/dev/null"}
    poison = {"on": True}
    with FakeOpenAI(_fake_api(question, poison)) as api:
        settings = {
            "base_url": api.url,
            "model": "fake",
            "api_key_env": KEY_ENV,
            "max_retries": 1,
            "backoff": 0.01,
            "cache": "cache/api",
        }
        config = tiny_config(
            generate={"backend": "openai", "openai": settings},
            judge={"backend": "openai", "openai": {**settings, "scoring": "logprobs"}},
        )
        roles = ["ghost", "pirate"]  # the failing role and one that finishes
        config["roles"]["include"] = roles
        work = make_workspace(tmp_path / "work", model_dir, config, bank=roles)
        # The ghost's generation keeps failing: its job fails, the others finish (--keep-going).
        failed = subprocess.run(
            [*SNAKEMAKE, "--cores", "2", "--keep-going"], cwd=work, capture_output=True, text=True, env=env
        )
        assert failed.returncode != 0
        ghost_log = (work / "logs/smollm2-135m-instruct/generate/ghost.log").read_text()
        assert "requests failed after 1 retries" in ghost_log and "Bearer ***" in ghost_log
        # The server recovers: the rerun finishes the workflow, and the report is written.
        poison["on"] = False
        run = subprocess.run([*SNAKEMAKE, "--cores", "2"], cwd=work, capture_output=True, text=True, env=env)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        report = subprocess.run(
            [*SNAKEMAKE, "--cores", "2", "--report", "report.html"], cwd=work, capture_output=True, text=True, env=env
        )
        assert report.returncode == 0 and (work / "report.html").is_file(), report.stderr[-3000:]
    # The key was sent, and a server echoed it back in errors.
    assert set(api.authorizations) == {f"Bearer {SENTINEL}"}
    # Nowhere on disk: results, job logs, Snakemake's logs and metadata, the API cache, the report.
    hits = []
    for folder in ("results", "logs", ".snakemake", "cache"):
        for base, _dirs, files in os.walk(work / folder):
            hits += [Path(base) / f for f in files if SENTINEL.encode() in (Path(base) / f).read_bytes()]
    assert any((work / "cache/api").rglob("*.json")) and (work / "logs").is_dir()
    assert SENTINEL not in (work / "report.html").read_text(errors="replace")
    assert SENTINEL not in failed.stdout + failed.stderr + run.stdout + run.stderr + report.stdout + report.stderr
    assert hits == []
