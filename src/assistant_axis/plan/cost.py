"""What an API judge (`judge.backend: openai`) will cost, estimated at planning, before any reply exists.

- Requests: one per judged answer, before the cache: every role but `default` (which is not judged),
  its prompts x the questions. An empty reply is not sent, so the run may send fewer.
- Input tokens: each request's fixed part, the system message and the judge prompt with its role,
  description and question filled in and the response left empty, plus at most `generate.max_tokens`
  for the reply: an upper bound. The fixed part is counted with the model's own tokenizer (its
  `tokenizer.json`, from local files: the prepared model's folder, a local model directory or the
  Hugging Face cache, never a download); before the model is prepared, from characters (a rough
  estimate, ~4 characters a token). These are the model's tokens, not the judge's: the judge's own
  tokenizer counts somewhat differently, and its server adds the chat format's tokens, not counted here.
- Output tokens: 1 a request (`scoring: logprobs`), at most 4 (`scoring: parse`).
- Cost: with `judge.openai.prices: {input, output}` (USD per million tokens).

Tokenizing every distinct rendered prompt of config/paper.yaml (68,160: 284 roles x 240 questions) took
17-25 s on 2 cores. Instead each role's prompt is tokenized as the pieces around its `{question}` slots, and
each question once (~800 texts, ~0.05 s). The sum differs from the whole prompt's count only where the
tokenizer would merge or split across a seam: with the default template (the question on its own line) it
was exact for all 68,160 paper prompts, with SmolLM2's tokenizer and with a Qwen2-style pre-tokenizer on its
vocabulary; a template with `: {question}` is one token off there (the space joins the question's first
word). The line states ±1 a seam (tests/test_cost.py checks both tokenizers against whole prompts).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from assistant_axis.judge import DEFAULT_SYSTEM, PLACEHOLDERS
from assistant_axis.manifest import model_path
from assistant_axis.roles import DEFAULT_ROLE

__all__ = ["JudgeCost", "judge_cost", "model_tokenizer", "prompt_pieces", "PRICE_KEY", "CHARS_PER_TOKEN"]

PRICE_KEY = "prices"  # judge.openai.prices: planning's alone (plan.config.PLANNING_ONLY), never sent to a job
CHARS_PER_TOKEN = 4  # the rough estimate before the model's tokenizer is on this machine
OUTPUT_TOKENS = {"logprobs": 1, "parse": 4}  # OpenAIJudge.request's max_tokens
SEAM_TOKENS = 1  # what a count may be off at each side of a question (see above)
_PLACEHOLDER = re.compile(r"\{(" + "|".join(PLACEHOLDERS) + r")\}")  # as judge.render_prompt fills them


@dataclass(frozen=True)
class JudgeCost:
    judge_model: str
    scoring: str
    requests: int
    shape: str  # where the requests come from: "284 roles x 5 prompts x 240 questions"
    prompt_tokens: int  # every request's fixed part (system message + judge prompt, response empty)
    seam_tokens: int  # the fixed part is exact to within this many tokens a request
    max_reply_tokens: int  # generate.max_tokens: the bound on each reply in the prompt
    tokenizer: str | None  # whose tokenizer counted; None: estimated from characters
    prices: dict | None  # USD per million tokens: {input, output}
    rough_because: str = ""  # why there is no tokenizer (when there is none)

    @property
    def reply_tokens(self) -> int:
        return self.requests * self.max_reply_tokens

    @property
    def input_tokens(self) -> int:
        """An upper bound: every reply as long as `generate.max_tokens` allows."""
        return self.prompt_tokens + self.reply_tokens

    @property
    def output_tokens(self) -> int:
        return self.requests * OUTPUT_TOKENS[self.scoring]

    def cost(self) -> dict[str, float] | None:
        """USD: `input` and `output` (upper bounds), `prompts` (the fixed parts alone), `total`; printed rounded up
        to the cent."""
        if not self.prices:
            return None
        price_in, price_out = self.prices["input"] / 1e6, self.prices["output"] / 1e6
        cost = {
            "input": self.input_tokens * price_in,
            "prompts": self.prompt_tokens * price_in,
            "output": self.output_tokens * price_out,
        }
        return {**cost, "total": cost["input"] + cost["output"]}

    def lines(self) -> list[str]:
        """What planning prints: the requests and tokens, then the cost (or where to give prices)."""
        if self.tokenizer is None:
            prompts = f"~{_amount(self.prompt_tokens)}"
            counted = f"the prompts roughly estimated from characters ({self.rough_because}); in the model's tokens"
        else:
            prompts = _amount(self.prompt_tokens)
            if self.seam_tokens:
                prompts += f" (±{self.seam_tokens} a request at the question's seams)"
            counted = f"in {self.tokenizer}'s tokens"
        output = "1 each" if self.scoring == "logprobs" else f"at most {OUTPUT_TOKENS[self.scoring]} each"
        tokens = (
            f"judge: {self.requests:,} requests to {self.judge_model} before the cache ({self.shape}); input at most "
            f"{_amount(self.input_tokens)} tokens = prompts {prompts} + replies at most {self.max_reply_tokens} each; "
            f"output {_amount(self.output_tokens)} tokens ({output}: scoring {self.scoring}); {counted}, not the "
            "judge's, without the server's chat format"
        )
        cost = self.cost()
        if cost is None:
            where = f"judge.openai.{PRICE_KEY}: {{input, output}}, USD per million tokens"
            return [tokens, f"judge cost: no prices ({where})"]
        return [
            tokens,
            f"judge cost: at most {_usd(cost['total'])} before the cache: input at most {_usd(cost['input'])} (the "
            f"prompts alone {_usd(cost['prompts'])}) at {_price(self.prices['input'])}/M tokens, output "
            f"{_usd(cost['output'])} at {_price(self.prices['output'])}/M",
        ]


def _amount(n: int) -> str:
    return f"{n / 1e6:,.1f}M" if n >= 1e6 else f"{n:,}"


def _usd(x: float) -> str:
    """A cost rounded up to the cent (the figures are bounds): $96.56, $0.01."""
    return f"${math.ceil(round(x * 100, 6)) / 100:,.2f}"


def _price(x: float) -> str:
    """A price as given: $0.40, $0.075."""
    return f"${x:.2f}" if round(x, 2) == x else f"${x:g}"


def prompt_pieces(template: str, role: str, description: str) -> list[str]:
    """A role's judge prompt as the texts between its `{question}` slots, the response left empty: the
    rendered prompt is these pieces joined with the question."""
    values = {"role": role, "description": description, "response": ""}
    pieces, current, start = [], "", 0
    for match in _PLACEHOLDER.finditer(template):
        current += template[start : match.start()]
        if match.group(1) == "question":
            pieces.append(current)
            current = ""
        else:
            current += values[match.group(1)]
        start = match.end()
    return [*pieces, current + template[start:]]


def model_tokenizer(model: dict, results: str | Path = "results"):
    """The model's tokenizer (a `tokenizers.Tokenizer`) from local files only, and its name; (None, why)
    when it is not on this machine: the prepared model's folder (`results/<name>/model.json`), a local
    model directory, or the Hugging Face cache of a hub id (never downloaded)."""
    manifest = Path(results) / model["name"] / "model.json"
    info = None
    try:
        info = json.loads(manifest.read_text())
    except (OSError, ValueError):
        pass
    if isinstance(info, dict) and info.get("source") == model["source"] and info.get("path"):
        path, revision = model_path(manifest, str(info["path"])), info.get("revision") or None
    elif Path(model["source"]).is_dir():
        path, revision = model["source"], None
    else:
        return None, "the model is not prepared yet"
    file = Path(path) / "tokenizer.json"
    if not file.is_file():
        try:  # a hub id: its tokenizer.json if the Hugging Face cache holds it (this never downloads)
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(path, "tokenizer.json", revision=revision)
        except Exception:  # not a hub id (e.g. a folder that is gone)
            cached = None
        if not isinstance(cached, str):
            return None, f"no tokenizer.json of {path} on this machine"
        file = Path(cached)
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(file)), model["name"]
    except Exception as exc:  # a tokenizer.json this version of tokenizers cannot read
        return None, f"{file}: {exc}"


def judge_cost(plan, tokenizer=None, label: str = "") -> JudgeCost | None:
    """The estimate for an API judge (None for any other judge): requests, tokens and, with prices, the cost.
    `tokenizer`: a `tokenizers.Tokenizer` counting the model's tokens (`label`: whose, the model's name);
    None: estimated from characters (`label`: why there is no tokenizer)."""
    if "judge" not in plan.jobs.api_sections("judge"):
        return None
    settings = plan.config["judge"].get("openai") or {}
    scoring = settings.get("scoring", "logprobs")
    system = settings.get("system", DEFAULT_SYSTEM)
    bank = plan.bank
    judged = [name for name in bank.roles if name != DEFAULT_ROLE]
    n_prompts = {name: len(bank.system_prompts(name)) for name in judged}
    questions = [q.question for q in bank.questions]
    requests = sum(n_prompts.values()) * len(questions)
    if not requests:
        return None
    pieces = {}
    for name in judged:
        judge = plan.params.judge(name)  # the template, role and description the judge job renders
        pieces[name] = prompt_pieces(judge["template"], judge["role"], judge["description"])
    count = _counter(tokenizer)
    flat = [piece for name in judged for piece in pieces[name]]
    sizes = iter(count([*([system] if system else []), *questions, *flat]))
    system_size = next(sizes) if system else 0
    question_total = sum(next(sizes) for _ in questions)
    units, slots = 0, 0
    for name in judged:
        fixed = system_size + sum(next(sizes) for _ in pieces[name])
        slots = max(slots, len(pieces[name]) - 1)
        units += n_prompts[name] * (len(questions) * fixed + (len(pieces[name]) - 1) * question_total)
    if tokenizer is None:
        prompt_tokens, seams = math.ceil(units / CHARS_PER_TOKEN), 0
    else:
        prompt_tokens, seams = units, 2 * SEAM_TOKENS * slots
    per_role = set(n_prompts.values())
    shape = (
        f"{len(judged)} roles x {per_role.pop()} prompts x {len(questions)} questions"
        if len(per_role) == 1
        else f"the prompts of {len(judged)} roles x {len(questions)} questions"
    )
    return JudgeCost(
        judge_model=str(settings.get("model", "?")),
        scoring=scoring,
        requests=requests,
        shape=shape,
        prompt_tokens=prompt_tokens,
        seam_tokens=seams,
        max_reply_tokens=int(plan.config["generate"]["max_tokens"]),
        tokenizer=(label or "the model") if tokenizer is not None else None,
        prices=settings.get(PRICE_KEY),
        rough_because=(label or "no tokenizer given") if tokenizer is None else "",
    )


def _counter(tokenizer) -> Callable[[Sequence[str]], list[int]]:
    if tokenizer is None:
        return lambda texts: [len(t) for t in texts]
    return lambda texts: [len(e.ids) for e in tokenizer.encode_batch(list(texts), add_special_tokens=False)]
