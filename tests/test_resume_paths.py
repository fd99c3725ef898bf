"""Resume identity is content (fingerprints, settings), never paths: a half-finished run moved to another
directory and rerun from another working directory, with a relative or an absolute run dir, finishes with
output identical to an uninterrupted run that never moved."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pipeline.config import load_run_config
from pipeline.fingerprint import model_fingerprint, write_provenance
from pipeline.prompts import PromptRecord, write_prompts_jsonl
from pipeline.stages.registry import run_stage
from pipeline.tasks.arithmetic import make_problems
from storage.inspect import verify_shards
from storage.shardset import ShardSet, identity

pytestmark = pytest.mark.integration
OUTPUTS = ("teacher_sft_data", "rollouts", "teacher_topk")
RUN = """
teacher_sft_data:
  prompts: "{run_dir}/prompts.jsonl"
  teacher: "{run_dir}/teacher"
  sampling: {n: 2, max_new_tokens: 8, seed: 0}
  prompts_per_shard: 8
rollouts:
  prompts: "{run_dir}/prompts.jsonl"
  sampling: {n: 2, max_new_tokens: 8, seed: 1}
  prompts_per_shard: 8
teacher_logprobs:
  teacher: "{run_dir}/teacher"
  k: 4
"""


def make_project(root: Path, models: dict[str, Path]) -> None:
    """A run dir holding its inputs: prompts, the teacher, and an SFT student stamped with that teacher."""
    root.mkdir(parents=True)
    shutil.copytree(models["teacher"], root / "teacher")
    shutil.copytree(models["student"], root / "sft_student")
    write_provenance(root / "sft_student",
                     {"stage": "sft", "sft_teacher_fingerprint": model_fingerprint(root / "teacher")})
    write_prompts_jsonl([PromptRecord(p.id, p.prompt, p.answer) for p in make_problems(32, 2, seed=5)],
                        root / "prompts.jsonl")


def run(config: Path, stage: str, run_dir: Path | str, cwd: Path, monkeypatch, half: bool = False):
    """One stage from cwd; half=True does only part 0 of 2 (a half-finished stage)."""
    monkeypatch.chdir(cwd)
    overrides = [f"{stage}.num_parts=2", f"{stage}.part=0"] if half else []
    cfg = load_run_config(config, overrides, run_dir=run_dir)
    return run_stage(stage, cfg.stage(stage), show_progress=False)


def test_a_moved_half_finished_run_resumes_to_the_unmoved_runs_output(tmp_path, tiny_models, monkeypatch):
    config = tmp_path / "run.yaml"
    config.write_text("run_dir: unused\n" + RUN)
    ref = tmp_path / "ref"
    make_project(ref, tiny_models)
    for stage in ("teacher_sft_data", "rollouts", "teacher_logprobs"):
        run(config, stage, ref, tmp_path, monkeypatch)

    # half of teacher-sft-data and rollouts, from a/ with a relative run dir
    (tmp_path / "a").mkdir()
    make_project(tmp_path / "a" / "proj", tiny_models)
    for stage in ("teacher_sft_data", "rollouts"):
        run(config, stage, "proj", tmp_path / "a", monkeypatch, half=True)
    written = {name: (tmp_path / "a" / "proj" / name / "shard-00000.parquet").stat().st_mtime_ns
               for name in ("teacher_sft_data", "rollouts")}

    # moved to b/x/proj2: finish both, half of teacher-logprobs, from b/x with a relative run dir
    (tmp_path / "b" / "x").mkdir(parents=True)
    shutil.move(tmp_path / "a" / "proj", tmp_path / "b" / "x" / "proj2")
    for stage in ("teacher_sft_data", "rollouts"):
        assert not run(config, stage, "proj2", tmp_path / "b" / "x", monkeypatch).skipped
    run(config, "teacher_logprobs", "proj2", tmp_path / "b" / "x", monkeypatch, half=True)
    written["teacher_topk"] = (tmp_path / "b" / "x" / "proj2" / "teacher_topk"
                               / "shard-00000.parquet").stat().st_mtime_ns

    # moved again to c/proj3: finish teacher-logprobs from yet another directory with an absolute run dir
    final = tmp_path / "c" / "proj3"
    final.parent.mkdir()
    shutil.move(tmp_path / "b" / "x" / "proj2", final)
    assert not run(config, "teacher_logprobs", final, tmp_path / "b", monkeypatch).skipped

    for name in OUTPUTS:
        got, want = ShardSet.open(final / name), ShardSet.open(ref / name)
        assert verify_shards(final / name) == [], name
        assert (final / name / "shard-00000.parquet").stat().st_mtime_ns == written[name], f"{name}: shard 0 was redone"
        assert identity(got.metadata) == identity(want.metadata), name
        assert got.metadata["provenance"] != want.metadata["provenance"]  # paths are recorded, not compared
        assert got.complete_indices() == want.complete_indices() == list(range(4))
        for i in got.complete_indices():
            assert got.read_shard(i).equals(want.read_shard(i)), f"{name} shard {i} differs"

    # a finished stage reports its counts from the manifest's totals
    again = run(config, "teacher_sft_data", final, tmp_path, monkeypatch)
    totals = ShardSet.open(final / "teacher_sft_data").manifest["totals"]
    assert (again.skipped and again.summary["rows"] == totals["rows"] == 64
            and again.summary["tokens"] == totals["tokens"] > 0)
