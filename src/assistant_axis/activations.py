"""Mean post-block residual-stream activations over each reply's tokens, at chosen layers.

Layer i is the output of decoder block i (the raw residual stream, before any final norm). Forward
hooks reduce each block's output to per-reply means straight into a preallocated buffer, and the
forward pass is cut off after the last requested block, so neither later blocks nor the LM head run.

>>> ids, start, end = ChatTemplate(tokenizer).reply_span(messages, reply)
>>> acts = mean_activations(model, [ids], [(start, end)], layers=[10, 20])  # [1, 2, hidden]
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from assistant_axis.errors import InputError
from assistant_axis.models import find_blocks

__all__ = ["resolve_layers", "token_budget_batches", "mean_activations"]


class _StopForward(Exception):
    """Raised from the last requested block's hook to skip the rest of the model."""


def resolve_layers(layers: str | Sequence[int], n_layers: int) -> list[int]:
    """`"all"` or a list of block indices (negative counts from the end), checked against the model."""
    if layers == "all":
        return list(range(n_layers))
    if isinstance(layers, str):
        raise InputError("config", "activations.layers", f"expected 'all' or a list of integers, got {layers!r}")
    resolved = []
    for layer in layers:
        index = layer + n_layers if layer < 0 else layer
        if not 0 <= index < n_layers:
            raise InputError("config", "activations.layers", f"layer {layer} is outside the model's {n_layers} layers")
        resolved.append(index)
    if len(set(resolved)) != len(resolved):
        raise InputError("config", "activations.layers", f"repeated layer in {list(layers)}")
    return sorted(resolved)


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
    blocks = find_blocks(model, blocks_path)
    layers = list(layers)
    if not layers or min(layers) < 0 or max(layers) >= len(blocks):
        raise InputError("config", "activations.layers", f"layers {layers} outside the model's {len(blocks)} blocks")
    hidden = model.config.get_text_config().hidden_size
    device = next(model.parameters()).device
    result = torch.full((len(sequences), len(layers), hidden), float("nan"), dtype=torch.float32)
    state: dict[str, torch.Tensor] = {}

    def hook_for(slot: int, last: bool):
        def hook(_module, _args, output):
            h = output[0] if isinstance(output, tuple) else output
            # Masked sum as one batched matmul: [B, 1, T] @ [B, T, H] -> [B, H].
            weights = state["weights"]
            if weights.device != h.device:  # a model split over several GPUs
                weights = weights.to(h.device)
            sums = torch.bmm(weights.unsqueeze(1), h.float()).squeeze(1)
            state["out"][:, slot] = sums.to(state["out"].device)
            if last:
                raise _StopForward

        return hook

    last_layer = max(layers)
    handles = [blocks[layer].register_forward_hook(hook_for(slot, layer == last_layer))
               for slot, layer in enumerate(layers)]
    try:
        batches = token_budget_batches([len(s) for s in sequences], batch_tokens)
        with torch.inference_mode():
            for rows in tqdm(batches, desc="activations", unit="batch", disable=not progress):
                width = max(len(sequences[i]) for i in rows)
                # Right padding and no attention mask: under causal attention a real token never sees
                # the pads after it, so its activations are exact, and attention takes the fast
                # is_causal path instead of building and applying a [B, 1, T, T] mask.
                ids = torch.zeros((len(rows), width), dtype=torch.long)
                weights = torch.zeros((len(rows), width), dtype=torch.float32)
                for r, i in enumerate(rows):
                    start, end = spans[i]
                    ids[r, : len(sequences[i])] = torch.as_tensor(sequences[i])
                    if end > start:
                        weights[r, start:end] = 1.0 / (end - start)
                state["weights"] = weights.to(device)
                state["out"] = torch.zeros((len(rows), len(layers), hidden), dtype=torch.float32, device=device)
                try:
                    model(input_ids=ids.to(device), use_cache=False)
                except _StopForward:
                    pass
                out = state["out"].cpu()
                for r, i in enumerate(rows):
                    if spans[i][1] > spans[i][0]:
                        result[i] = out[r]
    finally:
        for handle in handles:
            handle.remove()
        state.clear()
    return result
