"""Each rule's Snakemake `params`: only the data its stage uses, so Snakemake's params trigger reruns exactly
what an edit affects (a role's prompts feed its generation, its description feeds its judging, and the
axis records only the config sections it is made from)."""

from __future__ import annotations

from dataclasses import dataclass

from assistant_axis.engines import DEFAULT_ENGINE
from assistant_axis.judge import DEFAULT_TEMPLATE
from assistant_axis.plan.bank import Bank
from assistant_axis.plan.config import sections_hash
from assistant_axis.plan.jobs import Jobs

__all__ = ["Params"]


@dataclass(frozen=True)
class CapSetting:
    """One capping config the workflow calibrates: a named layer range (`capping.ranges`) and a percentile of
    the default replies' projections. Its `name` (`late-p25`) names its file and its evaluation setting."""

    range_name: str
    percentile: float

    @property
    def name(self) -> str:
        return f"{self.range_name}-p{self.percentile:g}"

    @classmethod
    def parse(cls, name: str) -> CapSetting:
        range_name, percentile = name.rsplit("-p", 1)
        return cls(range_name, float(percentile))


@dataclass
class Params:
    config: dict
    bank: Bank
    jobs: Jobs  # an API job's share of its section's budget is part of what it reads

    def generate_jobs(self, roles: list[str]) -> list[dict]:
        return [{"role": role, "system_prompts": self.bank.system_prompts(role)} for role in roles]

    def questions(self) -> list[dict]:
        return [{"id": q.id, "question": q.question} for q in self.bank.questions]

    def generate(self) -> dict:
        """What a generate job reads: sampling and its backend's settings (one job's API share)."""
        settings = {k: v for k, v in self.config["generate"].items() if k not in ("backend", "capture_activations")}
        if "generate" in self.jobs.api_sections("generate"):
            settings["openai"] = self.jobs.api_settings("generate")
        return settings

    def capture(self) -> dict:
        """The generate rule's `capture` param when generation records the activations, else none (so that
        turning it on or off, or changing the layers or dtype it stores, reruns generation)."""
        if not self.jobs.captures_activations:
            return {}
        activations = self.config["activations"]
        return {"capture": {"layers": activations["layers"], "dtype": activations["dtype"]}}

    def captured_outputs(self, roles: list[str] | None) -> dict:
        if not self.jobs.captures_activations:
            return {}
        return {"activations": self.jobs.outputs("results/{model}/activations/{role}.safetensors", roles)}

    def activations_backend(self) -> dict:
        """The activations rule's engine params; none for the engine activations ran in before the option
        existed (its default), so that results made then are not planned again."""
        return self._engine_params("activations", "backend", "settings")

    def drift_engine(self) -> dict:
        """The drift rule's engine params (the evaluate stage's); none for the engine drift ran in before it
        ran in others (the default), so that results made then are not planned again."""
        return self._engine_params("evaluate", "backend", "vllm")

    def _engine_params(self, section: str, name: str, settings: str) -> dict:
        backend = self.config[section]["backend"]
        if backend == DEFAULT_ENGINE:
            return {}
        return {name: backend, settings: self.jobs.engine(section)[1]}

    def judge(self, role: str) -> dict:
        """One role's judging: its description and judge prompt (its own, else the config's), and the judge."""
        r, judge = self.bank.roles[role], self.evaluation_judge()
        return {
            "role": r.name,
            "description": r.description,
            "template": r.judge_prompt or judge["template"],
            "backend": judge["backend"],
            "settings": judge["settings"],
        }

    def evaluation_judge(self) -> dict:
        """The judge as the configured backend and template (what the evaluation stage uses)."""
        judge = self.config["judge"]
        backend = judge["backend"]
        settings = self.jobs.api_settings("judge") if self.jobs.api_sections("judge") else judge.get(backend, {})
        return {"backend": backend, "settings": settings, "template": judge.get("template") or DEFAULT_TEMPLATE}

    def capping_settings(self) -> list[CapSetting]:
        """Every configured layer range at every configured percentile."""
        capping = self.config["capping"]
        return [CapSetting(name, q) for name in capping["ranges"] for q in capping["percentiles"]]

    def capping_names(self) -> list[str]:
        return [setting.name for setting in self.capping_settings()]

    def calibration_model(self) -> dict:
        """The calibrate stage's model settings, as the activations stage loads and renders the model with them:
        for a `token` calibration only (a `reply` one loads no model, so editing them reruns none)."""
        if self.jobs.calibration != "token":
            return {}
        model = self.config["model"]
        return {
            "compute_dtype": model["dtype"],
            "batch_tokens": self.config["activations"]["batch_tokens"],
            "blocks": model["blocks"],
            "trust_remote_code": model["trust_remote_code"],
            "template_options": model["chat_template_kwargs"],
        }

    def axis_config_hash(self) -> str:
        """A hash of the config sections the axis is made from (recorded in the axis as its provenance).

        Only these: as a rule param, a hash of the whole config would rerun the axis and all after it when
        an unrelated section (evaluation, capping, analysis, resources) changed."""
        return sections_hash(self.config)
