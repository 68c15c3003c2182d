"""The OpenAI engine: generation through any OpenAI-compatible server, which applies the chat template.

It generates and nothing else (`ENGINES` says so): a server returns no activations and takes no
interventions. The conversations are built with the local model's template (the one the activations
stage renders with), and its options go with every request as `chat_template_kwargs` (vLLM's and
llama.cpp's servers read them), so the server renders what the activations stage will.
"""

from __future__ import annotations

from assistant_axis.api import APISettings, ChatAPI
from assistant_axis.engines import Generation, Sampling, generation
from assistant_axis.models import load_tokenizer
from assistant_axis.templates import ChatTemplate

__all__ = ["OpenAIEngine"]


class OpenAIEngine:
    def __init__(self, settings: dict, template: ChatTemplate, key: str = "generate"):
        self.template = template
        self.api = ChatAPI(APISettings.from_config(settings, f"{key}.openai"), f"{key}.openai")

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
        **_: object,  # the model's options for engines that load it: this one does not
    ) -> OpenAIEngine:

        template = ChatTemplate(load_tokenizer(model_path, trust_remote_code), template_options, model_name)
        return cls(section.get("openai") or {}, template, key)

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

    def close(self) -> None:
        pass
