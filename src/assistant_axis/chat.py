"""Building conversations and locating the assistant's reply inside a chat-template rendering.

The reply's tokens are found from the template itself (render without the reply, then with it),
so no model family needs a special case.
"""

from __future__ import annotations

__all__ = ["supports_system_role", "build_messages", "response_span", "render_ids"]

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


def render_ids(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    # The rendered text already holds any BOS the template wants.
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def response_span(tokenizer, messages: list[dict], response: str) -> tuple[list[int], int, int]:
    """Token ids of `messages` + the assistant `response`, and the [start, end) span of the response.

    start: length of the rendering with the generation prompt; end: the full length minus the
    template's end-of-turn suffix (found by rendering an empty reply). Both are checked as exact
    token prefixes/suffixes, so a template that rewrites earlier turns is reported, not mis-measured.
    """
    prompt_ids = render_ids(tokenizer, messages, add_generation_prompt=True)
    full_ids = render_ids(tokenizer, [*messages, {"role": "assistant", "content": response}])
    empty_ids = render_ids(tokenizer, [*messages, {"role": "assistant", "content": ""}])
    start = len(prompt_ids)
    if full_ids[:start] != prompt_ids:
        raise ValueError("chat template: the rendering with the reply does not extend the generation prompt")
    suffix = empty_ids[start:] if empty_ids[:start] == prompt_ids else []
    end = len(full_ids) - len(suffix)
    if suffix and full_ids[end:] != suffix:
        end = len(full_ids)  # the suffix merged with the reply's last token: keep the whole tail
    return full_ids, start, max(start, end)
