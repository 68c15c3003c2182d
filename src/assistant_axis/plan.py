"""What the workflow runs, decided at DAG-build time from the validated config.

Each stage gets only the data it uses as Snakemake `params`, so Snakemake's params trigger reruns
exactly what an edit affects: a role's prompts feed its generation, its description feeds its judging.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from assistant_axis.api import APISettings
from assistant_axis.backends import stable_seed
from assistant_axis.errors import InputError
from assistant_axis.judge import DEFAULT_TEMPLATE
from assistant_axis.models import DTYPES
from assistant_axis.roles import (
    DEFAULT_ROLE,
    Question,
    Role,
    load_bank,
    load_paper_questions,
    load_paper_role,
    load_questions,
)

__all__ = ["Plan", "DEFAULT_RESOURCES", "validate_config", "config_source", "canonical"]

# Sane per-job defaults (minutes, MB); config `resources.<stage>` overrides them per stage.
DEFAULT_RESOURCES = {
    "prepare_model": {"runtime": 60, "mem_mb": 16000},
    "generate": {"runtime": 360, "mem_mb": 32000},
    "activations": {"runtime": 360, "mem_mb": 32000},
    "judge": {"runtime": 240, "mem_mb": 8000},
    "vectors": {"runtime": 30, "mem_mb": 8000},
    "axis": {"runtime": 30, "mem_mb": 8000},
    "pca": {"runtime": 30, "mem_mb": 8000},
    "stability": {"runtime": 120, "mem_mb": 16000},
    "calibrate": {"runtime": 30, "mem_mb": 16000},
    "evaluate": {"runtime": 240, "mem_mb": 32000},
}
# The stages that run the model's weights; calibrate too when it calibrates on tokens (Plan.loads_a_model).
MODEL_STAGES = ("generate", "activations", "evaluate")
DEFAULT_API_JOBS = 4
# The config sections that decide the axis's values (its upstream stages).
AXIS_SECTIONS = ("model", "roles", "questions", "generate", "activations", "judge", "vectors")


def _load_roles(bank: Path, layout: str) -> dict[str, Role]:
    if layout == "paper":
        roles = {p.stem: load_paper_role(p) for p in sorted(bank.glob("*.json"))}
        if DEFAULT_ROLE not in roles:
            raise InputError(bank, DEFAULT_ROLE, "the bank has no default.json")
        return roles
    return load_bank(bank)


def config_source(files: Sequence[str | Path], key: Sequence[str | int]) -> str:
    """The config file that sets `key` (`files` lowest precedence first), for naming it in a message."""
    for file in reversed(files):
        try:
            node = yaml.safe_load(Path(file).read_text())
        except (OSError, yaml.YAMLError):
            continue
        for part in key:
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and isinstance(part, int) and part < len(node):
                node = node[part]
            else:
                break
        else:
            return str(file)
    return str(files[-1]) if files else "config"


def validate_config(config: dict, schema_file: str | Path, files: Sequence[str | Path] = ()) -> None:
    """Check `config` against the JSON schema and fill in its defaults (as Snakemake's `validate` does);
    the first problem is raised as one line naming the config file and the key."""
    import jsonschema

    schema = yaml.safe_load(Path(schema_file).read_text())
    base = jsonschema.Draft202012Validator
    integers: list[tuple[dict, str]] = []  # integers where the schema says `number`: floats once valid

    def properties_with_defaults(validator, properties, instance, subschema):
        if isinstance(instance, dict):
            for name, prop in properties.items():
                if "default" in prop:
                    instance.setdefault(name, copy.deepcopy(prop["default"]))
                value = instance.get(name)
                if prop.get("type") == "number" and isinstance(value, int) and not isinstance(value, bool):
                    integers.append((instance, name))
        yield from base.VALIDATORS["properties"](validator, properties, instance, subschema)

    validator = jsonschema.validators.extend(base, {"properties": properties_with_defaults})(schema)
    error = jsonschema.exceptions.best_match(validator.iter_errors(config))
    if error is None:
        for instance, name in integers:  # `1` and `1.0` are one value: as floats, params compare equal
            instance[name] = float(instance[name])
        canonical(config)
        return
    path, problem = list(error.absolute_path), error.message
    if error.validator == "additionalProperties":  # name the unknown key itself
        known, patterns = error.schema.get("properties", {}), error.schema.get("patternProperties", {})
        extra = [k for k in error.instance if k not in known and not any(re.search(p, k) for p in patterns)]
        names = list(known) or [p.strip("^$()") for p in patterns]
        path, problem = [*path, extra[0]], f"unknown key (known: {', '.join(names)})"
    elif error.validator == "required":
        missing = next(k for k in error.validator_value if k not in error.instance)
        path, problem = [*path, missing], "missing"
    key = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".") or "(top level)"
    raise InputError(config_source(files, path), key, problem)


def canonical(value):
    """Sort every mapping's keys in place, recursively: Snakemake compares a dict param with its key order,
    so a config rewritten with its keys in another order would otherwise rerun every job."""
    if isinstance(value, dict):
        items = sorted(((key, canonical(item)) for key, item in value.items()), key=lambda kv: str(kv[0]))
        value.clear()
        value.update(items)
    elif isinstance(value, list):
        value[:] = [canonical(item) for item in value]
    return value


@dataclass
class Plan:
    config: dict
    roles: dict[str, Role]  # the selected roles, `default` included
    questions: list[Question]

    @classmethod
    def from_config(cls, config: dict, root: str | Path = ".") -> Plan:
        root = Path(root)
        layout = config["roles"].get("layout", "ours")
        bank = _load_roles(root / config["roles"]["bank"], layout)
        include = config["roles"]["include"]
        names = sorted(n for n in bank if n != DEFAULT_ROLE) if include == "all" else list(include)
        for name in names:
            if name not in bank:
                raise InputError("config", "roles.include", f"no role {name!r} in {config['roles']['bank']}")
        if len(set(names)) != len(names):
            raise InputError("config", "roles.include", "a role is listed twice")
        roles = {DEFAULT_ROLE: bank[DEFAULT_ROLE], **{n: bank[n] for n in names if n != DEFAULT_ROLE}}
        qfile = root / config["questions"]["file"]
        questions = load_paper_questions(qfile) if layout == "paper" else load_questions(qfile)
        n_questions = config["questions"].get("n_questions")
        if n_questions is not None:
            if n_questions > len(questions):
                raise InputError("config", "questions.n_questions",
                                 f"{n_questions} requested but {qfile} has {len(questions)}")
            questions = questions[:n_questions]
        return cls(config, roles, questions)

    @classmethod
    def for_workflow(cls, config: dict, schema_file: str | Path, files: Sequence[str | Path] = ()) -> Plan:
        """Validate, plan and check everything that can be checked before a job runs (Snakemake deletes a
        job's old outputs when it starts, so a bad value caught later would cost existing results).
        A problem with a config value names the config file (`files`: lowest precedence first)."""
        try:
            validate_config(config, schema_file, files)
            plan = cls.from_config(config)
            plan.check()
        except InputError as exc:
            if exc.source != "config":
                raise
            key = [int(k) if k.isdigit() else k for k in exc.field.split(".")]
            raise InputError(config_source(files, key), exc.field, exc.problem) from exc
        return plan

    def check(self) -> None:
        """Semantic checks of a schema-valid config: layers against the model (when its size is known),
        API settings, and judge prompts that show the judge the response."""
        from assistant_axis.activations import resolve_layers

        dims = self.model_dims()
        if dims is not None:
            resolve_layers(self.config["activations"]["layers"], dims[0])
        for section in ("generate", "judge"):
            jobs = (self.config[section].get("openai") or {}).get("jobs", DEFAULT_API_JOBS)
            if not isinstance(jobs, int) or isinstance(jobs, bool) or jobs < 1:
                raise InputError("config", f"{section}.openai.jobs", f"must be an integer >= 1, got {jobs!r}")
        if self.config["generate"]["backend"] == "openai":
            APISettings.from_config(self.api_settings("generate"), "generate.openai")
        judge = self.config["judge"]
        if judge["backend"] == "openai":
            settings = self.api_settings("judge")
            scoring = settings.pop("scoring", "logprobs")
            if scoring not in ("logprobs", "parse"):
                raise InputError("config", "judge.openai.scoring", f"expected 'logprobs' or 'parse', got {scoring!r}")
            for key in ("top_logprobs", "system"):
                settings.pop(key, None)
            APISettings.from_config(settings, "judge.openai")
        if judge.get("template") and "{response}" not in judge["template"]:
            raise InputError("config", "judge.template", "has no {response} placeholder: the judge would not see it")
        for role in self.roles.values():
            if role.judge_prompt and "{response}" not in role.judge_prompt:
                raise InputError(role.source, "judge_prompt", "has no {response} placeholder: the judge would not "
                                 "see the response")

    @property
    def model(self) -> str:
        return self.config["model"]["name"]

    @property
    def role_names(self) -> list[str]:
        return list(self.roles)

    def system_prompts(self, role: str) -> list[str]:
        """The role's first `n_prompts` prompts, with `{model_name}` filled in."""
        display = self.config["model"].get("display_name") or self.model
        n = self.config["roles"]["n_prompts"]
        return [p.replace("{model_name}", display) for p in self.roles[role].prompts[:n]]

    def job_groups(self, stage: str) -> list[tuple[str, list[str] | None]]:
        """(rule name, roles) for a model-loading stage.

        Unsharded: one rule, `stage`, with a `{role}` wildcard (one role per job). With `shards: N`:
        rules `{stage}_shard0` .. and each role in shard `crc32(role) % N`, so adding a role moves
        no other role; empty shards get no rule.
        """
        n = self.config.get("shards")
        if not n:
            return [(stage, None)]
        groups: dict[int, list[str]] = {}
        for role in self.role_names:
            groups.setdefault(stable_seed(role) % n, []).append(role)
        return [(f"{stage}_shard{i}", sorted(groups[i])) for i in sorted(groups)]

    def outputs(self, pattern: str, roles: list[str] | None) -> list[str]:
        """`pattern` with `{role}` left as a wildcard (unsharded) or filled with each role of a shard."""
        if roles is None:
            return [pattern]
        return [pattern.replace("{role}", role) for role in roles]

    def vllm_settings(self, stage: str) -> dict | None:
        """The vLLM settings of a stage configured to run vLLM (generate or judge), else None."""
        if stage in ("generate", "judge") and self.config[stage]["backend"] == "vllm":
            return self.config[stage].get("vllm") or {}
        return None

    def loads_a_model(self, stage: str) -> bool:
        """Whether a stage's jobs run model weights: the model stages, a `local` or `vllm` judge, and a
        calibration on every token (`capping.calibration: token`)."""
        if stage == "generate":
            return self.config["generate"]["backend"] != "openai"
        if stage == "judge":
            return self.config["judge"]["backend"] in ("local", "vllm")
        if stage == "calibrate":
            return self.calibration == "token"
        return stage in MODEL_STAGES

    @property
    def calibration(self) -> str:
        """What the capping thresholds are percentiles of: `token` (every default reply token) or `reply`."""
        return (self.config.get("capping") or {}).get("calibration", "token")

    def calibration_model_params(self) -> dict:
        """The calibrate stage's model settings, as the activations stage loads and renders the model with them:
        for a `token` calibration only (a `reply` one loads no model, so editing them reruns none)."""
        if self.calibration != "token":
            return {}
        model = self.config["model"]
        return {"compute_dtype": model["dtype"], "batch_tokens": self.config["activations"]["batch_tokens"],
                "blocks": model["blocks"], "trust_remote_code": model["trust_remote_code"],
                "template_options": model["chat_template_kwargs"]}

    def gpus(self, stage: str) -> int:
        """GPUs each job of `stage` asks for, decided here only: 0 for stages that load no model; else
        `resources.<stage>.gpu`, a vLLM stage's tensor parallel size, or `model.gpus`."""
        if not self.loads_a_model(stage):
            return 0
        explicit = (self.config.get("resources") or {}).get(stage, {}).get("gpu")
        if explicit is not None:
            return explicit
        vllm = self.vllm_settings(stage)
        if vllm is not None:
            return vllm.get("tensor_parallel_size", 1)  # what the engine will use (its default: 1)
        return self.config["model"]["gpus"]

    def threads(self, stage: str, default: int) -> int:
        """CPU cores of a stage's jobs: vLLM runs processes of its own beside one per GPU (at least 2 + GPUs)."""
        vllm = self.vllm_settings(stage)
        return default if vllm is None else max(default, 2 + int(vllm.get("tensor_parallel_size", 1)))

    def api_sections(self, stage: str) -> list[str]:
        """The OpenAI-compatible API sections a stage's jobs send requests through."""
        sections = []
        if stage == "generate" and self.config["generate"]["backend"] == "openai":
            sections.append("generate")
        if stage in ("judge", "evaluate") and self.config["judge"]["backend"] == "openai":
            sections.append("judge")
        return sections

    def api_jobs(self, section: str) -> int:
        """How many jobs of an API section run at once (`<section>.openai.jobs`, default 4)."""
        return int((self.config[section].get("openai") or {}).get("jobs", DEFAULT_API_JOBS))

    def api_settings(self, section: str) -> dict:
        """One job's share of an API section's budget: `requests_per_second` and `concurrency` are for the
        whole workflow, and at most `jobs` jobs of the section run at once (a Snakemake global resource)."""
        settings = dict(self.config[section].get("openai") or {})
        jobs = settings.pop("jobs", DEFAULT_API_JOBS)
        total_rate = settings.get("requests_per_second", APISettings.requests_per_second)
        total_concurrency = settings.get("concurrency", APISettings.concurrency)
        settings["requests_per_second"] = total_rate / jobs
        settings["concurrency"] = max(1, total_concurrency // jobs)
        return settings

    def resources(self, stage: str) -> dict:
        """Snakemake resources of a stage's jobs.

        `runtime` and `mem_mb` grow with the attempt (a job retried after running out of time or memory
        asks for twice as much, then three times); `gpu` (+ `gpu_model`) only for stages that load a model
        and get GPUs (see `gpus`); `<section>_api_jobs: 1` for jobs that use an API budget.
        """
        settings = {**DEFAULT_RESOURCES[stage], **(self.config.get("resources") or {}).get(stage, {})}
        runtime, mem_mb = settings["runtime"], settings["mem_mb"]
        resources = {"runtime": lambda wildcards, attempt: runtime * attempt,
                     "mem_mb": lambda wildcards, attempt: mem_mb * attempt}
        gpus = self.gpus(stage)
        if gpus:
            resources["gpu"] = gpus
            if settings.get("gpu_model"):
                resources["gpu_model"] = settings["gpu_model"]
        for section in self.api_sections(stage):
            resources[f"{section}_api_jobs"] = 1
        return resources

    @property
    def n_responses(self) -> int:
        return sum(len(self.system_prompts(r)) for r in self.roles) * len(self.questions)

    def model_dims(self) -> tuple[int, int] | None:
        """(n_layers, hidden_size) without loading the model: from the prepared manifest, the config's
        `model.n_layers`/`model.hidden_size`, or a local model directory's config.json."""
        model = self.config["model"]
        manifest = Path("results") / self.model / "model.json"
        if manifest.is_file():
            try:
                info = json.loads(manifest.read_text())
                dims = int(info["n_layers"]), int(info["hidden_size"])
            except (ValueError, TypeError, KeyError) as exc:
                raise InputError(manifest, "file", f"not a readable model manifest ({exc}): delete it to "
                                 "prepare the model again") from exc
            if info.get("source") == model["source"]:  # else a stale manifest of another source
                return dims
        if model.get("n_layers") and model.get("hidden_size"):
            return model["n_layers"], model["hidden_size"]
        config_file = Path(model["source"]) / "config.json"
        if config_file.is_file():
            from assistant_axis.models import config_dims

            return config_dims(json.loads(config_file.read_text()))
        return None

    def activation_bytes(self) -> int | None:
        """Disk the activations will take: responses x layers x hidden x dtype size (None: dims unknown)."""
        dims = self.model_dims()
        if dims is None:
            return None
        n_layers, hidden = dims
        layers = self.config["activations"]["layers"]
        n = n_layers if layers == "all" else len(layers)
        size = DTYPES[self.config["activations"]["dtype"]].itemsize
        return self.n_responses * n * hidden * size

    def generate_jobs(self, roles: list[str]) -> list[dict]:
        return [{"role": role, "system_prompts": self.system_prompts(role)} for role in roles]

    def question_params(self) -> list[dict]:
        return [{"id": q.id, "question": q.question} for q in self.questions]

    def judge_params(self, role: str) -> dict:
        r = self.roles[role]
        judge = self.config["judge"]
        return {
            "role": r.name,
            "description": r.description,
            "template": r.judge_prompt or judge.get("template") or DEFAULT_TEMPLATE,
            "backend": judge["backend"],
            "settings": self.judge_backend_settings(),
        }

    def judge_backend_settings(self) -> dict:
        judge = self.config["judge"]
        return self.api_settings("judge") if judge["backend"] == "openai" else judge.get(judge["backend"], {})

    def generate_settings(self) -> dict:
        """What a generate job reads: sampling and its backend's settings (one job's API share)."""
        settings = {k: v for k, v in self.config["generate"].items() if k != "backend"}
        if self.config["generate"]["backend"] == "openai":
            settings["openai"] = self.api_settings("generate")
        return settings

    def capping_names(self) -> list[str]:
        """`<range>-p<percentile>` for every configured layer range and percentile."""
        capping = self.config["capping"]
        return [f"{name}-p{q:g}" for name in capping["ranges"] for q in capping["percentiles"]]

    def judge_settings(self) -> dict:
        """The judge as the evaluation stage uses it: the configured backend and template."""
        judge = self.config["judge"]
        return {"backend": judge["backend"], "settings": self.judge_backend_settings(),
                "template": judge.get("template") or DEFAULT_TEMPLATE}

    def config_hash(self) -> str:
        """A hash of the config sections the axis is made from (recorded in the axis as its provenance).

        Only these: a rule param, it would rerun the axis and all after it when an unrelated section
        (evaluation, capping, analysis, resources) changed."""
        made_from = {key: self.config.get(key) for key in AXIS_SECTIONS}
        return hashlib.sha256(json.dumps(made_from, sort_keys=True, default=str).encode()).hexdigest()[:16]
