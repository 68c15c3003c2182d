"""What every benchmark shares: best-of-N timing with interleaved variants, the result table, the
machine line, checks that fail loudly, and the inputs (the bundled model, the bank's conversations, 256
cached replies).

Noise: the machines this runs on are shared, and a busy neighbour slows every kernel at random. So every
timing is the best of N repeats, the repeats of competing variants are interleaved, and long runs are
split into chunks that are each timed best-of-N (the same chunks for every variant): a chunk that was
slowed down by a neighbour in one repeat counts with its fastest repeat.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from pathlib import Path

import torch

from assistant_axis.engines import Sampling
from assistant_axis.engines.transformers import TransformersEngine
from assistant_axis.models import prepare_model
from assistant_axis.roles import load_bank, load_questions
from assistant_axis.templates import ChatTemplate, build_messages

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "benchmarks/.cache"


class BenchmarkError(RuntimeError):
    """A benchmark's correctness check failed: its figures would compare different results."""


def require(condition: bool, message: str) -> None:
    """A correctness check that survives `python -O` and says what failed."""
    if not condition:
        raise BenchmarkError(message)


class Table:
    """The figures of one run, printed as they come and as a Markdown table at the end."""

    def __init__(self):
        self.rows: list[tuple[str, str, str]] = []

    def report(self, name: str, value: str, note: str = "") -> None:
        self.rows.append((name, value, note))
        print(f"  {name:<46} {value:>14}  {note}", flush=True)

    def markdown(self) -> str:
        return "\n".join(
            [
                "| figure | value | note |",
                "|---|---:|---|",
                *(f"| {name} | {value} | {note} |" for name, value, note in self.rows),
            ]
        )


def load() -> str:
    return "load average {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def machine_line() -> str:
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
            if line.startswith("Model name")
        ),
        "?",
    )
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    bf16 = [f for f in ("avx512_bf16", "amx_bf16") if f in flags]
    return (
        f"{model}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads, "
        f"{torch.backends.cpu.get_cpu_capability()}), bf16 units: {', '.join(bf16) or 'none'}, "
        f"python {platform.python_version()}"
    )


def best_of(variants: dict, repeat: int) -> tuple[dict[str, float], dict[str, object]]:
    """Seconds per variant, best of `repeat`, variants interleaved; and each variant's last result."""
    best = {name: float("inf") for name in variants}
    results = {}
    for _ in range(repeat):
        for name, fn in variants.items():
            start = time.perf_counter()
            results[name] = fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best, results


def config_budget() -> int:
    import yaml

    return int(yaml.safe_load((ROOT / "config/config.yaml").read_text())["activations"]["batch_tokens"])


def model_dir() -> str:
    return prepare_model("smollm2-135m-instruct", "bundled:smollm2-135m-instruct", CACHE / "models").path


def conversations(n: int, system_role: bool = True) -> list[list[dict]]:
    """`n` (system prompt, question) conversations spread over the roles and questions of the bank
    (`system_role`: whether the model's template has one; see `build_messages`)."""
    bank = load_bank(ROOT / "data/roles")
    questions = load_questions(ROOT / "data/questions/questions.jsonl")
    roles = sorted(r for r in bank if r != "default")
    return [
        build_messages(bank[roles[i % len(roles)]].prompts[0], questions[i % len(questions)].question, system_role)
        for i in range(n)
    ]


def responses_256(model, tokenizer) -> list[tuple[list[dict], str]]:
    """256 sampled replies of the bundled model (generated once with our backend, then cached)."""
    path = CACHE / "responses.json"
    if path.is_file():
        return [(c, r) for c, r in json.loads(path.read_text())]
    print("  (generating the 256 benchmark responses once; cached in benchmarks/.cache)", flush=True)
    convs = conversations(256)
    backend = TransformersEngine(model, ChatTemplate(tokenizer), 32, progress=False)
    replies = backend.generate(convs, Sampling(0.7, 0.9, 96, 1))
    data = [(c, g.text) for c, g in zip(convs, replies, strict=True)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return data
