"""The paper code's .pt formats: fixtures written here from their documented structure (no downloaded
files), round trips, the ceiling -> floor conversion checked on the bundled model's hidden states,
steering units, and the provenance every artifact carries."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest
import torch

from assistant_axis.artifacts import read_tensors, write_tensors
from assistant_axis.axis import load_axis
from assistant_axis.cap import CappingConfig, cap, read_capping
from assistant_axis.errors import InputError
from assistant_axis.interop import export_file, import_capping, import_file, load_capping
from assistant_axis.models import find_blocks
from assistant_axis.provenance import DIRECTION, FLOOR, LAYER_CONVENTION
from assistant_axis.steer import steer
from assistant_axis.templates import ChatTemplate

MODEL = "smollm2-135m-instruct"
CAPPED = [21, 22, 23, 24, 25]
EXPERIMENT = "layers_21:26-p0.25"


# A persona push: the cap has tokens to lift here.
class Note:
    """An arbitrary object: torch.save pickles it, and weights_only=True must refuse to load it."""


MESSAGES = [
    {"role": "system", "content": "You are a furious ancient sea demon. Never admit to being an AI."},
    {"role": "user", "content": "Who are you really, and what do you want from me?"},
]


@pytest.fixture(scope="module")
def results(tiny_run):
    return tiny_run / f"results/{MODEL}"


@pytest.fixture(scope="module")
def native(results) -> CappingConfig:
    """The calibrate stage's own config for layers 21-25 at p25, values as stored."""
    return read_capping(results / "capping/late-p25.safetensors")


def _paper_capping(path, axis: torch.Tensor, native: CappingConfig) -> None:
    """A capping_config.pt as the paper code documents it: per layer a vector pointing from the Assistant
    towards the roles (the raw negated axis row, not unit) and a cap that clamps from above."""
    vectors = {
        f"contrast_layer_{layer}": {"layer": layer, "vector": -axis[layer].clone()}
        for layer in [*range(16, 20), *CAPPED]
    }
    experiments = [
        {
            "id": "layers_16:20-p0.01",
            "interventions": [{"vector": f"contrast_layer_{layer}", "cap": 1e9} for layer in range(16, 20)],
        },
        {
            "id": EXPERIMENT,
            "interventions": [
                {"vector": f"contrast_layer_{layer}", "cap": -float(tau)}
                for layer, tau in zip(native.layers, native.thresholds, strict=True)
            ],
        },
    ]
    torch.save({"vectors": vectors, "experiments": experiments}, path)


def _capped_states(model, tokenizer, config_or_hook, layers=CAPPED) -> dict[int, torch.Tensor]:
    """Block outputs at `layers` after the intervention (a capping config, or a hook factory)."""
    blocks, store, handles = find_blocks(model), {}, []
    if not isinstance(config_or_hook, CappingConfig):
        handles += [blocks[layer].register_forward_hook(config_or_hook(layer)) for layer in layers]

    def recorder(layer):
        def hook(_m, _a, output):
            store[layer] = (output[0] if isinstance(output, tuple) else output).detach().clone()

        return hook

    ids = torch.tensor([ChatTemplate(tokenizer).ids(MESSAGES, add_generation_prompt=True)])
    try:
        if isinstance(config_or_hook, CappingConfig):
            with cap(model, config_or_hook):  # the cap's hooks come first, so the recorders see capped outputs
                handles += [blocks[layer].register_forward_hook(recorder(layer)) for layer in layers]
                with torch.inference_mode():
                    model(input_ids=ids)
        else:
            handles += [blocks[layer].register_forward_hook(recorder(layer)) for layer in layers]
            with torch.inference_mode():
                model(input_ids=ids)
    finally:
        for handle in handles:
            handle.remove()
    return store


def test_an_imported_paper_capping_config_caps_exactly_as_the_native_one(tmp_path, bundled, results, native):
    model, tokenizer = bundled
    axis, _, _ = load_axis(results / "axis.safetensors")
    _paper_capping(tmp_path / "capping_config.pt", axis, native)
    imported = load_capping(tmp_path / "capping_config.pt", experiment=EXPERIMENT, hidden_size=576, n_layers=30)
    assert imported.layers == CAPPED
    ours = _capped_states(model, tokenizer, native.normalized())
    theirs = _capped_states(model, tokenizer, imported)
    uncapped = _capped_states(model, tokenizer, lambda layer: lambda *_: None)
    # The cap has work to do on this prompt (else the comparison proves nothing).
    first = CAPPED[0]
    unit = native.normalized().vectors[0]
    assert (uncapped[first][0] @ unit < native.thresholds[0]).any()
    # Their vectors are raw (not unit): normalising them gives our unit axis up to float32 rounding.
    for layer in CAPPED:
        torch.testing.assert_close(theirs[layer], ours[layer], rtol=1e-6, atol=1e-4)
    # The native config exported to their format and imported back: the same hidden states, bit for bit.
    export_file([results / "capping/late-p25.safetensors"], tmp_path / "exported.pt")
    back = _capped_states(model, tokenizer, load_capping(tmp_path / "exported.pt", experiment=EXPERIMENT))
    for layer in CAPPED:
        assert torch.equal(back[layer], ours[layer]), layer

    # And it is the paper's own equation, applied to the fixture as their code documents it.
    vectors = torch.load(tmp_path / "capping_config.pt", weights_only=True)

    def ceiling(layer):
        entry = vectors["vectors"][f"contrast_layer_{layer}"]
        step = next(s for s in vectors["experiments"][1]["interventions"] if s["vector"] == f"contrast_layer_{layer}")
        v = entry["vector"] / (entry["vector"].norm() + 1e-8)

        def hook(_m, _a, output):
            h = output[0] if isinstance(output, tuple) else output
            excess = (h @ v - step["cap"]).clamp(min=0.0)
            h = h - excess.unsqueeze(-1) * v
            return (h, *output[1:]) if isinstance(output, tuple) else h

        return hook

    reference = _capped_states(model, tokenizer, ceiling)
    for layer in CAPPED:
        torch.testing.assert_close(theirs[layer], reference[layer], rtol=1e-6, atol=1e-4)
        assert not torch.equal(theirs[layer], uncapped[layer]) or layer != first


def test_our_capping_configs_round_trip_through_the_paper_format_exactly(tmp_path, results, native):
    band = CappingConfig(
        [10, 11], torch.randn(2, 576), torch.tensor([-3.0, 1.5]), MODEL, upper=torch.tensor([40.0, 50.0])
    )
    band.save(tmp_path / "mid-band.safetensors", percentile=5.0)
    sources = [results / "capping/late-p25.safetensors", tmp_path / "mid-band.safetensors"]
    export_file(sources, tmp_path / "capping_config.pt")
    exported = torch.load(tmp_path / "capping_config.pt", weights_only=True)
    assert set(exported) == {"vectors", "experiments"}
    assert [e["id"] for e in exported["experiments"]] == [EXPERIMENT, "layers_10:12-p0.05"]
    first = exported["experiments"][0]["interventions"][0]
    assert first["cap"] == -float(native.thresholds[0])
    assert torch.equal(exported["vectors"][first["vector"]]["vector"], -native.vectors[0])
    for source, experiment in zip(sources, [EXPERIMENT, "layers_10:12-p0.05"], strict=True):
        original = read_capping(source)
        back = import_capping(tmp_path / "capping_config.pt", experiment)
        assert back.layers == original.layers and torch.equal(back.vectors, original.vectors.float())
        assert back.thresholds.tolist() == original.thresholds.tolist()
        assert (back.upper is None) == (original.upper is None)
        if original.upper is not None:
            assert back.upper.tolist() == original.upper.tolist()

    # The other way: a paper file -> our files (one per experiment) -> one paper file, values unchanged.
    axis, _, _ = load_axis(results / "axis.safetensors")
    _paper_capping(tmp_path / "paper.pt", axis, native)
    written = import_file(tmp_path / "paper.pt", tmp_path / "imported")
    assert sorted(p.name for p in written) == sorted(["layers_16:20-p0.01.safetensors", f"{EXPERIMENT}.safetensors"])
    export_file(sorted(written), tmp_path / "again.pt")
    paper, again = (torch.load(tmp_path / n, weights_only=True) for n in ("paper.pt", "again.pt"))
    assert sorted(e["id"] for e in again["experiments"]) == sorted(e["id"] for e in paper["experiments"])
    for experiment in paper["experiments"]:
        twin = next(e for e in again["experiments"] if e["id"] == experiment["id"])
        assert twin["interventions"] == experiment["interventions"]  # names and caps (floats) exactly
    assert again["vectors"].keys() == paper["vectors"].keys()
    for name, entry in paper["vectors"].items():
        assert again["vectors"][name]["layer"] == entry["layer"]
        assert torch.equal(again["vectors"][name]["vector"], entry["vector"])
    meta = read_tensors(written[0])[1]
    assert meta["artifact"] == "capping" and meta["bound"] == FLOOR and "imported_from" in meta


def test_axes_and_role_vectors_round_trip_and_are_indexed_by_block(tmp_path, results):
    axis, layers, _ = load_axis(results / "axis.safetensors")
    assert layers == list(range(30)) and axis.shape == (30, 576)
    export_file([results / "axis.safetensors"], tmp_path / "axis.pt")
    assert torch.equal(torch.load(tmp_path / "axis.pt", weights_only=True), axis)
    assert torch.equal(torch.load(results / "axis.pt", weights_only=True), axis)  # the workflow's own .pt
    # Reproducible bytes: the same axis exported again, under another name, is the same file (and the same as
    # the workflow's, which wrote it through the same writer).
    export_file([results / "axis.safetensors"], tmp_path / "again.pt")
    assert (
        (tmp_path / "again.pt").read_bytes()
        == (tmp_path / "axis.pt").read_bytes()
        == (results / "axis.pt").read_bytes()
    )

    # The paper pipeline's dict form, and a partial axis (blocks 10 and 20 only): NaN rows elsewhere.
    partial = torch.full((30, 576), float("nan"))
    partial[[10, 20]] = axis[[10, 20]]
    torch.save(
        {"axis": partial, "default_mean": axis, "role_mean": axis, "n_default": 1, "n_roles": 3},
        tmp_path / "paper_axis.pt",
    )
    import_file(tmp_path / "paper_axis.pt", tmp_path / "partial.safetensors", model=MODEL)
    loaded, loaded_layers, meta = load_axis(tmp_path / "partial.safetensors", model=MODEL, n_layers=30)
    assert loaded_layers == [10, 20] and torch.equal(loaded[20], axis[20]) and loaded[0].isnan().all()
    assert meta["direction"] == DIRECTION and meta["layer_convention"] == LAYER_CONVENTION
    export_file([tmp_path / "partial.safetensors"], tmp_path / "partial.pt")
    assert (
        torch.equal(
            torch.load(tmp_path / "partial.pt", weights_only=True),
            partial,
        )
        is False
    )  # NaN != NaN
    assert torch.allclose(
        torch.load(tmp_path / "partial.pt", weights_only=True), partial, equal_nan=True, rtol=0, atol=0
    )

    export_file([results / "vectors/pirate.safetensors"], tmp_path / "pirate.pt")
    vector = torch.load(tmp_path / "pirate.pt", weights_only=True)
    ours = read_tensors(results / "vectors/pirate.safetensors")[0]
    assert vector["role"] == "pirate" and vector["type"] == "pos_3" and torch.equal(vector["vector"], ours["vector"])
    import_file(tmp_path / "pirate.pt", tmp_path / "pirate.safetensors")
    export_file([tmp_path / "pirate.safetensors"], tmp_path / "pirate_again.pt")
    again = torch.load(tmp_path / "pirate_again.pt", weights_only=True)
    assert again.keys() == vector.keys() and torch.equal(again["vector"], vector["vector"])
    assert again["type"] == vector["type"] and again["role"] == vector["role"]


def test_paper_files_we_cannot_read_fail_in_one_line_naming_the_field(tmp_path, results, native):
    axis, _, _ = load_axis(results / "axis.safetensors")
    cases = {
        "extra.pt": ({"axis": axis, "notes": "hi"}, r"extra.pt: notes: unknown key"),
        "vector_extra.pt": ({"vector": axis, "role": "x", "score": 3}, r"vector_extra.pt: score: unknown key"),
        "shape.pt": ({"axis": axis[0]}, r"shape.pt: axis: expected a float tensor \[n_layers, hidden\], got \(576,\)"),
    }
    for name, (data, message) in cases.items():
        torch.save(data, tmp_path / name)
        with pytest.raises(InputError, match=message):
            import_file(tmp_path / name, tmp_path / "out.safetensors")
    torch.save({"axis": axis, "metadata": {"when": Note()}}, tmp_path / "pickled.pt")
    with pytest.raises(InputError, match=r"pickled.pt: file: not loadable with weights_only=True"):
        import_file(tmp_path / "pickled.pt", tmp_path / "out.safetensors")
    _paper_capping(tmp_path / "capping_config.pt", axis, native)
    with pytest.raises(InputError, match=rf"experiment: 2 experiments, choose one: layers_16:20-p0.01, {EXPERIMENT}"):
        load_capping(tmp_path / "capping_config.pt")
    with pytest.raises(InputError, match=r"experiment: no experiment 'nope'"):
        load_capping(tmp_path / "capping_config.pt", experiment="nope")
    config = torch.load(tmp_path / "capping_config.pt", weights_only=True)
    config["experiments"][1]["interventions"][0]["coefficient"] = 1.0
    torch.save(config, tmp_path / "odd.pt")
    with pytest.raises(InputError, match=r"interventions\[0\]\.coefficient: unknown key"):
        load_capping(tmp_path / "odd.pt", experiment=EXPERIMENT)
    assert not (tmp_path / "out.safetensors").exists()


def test_steering_in_the_paper_unit_equals_our_unit_scaled_by_the_axis_norm(bundled, results):
    model, tokenizer = bundled
    axis, _, _ = load_axis(results / "axis.safetensors")
    ids = torch.tensor([ChatTemplate(tokenizer).ids(MESSAGES, add_generation_prompt=True)])
    layers, coefficient = [12, 15], -0.5

    def logits(**kwargs):
        with steer(model, axis[layers], layers, **kwargs), torch.inference_mode():
            return model(input_ids=ids).logits

    raw = logits(coefficient=coefficient, unit="raw")
    norms = axis[layers].norm(dim=-1)
    assert not torch.allclose(norms, torch.ones(2), rtol=0.1)  # else the two units could not be told apart
    # One coefficient per layer in our unit: steer each layer with its own scaled coefficient.
    with (
        steer(model, axis[layers[:1]], layers[:1], coefficient * float(norms[0])),
        steer(model, axis[layers[1:]], layers[1:], coefficient * float(norms[1])),
        torch.inference_mode(),
    ):
        scaled = model(input_ids=ids).logits
    torch.testing.assert_close(raw, scaled, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(raw, logits(coefficient=coefficient), atol=1e-2)  # the unit does matter


def test_every_artifact_says_what_it_means_and_loading_checks_it(tmp_path, results, caplog):
    model_info = json.loads((results / "model.json").read_text())
    for path, kind in [
        (results / "axis.safetensors", "axis"),
        (results / "vectors/pirate.safetensors", "role_vector"),
        (results / "capping/late-p25.safetensors", "capping"),
    ]:
        meta = read_tensors(path)[1]
        assert meta["artifact"] == kind and meta["layer_convention"] == LAYER_CONVENTION
        assert meta["model"] == MODEL and json.loads(meta["n_layers"]) == 30 and json.loads(meta["hidden_size"]) == 576
        assert meta["model_config_sha"] == model_info["config_sha"] and len(meta["model_config_sha"]) == 16
        assert meta["model_source"] == f"bundled:{MODEL}" and "chat_template_sha" in meta
        assert meta["direction"] == (DIRECTION if kind != "role_vector" else meta["direction"])
    assert read_tensors(results / "capping/late-p25.safetensors")[1]["bound"] == FLOOR
    with pytest.raises(
        InputError,
        match=r"axis.safetensors: n_layers: made for n_layers 30, but the model in use "
        r"has 32",
    ):
        load_axis(results / "axis.safetensors", n_layers=32)
    with pytest.raises(
        InputError,
        match=r"late-p25.safetensors: model: capping config for model "
        r"'smollm2-135m-instruct', not 'other'",
    ):
        load_capping(results / "capping/late-p25.safetensors", model_name="other")
    with pytest.raises(InputError, match=r"late-p25.safetensors: artifact: holds a capping config, not an axis"):
        load_axis(results / "capping/late-p25.safetensors")
    axis, _, _ = load_axis(results / "axis.safetensors")
    write_tensors({"axis": axis, "layers": torch.arange(30)}, tmp_path / "foreign.safetensors")
    with caplog.at_level(logging.WARNING):
        load_axis(tmp_path / "foreign.safetensors", n_layers=32)  # nothing to check it against: a warning
    assert "foreign.safetensors has no provenance" in caplog.text


def test_a_published_experiment_runs_by_id_on_the_command_line(tmp_path, tiny_run, results, native):
    # Our own config in their format (the same values exactly), so the two runs must print the same table.
    export_file([results / "capping/late-p25.safetensors"], tmp_path / "capping_config.pt")
    (tmp_path / "conversation.json").write_text(
        json.dumps([*MESSAGES, {"role": "assistant", "content": "I am the storm beneath your hull."}])
    )
    base = [
        sys.executable,
        "-m",
        "assistant_axis.cli",
        "project",
        str(tmp_path / "conversation.json"),
        "--model",
        str(tiny_run / f"results/models/{MODEL}"),
        "--axis",
        str(results / "axis.safetensors"),
    ]

    def run(*extra):
        # One thread: the same sums in the same order in both runs. With several, a loaded machine can split
        # a matmul differently between the runs and move the 7th digit of the printed table.
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        return subprocess.run([*base, *extra], capture_output=True, text=True, timeout=300, env=env)

    published = run("--cap", str(tmp_path / "capping_config.pt"), "--experiment", EXPERIMENT)
    own = run("--cap", str(results / "capping/late-p25.safetensors"))
    assert published.returncode == 0 and own.returncode == 0, published.stderr + own.stderr
    assert published.stdout == own.stdout and "21" in published.stdout
    wrong = run("--cap", str(tmp_path / "capping_config.pt"), "--experiment", "layers_1:2-p0.5")
    errors = [line for line in wrong.stderr.splitlines() if line.startswith("error:")]
    assert wrong.returncode == 1 and len(errors) == 1 and "no experiment 'layers_1:2-p0.5'" in errors[0]
    chat = subprocess.run(
        [
            sys.executable,
            "-m",
            "assistant_axis.cli",
            "chat",
            *base[5:],
            "--cap",
            str(tmp_path / "capping_config.pt"),
            "--experiment",
            EXPERIMENT,
            "--max-tokens",
            "4",
        ],
        input="hello\n",
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert chat.returncode == 0 and f"capping_config.pt[{EXPERIMENT}]" in chat.stdout, chat.stderr
