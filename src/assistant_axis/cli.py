"""Command line: `assistant-axis lint` checks the role and question bank; `calibrate-judge` fits the
embedding judge's thresholds on hand-labelled replies and reports its agreement with them."""

from __future__ import annotations

import argparse
import json
import random
import sys

from assistant_axis.errors import AxisError

__all__ = ["main"]


def _lint(args: argparse.Namespace) -> None:
    from assistant_axis.roles import lint

    print(lint(args.roles, args.questions))


def _read_labels(path: str):
    from pathlib import Path

    from assistant_axis.judge import JudgeItem
    from assistant_axis.roles import _jsonl  # the same JSON Lines reader as the question bank

    rows = [row for _, row in _jsonl(Path(path))]
    items = [JudgeItem(r["role"], r["description"], r["question"], r["response"]) for r in rows]
    return items, [int(r["label"]) for r in rows]


def _calibrate(args: argparse.Namespace) -> None:
    from assistant_axis.judge import EmbeddingJudge, EmbeddingThresholds, calibrate

    items, labels = _read_labels(args.labels)
    judge = EmbeddingJudge()
    fitted, fit_acc = calibrate(judge, items, labels)
    # Held-out estimate: fit on one half, score the other, both ways, over a few random splits.
    rng, held_out = random.Random(args.seed), []
    for _ in range(args.splits):
        order = list(range(len(items)))
        rng.shuffle(order)
        halves = order[: len(order) // 2], order[len(order) // 2 :]
        for fit, test in (halves, halves[::-1]):
            t, _ = calibrate(judge, [items[i] for i in fit], [labels[i] for i in fit])
            feats = judge.features([items[i] for i in test])
            held_out.append(sum(judge.decide(f, t) == labels[i] for f, i in zip(feats, test, strict=True)) / len(test))
    report = {
        "thresholds": fitted.__dict__,
        "agreement_in_sample": round(fit_acc, 3),
        "agreement_held_out": round(sum(held_out) / len(held_out), 3),
        "n_labels": len(labels),
        "default_thresholds": EmbeddingThresholds().__dict__,
    }
    print(json.dumps(report, indent=2))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="assistant-axis", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    lint = sub.add_parser("lint", help="validate the role bank and the questions; print counts")
    lint.add_argument("--roles", default="data/roles")
    lint.add_argument("--questions", default="data/questions/questions.jsonl")
    lint.set_defaults(func=_lint)
    cal = sub.add_parser("calibrate-judge", help="fit the embedding judge's thresholds on labelled replies")
    cal.add_argument("labels", nargs="?", default="tests/data/judge_labels.jsonl")
    cal.add_argument("--splits", type=int, default=5)
    cal.add_argument("--seed", type=int, default=0)
    cal.set_defaults(func=_calibrate)
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except AxisError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
