"""Capping calibration: per-token projections against an independent reference, and the calibrate stage's
thresholds on every default reply token (`capping.calibration: token`) or on reply means (`reply`)."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from assistant_axis import stages
from assistant_axis.activations import mean_activations, token_projections
from assistant_axis.axis import load_axis
from assistant_axis.cap import CALIBRATION_PERCENTILES, layer_range, percentile_thresholds, read_capping
from assistant_axis.errors import InputError
from assistant_axis.models import find_blocks
from assistant_axis.templates import ChatTemplate

MODEL = "smollm2-135m-instruct"
N_LAYERS = 30
# Replies of different lengths, so that batches are right padded to different widths.
CASES = [
    ("You are a lighthouse keeper.", "What keeps you going?", "The lamp, and the gulls that wait for it each dusk."),
    ("", "Describe yourself.", "I am an AI assistant."),
    (
        "You are a storm.",
        "What do you want?",
        "To break the shore and then be calm again, over and over, forever, until the sea itself forgets my name.",
    ),
]


def _block_outputs(model, ids: list[int]) -> list[torch.Tensor]:
    """Every block's output [tokens, hidden] for one unpadded sequence, by plain forward hooks on a full pass."""
    blocks, store = find_blocks(model), {}

    def keep(layer):
        def hook(_module, _args, output):
            store[layer] = (output[0] if isinstance(output, tuple) else output)[0].float()

        return hook

    handles = [block.register_forward_hook(keep(i)) for i, block in enumerate(blocks)]
    try:
        with torch.inference_mode():
            model(torch.tensor([ids]))
    finally:
        for handle in handles:
            handle.remove()
    return [store[i] for i in range(len(blocks))]


@pytest.fixture(scope="module")
def rendered(bundled):
    _, tokenizer = bundled
    template = ChatTemplate(tokenizer)
    seqs, spans = [], []
    for system, question, reply in CASES:
        ids, start, end = template.reply_span(template.conversation(system, question), reply)
        seqs.append(ids)
        spans.append((start, end))
    assert len({end - start for start, end in spans}) == len(CASES)
    return seqs, spans


@pytest.fixture(scope="module")
def units() -> torch.Tensor:
    directions = torch.randn(N_LAYERS, 576, generator=torch.Generator().manual_seed(0))
    return directions / directions.norm(dim=-1, keepdim=True)


def test_token_projections_equal_the_hidden_states_reference(bundled, rendered, units):
    model, _ = bundled
    seqs, spans = rendered
    layers = list(range(N_LAYERS))
    # A budget of one longest sequence per batch and then two: padded batches, rows out of input order.
    got = token_projections(model, seqs, spans, layers, units, batch_tokens=2 * len(seqs[1]), progress=False)
    assert got.dtype == torch.float32 and got.shape == (sum(e - s for s, e in spans), N_LAYERS)
    offset = 0
    for ids, (start, end) in zip(seqs, spans, strict=True):
        with torch.inference_mode():
            hidden = model(torch.tensor([ids]), output_hidden_states=True).hidden_states
        rows = got[offset : offset + end - start]
        offset += end - start
        # hidden_states[layer + 1] is block `layer`'s output, except the last, which is after the final norm.
        for layer in layers[:-1]:
            ref = hidden[layer + 1][0, start:end].float() @ units[layer]
            torch.testing.assert_close(rows[:, layer], ref, rtol=1e-4, atol=1e-4)
        last = _block_outputs(model, ids)[-1][start:end] @ units[-1]  # the raw residual, by hook
        torch.testing.assert_close(rows[:, -1], last, rtol=1e-4, atol=1e-4)
    # Asking for some layers gives those columns (the forward stops early; the numbers are the same).
    some = token_projections(model, seqs, spans, [3, 17], units[[3, 17]], progress=False)
    torch.testing.assert_close(some, got[:, [3, 17]], rtol=1e-5, atol=1e-5)


def test_mean_of_a_replys_token_projections_is_the_projection_of_its_mean(bundled, rendered, units):
    model, _ = bundled
    seqs, spans = rendered
    layers = [0, 9, 21, 29]
    # An empty span (the third sequence's, emptied) adds no rows, as it adds no mean.
    spans = [*spans[:2], (spans[2][0], spans[2][0])]
    tokens = token_projections(model, seqs, spans, layers, units[layers], batch_tokens=256, progress=False)
    means = mean_activations(model, seqs, spans, layers, batch_tokens=256, progress=False)
    assert len(tokens) == sum(e - s for s, e in spans) and torch.isnan(means[2]).all()
    offset = 0
    for i, (start, end) in enumerate(spans[:2]):
        per_token = tokens[offset : offset + end - start].mean(0)
        offset += end - start
        torch.testing.assert_close(per_token, torch.einsum("lh,lh->l", means[i], units[layers]), rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------ the stage


@pytest.fixture(scope="module")
def results(tiny_run):
    return tiny_run / f"results/{MODEL}"


def _calibrate(results, folder, calibration: str, **settings):
    folder.mkdir(parents=True, exist_ok=True)
    configs = {"late-p25": str(folder / "late-p25.safetensors"), "late-p10": str(folder / "late-p10.safetensors")}
    stages.calibrate(
        str(results / "activations/default.safetensors"),
        str(results / "axis.safetensors"),
        str(results / "model.json"),
        {"late": [0.70, 0.85]},
        [25, 10],
        str(folder / "percentiles.parquet"),
        configs,
        str(folder / "thresholds.png"),
        calibration=calibration,
        responses=str(results / "responses/default.parquet"),
        compute_dtype="float32",
        batch_tokens=1024,
        **settings,
    )
    return pd.read_parquet(folder / "percentiles.parquet"), {name: read_capping(path) for name, path in configs.items()}


@pytest.fixture(scope="module")
def calibrated(results, tmp_path_factory):
    folder = tmp_path_factory.mktemp("calibration")
    return {unit: _calibrate(results, folder / unit, unit) for unit in ("token", "reply")}


@pytest.fixture(scope="module")
def reference(results, bundled):
    """The axis's unit rows, and the default replies' token projections computed one reply at a time."""
    model, tokenizer = bundled
    axis, layers, _ = load_axis(results / "axis.safetensors")
    assert layers == list(range(N_LAYERS))
    units = axis[layers].float() / axis[layers].float().norm(dim=-1, keepdim=True)
    template = ChatTemplate(tokenizer)
    frame = pd.read_parquet(results / "responses/default.parquet")
    reasoning = frame["reasoning"].fillna("") if "reasoning" in frame else [""] * len(frame)
    rows = []
    for row, thought in zip(frame.itertuples(index=False), reasoning, strict=True):
        messages = template.conversation(row.system_prompt, row.question)
        ids, start, end = template.reply_span(messages, row.response.strip(), thought)
        outputs = _block_outputs(model, ids)
        rows.append(torch.stack([outputs[layer][start:end] @ units[layer] for layer in layers], dim=1))
    return units, torch.cat(rows), len(frame)


def test_token_calibration_thresholds_are_quantiles_of_every_reply_token(calibrated, reference):
    units, tokens, _ = reference
    table, configs = calibrated["token"]
    wanted = sorted({*CALIBRATION_PERCENTILES, 25, 10})
    quantiles = torch.quantile(tokens.double(), torch.tensor([q / 100 for q in wanted], dtype=torch.float64), dim=0)
    assert table["layer"].tolist() == list(range(N_LAYERS))
    assert (table["calibration"] == "token").all() and (table["n"] == len(tokens)).all()
    for k, q in enumerate(wanted):
        torch.testing.assert_close(
            torch.tensor(table[f"p{q:g}"].to_numpy()), quantiles[k].float(), rtol=1e-4, atol=1e-4
        )
    torch.testing.assert_close(torch.tensor(table["mean"].to_numpy()), tokens.mean(0), rtol=1e-4, atol=1e-4)
    chosen = layer_range([0.70, 0.85], N_LAYERS)
    for name, q in (("late-p25", 25), ("late-p10", 10)):
        config = configs[name]
        assert config.layers == chosen and config.metadata["calibration"] == "token"
        torch.testing.assert_close(config.thresholds, quantiles[wanted.index(q), chosen].float(), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(config.vectors, units[chosen])


def test_reply_calibration_is_the_reply_means_and_differs_from_token(calibrated, reference, results):
    units, _, n_replies = reference
    token_table, token_configs = calibrated["token"]
    table, configs = calibrated["reply"]
    # What calibrate computed before `capping.calibration`: the reply means' projections.
    means = load_file(results / "activations/default.safetensors")["activations"].float()
    projections = torch.einsum("nlh,lh->nl", means, units)
    wanted = sorted({*CALIBRATION_PERCENTILES, 25, 10})
    values = percentile_thresholds(projections, wanted)
    assert (table["calibration"] == "reply").all() and (table["n"] == n_replies).all()
    for k, q in enumerate(wanted):
        assert torch.equal(torch.tensor(table[f"p{q:g}"].to_numpy()), values[k])
    chosen = layer_range([0.70, 0.85], N_LAYERS)
    for name, q in (("late-p25", 25), ("late-p10", 10)):
        assert configs[name].metadata["calibration"] == "reply"
        assert torch.equal(configs[name].thresholds, values[wanted.index(q), chosen])
        # Many token projections against a few reply means: other numbers.
        assert not torch.allclose(configs[name].thresholds, token_configs[name].thresholds, rtol=1e-3, atol=1e-3)
    assert not torch.allclose(
        torch.tensor(table["p25"].to_numpy()), torch.tensor(token_table["p25"].to_numpy()), rtol=1e-3, atol=1e-3
    )


def test_calibrate_refuses_an_unknown_unit_and_another_rendering(results, tmp_path):
    with pytest.raises(InputError, match=r"capping\.calibration: expected 'token' or 'reply', got 'layer'"):
        _calibrate(results, tmp_path / "unit", "layer")
    with pytest.raises(InputError, match=r"axis\.safetensors: chat_template_kwargs: the axis was rendered with"):
        _calibrate(results, tmp_path / "options", "token", template_options={"enable_thinking": False})
    assert not (tmp_path / "options/percentiles.parquet").exists()
