"""The workflow's config: checked against the JSON schema with its defaults filled in, keys put in one
order, and a bad value reported as one line naming the config file that set it."""

from __future__ import annotations

import copy
import hashlib
import json
import re
from collections.abc import Sequence
from pathlib import Path

import yaml

from assistant_axis.errors import InputError

__all__ = ["validate_config", "config_source", "canonical", "in_config_file", "sections_hash", "AXIS_SECTIONS"]

# The config sections that decide the axis's values (its upstream stages).
AXIS_SECTIONS = ("model", "roles", "questions", "generate", "activations", "judge", "vectors")


def config_source(files: Sequence[str | Path], key: Sequence[str | int]) -> str:
    """The config file that sets `key` (`files` lowest precedence first), for naming it in a message."""
    for file in reversed(files):
        try:
            node = yaml.safe_load(Path(file).read_text())
        except (OSError, yaml.YAMLError):
            continue
        for part in key:
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and isinstance(part, int) and part < len(node):
                node = node[part]
            else:
                break
        else:
            return str(file)
    return str(files[-1]) if files else "config"


def validate_config(config: dict, schema_file: str | Path, files: Sequence[str | Path] = ()) -> None:
    """Check `config` against the JSON schema and fill in its defaults (as Snakemake's `validate` does);
    the first problem is raised as one line naming the config file and the key."""
    # only when a config is validated (the Snakefile's first step)
    import jsonschema

    schema = yaml.safe_load(Path(schema_file).read_text())
    base = jsonschema.Draft202012Validator
    integers: list[tuple[dict, str]] = []  # integers where the schema says `number`: floats once valid

    def properties_with_defaults(validator, properties, instance, subschema):
        if isinstance(instance, dict):
            for name, prop in properties.items():
                if "default" in prop:
                    instance.setdefault(name, copy.deepcopy(prop["default"]))
                value = instance.get(name)
                if prop.get("type") == "number" and isinstance(value, int) and not isinstance(value, bool):
                    integers.append((instance, name))
        yield from base.VALIDATORS["properties"](validator, properties, instance, subschema)

    validator = jsonschema.validators.extend(base, {"properties": properties_with_defaults})(schema)
    error = jsonschema.exceptions.best_match(validator.iter_errors(config))
    if error is None:
        for instance, name in integers:  # `1` and `1.0` are one value: as floats, params compare equal
            instance[name] = float(instance[name])
        canonical(config)
        return
    path, problem = list(error.absolute_path), error.message
    if error.validator == "additionalProperties":  # name the unknown key itself
        known, patterns = error.schema.get("properties", {}), error.schema.get("patternProperties", {})
        extra = [k for k in error.instance if k not in known and not any(re.search(p, k) for p in patterns)]
        names = list(known) or [p.strip("^$()") for p in patterns]
        path, problem = [*path, extra[0]], f"unknown key (known: {', '.join(names)})"
    elif error.validator == "required":
        missing = next(k for k in error.validator_value if k not in error.instance)
        path, problem = [*path, missing], "missing"
    key = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".") or "(top level)"
    raise InputError(config_source(files, path), key, problem)


def canonical(value):
    """Sort every mapping's keys in place, recursively: Snakemake compares a dict param with its key order,
    so a config rewritten with its keys in another order would otherwise rerun every job."""
    if isinstance(value, dict):
        items = sorted(((key, canonical(item)) for key, item in value.items()), key=lambda kv: str(kv[0]))
        value.clear()
        value.update(items)
    elif isinstance(value, list):
        value[:] = [canonical(item) for item in value]
    return value


def in_config_file(exc: InputError, files: Sequence[str | Path]) -> InputError:
    """A problem found in a config value (source `config`), re-pointed at the config file that sets it."""
    if exc.source != "config":
        return exc
    key = [int(k) if k.isdigit() else k for k in exc.field.split(".")]
    return InputError(config_source(files, key), exc.field, exc.problem)


# Options added after results existed, left out of the hash while at their defaults: an axis made before
# they existed keeps its hash, and so is not made again for nothing.
LATER_DEFAULTS = {
    ("generate", "capture_activations"): False,
    ("activations", "backend"): "transformers",
    ("activations", "vllm"): {},
    ("judge", "transformers"): {},
}


# Keys that planning alone reads (no job does): left out of the hash, so editing them reruns nothing.
PLANNING_ONLY = {("judge", "openai"): ("prices",)}


def without_planning_keys(section: str, block: str, settings: dict) -> dict:
    """`settings` (the config's `<section>.<block>`) without the keys only planning reads."""
    drop = PLANNING_ONLY.get((section, block), ())
    return {k: v for k, v in settings.items() if k not in drop}


def sections_hash(config: dict, sections: Sequence[str] = AXIS_SECTIONS) -> str:
    """A hash of some sections of the config (by default those the axis is made from)."""
    made_from = {key: config.get(key) for key in sections}
    for section, block in PLANNING_ONLY:
        if isinstance(made_from.get(section), dict) and isinstance(made_from[section].get(block), dict):
            made_from[section] = {
                **made_from[section],
                block: without_planning_keys(section, block, made_from[section][block]),
            }
    for (section, key), default in LATER_DEFAULTS.items():
        if isinstance(made_from.get(section), dict) and made_from[section].get(key, default) == default:
            made_from[section] = {k: v for k, v in made_from[section].items() if k != key}
    return hashlib.sha256(json.dumps(made_from, sort_keys=True, default=str).encode()).hexdigest()[:16]
