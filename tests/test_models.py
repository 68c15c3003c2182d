"""The prepared model's manifest (`results/<model>/model.json`): where it records the model, and reading it back
from any working directory, so that results can be copied or moved."""

from __future__ import annotations

import json
from pathlib import Path

from assistant_axis import stages
from assistant_axis.manifest import model_path, workflow_dir
from assistant_axis.stages.common import model_info

NAME = "smollm2-135m-instruct"
CONFIG = {"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 8, "num_attention_heads": 2}


def _model(folder: Path) -> Path:
    """A model folder as far as preparing it goes (a config; a bundled model with one is not converted again)."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(CONFIG))
    return folder


def _prepare(workdir: Path, source: str, monkeypatch) -> dict:
    """The prepare_model stage as its rule runs it: in the workflow directory, on relative paths."""
    monkeypatch.chdir(workdir)
    output = f"results/{NAME}/model.json"
    stages.prepare_model(output=output, name=NAME, source=source, models_dir="results/models")
    return json.loads((workdir / output).read_text())


def test_a_bundled_model_is_recorded_from_the_workflow_directory_its_link_kept(tmp_path, monkeypatch):
    work, elsewhere = tmp_path / "work", _model(tmp_path / "shared" / NAME)
    (work / "results/models").mkdir(parents=True)
    (work / "results/models" / NAME).symlink_to(elsewhere, target_is_directory=True)
    info = _prepare(work, f"bundled:{NAME}", monkeypatch)
    assert info["path"] == f"./results/models/{NAME}" and (info["n_layers"], info["hidden_size"]) == (2, 8)


def test_a_local_model_is_relative_inside_the_workflow_directory_and_absolute_outside(tmp_path, monkeypatch):
    work = tmp_path / "work"
    _model(work / "models/mine")
    assert _prepare(work, "models/mine", monkeypatch)["path"] == "./models/mine"
    assert _prepare(work, str(work / "models/mine"), monkeypatch)["path"] == "./models/mine"
    outside = _model(tmp_path / "outside")
    assert _prepare(work, "../outside", monkeypatch)["path"] == str(outside.resolve())


def test_the_manifest_is_read_from_its_workflow_directory_not_the_working_directory(tmp_path, monkeypatch):
    manifest = tmp_path / "moved" / "results" / NAME / "model.json"
    manifest.parent.mkdir(parents=True)
    base = {"name": NAME, "source": f"bundled:{NAME}", "n_layers": 2, "hidden_size": 8}
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert workflow_dir(manifest) == tmp_path / "moved"
    assert workflow_dir(Path("..") / "moved/results" / NAME / "model.json") == tmp_path / "moved"
    for recorded, expected in [
        (f"./results/models/{NAME}", str(tmp_path / "moved/results/models" / NAME)),
        ("/old/place/model", "/old/place/model"),  # a manifest written before paths were relative
        ("HuggingFaceTB/SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct"),  # a hub id
    ]:
        manifest.write_text(json.dumps({**base, "path": recorded}))
        assert model_info(manifest)["path"] == expected == model_path(manifest, recorded)
