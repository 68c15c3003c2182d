"""Counting each position once (`vllm_engine.count_once`), by construction: the schedules vLLM makes on a
GPU (preemption with recomputation, prefix-cache hits, async scheduling's step past the end of turn) fed
through the same accounting the hooks and the recorder use, against the schedule without them.
The same accounting on a real engine: tests/test_vllm_serve.py and tests/vllm_engine_checks.py."""

from __future__ import annotations

import math

from assistant_axis.engines.vllm.engine import ScheduledRequest, count_once


def _counted(steps: list[tuple[int, int, bool]], prompt_len: int, since=None, until=math.inf) -> list[int]:
    """The positions counted over a request's steps, each step (first position, rows, ends_turn), with
    the high-water mark the hooks keep."""
    seen, positions = {}, []
    for first, rows, ends_turn in steps:
        request = ScheduledRequest("r", None, prompt_len, 100, 100 + rows, first, ends_turn)
        a, b = count_once(seen, "r", request, prompt_len if since is None else since, until)
        positions += [first + row - 100 for row in range(a, b)]
    return positions


def test_a_preempted_request_counts_each_reply_position_once():
    # Prompt of 10 tokens, prefilled in two chunks, then 5 decode steps (positions 10..14 fed back).
    plain = [(0, 6, False), (6, 4, False), *[(p, 1, False) for p in range(10, 15)]]
    # Preempted after position 12: recomputed from position 0 (prompt and reply so far in one prefill),
    # then decoding goes on.
    preempted = [(0, 6, False), (6, 4, False), (10, 1, False), (11, 1, False), (12, 1, False), (0, 13, False)]
    preempted += [(13, 1, False), (14, 1, False)]
    assert _counted(plain, 10) == list(range(10, 15))
    assert _counted(preempted, 10) == list(range(10, 15))
    # Resumed from a prefix-cache hit partway (its first 8 positions cached): the same.
    resumed = [*preempted[:5], (8, 5, False), (13, 1, False), (14, 1, False)]
    assert _counted(resumed, 10) == list(range(10, 15))


def test_a_recorded_span_counts_each_position_once_under_preemption():
    span = (4, 12)  # positions 4..11: part prompt, part reply
    plain = [(0, 10, False), *[(p, 1, False) for p in range(10, 14)]]
    preempted = [(0, 10, False), (10, 1, False), (0, 11, False), *[(p, 1, False) for p in range(11, 14)]]
    assert _counted(plain, 10, *span) == list(range(4, 12))
    assert _counted(preempted, 10, *span) == list(range(4, 12))


def test_the_step_past_the_end_of_turn_counts_nothing():
    # Async scheduling: the reply sampled its end-of-turn token at the step fed position 12, and gets one
    # more step that feeds that token back at position 13. Without async scheduling that step never comes.
    sync = [(0, 10, False), (10, 1, False), (11, 1, False), (12, 1, False)]
    async_ = [*sync, (13, 1, True)]
    assert _counted(async_, 10) == _counted(sync, 10) == [10, 11, 12]
    # A chunk whose last row is that token (a recomputation that ends on it) keeps its other rows.
    assert _counted([(0, 10, False), (10, 4, True)], 10) == [10, 11, 12]
