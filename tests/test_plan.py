"""The planner on its own: which jobs get GPUs, how resources grow on retries, the shared API budget, and
configs that differ only in spelling planning the same."""

from __future__ import annotations

import dataclasses
import json

import pytest
import yaml

from assistant_axis.errors import InputError
from assistant_axis.plan import DEFAULT_RESOURCES, Plan, validate_config
from assistant_axis.plan.params import CapSetting

from workflow_helpers import ROOT

SCHEMA = ROOT / "workflow/schemas/config.schema.yaml"
# calibrate runs the model to calibrate on tokens (`capping.calibration: token`, the default and the paper's).
MODEL_STAGES = ("generate", "activations", "evaluate", "drift", "calibrate")
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
        assert plan.jobs.resources(stage)["gpu"] == 2, stage
    for stage in (*CPU_STAGES, "judge"):  # the judge is an API: no GPU
        assert "gpu" not in plan.jobs.resources(stage), stage
    assert (
        plan.jobs.resources("judge")["judge_api_jobs"] == 1 and plan.jobs.resources("evaluate")["judge_api_jobs"] == 1
    )
    assert not any("api_jobs" in k for stage in (*CPU_STAGES, "activations") for k in plan.jobs.resources(stage))


def test_the_paper_config_evaluates_in_vllm_with_tensor_parallel_2():
    """Every setting in one vLLM engine across the evaluate job's 2 GPUs: the job asks SLURM for 2 GPUs
    and for the cores vLLM's worker processes need; another tensor parallel size asks for as many."""
    plan = plan_of("paper.yaml")
    assert plan.config["evaluate"]["backend"] == "vllm"
    assert plan.jobs.parallel_settings("evaluate")["tensor_parallel_size"] == 2
    assert plan.jobs.resources("evaluate")["gpu"] == 2 and plan.jobs.threads("evaluate", 2) == 4
    plan = plan_of("paper.yaml", evaluate={"vllm": {"tensor_parallel_size": 4}})
    assert plan.jobs.resources("evaluate")["gpu"] == 4 and plan.jobs.threads("evaluate", 2) == 6
    plan = plan_of("paper.yaml", evaluate={"backend": "transformers"})
    assert plan.jobs.parallel_settings("evaluate") is None and plan.jobs.resources("evaluate")["gpu"] == 2  # model.gpus


def test_calibrate_gets_the_model_gpus_only_when_it_calibrates_on_tokens():
    plan = plan_of("paper.yaml")
    assert plan.config["capping"]["calibration"] == "token"
    assert (
        plan.jobs.loads_a_model("calibrate")
        and plan.jobs.gpus("calibrate") == 2
        and plan.jobs.resources("calibrate")["gpu"] == 2
    )
    settings = plan.params.calibration_model()
    assert settings["compute_dtype"] == plan.config["model"]["dtype"]
    assert settings["batch_tokens"] == plan.config["activations"]["batch_tokens"]
    assert settings["template_options"] == plan.config["model"]["chat_template_kwargs"]
    plan = plan_of("paper.yaml", capping={"calibration": "reply"})
    assert not plan.jobs.loads_a_model("calibrate") and plan.jobs.gpus("calibrate") == 0
    assert "gpu" not in plan.jobs.resources("calibrate") and plan.params.calibration_model() == {}
    plan = plan_of("paper.yaml", capping={"calibration": "reply"}, resources={"calibrate": {"gpu": 1}})
    assert "gpu" not in plan.jobs.resources("calibrate")  # an explicit GPU count gives none to a stage with no model
    config = yaml.safe_load((ROOT / "config/config.yaml").read_text())
    config.pop("capping", None)
    validate_config(config, SCHEMA)
    assert config["capping"]["calibration"] == "token"  # the schema's default
    with pytest.raises(InputError, match=r"capping\.calibration"):
        validate_config({**config, "capping": {"calibration": "layer"}}, SCHEMA)


def test_a_local_judge_gets_the_model_gpus_unless_its_stage_says_otherwise():
    plan = plan_of("paper.yaml", judge={"backend": "local", "local": {"model": "/models/judge"}})
    assert plan.jobs.resources("judge")["gpu"] == 2 and "judge_api_jobs" not in plan.jobs.resources("judge")
    plan = plan_of(
        "paper.yaml",
        judge={"backend": "local", "local": {"model": "/models/judge"}},
        resources={"judge": {"gpu": 1, "gpu_model": "a100"}},
    )
    assert plan.jobs.resources("judge")["gpu"] == 1 and plan.jobs.resources("judge")["gpu_model"] == "a100"


def test_the_quickstart_asks_for_no_gpu_and_api_generation_loads_no_model():
    plan = plan_of("config.yaml")
    assert not any("gpu" in plan.jobs.resources(stage) for stage in DEFAULT_RESOURCES)
    plan = plan_of(
        "paper.yaml", generate={"backend": "openai", "openai": {"base_url": "http://127.0.0.1:9/v1", "model": "m"}}
    )
    generate = plan.jobs.resources("generate")
    assert "gpu" not in generate and generate["generate_api_jobs"] == 1
    assert plan.jobs.resources("activations")["gpu"] == 2


def test_runtime_and_memory_grow_with_the_attempt():
    plan = plan_of("paper.yaml", resources={"activations": {"mem_mb": 60000, "runtime": 100}})
    resources = plan.jobs.resources("activations")
    assert [resources["mem_mb"](None, attempt) for attempt in (1, 2, 3)] == [60000, 120000, 180000]
    assert [resources["runtime"](None, attempt) for attempt in (1, 2)] == [100, 200]
    assert plan.jobs.resources("axis")["mem_mb"](None, 2) == 2 * DEFAULT_RESOURCES["axis"]["mem_mb"]


def test_each_api_job_gets_its_share_of_the_workflow_budget():
    plan = plan_of("paper.yaml")  # 40 requests/s and 32 in flight over 8 jobs at once
    settings = plan.jobs.api_settings("judge")
    assert settings["requests_per_second"] == 5.0 and settings["concurrency"] == 4 and "jobs" not in settings
    assert plan.jobs.api_jobs("judge") == 8 and plan.params.judge("pirate")["settings"] == settings
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


# ------------------------------------------------------------------------------ the pieces, one at a time


def test_config_errors_name_the_file_that_sets_the_key(tmp_path):
    """`in_config_file`: the last file (highest precedence) that sets the key is named; others pass as they are."""
    from assistant_axis.plan.config import in_config_file

    base, override = tmp_path / "base.yaml", tmp_path / "override.yaml"
    base.write_text("judge: {backend: embedding}\nactivations: {layers: [1, 2]}\n")
    override.write_text("activations: {layers: [40]}\n")
    files = [str(base), str(override)]
    named = in_config_file(InputError("config", "activations.layers.0", "outside"), files)
    assert (named.source, named.field, named.problem) == (str(override), "activations.layers.0", "outside")
    assert in_config_file(InputError("config", "judge.backend", "bad"), files).source == str(base)
    other = InputError("data/roles/pirate.yaml", "prompts", "too few")
    assert in_config_file(other, files) is other


def test_sections_hash_follows_only_its_sections():
    from assistant_axis.plan.config import sections_hash

    config = plan_of("config.yaml").config
    edited = json.loads(json.dumps(config))
    edited["capping"]["percentiles"] = [1.0]
    edited["evaluate"] = {"n_prompts": 1}
    assert sections_hash(edited) == sections_hash(config)
    edited["vectors"]["min_score"] = 2
    assert sections_hash(edited) != sections_hash(config)


def test_the_bank_selects_default_first_and_fills_the_model_name():
    from assistant_axis.plan.bank import select_bank

    config = plan_of("config.yaml").config
    config = {
        **config,
        "roles": {**config["roles"], "include": ["pirate", "ghost"], "n_prompts": 4},
        "questions": {**config["questions"], "n_questions": 3},
    }
    bank = select_bank(config, ROOT)
    assert list(bank.roles) == ["default", "pirate", "ghost"] and len(bank.questions) == 3
    assert bank.system_prompts("default")[3] == "You are SmolLM2, an AI model. Respond to the user as yourself."
    assert bank.n_responses == 3 * 4 * 3
    for roles, match in ((["pirate", "kraken_of_mars"], "no role 'kraken_of_mars'"), (["pirate", "pirate"], "twice")):
        with pytest.raises(InputError, match=match):
            select_bank({**config, "roles": {**config["roles"], "include": roles}}, ROOT)
    with pytest.raises(InputError, match=r"questions\.n_questions: 100000 requested"):
        select_bank({**config, "questions": {**config["questions"], "n_questions": 100_000}}, ROOT)


def test_shards_hold_every_role_once_and_keep_their_roles_when_one_is_added():
    from assistant_axis.plan.jobs import Jobs

    roles = [f"role_{i}" for i in range(40)]
    config = {"shards": 4}
    groups = dict(Jobs(config, roles).groups("generate"))
    assert sorted(r for members in groups.values() for r in members) == sorted(roles)
    assert all(name.startswith("generate_shard") for name in groups)
    grown = dict(Jobs(config, [*roles, "role_new"]).groups("generate"))
    changed = [name for name in grown if grown[name] != groups.get(name)]
    assert len(changed) == 1 and "role_new" in grown[changed[0]]
    assert Jobs({}, roles).groups("generate") == [("generate", None)]
    assert Jobs(config, roles).outputs("a/{role}.parquet", ["x", "y"]) == ["a/x.parquet", "a/y.parquet"]


def test_rule_params_carry_only_what_their_stage_reads():
    plan = plan_of("config.yaml", roles={"include": ["pirate"]})
    own = "Judge this pirate: {response}"
    plan.bank.roles["pirate"] = dataclasses.replace(plan.bank.roles["pirate"], judge_prompt=own)
    judged = plan.params.judge("pirate")
    assert list(judged) == ["role", "description", "template", "backend", "settings"]
    assert judged["template"] == own and judged["description"] == plan.bank.roles["pirate"].description
    assert plan.params.evaluation_judge()["template"] != own  # the evaluation uses the config's template
    capping = plan.config["capping"]
    assert plan.params.capping_names() == [f"{r}-p{q:g}" for r in capping["ranges"] for q in capping["percentiles"]]
    assert [s.name for s in map(CapSetting.parse, plan.params.capping_names())] == plan.params.capping_names()
    assert CapSetting("late", 12.5).name == "late-p12.5"
    assert CapSetting.parse("mid-late-p1") == CapSetting("mid-late", 1.0)
    assert "backend" not in plan.params.generate() and plan.params.generate()["seed"] == plan.config["generate"]["seed"]
    assert [q["id"] for q in plan.params.questions()] == [q.id for q in plan.bank.questions]


def test_a_drift_setting_outside_the_sweep_is_refused_before_any_job():
    plan = plan_of("config.yaml", evaluate={"drift": {"settings": ["late-p99"]}})
    with pytest.raises(InputError, match=r"^config: evaluate.drift.settings: 'late-p99' is not a setting of the sweep"):
        plan.check()
    plan_of("config.yaml", evaluate={"drift": {"settings": ["middle-p10", "uncapped"]}}).check()


def test_capturing_activations_needs_vllm_generation_and_removes_the_activations_jobs():
    plan = plan_of("config.yaml", generate={"capture_activations": True})
    with pytest.raises(
        InputError,
        match=r"^config: generate.capture_activations: transformers cannot do recording activations while "
        r"generating \(engines that can: vllm\)$",
    ):
        plan.check()
    plan = plan_of("config.yaml", generate={"backend": "vllm", "capture_activations": True})
    plan.check()
    assert plan.jobs.captures_activations
    assert plan.params.capture() == {"capture": {"layers": "all", "dtype": "float32"}}
    outputs = plan.params.captured_outputs(["pirate"])
    assert outputs == {"activations": ["results/{model}/activations/pirate.safetensors"]}


def test_the_new_activation_options_at_their_defaults_change_no_existing_params_or_hash():
    """Results made before the options existed are not planned again: their defaults add no rule params and
    leave the axis's config hash as it was."""
    from assistant_axis.plan.config import sections_hash

    plan = plan_of("config.yaml")
    assert plan.params.capture() == {} and plan.params.activations_backend() == {}
    assert "capture_activations" not in plan.params.generate()
    before = json.loads(json.dumps(plan.config))
    del before["generate"]["capture_activations"], before["activations"]["backend"], before["activations"]["vllm"]
    assert sections_hash(before) == sections_hash(plan.config)
    vllm = plan_of("config.yaml", activations={"backend": "vllm", "vllm": {"tensor_parallel_size": 2}})
    assert vllm.params.activations_backend() == {"backend": "vllm", "settings": {"tensor_parallel_size": 2}}
    assert sections_hash(vllm.config) != sections_hash(plan.config)
    assert vllm.jobs.gpus("activations") == 2 and vllm.jobs.threads("activations", 2) == 4


def test_an_engine_that_cannot_do_a_stage_is_refused_at_planning_in_one_line():
    """What an engine can do is declared in its registry entry: the OpenAI engine generates only."""
    for stage, what in (("activations", "taking activations"), ("evaluate", "interventions")):
        with pytest.raises(
            InputError, match=rf"^config: {stage}.backend: openai cannot do {what}.*\(engines that can: "
        ):
            plan_of("config.yaml", **{stage: {"backend": "openai"}}).check()


def test_drift_runs_in_the_evaluate_engine_and_the_judge_keeps_its_old_name(caplog):
    """Drift asks for what the evaluate engine needs (vLLM: its tensor-parallel GPUs and cores) and gets it as
    params only when it is not the default engine (results made before keep their params); `local` still
    names the transformers judge, with the same jobs and no new params."""
    vllm = {"backend": "vllm", "vllm": {"tensor_parallel_size": 2}}
    plan = plan_of("config.yaml", evaluate=vllm)
    assert plan.jobs.gpus("drift") == 2 and plan.jobs.threads("drift", 2) == 4
    assert plan.params.drift_engine() == {"backend": "vllm", "vllm": {"tensor_parallel_size": 2}}
    assert plan_of("config.yaml").params.drift_engine() == {}
    old = plan_of("paper.yaml", judge={"backend": "local", "local": {"model": "/models/judge"}})
    new = plan_of("paper.yaml", judge={"backend": "transformers", "transformers": {"model": "/models/judge"}})
    assert old.jobs.gpus("judge") == new.jobs.gpus("judge") == old.config["model"]["gpus"]
    assert old.params.judge(old.role_names[0])["settings"] == {"model": "/models/judge"}
    assert new.params.judge(new.role_names[0])["settings"] == {"model": "/models/judge"}
    old.check()  # says so once, at planning
    assert "judge.backend: local is now called transformers" in caplog.text
