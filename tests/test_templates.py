"""Locating the assistant reply inside chat-template renderings, with no per-family branches."""

from __future__ import annotations

import copy

import pytest

from assistant_axis.templates import build_messages, response_span, supports_system_role

# A Llama-3-style template: headers around each turn and `| trim` on the content.
LLAMA3_STYLE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
# A Gemma-2-style template that has no system role and says so by raising.
NO_SYSTEM = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n{{ m['content'] | trim }}"
    "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
# A template that drops system messages silently.
DROPS_SYSTEM = (
    "{% for m in messages %}{% if m['role'] != 'system' %}[{{ m['role'] }}] {{ m['content'] }}\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}"
)

REPLY = "Arr, the sea is my only friend, and the wind my only master."


@pytest.fixture(scope="module")
def tokenizer(bundled):
    return bundled[1]


def _with_template(tokenizer, template):
    """The bundled tokenizer with another family's template and that family's turn markers as special tokens."""
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = template
    markers = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<start_of_turn>", "<end_of_turn>"]
    tok.add_special_tokens({"additional_special_tokens": markers})
    return tok


@pytest.mark.parametrize("template", [None, LLAMA3_STYLE, NO_SYSTEM, DROPS_SYSTEM],
                         ids=["chatml-bundled", "llama3-style", "no-system-raises", "no-system-drops"])
def test_span_is_exactly_the_reply(tokenizer, template):
    tok = tokenizer if template is None else _with_template(tokenizer, template)
    system_role = supports_system_role(tok)
    assert system_role == (template in (None, LLAMA3_STYLE))
    messages = build_messages("You are a pirate.", "What do you love?", system_role)
    ids, start, end = response_span(tok, messages, REPLY)
    assert tok.decode(ids[start:end]).strip() == REPLY
    # Nothing of the reply lies outside the span: the prefix is the prompt, the tail is template only.
    assert "sea" not in tok.decode(ids[:start]) and "sea" not in tok.decode(ids[end:])
    assert end < len(ids) or template == DROPS_SYSTEM  # templates with an end-of-turn marker keep it outside


def test_without_system_role_the_prompt_joins_the_user_turn(tokenizer):
    tok = _with_template(tokenizer, NO_SYSTEM)
    messages = build_messages("You are a pirate.", "What do you love?", supports_system_role(tok))
    assert messages == [{"role": "user", "content": "You are a pirate.\n\nWhat do you love?"}]
    text = tok.apply_chat_template(messages, tokenize=False)
    assert "You are a pirate." in text


def test_empty_reply_has_an_empty_span(tokenizer):
    ids, start, end = response_span(tokenizer, build_messages("", "Hi"), "")
    assert start == end and end < len(ids)
