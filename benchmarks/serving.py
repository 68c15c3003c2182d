"""Serving speed in vLLM, compiled and eager: uncapped, capped (mixed settings) and recording, at
concurrency 1 and 16.

The same greedy requests (bank conversations, up to `--max-tokens` new tokens each) go to seven engines,
one at a time, each in a process of its own (an engine whose ops are reached in process holds that
process's distributed state; the parent starts them in turn and prints the ratios):
- uncapped eager / uncapped compiled: vLLM as it comes (no ops in its model);
- capped compiled / capped eager: the engine `serve --engine vllm` starts (edit ops on the capping config's
  layers, telemetry on them), every other request under the cap and the rest uncapped, all in one batch;
  the ops traced into the graph (the default), and "registered ops": the same functions as registered
  custom ops, which the compiler does not look inside (`Layout.custom_ops`);
- capture compiled / capture eager: the engine the generate stage starts with `capture_activations`
  (record ops on every layer), every request recorded as it is generated.
`--concurrency` requests go in at once, and the next ones when they are done. Engine start (compilation
included) is reported, not counted. Needs an axis and a capping config: the quickstart's, or `--results`.

    python -m benchmarks.serving --results /path/to/results/smollm2-135m-instruct
    # the GPU version: a bigger model with its own results (axis and capping) from the workflow
    python -m benchmarks.serving --model /models/Qwen3-8B --results results/qwen3-8b --dtype bfloat16 \
        --kv-cache-gib 20 --requests 64 --max-tokens 256
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

from assistant_axis.axis import load_axis, unit_rows
from assistant_axis.interop import load_capping
from assistant_axis.models import load_tokenizer
from assistant_axis.templates import ChatTemplate
from benchmarks.harness import ROOT, Table, conversations, load, machine_line, model_dir, require

RESULT = "variant result:"
VARIANTS = {  # label -> (ops, compiled)
    "uncapped eager": ("none", False),
    "uncapped compiled": ("none", True),
    "capped compiled": ("capped", True),
    "capped compiled, registered ops": ("capped-registered", True),
    "capped eager": ("capped", False),
    "capture compiled": ("capture", True),
    "capture eager": ("capture", False),
}


def run_variant(args) -> dict:
    """One engine: its start time, per concurrency the best tokens/s of `repeat` runs, and its replies."""
    # vLLM loads only in a child that runs an engine
    from vllm import SamplingParams

    from assistant_axis.engines.vllm.engine import hooked_engine, recording_engine, vllm_engine, vllm_engine_args
    from assistant_axis.engines.vllm.hooks import ActivationRecorder, EngineHooks
    from assistant_axis.engines.vllm.ops import Layout
    from assistant_axis.engines.vllm.session import VLLMSession

    ops, compiled = VARIANTS[args.variant]
    results = Path(args.results)
    capping = load_capping(sorted((results / "capping").glob("*.safetensors"))[0]).normalized()
    axis, axis_layers, _ = load_axis(results / "axis.safetensors")
    units = unit_rows(axis, axis_layers, capping.layers, capping.hidden_size)
    template = ChatTemplate(load_tokenizer(args.model), {}, "model")
    prompts = [template.ids(c, add_generation_prompt=True) for c in conversations(args.requests)]
    engine = {
        "kv_cache_memory_bytes": int(args.kv_cache_gib * 2**30),
        "max_model_len": 2048,
        "enable_prefix_caching": False,  # every run computes every token, whichever engine
        "enforce_eager": not compiled,
    }
    engine_args = vllm_engine_args(args.model, engine, "benchmark", args.dtype)
    start = time.perf_counter()
    if ops == "none":
        # Its engine core in this process too, as the hooked engines run theirs: on 2 cores a separate
        # engine-core process competes with this one, which would make the baseline, not the ops, differ.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        llm = vllm_engine(engine_args, "benchmark")
    elif ops.startswith("capped"):
        layout = VLLMSession.layout(capping.layers, {"cap": capping}, None)
        # registered: opaque to inductor, each call its eager body (the default traces them inline)
        layout = replace(layout, custom_ops=ops == "capped-registered")
        llm = hooked_engine(engine_args, "benchmark", layout)
        hooks = EngineHooks(llm, units, capping.layers, {"none": [], "cap": [capping]})
    else:
        llm = recording_engine(engine_args, "benchmark", Layout(record="all"))
        recorder = ActivationRecorder(llm, list(range(llm.llm_engine.model_config.hf_config.num_hidden_layers)))
    started = time.perf_counter() - start

    def request(i: int, key: str):
        greedy = {"temperature": 0.0, "max_tokens": args.max_tokens}
        if ops.startswith("capped"):
            setting = "cap" if i % 2 else "none"
            return hooks.prompt(setting, prompts[i]), hooks.sampling_params(setting, key, **greedy)
        params = recorder.sampling_params(key, **greedy) if ops == "capture" else SamplingParams(**greedy)
        return {"prompt_token_ids": prompts[i]}, params

    def run(concurrency: int, tag: str) -> list[list[int]]:
        tokens = []
        for at in range(0, len(prompts), concurrency):
            keys = [f"{tag}-{i}" for i in range(at, min(at + concurrency, len(prompts)))]
            asked = [request(at + k, key) for k, key in enumerate(keys)]
            outs = llm.generate([p for p, _ in asked], [q for _, q in asked], use_tqdm=False)
            tokens += [list(out.outputs[0].token_ids) for out in outs]
            if ops.startswith("capped"):  # as the server reads them, per request
                for key in keys:
                    hooks.pop(key)
            elif ops == "capture":  # as the generate stage reads them, per batch
                recorder.pop(keys)
        return tokens

    levels = [int(c) for c in args.concurrency.split(",")]
    run(max(levels), "warm-up")
    rate = {}
    for concurrency in levels:
        best = float("inf")
        for r in range(args.repeat):
            began = time.perf_counter()
            tokens = run(concurrency, f"{concurrency}-{r}")
            best = min(best, time.perf_counter() - began)
        rate[str(concurrency)] = sum(map(len, tokens)) / best
    return {"start": started, "rate": rate, "tokens": tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default=str(ROOT / "results/smollm2-135m-instruct"))
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--model", help="a model directory (default: the bundled model); on a GPU, its own")
    parser.add_argument("--dtype", default="float32", help="bfloat16 on a GPU")
    parser.add_argument("--kv-cache-gib", type=float, default=0.5)
    parser.add_argument("--concurrency", default="1,16", help="requests in flight at a time, comma-separated")
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # a child's one engine
    args = parser.parse_args()
    if args.variant:
        print(RESULT, json.dumps(run_variant(args)), flush=True)  # vLLM prints to stdout too
        return
    results = Path(args.results)
    require(
        any((results / "capping").glob("*.safetensors")) and (results / "axis.safetensors").is_file(),
        f"no axis/capping under {results}: run the quickstart",
    )
    print(machine_line(), "|", load())
    args.model = args.model or model_dir()
    measured = {}
    for label in VARIANTS:
        command = [sys.executable, "-m", "benchmarks.serving", *sys.argv[1:], "--variant", label]
        command += ["--concurrency", args.concurrency] if "--concurrency" not in sys.argv else []
        command += ["--model", args.model] if "--model" not in sys.argv else []
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
        require(done.returncode == 0, f"{label}: {done.stderr[-3000:]}")
        line = next(line for line in done.stdout.splitlines() if line.startswith(RESULT))
        measured[label] = json.loads(line.removeprefix(RESULT))
        print(f"  {label}: started in {measured[label]['start']:.1f} s, {measured[label]['rate']}", flush=True)
    table = Table()
    for label, seen in measured.items():
        table.report(f"{label}: engine start", f"{seen['start']:.1f} s", "not counted")
    for concurrency in args.concurrency.split(","):
        rate = {label: seen["rate"][concurrency] for label, seen in measured.items()}
        for label in VARIANTS:
            ops, compiled = VARIANTS[label]
            baseline = f"uncapped {'compiled' if compiled else 'eager'}"
            notes = [] if label == baseline else [f"{rate[label] / rate[baseline]:.2f}x {baseline}"]
            if ops != "none" and compiled:
                eager = label.replace("compiled", "eager").replace(", registered ops", "")
                notes.append(f"{rate[label] / rate[eager]:.2f}x {eager}")
            table.report(f"{label}, concurrency {concurrency}", f"{rate[label]:.1f} tok/s", ", ".join(notes))
    same = measured["capped compiled"]["tokens"] == measured["capped eager"]["tokens"]
    table.report("capped replies identical (compiled vs eager)", str(same), "greedy, fp32")
    print()
    print(table.markdown())


if __name__ == "__main__":
    main()
