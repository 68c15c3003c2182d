"""Serving speed: capped vLLM vs uncapped vLLM vs our transformers server, at concurrency 1 and 16.

The same requests (bank conversations, greedy, up to `--max-tokens` each) go to: a `TransformersSession`
(what `serve` runs by default: one reply at a time, capped), and one `VLLMSession` (what
`serve --engine vllm` runs) with the setting "none" and the capping config, `--concurrency` requests
in flight at a time. In process, without HTTP: the engines are compared, not the web framework. Engine
start is reported, not counted. Needs an axis and a capping config: the quickstart's, or `--results`.

    python -m benchmarks.serving --results /path/to/results/smollm2-135m-instruct
    # the GPU version: a bigger model with its own results (axis and capping) from the workflow
    python -m benchmarks.serving --model /models/Qwen3-8B --results results/qwen3-8b --dtype bfloat16 \
        --kv-cache-gib 20 --requests 64 --max-tokens 256
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from assistant_axis.engines import Sampling
from benchmarks.harness import ROOT, Table, conversations, load, machine_line, model_dir, require


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default=str(ROOT / "results/smollm2-135m-instruct"))
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--model", help="a model directory (default: the bundled model); on a GPU, its own")
    parser.add_argument("--dtype", default="float32", help="bfloat16 on a GPU")
    parser.add_argument("--kv-cache-gib", type=float, default=0.5)
    args = parser.parse_args()
    results = Path(args.results)
    caps = sorted((results / "capping").glob("*.safetensors"))
    require(caps and (results / "axis.safetensors").is_file(), f"no axis/capping under {results}: run the quickstart")
    cap = caps[0]
    print(machine_line(), "|", load())
    table = Table()
    path = args.model or model_dir()
    convs = conversations(args.requests)
    greedy = Sampling(temperature=0, max_tokens=args.max_tokens)

    from assistant_axis.chat import load_session

    hf = load_session(path, str(results / "axis.safetensors"), [str(cap)], sampling=greedy, dtype=args.dtype)
    start = time.perf_counter()
    engine = {"kv_cache_memory_bytes": int(args.kv_cache_gib * 2**30), "max_model_len": 2048}
    axis = str(results / "axis.safetensors")
    vllm = load_session(path, axis, [str(cap)], dtype=args.dtype, sampling=greedy, engine="vllm", engine_args=engine)
    table.report("vLLM engine start", f"{time.perf_counter() - start:.1f} s", "not counted")
    name = cap.stem

    def transformers():
        return [hf.complete(c, greedy) for c in convs]

    def engine_at(setting: str, concurrency: int):
        def run():
            replies = []
            for i in range(0, len(convs), concurrency):
                streams = [vllm.submit(c, greedy, setting=setting) for c in convs[i : i + concurrency]]
                replies += [s.result() for s in streams]
            return replies

        return run

    variants = {"transformers serve (capped)": transformers}
    for concurrency in (1, 16):
        variants[f"vLLM uncapped, concurrency {concurrency}"] = engine_at("none", concurrency)
        variants[f"vLLM capped, concurrency {concurrency}"] = engine_at(name, concurrency)
    seconds, replies = {}, {}
    for _ in range(args.repeat):  # interleaved, best of `repeat`
        for label, fn in variants.items():
            start = time.perf_counter()
            replies[label] = fn()
            seconds[label] = min(seconds.get(label, float("inf")), time.perf_counter() - start)
    tokens = {label: sum(len(r.token_ids) for r in out) for label, out in replies.items()}
    rate = {label: tokens[label] / seconds[label] for label in variants}
    base = rate["transformers serve (capped)"]
    same = sum(
        a.text == b.text
        for a, b in zip(replies["transformers serve (capped)"], replies["vLLM capped, concurrency 16"], strict=True)
    )
    for label in variants:
        uncapped = label.replace("capped", "uncapped") if "vLLM capped" in label else None
        note = f"{rate[label] / base:.2f}x transformers"
        if uncapped:
            note += f", {rate[label] / rate[uncapped]:.2f}x uncapped vLLM"
        table.report(label, f"{rate[label]:.0f} tok/s", note)
    table.report("capped replies identical (transformers vs vLLM)", f"{same}/{len(convs)}", "greedy, fp32")
    vllm.close()
    print()
    print(table.markdown())


if __name__ == "__main__":
    main()
