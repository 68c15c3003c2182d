"""Interventions on the residual stream, as objects that do not depend on the engine running the model.

An intervention lists the decoder blocks it acts on (`layers`) and says how it changes each one's output,
the residual stream `hidden` [..., tokens, hidden_size]: `edit(k, hidden)` for its k-th layer. The two we
have are `cap.CappingConfig` (a floor on the axis projection, optionally a ceiling) and `steer.Steering`
(an added vector). Neither knows how a block is reached: `install(model, *interventions)` hooks them into
a transformers model (what chat, serve, project and the evaluate stage run), and another engine's
installer calls the same `edit` from its own blocks.

Where to add an intervention: a class with `layers`, `hidden_size`, `source` and `edit`; `install` then
runs it everywhere the others run. Where to add an engine: an installer that calls `edit`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

import torch

from assistant_axis.errors import InputError
from assistant_axis.models import block_hidden, check_layers, find_blocks, hidden_size, with_block_hidden

__all__ = ["Intervention", "install", "check_fit"]


class Intervention(Protocol):
    layers: list[int]  # model block indices, one per `edit`
    source: str  # where it came from, named in error messages

    @property
    def hidden_size(self) -> int: ...

    def edit(self, k: int, hidden: torch.Tensor) -> torch.Tensor:
        """Block `layers[k]`'s output `hidden` [..., tokens, hidden_size], changed (a new tensor)."""
        ...


@contextmanager
def install(model, *interventions: Intervention, blocks_path: str | None = None) -> Iterator[None]:
    """Apply the interventions to a transformers model's blocks while active; on a block that several act
    on, in the order given. Sizes and layers are checked before any hook is placed, and the hooks are
    removed on exit, also on error."""
    blocks = find_blocks(model, blocks_path)
    check_fit(interventions, len(blocks), hidden_size(model))
    handles = []
    try:
        for intervention in interventions:
            for k, layer in enumerate(intervention.layers):
                handles.append(blocks[layer].register_forward_hook(_hook(intervention, k)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def check_fit(interventions, n_blocks: int, size: int) -> None:
    """Each intervention's vectors have the model's hidden size and its layers are among the model's blocks
    (every engine's installer checks this before it places a hook)."""
    for intervention in interventions:
        if intervention.hidden_size != size:
            raise InputError(
                intervention.source,
                "hidden_size",
                f"vectors have size {intervention.hidden_size}, the model's hidden size is {size}",
            )
        check_layers(intervention.layers, n_blocks, intervention.source, "layers")


def _hook(intervention: Intervention, k: int):
    def hook(_module, _args, output):
        return with_block_hidden(output, intervention.edit(k, block_hidden(output)))

    return hook
