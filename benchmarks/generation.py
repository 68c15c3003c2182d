"""Generation: our batched `TransformersEngine` and vLLM (its CPU build here) against one `generate` call
per prompt, greedy, on the same prompts, with the replies compared."""

from __future__ import annotations

import time

import torch

from assistant_axis.engines import Sampling
from assistant_axis.engines.transformers import TransformersEngine
from assistant_axis.models import load_tokenizer
from assistant_axis.templates import ChatTemplate
from benchmarks.harness import Table, best_of, conversations, model_dir


def run(model, tokenizer, quick: bool, repeat: int, table: Table) -> None:
    n_prompts, max_tokens, batch = (32, 32, 32) if quick else (64, 64, 32)
    convs = conversations(n_prompts)
    template = ChatTemplate(tokenizer)
    prompts = [template.ids(c, add_generation_prompt=True) for c in convs]
    greedy = Sampling(temperature=0.0, top_p=1.0, max_tokens=max_tokens)
    backend = TransformersEngine(model, template, batch_size=batch, progress=False)
    eos = tokenizer.eos_token_id

    def per_prompt(rows):
        """The baseline: one `generate` call per prompt; new tokens up to, not counting, end of turn."""
        texts = []
        with torch.inference_mode():
            for i in rows:
                ids = torch.tensor([prompts[i]])
                new = model.generate(
                    ids, max_new_tokens=max_tokens, do_sample=False, pad_token_id=eos, top_p=None, top_k=None
                )[0, ids.shape[1] :].tolist()
                texts.append(new[: new.index(eos)] if eos in new else new)
        return texts

    def ours(rows):
        return backend.generate([convs[i] for i in rows], greedy)

    # Chunks of one batch each, longest prompts first (the order our backend uses), timed best-of-N.
    order = sorted(range(n_prompts), key=lambda i: -len(prompts[i]))
    seconds = {"baseline": 0.0, "ours": 0.0}
    n_base = n_ours = same = 0
    reference: dict[int, str] = {}  # the baseline's replies, to compare vLLM's with
    for k in range(0, n_prompts, batch):
        rows = order[k : k + batch]
        best, results = best_of({"baseline": lambda r=rows: per_prompt(r), "ours": lambda r=rows: ours(r)}, repeat)
        for name in best:
            seconds[name] += best[name]
        n_base += sum(map(len, results["baseline"]))
        n_ours += sum(g.n_tokens for g in results["ours"])
        texts = [tokenizer.decode(t, skip_special_tokens=True).strip() for t in results["baseline"]]
        reference.update(zip(rows, texts, strict=True))
        same += sum(t == g.text for t, g in zip(texts, results["ours"], strict=True))
    base, fast = n_base / seconds["baseline"], n_ours / seconds["ours"]
    table.report(
        "generation per-prompt baseline",
        f"{base:.0f} tok/s",
        f"{n_prompts} prompts, <= {max_tokens} tokens, greedy, fp32",
    )
    table.report(
        "generation ours (TransformersEngine)",
        f"{fast:.0f} tok/s",
        f"{fast / base:.2f}x baseline (target 5x); batch {batch}; {same}/{n_prompts} replies identical",
    )
    vllm_generation(convs, [reference[i] for i in range(n_prompts)], greedy, base, fast, repeat, table)


def vllm_generation(convs, reference: list[str], greedy, base: float, ours: float, repeat: int, table: Table) -> None:
    """vLLM (its CPU build here) on the same prompts and max tokens, all of them in one `chat` call."""
    try:
        import vllm  # noqa: F401
    except ImportError as exc:
        table.report("generation vLLM", "not run", f"vllm cannot be imported ({exc}); make test installs it")
        return
    from assistant_axis.engines.vllm import VLLMEngine
    from assistant_axis.engines.vllm.engine import vllm_engine, vllm_engine_args

    engine = {"gpu_memory_utilization": 0.1, "max_model_len": 2048, "enforce_eager": True}
    path = model_dir()
    start = time.perf_counter()
    llm = vllm_engine(vllm_engine_args(path, engine, "benchmark", "float32"), "benchmark")
    startup = time.perf_counter() - start
    backend = VLLMEngine({}, ChatTemplate(load_tokenizer(path)), llm=llm, progress=False)
    best, results = best_of({"vllm": lambda: backend.generate(convs, greedy)}, repeat)
    tokens = sum(g.n_tokens for g in results["vllm"])
    rate = tokens / best["vllm"]
    same = sum(a == g.text for a, g in zip(reference, results["vllm"], strict=True))
    table.report(
        "generation vLLM (VLLMEngine, CPU build)",
        f"{rate:.0f} tok/s",
        f"{rate / base:.2f}x baseline, {rate / ours:.2f}x TransformersEngine; fp32, eager; engine start "
        f"{startup:.0f} s (not counted); {same}/{len(convs)} replies identical to the baseline",
    )
