"""`lopd ablate`: every offline OPD method and base loss, trained from the demo world's SFT student and teacher
shards, several seeds each; the mean and spread of greedy accuracy, pass@k on sampled answers and training
seconds per row, as a Markdown table, a JSON object and a bar chart in ``<run_dir>/ablate/``.

The rows are one dict in the ablation YAML (``configs/ablate.yaml``): row name -> ``--set`` overrides of the
demo's ``train`` section. Each row x seed is a ``train`` stage run plus an ``eval`` stage run in its own
directory, keyed by the row's settings: a rerun finds finished training complete (the train stage's own resume)
and reuses its eval when the eval settings are unchanged. The world and stages 1-3 (teacher SFT data, SFT,
rollouts, teacher shards) are the demo's (``pipeline.demo.demo_plan``), built when missing.

No per-row tuning: every row trains with the demo's train settings, the ablation's step count, its seed, and the
learning rate of its loss family: ``policy_gradient`` for rows without a top-k loss (the published ``lightning``
loss and the methods built on it), ``topk`` for rows with one. The rates come from one sweep (``run_lr_sweep``), run
before any row and recorded in the output: each family's reference run (``topk``: reverse_kl_topk; ``policy_gradient``:
the published lightning loss; ``sft``: SFT on the teacher's answers to the OPD prompts, the demo's control) trains at
every rate of ``lr_grid`` with seed ``sweep_seed`` and is scored by greedy accuracy on the validation problems (disjoint
from the test set); the best rate is the family's. The same rule for every family, fixed before any row is looked at.
"""

from __future__ import annotations

import json
import math
import re
import time
from concurrent.futures import Executor
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from pipeline.config import (
    TOPK_LOSSES,
    ConfigError,
    EngineConfig,
    EvalConfig,
    RunConfig,
    SamplingConfig,
    Strict,
    TrainConfig,
    _format_error,
    load_run_config,
    set_dotted,
)
from pipeline.demo.experiment import DemoPlan, demo_plan, demo_world, pin_machine, run_demo_step
from pipeline.demo.schedule import process_pool, run_steps
from pipeline.progress import log
from pipeline.prompts import load_prompts
from pipeline.stages import registry
from pipeline.train.checkpoint import run_fingerprint
from pipeline.train.metrics import read_metrics

STAGES_1_3 = ("teacher_sft_data", "sft", "rollouts", "teacher_logprobs")
# each family's reference run in the learning-rate sweep
FAMILIES = {"topk": "reverse_kl_topk", "policy_gradient": "Lightning OPD (published loss)",
            "sft": "SFT on the teacher's answers to the OPD prompts"}


class AblateConfig(Strict):
    """The ablation: which demo world, which rows, how many seeds, steps and eval prompts."""

    demo_config: Path = Field(Path("demo.yaml"), description="the demo's run YAML (relative to this file): world, "
                              "SFT student, shards and the train settings every row starts from")
    demo_set: list[str] = Field(default_factory=list, description="--set overrides of the demo config (e.g. a "
                                "smaller world for a quick check); part of the world, so they change every row")
    run_dir: Path | None = Field(None, description="the demo's run dir to reuse (default: the demo config's)")
    seeds: list[int] = Field([0, 1, 2], min_length=1, description="train.seed of each run of a row")
    steps: int = Field(200, ge=1, description="optimiser steps of every row (the demo's OPD runs 400)")
    eval_prompts: int | None = Field(200, ge=1, description="the first N held-out prompts (null: all)")
    pass_k: int = Field(4, ge=1, description="answers sampled per prompt for pass@k (temperature 1)")
    lr_grid: dict[str, list[float]] = Field(
        default_factory=lambda: {"policy_gradient": [3e-5, 1e-4, 3e-4], "topk": [3e-5, 1e-4, 3e-4, 1e-3],
                                 "sft": [1e-4, 3e-4, 1e-3, 3e-3]},
        description="the learning rates the sweep tries per family (policy_gradient, topk, sft); each family's rows "
                    "train at its best rate on the validation problems")
    sweep_seed: int = Field(0, description="train.seed of the sweep's runs")
    workers: int = Field(2, ge=1, description="processes that train and score cells side by side (each with the "
                         "demo's demo.threads threads); the results do not depend on it. 1: one after the other here")
    rows: dict[str, list[str]] = Field(min_length=1, description="row name -> --set overrides of the train "
                                       "section; '{half_steps}' in a value becomes steps // 2")
    not_compared: dict[str, str] = Field(default_factory=dict, description="train.methods fields with no row -> "
                                         "why (listed under the table)")
    reference_row: str | None = Field(None, description="the row every other row is compared with (mean difference "
                                      "and whether the seed ranges separate); null: none")

    @field_validator("lr_grid")
    @classmethod
    def _families(cls, v: dict[str, list[float]]) -> dict[str, list[float]]:
        if set(v) != set(FAMILIES) or not all(v.values()) or min(min(g) for g in v.values()) <= 0:
            raise ValueError(f"lr_grid needs a non-empty list of positive rates for each of {list(FAMILIES)}, got {v}")
        return v

    @model_validator(mode="after")
    def _reference_is_a_row(self) -> AblateConfig:
        if self.reference_row is not None and self.reference_row not in self.rows:
            raise ValueError(f"reference_row {self.reference_row!r} is not one of the rows; name a row exactly as "
                             "under rows:, or null for no comparison")
        return self

    @field_validator("rows")
    @classmethod
    def _train_overrides(cls, v: dict[str, list[str]]) -> dict[str, list[str]]:
        for name, overrides in v.items():
            bad = [o for o in overrides if not o.startswith("train.") or "=" not in o]
            if bad:
                raise ValueError(f"row {name!r}: overrides must be train.<field>=<value>, got {bad}")
        return v


def load_ablate_config(path: str | Path, overrides: list[str] | None = None,
                       run_dir: str | Path | None = None) -> AblateConfig:
    """Read an ablation YAML with ``key=value`` overrides (values parsed as YAML); ``demo_config`` resolves
    against the YAML's directory."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: ablation config not found")
    data = yaml.safe_load(path.read_text()) or {}
    for ov in overrides or []:
        if "=" not in ov:
            raise ConfigError(f"--set {ov}: expected field=value, e.g. --set seeds=[0] or --set steps=50")
        key, val = ov.split("=", 1)
        set_dotted(data, key, yaml.safe_load(val))
    if run_dir is not None:
        data["run_dir"] = str(run_dir)
    try:
        cfg = AblateConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_error(str(path), "ablate", e)) from None
    return cfg.model_copy(update={"demo_config": (path.parent / cfg.demo_config).resolve()})


# --- the math of the table ------------------------------------------------------------------------------------


def spread(values: list[float]) -> dict[str, float]:
    """Mean and spread of one row's per-seed values (S seeds):
    mean = sum_s x_s / S;  std = sqrt(sum_s (x_s - mean)^2 / (S - 1)) (0 for S = 1);  min, max."""
    n = len(values)
    mean = min(max(sum(values) / n, min(values)), max(values))  # equal values can sum to a hair past them
    std = math.sqrt(sum((x - mean) ** 2 for x in values) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "std": std, "min": min(values), "max": max(values)}


def separation(row: dict[str, float], reference: dict[str, float]) -> dict[str, Any]:
    """A row against the reference row, both as ``spread`` gives them over the same seeds: ``diff`` = the row's
    mean - the reference's, and ``verdict`` ``above`` (row min > reference max), ``below`` (row max < reference
    min) or ``within`` (the seed ranges overlap: the difference is not beyond the seed spread)."""
    verdict = ("above" if row["min"] > reference["max"] else "below" if row["max"] < reference["min"]
               else "within")
    return {"diff": row["mean"] - reference["mean"], "verdict": verdict}


def loss_family(cfg: TrainConfig) -> str:
    """``topk`` when any step of the run uses a top-k loss, else ``policy_gradient`` (lightning, sft, anchors)."""
    return "topk" if cfg.all_losses() & TOPK_LOSSES else "policy_gradient"


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:40].strip("-")


# --- the runs ---------------------------------------------------------------------------------------------------


def demo_run_config(cfg: AblateConfig) -> RunConfig:
    return load_run_config(cfg.demo_config, cfg.demo_set, cfg.run_dir)


def ensure_demo_shards(run_cfg: RunConfig, show_progress: bool = True, pool: Executor | None = None) -> DemoPlan:
    """The demo world (its teachers on ``pool``'s workers when given) and its stages 1-3, each reused when
    complete; returns the demo's plan."""
    world = demo_world(run_cfg, show_progress, pool)
    plan = demo_plan(run_cfg, world)
    for name in STAGES_1_3:
        run_demo_step(plan, name, show_progress)
    return plan


def row_overrides(cfg: AblateConfig, row: str) -> list[str]:
    """The row's ``--set`` overrides with ``{half_steps}`` resolved (what trains, and what the table shows)."""
    return [o.replace("{half_steps}", str(max(cfg.steps // 2, 1))) for o in cfg.rows[row]]


def row_train_config(cfg: AblateConfig, run_cfg: RunConfig, row: str, seed: int, root: Path,
                     lr_by_family: dict[str, float]) -> TrainConfig:
    """The train config of one row x seed: the demo's train section, the row's overrides, the ablation's steps,
    the seed, the family's learning rate (from the sweep), and an output dir named after the row and a hash of its
    settings (a changed row trains afresh instead of meeting its old checkpoints)."""
    overrides = row_overrides(cfg, row)
    base = load_run_config(cfg.demo_config, [*cfg.demo_set, *overrides, f"train.steps={cfg.steps}",
                                             f"train.seed={seed}"], run_cfg.run_dir).stage("train")
    lr = lr_by_family[loss_family(base)]
    key = run_fingerprint({"overrides": overrides, "steps": cfg.steps, "lr": lr})[:8]
    return base.model_copy(update={"optim": base.optim.model_copy(update={"lr": lr}),
                                   "out": root / f"{_slug(row)}-{key}" / f"seed-{seed}" / "train"})


def eval_config(cfg: AblateConfig, model: Path, prompts: Path, out: Path, seed: int, max_new_tokens: int) -> EvalConfig:
    return EvalConfig(model=model, prompts=prompts, out=out, limit=cfg.eval_prompts, max_new_tokens=max_new_tokens,
                      samples=SamplingConfig(n=cfg.pass_k, temperature=1.0, max_new_tokens=max_new_tokens, seed=seed),
                      engine=EngineConfig(batch_size=512))


def run_eval_once(ecfg: EvalConfig, reuse: bool) -> tuple[dict[str, Any], bool]:
    """The eval of a cell; reused when ``reuse`` (its model did not change) and it ran with the same settings."""
    settings = ecfg.out / "eval_config.json"
    wanted = ecfg.model_dump(mode="json")
    if reuse and (ecfg.out / "eval.json").exists() and settings.exists() and json.loads(settings.read_text()) == wanted:
        return json.loads((ecfg.out / "eval.json").read_text()), True
    registry.run_stage("eval", ecfg, show_progress=False)
    settings.write_text(json.dumps(wanted, indent=2))
    return json.loads((ecfg.out / "eval.json").read_text()), False


def train_and_eval(stage: str, tcfg: Any, ecfg: EvalConfig, show_progress: bool = False
                   ) -> tuple[dict[str, Any], bool, bool]:
    """One cell: train (``stage``: train or sft; resumes or finds it complete) then score it (reused when the model
    did not change). Returns (eval result, training was reused, eval was reused). Runs in a worker process too."""
    trained = registry.run_stage(stage, tcfg, show_progress=show_progress)
    result, eval_reused = run_eval_once(ecfg, reuse=trained.skipped)
    return result, trained.skipped, eval_reused


def run_cells(cells: dict[str, tuple[str, Any, EvalConfig]], pool: Executor | None, workers: int,
              show_progress: bool) -> dict[str, tuple[dict[str, Any], bool, bool]]:
    """Independent cells (name -> stage, train config, eval config), here in order or ``workers`` at a time on
    ``pool``."""
    total, done = len(cells), [0]

    def on_done(name: str, _: Any) -> None:
        done[0] += 1
        log.info("ablate [%d/%d]: %s", done[0], total, name)

    return run_steps({name: () for name in cells},
                     lambda ex, name: ex.submit(train_and_eval, *cells[name]),
                     lambda name: train_and_eval(*cells[name], show_progress=show_progress), pool, workers, on_done)


def train_seconds(train_out: Path) -> float:
    """Training seconds of a finished run (its last metrics record; excludes checkpoint writes and evals)."""
    return float([r for r in read_metrics(train_out / "metrics.jsonl") if "perf/train_seconds" in r][-1]
                 ["perf/train_seconds"])


def sweep_run_config(cfg: AblateConfig, run_cfg: RunConfig, plan: DemoPlan, family: str, lr: float,
                     root: Path) -> tuple[str, Any]:
    """The stage and config of one sweep cell: the family's reference run at ``lr``, seed ``sweep_seed``, the
    ablation's steps, in a directory keyed by its settings."""
    key = run_fingerprint({"family": family, "lr": lr, "steps": cfg.steps, "seed": cfg.sweep_seed})[:8]
    out = root / "lr-sweep" / f"{family}-{key}"
    if family == "sft":  # the demo's SFT control: the teacher's answers to the OPD prompts, OPD's optimiser
        base = plan.steps["sft_opd_prompts"].cfg
        return "sft", base.model_copy(update={"steps": cfg.steps, "seed": cfg.sweep_seed, "out": out / "model",
                                              "optim": base.optim.model_copy(update={"lr": lr})})
    base = plan.steps["train_topk" if family == "topk" else "train_lightning_published"].cfg
    return "train", base.model_copy(update={"steps": cfg.steps, "seed": cfg.sweep_seed, "out": out / "train",
                                            "optim": base.optim.model_copy(update={"lr": lr})})


def _sweep_cell(family: str, lr: float) -> str:
    return f"learning-rate sweep, {family} at {lr:g}"


def run_lr_sweep(cfg: AblateConfig, run_cfg: RunConfig, plan: DemoPlan, root: Path, val_prompts: Path,
                 show_progress: bool = True, pool: Executor | None = None) -> dict[str, dict[str, Any]]:
    """Each family's rate: its reference run at every rate of ``lr_grid``, greedy accuracy on the validation
    problems (``eval_prompts`` of them), the best rate chosen (ties: the smaller rate). Cells are reused like the
    rows'; with ``pool`` they run ``cfg.workers`` at a time."""
    if "sft" in cfg.lr_grid:  # its data: the teacher's answers to the OPD prompts (the demo's step, reused when done)
        run_demo_step(plan, "teacher_sft_data_sft_opd_prompts", show_progress)
    cells: dict[str, tuple[str, Any, EvalConfig]] = {}
    for family, grid in cfg.lr_grid.items():
        for lr in sorted(grid):
            stage, scfg = sweep_run_config(cfg, run_cfg, plan, family, lr, root)
            model = scfg.out if stage == "sft" else scfg.out / "final"
            cells[_sweep_cell(family, lr)] = (stage, scfg, eval_config(
                cfg, model, val_prompts, scfg.out.parent / "eval-val", cfg.sweep_seed, plan.demo.max_new_tokens))
    results = run_cells(cells, pool, cfg.workers, show_progress)
    out: dict[str, dict[str, Any]] = {}
    for family, grid in cfg.lr_grid.items():
        scores = {f"{lr:g}": results[_sweep_cell(family, lr)][0]["pass@1"] for lr in sorted(grid)}
        best = max(sorted(grid), key=lambda lr: (scores[f"{lr:g}"], -lr))
        out[family] = {"reference_run": FAMILIES[family], "validation_accuracy": scores, "chosen": best}
    return out


def run_ablation(cfg: AblateConfig, show_progress: bool = True) -> dict[str, Any]:
    """Every row x seed (train + eval), then the table, JSON and plot in ``<run_dir>/ablate/``."""
    started = time.perf_counter()
    run_cfg = demo_run_config(cfg)
    demo = run_cfg.demo()
    with process_pool(cfg.workers, pin_machine, (demo,)) if cfg.workers > 1 else nullcontext() as pool:
        plan = ensure_demo_shards(run_cfg, show_progress, pool)
        return _run_ablation(cfg, run_cfg, plan, pool, show_progress, started)


def _run_ablation(cfg: AblateConfig, run_cfg: RunConfig, plan: DemoPlan, pool: Executor | None, show_progress: bool,
                  started: float) -> dict[str, Any]:
    root = Path(run_cfg.run_dir) / "ablate"
    max_new = plan.demo.max_new_tokens
    pass_key = f"pass@{cfg.pass_k}"
    sft_dir = plan.steps["sft"].cfg.out
    # the rates first, on the validation problems, before any row is trained or looked at
    val_prompts = Path(plan.test_prompts).with_name("val.jsonl")
    sweep = run_lr_sweep(cfg, run_cfg, plan, root, val_prompts, show_progress, pool)
    lr_by_family = {family: entry["chosen"] for family, entry in sweep.items()}

    rows: dict[str, dict[str, Any]] = {}
    # the starting point, with the same eval settings (no training)
    start: dict[str, Any] = {}
    for seed in cfg.seeds:
        result, reused = run_eval_once(eval_config(cfg, sft_dir, plan.test_prompts, root / "sft-student" /
                                                   f"seed-{seed}" / "eval", seed, max_new), reuse=True)
        start[str(seed)] = {"accuracy": result["pass@1"], pass_key: result[pass_key], "train_seconds": 0.0,
                            "reused": reused}
    rows["SFT student (start)"] = {"overrides": [], "family": None, "lr": None, "seeds": start}

    # seed-major: an interrupted run has whole seeds of every row done, and its rerun reuses them
    configs = {(row, seed): row_train_config(cfg, run_cfg, row, seed, root, lr_by_family)
               for seed in cfg.seeds for row in cfg.rows}
    cells = {f"{row}, seed {seed}": ("train", tcfg, eval_config(cfg, tcfg.out / "final", plan.test_prompts,
                                                                 tcfg.out.parent / "eval", seed, max_new))
             for (row, seed), tcfg in configs.items()}
    results = run_cells(cells, pool, cfg.workers, show_progress)
    for (row, seed), tcfg in configs.items():
        result, trained_reused, eval_reused = results[f"{row}, seed {seed}"]
        entry = rows.setdefault(row, {"overrides": row_overrides(cfg, row), "family": loss_family(tcfg),
                                      "lr": tcfg.optim.lr, "lr_from": f"sweep ({loss_family(tcfg)} family)",
                                      "dir": str(tcfg.out.parent.parent), "seeds": {}})
        entry["seeds"][str(seed)] = {"accuracy": result["pass@1"], pass_key: result[pass_key],
                                     "train_seconds": round(train_seconds(tcfg.out), 2),
                                     "reused": trained_reused and eval_reused}
    for entry in rows.values():
        per_seed = list(entry["seeds"].values())
        for metric in ("accuracy", pass_key, "train_seconds"):
            entry[metric] = spread([s[metric] for s in per_seed])

    ref = cfg.reference_row
    if ref is not None:
        for name, entry in rows.items():
            if name != ref:
                entry["vs_reference"] = separation(entry["accuracy"], rows[ref]["accuracy"])

    n_test = len(load_prompts(plan.test_prompts))
    n_val = len(load_prompts(val_prompts))
    result = {
        "lr_sweep": sweep,
        "rows": rows,
        "settings": {"steps": cfg.steps, "seeds": cfg.seeds, "eval_prompts": min(cfg.eval_prompts or n_test, n_test),
                     "validation_prompts": min(cfg.eval_prompts or n_val, n_val),
                     "held_out_prompts": n_test, "pass_k": cfg.pass_k, "lr": lr_by_family,
                     "sweep_seed": cfg.sweep_seed, "reference_row": ref,
                     "demo_train_steps": plan.steps["train_topk"].cfg.steps,
                     "batch_size": plan.steps["train_topk"].cfg.batch_size, "demo_config": str(cfg.demo_config),
                     "demo_set": cfg.demo_set},
        "not_compared": cfg.not_compared,
        "wall_seconds": round(time.perf_counter() - started, 2),
        "reused_cells": sum(s["reused"] for e in rows.values() for s in e["seeds"].values()),
        "run_dir": str(run_cfg.run_dir),
        "table": str(root / "ablate.md"),
        "plot": str(root / "ablate.png"),
    }
    root.mkdir(parents=True, exist_ok=True)
    (root / "ablate.json").write_text(json.dumps(result, indent=2, default=str))
    (root / "ablate.md").write_text(markdown(result))
    plot_ablation(result, root / "ablate.png")
    return result


# --- the report -------------------------------------------------------------------------------------------------


def _cell(s: dict[str, float], fmt: str, std: bool = False) -> str:
    sd = f" ± {s['std']:{fmt}}" if std else ""
    return f"{s['mean']:{fmt}}{sd} [{s['min']:{fmt}}, {s['max']:{fmt}}]"


def _vs_cell(e: dict[str, Any], is_reference: bool) -> str:
    if is_reference:
        return "(reference)"
    if "vs_reference" not in e:
        return "-"
    v = e["vs_reference"]
    return f"{v['diff']:+.3f}, {v['verdict']}"


def markdown(result: dict[str, Any]) -> str:
    """The table: one line per row, mean ± std [min, max] over the seeds, and the difference from the reference
    row with whether the seed ranges separate."""
    st = result["settings"]
    ref = st.get("reference_row")
    pass_key = f"pass@{st['pass_k']}"
    lines = [
        "# lopd ablate",
        "",
        f"From the demo world's SFT student and teacher shards; {st['steps']} optimiser steps of "
        f"{st['batch_size']} rollouts per row (the demo's OPD runs {st['demo_train_steps']}); seeds "
        f"{', '.join(map(str, st['seeds']))} (the train seed); greedy accuracy and {pass_key} ({st['pass_k']} "
        f"answers sampled at temperature 1) on the first {st['eval_prompts']} of {st['held_out_prompts']} held-out "
        f"prompts; learning rate per loss family from the sweep below: policy gradient "
        f"{st['lr']['policy_gradient']:g}, top-k {st['lr']['topk']:g} (SFT {st['lr']['sft']:g}, the demo's "
        f"controls). Each cell: mean [min, max] over the seeds (accuracy: mean ± std [min, max]). "
        + (f"vs reference: the row's mean accuracy minus that of `{ref}`; above / below when the two rows' seed "
           "ranges do not overlap, within when they do. " if ref else "")
        + f"Wall time {result['wall_seconds']:.0f} s "
        f"({result['reused_cells']} row x seed runs reused).",
        "",
        "Learning-rate sweep (before any row; one rule for every family): each family's reference run, seed "
        f"{st['sweep_seed']}, {st['steps']} steps, greedy accuracy on {st['validation_prompts']} validation problems "
        "(disjoint from the test set); the best rate is the family's.",
        "",
        *[f"- {family} ({e['reference_run']}): validation accuracy "
          + ", ".join(f"{acc:.3f} at lr {lr}" for lr, acc in e["validation_accuracy"].items())
          + f"; chosen **{e['chosen']:g}**" for family, e in result["lr_sweep"].items()],
        "",
        *[f"Not compared: `{m}`: {why}" for m, why in result["not_compared"].items()],
        "",
        f"| row | train settings | lr | greedy accuracy | vs reference | {pass_key} | training seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, e in result["rows"].items():
        settings = "; ".join(o.removeprefix("train.") for o in e["overrides"]) or "-"
        lr = f"{e['lr']:g}" if e["lr"] is not None else "-"
        lines.append(f"| {name} | `{settings}` | {lr} | {_cell(e['accuracy'], '.3f', std=True)} | "
                     f"{_vs_cell(e, name == ref)} | {_cell(e[pass_key], '.3f')} | {_cell(e['train_seconds'], '.1f')} |")
    return "\n".join(lines) + "\n"


def plot_ablation(result: dict[str, Any], out: Path) -> Path:
    """Horizontal bars of greedy accuracy and pass@k per row (mean), with min-max whiskers over the seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pass_key = f"pass@{result['settings']['pass_k']}"
    names = list(result["rows"])
    fig, ax = plt.subplots(figsize=(12, 0.45 * len(names) + 1.8))
    for j, (metric, label) in enumerate((("accuracy", "greedy accuracy"), (pass_key, pass_key))):
        stats = [result["rows"][n][metric] for n in names]
        ys = [i + (j - 0.5) * 0.38 for i in range(len(names))]
        means = [s["mean"] for s in stats]
        err = [[s["mean"] - s["min"] for s in stats], [s["max"] - s["mean"] for s in stats]]  # spread keeps min <= mean
        ax.barh(ys, means, height=0.36, xerr=err, capsize=2, label=label)
    ref = result["settings"].get("reference_row")
    if ref in result["rows"]:  # the line every "vs reference" reads against
        ax.axvline(result["rows"][ref]["accuracy"]["mean"], color="black", linestyle="--", linewidth=1,
                   label="reference row's greedy accuracy")
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel(f"held-out accuracy\n(mean over seeds {result['settings']['seeds']}; whiskers: min-max)")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=3, frameon=False)  # above the bars, never on them
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
