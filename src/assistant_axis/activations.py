"""Mean post-block residual-stream activations over each reply's tokens, at chosen layers.

Layer i is the output of decoder block i (the raw residual stream, before any final norm). Forward
hooks reduce each block's output to per-reply means straight into a preallocated buffer, and the
forward pass is cut off after the last requested block, so neither later blocks nor the LM head run.
`token_projections` runs the same way but keeps every reply token, projected on one direction per layer.
This is the transformers engine's reading of a model (`engines.transformers`), also used where a stage
reads a model loaded in this process (calibrate, project); `engines.vllm.vllm_mean_activations` takes the
same means inside a vLLM engine.

>>> ids, start, end = ChatTemplate(tokenizer).reply_span(messages, reply)
>>> acts = mean_activations(model, [ids], [(start, end)], layers=[10, 20])  # [1, 2, hidden]
>>> proj = token_projections(model, [ids], [(start, end)], [10, 20], units)  # [end - start, 2]
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from assistant_axis.errors import ArgumentError
from assistant_axis.layers import resolve_layers
from assistant_axis.models import block_hidden, check_layers, find_blocks, hidden_size

__all__ = ["resolve_layers", "token_budget_batches", "mean_activations", "token_projections"]


class _StopForward(Exception):
    """Raised from the last requested block's hook to skip the rest of the model."""


def token_budget_batches(lengths: Sequence[int], batch_tokens: int) -> list[list[int]]:
    """Indices sorted longest first, grouped so that rows x longest row stays within `batch_tokens`."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for i in order:
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= batch_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def _forward_batches(
    model,
    sequences: Sequence[Sequence[int]],
    layers: Sequence[int],
    batch_tokens: int,
    blocks_path: str | None,
    progress: bool,
    desc: str,
    begin,
    on_output,
    end,
    before_hooks: bool = False,
) -> None:
    """Run every sequence through the model up to the last of `layers`, batched by `token_budget_batches`.

    Per batch (`rows`: the sequences' indices, longest first): `begin(rows, width, device)`, then the forward
    pass, where block `layers[slot]`'s output [rows, width, hidden] goes to `on_output(slot, h)`, then
    `end(rows)`. Hooks are removed on the way out, also on error. `before_hooks` reads each block's output
    before the forward hooks already on it (an intervention's input, not its result).
    """
    blocks = find_blocks(model, blocks_path)
    layers = list(layers)
    if not layers:
        raise ArgumentError("mean_activations", "layers", "no layers to read")
    check_layers(layers, len(blocks), "mean_activations", "layers")
    device = next(model.parameters()).device

    def hook_for(slot: int, last: bool):
        def hook(_module, _args, output):
            on_output(slot, block_hidden(output))
            if last:
                raise _StopForward

        return hook

    last_layer = max(layers)
    handles = [
        blocks[layer].register_forward_hook(hook_for(slot, layer == last_layer), prepend=before_hooks)
        for slot, layer in enumerate(layers)
    ]
    try:
        batches = token_budget_batches([len(s) for s in sequences], batch_tokens)
        with torch.inference_mode():
            for rows in tqdm(batches, desc=desc, unit="batch", disable=not progress):
                width = max(len(sequences[i]) for i in rows)
                # Right padding and no attention mask: under causal attention a real token never sees
                # the pads after it, so its activations are exact, and attention takes the fast
                # is_causal path instead of building and applying a [B, 1, T, T] mask.
                ids = torch.zeros((len(rows), width), dtype=torch.long)
                for r, i in enumerate(rows):
                    ids[r, : len(sequences[i])] = torch.as_tensor(sequences[i])
                begin(rows, width, device)
                try:
                    model(input_ids=ids.to(device), use_cache=False)
                except _StopForward:
                    pass
                end(rows)
    finally:
        for handle in handles:
            handle.remove()


def mean_activations(
    model,
    sequences: Sequence[Sequence[int]],
    spans: Sequence[tuple[int, int]],
    layers: Sequence[int],
    batch_tokens: int = 8192,
    blocks_path: str | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """Float32 tensor [n_sequences, n_layers, hidden]: each layer's output averaged over span [start, end).

    An empty span gives a row of NaN (there is nothing to average), which later stages skip.
    """
    layers = list(layers)
    hidden = hidden_size(model)
    result = torch.full((len(sequences), len(layers), hidden), float("nan"), dtype=torch.float32)
    state: dict[str, torch.Tensor] = {}

    def begin(rows, width, device):
        weights = torch.zeros((len(rows), width), dtype=torch.float32)
        for r, i in enumerate(rows):
            start, end = spans[i]
            if end > start:
                weights[r, start:end] = 1.0 / (end - start)
        state["weights"] = weights.to(device)
        state["out"] = torch.zeros((len(rows), len(layers), hidden), dtype=torch.float32, device=device)

    def on_output(slot, h):
        # Masked sum as one batched matmul: [B, 1, T] @ [B, T, H] -> [B, H].
        weights = state["weights"]
        if weights.device != h.device:  # a model split over several GPUs
            weights = weights.to(h.device)
        sums = torch.bmm(weights.unsqueeze(1), h.float()).squeeze(1)
        state["out"][:, slot] = sums.to(state["out"].device)

    def end(rows):
        out = state["out"].cpu()
        for r, i in enumerate(rows):
            if spans[i][1] > spans[i][0]:
                result[i] = out[r]

    try:
        _forward_batches(
            model, sequences, layers, batch_tokens, blocks_path, progress, "activations", begin, on_output, end
        )
    finally:
        state.clear()
    return result


def token_projections(
    model,
    sequences: Sequence[Sequence[int]],
    spans: Sequence[tuple[int, int]],
    layers: Sequence[int],
    units: torch.Tensor,
    batch_tokens: int = 8192,
    blocks_path: str | None = None,
    progress: bool = True,
    before_hooks: bool = False,
) -> torch.Tensor:
    """Float32 tensor [total span tokens, n_layers]: every span token's layer output projected on `units[slot]`.

    `units` is [n_layers, hidden] (one direction per entry of `layers`, used as given: pass unit vectors for
    projections). Rows are the tokens of span 0 in order, then span 1's, ...; an empty span adds none.
    Projections are float32 dot products of the float32 residual stream, as `mean_activations` averages it.
    `before_hooks`: each block's output as it was before the interventions installed on it (see `_forward_batches`).
    """
    layers = list(layers)
    hidden = hidden_size(model)
    if units.shape != (len(layers), hidden):
        raise ValueError(f"units of shape {tuple(units.shape)} for {len(layers)} layers of hidden size {hidden}")
    units = units.float()
    lengths = [max(end - start, 0) for start, end in spans]
    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + n)
    result = torch.empty((offsets[-1], len(layers)), dtype=torch.float32)
    state: dict[str, torch.Tensor] = {}
    on_device: dict[torch.device, torch.Tensor] = {}

    def begin(rows, width, device):
        state["out"] = torch.zeros((len(rows), len(layers), width), dtype=torch.float32, device=device)

    def on_output(slot, h):
        if h.device not in on_device:  # a model split over several GPUs: the units on each block's device
            on_device[h.device] = units.to(h.device)
        projected = torch.matmul(h.float(), on_device[h.device][slot])  # [B, T, H] @ [H] -> [B, T]
        state["out"][:, slot] = projected.to(state["out"].device)

    def end(rows):
        out = state["out"].cpu()
        for r, i in enumerate(rows):
            start, stop = spans[i]
            if stop > start:
                result[offsets[i] : offsets[i + 1]] = out[r, :, start:stop].T

    try:
        _forward_batches(
            model,
            sequences,
            layers,
            batch_tokens,
            blocks_path,
            progress,
            "projections",
            begin,
            on_output,
            end,
            before_hooks,
        )
    finally:
        state.clear()
        on_device.clear()
    return result
