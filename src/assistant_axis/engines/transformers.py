"""The transformers engine: the model in this process (CPU or GPU), one reply or one batch at a time.

Generation is one loop, `sample_batch`, whoever asks (the stages, chat, serve, project): prompts left-
padded into a batch and sampled from one generator. Interventions are `interventions.install`'s hooks
on the model's blocks; a reply's projection is measured by a second pass over the rendered reply under
the same hooks, so it is exactly what the activations stage and `project` compute for that reply.

>>> engine = open_engine("transformers", "results/models/smollm2-135m-instruct", {"batch_size": 32})
>>> replies = engine.generate([[{"role": "user", "content": "Hi"}]], Sampling(max_tokens=16))
>>> session = engine.session(units, [20, 24], {"late-p25": capping})
>>> session.complete([{"role": "user", "content": "Who are you?"}], setting="late-p25").projection
"""

from __future__ import annotations

import asyncio
import math
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
from tqdm.auto import tqdm

from assistant_axis.activations import mean_activations, token_projections
from assistant_axis.cap import CappingConfig
from assistant_axis.engines import (
    Chunk,
    Conversation,
    Generation,
    Reply,
    Sampling,
    TokenLogprob,
    check_context,
    generation,
)
from assistant_axis.errors import ArgumentError, InputError
from assistant_axis.interventions import install
from assistant_axis.models import hidden_size, load_model
from assistant_axis.project import projection_frame, turn_projections
from assistant_axis.steer import Steering
from assistant_axis.templates import ChatTemplate, split_reasoning

__all__ = ["TopP", "Sampled", "sample_batch", "generate_batched", "TransformersEngine", "TransformersSession"]


def _eos_ids(model, tokenizer) -> set[int]:
    eos = model.generation_config.eos_token_id
    ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


class TopP:
    """Exact nucleus (top-p) filtering that sorts only the best candidates.

    A token is kept when the probability mass ranked above it is below `top_p` (the most likely token is
    always kept), the rule of transformers' `TopPLogitsWarper`. The masses are taken in float64, so the
    rule, not a float32 rounding of a sum over the vocabulary, decides a token at the boundary: a token
    whose mass above equals `top_p` is dropped. Sorts `k` candidates instead of the whole vocabulary each
    step, widening `k` whenever the nucleus does not fit. On a CPU the full sort dominated sampling.
    """

    def __init__(self, top_p: float, k: int = 512):
        self.top_p, self.k = top_p, k

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        vocab = scores.shape[-1]
        log_total = scores.double().logsumexp(dim=-1, keepdim=True)
        k = min(self.k, vocab)
        while True:
            values, indices = scores.topk(k, dim=-1)
            probs = (values.double() - log_total).exp()
            above = probs.cumsum(dim=-1) - probs  # mass ranked strictly above each candidate
            if k == vocab or bool((above[:, -1] + probs[:, -1] >= self.top_p).all()):
                break
            k = min(4 * k, vocab)
        keep = above < self.top_p
        keep[:, 0] = True
        filtered = torch.full_like(scores, float("-inf"))
        return filtered.scatter(1, indices, values.masked_fill(~keep, float("-inf")))


@dataclass(frozen=True)
class Sampled:
    tokens: list[int]  # the generated ids, up to (not including) the end of turn
    finish_reason: str  # "stop" or "length"
    logits: list[torch.Tensor] | None  # per generated token, the model's raw logits (before temperature, top-p)


class _StopWhen:
    """A stopping criterion that ends generation (every row) once `stop()` says so, between two tokens."""

    def __init__(self, stop):
        self.stop = stop

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), bool(self.stop()), dtype=torch.bool, device=input_ids.device)


class _EachToken:
    """A `generate` streamer handing each new token of a one-row batch to `on_token` (the prompt is skipped)."""

    def __init__(self, on_token):
        self.on_token, self.prompt_seen = on_token, False

    def put(self, value) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        for token in value.flatten().tolist():
            self.on_token(int(token))

    def end(self) -> None:
        pass


def sample_batch(
    model,
    tokenizer,
    prompts: list[list[int]],
    sampling: Sampling,
    seed: int,
    want_logits: bool = False,
    stop=None,
    on_token=None,
) -> list[Sampled]:
    """In-process generation, the one loop every in-process caller uses (the generate and evaluate stages
    through `TransformersBackend`, chat, serve, project): `prompts` (token ids) left-padded into one batch,
    sampled from one generator seeded with `seed`, each stopped at its model's end of turn.

    `stop()`, checked after every token, cuts the batch short (a reply cut so ends with "length");
    `on_token(id)` receives each new token as it is sampled (one prompt only: a server's stream)."""
    # transformers loads only with a model (light paths import this module)
    from transformers import StoppingCriteriaList

    if on_token is not None and len(prompts) != 1:
        raise ArgumentError("sample_batch", "on_token", "streams one prompt at a time")
    eos = _eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for r, prompt in enumerate(prompts):
        ids[r, width - len(prompt) :] = torch.tensor(prompt)
        mask[r, width - len(prompt) :] = 1
    torch.manual_seed(seed)
    sample = sampling.temperature > 0
    with torch.inference_mode():
        out = model.generate(
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
            return_dict_in_generate=True,
            output_logits=want_logits,
            stopping_criteria=StoppingCriteriaList([_StopWhen(stop)]) if stop is not None else None,
            streamer=_EachToken(on_token) if on_token is not None else None,
        )
    results = []
    for r in range(len(prompts)):
        new = out.sequences[r, width:].tolist()
        stop = next((k for k, t in enumerate(new) if t in eos), None)
        n = len(new) if stop is None else stop
        logits = [step[r] for step in out.logits[:n]] if want_logits else None
        results.append(Sampled(new[:n], "length" if stop is None else "stop", logits))
    return results


def generate_batched(
    model, template: ChatTemplate, conversations: list[list[dict]], sampling: Sampling, batch_size: int, progress: bool
) -> list[tuple[Generation, list[int], int]]:
    """Each conversation's reply, its token ids and its prompt's length: prompts sorted by length, left-
    padded, in batches of `batch_size`, batch k sampled with seed `sampling.seed + k` (per-request seeds are
    not used: results are reproducible for the same prompts and batch size)."""
    tokenizer = template.tokenizer
    prompts = [template.ids(c, add_generation_prompt=True) for c in conversations]
    # Longest first: similar lengths share a batch, so little padding is computed.
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    results: list = [None] * len(prompts)
    starts = range(0, len(order), batch_size)
    for batch_no, start in enumerate(tqdm(starts, desc="generate", unit="batch", disable=not progress)):
        rows = order[start : start + batch_size]
        batch = sample_batch(model, tokenizer, [prompts[i] for i in rows], sampling, sampling.seed + batch_no)
        for i, out in zip(rows, batch, strict=True):
            text = tokenizer.decode(out.tokens, skip_special_tokens=True)
            results[i] = (generation(text, len(out.tokens), out.finish_reason), out.tokens, len(prompts[i]))
    return results


class TransformersEngine:
    """A transformers model and its chat template. `batch_size`: replies per generation batch;
    `batch_tokens`: padded tokens per activation batch; `blocks`: where the decoder blocks are (None: found)."""

    def __init__(
        self,
        model,
        template: ChatTemplate,
        batch_size: int = 32,
        batch_tokens: int = 8192,
        blocks: str | None = None,
        progress: bool = True,
    ):
        if batch_size < 1:
            raise ArgumentError("TransformersEngine", "batch_size", f"must be >= 1, got {batch_size}")
        self.model, self.template, self.tokenizer = model, template, template.tokenizer
        self.batch_size, self.batch_tokens, self.blocks, self.progress = batch_size, batch_tokens, blocks, progress

    @classmethod
    def open(
        cls,
        model_path: str,
        section: dict,
        key: str,
        dtype: str = "float32",
        trust_remote_code: bool = False,
        template_options: dict | None = None,
        model_name: str = "model",
        device: str | None = None,
        progress: bool = True,
        seed: int = 0,
    ) -> TransformersEngine:

        size = section.get("batch_size", 32)
        if size < 1:
            raise InputError("config", f"{key}.batch_size", f"must be >= 1, got {size}")
        model, tokenizer = load_model(model_path, dtype, device, trust_remote_code=trust_remote_code)
        template = ChatTemplate(tokenizer, template_options, model_name)
        return cls(model, template, size, section.get("batch_tokens", 8192), section.get("blocks"), progress)

    def generate(
        self, conversations: list[list[dict]], sampling: Sampling, seeds: list[int] | None = None
    ) -> list[Generation]:
        return [
            g
            for g, _, _ in generate_batched(
                self.model, self.template, conversations, sampling, self.batch_size, self.progress
            )
        ]

    context_length = None  # `mean_activations` takes sequences of any length (the model's positions permitting)

    def mean_activations(self, sequences, spans, layers) -> torch.Tensor:
        return mean_activations(
            self.model, sequences, spans, list(layers), batch_tokens=self.batch_tokens, blocks_path=self.blocks
        )

    def session(
        self,
        units: torch.Tensor,
        layers: Sequence[int],
        cappings: dict[str, CappingConfig],
        steering: Steering | None = None,
        sampling: Sampling | None = None,
        system: str | None = None,
    ) -> TransformersSession:
        return TransformersSession(
            self.model, self.template, units, layers, cappings, steering, sampling, system, batch_size=self.batch_size
        )

    def close(self) -> None:
        pass


class TransformersSession(Conversation):
    """The model with its interventions, serving settings: `"none"` (the steering alone, if any) and each
    capping config by name (after the steering). One generation at a time (a lock): a server's requests
    queue. Projections are taken by a second pass over the rendered reply under the same hooks."""

    def __init__(
        self,
        model,
        template: ChatTemplate,
        units: torch.Tensor,
        layers: Sequence[int],
        cappings: dict[str, CappingConfig],
        steering: Steering | None = None,
        sampling: Sampling | None = None,
        system: str | None = None,
        default_setting: str | None = None,
        batch_size: int = 32,
    ):
        self.model, self.template, self.tokenizer = model, template, template.tokenizer
        if units.shape[-1] != hidden_size(model):
            raise InputError(
                "axis", "hidden_size", f"axis has hidden size {units.shape[-1]}, the model {hidden_size(model)}"
            )
        self.units, self.layers = units, list(layers)
        self.cappings, self.steering = dict(cappings), steering
        self.sampling = sampling or Sampling(temperature=0.7, top_p=0.9, max_tokens=256)
        before = [steering] if steering else []
        self.interventions = {"none": before, **{name: [*before, c] for name, c in self.cappings.items()}}
        self.settings = list(self.interventions)
        self.default_setting = default_setting or (next(iter(self.cappings)) if self.cappings else "none")
        self.batch_size, self.lock = batch_size, threading.Lock()
        for setting in self.settings:
            with self.hooks(setting):  # install() checks sizes and layers on entry: fail now, not mid-chat
                pass
        self.system, self.messages = system, []
        self.reset()

    @property
    def capping(self) -> CappingConfig | None:  # what `chat` describes: the default setting's cap
        return self.cappings.get(self.default_setting)

    def tau(self, setting: str | None = None) -> list[float | None] | None:
        capping = self.cappings.get(setting or self.default_setting)
        return None if capping is None else capping.floors(self.layers)

    @property
    def context_length(self) -> int | None:
        """The most tokens (prompt + reply) the model's positions cover, when its config says."""
        return getattr(getattr(self.model, "config", None), "max_position_embeddings", None)

    @contextmanager
    def hooks(self, setting: str | None = None) -> Iterator[None]:
        """The setting's interventions (None: the default setting) on the model's blocks while active."""
        setting = setting or self.default_setting
        if setting not in self.interventions:
            raise InputError("request", "capping", f"unknown setting {setting!r} (known: {', '.join(self.settings)})")
        with install(self.model, *self.interventions[setting]):
            yield

    # ------------------------------------------------------------------ one reply

    def complete(
        self,
        messages: Sequence[dict],
        sampling: Sampling | None = None,
        top_logprobs: int | None = None,
        setting: str | None = None,
        stop=None,
        on_token=None,
    ) -> Reply:
        """The next assistant turn of `messages`; `top_logprobs` (0-20) asks for per-token logprobs;
        `stop()` and `on_token(id)` as in `sample_batch` (a server's time limit, a client gone, a stream)."""
        sampling = sampling or self.sampling
        setting = setting or self.default_setting
        shown = self.template.fit(list(messages))
        prompt = self.template.ids(shown, add_generation_prompt=True)
        check_context(len(prompt), sampling.max_tokens, self.context_length)
        with self.hooks(setting):
            (out,) = sample_batch(
                self.model, self.tokenizer, [prompt], sampling, sampling.seed, top_logprobs is not None, stop, on_token
            )
            new = out.tokens
            reasoning, text = split_reasoning(self.tokenizer.decode(new, skip_special_tokens=True))
            values = self._reply_projection(shown, text, reasoning)
        logprobs = (
            None
            if top_logprobs is None
            else [self._logprob(token, step, top_logprobs) for token, step in zip(new, out.logits, strict=True)]
        )
        return Reply(
            text, out.finish_reason, len(prompt), new, logprobs, list(self.layers), values, self.tau(setting),
            reasoning, setting=setting,
        )  # fmt: skip

    # ------------------------------------------------------------------ many replies (evaluate, drift)

    def answer(
        self, requests: dict[str, list[list[dict]]], sampling: Sampling, measure: bool = True
    ) -> dict[str, list[Reply]]:
        """Each setting's conversations (`requests`: setting -> conversations), their next turns generated in
        batches (`generate_batched`), one setting after another; with `measure`, each reply's projections
        and the share of (token, capped layer) pairs its setting's cap fired on."""
        return {
            setting: self._answer(conversations, sampling, setting, measure)
            for setting, conversations in requests.items()
        }

    def _answer(self, conversations: list[list[dict]], sampling: Sampling, setting: str, measure: bool) -> list[Reply]:
        with self.hooks(setting):
            out = generate_batched(self.model, self.template, conversations, sampling, self.batch_size, False)
            texts = [(g.text, g.reasoning) for g, _, _ in out]
            values = self._projections(conversations, texts) if measure else [[None] * len(self.layers)] * len(out)
            capping = self.cappings.get(setting)
            fired = self._fired(conversations, texts, capping) if measure and capping else [None] * len(out)
        return [
            Reply(
                g.text,
                g.finish_reason,
                n,
                ids,
                None,
                list(self.layers),
                v,
                self.tau(setting),
                g.reasoning,
                setting=setting,
                fired_share=f,
            )  # fmt: skip
            for (g, ids, n), v, f in zip(out, values, fired, strict=True)
        ]

    def _projections(self, conversations, texts) -> list[list[float | None]]:
        """Per reply, its tokens' mean projection per layer under the active hooks (None: an empty reply)."""
        spans = [self.template.reply_span(c, t, r) for c, (t, r) in zip(conversations, texts, strict=True)]
        acts = mean_activations(self.model, [s[0] for s in spans], [s[1:] for s in spans], self.layers, progress=False)
        projections = torch.einsum("nlh,lh->nl", acts, self.units)
        return [[float(v) if math.isfinite(v) else None for v in row.tolist()] for row in projections]

    def _reply_projection(self, shown: list[dict], text: str, reasoning: str = "") -> list[float | None]:
        """Mean projection of one reply's tokens per layer: the last row of `project.turn_activations`."""
        ids, start, end = self.template.reply_span(shown, text, reasoning)
        if end <= start:
            return [None] * len(self.layers)
        acts = mean_activations(self.model, [ids], [(start, end)], self.layers, progress=False)[0]
        values = torch.einsum("lh,lh->l", acts, self.units).tolist()
        return [v if math.isfinite(v) else None for v in values]

    def _fired(self, conversations, texts, capping: CappingConfig) -> list[float]:
        """Per reply, the share of (token, capped layer) pairs whose projection the cap lifts: the blocks'
        outputs read before the cap's own hooks (under the caps of the layers before)."""
        spans = [self.template.reply_span(c, t, r) for c, (t, r) in zip(conversations, texts, strict=True)]
        config = capping.normalized()
        ranges = [s[1:] for s in spans]
        before = token_projections(
            self.model, [s[0] for s in spans], ranges, config.layers, config.vectors, progress=False, before_hooks=True
        )
        below = (before < config.thresholds.float()).float()
        shares, offset = [], 0
        for start, end in ranges:
            n = max(end - start, 0)
            shares.append(float(below[offset : offset + n].mean()) if n else float("nan"))
            offset += n
        return shares

    def conversation_projections(self, messages: list[dict], setting: str | None = None):
        """Per message, its mean projection per layer in the conversation up to it (`project`), under the
        setting's hooks: a frame of `turn, role, layer, projection, n_chars`."""
        with self.hooks(setting):
            shown, values = turn_projections(self.model, self.template, messages, self.units, self.layers)
        return projection_frame(shown, self.layers, values)

    # ------------------------------------------------------------------ a server's requests

    def _serve_one(self, messages, sampling, top, setting, cut, on_token=None) -> Reply:
        with self.lock:  # held until the model is free again, also when the caller has been cancelled
            return self.complete(messages, sampling, top, setting, cut.is_set, on_token)

    async def replies(self, messages, sampling: Sampling, seeds, top_logprobs, setting, cut) -> list[Reply]:
        """A server's request: one reply per seed, one after another (a cut stops the current one)."""
        # the server's parts only when serving
        from starlette.concurrency import run_in_threadpool

        return [
            await run_in_threadpool(self._serve_one, messages, replace(sampling, seed=s), top_logprobs, setting, cut)
            for s in seeds
        ]

    def stream(self, messages, sampling: Sampling, top_logprobs, setting, cut):
        """A server's streamed request: `Chunk`s of text as the tokens arrive (whole characters only), then
        the `Reply`; a cut stops generation between two tokens."""
        # the server's parts only when serving
        from starlette.concurrency import run_in_threadpool

        loop = asyncio.get_running_loop()
        tokens: asyncio.Queue = asyncio.Queue()
        decode = self.tokenizer.decode

        def on_token(token: int) -> None:
            loop.call_soon_threadsafe(tokens.put_nowait, token)

        async def events():
            job = asyncio.ensure_future(
                run_in_threadpool(self._serve_one, messages, sampling, top_logprobs, setting, cut, on_token)
            )
            ids, sent = [], ""
            try:
                while not job.done() or not tokens.empty():
                    waiter = asyncio.ensure_future(tokens.get())
                    await asyncio.wait({waiter, job}, return_when=asyncio.FIRST_COMPLETED)
                    if not waiter.done():
                        waiter.cancel()
                        continue
                    ids.append(waiter.result())
                    # What the reply's text will be so far: stripped, and whole characters only.
                    text = decode(ids, skip_special_tokens=True).strip()
                    if text.startswith(sent) and len(text) > len(sent) and not text.endswith("\ufffd"):
                        yield Chunk(text[len(sent) :])
                        sent = text
                reply = job.result()
                if reply.text.startswith(sent) and len(reply.text) > len(sent):
                    yield Chunk(reply.text[len(sent) :])
                yield reply
            finally:
                cut("gone")  # a no-op once the reply is done; else (the client left) the generation stops
                if not job.done():
                    await asyncio.shield(job)  # the model is free again before this request is over

        return events()

    def close(self) -> None:
        pass

    def _logprob(self, token: int, logits: torch.Tensor, top: int) -> TokenLogprob:
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        best = torch.topk(logprobs, top) if top > 0 else None
        ranked = (
            []
            if best is None
            else [(self.tokenizer.decode([int(i)]), float(v)) for v, i in zip(best.values, best.indices, strict=True)]
        )
        return TokenLogprob(token, self.tokenizer.decode([token]), float(logprobs[token]), ranked)
