"""Activations in vLLM: transformers extraction vs vLLM extraction vs capture during generation, on the
same replies, in one process.

The replies are generated first (greedy, bank conversations) by vLLM without capture and then with it:
the ratio of those two times is capture's cost. The same replies (rendered as the activations stage
renders them) are then read by `mean_activations` (transformers, cut after the last layer) and by
`vllm_mean_activations` (prefill-only requests in the same engine). Prints tokens/s, ratios, agreement
(max component difference / norm of the mean) and model FLOPs utilisation (matmul + attention FLOPs of
the blocks read, as benchmarks/floor.py counts them, over the peak: measured fp32 matmul rate on a CPU,
`--peak-tflops` on a GPU).

    python -m benchmarks.vllm_activations                                    # bundled model, CPU
    python -m benchmarks.vllm_activations --model /models/Qwen3-32B --device cuda --dtype bfloat16 \
        --tensor-parallel-size 2 --prompts 512 --max-tokens 512              # a GPU node
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TQDM_DISABLE", "1")  # progress bars would garble the table; read when tqdm loads

import torch  # noqa: E402

from assistant_axis.activations import mean_activations
from assistant_axis.engines import Sampling  # noqa: E402
from assistant_axis.engines.vllm import (
    VLLMEngine,  # noqa: E402
    vllm_mean_activations,  # noqa: E402
)
from assistant_axis.engines.vllm.engine import recording_engine, vllm_engine_args  # noqa: E402
from assistant_axis.models import find_blocks, load_model  # noqa: E402
from assistant_axis.templates import ChatTemplate  # noqa: E402
from benchmarks.floor import flops_per_token, matmul_burst  # noqa: E402
from benchmarks.harness import conversations, load, machine_line, model_dir, require  # noqa: E402


def worst(got: torch.Tensor, want: torch.Tensor) -> float:
    return float(((got - want).abs().amax(dim=-1) / want.norm(dim=-1)).nan_to_num(0).max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a model directory (default: the bundled model)")
    parser.add_argument("--device", default="cpu", help="cuda on a GPU node")
    parser.add_argument("--dtype", default="float32", help="bfloat16 on a GPU")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--layers", default="all", help="all, or comma-separated block indices")
    parser.add_argument("--batch-tokens", type=int, default=1024, help="transformers extraction batch")
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--kv-cache-gib", type=float, default=0.5, help="on a CPU; a GPU uses 0.85 of its memory")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak per GPU (H100/H200: 989)")
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    gpu = args.device.startswith("cuda")
    path = args.model or model_dir()
    print(machine_line() if not gpu else torch.cuda.get_device_name(), "|", load(), flush=True)

    model, tokenizer = load_model(path, args.dtype, device=args.device)
    template = ChatTemplate(tokenizer)
    n_blocks = len(find_blocks(model))
    layers = list(range(n_blocks)) if args.layers == "all" else [int(x) for x in args.layers.split(",")]
    engine = {"tensor_parallel_size": args.tensor_parallel_size, "max_model_len": 4096, "enable_prefix_caching": False}
    engine.update(
        {"gpu_memory_utilization": 0.85} if gpu else {"kv_cache_memory_bytes": int(args.kv_cache_gib * 2**30)}
    )
    start = time.perf_counter()
    llm = recording_engine(vllm_engine_args(path, engine, "benchmark", args.dtype), "benchmark")
    print(f"  vLLM engine start {time.perf_counter() - start:.0f} s (not counted)", flush=True)
    convs = conversations(args.prompts, template.system_role)
    greedy = Sampling(temperature=0.0, top_p=1.0, max_tokens=args.max_tokens)
    plain = VLLMEngine({}, template, llm=llm, progress=False)

    def generate(capture: bool):
        if not capture:
            return plain.generate(convs, greedy, list(range(len(convs)))), None
        # One recorder per engine at a time: installed around each timed call (its install is counted).
        backend = VLLMEngine({}, template, llm=llm, progress=False, capture=(layers, torch.float32))
        try:
            return backend.generate(convs, greedy, list(range(len(convs)))), backend.captured
        finally:
            backend.close()

    plain.generate(convs[:2], Sampling(0.0, 1.0, 4))  # warm-up
    seconds = {"generation": float("inf"), "generation + capture": float("inf")}
    for _ in range(args.repeat):  # interleaved, best of N
        for name, capture in (("generation", False), ("generation + capture", True)):
            t = time.perf_counter()
            replies, captured = generate(capture)
            seconds[name] = min(seconds[name], time.perf_counter() - t)
            if capture:
                kept = captured
            else:
                reference_replies = replies
    require([r.text for r in replies] == [r.text for r in reference_replies], "capture changed the replies")
    new_tokens = sum(r.n_tokens for r in replies)

    sequences, spans, fed_back = [], [], []
    for conv, reply in zip(convs, replies, strict=True):
        ids, a, b = template.reply_span(conv, reply.text.strip())
        sequences.append(ids)
        spans.append((a, b))
        fed_back.append((a, b - (reply.finish_reason == "length")))
    read = sum(b - a for a, b in spans)
    prefill = sum(len(s) for s in sequences)  # an extraction pass reads the whole conversation
    variants = {
        "transformers extraction": lambda: mean_activations(
            model, sequences, spans, layers, batch_tokens=args.batch_tokens, progress=False
        ),
        "vLLM extraction": lambda: vllm_mean_activations(llm, sequences, spans, layers, progress=False),
    }
    means = {}
    for name in variants:
        seconds[name] = float("inf")
    for _ in range(args.repeat):
        for name, fn in variants.items():
            t = time.perf_counter()
            means[name] = fn()
            seconds[name] = min(seconds[name], time.perf_counter() - t)
    agreement = worst(means["vLLM extraction"], means["transformers extraction"])
    separate = mean_activations(model, sequences, fed_back, layers, batch_tokens=args.batch_tokens, progress=False)
    same_tokens = [
        i for i, r in enumerate(replies) if spans[i][1] - spans[i][0] == r.n_tokens - (r.finish_reason == "stop")
    ]
    capture_agreement = worst(kept[same_tokens], separate[same_tokens])
    cut_effect = worst(means["transformers extraction"][same_tokens], separate[same_tokens])

    matmul, attention, _ = flops_per_token(model, max(layers) + 1, sequences)
    flops = matmul + attention
    peak = args.peak_tflops * 1e12 * args.tensor_parallel_size if gpu else matmul_burst(torch.float32, 2048, 3)
    print(
        f"\n{len(convs)} replies, {new_tokens} generated tokens, {prefill} conversation tokens ({read} reply tokens) "
        f"read at {len(layers)} of {n_blocks} layers; {args.dtype}, tensor parallel {args.tensor_parallel_size}; "
        f"peak {peak / 1e12:.3g} TFLOP/s\n"
    )
    print("| variant | seconds | tokens/s | vs baseline | MFU | note |\n|---|---:|---:|---:|---:|---|")
    base = seconds["generation"]
    print(f"| generation (vLLM) | {base:.1f} | {new_tokens / base:.0f} gen | 1.00x | | baseline |")
    t = seconds["generation + capture"]
    print(f"| generation + capture | {t:.1f} | {new_tokens / t:.0f} gen | {base / t:.2f}x | | replies identical |")
    base = seconds["transformers extraction"]
    for name in variants:
        t = seconds[name]
        note = "baseline" if name == "transformers extraction" else f"max difference {agreement:.1e} of the norm"
        mfu = prefill * flops / t / peak
        print(f"| {name} | {t:.2f} | {prefill / t:.0f} | {base / t:.2f}x | {mfu:.1%} | {note} |")
    print(
        f"\ncaptured vs a separate pass over the fed-back tokens ({len(same_tokens)} replies that retokenize "
        f"alike): max difference {capture_agreement:.1e} of the norm; a cut reply's last token changes its mean "
        f"by up to {cut_effect:.1e}. Capture added {seconds['generation + capture'] - seconds['generation']:.1f} s "
        f"to generation; a separate vLLM pass took {seconds['vLLM extraction']:.1f} s, transformers "
        f"{seconds['transformers extraction']:.1f} s."
    )


if __name__ == "__main__":
    main()
