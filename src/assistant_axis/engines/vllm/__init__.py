"""The vLLM engine: generation, activations and sessions in one vLLM engine per job (any tensor parallel
size), with the hooks of `hooks` where activations are recorded or interventions applied.

`engine` holds what is vLLM's (its arguments from a config block, starting it, the runner adapter the
hooks read: Model Runner V1 pinned), `hooks` the interventions, telemetry and recorder inside the
workers, `session` the threaded session that serves settings under continuous batching. The engine is
started on first use, as that use needs it: plain for generation, recording for activations (prefix
caching off unless configured: a cached token is not computed, so it could not be recorded), hooked
for sessions.

>>> engine = open_engine("vllm", "results/models/smollm2-135m-instruct", {"vllm": {"max_model_len": 2048}}, "generate")
>>> replies = engine.generate(conversations, Sampling(max_tokens=64), seeds)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from assistant_axis.engines import Generation, Sampling, generation
from assistant_axis.engines.vllm.engine import hooked_engine, recording_engine, vllm_engine, vllm_engine_args
from assistant_axis.engines.vllm.hooks import ActivationRecorder
from assistant_axis.engines.vllm.ops import Layout
from assistant_axis.engines.vllm.session import VLLMSession
from assistant_axis.errors import InputError
from assistant_axis.models import load_tokenizer
from assistant_axis.templates import ChatTemplate

__all__ = ["VLLMEngine", "vllm_mean_activations", "CAPTURE_CHUNK"]

CAPTURE_CHUNK = 512  # replies per vLLM call when generation records activations (their sums wait on the GPU)


class VLLMEngine:
    """One model in vLLM, started on first use (`llm`, or pass one in). `capture` (layers, storage dtype):
    `generate` records each reply's mean activations while it is generated (`captured`)."""

    def __init__(
        self,
        args: dict,
        template: ChatTemplate,
        key: str = "engine",
        capture: tuple[list[int], torch.dtype] | None = None,
        llm=None,
        progress: bool = True,
    ):
        # `template` is the tokenizer as the activations stage loads it, with the same options: the
        # conversations and the check in `generate` use the very rendering that stage takes activations over.
        self.args, self.template, self.key, self.progress = args, template, key, progress
        self.start_key = key if key.startswith("--") else f"{key}.backend"  # named when the engine cannot start
        self.capture, self.captured, self.recorder = capture, None, None
        self.llm, self.kind = llm, None if llm is None else "given"

    @classmethod
    def open(
        cls,
        model_path: str,
        section: dict,
        key: str,
        dtype: str = "float32",  # as the transformers engine: the model config's default (model.dtype)
        trust_remote_code: bool = False,
        template_options: dict | None = None,
        model_name: str = "model",
        seed: int = 0,
        capture: tuple[list[int], torch.dtype] | None = None,
        progress: bool = True,
        **_: object,  # the transformers engine's own options (device)
    ) -> VLLMEngine:

        if not Path(model_path, "config.json").is_file():
            raise InputError(
                model_path, "config.json", "the vLLM engine needs a model directory (prepare a GGUF first)"
            )
        # A config section's block is `<key>.vllm`; a command line's (`--engine-args`) is the flag itself.
        block = key if key.startswith("--") else f"{key}.vllm"
        engine = section.get("vllm") or {}
        args = vllm_engine_args(model_path, engine, block, dtype, section.get("seed", seed), trust_remote_code)
        template = ChatTemplate(load_tokenizer(model_path, trust_remote_code), template_options, model_name)
        return cls(args, template, key, capture, progress=progress)

    def _started(self, kind: str, layout: Layout | None = None):
        """The engine, started now as `kind` needs it: "plain", "recording" (every layer recorded, or the
        captured ones) or "hooked" (the ops of `layout`)."""
        if self.llm is None:
            args = self.args
            if kind == "plain":
                self.llm = vllm_engine(args, self.start_key)
            elif kind == "recording":  # a cached token is not computed, so it could not be recorded
                record = self.capture[0] if self.capture else "all"
                args = {"enable_prefix_caching": False, **args}
                self.llm = recording_engine(args, self.start_key, Layout(record=record))
            else:
                self.llm = hooked_engine(args, self.start_key, layout)
            self.kind = kind
        elif kind != self.kind and self.kind != "given":
            raise RuntimeError(f"this engine was started {self.kind}; {kind} needs a new one")
        return self.llm

    # ------------------------------------------------------------------ generation

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
            }  # fmt: skip
            for seed in seeds
        ]

    def generate(
        self, conversations: list[list[dict]], sampling: Sampling, seeds: list[int] | None = None
    ) -> list[Generation]:
        """One `chat` call for every conversation; each request carries its own seed, so a reply depends only
        on its conversation and seed, not on the batch it was scheduled in. Every prompt vLLM rendered is
        checked against the template as the activations stage renders it."""
        llm = self._started("recording" if self.capture else "plain")
        # vLLM loads only where an engine runs: planning and the light paths never import it
        from vllm import SamplingParams

        seeds = seeds or [sampling.seed + i for i in range(len(conversations))]
        kwargs = self.sampling_params(sampling, seeds)
        if self.capture is None:
            outputs = self._chat(conversations, [SamplingParams(**kw) for kw in kwargs])
        else:
            if self.recorder is None:
                self.recorder = ActivationRecorder(llm, self.capture[0])
            # Recorded sums wait on the model's device until they are popped: a chunk at a time bounds that.
            outputs, means, self.captured = [], [], None
            for at in range(0, len(conversations), CAPTURE_CHUNK):
                keys = [f"g{i}" for i in range(at, min(at + CAPTURE_CHUNK, len(conversations)))]
                params = [self.recorder.sampling_params(key, **kw) for key, kw in zip(keys, kwargs[at:], strict=False)]
                outputs += self._chat(conversations[at : at + CAPTURE_CHUNK], params)
                means.append(self.recorder.pop(keys)[0].to(self.capture[1]))
            self.captured = torch.cat(means) if means else None
        results = []
        for conversation, output in zip(conversations, outputs, strict=True):
            expected = self.template.ids(conversation, add_generation_prompt=True)
            if list(output.prompt_token_ids) != expected:
                raise InputError(
                    llm.llm_engine.model_config.model,
                    "chat_template",
                    "vLLM rendered a conversation differently from the chat template as the "
                    f"activations stage renders it ({len(output.prompt_token_ids)} vs {len(expected)} "
                    "tokens): the reply's activations would not be taken after its real prompt",
                )
            best = output.outputs[0]
            finish = "length" if best.finish_reason == "length" else "stop"
            results.append(generation(best.text, len(best.token_ids), finish))
        return results

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

    # ------------------------------------------------------------------ activations and sessions

    @property
    def context_length(self) -> int:
        """The most tokens a sequence of `mean_activations` may have: the engine's max_model_len less the one
        token each of its requests must sample."""
        return int(self._started("recording").llm_engine.model_config.max_model_len) - 1

    def mean_activations(self, sequences, spans, layers) -> torch.Tensor:
        return vllm_mean_activations(
            self._started("recording"), sequences, spans, layers, source=f"{self.key}.vllm", progress=self.progress
        )

    def session(self, units, layers, cappings, steering=None, sampling=None, system=None):

        cappings = {name: capping.normalized() for name, capping in cappings.items()}
        layout = VLLMSession.layout(layers, cappings, steering)
        llm = self._started("hooked", layout)
        return VLLMSession(llm, self.template, units, layers, cappings, steering, sampling, system)

    def close(self) -> None:
        """Remove the recorder and shut the engine down (its worker processes, its memory)."""
        if self.recorder is not None:
            self.recorder.remove()
            self.recorder = None
        if self.llm is not None and self.kind != "given":
            self.llm.llm_engine.engine_core.shutdown()
        self.llm = None


def vllm_mean_activations(
    llm,
    sequences: Sequence[Sequence[int]],
    spans: Sequence[tuple[int, int]],
    layers: Sequence[int],
    chunk: int = 256,
    progress: bool = True,
    source: str = "activations",
) -> torch.Tensor:
    """`activations.mean_activations` in a vLLM engine from `engine.recording_engine`: float32
    [n, layers, hidden].

    Each sequence is one request that prefills it and samples one token (thrown away), with the model cut
    after the last requested layer. The engine schedules `chunk` requests at a time (their float32 sums
    wait on the model's device until the chunk ends: 256 x 1.3 MB for a 64-layer, 5120-wide model).
    Every span token must be computed, not read from vLLM's prefix cache
    (a repeated conversation would be): a shortfall is an error naming `source`.
    """
    # vLLM loads only where an engine runs: planning and the light paths never import it
    from vllm.inputs import TokensPrompt

    recorder = ActivationRecorder(llm, layers, stop_early=True)
    result = torch.full((len(sequences), len(layers), recorder.hidden_size), float("nan"), dtype=torch.float32)
    todo = [i for i, (start, end) in enumerate(spans) if end > start]
    try:
        with tqdm(total=len(todo), desc="activations (vLLM)", unit="reply", disable=not progress) as bar:
            for at in range(0, len(todo), chunk):
                rows = todo[at : at + chunk]
                keys = [f"r{i}" for i in rows]
                prompts = [TokensPrompt(prompt_token_ids=list(sequences[i])) for i in rows]
                params = [
                    recorder.sampling_params(key, spans[i], max_tokens=1, temperature=0.0, detokenize=False)
                    for key, i in zip(keys, rows, strict=True)
                ]
                llm.generate(prompts, params, use_tqdm=False)
                means, counts = recorder.pop(keys)
                for r, (i, n) in enumerate(zip(rows, counts, strict=True)):
                    if n != spans[i][1] - spans[i][0]:
                        raise InputError(
                            source,
                            "enable_prefix_caching",
                            f"reply {i}: {n} of its {spans[i][1] - spans[i][0]} tokens were computed (the rest "
                            "came from vLLM's prefix cache); extract with enable_prefix_caching: false",
                        )
                    result[i] = means[r]
                bar.update(len(rows))
    finally:
        recorder.remove()
    return result
