"""Atomic writers and checked readers for the workflow's Parquet and safetensors artifacts.

Every artifact is written to a temporary name in the same folder and renamed into place, so a
killed job never leaves a half-written file under its final name.
"""

from __future__ import annotations

import glob
import json
import os
import tempfile
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from assistant_axis.errors import InputError

__all__ = [
    "atomic_path",
    "write_parquet",
    "write_html_table",
    "read_parquet",
    "read_jsonl",
    "write_tensors",
    "read_tensors",
    "write_pt",
    "write_json",
    "save_figure",
    "read_layer",
]


@contextmanager
def atomic_path(path: str | Path, suffix: str = ""):
    """Yield a temporary path next to `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*{suffix}.tmp"):  # left by a killed writer
        stale.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix + ".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_parquet(frame: pd.DataFrame, path: str | Path) -> None:
    with atomic_path(path, ".parquet") as tmp:
        frame.to_parquet(tmp, index=False)


def write_html_table(frame: pd.DataFrame, path: str | Path, caption: str = "") -> None:
    """A table as a small HTML page (what Snakemake's report shows of it), written atomically."""
    body = frame.to_html(index=False, float_format=lambda v: f"{v:.3g}", border=0)
    page = f"<html><body><p>{caption}</p>{body}</body></html>\n"
    with atomic_path(path, ".html") as tmp:
        tmp.write_text(page, encoding="utf-8")


def read_jsonl(path: str | Path, strings: Iterable[str] = ("id",)) -> list[tuple[str, dict]]:
    """`(where, row)` for each JSON object line of `path` (blank lines skipped; `where` is "path:line"), each
    with the non-empty string fields `strings` and a unique `id`. Errors name the line and the field."""

    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise InputError(path, "file", f"cannot read ({exc})") from exc
    rows, seen = [], set()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(where, "line", f"not valid JSON ({exc.msg})") from exc
        if not isinstance(row, dict):
            raise InputError(where, "line", "expected a JSON object")
        for name in strings:
            if not isinstance(row.get(name), str) or not row[name].strip():
                raise InputError(where, name, "missing or empty")
        if row.get("id") in seen:
            raise InputError(where, "id", f"{row['id']!r} appears twice")
        seen.add(row.get("id"))
        rows.append((where, row))
    return rows


def read_parquet(path: str | Path, columns: Iterable[str] = ()) -> pd.DataFrame:
    """Read a table and check that it has `columns`; a missing one is reported by name."""
    try:
        frame = pd.read_parquet(path)
    except (OSError, ValueError) as exc:
        raise InputError(path, "file", f"not a readable Parquet table ({exc})") from exc
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise InputError(path, missing[0], "column missing")
    return frame


def write_tensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict | None = None) -> None:
    """Save tensors with string metadata (non-strings are stored as JSON)."""
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    tensors = {k: t.detach().contiguous().cpu() for k, t in tensors.items()}
    with atomic_path(path, ".safetensors") as tmp:
        save_file(tensors, str(tmp), metadata=meta)
        _sort_header(tmp)


def _sort_header(path: Path) -> None:
    """Rewrite a safetensors header with its keys sorted, in place. safetensors writes them in hash order,
    which changes from process to process, so the same tensors would otherwise give different bytes."""
    with open(path, "r+b") as handle:
        size = int.from_bytes(handle.read(8), "little")
        header = json.dumps(json.loads(handle.read(size)), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        data = header.encode()
        if len(data) <= size:  # same content, so the same length in practice; padded with spaces as safetensors does
            handle.seek(8)
            handle.write(data + b" " * (size - len(data)))


def read_tensors(
    path: str | Path, names: Iterable[str] = (), check: Callable[[dict], None] | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load a safetensors file (never pickle) and its metadata; a missing tensor is reported by name."""
    metadata = read_metadata(path)
    try:
        tensors = load_file(str(path))
    except (OSError, SafetensorError) as exc:
        raise InputError(path, "file", f"not a readable safetensors file ({exc})") from exc
    for name in names:
        if name not in tensors:
            raise InputError(path, name, "tensor missing")
    if check:
        check(tensors)
    return tensors, metadata


def read_metadata(path: str | Path) -> dict[str, str]:
    """A safetensors file's metadata (what the file says it holds), without reading its tensors."""

    try:
        with safe_open(str(path), framework="pt") as handle:
            return handle.metadata() or {}
    except (OSError, SafetensorError) as exc:
        raise InputError(path, "file", f"not a readable safetensors file ({exc})") from exc


def read_layer(path: str | Path, name: str, index: int) -> torch.Tensor:
    """Row `index` of dimension 1 of tensor `name` ([n, layers, hidden] -> [n, hidden]), reading only that slice."""

    try:
        with safe_open(str(path), framework="pt") as handle:
            if name not in handle.keys():
                raise InputError(path, name, "tensor missing")
            return handle.get_slice(name)[:, index]
    except (OSError, SafetensorError) as exc:
        raise InputError(path, "file", f"not a readable safetensors file ({exc})") from exc


def write_pt(data, path: str | Path) -> None:
    """`torch.save` (for the paper code's `.pt` files), reproducibly: saved to a path, torch names the archive's
    folder after the file, here a random temporary name, so the same data would give different bytes."""
    with atomic_path(path, ".pt") as tmp, open(tmp, "wb") as handle:
        torch.save(data, handle)


def write_json(data: dict, path: str | Path) -> None:
    with atomic_path(path, ".json") as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def save_figure(fig, path: str | Path) -> None:
    """Save a matplotlib figure atomically (format from the final name) and close it."""
    # matplotlib only for a plot
    import matplotlib.pyplot as plt

    path = Path(path)
    with atomic_path(path, path.suffix) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", dpi=120, bbox_inches="tight")
    plt.close(fig)
