"""Generation backends: every backend turns conversations into replies behind one small interface.

`transformers` runs here (CPU or GPU); `vllm` and `openai` serve the paper-scale run and plug in
behind the same `generate()` call. In-process generation, whoever asks for it (the stages, chat, serve),
is one loop: `sample_batch`. Where to add an engine: a class with `generate`, created in `make_backend`.

>>> backend = TransformersBackend(model, ChatTemplate(tokenizer), batch_size=32)
>>> replies = backend.generate([[{"role": "user", "content": "Hi"}]], Sampling(max_tokens=16))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from tqdm.auto import tqdm

from assistant_axis.errors import ArgumentError, InputError
from assistant_axis.roles import stable_seed
from assistant_axis.templates import ChatTemplate, split_reasoning
from assistant_axis.vllm_engine import recording_engine, vllm_engine, vllm_engine_args
from assistant_axis.vllm_hooks import ActivationRecorder

__all__ = [
    "Sampling",
    "Generation",
    "GenerationBackend",
    "TransformersBackend",
    "VLLMBackend",
    "OpenAIBackend",
    "TopP",
    "generation",
    "stable_seed",
    "sample_batch",
    "Sampled",
    "make_backend",
    "BACKENDS",
]

BACKENDS = ("transformers", "vllm", "openai")
CAPTURE_CHUNK = 512  # replies per vLLM call when generation records activations (their sums wait on the GPU)


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.7
    top_p: float = 0.9
    max_tokens: int = 512
    seed: int = 0


@dataclass(frozen=True)
class Generation:
    text: str  # the reply, without a thinking model's reasoning
    n_tokens: int  # generated tokens, reasoning included
    finish_reason: str  # "stop" (end of turn) or "length" (max_tokens reached)
    reasoning: str = ""  # the think block's text, if the model wrote one


def generation(text: str, n_tokens: int, finish_reason: str, reasoning: str = "") -> Generation:
    """A `Generation` from generated text: a `<think>` block in it is reasoning, not reply."""
    thought, reply = split_reasoning(text)
    return Generation(reply, n_tokens, finish_reason, (reasoning or thought).strip())


class GenerationBackend(Protocol):
    """`seeds`, one per conversation, are used where the backend can seed each request (vLLM, servers).

    `template` is the model's chat template as every stage renders it: conversations are built with it.
    """

    template: ChatTemplate

    def generate(
        self, conversations: list[list[dict]], sampling: Sampling, seeds: list[int] | None = None
    ) -> list[Generation]: ...


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


class TransformersBackend:
    """In-process `generate`: prompts sorted by length, left-padded, in batches; stops at end of turn."""

    def __init__(self, model, template: ChatTemplate, batch_size: int = 32, progress: bool = True):
        if batch_size < 1:
            raise ArgumentError("TransformersBackend", "batch_size", f"must be >= 1, got {batch_size}")
        self.model, self.template, self.batch_size, self.progress = model, template, batch_size, progress
        self.tokenizer = template.tokenizer

    def generate(
        self, conversations: list[list[dict]], sampling: Sampling, seeds: list[int] | None = None
    ) -> list[Generation]:
        # Batched sampling here draws from one generator per batch (seeded from sampling.seed), so
        # per-request seeds are not used; results are reproducible for the same prompts and batch size.
        prompts = [self.template.ids(c, add_generation_prompt=True) for c in conversations]
        # Longest first: similar lengths share a batch, so little padding is computed.
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        results: list[Generation | None] = [None] * len(prompts)
        starts = range(0, len(order), self.batch_size)
        for batch_no, start in enumerate(tqdm(starts, desc="generate", unit="batch", disable=not self.progress)):
            rows = order[start : start + self.batch_size]
            batch = sample_batch(
                self.model, self.tokenizer, [prompts[i] for i in rows], sampling, sampling.seed + batch_no
            )
            for i, out in zip(rows, batch, strict=True):
                text = self.tokenizer.decode(out.tokens, skip_special_tokens=True)
                results[i] = generation(text, len(out.tokens), out.finish_reason)
        return results  # type: ignore[return-value]


class VLLMBackend:
    """Offline batch generation with vLLM: one engine per job, every conversation of the job in one `chat` call.

    Each request carries its own seed, so a reply depends only on its conversation and seed, not on the
    batch it was scheduled in. vLLM renders the conversations with the model's chat template; every
    prompt it rendered is checked against the template as the activations stage renders it, so the
    activations are taken over the very tokens the reply was generated after.
    """

    def __init__(
        self,
        model_path: str,
        settings: dict,
        template: ChatTemplate,
        dtype: str = "auto",
        trust_remote_code: bool = False,
        llm=None,
        progress: bool = True,
        capture: tuple[list[int], torch.dtype] | None = None,
    ):
        # `template` is the tokenizer as the activations stage loads it, with the same options: the
        # conversations and the check below use the very rendering that stage takes activations over.
        self.template = template
        self.progress = progress
        # `capture` (layers, storage dtype): record each reply's mean activations while it is generated.
        self.recorder, self.captured = None, None
        if llm is None:
            args = self.engine_args(model_path, settings, dtype, trust_remote_code)
            if capture is None:
                llm = vllm_engine(args, "generate.backend")
            else:
                llm = recording_engine(args, "generate.capture_activations")
        self.llm = llm
        if capture is not None:
            self.recorder, self.capture_dtype = ActivationRecorder(llm, capture[0]), capture[1]

    @staticmethod
    def engine_args(model_path: str, settings: dict, dtype: str, trust_remote_code: bool) -> dict:
        return vllm_engine_args(
            model_path, settings.get("vllm") or {}, "generate.vllm", dtype, settings.get("seed", 0), trust_remote_code
        )

    @staticmethod
    def sampling_params(sampling: Sampling, seeds: list[int]) -> list[dict]:
        """Keyword arguments of each request's `SamplingParams`: the seed of each comes from its key."""
        return [
            {
                "n": 1,
                "temperature": sampling.temperature,
                "top_p": sampling.top_p,
                "max_tokens": sampling.max_tokens,
                "seed": seed,
            }
            for seed in seeds
        ]

    def generate(
        self, conversations: list[list[dict]], sampling: Sampling, seeds: list[int] | None = None
    ) -> list[Generation]:
        from vllm import SamplingParams

        seeds = seeds or [sampling.seed + i for i in range(len(conversations))]
        kwargs = self.sampling_params(sampling, seeds)
        if self.recorder is None:
            outputs = self._chat(conversations, [SamplingParams(**kw) for kw in kwargs])
        else:
            # Recorded sums wait on the model's device until they are popped: a chunk at a time bounds that.
            outputs, means, self.captured = [], [], None
            for at in range(0, len(conversations), CAPTURE_CHUNK):
                keys = [f"g{i}" for i in range(at, min(at + CAPTURE_CHUNK, len(conversations)))]
                params = [self.recorder.sampling_params(key, **kw) for key, kw in zip(keys, kwargs[at:], strict=False)]
                outputs += self._chat(conversations[at : at + CAPTURE_CHUNK], params)
                means.append(self.recorder.pop(keys)[0].to(self.capture_dtype))
            self.captured = torch.cat(means) if means else None
        results = []
        for conversation, output in zip(conversations, outputs, strict=True):
            expected = self.template.ids(conversation, add_generation_prompt=True)
            if list(output.prompt_token_ids) != expected:
                raise InputError(
                    self.llm.llm_engine.model_config.model,
                    "chat_template",
                    "vLLM rendered a conversation differently from the chat template as the "
                    f"activations stage renders it ({len(output.prompt_token_ids)} vs {len(expected)} "
                    "tokens): the reply's activations would not be taken after its real prompt",
                )
            best = output.outputs[0]
            finish = "length" if best.finish_reason == "length" else "stop"
            results.append(generation(best.text, len(best.token_ids), finish))
        return results

    def close(self) -> None:
        """Remove the activation recorder from the engine (the engine itself stays up)."""
        if self.recorder is not None:
            self.recorder.remove()
            self.recorder = None

    def _chat(self, conversations: list[list[dict]], params: list) -> list:
        # vLLM renders with the template source the activations stage renders with, and its options.
        source = self.template.tokenizer.chat_template
        return self.llm.chat(
            conversations,
            sampling_params=params,
            use_tqdm=self.progress,
            chat_template=source if isinstance(source, str) else None,
            chat_template_kwargs=self.template.options or None,
        )


class OpenAIBackend:
    """Generation through any OpenAI-compatible server; the server applies the chat template.

    The conversations are built with the local model's `template` (the one the activations stage renders
    with), and its options go with every request as `chat_template_kwargs` (vLLM's and llama.cpp's servers
    read them), so the server renders what the activations stage will.
    """

    def __init__(self, settings: dict, template: ChatTemplate):
        from assistant_axis.api import APISettings, ChatAPI

        self.template = template
        self.api = ChatAPI(APISettings.from_config(settings.get("openai", {}), "generate.openai"), "generate.openai")

    @staticmethod
    def requests(
        conversations: list[list[dict]], sampling: Sampling, seeds: list[int], template_options: dict | None = None
    ) -> list[dict]:
        options = {"chat_template_kwargs": template_options} if template_options else {}
        return [
            {
                "messages": c,
                "temperature": sampling.temperature,
                "top_p": sampling.top_p,
                "max_tokens": sampling.max_tokens,
                "seed": seed,
                **options,
            }
            for c, seed in zip(conversations, seeds, strict=True)
        ]

    def generate(
        self, conversations: list[list[dict]], sampling: Sampling, seeds: list[int] | None = None
    ) -> list[Generation]:
        seeds = seeds or [sampling.seed + i for i in range(len(conversations))]
        results = []
        for outcome in self.api.run(
            self.requests(conversations, sampling, seeds, self.template.options), desc="generate"
        ):
            choice = outcome.response["choices"][0]
            message = choice.get("message") or {}
            # Servers with a reasoning parser return the think block apart (vLLM: reasoning_content).
            reasoning = message.get("reasoning_content") or message.get("reasoning") or ""
            usage = outcome.response.get("usage") or {}
            finish = "length" if choice.get("finish_reason") == "length" else "stop"
            results.append(
                generation(message.get("content") or "", int(usage.get("completion_tokens") or 0), finish, reasoning)
            )
        return results


def make_backend(
    name: str,
    settings: dict,
    model_path: str,
    dtype: str = "float32",
    trust_remote_code: bool = False,
    template_options: dict | None = None,
    model_name: str = "model",
    capture: tuple[list[int], torch.dtype] | None = None,
) -> GenerationBackend:
    """Build the configured backend, rendering with the model's template and `template_options`; heavy
    imports happen only for the chosen one. `capture` (vllm only): see `VLLMBackend`."""
    if name not in BACKENDS:
        raise ArgumentError("make_backend", "name", f"unknown backend {name!r} (allowed: {', '.join(BACKENDS)})")
    from assistant_axis.models import load_model, load_tokenizer

    if capture is not None and name != "vllm":
        raise InputError("config", "generate.capture_activations", f"needs generate.backend: vllm, not {name}")
    if name == "transformers":
        model, tokenizer = load_model(model_path, dtype, trust_remote_code=trust_remote_code)
        return TransformersBackend(
            model, ChatTemplate(tokenizer, template_options, model_name), batch_size=settings.get("batch_size", 32)
        )
    template = ChatTemplate(load_tokenizer(model_path, trust_remote_code), template_options, model_name)
    if name == "vllm":
        return VLLMBackend(model_path, settings, template, dtype, trust_remote_code, capture=capture)
    return OpenAIBackend(settings, template)
