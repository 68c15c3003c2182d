"""Extraction: our batched, hooked `mean_activations` against the naive loop (one conversation at a time,
every hidden state kept), and both against the hardware floor; bf16 beside fp32."""

from __future__ import annotations

import torch

from assistant_axis.activations import mean_activations
from assistant_axis.models import find_blocks, load_model
from assistant_axis.templates import ChatTemplate
from benchmarks.floor import Rates, flops_per_token
from benchmarks.harness import Table, best_of, require, responses_256


def naive_extraction(model, seqs, spans) -> torch.Tensor:
    """The baseline: one conversation at a time, the full model with its LM head, every hidden state kept,
    means taken afterwards. hidden_states[i + 1] is block i's output, except the last, which is after
    the final norm; [n, n_layers, hidden]."""
    out = []
    with torch.inference_mode():
        for ids, (start, end) in zip(seqs, spans, strict=True):
            hidden = model(torch.tensor([ids]), output_hidden_states=True).hidden_states[1:]
            out.append(torch.stack([h[0, start:end].mean(0) for h in hidden]))
    return torch.stack(out)


def time_split(fn) -> dict[str, float]:
    """Share of CPU time by kind of operator in one call of `fn` (torch.profiler, self time)."""
    from torch.profiler import profile

    with profile() as prof:
        fn()
    kinds = {"matmul": ("aten::mm", "aten::addmm", "aten::bmm"), "attention": ("attention",)}
    split = dict.fromkeys([*kinds, "other"], 0.0)
    for event in prof.key_averages():
        kind = next((k for k, names in kinds.items() if any(n in event.key for n in names)), "other")
        split[kind] += event.self_cpu_time_total
    total = sum(split.values())
    return {k: v / total for k, v in split.items()}


def run(model, tokenizer, path: str, quick: bool, repeat: int, budgets: list[int], rates: Rates, table: Table) -> None:
    data = responses_256(model, tokenizer)[: 64 if quick else 256]
    seqs, spans = [], []
    for conv, reply in data:
        ids, start, end = ChatTemplate(tokenizer).reply_span(conv, reply)
        seqs.append(ids)
        spans.append((start, end))
    # Longest first, in chunks of 32 responses: each chunk is timed best-of-N for every variant.
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    chunks = [order[k : k + 32] for k in range(0, len(order), 32)]
    tokens = sum(map(len, seqs))
    n_layers = len(find_blocks(model))
    layers = list(range(n_layers))
    budget = budgets[0]  # the quickstart config's

    def ours(m, rows, batch_tokens=budget):
        return mean_activations(
            m, [seqs[i] for i in rows], [spans[i] for i in rows], layers, batch_tokens=batch_tokens, progress=False
        )

    def naive(rows):
        return naive_extraction(model, [seqs[i] for i in rows], [spans[i] for i in rows])

    def agreement(got, ref, name):
        rel = ((got - ref).norm(dim=-1) / ref.norm(dim=-1)).max().item()
        table.report(
            f"extraction agreement, {name}", f"{rel:.1e}", "max rel. L2 error per (response, layer); need <= 1e-5"
        )
        require(rel <= 1e-5, f"{name}: max relative error {rel:.1e} > 1e-5 against the naive loop")

    # Agreement before timing, on the longest chunk. The last layer is left out: the baseline's
    # hidden_states[-1] is after the final norm (tests/test_activations.py checks it against a hook).
    ref = naive(chunks[0])[:, :-1]
    agreement(ours(model, chunks[0])[:, :-1], ref, "fp32")
    variants = {"naive": naive}
    for n in budgets:
        variants[f"ours {n}"] = lambda rows, n=n: ours(model, rows, n)
    seconds = dict.fromkeys(variants, 0.0)
    for chunk in chunks:
        best, _ = best_of({name: (lambda f=f, c=chunk: f(c)) for name, f in variants.items()}, repeat)
        for name in best:
            seconds[name] += best[name]
        rates.measure(model, 3)  # the floor gets the same quiet spells as the runs
    matmul, attention, context = flops_per_token(model, n_layers, seqs)
    per_token = matmul + attention
    floor = rates.floor("fp32") / per_token
    square_floor, shape_floor = rates.best["fp32 2048^3"] / per_token, rates.best["fp32 model shapes"] / per_token
    rate = {name: tokens / s for name, s in seconds.items()}
    table.report(
        "extraction FLOPs per token",
        f"{per_token / 1e6:.1f} MFLOP",
        f"{matmul / 1e6:.1f} matmul + {attention / 1e6:.1f} attention (mean context {context:.0f}); no LM head",
    )
    table.report(
        "extraction fp32 floor",
        f"{floor:.0f} tok/s",
        f"the faster of: 2048^3 rate {square_floor:.0f}, model-shape rate {shape_floor:.0f} tok/s",
    )
    table.report(
        "extraction naive baseline, fp32",
        f"{rate['naive']:.0f} tok/s",
        f"{len(seqs)} responses, {tokens} tokens; {rate['naive'] / floor:.0%} of the floor",
    )
    for n in budgets:
        r = rate[f"ours {n}"]
        table.report(
            f"extraction ours, fp32, batch_tokens {n}",
            f"{r:.0f} tok/s",
            f"{r / rate['naive']:.2f}x naive (target 3x), {r / floor:.1%} of the floor (target 85%)"
            + ("; the config's budget" if n == budget else ""),
        )
    table.report(
        "extraction naive / floor ceiling",
        f"{floor / rate['naive']:.2f}x",
        "the most any extraction could beat this baseline by in fp32",
    )
    split = time_split(lambda: ours(model, chunks[len(chunks) // 2]))
    table.report(
        "extraction ours, CPU time split",
        f"{split['matmul']:.0%} matmul",
        f"{split['attention']:.0%} attention kernel, {split['other']:.0%} elementwise and other "
        "(torch.profiler, one chunk)",
    )

    # bfloat16: on a CPU without bf16 units it is far slower than float32, so only a taste is timed.
    bf16, _ = load_model(path, "bfloat16", device="cpu")
    has_units = rates.floor("bf16") > rates.floor("fp32")
    rows = order if has_units else order[-2:]
    best, results = best_of({"bf16": lambda: ours(bf16, rows)}, repeat if has_units else 1)
    bf16_tokens = sum(len(seqs[i]) for i in rows)
    bf16_floor = rates.floor("bf16") / per_token
    ref = ours(model, rows)
    diff = ((results["bf16"] - ref).norm() / ref.norm()).item()
    table.report(
        "extraction ours, bf16",
        f"{bf16_tokens / best['bf16']:.0f} tok/s",
        f"{len(rows)} responses; {bf16_tokens / best['bf16'] / bf16_floor:.0%} of the bf16 floor "
        f"({bf16_floor:.0f} tok/s, target 60%); rel. L2 vs fp32 {diff:.1e}",
    )
