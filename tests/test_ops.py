"""The ops a vLLM engine's model carries (`engines.vllm.ops`), without an engine: what they compute against
the transformers path's interventions, that their registrations are sound (schemas, fake implementations,
declared mutations: `torch.library.opcheck`), and that nothing in them could break a CUDA graph (no host
synchronisation, no branch on data: read from the source, and traced whole by Dynamo)."""

from __future__ import annotations

import ast
import inspect
import math

import pytest
import torch

from assistant_axis.cap import CappingConfig
from assistant_axis.engines.vllm import ops
from assistant_axis.engines.vllm.ops import edit_rows, measure_rows, record_rows, settings_stages
from assistant_axis.steer import Steering

H, N, SETTINGS = 16, 12, 4


def tables(stages: int = 1):
    """Setting 1 caps (floor 0.5 along e0), 2 steers by 3 * e1 at the last position only, 3 steers by e2
    and then caps (floor 1 along e2, ceiling 2)."""
    adds = torch.zeros(stages, SETTINGS, H)
    units = torch.zeros(stages, SETTINGS, H)
    floors = torch.full((stages, SETTINGS), -math.inf)
    ceilings = torch.full((stages, SETTINGS), math.inf)
    last_only = torch.zeros(stages, SETTINGS, dtype=torch.bool)
    units[0, 1, 0], floors[0, 1] = 1.0, 0.5
    adds[0, 2, 1], last_only[0, 2] = 3.0, True
    adds[0, 3, 2], units[0, 3, 2], floors[0, 3], ceilings[0, 3] = 1.0, 1.0, 1.0, 2.0
    return adds, units, floors, ceilings, last_only


def rows():
    torch.manual_seed(0)
    stream = torch.randn(N, H)
    setting = torch.tensor([0, 1, 2, 3] * 3)
    last = torch.tensor([False] * 6 + [True] * 6)
    return stream, setting, last


def test_each_rows_edit_is_its_settings_intervention_and_other_rows_keep_their_bits():
    stream, setting, last = rows()
    monitor = torch.nn.functional.normalize(torch.ones(H), dim=0)
    edited, fired, before = edit_rows(stream, setting, last, *tables(), monitor)
    none = setting == 0
    assert torch.equal(edited[none], stream[none])
    cap = CappingConfig([0], torch.eye(H)[:1], torch.tensor([0.5]), "m")
    for r in torch.nonzero(setting == 1).flatten().tolist():
        torch.testing.assert_close(edited[r], cap.edit(0, stream[r]), rtol=0, atol=1e-6)
        assert bool(fired[r]) == (float(stream[r, 0]) < 0.5)
    steer = Steering([0], 3.0 * torch.eye(H)[1:2], 3.0)
    for r in torch.nonzero(setting == 2).flatten().tolist():
        want = steer.edit(0, stream[r]) if last[r] else stream[r]
        assert torch.equal(edited[r], want) and fired[r] == 0
    band = CappingConfig([0], torch.eye(H)[2:3], torch.tensor([1.0]), "m", upper=torch.tensor([2.0]))
    for r in torch.nonzero(setting == 3).flatten().tolist():
        steered = stream[r] + torch.eye(H)[2]
        torch.testing.assert_close(edited[r], band.edit(0, steered), rtol=0, atol=1e-6)
        assert 1.0 - 1e-6 <= float(edited[r, 2]) <= 2.0 + 1e-6
        # Firing is measured against the stream after the setting's own steering, before its cap.
        assert float(before[r]) == pytest.approx(float(steered @ monitor), abs=1e-5)
        assert bool(fired[r]) == (not 1.0 <= float(steered[2]) <= 2.0)


def test_measure_and_record_add_each_row_into_its_slot_and_the_rest_into_the_sink():
    stream, setting, last = rows()
    unit = torch.nn.functional.normalize(torch.ones(H), dim=0)
    edited, fired, before = edit_rows(stream, setting, last, *tables(), unit)
    slot = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 3, 3, 3, 3])  # slot 3 is the sink
    sums = torch.zeros(4, 2, 3)
    measure_rows(edited, slot, unit, fired, before, sums, 1)
    recorded = torch.zeros(4, 1, H)
    record_rows(edited, slot, recorded, 0)
    assert not sums[:, 0].any()
    for s in range(3):
        mine = slot == s
        after = edited[mine] @ unit
        torch.testing.assert_close(sums[s, 1, 0], after.sum())
        assert float(sums[s, 1, 1]) == float(fired[mine].sum())
        change = torch.where(fired[mine] > 0, after - before[mine], 0.0)
        torch.testing.assert_close(sums[s, 1, 2], change.sum())
        torch.testing.assert_close(recorded[s, 0], edited[mine].sum(0))


def test_a_steer_then_a_cap_share_a_stage_and_a_cap_then_a_steer_take_two():
    cap = CappingConfig([3, 4], torch.eye(H)[:2], torch.zeros(2), "m")
    steer = Steering([4], torch.ones(1, H), 1.0)
    assert [len(s) for s in settings_stages([steer, cap])[4]] == [2]
    assert [len(s) for s in settings_stages([cap, steer])[4]] == [1, 1]
    assert [len(s) for s in settings_stages([cap, steer])[3]] == [1]


def test_the_registered_ops_pass_torchs_opcheck():
    """Schemas, fake implementations (what the compiler traces with) and the declared mutations."""
    stream, setting, last = rows()
    unit = torch.nn.functional.normalize(torch.ones(H), dim=0)
    edit_args = (stream, setting, last, *tables(), unit)
    torch.library.opcheck(torch.ops.assistant_axis.edit.default, edit_args)
    edited, fired, before = torch.ops.assistant_axis.edit(*edit_args)
    slot = torch.tensor([0, 1, 2] * 4)
    torch.library.opcheck(
        torch.ops.assistant_axis.measure.default, (edited, slot, unit, fired, before, torch.zeros(4, 2, 3), 0)
    )
    torch.library.opcheck(torch.ops.assistant_axis.record.default, (edited, slot, torch.zeros(4, 1, H), 0))


@pytest.mark.parametrize("custom", [True, False])
def test_the_ops_trace_as_one_graph_with_dynamic_rows(custom):
    """Dynamo traces a block's worth of them without a break (`fullgraph`), for any number of rows: no data
    reaches Python."""
    edit, measure, record = ops.operations(custom)
    unit = torch.nn.functional.normalize(torch.ones(H), dim=0)
    setting_table, slot_table, last_table = (
        torch.zeros(64, dtype=torch.long),
        torch.full((64,), 3),
        torch.zeros(64, dtype=torch.bool),
    )
    sums, recorded, t = torch.zeros(4, 1, 3), torch.zeros(4, 1, H), tables()

    def block(stream):
        n = stream.shape[0]
        edited, fired, before = edit(stream, setting_table[:n], last_table[:n], *t, unit)
        measure(edited, slot_table[:n], unit, fired, before, sums, 0)
        record(edited, slot_table[:n], recorded, 0)
        return edited

    compiled = torch.compile(block, fullgraph=True, dynamic=True, backend="eager")
    setting_table[:12] = rows()[1]
    slot_table[:12] = 0
    for n in (12, 7):
        stream = torch.randn(n, H)
        sums.zero_()
        torch.testing.assert_close(compiled(stream), block(stream.clone()))
        assert sums[0, 0, 0] != 0  # the mutation happened inside the compiled function


def test_nothing_in_the_ops_synchronises_with_the_host_or_branches_on_data():
    """CUDA-graph safety by construction: no `.item()`, `.cpu()`, `.tolist()`, `.numpy()`, no Python number
    taken from a tensor, and every `if` asks only whether an optional argument was given."""
    for function in (edit_rows, measure_rows, record_rows):
        tree = ast.parse(inspect.getsource(function))
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute):
                assert node.attr not in {"item", "cpu", "tolist", "numpy", "nonzero"}, (
                    f"{function.__name__}: .{node.attr}"
                )
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                assert node.func.id not in {"float", "int", "bool"}, f"{function.__name__}: {node.func.id}()"
            if isinstance(node, ast.If | ast.IfExp | ast.While):
                tests = node.test.values if isinstance(node.test, ast.BoolOp) else [node.test]
                for test in tests:
                    assert isinstance(test, ast.Compare) and isinstance(test.ops[0], ast.Is | ast.IsNot), (
                        f"{function.__name__}: a branch on {ast.unparse(test)}"
                    )
