"""pipeline/demo/compute.py: the demo's compute accounting (FLOPs by kind, token counts read from real shard sets)
and the break-even of the SFT curve, against hand-computed values."""

from __future__ import annotations

import math

import pyarrow as pa
import pytest

from pipeline.demo.compute import (
    Cost,
    answers_cost,
    break_even,
    rollouts_cost,
    scoring_cost,
    sequence_tokens,
)
from storage.shardset import ShardSet


def _samples(root, rows):
    """A samples shard set of (token_ids, prompt_len) rows, two shards."""
    s = ShardSet.create(root, "samples", {"role": "test"})
    half = len(rows) // 2
    for i, part in enumerate((rows[:half], rows[half:])):
        s.write_shard(i, pa.table({"token_ids": pa.array([r[0] for r in part], pa.list_(pa.int32())),
                                   "prompt_len": pa.array([r[1] for r in part], pa.int32())}))
    s.finalize(expected_shards=2)
    return s.root


def test_token_counts_and_flops_by_kind(tmp_path):
    root = _samples(tmp_path / "s", [([1] * 10, 4), ([1] * 7, 3), ([1] * 12, 5), ([1] * 5, 5)])
    assert sequence_tokens(root) == (4 + 3 + 5 + 5, 6 + 4 + 7 + 0)
    p = 1000
    answers = answers_cost(root, p, seconds=2.5)  # the teacher: prompts prefilled, answers decoded
    assert (answers.teacher_prefill_flops, answers.teacher_decode_flops) == (2 * p * 17, 2 * p * 17)
    assert answers.teacher_seconds == 2.5 and answers.student_flops == 0
    roll = rollouts_cost(root, 10, seconds=1.0)  # the student samples: the same split on its side
    assert (roll.student_prefill_flops, roll.student_decode_flops, roll.teacher_flops) == (2 * 10 * 17, 2 * 10 * 17, 0)
    score = scoring_cost(root, p, seconds=0.5)  # scoring: one prefill over every token, no decode
    assert score.teacher_prefill_flops == 2 * p * 34 and score.teacher_decode_flops == 0
    total = roll + score
    assert total.teacher_flops == 2 * p * 34 and total.student_flops == 2 * 10 * 34
    assert total.teacher_seconds == 0.5 and total.student_seconds == 1.0
    assert Cost(student_train_flops=6.0).to_dict()["student_flops"] == 6.0


def test_break_even_interpolates_in_log_flops_and_says_where():
    curve = [(1e9, 0.5), (1e10, 0.7), (1e11, 0.9)]
    # 0.8 lies halfway from 0.7 to 0.9: halfway in log10 between 1e10 and 1e11
    got = break_even(curve, 0.8)
    assert got["where"] == "within" and got["teacher_flops"] == pytest.approx(10 ** 10.5, rel=1e-3)
    assert break_even(curve, 0.6)["teacher_flops"] == pytest.approx(10 ** 9.5, rel=1e-3)
    assert break_even(curve, 0.4) == {"teacher_flops": 1e9, "where": "below"}
    assert break_even(curve, 0.95) == {"teacher_flops": None, "where": "above"}
    # a curve that dips: the first budget that reaches the target counts
    dip = [(1e9, 0.5), (1e10, 0.85), (1e11, 0.8), (1e12, 0.95)]
    assert math.log10(break_even(dip, 0.8)["teacher_flops"]) == pytest.approx(9 + 0.3 / 0.35, rel=1e-3)


def test_break_even_lines_read_every_case():
    """The demo's sentences for each break-even case (a budget beyond the curve has no FLOPs to print)."""
    from pipeline.demo.experiment import break_even_lines

    result = {"labels": {"a": "row a", "b": "row b", "c": "row c"},
              "sft_curve": [{"teacher_flops": 1e9}, {"teacher_flops": 4e9}],
              "break_even": {"a": {"teacher_flops": None, "where": "above", "accuracy": 0.9, "opd_teacher_flops": 2e9},
                             "b": {"teacher_flops": 1e9, "where": "below", "accuracy": 0.5, "opd_teacher_flops": 2e9},
                             "c": {"teacher_flops": 3e9, "where": "within", "accuracy": 0.7,
                                   "opd_teacher_flops": 2e9}}}
    a, b, c = break_even_lines(result)
    assert a.startswith("row a: 0.900 with 2.00e+09 teacher FLOPs") and "up to 4.00e+09" in a
    assert "smallest budget (1.00e+09" in b and "matched at 3.00e+09 teacher FLOPs" in c


def test_time_to_target_speedup_bound_and_a_target_the_start_already_meets():
    """Offline vs online seconds to the offline row's final probe accuracy, hand-computed: a speed-up when online
    gets there, a lower bound when it never does, and none when the SFT student's step-0 probe already reads it."""
    from pipeline.demo.experiment import time_to_target

    offline = [(0, 0.0, 0.80), (25, 5.0, 0.88), (50, 10.0, 0.90)]
    online = [(0, 0.0, 0.80), (25, 20.0, 0.85), (50, 40.0, 0.91)]
    t = time_to_target(offline, online, precompute_seconds=2.0)
    assert t["target_probe_accuracy"] == 0.90 and t["offline_seconds"] == 12.0 and t["online_seconds"] == 40.0
    assert t["speedup"] == round(40 / 12, 2) and t["speedup_lower_bound"] is None and not t["target_met_at_start"]

    never = time_to_target(offline, online[:2], precompute_seconds=2.0)
    assert never["online_seconds"] is None and never["speedup"] is None and never["speedup_lower_bound"] == 1.67

    at_start = time_to_target([(0, 0.0, 0.99), (50, 10.0, 0.99)], [(0, 0.0, 0.99), (50, 40.0, 0.995)], 2.0)
    assert at_start["target_met_at_start"] and at_start["online_seconds"] == 0.0
    assert at_start["speedup"] is None and at_start["speedup_lower_bound"] is None
