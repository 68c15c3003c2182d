"""calibrate: the capping thresholds, percentiles of the default replies' projections."""

from __future__ import annotations

import pandas as pd
import torch

from assistant_axis import plots as figures
from assistant_axis.activations import token_projections
from assistant_axis.artifacts import read_parquet, read_tensors, write_parquet
from assistant_axis.axis import unit_vectors
from assistant_axis.cap import CALIBRATION_PERCENTILES, CappingConfig, layer_range, percentile_thresholds
from assistant_axis.errors import InputError
from assistant_axis.models import load_model
from assistant_axis.plan.params import CapSetting
from assistant_axis.provenance import describe_model, provenance
from assistant_axis.stages.common import (
    LAYER_KEYS,
    MODEL_KEYS,
    RENDERING_KEYS,
    RESPONSE_COLUMNS,
    axis_and_layer,
    config_keys,
    log,
    model_info,
    rendered_replies,
)
from assistant_axis.templates import ChatTemplate


@config_keys({**MODEL_KEYS, **LAYER_KEYS, "layer_range.fractions": "capping.ranges"})
def calibrate(
    default_activations: str,
    axis_file: str,
    model: str,
    ranges: dict[str, list[float]],
    percentiles: list[float],
    table: str,
    configs: dict[str, str],
    plot: str,
    calibration: str = "token",
    responses: str | None = None,
    compute_dtype: str = "float32",
    batch_tokens: int = 8192,
    blocks: str | None = None,
    trust_remote_code: bool = False,
    template_options: dict | None = None,
) -> None:
    """Percentiles of the default replies' projections per layer, and one capping config per range x percentile.

    `model` is the prepared model's manifest (`model.json`): layer ranges are fractions of its depth.
    `calibration` is what a projection is: `token`, every token of every default reply (capping acts on every
    token), which loads the model and renders the replies of `responses` (the default role's table) as the
    activations stage does (`template_options`, `compute_dtype`, `batch_tokens`, `blocks`); or `reply`, each
    reply's mean activation from `default_activations`, one per reply, without the model.
    """

    if calibration not in ("token", "reply"):
        raise InputError("config", "capping.calibration", f"expected 'token' or 'reply', got {calibration!r}")
    info = model_info(model)
    model, n_layers = info["name"], info["n_layers"]
    axis_tensor, layers, _, meta = axis_and_layer(axis_file, None)
    tensors, act_meta = read_tensors(default_activations, ["activations", "layers"])
    if tensors["layers"].tolist() != layers:
        raise InputError(default_activations, "layers", "activation layers differ from the axis's: rerun the axis")
    if act_meta.get("model", model) != model or meta.get("model", model) != model:
        raise InputError(axis_file, "model", f"axis of model {meta.get('model')!r}, expected {model!r}")
    rendering = {k: v for k, v in read_tensors(axis_file)[1].items() if k in RENDERING_KEYS}  # as written
    settings = {name: CapSetting.parse(name) for name in configs}
    chosen_layers = {}  # checked before any model runs
    for name, setting in settings.items():
        chosen = layer_range(ranges[setting.range_name], n_layers)
        missing = [layer for layer in chosen if layer not in layers]
        if missing:
            raise InputError("config", f"capping.ranges.{setting.range_name}", f"layer {missing[0]} has no activations")
        chosen_layers[name] = chosen
    units = unit_vectors(axis_tensor[layers])
    if calibration == "reply":
        projections = torch.einsum("nlh,lh->nl", tensors["activations"].float(), units)
    else:
        if responses is None:
            raise InputError("workflow", "calibrate", "token calibration needs the default role's responses")
        frame = read_parquet(responses, RESPONSE_COLUMNS)
        if len(frame) != len(tensors["activations"]):
            raise InputError(
                responses,
                "response",
                f"{len(frame)} responses but {default_activations} has "
                f"{len(tensors['activations'])} rows: rerun the activations",
            )
        net, tokenizer = load_model(info["path"], compute_dtype, trust_remote_code=trust_remote_code)
        template = ChatTemplate(tokenizer, template_options, info["name"])
        for key, value in template.metadata().items():
            if key in rendering and rendering[key] != value:
                raise InputError(
                    axis_file,
                    key,
                    f"the axis was rendered with {rendering[key]!r}, calibration "
                    f"would render with {value!r}: rerun the activations with the same template",
                )
        sequences, spans = rendered_replies(template, [responses], [frame])
        n_tokens = sum(max(end - start, 0) for start, end in spans)
        if not n_tokens:
            raise InputError(responses, "response", "no reply tokens to calibrate on (every reply is empty)")
        if n_tokens > 2**24:  # torch.quantile's limit
            raise InputError(
                responses,
                "response",
                f"{n_tokens} reply tokens, more than the 2^24 percentiles can be "
                "taken over: calibrate on fewer default replies, or with capping.calibration: reply",
            )
        projections = token_projections(
            net, sequences, spans, layers, units, batch_tokens=batch_tokens, blocks_path=blocks
        )
        del net
    n_used = int(torch.isfinite(projections).all(dim=1).sum())
    log.info("calibrating on %d %s projections per layer", n_used, calibration)
    wanted = sorted({*CALIBRATION_PERCENTILES, *percentiles})
    values = percentile_thresholds(projections, wanted)
    frame = pd.DataFrame(
        {
            "layer": layers,
            "calibration": calibration,
            "n": n_used,
            "mean": projections.nanmean(dim=0).numpy(),
            **{f"p{q:g}": values[k].numpy() for k, q in enumerate(wanted)},
        }
    )
    capped = {}
    for name, path in configs.items():
        setting, chosen = settings[name], chosen_layers[name]
        rows = [layers.index(layer) for layer in chosen]
        taus = values[wanted.index(setting.percentile)][rows]
        CappingConfig(chosen, units[rows], taus, model).save(
            path,
            **provenance(
                "capping",
                describe_model(info),
                rendering,
                percentile=setting.percentile,
                range=setting.range_name,
                fractions=list(ranges[setting.range_name]),
                calibration=calibration,
            ),
        )
        capped[name] = (chosen, taus.tolist())
        log.info("capping %s: layers %s, thresholds %s", name, chosen, [round(t, 2) for t in taus.tolist()])
    write_parquet(frame, table)
    figures.thresholds(frame, capped, plot)
