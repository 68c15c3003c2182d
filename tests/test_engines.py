"""The engine layer's contract: every registered engine has what its registry entry says it can do, and
every session the whole `Session` protocol, so nothing above the engines needs to know which it has."""

from __future__ import annotations

import importlib
import inspect

import pytest

from assistant_axis.engines import ENGINES, Session, engine_spec, open_engine
from assistant_axis.errors import InputError

NEEDS = {
    "generate": ["generate"],
    "activations": ["mean_activations", "context_length"],
    "sessions": ["session"],
    "capture": ["generate"],
}
SESSIONS = {
    "transformers": ("assistant_axis.engines.transformers", "TransformersSession"),
    "vllm": ("assistant_axis.engines.vllm.session", "VLLMSession"),
}


def _members(protocol) -> set[str]:
    return {name for name in vars(protocol) if not name.startswith("_")} | set(protocol.__annotations__)


@pytest.mark.parametrize("name", sorted(ENGINES))
def test_each_engine_has_what_its_registry_entry_declares(name):
    spec = ENGINES[name]
    engine = getattr(importlib.import_module(spec.module), spec.cls)
    assert inspect.ismethod(engine.open) and callable(engine.close)  # opened from a config section; closed
    for can in spec.can:
        for member in NEEDS[can]:
            assert hasattr(engine, member), f"{name} says it can do {can} but has no {member}"
    assert ("sessions" in spec.can) == (name in SESSIONS)


@pytest.mark.parametrize("name", sorted(SESSIONS))
def test_each_session_has_the_whole_protocol(name):
    module, cls = SESSIONS[name]
    session = getattr(importlib.import_module(module), cls)
    methods = {m for m in _members(Session) if callable(getattr(Session, m, None))}
    assert {"complete", "answer", "conversation_projections", "replies", "stream", "close"} <= methods
    for method in methods:
        assert callable(getattr(session, method, None)), f"{cls} has no {method}"
        ours = list(inspect.signature(getattr(session, method)).parameters)
        protocol = list(inspect.signature(getattr(Session, method)).parameters)
        assert ours[: len(protocol)] == protocol, (cls, method, ours, protocol)


def test_an_engine_that_cannot_do_what_is_asked_says_so_in_one_line():
    with pytest.raises(InputError, match=r"^config: evaluate.backend: openai cannot do interventions .*vllm\)$"):
        open_engine("openai", "unused", {}, "evaluate", ["sessions"])
    with pytest.raises(InputError, match=r"^config: generate.backend: unknown engine 'sglang' \(known: "):
        engine_spec("sglang", "generate.backend")
