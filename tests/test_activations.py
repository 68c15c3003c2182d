"""Mean activations: exact against a one-at-a-time reference, and cut off after the last layer."""

from __future__ import annotations

import pytest
import torch

from assistant_axis.activations import mean_activations, resolve_layers, token_budget_batches
from assistant_axis.errors import ArgumentError, InputError, renamed
from assistant_axis.judge import make_judge
from assistant_axis.models import find_blocks, load_model
from assistant_axis.templates import ChatTemplate

CASES = [
    ("You are a lighthouse keeper.", "What keeps you going?", "The lamp, and the gulls that wait for it each dusk."),
    ("", "Describe yourself.", "I am an AI assistant made to help you."),
    ("You are a storm.", "What do you want?", "To break the shore and then be calm again, over and over, forever."),
    ("You are a tutor.", "How do I learn faster?", "Practice a little every day."),
]


@pytest.fixture(scope="module")
def batch(bundled):
    _, tokenizer = bundled
    seqs, spans = [], []
    for system, question, reply in CASES:
        template = ChatTemplate(tokenizer)
        ids, start, end = template.reply_span(template.conversation(system, question), reply)
        seqs.append(ids)
        spans.append((start, end))
    return seqs, spans


def test_batched_means_equal_one_at_a_time_reference(bundled, batch):
    model, _ = bundled
    seqs, spans = batch
    layers = [0, 7, 15, 28]
    # Small token budget: several batches with right padding of different widths.
    got = mean_activations(model, seqs, spans, layers, batch_tokens=2 * max(map(len, seqs)), progress=False)
    assert got.shape == (len(CASES), len(layers), 576)
    for i, (ids, (start, end)) in enumerate(zip(seqs, spans, strict=True)):
        with torch.inference_mode():
            hidden = model(torch.tensor([ids]), output_hidden_states=True).hidden_states
        for j, layer in enumerate(layers):
            ref = hidden[layer + 1][0, start:end].mean(0)  # hidden_states[0] is the embedding output
            # Padding changes how the matmuls block their float32 sums: the last bits differ (up to 3e-5
            # measured on an AVX-512 machine, where 1e-5 failed), whatever the code does.
            torch.testing.assert_close(got[i, j], ref, rtol=1e-4, atol=1e-4)


def test_last_layer_is_the_raw_residual_not_the_final_norm(bundled, batch):
    model, _ = bundled
    seqs, spans = batch
    blocks = find_blocks(model)
    captured = {}

    def keep(_module, _args, out):
        captured["h"] = out[0] if isinstance(out, tuple) else out

    handle = blocks[-1].register_forward_hook(keep)
    try:
        with torch.inference_mode():
            model(torch.tensor([seqs[0]]))
    finally:
        handle.remove()
    start, end = spans[0]
    got = mean_activations(model, seqs[:1], spans[:1], [len(blocks) - 1], progress=False)
    torch.testing.assert_close(got[0, 0], captured["h"][0, start:end].mean(0), rtol=1e-5, atol=1e-5)


def test_forward_stops_after_the_last_requested_layer(bundled, batch):
    model, _ = bundled
    seqs, spans = batch
    blocks = find_blocks(model)
    calls = {"later_block": 0, "lm_head": 0}
    hooks_before = [dict(b._forward_hooks) for b in blocks]
    hooks = [
        blocks[11].register_forward_hook(lambda *a: calls.__setitem__("later_block", calls["later_block"] + 1)),
        model.lm_head.register_forward_hook(lambda *a: calls.__setitem__("lm_head", calls["lm_head"] + 1)),
    ]
    try:
        early = mean_activations(model, seqs, spans, [3, 10], progress=False)
    finally:
        for h in hooks:
            h.remove()
    assert calls == {"later_block": 0, "lm_head": 0}
    full = mean_activations(model, seqs, spans, list(range(30)), progress=False)
    assert torch.equal(early, full[:, [3, 10]])
    # No hook of ours is left behind on the model.
    assert [dict(b._forward_hooks) for b in blocks] == hooks_before


def test_empty_span_gives_nan_row(bundled, batch):
    model, tokenizer = bundled
    seqs, spans = batch
    template = ChatTemplate(tokenizer)
    ids, start, end = template.reply_span(template.conversation("", "Hi"), "")
    got = mean_activations(model, [seqs[0], ids], [spans[0], (start, end)], [5], progress=False)
    assert torch.isfinite(got[0]).all() and torch.isnan(got[1]).all()


def test_layers_are_checked_against_the_model():
    assert resolve_layers("all", 4) == [0, 1, 2, 3]
    assert resolve_layers([-1, 0], 30) == [0, 29]
    # The library names its own argument; the workflow and the CLI name their key or flag instead.
    with pytest.raises(InputError, match="^resolve_layers: layers: layer 30 is outside the model's 30 layers"):
        resolve_layers([30], 30)
    with pytest.raises(InputError, match="^config: activations.layers: layer 30 is outside") as caught:
        with renamed("config", {"resolve_layers.layers": "activations.layers"}):
            resolve_layers([30], 30)
    assert isinstance(caught.value.__cause__, ArgumentError)
    with pytest.raises(InputError, match="^command line: --dtype: unknown dtype 'fp8'"):
        with renamed("command line", {"load_model.dtype": "--dtype", "resolve_layers.layers": "--layers"}):
            load_model("bundled:smollm2-135m-instruct", "fp8")
    # A settings argument keeps its key; an argument the caller did not name stays the library's.
    with pytest.raises(InputError, match="^config: judge.transformers.model: the transformers judge needs a model"):
        with renamed("config", {"make_judge.settings": "judge.transformers"}):
            make_judge("transformers", {})
    with pytest.raises(InputError, match="^make_judge: backend: unknown judge backend 'gpt4'"):
        with renamed("config", {"make_judge.settings": "judge.transformers"}):
            make_judge("gpt4", {})


def test_token_budget_batches_sort_and_bound():
    lengths = [5, 50, 20, 21, 49]
    batches = token_budget_batches(lengths, 100)
    assert sorted(i for b in batches for i in b) == list(range(5))
    for b in batches:
        assert len(b) * max(lengths[i] for i in b) <= 100 or len(b) == 1
    assert batches[0][0] == 1  # longest first
