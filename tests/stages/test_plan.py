"""pipeline/stages/plan.py and common.write_stage_config: `lopd config show`, the config.yaml every stage writes
beside its output, and `lopd run --dry-run`."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml

from pipeline.config import ConfigError, load_run_config
from pipeline.stages.plan import changed_fields, plan_run, plans_json, resolved_run_config
from storage.shardset import sidecar_name
from tests.conftest import lopd, write_run_config


def test_config_show_prints_the_resolved_config_and_reads_back_unchanged(tmp_path):
    cfg = write_run_config(tmp_path, {
        "sft": {"student": "models/s", "steps": 5},
        "train": {"losses": {"reverse_kl_topk": 1.0}, "optim": {"lr": 1.0e-4}},
    })
    shown = lopd("config", "show", "-c", str(cfg), "--set", "train.steps=7", "--set", "train.optim.warmup_steps=3")
    data = yaml.safe_load(shown.stdout)
    run = str(tmp_path / "run")
    # the file's values, every --set, the defaults and the conventional paths, nothing else
    assert list(data) == ["run_dir", "seed", "sft", "train"]
    assert data["train"]["steps"] == 7 and data["train"]["optim"] == {
        "lr": 1.0e-4, "weight_decay": 0.0, "betas": [0.9, 0.999], "warmup_steps": 3, "schedule": "constant",
        "grad_clip": 1.0}
    assert data["train"]["shards"] == f"{run}/teacher_topk" and data["train"]["student"] == f"{run}/sft_student"
    assert data["sft"]["steps"] == 5 and data["sft"]["data"] == f"{run}/teacher_sft_data"
    assert data["sft"]["batch_size"] == 64  # a default
    (tmp_path / "shown.yaml").write_text(shown.stdout)
    assert resolved_run_config(load_run_config(tmp_path / "shown.yaml")) == data


def test_the_resolved_config_names_a_bad_field(tmp_path):
    cfg = write_run_config(tmp_path, {"train": {"student": "s"}})
    with pytest.raises(ConfigError, match="train.stepz: unknown field"):
        resolved_run_config(load_run_config(cfg, ["train.stepz=3"]))


def test_changed_fields_names_each_leaf():
    assert changed_fields({"a": 1, "b": {"c": 2, "d": [1]}}, {"a": 1, "b": {"c": 3, "d": [1]}, "e": None}) == [
        "b.c: 2 -> 3"]
    assert changed_fields({"x": {"y": 1}}, {"x": {"y": 1, "z": 2}}) == ["x.z: None -> 2"]


def _stage_file(path):
    text = path.read_text()
    assert text.startswith("# The resolved")
    return yaml.safe_load(text)


@pytest.mark.integration
def test_every_stage_records_its_resolved_config(shards_run):
    tmp, cfg = shards_run
    resolved = resolved_run_config(load_run_config(cfg))
    run = tmp / "run"
    for name, path in (("teacher_sft_data", run / "teacher_sft_data/config.yaml"),
                       ("sft", run / "sft_student_logs/config.yaml"),  # not inside the exported model dir
                       ("rollouts", run / "rollouts/config.yaml"),
                       ("teacher_logprobs", run / "teacher_topk/config.yaml")):
        assert _stage_file(path) == {name: resolved[name]}, name
    assert not (run / "sft_student/config.yaml").exists()
    lopd("shards", "verify", str(run / "teacher_topk"))  # the shard set stays intact


def _plan(cfg, *sets):
    return {p["stage"]: p for p in plans_json(plan_run(load_run_config(cfg, list(sets))))}


@pytest.mark.integration
def test_dry_run_reports_complete_resumed_changed_and_missing_stages(shards_run, tmp_path):
    tmp, cfg = shards_run
    fresh = f"train.out={tmp_path / 'train'}"
    sets = ("--set", fresh, "--set", f"eval.model={tmp_path / 'train/final'}")
    plan = {p["stage"]: p for p in json.loads(lopd("run", "--dry-run", "--json", "-c", str(cfg), *sets).stdout)}
    assert {n: p["status"] for n, p in plan.items()} == {
        "teacher_sft_data": "complete", "sft": "complete", "rollouts": "complete", "teacher_logprobs": "complete",
        "train": "run", "eval": "run"}
    assert plan["train"]["detail"] == "no output yet" and plan["eval"]["detail"].startswith("after train")
    table = lopd("run", "--dry-run", "-c", str(cfg), *sets).stdout.splitlines()
    assert table[0].split() == ["stage", "status", "detail"]
    assert table[5].split()[:2] == ["train", "run"] and len(table) == 7

    # a setting that changes the SFT run: sft retrains, and everything that reads its model runs after it
    plan = _plan(cfg, fresh, "sft.steps=5")
    assert plan["sft"]["status"] == "run" and plan["teacher_sft_data"]["status"] == "complete"
    assert plan["rollouts"] == {**plan["rollouts"], "status": "run", "detail": "after sft (it reads their output)"}
    assert plan["train"]["detail"] == "after sft, teacher_logprobs (it reads their output)"

    # a setting recorded in the shards: the stage would refuse to mix them, and says so
    plan = _plan(cfg, fresh, "rollouts.sampling.seed=9")
    assert plan["rollouts"]["status"] == "blocked" and "rollouts.sampling.seed" not in plan["rollouts"]["detail"]
    assert "sampling.seed: 1 -> 9" in plan["rollouts"]["detail"]
    assert plan["teacher_logprobs"]["status"] == "blocked" and plan["sft"]["status"] == "complete"
    # the engine's batch size is not part of what the shards hold
    assert _plan(cfg, fresh, "rollouts.engine.batch_size=3")["rollouts"]["status"] == "complete"

    # an interrupted shard set resumes
    partial = tmp_path / "topk"
    shutil.copytree(tmp / "run/teacher_topk", partial)
    (partial / sidecar_name(0)).unlink()
    plan = _plan(cfg, fresh, f"teacher_logprobs.out={partial}", f"train.shards={partial}")
    assert plan["teacher_logprobs"]["status"] == "resume" and "shards complete" in plan["teacher_logprobs"]["detail"]
    assert plan["train"]["status"] == "run"

    # a missing input that no stage of the run writes
    plan = _plan(cfg, fresh, f"eval.prompts={tmp_path / 'nope.jsonl'}")
    assert plan["eval"]["status"] == "blocked" and "eval.prompts" in plan["eval"]["detail"]
