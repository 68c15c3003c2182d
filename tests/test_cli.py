"""The `project`, `chat` and `serve` commands as a user runs them, and their one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from assistant_axis.artifacts import write_tensors

from serve_helpers import MODEL, capping_config, tiny_paths

CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Can you pretend to be a pirate for a moment?"},
    {"role": "assistant", "content": "Arr, matey! Aye, I be a pirate of the seven seas."},
    {"role": "user", "content": "Now tell me who you really are."},
]


def cli(*args: str, stdin: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "assistant_axis.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def model_args(tiny_run: Path) -> list[str]:
    model_dir, axis = tiny_paths(tiny_run)
    return ["--model", str(model_dir), "--axis", str(axis)]


def one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 1, (result.returncode, result.stdout[-2000:], result.stderr[-2000:])
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_project_writes_one_row_per_turn_and_layer_and_a_plot(tiny_run, tmp_path):
    conversation = tmp_path / "conversation.json"
    conversation.write_text(json.dumps(CONVERSATION))
    table, plot = tmp_path / "out/table.parquet", tmp_path / "out/plot.png"
    result = cli(
        "project",
        str(conversation),
        *model_args(tiny_run),
        "--layers",
        "15",
        "20",
        "--out",
        str(table),
        "--plot",
        str(plot),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    frame = pd.read_parquet(table)
    assert list(frame.columns) == ["turn", "role", "layer", "projection", "n_chars"]
    assert len(frame) == 8 and sorted(set(zip(frame["turn"], frame["layer"], strict=True))) == [
        (t, layer) for t in range(4) for layer in (15, 20)
    ]
    assert list(frame[frame["layer"] == 15]["role"]) == [m["role"] for m in CONVERSATION]
    assert frame["projection"].notna().all()
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(table.parent.glob(".*.tmp"))  # written atomically


@pytest.mark.parametrize(
    ("content", "field"),
    [
        ([{"role": "user", "content": 5}], "[0].content"),
        ([{"role": "wizard", "content": "hi"}], "[0].role"),
        ({"role": "user"}, "messages"),
        ("{not json", "file"),
    ],
)
def test_project_names_the_file_and_field_of_a_malformed_conversation(tmp_path, content, field):
    path = tmp_path / "bad.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    line = one_error_line(cli("project", str(path), "--axis", "/nonexistent/axis.safetensors"))
    assert line.startswith(f"error: {path}: {field}: "), line


def test_chat_with_piped_stdin_shows_replies_and_projections(tiny_run):
    result = cli(
        "chat",
        *model_args(tiny_run),
        "--temperature",
        "0",
        "--max-tokens",
        "12",
        "--layers",
        "10",
        "20",
        stdin="Hello!\nWhat is the capital of France?\n/quit\nnever read\n",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout.splitlines()
    assert "you> Hello!" in out and "you> What is the capital of France?" in out
    replies = [line for line in out if line.startswith("assistant> ")]
    projections = [line for line in out if line.startswith("[projection L10 ")]
    assert len(replies) == 2 and all(len(r) > len("assistant> ") for r in replies), result.stdout
    assert len(projections) == 2 and all(" L20 " in p for p in projections), result.stdout
    assert "never read" not in result.stdout


def test_chat_commands(tiny_run, tmp_path):
    capping = tmp_path / "late-p25.safetensors"
    capping_config(tiny_run).save(capping)
    result = cli(
        "chat",
        *model_args(tiny_run),
        "--cap",
        str(capping),
        "--temperature",
        "0",
        "--max-tokens",
        "6",
        stdin="/system You are a pirate.\nWho are you?\n/reset\n/help\n",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "capped at layers 21 22 23 24 25" in result.stdout
    assert "(new conversation; system prompt set)" in result.stdout and "(conversation cleared)" in result.stdout
    line = next(line for line in result.stdout.splitlines() if line.startswith("[projection"))
    assert line.startswith("[projection L21 ") and "(tau " in line and " !)" not in line, line


def test_serve_refuses_a_capping_config_from_another_model(tiny_run, tmp_path):
    other = tmp_path / "other.safetensors"
    capping_config(tiny_run, model="other-model").save(other)
    line = one_error_line(cli("serve", *model_args(tiny_run), "--cap", str(other), "--port", "1", timeout=120))
    assert line.startswith(f"error: {other}: model: ") and "other-model" in line, line


def test_serve_refuses_steering_layers_outside_the_model(tiny_run):
    line = one_error_line(
        cli("serve", *model_args(tiny_run), "--steer", "-5", "--steer-layers", "99", "--port", "1", timeout=120)
    )
    assert line.startswith("error: --steer-layers: layers: layer 99 ") and "30 layers" in line, line


def test_layers_outside_the_model_and_axes_of_another_size_are_one_line(tiny_run, tmp_path):
    line = one_error_line(cli("chat", *model_args(tiny_run), "--layers", "30", stdin="/quit\n", timeout=120))
    assert line.startswith("error: --layers: layers: layer 30 "), line
    wrong = tmp_path / "axis-64.safetensors"
    write_tensors({"axis": torch.ones(30, 64), "layers": torch.arange(30)}, wrong, {"model": MODEL})
    model_dir, _ = tiny_paths(tiny_run)
    line = one_error_line(cli("serve", "--model", str(model_dir), "--axis", str(wrong), "--port", "1", timeout=120))
    assert line.startswith(f"error: {wrong}: hidden_size: axis has hidden size 64") and "576" in line, line


def test_a_library_error_names_the_flag_that_set_the_value(tiny_run):
    """The library names its own argument (`bundled_gguf: source: ...`); the CLI names the flag instead."""
    _, axis = tiny_paths(tiny_run)
    line = one_error_line(cli("chat", "--model", "bundled:no-such-model", "--axis", str(axis), stdin="/quit\n"))
    assert line.startswith("error: command line: --model: unknown bundled model 'no-such-model'"), line
