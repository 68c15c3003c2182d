"""The planner on its own: which jobs get GPUs, how resources grow on retries, the shared API budget, and
configs that differ only in spelling planning the same."""

from __future__ import annotations

import json

import pytest
import yaml

from assistant_axis.errors import InputError
from assistant_axis.plan import DEFAULT_RESOURCES, Plan, validate_config

from workflow_helpers import ROOT

SCHEMA = ROOT / "workflow/schemas/config.schema.yaml"
# calibrate runs the model to calibrate on tokens (`capping.calibration: token`, the default and the paper's).
MODEL_STAGES = ("generate", "activations", "evaluate", "calibrate")
CPU_STAGES = ("prepare_model", "vectors", "axis", "pca", "stability")


def plan_of(name: str, **sections) -> Plan:
    config = yaml.safe_load((ROOT / f"config/{name}").read_text())
    for key, value in sections.items():
        config[key] = {**config.get(key, {}), **value} if isinstance(value, dict) else value
    validate_config(config, SCHEMA)
    return Plan.from_config(config, ROOT)


def test_the_paper_config_gives_gpus_to_every_stage_that_loads_the_model():
    plan = plan_of("paper.yaml")
    for stage in MODEL_STAGES:
        assert plan.resources(stage)["gpu"] == 2, stage
    for stage in (*CPU_STAGES, "judge"):  # the judge is an API: no GPU
        assert "gpu" not in plan.resources(stage), stage
    assert plan.resources("judge")["judge_api_jobs"] == 1 and plan.resources("evaluate")["judge_api_jobs"] == 1
    assert not any("api_jobs" in k for stage in (*CPU_STAGES, "activations") for k in plan.resources(stage))


def test_calibrate_gets_the_model_gpus_only_when_it_calibrates_on_tokens():
    plan = plan_of("paper.yaml")
    assert plan.config["capping"]["calibration"] == "token"
    assert plan.loads_a_model("calibrate") and plan.gpus("calibrate") == 2 and plan.resources("calibrate")["gpu"] == 2
    settings = plan.calibration_model_params()
    assert settings["compute_dtype"] == plan.config["model"]["dtype"]
    assert settings["batch_tokens"] == plan.config["activations"]["batch_tokens"]
    assert settings["template_options"] == plan.config["model"]["chat_template_kwargs"]
    plan = plan_of("paper.yaml", capping={"calibration": "reply"})
    assert not plan.loads_a_model("calibrate") and plan.gpus("calibrate") == 0
    assert "gpu" not in plan.resources("calibrate") and plan.calibration_model_params() == {}
    plan = plan_of("paper.yaml", capping={"calibration": "reply"}, resources={"calibrate": {"gpu": 1}})
    assert "gpu" not in plan.resources("calibrate")  # an explicit GPU count gives none to a stage with no model
    config = yaml.safe_load((ROOT / "config/config.yaml").read_text())
    config.pop("capping", None)
    validate_config(config, SCHEMA)
    assert config["capping"]["calibration"] == "token"  # the schema's default
    with pytest.raises(InputError, match=r"capping\.calibration"):
        validate_config({**config, "capping": {"calibration": "layer"}}, SCHEMA)


def test_a_local_judge_gets_the_model_gpus_unless_its_stage_says_otherwise():
    plan = plan_of("paper.yaml", judge={"backend": "local", "local": {"model": "/models/judge"}})
    assert plan.resources("judge")["gpu"] == 2 and "judge_api_jobs" not in plan.resources("judge")
    plan = plan_of("paper.yaml", judge={"backend": "local", "local": {"model": "/models/judge"}},
                   resources={"judge": {"gpu": 1, "gpu_model": "a100"}})
    assert plan.resources("judge")["gpu"] == 1 and plan.resources("judge")["gpu_model"] == "a100"


def test_the_quickstart_asks_for_no_gpu_and_api_generation_loads_no_model():
    plan = plan_of("config.yaml")
    assert not any("gpu" in plan.resources(stage) for stage in DEFAULT_RESOURCES)
    plan = plan_of("paper.yaml", generate={"backend": "openai",
                                           "openai": {"base_url": "http://127.0.0.1:9/v1", "model": "m"}})
    generate = plan.resources("generate")
    assert "gpu" not in generate and generate["generate_api_jobs"] == 1
    assert plan.resources("activations")["gpu"] == 2


def test_runtime_and_memory_grow_with_the_attempt():
    plan = plan_of("paper.yaml", resources={"activations": {"mem_mb": 60000, "runtime": 100}})
    resources = plan.resources("activations")
    assert [resources["mem_mb"](None, attempt) for attempt in (1, 2, 3)] == [60000, 120000, 180000]
    assert [resources["runtime"](None, attempt) for attempt in (1, 2)] == [100, 200]
    assert plan.resources("axis")["mem_mb"](None, 2) == 2 * DEFAULT_RESOURCES["axis"]["mem_mb"]


def test_each_api_job_gets_its_share_of_the_workflow_budget():
    plan = plan_of("paper.yaml")  # 40 requests/s and 32 in flight over 8 jobs at once
    settings = plan.api_settings("judge")
    assert settings["requests_per_second"] == 5.0 and settings["concurrency"] == 4 and "jobs" not in settings
    assert plan.api_jobs("judge") == 8 and plan.judge_params("pirate")["settings"] == settings
    with pytest.raises(InputError, match=r"judge.openai.jobs: must be an integer >= 1, got 0"):
        plan_of("paper.yaml", judge={"openai": {**plan.config["judge"]["openai"], "jobs": 0}}).check()


def _reordered(value, reverse: bool):
    if isinstance(value, dict):
        return {k: _reordered(value[k], reverse) for k in sorted(value, reverse=reverse)}
    if isinstance(value, list):
        return [_reordered(v, reverse) for v in value]
    return value


@pytest.mark.parametrize("name", ["config.yaml", "paper.yaml"])
def test_key_order_never_reaches_the_params(name):
    """Rule params are built from the validated config: after validation every key order is the same one."""
    original = yaml.safe_load((ROOT / f"config/{name}").read_text())
    seen = set()
    for variant in (original, _reordered(original, False), _reordered(original, True)):
        config = json.loads(json.dumps(variant))
        validate_config(config, SCHEMA)
        seen.add(json.dumps(config))  # in iteration order, as Snakemake compares dict params
    assert len(seen) == 1


def test_numbers_spelled_as_integers_are_the_same_floats():
    config = yaml.safe_load((ROOT / "config/config.yaml").read_text())
    spelled = json.loads(json.dumps(config))
    config["evaluate"] = {"top_p": 1.0, "temperature": 0.0}
    spelled["evaluate"] = {"top_p": 1, "temperature": 0}
    for c in (config, spelled):
        validate_config(c, SCHEMA)
    assert json.dumps(config) == json.dumps(spelled)
    assert isinstance(spelled["evaluate"]["top_p"], float) and isinstance(spelled["evaluate"]["seed"], int)
