"""What the workflow runs, decided at DAG-build time from the validated config, in four small pieces:

- `config`: the config checked against the schema, defaults filled in, a bad value named by its file;
- `bank`: the selected roles and questions;
- `jobs`: shards of roles and each stage's resources (GPUs, threads, time and memory, API budgets);
- `params`: each rule's params, only the data its stage uses, so Snakemake reruns exactly what an edit affects;
- `cost`: what an API judge will cost (requests, tokens, USD), printed at planning.

`Plan` puts them together for the Snakefile (`PLAN.jobs.resources("generate")`, `PLAN.params.judge(role)`)
and checks, before any job runs, what can be checked without the model. A new config key goes into
`workflow/schemas/config.schema.yaml` and is read by the piece that uses it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from assistant_axis.api import APISettings
from assistant_axis.engines import engine_spec
from assistant_axis.errors import InputError, renamed
from assistant_axis.judge import OpenAIJudge, judge_spec
from assistant_axis.layers import resolve_layers
from assistant_axis.plan.bank import Bank, select_bank
from assistant_axis.plan.config import canonical, config_source, in_config_file, validate_config
from assistant_axis.plan.cost import JudgeCost, judge_cost, model_tokenizer
from assistant_axis.plan.jobs import DEFAULT_API_JOBS, DEFAULT_RESOURCES, Jobs
from assistant_axis.plan.params import Params

__all__ = [
    "Plan",
    "Bank",
    "Jobs",
    "Params",
    "JudgeCost",
    "DEFAULT_RESOURCES",
    "validate_config",
    "config_source",
    "canonical",
]


@dataclass
class Plan:
    config: dict
    bank: Bank
    jobs: Jobs
    params: Params

    @classmethod
    def from_config(cls, config: dict, root: str | Path = ".") -> Plan:
        bank = select_bank(config, root)
        jobs = Jobs(config, list(bank.roles))
        return cls(config, bank, jobs, Params(config, bank, jobs))

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
            raised = in_config_file(exc, files)
            if raised is exc:
                raise
            raise raised from exc
        return plan

    def check(self) -> None:
        """Semantic checks of a schema-valid config: layers against the model (when its size is known),
        API settings, the drift settings among the sweep's, and judge prompts that show the judge the response."""

        dims = self.jobs.model_dims()
        if dims is not None:
            with renamed("config", {"resolve_layers.layers": "activations.layers"}):
                resolve_layers(self.config["activations"]["layers"], dims[0])
        if self.jobs.captures_activations:
            engine_spec(self.config["generate"]["backend"], "generate.capture_activations", ["capture"])
        for stage, needs in (("generate", "generate"), ("activations", "activations"), ("evaluate", "sessions")):
            engine_spec(self.config[stage]["backend"], f"{stage}.backend", [needs])
        judge_spec(self.config["judge"]["backend"], warn=True)
        for section in ("generate", "judge"):
            jobs = (self.config[section].get("openai") or {}).get("jobs", DEFAULT_API_JOBS)
            if not isinstance(jobs, int) or isinstance(jobs, bool) or jobs < 1:
                raise InputError("config", f"{section}.openai.jobs", f"must be an integer >= 1, got {jobs!r}")
        if "generate" in self.jobs.api_sections("generate"):
            APISettings.from_config(self.jobs.api_settings("generate"), "generate.openai")
        judge = self.config["judge"]
        if "judge" in self.jobs.api_sections("judge"):
            settings = self.jobs.api_settings("judge")
            scoring = settings.pop("scoring", "logprobs")
            if scoring not in ("logprobs", "parse"):
                raise InputError("config", "judge.openai.scoring", f"expected 'logprobs' or 'parse', got {scoring!r}")
            share = settings.get("max_rejected_share", 0.05)
            if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 <= share <= 1:
                raise InputError("config", "judge.openai.max_rejected_share", f"must be in [0, 1], got {share!r}")
            if not isinstance(settings.get("retry_rejected", False), bool):
                raise InputError("config", "judge.openai.retry_rejected", "must be true or false")
            for key in OpenAIJudge.OWN:
                settings.pop(key, None)
            APISettings.from_config(settings, "judge.openai")
        drift_settings = self.config["evaluate"]["drift"]["settings"] or []
        unknown = [s for s in drift_settings if s not in ("uncapped", *self.params.capping_names())]
        if unknown:
            raise InputError(
                "config",
                "evaluate.drift.settings",
                f"{unknown[0]!r} is not a setting of the sweep ({', '.join(self.params.capping_names())})",
            )
        if judge.get("template") and "{response}" not in judge["template"]:
            raise InputError("config", "judge.template", "has no {response} placeholder: the judge would not see it")
        for role in self.bank.roles.values():
            if role.judge_prompt and "{response}" not in role.judge_prompt:
                raise InputError(
                    role.source, "judge_prompt", "has no {response} placeholder: the judge would not see the response"
                )

    @property
    def model(self) -> str:
        return self.config["model"]["name"]

    @property
    def role_names(self) -> list[str]:
        return list(self.bank.roles)

    @property
    def n_responses(self) -> int:
        return self.bank.n_responses

    def activation_bytes(self) -> int | None:
        return self.jobs.activation_bytes(self.n_responses)

    def judge_cost(self) -> JudgeCost | None:
        """What an API judge will cost (None for another judge), its tokens counted with the model's tokenizer
        when its files are on this machine, else estimated from characters."""
        if "judge" not in self.jobs.api_sections("judge"):
            return None
        tokenizer, label = model_tokenizer(self.config["model"])
        return judge_cost(self, tokenizer, label)
