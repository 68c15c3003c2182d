"""The paper code's published `.pt` files, to and from our safetensors files, with the same meaning.

The paper's repository (safety-research/assistant-axis) stores:
- an axis: a tensor [n_layers, hidden] (or a dict with it under `axis`), row i = output of block i, as ours;
- a role vector: `{"vector": [n_layers, hidden], "type": "pos_3" | "mean", "role": name}`;
- a capping config: `{"vectors": {name: {"layer", "vector"}}, "experiments": [{"id", "interventions":
  [{"vector": name, "cap": float}]}]}`, where each intervention clamps from ABOVE:
  `h <- h - v * max(<h, v> - cap, 0)`, v the unit vector.

Our capping is a FLOOR on the unit axis u: `h <- h - u * min(<h, u> - tau, 0)`. With `u = -v` and
`tau = -cap` the two are the same map (`<h, -v> = -<h, v>`), so importing negates both and exporting
negates them back: exact in both directions. Their steering adds `coefficient x axis[layer]` (the raw
vector) where ours adds `coefficient x unit axis`: see `steer(..., unit="raw")`.

Files are read with `torch.load(weights_only=True)` only; a key we do not know is an error naming it.
`load_capping` reads a capping config from either kind of file, checked against the model.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from assistant_axis.artifacts import read_tensors, write_pt, write_tensors
from assistant_axis.axis import by_block, load_axis
from assistant_axis.cap import CappingConfig, read_capping
from assistant_axis.errors import InputError
from assistant_axis.models import check_layers
from assistant_axis.provenance import check_provenance, provenance, warn_unchecked

__all__ = [
    "load_capping",
    "read_pt",
    "import_axis",
    "import_role_vector",
    "import_capping",
    "import_file",
    "export_file",
    "experiment_id",
]

AXIS_KEYS = {"axis", "metadata", "default_mean", "role_mean", "n_default", "n_roles"}
VECTOR_KEYS = {"vector", "type", "role"}
# The paper code's names for where an imported file came from, kept in its metadata.
IMPORTED = "the paper code's .pt format (safety-research/assistant-axis)"


def read_pt(path: str | Path):
    """`torch.load(weights_only=True)`: tensors, numbers, strings, lists and dicts only, never pickled code."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:
        raise InputError(path, "file", "not found") from exc
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, ... for what it refuses
        raise InputError(path, "file", f"not loadable with weights_only=True ({str(exc).splitlines()[0]})") from exc


def _unknown(path, data: dict, known: set[str], where: str = "") -> None:
    extra = sorted(set(map(str, data)) - known)
    if extra:
        raise InputError(path, f"{where}{extra[0]}", f"unknown key (expected {', '.join(sorted(known))})")


def _matrix(path, field: str, value) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or value.dim() != 2 or not value.is_floating_point():
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise InputError(path, field, f"expected a float tensor [n_layers, hidden], got {shape}")
    return value


def _model_part(model: str | None, n_layers: int | None, hidden: int) -> dict:
    return {"model": model or "", "n_layers": n_layers if n_layers is not None else "", "hidden_size": hidden}


# ------------------------------------------------------------------------------------------------ import


def import_axis(path: str | Path, model: str | None = None) -> tuple[torch.Tensor, dict]:
    """The axis [n_layers, hidden] of a paper axis file and our metadata for it."""
    data = read_pt(path)
    if isinstance(data, dict):
        _unknown(path, data, AXIS_KEYS)
        if "axis" not in data:
            raise InputError(path, "axis", "missing")
        data = data["axis"]
    axis = _matrix(path, "axis", data)
    meta = provenance(
        "axis", _model_part(model, len(axis), axis.shape[1]), imported_from=IMPORTED, layers=_finite_rows(axis)
    )
    return axis, meta


def _finite_rows(matrix: torch.Tensor) -> list[int]:
    """The blocks a block-indexed tensor has (rows of NaN: not extracted)."""
    return torch.isfinite(matrix).all(dim=1).nonzero().flatten().tolist()


def import_role_vector(path: str | Path, model: str | None = None) -> tuple[torch.Tensor, dict]:
    """A paper role vector [n_layers, hidden] and our metadata for it (`role`, and whether it is `default`)."""
    data = read_pt(path)
    if not isinstance(data, dict) or "vector" not in data:
        raise InputError(path, "vector", "expected a dict with a `vector` tensor [n_layers, hidden]")
    _unknown(path, data, VECTOR_KEYS)
    vector = _matrix(path, "vector", data["vector"])
    role = str(data.get("role", Path(path).stem))
    meta = provenance(
        "role_vector",
        _model_part(model, len(vector), vector.shape[1]),
        imported_from=IMPORTED,
        role=role,
        vector_type=str(data.get("type", "")),
        included=role != "default",
    )
    return vector, meta


def _experiments(path, data) -> tuple[dict, list]:
    if not isinstance(data, dict):
        raise InputError(path, "file", "expected a dict with `vectors` and `experiments`")
    _unknown(path, data, {"vectors", "experiments"})
    vectors, experiments = data.get("vectors"), data.get("experiments")
    if not isinstance(vectors, dict) or not isinstance(experiments, list) or not experiments:
        raise InputError(path, "experiments", "expected `vectors` (a dict) and `experiments` (a non-empty list)")
    return vectors, experiments


def import_capping(path: str | Path, experiment: str | None = None, model: str | None = None) -> CappingConfig:
    """One experiment of a paper `capping_config.pt` as our floor config (vectors negated, caps negated).

    `experiment` None is allowed when the file holds exactly one."""
    vectors, experiments = _experiments(path, read_pt(path))
    ids = [str(e.get("id")) if isinstance(e, dict) else "?" for e in experiments]
    if experiment is None:
        if len(experiments) > 1:
            raise InputError(path, "experiment", f"{len(experiments)} experiments, choose one: {', '.join(ids)}")
        experiment = ids[0]
    if experiment not in ids:
        raise InputError(path, "experiment", f"no experiment {experiment!r} (it has {', '.join(ids)})")
    chosen = experiments[ids.index(experiment)]
    _unknown(path, chosen, {"id", "interventions"}, f"experiments[{experiment}].")
    layers, rows, taus, names, uppers = [], [], [], [], {}
    for k, step in enumerate(chosen.get("interventions") or []):
        where = f"experiments[{experiment}].interventions[{k}]"
        if not isinstance(step, dict) or "vector" not in step or "cap" not in step:
            raise InputError(path, where, "expected {vector, cap}")
        _unknown(path, step, {"vector", "cap"}, f"{where}.")
        name = str(step["vector"])
        entry = vectors.get(name)
        if not isinstance(entry, dict) or "layer" not in entry or "vector" not in entry:
            raise InputError(path, f"vectors.{name}", "missing, or not {layer, vector}")
        _unknown(path, entry, {"layer", "vector"}, f"vectors.{name}.")
        vector = entry["vector"]
        if not isinstance(vector, torch.Tensor) or vector.dim() != 1:
            raise InputError(path, f"vectors.{name}.vector", "expected a 1-D tensor")
        if int(entry["layer"]) in layers:
            first = layers.index(int(entry["layer"]))
            if torch.equal(vector.float(), rows[first]) and first not in uppers:  # along -v: our ceiling on u
                uppers[first] = float(step["cap"])
                continue
            raise InputError(
                path,
                where,
                f"a second intervention at layer {int(entry['layer'])}: our format caps "
                "each layer once (a floor, and optionally a ceiling along the same vector)",
            )
        layers.append(int(entry["layer"]))
        rows.append(-vector.float())  # their ceiling on v is our floor on -v
        taus.append(-float(step["cap"]))
        names.append(name)
    if not layers:
        raise InputError(path, f"experiments[{experiment}].interventions", "no interventions")
    order = sorted(range(len(layers)), key=layers.__getitem__)
    hidden = int(rows[0].shape[0])
    meta = provenance(
        "capping",
        _model_part(model, None, hidden),
        imported_from=IMPORTED,
        experiment=experiment,
        vector_names=[names[i] for i in order],
    )
    upper = None
    if uppers:
        if len(uppers) != len(layers):
            raise InputError(path, f"experiments[{experiment}]", "a ceiling at some capped layers but not all")
        upper = torch.tensor([uppers[i] for i in order], dtype=torch.float64)
    return CappingConfig(
        [layers[i] for i in order],
        torch.stack([rows[i] for i in order]),
        torch.tensor([taus[i] for i in order], dtype=torch.float64),
        model or "",
        upper,
        source=f"{path}[{experiment}]",
        metadata=meta,
    )


def import_file(
    source: str | Path, target: str | Path, experiment: str | None = None, model: str | None = None
) -> list[Path]:
    """Convert a paper `.pt` file into ours; a capping config without `experiment` gives one file per
    experiment in the folder `target`. Returns the files written."""
    data = read_pt(source)
    if isinstance(data, dict) and "experiments" in data:
        _, experiments = _experiments(source, data)
        ids = [experiment] if experiment else [str(e.get("id")) for e in experiments]
        outputs = [Path(target)] if experiment else [Path(target) / f"{_safe(i)}.safetensors" for i in ids]
        for chosen, output in zip(ids, outputs, strict=True):
            config = import_capping(source, chosen, model)
            config.save(output, **config.metadata)
        return outputs
    if experiment is not None:
        raise InputError(source, "experiment", "only a capping config holds experiments")
    if isinstance(data, dict) and "vector" in data:
        vector, meta = import_role_vector(source, model)
        rows = _finite_rows(vector)
        write_tensors({"vector": vector[rows], "layers": torch.tensor(rows, dtype=torch.int64)}, target, meta)
    else:
        axis, meta = import_axis(source, model)
        write_tensors({"axis": axis, "layers": torch.tensor(meta["layers"], dtype=torch.int64)}, target, meta)
    return [Path(target)]


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.:-]", "_", name)


# ------------------------------------------------------------------------------------------------ export


def experiment_id(config: CappingConfig) -> str:
    """The id an experiment keeps (an imported one's), else the paper's style: `layers_21:26-p0.25`."""
    meta = config.metadata
    if meta.get("experiment"):
        return str(meta["experiment"])
    span = f"{config.layers[0]}:{config.layers[-1] + 1}"
    if config.layers != list(range(config.layers[0], config.layers[-1] + 1)):
        span = ",".join(map(str, config.layers))
    percentile = meta.get("percentile")
    return f"layers_{span}-p{float(percentile) / 100:g}" if percentile else f"layers_{span}-{Path(config.source).stem}"


def _export_capping(sources: list[str | Path], target: str | Path) -> None:

    vectors: dict[str, dict] = {}
    experiments = []
    for source in sources:
        config = read_capping(source)
        names = config.metadata.get("vector_names")
        names = json.loads(names) if names else [f"axis_negated_layer_{layer}" for layer in config.layers]
        steps = []
        for k, layer in enumerate(config.layers):
            vector = -config.vectors[k]
            name = names[k]
            if name in vectors and not torch.equal(vectors[name]["vector"], vector):
                name = f"{name}@{Path(source).stem}"  # same name, other values: keep both
            vectors[name] = {"layer": layer, "vector": vector}
            steps.append({"vector": name, "cap": -float(config.thresholds[k])})
            if config.upper is not None:  # our ceiling on u is their clamp-from-above on u itself
                vectors[f"{name}:ceiling"] = {"layer": layer, "vector": config.vectors[k].clone()}
                steps.append({"vector": f"{name}:ceiling", "cap": float(config.upper[k])})
        experiments.append({"id": experiment_id(config), "interventions": steps})
    ids = [e["id"] for e in experiments]
    if len(set(ids)) != len(ids):
        raise InputError(sources[0], "experiment", f"two capping files give the same experiment id ({ids})")
    write_pt({"vectors": vectors, "experiments": experiments}, target)


def export_file(sources: list[str | Path], target: str | Path) -> None:
    """Our axis, role vector or capping configs (several -> one capping_config.pt) in the paper code's format.

    Axis and role vectors come out indexed by block, [n_layers, hidden], NaN rows where not extracted."""
    tensors, meta = read_tensors(sources[0])
    if "thresholds" in tensors:
        return _export_capping(sources, target)
    if len(sources) != 1:
        raise InputError(sources[1], "file", "only capping configs combine into one file")
    if "axis" in tensors:
        data = load_axis(sources[0])[0]
    elif "vector" in tensors:
        layers = tensors["layers"].tolist()
        n_layers = int(json.loads(meta.get("n_layers") or "0") or max(layers) + 1)
        role = meta.get("role", Path(sources[0]).stem)
        data = {
            "vector": by_block(tensors["vector"], layers, n_layers),
            "role": role,
            "type": meta.get("vector_type") or ("mean" if role == "default" else "pos_3"),
        }
    else:
        raise InputError(sources[0], "file", "neither an axis, a role vector nor a capping config")
    write_pt(data, target)


def load_capping(
    path: str | Path,
    model_name: str | None = None,
    hidden_size: int | None = None,
    n_layers: int | None = None,
    experiment: str | None = None,
) -> CappingConfig:
    """Read a capping config, ready for `cap`; refuse one made for another model, depth or hidden size.

    A `.pt` file is the paper code's `capping_config.pt`: `experiment` picks one of its experiments by id
    (converted from their ceiling to our floor, the same intervention)."""
    if str(path).endswith(".pt"):
        config, checked = import_capping(path, experiment), False  # the paper's files carry no provenance
    else:
        if experiment is not None:
            raise InputError(path, "experiment", "only a paper capping_config.pt holds experiments")
        config = read_capping(path)
        if model_name is not None and config.model not in ("", model_name):
            raise InputError(path, "model", f"capping config for model {config.model!r}, not {model_name!r}")
        checked = check_provenance(
            config.metadata, path, "capping", model=model_name, n_layers=n_layers, hidden_size=hidden_size
        )
    if hidden_size is not None and config.vectors.shape[1] != hidden_size:
        raise InputError(
            path,
            "hidden_size",
            f"vectors have size {config.vectors.shape[1]}, the model's hidden size is {hidden_size}",
        )
    if n_layers is not None:
        check_layers(config.layers, n_layers, path, "layers")
    if not checked:
        warn_unchecked(path)
    return config.normalized()
