"""Generation on a GPU: vLLM against our transformers backend, same prompts, same max tokens, one process.

    .venv/bin/python -m benchmarks.gpu --model Qwen/Qwen3-8B            # a model the machine has (hub cache or dir)
    .venv/bin/python -m benchmarks.gpu                                  # the bundled SmolLM2-135M (always present)
    .venv/bin/python -m benchmarks.gpu --device cpu --prompts 16 --max-tokens 16   # a smoke run on a CPU
    .venv/bin/python -m benchmarks.gpu --model /models/Qwen3-32B --extraction --tensor-parallel-size 2
        # activations instead: transformers vs vLLM extraction vs capture (benchmarks/vllm_activations.py)
    .venv/bin/python -m benchmarks.gpu --model /models/Qwen3-8B --interventions --results results/qwen3-8b
        # capping and recording compiled (CUDA graphs) vs eager vs uncapped (benchmarks/serving.py)

Needs the vLLM extra (`make test VLLM=vllm` or `pip install -e '.[vllm]'`). Both backends decode greedily,
so their replies can be compared; the transformers model is freed before vLLM loads, and vLLM's engine
start is reported apart from its generation time. Prints a Markdown table of tokens/s and the ratio.
"""

from __future__ import annotations

import argparse
import gc
import os
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # progress bars would garble the table; read when tqdm loads

import torch  # noqa: E402

from assistant_axis.engines import Sampling  # noqa: E402
from assistant_axis.engines.transformers import TransformersEngine  # noqa: E402
from assistant_axis.engines.vllm import VLLMEngine  # noqa: E402
from assistant_axis.engines.vllm.engine import vllm_engine, vllm_engine_args  # noqa: E402
from assistant_axis.models import load_model, prepare_model  # noqa: E402
from assistant_axis.templates import ChatTemplate  # noqa: E402
from benchmarks.harness import best_of, conversations  # noqa: E402 (the same prompts as the CPU benchmark)

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="hub id or model directory (default: the bundled SmolLM2-135M-Instruct)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", help="default: bfloat16 on a GPU, float32 on a CPU")
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64, help="transformers backend batch")
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--gpu-memory-utilization", type=float, help="default: 0.85 on a GPU, 0.1 of RAM on a CPU")
    parser.add_argument("--extraction", action="store_true", help="benchmark activation extraction instead")
    parser.add_argument("--interventions", action="store_true", help="benchmark compiled capping/recording instead")
    parser.add_argument("--results", help="with --interventions: the model's results (axis, capping)")
    args = parser.parse_args()
    gpu = args.device.startswith("cuda")
    dtype = args.dtype or ("bfloat16" if gpu else "float32")
    if args.extraction:
        import sys

        from benchmarks import vllm_activations

        sys.argv = [sys.argv[0], "--device", args.device, "--dtype", dtype, "--prompts", str(args.prompts)]
        sys.argv += ["--max-tokens", str(args.max_tokens), "--tensor-parallel-size", str(args.tensor_parallel_size)]
        sys.argv += ["--model", args.model] if args.model else []
        return vllm_activations.main()
    if args.interventions:
        import sys

        from benchmarks import serving

        # The same table as on the CPU, at GPU sizes: compiled means CUDA graphs there.
        sys.argv = [
            sys.argv[0],
            "--dtype",
            dtype,
            "--requests",
            str(args.prompts),
            "--max-tokens",
            str(args.max_tokens),
        ]
        sys.argv += ["--kv-cache-gib", "20", "--concurrency", "1,16,64"]
        sys.argv += ["--model", args.model] if args.model else []
        sys.argv += ["--results", args.results] if args.results else []
        return serving.main()
    path = (
        args.model
        or prepare_model(
            "smollm2-135m-instruct", "bundled:smollm2-135m-instruct", ROOT / "benchmarks/.cache/models"
        ).path
    )
    machine = torch.cuda.get_device_name() if gpu else f"CPU, {os.cpu_count()} cores"
    print(
        f"machine: {machine}; model {path}, {dtype}; {args.prompts} prompts, <= {args.max_tokens} new tokens, greedy",
        flush=True,
    )
    greedy = Sampling(temperature=0.0, top_p=1.0, max_tokens=args.max_tokens)
    rows = []

    model, tokenizer = load_model(path, dtype, device=args.device)
    template = ChatTemplate(tokenizer)
    convs = conversations(args.prompts, template.system_role)
    backend = TransformersEngine(model, template, batch_size=args.batch_size, progress=False)
    backend.generate(convs[: min(4, len(convs))], Sampling(0.0, 1.0, 4))  # warm-up (kernels, allocator)
    best, results = best_of({"transformers": lambda b=backend: b.generate(convs, greedy)}, 1)
    hf, seconds = results["transformers"], best["transformers"]
    rows.append(("transformers (TransformersEngine)", sum(g.n_tokens for g in hf), seconds, f"batch {args.batch_size}"))
    del model, backend
    gc.collect()
    if gpu:
        torch.cuda.empty_cache()

    engine = {
        "tensor_parallel_size": args.tensor_parallel_size,
        "gpu_memory_utilization": args.gpu_memory_utilization or (0.85 if gpu else 0.1),
        "max_model_len": 4096,
        "enforce_eager": not gpu,
    }
    start = time.perf_counter()
    llm = vllm_engine(vllm_engine_args(path, engine, "benchmark", dtype), "benchmark")
    startup = time.perf_counter() - start
    vllm = VLLMEngine({}, template, llm=llm, progress=False)
    vllm.generate(convs[: min(4, len(convs))], Sampling(0.0, 1.0, 4))
    best, results = best_of({"vllm": lambda: vllm.generate(convs, greedy)}, 1)
    out, seconds = results["vllm"], best["vllm"]
    same = sum(a.text == b.text for a, b in zip(hf, out, strict=True))
    rows.append(
        (
            "vLLM (VLLMEngine, LLM.chat)",
            sum(g.n_tokens for g in out),
            seconds,
            f"engine start {startup:.0f} s; {same}/{len(convs)} replies identical to transformers'",
        )
    )

    base = rows[0][1] / rows[0][2]
    print("\n| backend | new tokens | seconds | tok/s | vs transformers | note |\n|---|---:|---:|---:|---:|---|")
    for name, tokens, secs, note in rows:
        print(f"| {name} | {tokens} | {secs:.1f} | {tokens / secs:.0f} | {tokens / secs / base:.2f}x | {note} |")


if __name__ == "__main__":
    main()
