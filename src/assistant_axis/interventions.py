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

    def to(self, device: torch.device | str) -> Intervention:
        """The same intervention with its vectors on `device`: an installer places it where its blocks run."""
        ...

    def edit(self, k: int, hidden: torch.Tensor) -> torch.Tensor:
        """Block `layers[k]`'s output `hidden` [..., tokens, hidden_size], changed (a new tensor). The
        vectors are on `hidden`'s device already (placed by the installer with `to`): nothing is copied
        from the host per call."""
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
            placed: dict[torch.device, Intervention] = {}  # shared by its blocks (a split model has several devices)
            for k, layer in enumerate(intervention.layers):
                handles.append(blocks[layer].register_forward_hook(_hook(intervention, k, placed)))
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


def _hook(intervention: Intervention, k: int, placed: dict):
    """The hook of the k-th block; the intervention is copied to a device once, the first time a stream
    arrives there (where a block computes is known for sure only then: offloaded weights live elsewhere)."""

    def hook(_module, _args, output):
        hidden = block_hidden(output)
        if hidden.device not in placed:
            placed[hidden.device] = intervention.to(hidden.device)
        return with_block_hidden(output, placed[hidden.device].edit(k, hidden))

    return hook
