"""Command line: `assistant-axis lint` checks the role and question bank; `calibrate-judge` fits the
embedding judge's thresholds on hand-labelled replies and reports its agreement with them; `convert`
reads and writes the paper code's .pt files; `project`, `chat` and `serve` monitor, steer and cap a
model with its Assistant Axis."""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from pathlib import Path

from assistant_axis.engines import ENGINES
from assistant_axis.errors import ArgumentError, AxisError, InputError, renamed

__all__ = ["main"]

# Each command imports what it runs inside its own function: `--help` and `lint` load no torch,
# transformers or vLLM.


def _lint(args: argparse.Namespace) -> None:
    from assistant_axis.roles import lint

    print(lint(args.roles, args.questions))


def _read_labels(path: str):
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


def _json_object(value: str | None, flag: str) -> dict | None:
    """A flag's JSON object (None when the flag is not given)."""
    if value is None:
        return None
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as exc:
        raise InputError("command line", flag, f"not JSON ({exc})") from exc
    if not isinstance(parsed, dict):
        raise InputError("command line", flag, "must be a JSON object")
    return parsed


def _session(args: argparse.Namespace):
    """Check the inputs (cheap), then open the engine with the axis, capping and steering."""
    from assistant_axis.chat import default_model, load_session
    from assistant_axis.engines import Sampling

    args.model = args.model or default_model()
    for name, ok in (
        ("--max-tokens", args.max_tokens >= 1),
        ("--temperature", args.temperature >= 0),
        ("--top-p", 0 < args.top_p <= 1),
    ):
        if not ok:
            raise InputError("command line", name, f"out of range: {getattr(args, name[2:].replace('-', '_'))}")
    sampling = Sampling(temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens, seed=args.seed)
    options = _json_object(args.chat_template_kwargs, "--chat-template-kwargs")
    # The library names its own arguments in errors; here they came from these flags.
    flags = {"load_model.dtype": "--dtype", "bundled_gguf.source": "--model", "find_blocks.path": "--model"}
    with renamed("command line", flags):
        return load_session(
            args.model,
            args.axis,
            args.cap or [],
            args.steer,
            args.steer_layers,
            args.steer_positions,
            args.layers,
            args.dtype,
            sampling,
            getattr(args, "system", None),
            template_options=options,
            cap_experiment=args.experiment,
            steer_unit=args.steer_unit,
            engine=getattr(args, "engine", "transformers"),
            engine_args=_json_object(getattr(args, "engine_args", None), "--engine-args"),
        )


def _project(args: argparse.Namespace) -> None:
    from assistant_axis.artifacts import write_parquet
    from assistant_axis.project import load_conversation, plot_trajectory

    messages = load_conversation(args.conversation)  # a malformed file fails before the model loads
    frame = _session(args).conversation_projections(messages)
    print(frame.to_string(index=False))
    if args.out:
        write_parquet(frame, args.out)
    if args.plot:
        plot_trajectory(frame, args.plot)


def _chat(args: argparse.Namespace) -> None:
    from assistant_axis.chat import run_chat

    run_chat(_session(args))


def _serve(args: argparse.Namespace) -> None:
    from assistant_axis.axis import load_axis
    from assistant_axis.serve import API_KEY_ENV, Limits, run_server

    for flag, value in (("--max-queue", args.max_queue), ("--max-prompt-tokens", args.max_prompt_tokens)):
        if value is not None and value < 1:
            raise ArgumentError("command line", flag, f"must be >= 1, got {value}")
    for flag, value in (("--request-timeout", args.request_timeout), ("--shutdown-grace", args.shutdown_grace)):
        if value <= 0:
            raise ArgumentError("command line", flag, f"must be > 0 seconds, got {value:g}")
    limits = Limits(args.max_queue, args.request_timeout, args.max_prompt_tokens, args.shutdown_grace)
    session = _session(args)
    names = args.served_model_name or [load_axis(args.axis)[2].get("model") or Path(args.model).name]
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    run_server(session, str(names[0]), args.host, args.port, limits, tuple(names[1:]), api_key)


def _convert(args: argparse.Namespace) -> None:
    from assistant_axis.interop import export_file, import_file

    *sources, target = args.paths
    if not sources:
        raise InputError("command line", "paths", "give SOURCE... TARGET")
    if all(s.endswith(".pt") for s in sources):
        if len(sources) > 1:
            raise InputError("command line", "paths", "import one .pt file at a time")
        written = import_file(sources[0], target, args.experiment, args.model_name)
    elif target.endswith(".pt") and all(s.endswith(".safetensors") for s in sources):
        if args.experiment or args.model_name:
            raise InputError("command line", "--experiment", "only for importing a .pt file")
        export_file(sources, target)
        written = [target]
    else:
        raise InputError(
            "command line",
            "paths",
            "import: one .pt -> .safetensors (or a folder for every experiment); export: .safetensors... -> one .pt",
        )
    for path in written:
        print(path)


def _model_options() -> argparse.ArgumentParser:
    shared = argparse.ArgumentParser(add_help=False)
    shared.add_argument(
        "--model",
        help="model directory, hub id or bundled:NAME (default: "
        "results/models/smollm2-135m-instruct if prepared, else bundled:smollm2-135m-instruct)",
    )
    shared.add_argument("--axis", default="results/smollm2-135m-instruct/axis.safetensors")
    shared.add_argument(
        "--cap",
        metavar="CAPPING",
        action="append",
        help="capping config: ours (results/<model>/capping/*.safetensors) "
        "or the paper code's capping_config.pt with --experiment; repeat it to load several (a request "
        "picks one by its file stem, the first is the default)",
    )
    shared.add_argument(
        "--experiment", metavar="ID", help="the experiment of a capping_config.pt, e.g. layers_46:54-p0.25"
    )
    shared.add_argument(
        "--steer",
        type=float,
        metavar="COEFFICIENT",
        help="add COEFFICIENT x axis at --steer-layers (negative: away from the Assistant)",
    )
    shared.add_argument(
        "--steer-unit",
        choices=("unit", "raw"),
        default="unit",
        help="what COEFFICIENT multiplies: the unit axis (default, residual-stream units) or the raw "
        "axis row, as the paper code's ActivationSteering does (their coefficients carry over)",
    )
    shared.add_argument("--steer-layers", type=int, nargs="+", help="default: the axis's middle layer")
    shared.add_argument("--steer-positions", choices=("all", "last"), default="all")
    shared.add_argument(
        "--layers",
        type=int,
        nargs="+",
        help="projection layers (default: the capped layers, else the axis's middle layer)",
    )
    shared.add_argument("--max-tokens", type=int, default=256)
    shared.add_argument("--temperature", type=float, default=0.7)
    shared.add_argument("--top-p", type=float, default=0.9)
    shared.add_argument("--seed", type=int, default=0)
    shared.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    shared.add_argument(
        "--chat-template-kwargs",
        metavar="JSON",
        help="chat template options, e.g. '{\"enable_thinking\": false}' (default: the axis's own)",
    )
    return shared


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
    conv = sub.add_parser("convert", help="the paper code's .pt files to ours (.safetensors) and back")
    conv.add_argument(
        "paths",
        nargs="+",
        metavar="SOURCE... TARGET",
        help="import: FILE.pt OUT.safetensors (a capping_config.pt without --experiment: OUT is a "
        "folder, one file per experiment); export: FILE.safetensors... OUT.pt (several capping "
        "configs make one capping_config.pt)",
    )
    conv.add_argument("--experiment", metavar="ID", help="import only this experiment of a capping_config.pt")
    conv.add_argument("--model-name", help="record the model the imported file belongs to (checked on load)")
    conv.set_defaults(func=_convert)
    shared = _model_options()
    proj = sub.add_parser("project", parents=[shared], help="per-turn projections of a conversation (JSON list)")
    proj.add_argument("conversation", metavar="CONVERSATION.json")
    proj.add_argument("--out", metavar="TABLE.parquet", help="write the table (turn, role, layer, projection)")
    proj.add_argument("--plot", metavar="PLOT.png", help="write the trajectory plot")
    proj.set_defaults(func=_project)
    engine = argparse.ArgumentParser(add_help=False)
    engine.add_argument(
        "--engine",
        choices=[name for name, spec in ENGINES.items() if "sessions" in spec.can],
        default="transformers",
        help="transformers: one reply at a time; vllm: many at once (continuous batching), every "
        "capping setting loaded in one engine",
    )
    engine.add_argument(
        "--engine-args",
        metavar="JSON",
        help='vLLM settings, e.g. \'{"max_model_len": 4096, "gpu_memory_utilization": 0.8}\'',
    )
    chat = sub.add_parser(
        "chat", parents=[shared, engine], help="chat in the terminal, showing each reply's projection"
    )
    chat.add_argument("--system", help="system prompt")
    chat.set_defaults(func=_chat)
    serve = sub.add_parser("serve", parents=[shared, engine], help="OpenAI-compatible /v1/chat/completions server")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument(
        "--served-model-name",
        nargs="+",
        metavar="NAME",
        help="the `model` in replies, then other names a request may use (default: the axis's model); "
        "a request naming another model gets a 404",
    )
    serve.add_argument(
        "--api-key",
        help="requests to /v1/... and /metrics must send `Authorization: Bearer KEY` (default: the environment "
        "variable AXIS_API_KEY, which keeps the key out of the process list; unset: no key)",
    )
    limits = serve.add_argument_group("limits (what the server refuses or cuts)")
    limits.add_argument(
        "--max-queue", type=int, default=32, help="requests admitted at once; more get 429 + Retry-After (32)"
    )
    limits.add_argument(
        "--request-timeout", type=float, default=600.0, help="seconds a reply may take before it is cut (600)"
    )
    limits.add_argument(
        "--max-prompt-tokens", type=int, help="refuse longer prompts with a 400 (default: the model's context)"
    )
    limits.add_argument(
        "--shutdown-grace",
        type=float,
        default=10.0,
        help="on SIGTERM, seconds replies may run before they are cut (10)",
    )
    serve.set_defaults(func=_serve)
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except AxisError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
