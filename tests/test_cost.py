"""What an API judge will cost, printed at planning: the requests counted from the bank itself, the prompts'
tokens against the real tokenizer on whole rendered prompts, the cost with prices and without, and prices
that never reach a job."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil

import pytest
import yaml

from assistant_axis.errors import InputError
from assistant_axis.judge import DEFAULT_SYSTEM, DEFAULT_TEMPLATE, JudgeItem, OpenAIJudge, render_prompt
from assistant_axis.plan import Plan, validate_config
from assistant_axis.plan.config import sections_hash
from assistant_axis.plan.cost import CHARS_PER_TOKEN, judge_cost, model_tokenizer

from workflow_helpers import ROOT, copy_run, snakemake

SCHEMA = ROOT / "workflow/schemas/config.schema.yaml"
PRICES = {"input": 0.4, "output": 1.6}


def paper_config(**sections) -> dict:
    config = yaml.safe_load((ROOT / "config/paper.yaml").read_text())
    for key, value in sections.items():
        config[key] = {**config.get(key, {}), **value}
    return config


def plan_of(config: dict) -> Plan:
    validate_config(config, SCHEMA)
    return Plan.from_config(config, ROOT)


def requests_from_the_files(config: dict) -> int:
    """Judged answers counted from the role and question files themselves: every selected role but default,
    its first n_prompts prompts x the first n_questions questions."""
    roles = config["roles"]
    files = sorted((ROOT / roles["bank"]).glob("*.yaml"))
    names = [f.stem for f in files if f.stem != "default"] if roles["include"] == "all" else roles["include"]
    lines = [line for line in (ROOT / config["questions"]["file"]).read_text().splitlines() if line.strip()]
    n_questions = len(lines[: config["questions"].get("n_questions") or len(lines)])
    prompts = 0
    for name in names:
        role = yaml.safe_load((ROOT / roles["bank"] / f"{name}.yaml").read_text())
        prompts += len(role["prompts"][: roles.get("n_prompts", 5)])
    return prompts * n_questions


def test_the_paper_plan_states_its_judge_requests_and_tokens():
    config = paper_config()
    expected = requests_from_the_files(config)
    assert expected > 300_000  # 284 roles x 5 prompts x 240 questions
    cost = plan_of(config).judge_cost()
    line = cost.lines()[0]
    assert cost.requests == expected and line.startswith(
        f"judge: {expected:,} requests to gpt-4.1-mini before the cache"
    )
    replies = expected * config["generate"]["max_tokens"]
    assert cost.input_tokens == cost.prompt_tokens + replies and cost.output_tokens == expected  # logprobs: 1 each
    assert f"input at most {cost.input_tokens / 1e6:,.1f}M tokens" in line
    assert f"replies at most {config['generate']['max_tokens']} each" in line
    assert f"output {expected:,} tokens (1 each: scoring logprobs)" in line  # below a million: in full
    assert "not the judge's, without the server's chat format" in line
    parse = plan_of(paper_config(judge={"openai": {**config["judge"]["openai"], "scoring": "parse"}})).judge_cost()
    assert parse.output_tokens == 4 * expected and "(at most 4 each: scoring parse)" in parse.lines()[0]
    selected = paper_config(roles={"include": ["pirate", "ghost"], "n_prompts": 3}, questions={"n_questions": 7})
    assert plan_of(selected).judge_cost().requests == requests_from_the_files(selected) == 2 * 3 * 7


def test_the_cost_line_with_prices_and_without():
    config = paper_config()
    assert config["judge"]["openai"]["prices"] == {"input": 0.40, "output": 1.60}  # the example in paper.yaml
    cost = plan_of(config).judge_cost()

    def usd(x):  # rounded up to the cent: the figures are bounds
        return f"${math.ceil(round(x * 100, 6)) / 100:,.2f}"

    input_usd, output_usd = cost.input_tokens * 0.40 / 1e6, cost.requests * 1.60 / 1e6
    assert cost.lines()[1] == (
        f"judge cost: at most {usd(input_usd + output_usd)} before the cache: input at most {usd(input_usd)} "
        f"(the prompts alone {usd(cost.prompt_tokens * 0.40 / 1e6)}) at $0.40/M tokens, output {usd(output_usd)} "
        "at $1.60/M"
    )
    del config["judge"]["openai"]["prices"]
    lines = plan_of(config).judge_cost().lines()
    assert len(lines) == 2 and lines[1].startswith("judge cost: no prices (judge.openai.prices: {input, output}")
    assert "$" not in " ".join(lines)
    embedding = yaml.safe_load((ROOT / "config/config.yaml").read_text())
    assert plan_of(embedding).judge_cost() is None  # a judge that is no API costs nothing to estimate


def test_prices_reach_no_job_and_no_hash():
    """Prices are planning's: not a setting of the client, not in any rule's params, not in the axis's hash
    (editing them reruns nothing), and checked by the schema."""
    priced = plan_of(paper_config())
    config = paper_config()
    del config["judge"]["openai"]["prices"]
    plain = plan_of(config)
    priced.check()
    assert priced.params.judge("pirate") == plain.params.judge("pirate")
    assert "prices" not in priced.params.judge("pirate")["settings"]
    assert priced.params.evaluation_judge() == plain.params.evaluation_judge()
    assert sections_hash(priced.config) == sections_hash(plain.config)
    settings = {**priced.params.judge("pirate")["settings"], "api_key_env": None, "cache": None}
    judge = OpenAIJudge({**settings, "prices": PRICES})  # the judge takes the config's block with its prices
    assert judge.name == "openai:gpt-4.1-mini:logprobs"
    refused = (({"input": 0.4}, "prices.output: missing"), ({**PRICES, "cached": 1}, "prices.cached: unknown key"))
    for prices, problem in refused:
        bad = paper_config()
        bad["judge"]["openai"]["prices"] = prices
        with pytest.raises(InputError, match=rf"judge.openai.{problem}"):
            validate_config(bad, SCHEMA)


def _exact_tokens(plan: Plan, lengths) -> int:
    """Every request's fixed part tokenized whole: the system message and the rendered prompt, response empty.
    `lengths(texts)`: the number of tokens of each text."""
    system = plan.config["judge"]["openai"].get("system", DEFAULT_SYSTEM)
    total = 0
    for name in list(plan.bank.roles)[1:]:
        judge = plan.params.judge(name)
        prompts = [
            render_prompt(judge["template"], JudgeItem(judge["role"], judge["description"], q.question, ""))
            for q in plan.bank.questions
        ]
        sizes = lengths([system or "", *prompts])
        total += len(plan.bank.system_prompts(name)) * (len(prompts) * sizes[0] + sum(sizes[1:]))
    return total


# Qwen2's and Llama 3's pre-tokenizer: punctuation takes the newlines after it ("?\n\n"), a seam inside a piece.
QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _qwen_style(model_dir):
    """SmolLM2's vocabulary behind Qwen2's pre-tokenizer."""
    from tokenizers import Regex, Tokenizer, pre_tokenizers

    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    split = pre_tokenizers.Split(Regex(QWEN_SPLIT), "isolated")
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    assert [p for p, _ in tokenizer.pre_tokenizer.pre_tokenize_str("asked?\n\nIt")] == ["asked", "?ĊĊ", "It"]
    return tokenizer


def test_the_prompt_tokens_are_the_whole_rendered_prompts_within_the_seams(model_dir):
    """The prompts counted in pieces against the bundled model's own tokenizer (transformers') on whole
    rendered prompts: equal within the stated tolerance at the question's seams, with a role's own judge
    prompt that asks the question twice, and with no system message; and so with a Qwen2-style pre-tokenizer."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    qwen_like = _qwen_style(model_dir)
    config = paper_config(
        model={"name": "smollm2-135m-instruct", "source": str(model_dir)},  # a local model: its tokenizer is here
        roles={"include": ["pirate", "accountant", "ghost"], "n_prompts": 4},
        questions={"n_questions": 12},
    )
    for system in (DEFAULT_SYSTEM, None):
        config["judge"]["openai"]["system"] = system
        plan = plan_of(config)
        own = "Is {role} still {role}?\n{question}\n---\n{response}\nThe question again: {question} Digit 0-3."
        plan.bank.roles["ghost"] = dataclasses.replace(plan.bank.roles["ghost"], judge_prompt=own)
        cost = plan.judge_cost()
        assert cost.tokenizer == "smollm2-135m-instruct" and cost.seam_tokens == 4  # 2 questions, 2 seams each
        exact = _exact_tokens(
            plan, lambda texts: list(map(len, tokenizer(texts, add_special_tokens=False)["input_ids"]))
        )
        assert abs(cost.prompt_tokens - exact) <= cost.seam_tokens * cost.requests, (cost.prompt_tokens, exact)
        assert f"prompts {cost.prompt_tokens:,} (±4 a request at the question's seams)" in cost.lines()[0]
        assert "in smollm2-135m-instruct's tokens" in cost.lines()[0]
        cost = judge_cost(plan, qwen_like, "qwen-like")
        exact = _exact_tokens(plan, lambda texts: [len(e.ids) for e in qwen_like.encode_batch(texts)])
        assert abs(cost.prompt_tokens - exact) <= cost.seam_tokens * cost.requests, (cost.prompt_tokens, exact)


def test_before_the_model_is_prepared_the_prompts_are_estimated_from_characters():
    plan = plan_of(paper_config(roles={"include": ["pirate", "ghost"]}, questions={"n_questions": 3}))
    cost = judge_cost(plan, None, "the model is not prepared yet")
    chars = 0
    for name in ("pirate", "ghost"):
        role = plan.bank.roles[name]
        chars += 5 * sum(
            len(DEFAULT_SYSTEM)
            + len(render_prompt(DEFAULT_TEMPLATE, JudgeItem(name, role.description, q.question, "")))
            for q in plan.bank.questions
        )
    assert cost.prompt_tokens == math.ceil(chars / CHARS_PER_TOKEN) and cost.tokenizer is None
    assert "prompts ~" in cost.lines()[0]
    assert "roughly estimated from characters (the model is not prepared yet)" in cost.lines()[0]


def test_the_tokenizer_comes_from_local_files_only(tmp_path, model_dir, monkeypatch):
    """The prepared model's folder (its manifest), a local model directory, or the Hugging Face cache of a
    hub id; otherwise none, and why."""
    import huggingface_hub.constants

    results, hub = tmp_path / "results", "someone/some-model"
    manifest = results / "m/model.json"
    manifest.parent.mkdir(parents=True)
    assert model_tokenizer({"name": "m", "source": hub}, results) == (None, "the model is not prepared yet")
    manifest.write_text(json.dumps({"source": "bundled:x", "path": str(model_dir)}))
    tokenizer, label = model_tokenizer({"name": "m", "source": "bundled:x"}, results)
    assert label == "m" and tokenizer.encode("Hello", add_special_tokens=False).ids
    assert model_tokenizer({"name": "m", "source": "bundled:y"}, results)[0] is None  # a manifest of another source
    assert model_tokenizer({"name": "other", "source": str(model_dir)}, results)[1] == "other"  # a local model
    manifest.write_text(json.dumps({"source": "bundled:x", "path": str(tmp_path / "gone")}))
    assert model_tokenizer({"name": "m", "source": "bundled:x"}, results) == (
        None,
        f"no tokenizer.json of {tmp_path / 'gone'} on this machine",
    )
    manifest.write_text(json.dumps({"source": hub, "path": hub, "revision": ""}))
    cache = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    assert model_tokenizer({"name": "m", "source": hub}, results)[0] is None  # not in the cache: no download
    snapshot = cache / "models--someone--some-model/snapshots/0123abcd"
    snapshot.mkdir(parents=True)
    (cache / "models--someone--some-model/refs").mkdir()
    (cache / "models--someone--some-model/refs/main").write_text("0123abcd")
    shutil.copy(model_dir / "tokenizer.json", snapshot / "tokenizer.json")
    assert model_tokenizer({"name": "m", "source": hub}, results)[1] == "m"


@pytest.mark.slow
def test_a_dry_run_with_an_api_judge_prints_its_cost(tiny_run, tmp_path):
    """`snakemake -n` on the tiny run with an OpenAI judge: 3 roles x 2 prompts x 2 questions, counted with the
    prepared model's tokenizer."""
    work = copy_run(tiny_run, tmp_path / "work")
    shutil.copytree(ROOT / "workflow", work / "workflow", dirs_exist_ok=True)  # this checkout's (AXIS_TINY_RUN: older)
    path = work / "config/config.yaml"
    config = yaml.safe_load(path.read_text())
    openai = {"base_url": "http://127.0.0.1:9/v1", "model": "judge-model", "api_key_env": None, "prices": PRICES}
    config["judge"] = {"backend": "openai", "openai": openai}
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    err = snakemake(work, "-n").stderr
    lines = [line for line in err.splitlines() if line.startswith("judge")]
    assert len(lines) == 2, err[-3000:]
    assert lines[0].startswith("judge: 12 requests to judge-model before the cache (3 roles x 2 prompts x 2 questions)")
    assert "in smollm2-135m-instruct's tokens" in lines[0] and "replies at most 16 each" in lines[0]
    assert lines[1].startswith("judge cost: at most $0.01 before the cache")  # a fraction of a cent, rounded up
