"""Activations inside vLLM (its CPU build here, the bundled model, no mocks): the means of prefill-only
requests reduced in the engine's hooks, and the means recorded while replies are generated, against the
transformers path.

Tolerance: the engines compute the same float32 model with different kernels (vLLM's fused norms and
attention). Measured here the means differ by at most ~1.5e-6 of the mean's norm, component-wise; the
tests allow 1e-5. Recording during generation feeds the reply one token per decode step instead of in
one prefill: the same bound holds (see the capture test).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

from assistant_axis.activations import mean_activations
from assistant_axis.engines import Sampling
from assistant_axis.engines.vllm import VLLMEngine, vllm_mean_activations
from assistant_axis.models import find_blocks
from assistant_axis.stages.common import rendered_replies
from assistant_axis.templates import ChatTemplate

TOLERANCE = 1e-5  # of the mean's norm, per component
MODEL = "smollm2-135m-instruct"
# Questions a short reply answers, so that greedy replies end within the larger max_tokens below.
SHORT = [
    "Reply with one word: what colour is the sky on a clear day?",
    "What is 2 + 2? Answer with the number only.",
    "Say hello.",
    "Name one planet. One word only.",
    "Is water wet? Answer yes or no.",
    "What is the capital of France? One word.",
]


def assert_means_close(got: torch.Tensor, want: torch.Tensor, tolerance: float = TOLERANCE) -> None:
    assert got.shape == want.shape
    assert torch.isnan(got).equal(torch.isnan(want))  # empty spans on both sides
    real = ~torch.isnan(want[:, 0, 0])
    error = (got[real] - want[real]).abs().amax(dim=-1) / want[real].norm(dim=-1)
    assert float(error.max()) <= tolerance, f"largest difference {float(error.max()):.2e} of the norm"


@pytest.fixture(scope="module")
def replies(tiny_run, bundled):
    """The tiny run's replies (every role) plus two long ones and an empty one, rendered as the stage renders
    them: mixed lengths in one batch."""
    _, tokenizer = bundled
    paths = sorted(str(p) for p in (tiny_run / f"results/{MODEL}/responses").glob("*.parquet"))
    frames = [pd.read_parquet(p) for p in paths]
    extra = frames[0].head(3).copy()
    extra["response"] = [" ".join(["The tide comes in and the tide goes out."] * 40), "Yes.", "..."]
    extra.loc[extra.index[2], "response"] = ""
    template = ChatTemplate(tokenizer, {}, MODEL)
    sequences, spans = rendered_replies(template, [*paths, "extra"], [*frames, extra])
    assert spans[-1][0] == spans[-1][1]  # the empty reply
    return sequences, spans


def _calls_of_block(llm, layer: int):
    """A forward hook counting the calls of block `layer` (an engine step each), and its handle."""
    calls = []

    def install(worker):
        block = find_blocks(worker.model_runner.get_model())[layer]
        return block.register_forward_hook(lambda *_: calls.append(1))

    (handle,) = llm.collective_rpc(install)
    return calls, handle


def test_vllm_means_equal_the_transformers_means_for_all_layers_and_a_subset(inprocess_llm, bundled, replies):
    model, _ = bundled
    sequences, spans = replies
    assert max(len(s) for s in sequences) > 4 * min(len(s) for s in sequences)
    everything = list(range(30))
    want = mean_activations(model, sequences, spans, everything, batch_tokens=1024, progress=False)
    got = vllm_mean_activations(inprocess_llm, sequences, spans, everything, chunk=8, progress=False)
    assert_means_close(got, want)

    # A subset stops the model after its last layer: block 15 never runs, and runs again afterwards.
    subset = [2, 9, 14]
    calls, handle = _calls_of_block(inprocess_llm, 15)
    try:
        part = vllm_mean_activations(inprocess_llm, sequences, spans, subset, progress=False)
        assert calls == []
        inprocess_llm.generate(["Hello"], use_tqdm=False)
        assert len(calls) > 0
    finally:
        handle.remove()
    assert_means_close(part, want[:, subset])


def test_captured_means_equal_a_separate_pass_but_for_a_cut_replys_last_token(inprocess_llm, bundled):
    """Greedy replies, some ending at their end of turn and some cut by max_tokens, recorded while generated:
    a reply that ended equals the separate pass over its whole span; a cut one, over all but its last token."""
    model, tokenizer = bundled
    template = ChatTemplate(tokenizer, {}, MODEL)
    layers = [0, 7, 15, 29]
    conversations = [[{"role": "user", "content": question}] for question in SHORT]
    backend = VLLMEngine({}, template, llm=inprocess_llm, progress=False, capture=(layers, torch.float32))
    try:
        generations, captured = [], []
        for max_tokens in (4, 60):
            generations += backend.generate(conversations, Sampling(0.0, 1.0, max_tokens, 0), [1] * 6)
            captured.append(backend.captured)
    finally:
        backend.close()
    captured = torch.cat(captured)
    finishes = [g.finish_reason for g in generations]
    assert "stop" in finishes and "length" in finishes
    sequences, whole, fed_back, compared = [], [], [], []
    for i, g in enumerate(generations):
        ids, start, end = template.reply_span(conversations[i % 6], g.text.strip())
        # Only replies whose text tokenizes back to the generated tokens (a stopped reply's tokens also
        # hold its end-of-turn token) can be compared token for token.
        if end - start != g.n_tokens - (g.finish_reason == "stop"):
            continue
        sequences.append(ids)
        whole.append((start, end))
        fed_back.append((start, end - (g.finish_reason == "length")))
        compared.append(i)
    assert len(compared) >= 10
    separate = mean_activations(model, sequences, fed_back, layers, progress=False)
    assert_means_close(captured[compared], separate)
    # What differs for a cut reply is its last token, and it shows: the whole span's mean is another one.
    cut = [k for k, i in enumerate(compared) if finishes[i] == "length"]
    assert cut
    over_whole = mean_activations(model, [sequences[k] for k in cut], [whole[k] for k in cut], layers, progress=False)
    error = (captured[[compared[k] for k in cut]] - over_whole).abs().amax(dim=-1) / over_whole.norm(dim=-1)
    assert float(error.min()) > 100 * TOLERANCE


@pytest.mark.slow
def test_tensor_parallel_workers_record_the_same_means(model_dir, bundled, replies, tmp_path):
    """Tensor parallel 3 (the bundled model's 9 heads split 3 ways; worker processes of their own, each
    recording, rank 0 answering): the same means as the transformers path."""
    import json
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    model, _ = bundled
    sequences, spans = replies
    layers = [0, 11, 22]
    source, output = tmp_path / "replies.json", tmp_path / "means.safetensors"
    source.write_text(json.dumps({"sequences": sequences, "spans": spans}))
    script = Path(__file__).parent / "vllm_tp_extraction.py"
    # The CPU build binds each worker to a NUMA node of its own unless told not to; this machine has one.
    env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(script), str(model_dir), "3", str(source), str(output), *map(str, layers)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    want = mean_activations(model, sequences, spans, layers, batch_tokens=1024, progress=False)
    assert_means_close(load_file(str(output))["means"], want)
