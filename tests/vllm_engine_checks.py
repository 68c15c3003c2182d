"""A hooked vLLM engine set up as a GPU user gets one, in a process of its own (one hooked engine per
process): compiled (vLLM's default; MODE `eager` sets `enforce_eager`), `VLLM_USE_V2_MODEL_RUNNER=1` in
the environment as the caller sets it (vLLM's default wherever Triton is installed), prefix caching on
with KV blocks of 32 tokens (16 on a GPU; the CPU build takes multiples of 32), a KV cache small enough
to preempt, and vLLM's stats on to count both. Its ops: edits and telemetry on the capping config's
layers, recording there and at layer 3.

    python tests/vllm_engine_checks.py MODEL_DIR AXIS CAPPING OUT.json [TENSOR_PARALLEL [MODE]]

Prefills run in chunks of 128 tokens (`max_num_batched_tokens`), so a long prompt takes several steps.
Writes what it saw; tests/test_vllm_serve.py asserts on it:
- "compilation": the engine's compilation mode;
- "mixed": four settings in one batch on the same token ids, teacher-forced, then a setting added after
  the start, and each token of a greedy reply under it (`mixed_settings`);
- "long_recording": a prompt of several chunks recorded at three layers (`long_recording`);
- "runner": the engine config's use_v2_model_runner and the setting as this process holds it;
- "prefix": one long system prompt asked uncapped and then capped, the capped one again (same setting:
  served from the cache), and alone after `reset_prefix_cache()`: tokens, telemetry, cache hits;
- "preemption": replies generated all at once (preempted) and one at a time: tokens, telemetry, and
  the recorder's means of the same replies; the preemption count;
- "tensor_parallel": 6 greedy replies under three settings (uncapped, capped, steered and capped) in
  one batch, each one's tokens and telemetry after every step;
- "steer_last": a prompt of several chunks steered at its last position, under the recorder: how many
  of its rows the steering moved.
With TENSOR_PARALLEL > 1 (worker processes of their own) only the last two are run.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from transformers import AutoConfig
from vllm import SamplingParams
from vllm.inputs import TokensPrompt

from assistant_axis.axis import load_axis, unit_rows
from assistant_axis.cap import CappingConfig
from assistant_axis.engines import Sampling
from assistant_axis.engines.vllm.engine import EXTRA_ARGS_KEY, hooked_engine, vllm_engine_args
from assistant_axis.engines.vllm.hooks import ActivationRecorder, EngineHooks
from assistant_axis.engines.vllm.ops import Layout
from assistant_axis.engines.vllm.session import VLLMSession
from assistant_axis.interop import load_capping
from assistant_axis.layers import config_dims
from assistant_axis.models import load_tokenizer
from assistant_axis.steer import Steering
from assistant_axis.templates import ChatTemplate

BLOCK = 32
CHUNK = 128
GREEDY = Sampling(temperature=0.0, top_p=1.0, max_tokens=16)
LONG = Sampling(temperature=0.0, top_p=1.0, max_tokens=64)
GREEDY_24 = {"temperature": 0.0, "max_tokens": 24}
SYSTEM = " ".join(
    f"Rule {i}: answer as the lighthouse keeper of the northern cape, who logs every ship, storm and gull."
    for i in range(1, 16)
)
QUESTIONS = [
    "Who are you?",
    "What did you see last night?",
    "Tell me about the storms.",
    "What do you eat?",
    "How do you keep the lamp lit?",
    "Do you ever leave the cape?",
    "What is the loneliest part of the job?",
    "Describe the sea at dawn.",
]


def counter(llm, name: str) -> float:
    return sum(m.value for m in llm.get_metrics() if m.name == name and hasattr(m, "value"))


def keep_telemetry(session: VLLMSession) -> dict:
    """Each finished request's telemetry by key, as the session pops it (for the count of tokens measured)."""
    kept, pop = {}, session.hooks.pop

    def popped(key):
        kept[key] = pop(key)
        return kept[key]

    session.hooks.pop = popped
    return kept


def result(stream, kept: dict) -> dict:
    answer = stream.result()
    return {"tokens": answer.token_ids, "projection": answer.projection, "measured": kept[stream.key].tokens}


def reply(session: VLLMSession, kept: dict, messages: list[dict], setting: str, sampling: Sampling) -> dict:
    return result(session.submit(messages, sampling, setting=setting), kept)


def tensor_parallel(llm, template: ChatTemplate, units, capping, steering: Steering) -> dict:
    """Mixed settings in one batch, stepped by hand: every request's tokens and running telemetry per step."""
    settings = {"none": [], "late-p25": [capping], "steered-late-p25": [steering, capping]}
    hooks = EngineHooks(llm, units, capping.layers, settings)
    engine, seen = llm.llm_engine, {}
    llm.reset_prefix_cache()
    for i, (question, setting) in enumerate(zip(QUESTIONS[:6], [*settings] * 2, strict=True)):
        ids = template.ids([{"role": "user", "content": question}], add_generation_prompt=True)
        key = f"tp{i}"
        engine.add_request(key, hooks.prompt(setting, ids), hooks.sampling_params(setting, key, **GREEDY_24))
        seen[key] = {"setting": setting, "tokens": [], "steps": []}
    while engine.has_unfinished_requests():
        outputs = engine.step()
        hooks.collect()
        for output in outputs:
            seen[output.request_id]["tokens"] = list(output.outputs[0].token_ids)
        for key, request in seen.items():
            telemetry = hooks.peek(key)
            if telemetry.tokens and (not request["steps"] or request["steps"][-1]["tokens"] != telemetry.tokens):
                request["steps"].append(telemetry.as_dict())
    for key in seen:
        hooks.pop(key)
    hooks.remove()
    return seen


def steer_last(llm, template: ChatTemplate, direction, layer: int) -> dict:
    """A prompt of several prefill chunks, uncapped and steered at its last position (`positions="last"`),
    with the recorder after the hooks at the steered layer: (steered - plain) summed over the prompt's
    rows, along the steering, in units of the steering, is the number of rows it moved."""
    coefficient = 8.0
    steering = Steering.along(direction, [layer], coefficient, positions="last")
    hooks = EngineHooks(llm, direction, [layer], {"none": [], "steer-last": [steering]})
    recorder = ActivationRecorder(llm, [layer])
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTIONS[1]}]
    ids = template.ids(messages, add_generation_prompt=True)
    prompts, params = [], []
    for setting in ("none", "steer-last"):
        extra = {"key": setting, "setting": setting, "span": [0, len(ids)]}
        prompts.append(hooks.prompt(setting, ids))
        params.append(SamplingParams(temperature=0.0, max_tokens=1, extra_args={EXTRA_ARGS_KEY: extra}))
    llm.reset_prefix_cache()
    llm.generate(prompts, params, use_tqdm=False)
    means, counts = recorder.pop(["none", "steer-last"])
    recorder.remove()
    hooks.remove()
    shift = (means[1, 0] - means[0, 0]).double() * len(ids)
    unit = direction[0].double() / direction[0].double().norm()
    along = float(shift @ unit)
    return {
        "prompt_tokens": len(ids),
        "chunk": CHUNK,
        "counts": counts,
        "steered_rows": along / coefficient,
        "off_steering": float((shift - along * unit).norm() / coefficient),
    }


FORCED = "Sure. I keep the lamp, I log the ships and I watch the storms come in from the north, every night."


def mixed_settings(llm, template: ChatTemplate, units, capping, steering: Steering) -> dict:
    """Teacher-forced: the same token sequences (a question and a fixed answer) measured over the answer
    under four settings in one batch, then under a setting added afterwards (a floor 2 higher): each
    request's telemetry. The eager in-process engine runs this too (tests/test_vllm_serve.py), to compare
    with a compiled one."""
    settings = {"none": [], "late-p25": [capping], "steered-late-p25": [steering, capping], "steered": [steering]}
    hooks = EngineHooks(llm, units, capping.layers, settings)
    answer = template.tokenizer.encode(FORCED, add_special_tokens=False)
    sequences = []
    for question in QUESTIONS[:3]:
        prompt = template.ids([{"role": "user", "content": question}], add_generation_prompt=True)
        sequences.append((prompt + answer, len(prompt)))

    def measure(names: list[str], tag: str) -> dict:
        prompts, params, keys = [], [], []
        for setting in names:
            for i, (ids, start) in enumerate(sequences):
                key = f"{tag}-{setting}-{i}"
                extra = {"key": key, "setting": setting, "span": [start, len(ids)]}
                prompts.append({"prompt_token_ids": ids, "cache_salt": key})
                params.append(SamplingParams(temperature=0.0, max_tokens=1, extra_args={EXTRA_ARGS_KEY: extra}))
                keys.append(key)
        llm.generate(prompts, params, use_tqdm=False)
        return {key: hooks.pop(key).as_dict() for key in keys}

    seen = {"first": measure(list(settings), "m")}
    tight = CappingConfig(capping.layers, capping.vectors, capping.thresholds + 2.0, capping.model)
    hooks.add_setting("tight", [tight])
    seen["added"] = measure(["tight", "late-p25"], "a")
    seen["tight_tau"] = tight.thresholds.tolist()
    # Every token of greedy replies under the added setting, each measured alone (a span of one token).
    start = sequences[0][1]
    ids = sequences[0][0][:start]
    key = "tight-reply"
    params = hooks.sampling_params("tight", key, temperature=0.0, max_tokens=16)
    out = llm.generate([hooks.prompt("tight", ids)], [params], use_tqdm=False)
    hooks.pop(key)
    full = ids + list(out[0].outputs[0].token_ids)
    prompts, params, keys = [], [], []
    for position in range(start, len(full) - 1):
        key = f"token-{position}"
        extra = {"key": key, "setting": "tight", "span": [position, position + 1]}
        prompts.append({"prompt_token_ids": full[: position + 1], "cache_salt": key})
        params.append(SamplingParams(temperature=0.0, max_tokens=1, extra_args={EXTRA_ARGS_KEY: extra}))
        keys.append(key)
    llm.generate(prompts, params, use_tqdm=False)
    seen["tight_tokens"] = [hooks.pop(key).projection for key in keys]
    hooks.remove()
    return seen


def long_recording(llm, template: ChatTemplate, layers: list[int]) -> dict:
    """A prompt of several prefill chunks recorded at a subset of layers over most of it: the means, for
    tests/test_vllm_serve.py to compare with the transformers path's on the same tokens."""
    recorder = ActivationRecorder(llm, layers)
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTIONS[2]}]
    ids = template.ids(messages, add_generation_prompt=True)
    span = [5, len(ids) - 3]
    params = recorder.sampling_params("long", span, temperature=0.0, max_tokens=1)
    llm.generate([{"prompt_token_ids": ids, "cache_salt": "long"}], [params], use_tqdm=False)
    means, counts = recorder.pop(["long"])
    recorder.remove()
    return {"ids": ids, "span": span, "layers": layers, "means": means[0].tolist(), "count": counts[0]}


def main(model_dir: str, axis_path: str, capping_path: str, out: str, tp: str = "1", mode: str = "compiled") -> None:
    n_layers, hidden = config_dims(AutoConfig.from_pretrained(model_dir))
    axis, axis_layers, _ = load_axis(axis_path, n_layers=n_layers, hidden_size=hidden)
    capping = load_capping(capping_path).normalized()
    units = unit_rows(axis, axis_layers, capping.layers, hidden)
    engine = {
        "block_size": BLOCK,
        "enable_prefix_caching": True,
        "kv_cache_memory_bytes": 24 * BLOCK * 30 * 2 * 3 * 64 * 4,  # 24 blocks of 32 tokens (SmolLM2, float32)
        "max_model_len": 512,
        "max_num_seqs": 8,
        "max_num_batched_tokens": CHUNK,
        "tensor_parallel_size": int(tp),
        "enforce_eager": mode == "eager",
    }
    args = {**vllm_engine_args(model_dir, engine, "test", "float32"), "disable_log_stats": False}
    # The ops where the checks need them: edits and telemetry on the capped layers, recording there and at 3.
    layout = Layout(edit=capping.layers, measure=capping.layers, record=[*capping.layers, 3], stages=2)
    began = time.perf_counter()
    llm = hooked_engine(args, layout=layout)
    print(f"engine started in {time.perf_counter() - began:.1f} s", flush=True)
    template = ChatTemplate(load_tokenizer(model_dir), {}, model_dir)
    steering = Steering.along(units[0], capping.layers[:1], 4.0)
    seen = {}
    if int(tp) > 1:
        seen["tensor_parallel"] = tensor_parallel(llm, template, units, capping, steering)
        seen["steer_last"] = steer_last(llm, template, units[:1], capping.layers[0])
        Path(out).write_text(json.dumps(seen))
        llm.llm_engine.engine_core.shutdown()
        return
    seen["compilation"] = llm.llm_engine.vllm_config.compilation_config.mode
    seen["mixed"] = mixed_settings(llm, template, units, capping, steering)
    seen["long_recording"] = long_recording(llm, template, [capping.layers[0], capping.layers[-1], 3])
    print(f"compiled checks done at {time.perf_counter() - began:.1f} s", flush=True)
    seen["runner"] = {"use_v2_model_runner": llm.llm_engine.vllm_config.use_v2_model_runner}
    seen["runner"]["setting"] = os.environ.get("VLLM_USE_V2_MODEL_RUNNER")
    session = VLLMSession(llm, template, units, capping.layers, {"late-p25": capping})
    kept = keep_telemetry(session)

    # Prefix cache: a system prompt many blocks long, uncapped first, as the evaluate stage submits it.
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTIONS[0]}]
    prompt = template.ids(messages, add_generation_prompt=True)
    llm.reset_prefix_cache()
    uncapped = reply(session, kept, messages, "none", GREEDY)
    hits = counter(llm, "vllm:prefix_cache_hits")
    after = reply(session, kept, messages, "late-p25", GREEDY)
    hits_after = counter(llm, "vllm:prefix_cache_hits") - hits
    again = reply(session, kept, messages, "late-p25", GREEDY)
    hits_again = counter(llm, "vllm:prefix_cache_hits") - hits - hits_after
    llm.reset_prefix_cache()
    alone = reply(session, kept, messages, "late-p25", GREEDY)
    seen["prefix"] = {
        "prompt_tokens": len(prompt),
        "uncapped": uncapped,
        "capped_after_uncapped": after,
        "capped_again": again,
        "capped_alone": alone,
        "hits_capped_after_uncapped": hits_after,
        "hits_capped_again": hits_again,
    }

    print(f"prefix checks done at {time.perf_counter() - began:.1f} s", flush=True)
    # Preemption: 8 replies of 64 tokens at once need ~32 blocks; the cache holds 24.
    conversations = [[{"role": "user", "content": q}] for q in QUESTIONS]
    settings = ["late-p25", "none"] * 4
    llm.reset_prefix_cache()
    preemptions = counter(llm, "vllm:num_preemptions")
    streams = [session.submit(c, LONG, setting=s) for c, s in zip(conversations, settings, strict=True)]
    together = [result(stream, kept) for stream in streams]
    preempted = counter(llm, "vllm:num_preemptions") - preemptions
    one_by_one = []
    for c, s in zip(conversations, settings, strict=True):
        llm.reset_prefix_cache()
        one_by_one.append(reply(session, kept, c, s, LONG))
    session.close()

    # The recorder under preemption, recording replies as they are generated (the capture path): all at
    # once and one at a time.
    recorder = ActivationRecorder(llm, capping.layers)
    prompts = [TokensPrompt(prompt_token_ids=template.ids(c, add_generation_prompt=True)) for c in conversations]
    params = [
        recorder.sampling_params(f"all{i}", temperature=0.0, max_tokens=LONG.max_tokens) for i in range(len(prompts))
    ]
    llm.reset_prefix_cache()
    before = counter(llm, "vllm:num_preemptions")
    outs = llm.generate(prompts, params, use_tqdm=False)
    recorded_preemptions = counter(llm, "vllm:num_preemptions") - before
    means, counts = recorder.pop([f"all{i}" for i in range(len(prompts))])
    single_means, single_counts, single_tokens = [], [], []
    for i, p in enumerate(prompts):
        llm.reset_prefix_cache()
        alone = recorder.sampling_params(f"one{i}", temperature=0.0, max_tokens=LONG.max_tokens)
        single = llm.generate([p], [alone], use_tqdm=False)
        m, n = recorder.pop([f"one{i}"])
        single_means.append(m[0])
        single_counts += n
        single_tokens.append(list(single[0].outputs[0].token_ids))
    recorder.remove()
    print(f"preemption checks done at {time.perf_counter() - began:.1f} s", flush=True)
    seen["tensor_parallel"] = tensor_parallel(llm, template, units, capping, steering)
    seen["steer_last"] = steer_last(llm, template, units[:1], capping.layers[0])
    print(f"all done at {time.perf_counter() - began:.1f} s", flush=True)
    seen["preemption"] = {
        "preemptions": preempted,
        "together": together,
        "one_by_one": one_by_one,
        "recorder_preemptions": recorded_preemptions,
        "recorder_tokens": [list(o.outputs[0].token_ids) for o in outs],
        "recorder_counts": counts,
        "recorder_single_tokens": single_tokens,
        "recorder_single_counts": single_counts,
        "recorder_max_diff": [
            float((a - b).norm(dim=-1).max() / b.norm(dim=-1).max()) for a, b in zip(means, single_means, strict=True)
        ],
    }
    Path(out).write_text(json.dumps(seen))
    llm.llm_engine.engine_core.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
