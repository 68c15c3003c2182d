"""Building a model's conversations and locating each message inside its chat-template rendering.

`ChatTemplate` is the one place that renders: it holds the template's options from config
(`model.chat_template_kwargs`, e.g. `{enable_thinking: false}`) and whether the template has a system
role, and every stage that renders (generation, activations, judging, evaluation, chat, serve, project)
goes through it.

A message's tokens are found from the template itself: the message is rendered with a probe string in
place of its content, which splits the rendering into the template's text before and after the content.
The real rendering must be framed by exactly those two, and an assistant reply must also come after the
generation prompt; anything else is an error naming the model, never a guess. So no model family needs
a special case, and a template that writes a think block, trims content or drops reasoning is handled
by what it renders.
"""

from __future__ import annotations

import hashlib
import json

from assistant_axis.errors import InputError

__all__ = ["ChatTemplate", "build_messages", "fold_system", "split_reasoning", "options_key"]

_SYSTEM_PROBE = "SYSTEM-PROMPT-PROBE-7c1e"
_PROBE = "CONTENT-PROBE-4b9d"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def build_messages(system_prompt: str, question: str, system_role: bool = True) -> list[dict]:
    """One user turn under a system prompt; without a system role the prompt is prepended to the user turn."""
    if not system_prompt:
        return [{"role": "user", "content": question}]
    if system_role:
        return [{"role": "system", "content": system_prompt}, {"role": "user", "content": question}]
    return [{"role": "user", "content": f"{system_prompt}\n\n{question}"}]


def fold_system(messages: list[dict]) -> list[dict]:
    """For templates without a system role: prepend the system prompt to the first user turn."""
    if not messages or messages[0]["role"] != "system":
        return list(messages)
    system, rest = messages[0]["content"], list(messages[1:])
    if rest and rest[0]["role"] == "user":
        rest[0] = {**rest[0], "content": f"{system}\n\n{rest[0]['content']}"}
    return rest


def split_reasoning(text: str) -> tuple[str, str]:
    """(reasoning, reply) of a generated text: a thinking model's `<think>...</think>` block is not reply.

    A think block never closed (the token budget ran out while thinking) leaves no reply at all.
    """
    head, sep, tail = text.partition(THINK_CLOSE)
    if sep:
        return head.replace(THINK_OPEN, "", 1).strip(), tail.strip()
    if text.lstrip().startswith(THINK_OPEN):
        return text.lstrip()[len(THINK_OPEN) :].strip(), ""
    return "", text.strip()


def options_key(options: dict | None) -> str:
    """Template options as one canonical string (recorded in artifacts, compared between them)."""
    return json.dumps(options or {}, sort_keys=True)


class ChatTemplate:
    """A tokenizer's chat template with its options: renders conversations and locates messages in them.

    `name` (the model) is what errors name.
    """

    def __init__(self, tokenizer, options: dict | None = None, name: str = "model"):
        self.tokenizer, self.options, self.name = tokenizer, dict(options or {}), str(name)
        self.system_role = self._has_system_role()

    def _has_system_role(self) -> bool:
        # Templates without a system role either raise on one (Gemma) or silently leave it out.
        messages = [{"role": "system", "content": _SYSTEM_PROBE}, {"role": "user", "content": "hi"}]
        try:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, **self.options)
        except Exception:  # Jinja's raise_exception surfaces as a TemplateError  # noqa: BLE001
            return False
        return _SYSTEM_PROBE in text

    @property
    def digest(self) -> str:
        """Short hash of the template source and options: what the rendering depends on."""
        source = self.tokenizer.chat_template
        text = json.dumps(source, sort_keys=True) + options_key(self.options)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def metadata(self) -> dict[str, str]:
        """What the activations record about how they were rendered."""
        return {"chat_template_kwargs": options_key(self.options), "chat_template_sha": self.digest}

    # ------------------------------------------------------------------ building and rendering

    def conversation(self, system_prompt: str, question: str) -> list[dict]:
        """The messages of one question under a system prompt, as this template can take them."""
        return build_messages(system_prompt, question, self.system_role)

    def fit(self, messages: list[dict]) -> list[dict]:
        """`messages` as this template can take them: the system prompt folded in where it has no system role."""
        return list(messages) if self.system_role else fold_system(messages)

    def text(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        try:
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt, **self.options
            )
        except Exception as exc:  # a template's own error, e.g. roles out of order  # noqa: BLE001
            raise InputError(self.name, "chat_template", f"cannot render the conversation ({exc})") from exc

    def ids(self, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
        # The rendered text already holds any BOS the template wants.
        return self.tokenizer(self.text(messages, add_generation_prompt), add_special_tokens=False)["input_ids"]

    # ------------------------------------------------------------------ locating messages

    def reply_span(self, messages: list[dict], reply: str, reasoning: str = "") -> tuple[list[int], int, int]:
        """Token ids of `messages` + the assistant `reply`, and the [start, end) token span of the reply.

        `reasoning` (a thinking model's think block) is rendered where the template puts it, outside the span.
        """
        prompt = self.text(messages, add_generation_prompt=True)
        message = {"role": "assistant", "content": reply}
        if reasoning:
            message["reasoning_content"] = reasoning
        full, lo, hi = self._locate(messages, message)
        if not full.startswith(prompt) or lo < len(prompt):
            raise InputError(
                self.name,
                "chat_template",
                "the rendering with the reply does not extend the generation prompt "
                f"(prompt ends {prompt[-40:]!r}, the rendering has {full[max(lo - 40, 0) : lo]!r} "
                "before the reply): the reply's tokens cannot be located",
            )
        return self._span(full, lo, hi)

    def turn_span(self, history: list[dict], message: dict) -> tuple[list[int], int, int]:
        """The ids of `history + [message]` and the message's token span (assistant turns as `reply_span`)."""
        if message["role"] == "assistant":
            return self.reply_span(history, message["content"], message.get("reasoning_content", ""))
        full, lo, hi = self._locate(history, message)
        return self._span(full, lo, hi)

    def _locate(self, history: list[dict], message: dict) -> tuple[str, int, int]:
        """The rendering of `history + [message]` and the character range of the message's content in it."""
        full = self.text([*history, message])
        probed = self.text([*history, {**message, "content": _PROBE}])
        where = f"the {message['role']} message"
        if probed.count(_PROBE) != 1:
            raise InputError(
                self.name,
                "chat_template",
                f"{where}'s content is rendered {probed.count(_PROBE)} times, not once: its tokens cannot be located",
            )
        before, after = probed.split(_PROBE)
        if not (full.startswith(before) and full.endswith(after) and len(full) >= len(before) + len(after)):
            raise InputError(
                self.name,
                "chat_template",
                f"{where} is not framed by the template's own text around it (expected the "
                f"end-of-turn text {after[:40]!r}): its tokens cannot be located",
            )
        written = full[len(before) : len(full) - len(after)]
        content = message["content"].strip()
        if written.strip() != content:
            raise InputError(
                self.name,
                "chat_template",
                f"the template rewrites {where}'s content ({content[:40]!r} became "
                f"{written.strip()[:40]!r}): its tokens cannot be located",
            )
        lo = len(before) + len(written) - len(written.lstrip())
        return full, lo, lo + len(content)

    def _span(self, full: str, lo: int, hi: int) -> tuple[list[int], int, int]:
        # Every token overlapping the characters counts, so a token merging a template character with
        # the first content character belongs to the content.
        encoded = self.tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
        inside = [i for i, (a, b) in enumerate(offsets) if b > lo and a < hi and b > a]
        if not inside:  # empty content: an empty span where it would start
            start = next((i for i, (a, _) in enumerate(offsets) if a >= lo), len(ids))
            return ids, start, start
        return ids, inside[0], inside[-1] + 1
