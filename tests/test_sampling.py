"""Our top-p filter against transformers' own `TopPLogitsWarper`, and batched generation against
generating one conversation at a time, on the bundled model."""

from __future__ import annotations

import math

import pytest
import torch
from transformers.generation.logits_process import TopPLogitsWarper

from assistant_axis.engines import Sampling
from assistant_axis.engines.transformers import TopP, TransformersEngine
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


def _mass_above(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The rule's reference, by a full sort in float64: each token's probability mass ranked above it."""
    probs = (scores.double() - scores.double().logsumexp(dim=-1, keepdim=True)).exp()
    ranked, order = probs.sort(dim=-1, descending=True)
    above = torch.empty_like(probs).scatter(1, order, ranked.cumsum(dim=-1) - ranked)
    return above, probs


# transformers sums float32 probabilities over the whole vocabulary in its own order; how it rounds at the
# boundary depends on the CPU's kernels, so tokens this close to it are decided by the rule, not compared.
BOUNDARY = 1e-4


@pytest.mark.parametrize("top_p", [0.1, 0.5, 0.9, 0.99])
def test_top_p_keeps_the_tokens_of_the_rule_and_of_transformers(bundled, top_p):
    """Ours keeps exactly the tokens whose mass ranked above them (float64) is below top_p, the best always;
    transformers' `TopPLogitsWarper` keeps the same tokens except, at most, those within BOUNDARY of it."""
    real = _logits(bundled)
    generator = torch.Generator().manual_seed(0)
    flat = torch.randn(3, real.shape[-1], generator=generator) * 0.1  # a wide nucleus: more than k candidates
    for scores in (real, real / 0.7, flat):
        ours = TopP(top_p, k=64)(None, scores.clone())
        above, _ = _mass_above(scores)
        rule = (above < top_p) | (above == 0)
        assert torch.equal(torch.isfinite(ours), rule), int((torch.isfinite(ours) != rule).sum())
        kept = torch.isfinite(ours)
        assert torch.equal(ours[kept], scores[kept])  # kept logits unchanged
        theirs = torch.isfinite(TopPLogitsWarper(top_p)(None, scores.clone()))
        clear = (above - top_p).abs() > BOUNDARY
        assert torch.equal(kept[clear], theirs[clear]), int((kept[clear] != theirs[clear]).sum())
        # It leaves out a few tokens of a row (at most 0.1% of the vocabulary), and compares kept ones in each.
        assert int((~clear).sum(dim=-1).max()) <= scores.shape[-1] // 1000
        assert bool((kept & clear).any(dim=-1).all())
    assert int(torch.isfinite(TopP(top_p, k=64)(None, flat.clone())).sum(dim=-1).max()) > 64 or top_p < 0.5


def test_a_token_whose_mass_above_equals_top_p_is_dropped(bundled):
    """The tie rule, built exactly: top_p set to the float64 mass above the third most likely token."""
    scores = _logits(bundled)[:1]
    above, _ = _mass_above(scores)
    third = int(above[0].argsort()[2])
    tie = float(above[0, third])
    assert 0 < tie < 1
    for top_p, kept in ((tie, False), (math.nextafter(tie, 1.0), True), (math.nextafter(tie, 0.0), False)):
        assert bool(torch.isfinite(TopP(top_p, k=64)(None, scores.clone()))[0, third]) is kept, top_p


def test_batched_generation_equals_one_at_a_time(bundled):
    model, tokenizer = bundled
    template = ChatTemplate(tokenizer)
    conversations = [template.conversation("You are a pirate.", q) for q in QUESTIONS]
    greedy = Sampling(temperature=0.0, top_p=1.0, max_tokens=12, seed=0)
    batched = TransformersEngine(model, template, batch_size=4, progress=False).generate(conversations, greedy)
    single = TransformersEngine(model, template, batch_size=1, progress=False)
    alone = [single.generate([c], greedy)[0] for c in conversations]
    assert [r.text for r in batched] == [r.text for r in alone]
    assert [r.n_tokens for r in batched] == [r.n_tokens for r in alone]
    assert len({r.text for r in batched}) == len(QUESTIONS)  # four different replies, not one repeated
