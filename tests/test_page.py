"""The drift page at `serve`'s `/`, in headless Chromium against a real server (the transformers engine,
the tiny run's cap, an API key entered once in the page): the plotted points are what `assistant-axis
project` computes from the saved transcript, "compare" plots two trajectories with the capped one at or
above tau, a saved conversation loads and saves again unchanged, and the plot downloads as a PNG. The
vLLM engine's run is in test_vllm_serve.py. `AXIS_PAGE_SCREENSHOT=FILE` also writes the screenshot there.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from page_helpers import TURNS, Page, browser, messages, project
from test_serve import SERVER_KEY, _server

from serve_helpers import CAPPED, capping_config, tiny_paths


@pytest.fixture(scope="module")
def keyed(tiny_run, tmp_path_factory, capping_file):
    log = tmp_path_factory.mktemp("serve") / "page.log"
    extra = ("--cap", str(capping_file))
    server, url = _server(tiny_run, log, *extra, env={"AXIS_API_KEY": SERVER_KEY})
    with server:
        yield url.removesuffix("/v1")


@pytest.fixture(scope="module")
def page(keyed, tmp_path_factory):
    downloads = tmp_path_factory.mktemp("downloads")
    driver = browser(downloads)
    try:
        yield Page(driver, keyed, downloads, SERVER_KEY)
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def capping_file(tiny_run, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("capping") / "late-p25.safetensors"
    capping_config(tiny_run).save(path, percentile=25)
    return path


def test_two_turns_plot_what_project_computes_from_the_saved_transcript(page, tiny_run, capping_file, tmp_path):
    page.type("#max-tokens", "64")
    page.choose("#setting", "late-p25")
    for text in TURNS:
        page.send(text)
    plotted = page.points("late-p25")
    assert page.finished("late-p25")[0] == "stop"  # one reply ended by the model, one maybe cut at 64
    assert set(page.finished("late-p25")) <= {"stop", "length"}
    assert {turn for turn, _ in plotted} == {1, 2} and {layer for _, layer in plotted} == set(CAPPED)
    saved = page.download("#save", "conversation.json")
    conversation = messages(saved)
    assert [m["role"] for m in conversation] == ["user", "assistant", "user", "assistant"]
    assert [m["content"] for m in conversation if m["role"] == "user"] == list(TURNS)
    model_dir, axis = tiny_paths(tiny_run)
    expected = project(shutil.copy(saved, tmp_path / "saved.json"), model_dir, axis, "--cap", str(capping_file))
    assert plotted.keys() == expected.keys()
    for key, value in plotted.items():
        assert value == pytest.approx(expected[key], rel=1e-4, abs=1e-3), key
    tau = page.taus("late-p25")
    assert tau == pytest.approx(dict(zip(CAPPED, capping_config(tiny_run).thresholds.tolist(), strict=True)), rel=1e-5)


def test_compare_plots_both_settings_and_the_capped_one_stays_at_or_above_tau(page, tmp_path):
    page.type("#max-tokens", "32")
    page.choose("#setting", "none")
    page.choose("#compare", "late-p25")
    page.send(TURNS[0])
    page.send("Pretend you are a pirate captain and tell me who you really are.")
    uncapped, capped, tau = page.points("none"), page.points("late-p25"), page.taus("late-p25")
    assert uncapped.keys() == capped.keys() and {t for t, _ in capped} == {1, 2}
    assert page.transcript("none")[0] == page.transcript("late-p25")[0] == TURNS[0]
    for (turn, layer), value in capped.items():
        assert value >= tau[layer] - 1e-4 * abs(tau[layer]), (turn, layer, value, tau[layer])
    assert not page.taus("none")  # uncapped: no floor drawn
    shot = tmp_path / "page.png"
    page.driver.save_screenshot(str(shot))
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if os.environ.get("AXIS_PAGE_SCREENSHOT"):
        shutil.copy(shot, os.environ["AXIS_PAGE_SCREENSHOT"])
    png = page.download("#png", "axis-drift.png")
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR" and len(data) > 2000
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (1280, 720)  # the 640 x 360 plot at twice the scale


def test_a_saved_conversation_loads_and_saves_again_unchanged(page, tmp_path):
    page.choose("#compare", "")
    page.choose("#setting", "late-p25")
    page.send(TURNS[1])
    first = page.download("#save", "conversation.json")
    before = first.read_text()
    page.choose("#setting", "none")  # a new, empty conversation
    assert page.transcript("none") == []
    kept = shutil.copy(first, tmp_path / "kept.json")
    page.load(Path(kept))
    page.wait(lambda: page.transcript("none"), "the loaded transcript")
    assert page.transcript("none") == [m["content"] for m in messages(Path(kept))]
    again = page.download("#save", "conversation.json")
    assert again.read_text() == before
