"""`lopd ablate`: the default rows cover every method and base loss; a tiny ablation through the CLI writes its
table, JSON and plot with the right rows and finite numbers, and a rerun reuses every row x seed."""

from __future__ import annotations

import json
import math
import shutil
import statistics
from pathlib import Path

import pytest
import yaml

from tests.conftest import lopd

REPO = Path(__file__).resolve().parents[1]
DEFAULT = REPO / "configs" / "ablate.yaml"
TINY_WORLD = ["demo.digits=2", "demo.train_prompts=16", "demo.opd_prompts=16", "demo.test_prompts=16",
              "demo.teacher_steps=3", "demo.teacher_batch_size=8", "demo.max_new_tokens=12",
              "teacher_sft_data.sampling.max_new_tokens=12", "rollouts.sampling.max_new_tokens=12",
              "rollouts.sampling.n=2", "sft.steps=2", "sft.batch_size=4", "train.batch_size=4",
              "train.checkpoint_every=2", "train.log_every=1"]


def test_default_rows_cover_every_method_and_base_loss():
    from pipeline.config import MethodsConfig, RunConfig
    from pipeline.demo.ablate import load_ablate_config, loss_family, row_train_config

    cfg = load_ablate_config(DEFAULT)
    run_cfg = RunConfig(run_dir=Path("/nonexistent"))
    swept = {"policy_gradient": 1e-4, "topk": 3e-4, "sft": 3e-3}  # what a sweep chose (run_lr_sweep)
    trains = {row: row_train_config(cfg, run_cfg, row, 0, Path("/nonexistent/ablate"), swept) for row in cfg.rows}
    methods = {m for t in trains.values() for m, v in t.methods if v is not None}
    # a method that lands needs a row, or a line in not_compared saying why not
    assert methods | set(cfg.not_compared) == set(MethodsConfig.model_fields)
    assert not methods & set(cfg.not_compared)
    losses = set().union(*(t.all_losses() for t in trains.values()))
    assert {"lightning", "reverse_kl_topk", "forward_kl_topk", "jsd_topk", "tvd_topk", "akl_topk",
            "alpha_topk"} <= losses
    assert {t.steps for t in trains.values()} == {cfg.steps}
    # one learning rate per loss family (the sweep's), nothing tuned per row
    assert {(loss_family(t), t.optim.lr) for t in trains.values()} == {("policy_gradient", 1e-4), ("topk", 3e-4)}
    assert set(cfg.lr_grid) == {"policy_gradient", "topk", "sft"} and all(len(g) >= 3 for g in cfg.lr_grid.values())
    assert trains["Lightning OPD (published loss)"].losses == {"lightning": 1.0}
    schedule = trains["PACED forward-then-reverse KL + weights"].loss_schedule
    assert [(p.until_step, p.losses) for p in schedule] == [(cfg.steps // 2, {"forward_kl_topk": 1.0})]
    assert len({t.out for t in trains.values()}) == len(trains)


def test_spread_is_mean_sample_std_min_max():
    from pipeline.demo.ablate import spread

    xs = [0.25, 0.5, 1.0]
    assert spread(xs) == pytest.approx({"mean": statistics.mean(xs), "std": statistics.stdev(xs), "min": 0.25,
                                        "max": 1.0})
    assert spread([0.3]) == {"mean": 0.3, "std": 0.0, "min": 0.3, "max": 0.3}
    equal = spread([0.78] * 3)  # 3 x 0.78 / 3 is 0.7800000000000001 in floats: the mean stays inside [min, max]
    assert equal["min"] <= equal["mean"] <= equal["max"]


def test_separation_is_mean_difference_and_whether_seed_ranges_overlap():
    from pipeline.demo.ablate import separation, spread

    ref = spread([0.50, 0.55, 0.60])
    assert separation(spread([0.61, 0.70, 0.65]), ref) == {"diff": pytest.approx(0.6533333 - 0.55), "verdict": "above"}
    assert separation(spread([0.40, 0.45, 0.49]), ref) == {"diff": pytest.approx(0.44666666 - 0.55),
                                                          "verdict": "below"}
    # one seed inside the reference's range: not beyond the spread, whatever the means
    assert separation(spread([0.60, 0.90, 0.95]), ref)["verdict"] == "within"
    assert separation(ref, ref) == {"diff": 0.0, "verdict": "within"}


def test_reference_row_must_be_a_row():
    from pipeline.config import ConfigError
    from pipeline.demo.ablate import load_ablate_config

    cfg = load_ablate_config(DEFAULT)
    assert cfg.reference_row in cfg.rows
    with pytest.raises(ConfigError, match="reference_row 'no such row' is not one of the rows"):
        load_ablate_config(DEFAULT, ["reference_row=no such row"])


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_tiny_ablation_writes_table_json_and_plot_then_reuses_rows(tmp_path):
    default = yaml.safe_load(DEFAULT.read_text())
    rows = ["Lightning OPD (published loss)", "reverse_kl_topk (lopd top-k + tail; the demo's row)",
            "PACED pass-rate weights (reverse_kl_topk)"]
    config = tmp_path / "ablate.yaml"
    config.write_text(yaml.safe_dump({
        "demo_config": str(REPO / "configs" / "demo.yaml"), "demo_set": TINY_WORLD, "run_dir": str(tmp_path / "demo"),
        "seeds": [0], "steps": 3, "eval_prompts": 8, "pass_k": 4, "rows": {r: default["rows"][r] for r in rows},
        "reference_row": rows[1],
        "lr_grid": {"policy_gradient": [1e-4, 3e-4], "topk": [3e-4, 1e-3], "sft": [1e-3, 3e-3]}},
        sort_keys=False))

    result = json.loads(lopd("ablate", "-c", str(config), "--json", "-q").stdout)
    out = tmp_path / "demo" / "ablate"
    assert Path(result["table"]) == out / "ablate.md" and json.loads((out / "ablate.json").read_text()) == result
    assert list(result["rows"]) == ["SFT student (start)", *rows]
    for name, row in result["rows"].items():
        assert list(row["seeds"]) == ["0"]
        for metric in ("accuracy", "pass@4", "train_seconds"):
            assert all(math.isfinite(v) for v in row[metric].values()), (name, metric, row[metric])
        assert 0 <= row["accuracy"]["mean"] <= 1 and 0 <= row["pass@4"]["mean"] <= 1
        assert (row["train_seconds"]["mean"] > 0) == (name != "SFT student (start)")
    # the rates come from the sweep on the validation problems, run before the rows, one per family
    sweep = result["lr_sweep"]
    assert set(sweep) == {"policy_gradient", "topk", "sft"}
    for family, grid in {"policy_gradient": [1e-4, 3e-4], "topk": [3e-4, 1e-3], "sft": [1e-3, 3e-3]}.items():
        scores = sweep[family]["validation_accuracy"]
        assert set(scores) == {f"{lr:g}" for lr in grid} and all(0 <= a <= 1 for a in scores.values())
        assert scores[f"{sweep[family]['chosen']:g}"] == max(scores.values())
    assert result["rows"]["Lightning OPD (published loss)"]["lr"] == sweep["policy_gradient"]["chosen"]
    assert result["rows"]["PACED pass-rate weights (reverse_kl_topk)"]["lr"] == sweep["topk"]["chosen"]
    val = json.loads(next(out.glob("lr-sweep/topk-*/eval-val/eval.json")).read_text())
    assert val["greedy"]["prompts"] == 8  # validation problems, not the test set
    assert result["settings"]["eval_prompts"] == 8 and result["reused_cells"] == 0
    evaluated = json.loads(next(out.glob("paced-*/seed-0/eval/eval.json")).read_text())
    assert evaluated["greedy"]["prompts"] == 8 and evaluated["sampled"]["samples"] == 8 * 4

    table = (out / "ablate.md").read_text()
    assert "3 optimiser steps" in table and "first 8 of 16 held-out prompts" in table
    assert "greedy accuracy on 8 validation problems" in table and result["settings"]["validation_prompts"] == 8
    lines = [line for line in table.splitlines() if line.startswith("| ")]
    assert [line.split(" | ")[0].removeprefix("| ") for line in lines[1:]] == list(result["rows"])
    ref_acc = result["rows"][rows[1]]["accuracy"]["mean"]
    for name, row in result["rows"].items():  # every other row against the reference, the start row included
        assert ("vs_reference" in row) == (name != rows[1])
        if name != rows[1]:
            assert row["vs_reference"]["diff"] == pytest.approx(row["accuracy"]["mean"] - ref_acc)
    assert f"| {rows[1]} | " in table and "(reference)" in table
    assert (out / "ablate.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    again = json.loads(lopd("ablate", "-c", str(config), "--json", "-q").stdout)
    assert again["reused_cells"] == 1 + len(rows)  # the start row's eval and every trained row x seed
    assert {n: r["accuracy"] for n, r in again["rows"].items()} == {n: r["accuracy"] for n, r in result["rows"].items()}

    # the cells ran on 2 worker processes (the default); one after the other in this process, from a copy of the same
    # world and stages 1-3, they give the same sweep and the same rows
    shutil.copytree(tmp_path / "demo", tmp_path / "demo1", ignore=shutil.ignore_patterns("ablate"))
    serial = json.loads(lopd("ablate", "-c", str(config), "--json", "-q", "--set", "workers=1",
                             "--run-dir", str(tmp_path / "demo1")).stdout)
    assert serial["lr_sweep"] == result["lr_sweep"] and serial["reused_cells"] == 0
    assert ({n: (r["accuracy"], r["pass@4"]) for n, r in serial["rows"].items()}
            == {n: (r["accuracy"], r["pass@4"]) for n, r in result["rows"].items()})
