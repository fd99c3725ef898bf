"""pipeline/fingerprint.py: the trainer's teacher check on the shard metadata."""

from __future__ import annotations

import pytest

from pipeline.fingerprint import TeacherMismatchError, check_shard_teacher


def test_the_trainers_teacher_check_reads_the_shard_metadata():
    """Consistent, self-distillation and a mismatch allowed at extraction pass (and say which); any other mismatch
    is refused naming where it is."""
    assert check_shard_teacher({"teacher_fingerprint": "m-a", "sft_teacher_fingerprint": "m-a"}, "x") == "consistent"
    assert check_shard_teacher({"teacher_fingerprint": "m-s", "sft_teacher_fingerprint": "m-a",
                                "self_distillation": True}, "x") == "self_distillation"
    assert check_shard_teacher({"teacher_fingerprint": "m-b", "sft_teacher_fingerprint": "m-a",
                                "teacher_mismatch_allowed": True}, "x") == "mismatch"
    with pytest.raises(TeacherMismatchError, match=r"in source 'math'.*teacher m-b.*teacher m-a"):
        check_shard_teacher({"teacher_fingerprint": "m-b", "sft_teacher_fingerprint": "m-a",
                             "teacher_mismatch_allowed": False}, "source 'math'")
