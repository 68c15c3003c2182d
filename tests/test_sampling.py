"""Our top-p filter against transformers' own `TopPLogitsWarper`, and batched generation against
generating one conversation at a time, on the bundled model."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import TopPLogitsWarper

from assistant_axis.backends import Sampling, TopP, TransformersBackend
from assistant_axis.templates import ChatTemplate

QUESTIONS = [
    "What is the capital of France?",
    "Write one line about the sea.",
    "Who are you?",
    "List three colours, nothing else, in a long and detailed way with reasons for each choice.",
]


def _logits(bundled) -> torch.Tensor:
    model, tokenizer = bundled
    template = ChatTemplate(tokenizer)
    rows = []
    with torch.inference_mode():
        for question in QUESTIONS:
            ids = torch.tensor([template.ids(template.conversation("", question), add_generation_prompt=True)])
            rows.append(model(input_ids=ids).logits[0, -1])
    return torch.stack(rows)


@pytest.mark.parametrize("top_p", [0.1, 0.5, 0.9, 0.99])
def test_top_p_keeps_exactly_the_tokens_transformers_keeps(bundled, top_p):
    real = _logits(bundled)
    generator = torch.Generator().manual_seed(0)
    flat = torch.randn(3, real.shape[-1], generator=generator) * 0.1  # a wide nucleus: more than k candidates
    for scores in (real, real / 0.7, flat):
        ours = TopP(top_p, k=64)(None, scores.clone())
        theirs = TopPLogitsWarper(top_p)(None, scores.clone())
        assert torch.equal(torch.isfinite(ours), torch.isfinite(theirs)), int(
            (torch.isfinite(ours) != torch.isfinite(theirs)).sum()
        )
        kept = torch.isfinite(ours)
        assert torch.equal(ours[kept], scores[kept])  # kept logits unchanged
    assert int(torch.isfinite(TopP(top_p, k=64)(None, flat.clone())).sum(dim=-1).max()) > 64 or top_p < 0.5


def test_batched_generation_equals_one_at_a_time(bundled):
    model, tokenizer = bundled
    template = ChatTemplate(tokenizer)
    conversations = [template.conversation("You are a pirate.", q) for q in QUESTIONS]
    greedy = Sampling(temperature=0.0, top_p=1.0, max_tokens=12, seed=0)
    batched = TransformersBackend(model, template, batch_size=4, progress=False).generate(conversations, greedy)
    single = TransformersBackend(model, template, batch_size=1, progress=False)
    alone = [single.generate([c], greedy)[0] for c in conversations]
    assert [r.text for r in batched] == [r.text for r in alone]
    assert [r.n_tokens for r in batched] == [r.n_tokens for r in alone]
    assert len({r.text for r in batched}) == len(QUESTIONS)  # four different replies, not one repeated
