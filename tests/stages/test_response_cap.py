"""teacher_logprobs.max_response_tokens: a cap on the response alone (the reference scores rollouts truncated to
4,096 response tokens), applied before max_seq_len, which bounds prompt + response."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.config import TeacherLogprobsConfig
from pipeline.engines.base import ScoredSequence
from pipeline.stages.teacher_logprobs import score_table_rows


class EchoEngine:
    """Scores each position with log-prob -position (top-1 = the token itself): what was scored is visible."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[list[int]], list[int]]] = []

    def score(self, seqs: list[list[int]], starts: list[int], k: int) -> list[ScoredSequence]:
        self.calls.append((seqs, starts))
        out = []
        for seq, st in zip(seqs, starts):
            r = len(seq) - st
            lp = -np.arange(r, dtype=np.float32)
            out.append(ScoredSequence(lp, np.asarray(seq[st:], np.int32)[:, None], lp[:, None], lp - 1))
        return out


def rows(prompt_len: int, response_lens: list[int]) -> list[dict]:
    return [{"prompt_id": str(i), "sample_index": 0, "token_ids": list(range(1, prompt_len + n + 1)),
             "prompt_len": prompt_len, "behavior_logprobs": [-0.5] * n, "reward": None}
            for i, n in enumerate(response_lens)]


def test_responses_are_cut_to_the_cap_before_the_total_length():
    engine = EchoEngine()
    records, stats = score_table_rows(engine, rows(10, [3, 8, 20]), 1, None, max_seq_len=25, overlong="truncate",
                                      max_response_tokens=8)
    assert [r.num_response_tokens for r in records] == [3, 8, 8]
    assert stats == {"truncated": 0, "skipped": 0, "response_capped": 1}
    assert all(len(r.behavior_logprobs) == r.num_response_tokens for r in records)
    # the total-length bound still applies after the cap: a 30-token prompt leaves 5 response tokens
    records, stats = score_table_rows(EchoEngine(), rows(20, [12]), 1, None, max_seq_len=25, overlong="truncate",
                                      max_response_tokens=8)
    assert [r.num_response_tokens for r in records] == [5] and stats["truncated"] == 1
    assert stats["response_capped"] == 1


def test_no_cap_scores_whole_responses():
    records, stats = score_table_rows(EchoEngine(), rows(4, [30]), 1, None, None, "truncate")
    assert records[0].num_response_tokens == 30 and stats["response_capped"] == 0


def test_the_cap_is_a_checked_config_field():
    base = dict(rollouts="r", teacher="t", out="o")
    assert TeacherLogprobsConfig(**base).max_response_tokens is None
    assert TeacherLogprobsConfig(**base, max_response_tokens=4096).max_response_tokens == 4096
    with pytest.raises(ValueError, match="max_response_tokens"):
        TeacherLogprobsConfig(**base, max_response_tokens=0)
