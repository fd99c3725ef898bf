"""pipeline/stages/evaluate.py: `lopd eval` (greedy pass@1, avg@n, pass@k, maj@k; its reports) and the evaluation
during `lopd sft` / `lopd train` (`sft.eval`, `train.eval`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import ConfigError, load_run_config
from pipeline.eval_metrics import summarise
from pipeline.stages.evaluate import training_evaluation
from pipeline.stages.sft import sft_identity
from pipeline.train.metrics import read_metrics
from storage.errors import LopdUserError
from tests.conftest import REPO, free_port, lopd

pytestmark = pytest.mark.integration

SAMPLES = "{n: 3, temperature: 1.0, max_new_tokens: 12}"


def _eval(tmp, cfg, *sets):
    args = [a for s in sets for a in ("--set", s)]
    res = lopd("eval", "-c", str(cfg), "-q", "--set", f"eval.model={tmp / 'run' / 'sft_student'}", *args)
    out = Path(json.loads(res.stdout.strip().splitlines()[-1])["out"])
    problems = [json.loads(line) for line in (out / "eval_problems.jsonl").read_text().splitlines()]
    return json.loads((out / "eval.json").read_text()), problems, out


def test_eval_writes_json_markdown_and_every_problem(shards_run, tmp_path):
    tmp, cfg = shards_run
    data, problems, out = _eval(tmp, cfg, f"eval.out={tmp_path / 'e1'}", f"eval.samples={SAMPLES}")
    assert data["greedy"]["samples"] == 48 and data["sampled"]["samples"] == 144
    assert data["sampled"]["ks"] == [1, 2, 3]
    assert 0 <= data["pass@1"] <= 1 and data["pass@3"] >= data["pass@2"] >= data["sampled"]["pass@1"]
    assert data["sampled"]["pass@1"] == pytest.approx(data["avg@3"])
    assert data["pass@3"] == data["sampled"]["pass"]  # pass@n is "any of n"
    assert data["pass@1"] == data["greedy"]["avg"]  # the top-level pass@1 is greedy decoding's
    # the headline numbers are the estimators over the per-problem grades written beside them
    sampled = [p for p in problems if p["decoding"] == "sampled"]
    greedy = [p for p in problems if p["decoding"] == "greedy"]
    assert len(sampled) == len(greedy) == 48 and all(len(p["correct"]) == 3 for p in sampled)
    assert summarise([p["correct"] for p in sampled], [p["answers"] for p in sampled], [1, 2, 3]) == {
        k: data[k] for k in ("avg@3", "pass@1", "pass@2", "pass@3", "maj@1", "maj@2", "maj@3")} | {
        "pass@1": data["sampled"]["pass@1"]}
    assert sum(p["correct"][0] for p in greedy) == data["greedy"]["correct"]
    table = (out / "eval.md").read_text()
    assert "| model | pass@1 | pass@2 | pass@3 | avg@3 | maj@1 | maj@2 | maj@3 |" in table


def test_eval_greedy_off_and_chosen_ks(shards_run, tmp_path):
    tmp, cfg = shards_run
    data, problems, _ = _eval(tmp, cfg, f"eval.out={tmp_path / 'e2'}", "eval.greedy=false",
                              f"eval.samples={SAMPLES}", "eval.ks=[1, 3]", "eval.limit=10")
    assert "greedy" not in data and {p["decoding"] for p in problems} == {"sampled"}
    assert sorted(k for k in data if "@" in k) == ["avg@3", "maj@1", "maj@3", "pass@1", "pass@3"]
    assert data["pass@1"] == pytest.approx(data["avg@3"]) and data["sampled"]["prompts"] == 10


def test_eval_config_refuses_nothing_to_measure_and_k_above_n(shards_run):
    _, cfg = shards_run
    with pytest.raises(ConfigError, match="eval: greedy=false needs samples"):
        load_run_config(cfg, ["eval.greedy=false"])
    with pytest.raises(ConfigError, match=r"each k in 1\.\.samples\.n=3, got \[4\]"):
        load_run_config(cfg, [f"eval.samples={SAMPLES}", "eval.ks=[4]"])


def test_train_and_sft_log_accuracy_at_the_eval_steps(shards_run, tmp_path):
    tmp, cfg = shards_run
    prompts = tmp / "prompts.jsonl"
    lopd("train", "-c", str(cfg), "-q", "--set", f"train.out={tmp_path / 'train'}", "--set", "train.steps=4",
         "--set", f"train.eval={{prompts: {prompts}, every: 2, limit: 8, max_new_tokens: 12}}")
    rows = read_metrics(tmp_path / "train" / "metrics.jsonl")
    assert [r["step"] for r in rows if "eval/pass@1" in r] == [0, 2, 4]
    assert [r["step"] for r in rows if "loss/total" in r] == [1, 2, 3, 4]
    assert all(0 <= r["eval/pass@1"] <= 1 for r in rows if "eval/pass@1" in r)

    lopd("sft", "-c", str(cfg), "-q", "--set", f"sft.out={tmp_path / 'sft'}", "--set", "sft.log_every=2",
         "--set", f"sft.eval={{prompts: {prompts}, every: 4, limit: 8, greedy: false, samples: {SAMPLES}}}")
    rows = read_metrics(tmp_path / "sft_logs" / "metrics.jsonl")
    assert [r["step"] for r in rows if "eval/maj@3" in r] == [0, 4]
    assert all({"eval/avg@3", "eval/pass@1", "eval/pass@2", "eval/pass@3", "eval/maj@1"} <= set(r)
               for r in rows if "eval/maj@3" in r)
    # the evaluation is not part of the run: the same SFT without it has the same identity (it would be skipped)
    with_eval = load_run_config(cfg, [f"sft.eval={{prompts: {prompts}, every: 4}}"]).stage("sft")
    assert sft_identity(with_eval, "t", "m", {}) == sft_identity(load_run_config(cfg).stage("sft"), "t", "m", {})


def test_training_eval_must_fall_on_logged_steps(shards_run):
    tmp, cfg = shards_run
    sft = load_run_config(cfg, ["sft.log_every=2", f"sft.eval={{prompts: {tmp / 'prompts.jsonl'}, every: 3}}"])
    with pytest.raises(LopdUserError, match="sft.eval.every=3 must be a multiple of sft.log_every=2"):
        training_evaluation(sft.stage("sft"), "sft")


def test_train_eval_under_ddp_logs_accuracy_once_at_the_eval_steps(shards_run, tmp_path):
    """Two gloo ranks (DDP): rank 0 evaluates while the other waits at the next step's collectives."""
    tmp, cfg = shards_run
    torchrun = Path(sys.executable).with_name("torchrun")
    res = subprocess.run([str(torchrun), "--nproc-per-node", "2", "--master-port", str(free_port()), "-m", "lopd.cli",
                          "train", "-c", str(cfg), "-q", "--set", f"train.out={tmp_path / 'ddp'}", "--set",
                          "train.steps=4", "--set",
                          f"train.eval={{prompts: {tmp / 'prompts.jsonl'}, every: 2, limit: 8, max_new_tokens: 12}}"],
                         cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    rows = read_metrics(tmp_path / "ddp" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    assert [r["step"] for r in rows if "eval/pass@1" in r] == [0, 2, 4]
