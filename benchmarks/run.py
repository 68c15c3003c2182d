"""Speed benchmarks: each figure is a ratio against a baseline or a floor measured in this process, on the
same inputs, so that machine noise cancels. One module per benchmark, sharing `harness.py`:

    .venv/bin/python -m benchmarks.run             # everything, prints a table (about 35 min on 2 CPU cores)
    .venv/bin/python -m benchmarks.run --quick     # smaller inputs, fewer repeats (a few minutes)
    .venv/bin/python -m benchmarks.run extraction  # only some of: floor extraction generation judge planning

Run from the checkout's root. Not part of the test suite; the numbers and the machine line go into
benchmarks/README.md by hand.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("TQDM_DISABLE", "1")  # progress bars would garble the table; read when tqdm loads

from assistant_axis.models import load_model  # noqa: E402
from benchmarks import extraction, floor, generation, judge, planning  # noqa: E402
from benchmarks.harness import Table, config_budget, load, machine_line, model_dir  # noqa: E402

BENCHMARKS = ["floor", "extraction", "generation", "judge", "planning"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("only", nargs="*", default=BENCHMARKS, choices=BENCHMARKS, metavar="BENCHMARK")
    parser.add_argument("--quick", action="store_true", help="smaller inputs and fewer repeats")
    parser.add_argument("--repeat", type=int, help="best of how many (default 3, quick 2)")
    parser.add_argument(
        "--budgets",
        help="extraction token budgets to time, comma-separated (default: the "
        "quickstart config's activations.batch_tokens)",
    )
    args = parser.parse_args()
    repeat = args.repeat or (2 if args.quick else 3)
    table, rates = Table(), floor.Rates()
    print(f"machine: {machine_line()}")
    print(f"start: {load()}", flush=True)
    path = model_dir()
    if {"floor", "extraction", "generation"} & set(args.only):
        model, tokenizer = load_model(path, "float32", device="cpu")  # once, for all three
    if {"floor", "extraction"} & set(args.only):
        floor.run(model, 10 * repeat, rates, table)
    if "extraction" in args.only:
        budgets = [int(b) for b in args.budgets.split(",")] if args.budgets else [config_budget()]
        extraction.run(model, tokenizer, path, args.quick, repeat, budgets, rates, table)
    if "generation" in args.only:
        generation.run(model, tokenizer, args.quick, repeat, table)
    if "judge" in args.only:
        judge.run(args.quick, repeat, table)
    if "planning" in args.only:
        planning.run(repeat, table)
    print(f"end: {load()}")
    print("\n" + table.markdown())


if __name__ == "__main__":
    main()
