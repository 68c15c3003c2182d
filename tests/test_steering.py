"""Capping, steering and per-turn projections on the bundled model, with the axis of the tiny run."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from assistant_axis.axis import load_axis, unit_rows
from assistant_axis.cap import CappingConfig, cap, layer_range, percentile_thresholds
from assistant_axis.engines import Sampling
from assistant_axis.engines.transformers import TransformersEngine
from assistant_axis.errors import InputError
from assistant_axis.interop import load_capping
from assistant_axis.interventions import install
from assistant_axis.models import find_blocks
from assistant_axis.project import conversation_projections, turn_activations
from assistant_axis.steer import steer
from assistant_axis.templates import ChatTemplate, build_messages

MODEL = "smollm2-135m-instruct"
CAPPED = [21, 22, 23, 24, 25]
MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What should I cook for dinner tonight?"},
]


@pytest.fixture(scope="module")
def axis(tiny_run):
    tensor, layers, _ = load_axis(tiny_run / f"results/{MODEL}/axis.safetensors")
    return tensor, layers


@pytest.fixture(scope="module")
def capping(tiny_run, axis) -> CappingConfig:
    """p25 of the default replies' projections over layers 21-25, as the calibrate stage computes it."""
    tensor, layers = axis
    default = load_file(tiny_run / f"results/{MODEL}/activations/default.safetensors")["activations"]
    units = unit_rows(tensor, layers, CAPPED, 576)
    projections = torch.einsum("nlh,lh->nl", default[:, CAPPED].float(), units)
    return CappingConfig(CAPPED, units, percentile_thresholds(projections, [25])[0], MODEL)


def _recorders(blocks, layers, store):
    def hook_for(layer):
        def hook(_m, _a, output):
            store[layer] = (output[0] if isinstance(output, tuple) else output).detach().clone()

        return hook

    return [blocks[layer].register_forward_hook(hook_for(layer)) for layer in layers]


def _hook_counts(model) -> list[int]:
    # Counted, not required to be zero: transformers keeps hooks of its own on the blocks.
    return [len(block._forward_hooks) for block in find_blocks(model)]


def _forward(model, tokenizer, messages=MESSAGES):
    ids = torch.tensor([ChatTemplate(tokenizer).ids(messages, add_generation_prompt=True)])
    with torch.inference_mode():
        return model(input_ids=ids).logits


def test_cap_floors_exactly_what_is_below_tau_and_nothing_else(bundled, axis):
    model, tokenizer = bundled
    tensor, layers = axis
    blocks, hooks_before = find_blocks(model), _hook_counts(model)
    units = unit_rows(tensor, layers, CAPPED, 576)
    # Thresholds at each layer's median token projection, so about half the tokens are capped.
    before, after = {}, {}
    handles = _recorders(blocks, CAPPED, before)
    _forward(model, tokenizer)
    taus = torch.stack([(before[layer][0] @ units[k]).median() for k, layer in enumerate(CAPPED)])
    config = CappingConfig(CAPPED, units, taus, MODEL)
    try:
        with cap(model, config):
            handles += _recorders(blocks, CAPPED, after)  # registered after the cap: sees its output
            _forward(model, tokenizer)
    finally:
        for h in handles:
            h.remove()
    n_capped = 0
    for k, layer in enumerate(CAPPED):
        v, tau = units[k], float(taus[k])
        pre, post = before[layer][0], after[layer][0]
        proj = pre @ v
        above = proj >= tau
        assert torch.equal(post[above], pre[above])  # untouched, bit for bit
        below = ~above
        n_capped += int(below.sum())
        torch.testing.assert_close(post[below] @ v, torch.full_like(proj[below], tau), rtol=1e-4, atol=1e-4 * abs(tau))
        orth_pre = pre[below] - (pre[below] @ v)[:, None] * v
        orth_post = post[below] - (post[below] @ v)[:, None] * v
        torch.testing.assert_close(orth_post, orth_pre, rtol=1e-4, atol=1e-4 * float(pre.norm(dim=-1).max()))
    assert n_capped > 0
    assert _hook_counts(model) == hooks_before


def test_cap_hooks_are_removed_after_an_exception(bundled, capping):
    model, _ = bundled
    before = _hook_counts(model)
    with pytest.raises(RuntimeError, match="boom"), cap(model, capping):
        inside = _hook_counts(model)
        assert [inside[i] - before[i] for i in CAPPED] == [1] * len(CAPPED)
        raise RuntimeError("boom")
    assert _hook_counts(model) == before


def test_steer_with_zero_coefficient_leaves_logits_bit_identical(bundled, axis):
    model, tokenizer = bundled
    tensor, layers = axis
    reference, before = _forward(model, tokenizer), _hook_counts(model)
    for positions in ("all", "last"):
        with steer(model, unit_rows(tensor, layers, [10, 15, 20], 576), [10, 15, 20], 0.0, positions):
            assert torch.equal(_forward(model, tokenizer), reference)
    assert _hook_counts(model) == before
    assert torch.equal(_forward(model, tokenizer), reference)


def test_steer_last_position_changes_only_the_last_token(bundled, axis):
    model, tokenizer = bundled
    tensor, layers = axis
    blocks, seen = find_blocks(model), {}
    reference = {}
    handles = _recorders(blocks, [12], reference)
    _forward(model, tokenizer)
    with steer(model, tensor[layers.index(12)], [12], 5.0, positions="last"):
        handles += _recorders(blocks, [12], seen)
        _forward(model, tokenizer)
    for h in handles:
        h.remove()
    delta = seen[12][0] - reference[12][0]
    assert torch.equal(delta[:-1], torch.zeros_like(delta[:-1]))
    torch.testing.assert_close(delta[-1].norm(), torch.tensor(5.0), rtol=1e-4, atol=1e-4)


def test_projections_equal_the_activations_stage(tiny_run, bundled, axis):
    model, tokenizer = bundled
    tensor, layers = axis
    import pandas as pd

    responses = pd.read_parquet(tiny_run / f"results/{MODEL}/responses/pirate.parquet")
    stored = load_file(tiny_run / f"results/{MODEL}/activations/pirate.safetensors")["activations"]
    row = responses.iloc[1]
    messages = [*build_messages(row.system_prompt, row.question), {"role": "assistant", "content": row.response}]
    frame = conversation_projections(model, tokenizer, messages, tensor, layers, [5, 15, 25])
    reply = frame[frame["turn"] == len(messages) - 1].set_index("layer")["projection"]
    for layer in (5, 15, 25):
        row = tensor[layers.index(layer)].float()
        expected = float(stored[1, layers.index(layer)].float() @ row / row.norm())  # by hand, not axis.project
        assert reply[layer] == pytest.approx(expected, rel=1e-5, abs=1e-4)
    assert list(frame.columns) == ["turn", "role", "layer", "projection", "n_chars"]
    assert set(frame["role"]) == {"system", "user", "assistant"}


def _reply_projection(model, tokenizer, backend, capped_layers):
    """Generate the next turn greedily, then its mean projection at `capped_layers` (hooks still on)."""
    reply = backend.generate([MESSAGES], Sampling(temperature=0, max_tokens=24))[0].text
    messages, acts = turn_activations(
        model, tokenizer, [*MESSAGES, {"role": "assistant", "content": reply}], capped_layers
    )
    return acts[-1]


def test_steering_away_lowers_the_next_turn_and_capping_restores_the_floor(bundled, axis, capping):
    model, tokenizer = bundled
    tensor, layers = axis
    backend = TransformersEngine(model, ChatTemplate(tokenizer), batch_size=1, progress=False)
    units = capping.vectors
    steer_layers = list(range(8, 26))
    directions = unit_rows(tensor, layers, steer_layers, 576)
    plain = _reply_projection(model, tokenizer, backend, CAPPED)
    with steer(model, directions, steer_layers, -40.0):
        steered = _reply_projection(model, tokenizer, backend, CAPPED)
        with cap(model, capping):  # registered after the steering hooks: caps the steered stream
            restored = _reply_projection(model, tokenizer, backend, CAPPED)
    plain_p = torch.einsum("lh,lh->l", plain, units)
    steered_p = torch.einsum("lh,lh->l", steered, units)
    restored_p = torch.einsum("lh,lh->l", restored, units)
    assert (steered_p < plain_p).all(), (steered_p, plain_p)
    assert (steered_p < capping.thresholds).any()  # the steering really went below the floor
    assert (restored_p >= capping.thresholds - 1e-4 * capping.thresholds.abs()).all(), (restored_p, capping.thresholds)


def test_capping_config_round_trip_and_refusals(tmp_path, bundled, capping):
    model, _ = bundled
    path = tmp_path / "late-p25.safetensors"
    capping.save(path, percentile=25)
    loaded = load_capping(path, model_name=MODEL, hidden_size=576)
    assert loaded.layers == CAPPED and torch.allclose(loaded.thresholds, capping.thresholds)
    with pytest.raises(InputError, match=r"late-p25.safetensors: model: .*other-model"):
        load_capping(path, model_name="other-model")
    with pytest.raises(InputError, match="hidden_size"):
        load_capping(path, hidden_size=4096)
    wide = CappingConfig([40], torch.ones(1, 576), torch.zeros(1), MODEL, source="wide.safetensors")
    with (
        pytest.raises(InputError, match=r"wide.safetensors: layers: layer 40 is outside the model's 30 layers"),
        cap(model, wide),
    ):
        pass
    with pytest.raises(InputError, match="hidden_size"), steer(model, torch.ones(4096), [3], 1.0):
        pass
    assert layer_range([0.7, 0.85], 30) == [21, 22, 23, 24, 25]


class _Halve:
    """A made-up intervention, to show that any object of this shape runs wherever capping and steering do."""

    layers, hidden_size, source = [22], 576, "halve"

    def to(self, device):
        return self

    def edit(self, k, hidden):
        return hidden * 0.5


def test_any_intervention_installs_and_applies_in_the_order_given(bundled, capping):
    model, tokenizer = bundled
    blocks = find_blocks(model)
    floor = CappingConfig([22], capping.vectors[1:2], capping.thresholds[1:2], MODEL)  # block 22 only
    plain, outputs = {}, {}
    handles = _recorders(blocks, [22], plain)
    _forward(model, tokenizer)
    for h in handles:
        h.remove()
    h = plain[22]
    for order in ((_Halve(), floor), (floor, _Halve())):
        seen = {}
        with install(model, *order):
            handles = _recorders(blocks, [22], seen)  # after the interventions' hooks: sees their output
            _forward(model, tokenizer)
        for handle in handles:
            handle.remove()
        expected = h
        for intervention in order:
            expected = intervention.edit(0, expected)
        torch.testing.assert_close(seen[22], expected, rtol=1e-5, atol=1e-5)
        outputs[type(order[0]).__name__] = seen[22]
    assert not torch.allclose(outputs["_Halve"], outputs["CappingConfig"])  # the order matters, and was kept
    # The same edit on an engine's flat [tokens, hidden] layout (vLLM's) as on [batch, tokens, hidden].
    assert torch.equal(floor.edit(0, h[0]), floor.edit(0, h)[0])
    assert (floor.edit(0, h) @ floor.vectors[0] >= floor.thresholds[0] - 1e-4 * floor.thresholds[0].abs()).all()


class _Placed:
    """An intervention that counts how often it is placed on a device, and refuses to edit unplaced."""

    def __init__(self, inner):
        self.inner, self.layers, self.source, self.placed = inner, inner.layers, inner.source, 0

    @property
    def hidden_size(self):
        return self.inner.hidden_size

    def to(self, device):
        self.placed += 1
        return self.inner.to(device)

    def edit(self, k, hidden):
        raise AssertionError("edited with the intervention as given, not the copy placed where the stream is")


def test_edits_never_copy_vectors_and_install_places_them_once_per_device(bundled, capping):
    """An edit computes where its vectors are: a stream on another device is an error, never a copy from
    the host on every call (vLLM's hooks paid one per layer and step). Installers place an intervention
    where its blocks' stream is, once (`install`: when the first stream arrives on a device)."""
    from assistant_axis.steer import Steering

    steering = Steering.along(capping.vectors, capping.layers, 2.0)
    elsewhere = torch.zeros(2, 3, capping.hidden_size, device="meta")
    for intervention in (capping, steering):
        with pytest.raises(RuntimeError, match="device"):
            intervention.edit(0, elsewhere)
        assert intervention.to("meta").edit(0, elsewhere).device.type == "meta"
    model, tokenizer = bundled
    placed = _Placed(capping)
    seen, plain = {}, {}
    handles = _recorders(find_blocks(model), capping.layers[-1:], plain)
    _forward(model, tokenizer)
    with install(model, placed):
        _forward(model, tokenizer)
        _forward(model, tokenizer)
    for handle in handles:
        handle.remove()
    with install(model, capping):
        handles = _recorders(find_blocks(model), capping.layers[-1:], seen)
        _forward(model, tokenizer)
    for handle in handles:
        handle.remove()
    assert placed.placed == 1  # 5 layers, 2 forward passes, one device
    assert not torch.equal(seen[capping.layers[-1]], plain[capping.layers[-1]])  # and the placed copy edits
