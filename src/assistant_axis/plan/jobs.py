"""How the workflow's jobs are laid out on a machine or a cluster: shards of roles for the stages that load
a model, and each stage's resources (GPUs, CPU threads, time and memory by attempt, API budget shares)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from assistant_axis.api import APISettings
from assistant_axis.engines import ENGINES, EngineSpec
from assistant_axis.errors import InputError
from assistant_axis.judge import judge_spec
from assistant_axis.layers import config_dims
from assistant_axis.plan.config import without_planning_keys
from assistant_axis.roles import stable_seed

__all__ = ["Jobs", "DEFAULT_RESOURCES", "MODEL_STAGES", "DEFAULT_API_JOBS"]

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
    "drift": {"runtime": 120, "mem_mb": 32000},
}
# The stages that run the model's weights; calibrate too when it calibrates on tokens (Plan.loads_a_model).
MODEL_STAGES = ("generate", "activations", "evaluate", "drift")
DEFAULT_API_JOBS = 4


@dataclass
class Jobs:
    config: dict
    role_names: list[str]

    def groups(self, stage: str) -> list[tuple[str, list[str] | None]]:
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

    def engine(self, stage: str) -> tuple[EngineSpec | None, dict]:
        """The engine a stage's jobs run the model in (None: none of the workflow's, e.g. the embedding
        judge), and its settings block in the stage's config section (`generate.vllm`). Drift runs in the
        evaluate stage's engine."""
        section = "evaluate" if stage == "drift" else stage
        if section == "judge":
            name = judge_spec(self.config["judge"]["backend"]).engine
        elif section in ("generate", "activations", "evaluate"):
            name = self.config[section].get("backend", "transformers")
        else:
            return None, {}
        if name is None:
            return None, {}
        spec = ENGINES[name]
        return spec, (self.config[section].get(spec.block) or {}) if spec.block else {}

    def parallel_settings(self, stage: str) -> dict | None:
        """The settings of a stage whose engine takes GPUs and processes by tensor parallel size (vLLM), else None."""
        spec, settings = self.engine(stage)
        return settings if spec is not None and spec.parallel else None

    @property
    def captures_activations(self) -> bool:
        """Whether generation records the activations (`generate.capture_activations`): no activations jobs."""
        return bool(self.config["generate"].get("capture_activations"))

    def loads_a_model(self, stage: str) -> bool:
        """Whether a stage's jobs run model weights: the model stages (generate unless its engine is a
        server's), a judge with a model of its own, and a calibration on every token
        (`capping.calibration: token`)."""
        if stage in ("generate", "judge"):
            spec, _ = self.engine(stage)
            return spec is not None and spec.runs_weights
        if stage == "calibrate":
            return self.calibration == "token"
        return stage in MODEL_STAGES

    @property
    def calibration(self) -> str:
        """What the capping thresholds are percentiles of: `token` (every default reply token) or `reply`."""
        return (self.config.get("capping") or {}).get("calibration", "token")

    def gpus(self, stage: str) -> int:
        """GPUs each job of `stage` asks for, decided here only: 0 for stages that load no model; else
        `resources.<stage>.gpu`, a vLLM stage's tensor parallel size, or `model.gpus`."""
        if not self.loads_a_model(stage):
            return 0
        explicit = (self.config.get("resources") or {}).get(stage, {}).get("gpu")
        if explicit is not None:
            return explicit
        parallel = self.parallel_settings(stage)
        if parallel is not None:
            return parallel.get("tensor_parallel_size", 1)  # what the engine will use (its default: 1)
        return self.config["model"]["gpus"]

    def threads(self, stage: str, default: int) -> int:
        """CPU cores of a stage's jobs: vLLM runs processes of its own beside one per GPU (at least 2 + GPUs)."""
        parallel = self.parallel_settings(stage)
        return default if parallel is None else max(default, 2 + int(parallel.get("tensor_parallel_size", 1)))

    def api_sections(self, stage: str) -> list[str]:
        """The OpenAI-compatible API sections a stage's jobs send requests through."""
        sections = []
        if stage == "generate" and self.engine("generate")[0].api:
            sections.append("generate")
        judge = judge_spec(self.config["judge"]["backend"]).engine
        if stage in ("judge", "evaluate") and judge is not None and ENGINES[judge].api:
            sections.append("judge")
        return sections

    def api_jobs(self, section: str) -> int:
        """How many jobs of an API section run at once (`<section>.openai.jobs`, default 4)."""
        return int((self.config[section].get("openai") or {}).get("jobs", DEFAULT_API_JOBS))

    def api_settings(self, section: str) -> dict:
        """One job's share of an API section's budget: `requests_per_second` and `concurrency` are for the
        whole workflow, and at most `jobs` jobs of the section run at once (a Snakemake global resource).
        Keys only planning reads (the judge's `prices`) are left out: no job sees them, no edit of them reruns one."""
        settings = without_planning_keys(section, "openai", self.config[section].get("openai") or {})
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
        resources = {
            "runtime": lambda wildcards, attempt: runtime * attempt,
            "mem_mb": lambda wildcards, attempt: mem_mb * attempt,
        }
        gpus = self.gpus(stage)
        if gpus:
            resources["gpu"] = gpus
            if settings.get("gpu_model"):
                resources["gpu_model"] = settings["gpu_model"]
        for section in self.api_sections(stage):
            resources[f"{section}_api_jobs"] = 1
        return resources

    def model_dims(self) -> tuple[int, int] | None:
        """(n_layers, hidden_size) without loading the model: from the prepared manifest, the config's
        `model.n_layers`/`model.hidden_size`, or a local model directory's config.json."""
        model = self.config["model"]
        manifest = Path("results") / model["name"] / "model.json"
        if manifest.is_file():
            try:
                info = json.loads(manifest.read_text())
                dims = int(info["n_layers"]), int(info["hidden_size"])
            except (ValueError, TypeError, KeyError) as exc:
                raise InputError(
                    manifest, "file", f"not a readable model manifest ({exc}): delete it to prepare the model again"
                ) from exc
            if info.get("source") == model["source"]:  # else a stale manifest of another source
                return dims
        if model.get("n_layers") and model.get("hidden_size"):
            return model["n_layers"], model["hidden_size"]
        config_file = Path(model["source"]) / "config.json"
        if config_file.is_file():
            return config_dims(json.loads(config_file.read_text()))
        return None

    def activation_bytes(self, n_responses: int) -> int | None:
        """Disk the activations will take: responses x layers x hidden x dtype size (None: dims unknown)."""
        dims = self.model_dims()
        if dims is None:
            return None
        n_layers, hidden = dims
        layers = self.config["activations"]["layers"]
        n = n_layers if layers == "all" else len(layers)
        dtype = self.config["activations"]["dtype"]  # float32, bfloat16 or float16 (the schema's)
        size = int(dtype.removeprefix("b").removeprefix("float")) // 8
        return n_responses * n * hidden * size
