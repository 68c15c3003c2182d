"""What an axis, role-vector or capping file means, written into the file and checked when it is loaded.

Every artifact we write carries the same keys in its safetensors metadata: what it is, which way its
sign points, how its rows map to the model's blocks, and which model (id, revision, a hash of the
weights' config, depth and width) and chat-template rendering it was made with. Loading checks what
it can against the model in hand and fails with one line on a mismatch; a file without these keys
(made elsewhere) loads with a warning, since nothing about it can be checked.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from assistant_axis.errors import InputError

__all__ = [
    "DIRECTION",
    "LAYER_CONVENTION",
    "FLOOR",
    "describe_model",
    "config_sha",
    "provenance",
    "check_provenance",
    "decoded_value",
    "warn_unchecked",
]

log = logging.getLogger(__name__)

DIRECTION = "larger projection = more Assistant-like"
LAYER_CONVENTION = "row i = output of decoder block i (the residual stream, before the final norm)"
FLOOR = "floor: h <- h - v * min(<h, v> - tau, 0), v the unit axis (lifts tokens below tau)"
ROLE_VECTOR = "mean activation of the role's qualifying replies (no sign)"
# Keys a loader may compare with the model in hand.
CHECKED = ("model", "n_layers", "hidden_size", "model_config_sha")


def config_sha(config) -> str:
    """A short hash of a transformers config: the same weights' shape and settings give the same hash.

    Fields that name the install rather than the model (the transformers version, the local path) are
    left out, so the same model prepared on two machines hashes alike."""
    data = config.to_dict()
    for key in ("transformers_version", "_name_or_path", "_commit_hash", "torch_dtype", "dtype"):
        data.pop(key, None)
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def describe_model(info: dict) -> dict:
    """The model's part of the provenance, from a prepared model's manifest (`model.json`)."""
    return {
        "model": info["name"],
        "model_source": info.get("source", ""),
        "model_revision": info.get("revision") or "",
        "model_config_sha": info.get("config_sha", ""),
        "n_layers": int(info["n_layers"]),
        "hidden_size": int(info["hidden_size"]),
    }


def provenance(artifact: str, model: dict, rendering: dict | None = None, **extra) -> dict:
    """The metadata every artifact of kind `artifact` (axis, role_vector, capping) carries."""
    meaning = {
        "axis": {"direction": DIRECTION},
        "role_vector": {"direction": ROLE_VECTOR},
        "capping": {"direction": DIRECTION, "bound": FLOOR},
    }[artifact]
    return {
        "artifact": artifact,
        **meaning,
        "layer_convention": LAYER_CONVENTION,
        **model,
        **{k: v for k, v in (rendering or {}).items() if v is not None},
        **extra,
    }


def decoded_value(value):
    """A metadata value as written: JSON where it parses (numbers, lists, dicts), else the string itself."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def check_provenance(meta: dict, path: str | Path, artifact: str, **expected) -> bool:
    """Compare the file's provenance with `expected` (model name, n_layers, hidden_size, model_config_sha;
    None = unknown).

    Returns False for a file that has none (the loader warns with `warn_unchecked` once its own checks
    pass, so a bad file gets one line, the error); raises one-line InputError on a mismatch."""
    if "artifact" not in meta:
        return False
    kind = decoded_value(meta["artifact"])
    if kind != artifact:
        names = {"axis": "an axis", "role_vector": "a role vector", "capping": "a capping config"}
        raise InputError(path, "artifact", f"holds {names.get(kind, repr(kind))}, not {names[artifact]}")
    for key in CHECKED:
        want, have = expected.get(key), meta.get(key)
        have = decoded_value(have) if key in ("n_layers", "hidden_size") else have  # names and hashes stay strings
        if want is not None and have not in (None, "") and have != want:
            what = "weights' config hash" if key == "model_config_sha" else key
            raise InputError(path, key, f"made for {what} {have!r}, but the model in use has {want!r}")
    return True


def warn_unchecked(path: str | Path) -> None:
    log.warning("%s has no provenance (made elsewhere?): its model and sign cannot be checked", path)
