"""One place renders: `ChatTemplate` locates every message exactly, for each family of template, or says why not.

The templates in `tests/templates/` are ours, written to behave like the families users run (a thinking
template in the manner of Qwen3, system-less ones that raise or drop, a Llama-3-style one); their turn
markers are tokens SmolLM2 already has, so the bundled weights run on each of them.
"""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from assistant_axis import stages
from assistant_axis.artifacts import read_tensors, write_json, write_parquet, write_tensors
from assistant_axis.engines import Sampling
from assistant_axis.engines.openai import OpenAIEngine
from assistant_axis.engines.transformers import TransformersEngine
from assistant_axis.errors import InputError
from assistant_axis.templates import ChatTemplate, options_key, split_reasoning

from conftest import model_with_template, tokenizer_with_template

# id: (template file, None for the bundled ChatML; options; whether it has a system role)
FAMILIES = {
    "chatml-bundled": (None, {}, True),
    "thinking-off": ("thinking", {"enable_thinking": False}, True),
    "thinking-on": ("thinking", {}, True),
    "thinking-on-keeps-reasoning": ("thinking", {"keep_reasoning": True}, True),
    "no-system-raises": ("no_system_raises", {}, False),
    "no-system-drops": ("no_system_drops", {}, False),
    "llama3-style": ("llama3_style", {}, True),
}
SYSTEM, QUESTION = "You are a pirate.", "What do you love?"
REPLY = "Arr, the sea is my only friend, and the wind my only master."
REASONING = "The user wants me to stay in character as a pirate."


def _reasoning(key: str) -> str:
    return REASONING if key.startswith("thinking-on") else ""


@pytest.fixture(scope="module")
def tokenizer(bundled):
    return bundled[1]


def family(tokenizer, key: str) -> ChatTemplate:
    file, options, _ = FAMILIES[key]
    return ChatTemplate(tokenizer if file is None else tokenizer_with_template(tokenizer, file), options, key)


# ------------------------------------------------------------------------------------------ the templates


def test_the_thinking_template_behaves_like_the_family(tokenizer):
    tok = tokenizer_with_template(tokenizer, "thinking")
    conversation = [
        {"role": "user", "content": "  Hi there  "},
        {"role": "assistant", "content": "Hello!", "reasoning_content": "Greet back."},
        {"role": "user", "content": "Bye"},
    ]
    render = lambda **kw: tok.apply_chat_template(conversation, tokenize=False, **kw)  # noqa: E731
    # Thinking off: the generation prompt carries an empty think block; on: it does not.
    assert render(add_generation_prompt=True, enable_thinking=False).endswith(
        "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )
    assert render(add_generation_prompt=True).endswith("<|im_start|>assistant\n")
    # Reasoning of turns before the last user turn is dropped, or kept when asked; content is trimmed.
    assert "Greet back." not in render() and "<|im_start|>user\nHi there<|im_end|>" in render()
    assert "<think>\nGreet back.\n</think>\n\nHello!" in render(keep_reasoning=True)
    # The last reply always gets a think block, empty without reasoning (what broke the old span).
    assert "assistant\n<think>\n\n</think>\n\nHello!" in tok.apply_chat_template(
        conversation[:1] + [{"role": "assistant", "content": "Hello!"}], tokenize=False
    )


@pytest.mark.parametrize("key", FAMILIES)
def test_the_system_prompt_reaches_the_model_whatever_the_template(tokenizer, key):
    template = family(tokenizer, key)
    assert template.system_role == FAMILIES[key][2]
    messages = template.conversation(SYSTEM, QUESTION)
    assert [m["role"] for m in messages] == (["system", "user"] if template.system_role else ["user"])
    assert SYSTEM in template.text(messages, add_generation_prompt=True)


@pytest.mark.parametrize("key", FAMILIES)
def test_the_reply_span_is_exactly_the_reply(tokenizer, key):
    template = family(tokenizer, key)
    messages = template.conversation(SYSTEM, QUESTION)
    ids, start, end = template.reply_span(messages, REPLY, _reasoning(key))
    decode = template.tokenizer.decode
    assert decode(ids[start:end]) == REPLY  # no template text, no special tokens
    # What comes before the reply is the prompt the model answered (reasoning included), nothing of the reply.
    before = decode(ids[:start])
    assert before.startswith(template.text(messages, add_generation_prompt=True))
    assert "sea" not in before and "sea" not in decode(ids[end:])
    if _reasoning(key):
        assert REASONING in before
    # An empty reply: an empty span where it would start, never the template's tail.
    ids, start, end = template.reply_span(messages, "")
    assert start == end and decode(ids[:start]).startswith(template.text(messages, add_generation_prompt=True))


@pytest.mark.parametrize("key", FAMILIES)
def test_each_turn_of_a_conversation_decodes_to_its_content(tokenizer, key):
    template = family(tokenizer, key)
    conversation = template.fit(
        [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": "Where were you born?  "},
            {
                "role": "assistant",
                "content": "On a ship, in a storm.",
                **({"reasoning_content": "Invent a past."} if _reasoning(key) else {}),
            },
            {"role": "user", "content": QUESTION},
            {"role": "assistant", "content": REPLY},
        ]
    )
    assert len(conversation) == (5 if template.system_role else 4)
    for i, message in enumerate(conversation):
        ids, start, end = template.turn_span(conversation[:i], message)
        assert template.tokenizer.decode(ids[start:end]) == message["content"].strip(), (key, i)


@pytest.mark.parametrize(
    ("file", "problem"),
    [
        ("rewrites_reply", "rewrites the assistant message's content"),
        ("other_prompt", "does not extend the generation prompt"),
    ],
)
def test_a_reply_that_cannot_be_located_is_an_error_naming_the_model(tokenizer, file, problem):
    template = ChatTemplate(tokenizer_with_template(tokenizer, file), {}, "my-model")
    with pytest.raises(InputError, match=f"^my-model: chat_template: .*{problem}"):
        template.reply_span(template.conversation(SYSTEM, QUESTION), REPLY)


def test_a_template_error_is_one_line_naming_the_model(tokenizer):
    template = family(tokenizer, "no-system-raises")
    with pytest.raises(InputError, match="^no-system-raises: chat_template: cannot render .*no system role"):
        template.text([{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}])


def test_reasoning_is_split_from_the_reply():
    assert split_reasoning("<think>\nPlan it.\n</think>\n\nAhoy!") == ("Plan it.", "Ahoy!")
    assert split_reasoning("Plan it.\n</think>\n\nAhoy!") == ("Plan it.", "Ahoy!")  # prompt opened the block
    assert split_reasoning("<think>\nStill thinking when the tokens ran out") == (
        "Still thinking when the tokens ran out",
        "",
    )
    assert split_reasoning("  Just a reply. ") == ("", "Just a reply.")


# ------------------------------------------------------------------------------ generation backends


@pytest.mark.parametrize("key", FAMILIES)
def test_generation_builds_its_conversations_with_the_template(bundled, tokenizer, key):
    model, _ = bundled
    template = family(tokenizer, key)
    conversations = [template.conversation(SYSTEM, q) for q in (QUESTION, "Who are you?")]
    # The in-process backend renders them (a system-less template would raise on a system message).
    replies = TransformersEngine(model, template, batch_size=2, progress=False).generate(
        conversations, Sampling(temperature=0.0, max_tokens=4)
    )
    assert len(replies) == 2 and all(r.finish_reason in ("stop", "length") and "<think>" not in r.text for r in replies)
    # Servers get the same messages, with the options the activations stage renders with.
    requests = OpenAIEngine.requests(conversations, Sampling(), [1, 2], template.options)
    assert [r["messages"] for r in requests] == conversations
    assert all(r.get("chat_template_kwargs", {}) == template.options for r in requests)


# ------------------------------------------------------------------------------ the activations stage


def _responses(path, reasoning: str) -> None:
    rows = [(SYSTEM, QUESTION, REPLY), ("", "Describe yourself.", "I am an assistant, here to help.")]
    write_parquet(
        pd.DataFrame(
            {
                "role": "pirate",
                "prompt_index": [0, 1],
                "question_index": [0, 1],
                "question_id": ["q0", "q1"],
                "system_prompt": [r[0] for r in rows],
                "question": [r[1] for r in rows],
                "response": [r[2] for r in rows],
                "reasoning": [reasoning, ""],
                "n_response_tokens": [12, 8],
                "finish_reason": "stop",
            }
        ),
        path,
    )


def _manifest(tmp_path, folder, name: str):
    path = tmp_path / "model.json"
    write_json({"name": name, "source": str(folder), "path": str(folder), "n_layers": 30, "hidden_size": 576}, path)
    return str(path)


@pytest.mark.parametrize("key", FAMILIES)
def test_activations_stage_equals_a_one_at_a_time_reference(tmp_path, model_dir, bundled, key):
    from transformers import AutoTokenizer

    model, _ = bundled
    file, options, _ = FAMILIES[key]
    folder = model_dir if file is None else model_with_template(model_dir, file, tmp_path / "model")
    _responses(tmp_path / "pirate.parquet", _reasoning(key))
    out = tmp_path / "pirate.safetensors"
    layers = [2, 17, 28]  # hidden_states[30] is after the final norm, not the residual stream
    stages.activations(
        _manifest(tmp_path, folder, key),
        [str(tmp_path / "pirate.parquet")],
        [str(out)],
        layers,
        template_options=options,
    )
    tensors, meta = read_tensors(out, ["activations", "layers"])
    assert meta["chat_template_kwargs"] == options_key(options)

    template = ChatTemplate(AutoTokenizer.from_pretrained(folder), options, key)
    frame = pd.read_parquet(tmp_path / "pirate.parquet")
    for i, row in enumerate(frame.itertuples()):
        ids, start, end = template.reply_span(
            template.conversation(row.system_prompt, row.question), row.response, row.reasoning
        )
        assert template.tokenizer.decode(ids[start:end]) == row.response
        with torch.inference_mode():
            hidden = model(torch.tensor([ids]), output_hidden_states=True).hidden_states
        for j, layer in enumerate(layers):
            torch.testing.assert_close(
                tensors["activations"][i, j], hidden[layer + 1][0, start:end].mean(0), rtol=1e-4, atol=1e-4
            )


def test_a_reply_the_stage_cannot_locate_fails_in_one_line_and_writes_nothing(tmp_path, model_dir, capsys):
    folder = model_with_template(model_dir, "rewrites_reply", tmp_path / "model")
    responses = tmp_path / "pirate.parquet"
    _responses(responses, "")
    out = tmp_path / "pirate.safetensors"
    out.write_bytes(b"an earlier result")
    with pytest.raises(SystemExit) as exit_info, stages.logged(None):
        stages.activations(_manifest(tmp_path, folder, "broken"), [str(responses)], [str(out)], [3])
    assert exit_info.value.code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    error = [line for line in lines if line.startswith("error:")]
    assert len(error) == 1 and str(responses) in error[0] and "rewrites the assistant message's content" in error[0]
    assert out.read_bytes() == b"an earlier result"


def test_the_axis_refuses_vectors_rendered_with_other_options(tmp_path):
    paths = []
    for role, options in (
        ("default", {"enable_thinking": False}),
        ("pirate", {"enable_thinking": False}),
        ("ghost", {}),
    ):
        path = tmp_path / f"{role}.safetensors"
        write_tensors(
            {"vector": torch.randn(2, 8), "layers": torch.tensor([0, 1])},
            path,
            {
                "role": role,
                "model": "m",
                "n_responses": 4,
                "n_used": 4,
                "included": True,
                "chat_template_kwargs": options_key(options),
                "chat_template_sha": "abc",
            },
        )
        paths.append(str(path))
    outputs = [str(tmp_path / n) for n in ("axis.safetensors", "axis.pt", "summary.parquet")]
    manifest = tmp_path / "model.json"
    write_json({"name": "m", "source": "s", "path": "p", "n_layers": 2, "hidden_size": 8}, manifest)
    with pytest.raises(InputError, match=r"ghost.safetensors: chat_template_kwargs: rendered with '\{\}'"):
        stages.axis(paths, *outputs, model=str(manifest), config_hash="h")
    assert not (tmp_path / "axis.safetensors").exists()
    stages.axis(paths[:2], *outputs, model=str(manifest), config_hash="h")
    _, meta = read_tensors(outputs[0], ["axis"])
    assert json.loads(meta["chat_template_kwargs"]) == {"enable_thinking": False}
