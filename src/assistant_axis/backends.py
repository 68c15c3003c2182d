"""Generation backends: every backend turns conversations into replies behind one small interface.

`transformers` runs here (CPU or GPU); `vllm` and `openai` serve the paper-scale run and plug in
behind the same `generate()` call.

>>> backend = TransformersBackend(model, tokenizer, batch_size=32)
>>> replies = backend.generate([[{"role": "user", "content": "Hi"}]], Sampling(max_tokens=16))
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Protocol

import torch
from tqdm.auto import tqdm

from assistant_axis.chat import render_ids, supports_system_role
from assistant_axis.errors import InputError

__all__ = ["Sampling", "Generation", "GenerationBackend", "TransformersBackend", "TopP", "stable_seed", "BACKENDS"]

BACKENDS = ("transformers", "vllm", "openai")


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.7
    top_p: float = 0.9
    max_tokens: int = 512
    seed: int = 0


@dataclass(frozen=True)
class Generation:
    text: str
    n_tokens: int
    finish_reason: str  # "stop" (end of turn) or "length" (max_tokens reached)


class GenerationBackend(Protocol):
    def generate(self, conversations: list[list[dict]], sampling: Sampling) -> list[Generation]: ...


def stable_seed(*parts: object) -> int:
    """A seed derived from names (stable across processes, unlike `hash`)."""
    return zlib.crc32("\x1f".join(map(str, parts)).encode()) & 0x7FFFFFFF


def _eos_ids(model, tokenizer) -> set[int]:
    eos = model.generation_config.eos_token_id
    ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


class TopP:
    """Exact nucleus (top-p) filtering that sorts only the best candidates.

    Keeps the same tokens as transformers' `TopPLogitsWarper` (a token stays while the probability mass
    ranked above it is below `top_p`), but sorts `k` candidates instead of the whole vocabulary each
    step, widening `k` whenever the nucleus does not fit. On a CPU the full sort dominated sampling.
    """

    def __init__(self, top_p: float, k: int = 512):
        self.top_p, self.k = top_p, k

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        vocab = scores.shape[-1]
        log_total = scores.float().logsumexp(dim=-1, keepdim=True)
        k = min(self.k, vocab)
        while True:
            values, indices = scores.topk(k, dim=-1)
            probs = (values.float() - log_total).exp()
            above = probs.cumsum(dim=-1) - probs  # mass ranked strictly above each candidate
            if k == vocab or bool((above[:, -1] + probs[:, -1] >= self.top_p).all()):
                break
            k = min(4 * k, vocab)
        keep = above < self.top_p
        keep[:, 0] = True
        filtered = torch.full_like(scores, float("-inf"))
        return filtered.scatter(1, indices, values.masked_fill(~keep, float("-inf")))


class TransformersBackend:
    """In-process `generate`: prompts sorted by length, left-padded, in batches; stops at end of turn."""

    def __init__(self, model, tokenizer, batch_size: int = 32, progress: bool = True):
        if batch_size < 1:
            raise InputError("config", "generate.batch_size", f"must be >= 1, got {batch_size}")
        self.model, self.tokenizer, self.batch_size, self.progress = model, tokenizer, batch_size, progress
        self.system_role = supports_system_role(tokenizer)

    def generate(self, conversations: list[list[dict]], sampling: Sampling) -> list[Generation]:
        prompts = [render_ids(self.tokenizer, c, add_generation_prompt=True) for c in conversations]
        # Longest first: similar lengths share a batch, so little padding is computed.
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        eos = _eos_ids(self.model, self.tokenizer)
        pad = self.tokenizer.pad_token_id
        device = next(self.model.parameters()).device
        results: list[Generation | None] = [None] * len(prompts)
        starts = range(0, len(order), self.batch_size)
        for batch_no, start in enumerate(tqdm(starts, desc="generate", unit="batch", disable=not self.progress)):
            rows = order[start : start + self.batch_size]
            width = max(len(prompts[i]) for i in rows)
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for r, i in enumerate(rows):
                ids[r, width - len(prompts[i]) :] = torch.tensor(prompts[i])
                mask[r, width - len(prompts[i]) :] = 1
            torch.manual_seed(sampling.seed + batch_no)
            sample = sampling.temperature > 0
            with torch.inference_mode():
                out = self.model.generate(
                    input_ids=ids.to(device),
                    attention_mask=mask.to(device),
                    do_sample=sample,
                    temperature=sampling.temperature if sample else None,
                    top_p=None,
                    top_k=None,
                    logits_processor=[TopP(sampling.top_p)] if sample and sampling.top_p < 1 else None,
                    max_new_tokens=sampling.max_tokens,
                    pad_token_id=pad,
                    eos_token_id=sorted(eos),
                )
            for r, i in enumerate(rows):
                new = out[r, width:].tolist()
                stop = next((k for k, t in enumerate(new) if t in eos), None)
                n = len(new) if stop is None else stop
                text = self.tokenizer.decode(new[:n], skip_special_tokens=True).strip()
                results[i] = Generation(text, n, "length" if stop is None else "stop")
        return results  # type: ignore[return-value]


def make_backend(name: str, settings: dict, model_path: str, dtype: str = "float32") -> GenerationBackend:
    """Build the configured backend; heavy imports happen only for the chosen one."""
    if name == "transformers":
        from assistant_axis.models import load_model

        model, tokenizer = load_model(model_path, dtype)
        return TransformersBackend(model, tokenizer, batch_size=settings.get("batch_size", 32))
    if name in BACKENDS:
        raise InputError("config", "generate.backend", f"backend {name!r} is not available in this version yet")
    raise InputError("config", "generate.backend", f"unknown backend {name!r} (allowed: {', '.join(BACKENDS)})")
