"""Building conversations and locating the assistant's reply inside a chat-template rendering.

The reply's tokens are found from the template itself (render without the reply, then with it),
so no model family needs a special case.
"""

from __future__ import annotations

import os

__all__ = ["supports_system_role", "build_messages", "response_span", "turn_span", "render_ids", "render_text"]

_SENTINEL = "SYSTEM-PROMPT-PROBE-7c1e"


def supports_system_role(tokenizer) -> bool:
    """True when the chat template renders a system message as such (some raise, some drop it)."""
    messages = [{"role": "system", "content": _SENTINEL}, {"role": "user", "content": "hi"}]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception:  # templates signal "no system role" by raising from Jinja  # noqa: BLE001
        return False
    return _SENTINEL in text


def build_messages(system_prompt: str, question: str, system_role: bool = True) -> list[dict]:
    """One user turn under a system prompt; without a system role the prompt is prepended to the user turn."""
    if not system_prompt:
        return [{"role": "user", "content": question}]
    if system_role:
        return [{"role": "system", "content": system_prompt}, {"role": "user", "content": question}]
    return [{"role": "user", "content": f"{system_prompt}\n\n{question}"}]


def render_text(tokenizer, messages: list[dict], add_generation_prompt: bool = False, **template_kwargs) -> str:
    """The chat template's text; `template_kwargs` are the template's own options (e.g. enable_thinking)."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                         **template_kwargs)


def render_ids(tokenizer, messages: list[dict], add_generation_prompt: bool = False, **template_kwargs) -> list[int]:
    # The rendered text already holds any BOS the template wants.
    text = render_text(tokenizer, messages, add_generation_prompt, **template_kwargs)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def response_span(tokenizer, messages: list[dict], response: str) -> tuple[list[int], int, int]:
    """Token ids of `messages` + the assistant `response`, and the [start, end) token span of the response.

    The reply's characters are located in the rendered text: they start where the rendering with the
    generation prompt ends, and stop before the template's end-of-turn suffix (found by rendering an
    empty reply). The span holds every token that overlaps them, so a token merging the last template
    character with the first reply character counts as reply. Templates that trim the reply are fine.
    """
    prompt = render_text(tokenizer, messages, add_generation_prompt=True)
    full = render_text(tokenizer, [*messages, {"role": "assistant", "content": response}])
    empty = render_text(tokenizer, [*messages, {"role": "assistant", "content": ""}])
    if not full.startswith(prompt):
        raise ValueError("chat template: the rendering with the reply does not extend the generation prompt")
    suffix = empty[len(prompt) :] if empty.startswith(prompt) else ""
    reply_end = len(full) - len(suffix) if suffix and full.endswith(suffix) else len(full)
    encoded = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    offsets = encoded["offset_mapping"]
    overlapping = [i for i, (a, b) in enumerate(offsets) if b > len(prompt) and a < reply_end and b > a]
    if not overlapping:
        start = next((i for i, (a, _) in enumerate(offsets) if a >= len(prompt)), len(offsets))
        return encoded["input_ids"], start, start
    return encoded["input_ids"], overlapping[0], overlapping[-1] + 1


def turn_span(tokenizer, history: list[dict], message: dict) -> tuple[list[int], int, int]:
    """Like `response_span` for any message: the ids of `history + [message]` and the message's token span.

    Assistant messages use `response_span` itself, so their spans match the activations stage exactly.
    For other roles the content is located between the renderings with an empty and with the real
    content (their common prefix and suffix are the template's own text).
    """
    if message["role"] == "assistant":
        return response_span(tokenizer, history, message["content"])
    full = render_text(tokenizer, [*history, message])
    empty = render_text(tokenizer, [*history, {**message, "content": ""}])
    prefix = len(os.path.commonprefix([full, empty]))
    suffix = len(os.path.commonprefix([full[prefix:][::-1], empty[prefix:][::-1]]))
    encoded = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    end = len(full) - suffix
    inside = [i for i, (a, b) in enumerate(encoded["offset_mapping"]) if b > prefix and a < end and b > a]
    if not inside:
        return encoded["input_ids"], len(encoded["input_ids"]), len(encoded["input_ids"])
    return encoded["input_ids"], inside[0], inside[-1] + 1
