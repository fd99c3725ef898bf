"""`lopd demo`: the whole offline OPD method on the built-in CPU world, with the ablations that make the
Lightning OPD paper's points visible, and controls that keep the comparison honest.

1. World: prompt files, tokenizer, models; two demo teachers trained from scratch on correct solutions in two
   solution styles (A is the real teacher; B, equally accurate, is the "other teacher" of the ablation).
2. Offline OPD: teacher-A SFT data -> SFT student -> rollouts -> teacher-A top-k shards -> offline OPD with
   lopd's top-k + tail loss (``train.losses`` of the run config) -> eval.
3. Ablations from the same SFT student and the same rollouts: (a) the published Lightning OPD loss (sampled-token
   policy gradient on the same shards' per-token teacher log-probs); (b) shards scored by teacher B (teacher
   inconsistency); (c) online OPD with a live teacher, same batch and losses; (d) SFT continued on teacher A's
   data for the same number of steps (the control at equal training steps); (e) SFT on teacher A's answers to
   the OPD prompts (as many answers per prompt as rollouts: the same number of teacher calls as the scoring).
4. Report: accuracies, stage wall times, time to reach the top-k row's final accuracy offline vs online.

The steps are plain functions (``demo_world``, ``demo_plan``, ``run_demo_step``, ``demo_report``): ``run_demo``
calls them in order for the CLI, and the ``lightning-opd`` flow calls each as a Prefect task.
"""

from __future__ import annotations

import json
import os
import random
import time
from concurrent.futures import Executor, Future
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from pipeline.config import (
    DemoConfig,
    EngineConfig,
    EvalConfig,
    LightningLossConfig,
    OnlineConfig,
    RunConfig,
    ScaleConfig,
    SftConfig,
    TeacherSftDataConfig,
    TrainConfig,
)
from pipeline.demo import compute
from pipeline.demo.compute import Cost
from pipeline.demo.schedule import process_pool, run_steps
from pipeline.demo.world import make_models
from pipeline.engines.hf import HFEngine
from pipeline.fingerprint import read_provenance
from pipeline.models import encode_prompt, load_model, load_tokenizer
from pipeline.progress import log
from pipeline.prompts import PromptRecord, load_prompts, write_prompts_jsonl
from pipeline.stages import registry
from pipeline.stages.common import StageResult
from pipeline.stages.evaluate import evaluate, markdown_table
from pipeline.stages.train import run_online_train, run_train
from pipeline.tasks import arithmetic
from pipeline.train.checkpoint import run_fingerprint
from pipeline.train.distributed import DistInfo, seed_everything
from pipeline.train.loop import train_in_process
from pipeline.train.metrics import read_metrics
from pipeline.train.objective import SftObjective
from pipeline.train.sources import ExampleBatches
from pipeline.train.student import count_flop_params, save_hf_model

# --- the world ------------------------------------------------------------------------------------


def write_demo_prompts(out: Path, demo: DemoConfig) -> dict[str, Path]:
    """train (teacher SFT data), opd (rollouts), test and val (the learning-rate sweep) prompts: four disjoint sets of
    problems."""
    out = Path(out)
    paths = {name: out / f"{name}.jsonl" for name in ("train", "opd", "test", "val")}
    spec = {k: getattr(demo, k) for k in ("digits", "train_prompts", "opd_prompts", "test_prompts", "val_prompts",
                                          "seed")}
    spec_file = out / "spec.json"
    if all(p.exists() for p in paths.values()) and spec_file.exists() and json.loads(spec_file.read_text()) == spec:
        return paths
    test = arithmetic.make_problems(demo.test_prompts, demo.digits, seed=demo.seed + 101, prefix="test-")
    used = {(p.a, p.b) for p in test}
    train = arithmetic.make_problems(demo.train_prompts, demo.digits, seed=demo.seed + 202, exclude=used,
                                     prefix="train-")
    used |= {(p.a, p.b) for p in train}
    opd = arithmetic.make_problems(demo.opd_prompts, demo.digits, seed=demo.seed + 303, exclude=used, prefix="opd-")
    used |= {(p.a, p.b) for p in opd}
    val = arithmetic.make_problems(demo.val_prompts, demo.digits, seed=demo.seed + 404, exclude=used, prefix="val-")
    for name, problems in (("train", train), ("opd", opd), ("test", test), ("val", val)):
        write_prompts_jsonl([PromptRecord(p.id, p.prompt, p.answer) for p in problems], paths[name])
    spec_file.write_text(json.dumps(spec))
    return paths


def ground_truth_examples(tokenizer: Any, demo: DemoConfig, style: str, exclude: set[tuple[int, int]],
                          seed: int) -> Iterator[tuple[np.ndarray, int]]:
    """Endless fresh problems (never a test problem) with their correct solution in ``style`` and ``demo.format``.
    In the guess format a ``demo.wrong_guesses`` fraction of them starts with a wrong guess
    (``arithmetic.wrong_guess``) that carries no loss (it counts as prompt: the loss starts after its ``|``), and
    the steps and final answer stay right: the teacher learns to take the answer from the steps, whatever the
    guess."""
    rng = np.random.default_rng(seed)
    wrong_rng = random.Random(seed + 1)
    lo, hi = 10 ** (demo.digits - 1), 10**demo.digits
    while True:
        a, b = int(rng.integers(lo, hi)), int(rng.integers(lo, hi))
        if (a, b) in exclude:
            continue
        prompt = encode_prompt(tokenizer, f"{a}+{b}=")
        guess = None
        if demo.format == "guess" and rng.random() < demo.wrong_guesses:
            guess = arithmetic.wrong_guess(a + b, wrong_rng)
        text = arithmetic.solution(a, b, demo.digits, style, demo.format, guess)
        response = tokenizer(text, add_special_tokens=False)["input_ids"]
        no_loss = 0 if guess is None else len(str(guess)) + 1
        yield np.asarray(prompt + response + [tokenizer.eos_token_id], dtype=np.int64), len(prompt) + no_loss


def bootstrap_teacher(init_dir: Path, out: Path, style: str, demo: DemoConfig, test_prompts: list[PromptRecord],
                      show_progress: bool = True) -> dict[str, Any]:
    """Demo only: train a teacher from scratch on correct solutions; real use brings an existing teacher."""
    spec = {"style": style, "steps": demo.teacher_steps, "batch": demo.teacher_batch_size,
            "optim": demo.teacher_optim.model_dump(), "shape": demo.teacher.model_dump(), "seed": demo.seed,
            "digits": demo.digits, **({"format": "guess", "wrong_guesses": demo.wrong_guesses}
                                      if demo.format == "guess" else {})}
    done = read_provenance(out)
    if done.get("bootstrap_hash") == run_fingerprint(spec):
        log.info("bootstrap: teacher %s already trained (accuracy %.3f); reusing %s", style, done["accuracy"], out)
        return {"dir": out, "accuracy": done["accuracy"], "seconds": 0.0, "skipped": True}
    seed_everything(demo.seed + (0 if style == "A" else 17))
    tokenizer = load_tokenizer(init_dir)
    model = load_model(init_dir)
    exclude = {(int(p.prompt.split("+")[0]), int(p.prompt.split("+")[1].rstrip("="))) for p in test_prompts}
    t0 = time.perf_counter()
    scale = ScaleConfig()  # one process, fp32, one micro-batch per step
    examples = ground_truth_examples(tokenizer, demo, style, exclude, demo.seed + ord(style))
    source = ExampleBatches(examples, scale, demo.teacher_batch_size, tokenizer.pad_token_id, DistInfo())
    train_in_process(model, source, SftObjective(), scale, demo.teacher_optim, steps=demo.teacher_steps, log_every=20,
                     description=f"bootstrap teacher {style}", show_progress=show_progress, loss_key="loss/sft")
    seconds = time.perf_counter() - t0
    acc = evaluate(HFEngine(str(init_dir), EngineConfig(batch_size=512), model=model), tokenizer, test_prompts,
                   checker="arithmetic", max_new_tokens=demo.max_new_tokens)["pass@1"]
    save_hf_model(model, tokenizer, out, {"stage": "bootstrap", "style": style, "accuracy": acc,
                                           "bootstrap_hash": run_fingerprint(spec)})
    log.info("bootstrap: teacher %s trained in %.1fs, greedy accuracy %.3f", style, seconds, acc)
    return {"dir": out, "accuracy": acc, "seconds": seconds, "skipped": False}


def ensure_world(cfg: RunConfig, styles: tuple[str, ...] = ("A", "B"), show_progress: bool = True,
                 pool: Executor | None = None) -> dict[str, Any]:
    """The demo world's prompts, initial models and bootstrapped teachers (trained on ``pool``'s workers when
    given), each reused when complete."""
    demo = cfg.demo()
    world = Path(cfg.run_dir) / "world"
    prompts = write_demo_prompts(world / "prompts", demo)
    if not (world / "models" / "student_init" / "config.json").exists():
        make_models(world / "models", demo.teacher, demo.student, seed=demo.seed)
    test = load_prompts(prompts["test"])
    args = {s: (world / "models" / "teacher_init", world / f"teacher_{s}", s, demo, test) for s in styles}
    if pool is None:
        teachers = {s: bootstrap_teacher(*a, show_progress=show_progress) for s, a in args.items()}
    else:
        log.info("bootstrap: training teachers %s side by side", ", ".join(styles))
        futures = {s: pool.submit(bootstrap_teacher, *a, show_progress=False) for s, a in args.items()}
        teachers = {s: f.result() for s, f in futures.items()}
    return {"prompts": prompts, "teachers": teachers, "student_init": world / "models" / "student_init"}


# --- accuracy curves during training ------------------------------------------------------------------


def accuracy_probe(model_dir: Path, prompts: list[PromptRecord],
                   max_new_tokens: int) -> Callable[[torch.nn.Module], dict[str, float]]:
    """A train-time eval hook: greedy accuracy of the in-memory model on a fixed prompt subset."""
    tokenizer = load_tokenizer(model_dir)

    def probe(model: torch.nn.Module) -> dict[str, float]:
        was = model.training
        engine = HFEngine(str(model_dir), EngineConfig(batch_size=512), model=model)
        acc = evaluate(engine, tokenizer, prompts, checker="arithmetic", max_new_tokens=max_new_tokens)["pass@1"]
        model.train(was)
        return {"eval/accuracy": acc}

    return probe


Curve = list[tuple[int, float, float]]  # (step, training seconds, probe accuracy)


def accuracy_curve(metrics_path: Path) -> Curve:
    """The accuracy probes recorded in a training run's metrics.jsonl."""
    return [(r["step"], r["perf/train_seconds"], r["eval/accuracy"]) for r in read_metrics(metrics_path)
            if "eval/accuracy" in r]


def time_to_accuracy(curve: Curve, target: float, offset_seconds: float = 0.0) -> float | None:
    """Training seconds (+ a fixed offset, e.g. offline precompute) at the first probe reaching ``target``."""
    return next((offset_seconds + secs for _, secs, acc in curve if acc >= target), None)


def time_to_target(offline: Curve, online: Curve, precompute_seconds: float) -> dict[str, Any]:
    """Offline vs online OPD's compute seconds to the offline row's final probe accuracy (the target); offline
    counts its one-time rollouts + scoring. speed-up = online seconds / offline seconds; a lower bound (online's
    whole budget / offline) when online never reaches the target; none when the SFT student's probe (step 0)
    already reads the target: then neither run needed training to reach it and a ratio would mean nothing."""
    target = offline[-1][2] if offline else None
    t_off = time_to_accuracy(offline, target, precompute_seconds) if target is not None else None
    t_on = time_to_accuracy(online, target) if target is not None else None
    at_start = target is not None and any(step == 0 and acc >= target for step, _, acc in offline + online)
    online_total = online[-1][1] if online else 0.0
    return {
        "target_probe_accuracy": target,  # times rounded: the sum of floats prints as 11.722000000000001
        "offline_seconds": None if t_off is None else round(t_off, 2),
        "online_seconds": None if t_on is None else round(t_on, 2),
        "offline_precompute_seconds": round(precompute_seconds, 2),
        "online_budget_seconds": online_total,
        "target_met_at_start": at_start,
        "speedup": round(t_on / t_off, 2) if (t_on is not None and t_off and not at_start) else None,
        "speedup_lower_bound": round(online_total / t_off, 2) if (t_on is None and t_off and not at_start) else None,
    }


def _at_step(curve: Curve, step: int) -> float | None:
    """The probe accuracy recorded at ``step`` (None if no probe ran there)."""
    return next((acc for s, _, acc in curve if s == step), None)


def plot_demo(curves: dict[str, tuple[Curve, float]], out: Path) -> Path:
    """Accuracy against training step and against compute seconds (offline includes its precompute)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.6))
    # curves that coincide stay visible: each its own line style and hollow marker, drawn thinner the later it comes
    styles = [("-", "o"), ("--", "s"), (":", "^"), ("-.", "D"), ((0, (5, 1)), "v")]
    for i, (name, (pts, offset)) in enumerate(curves.items()):
        line, marker = styles[i % len(styles)]
        kw = {"linestyle": line, "marker": marker, "markersize": max(7 - i, 3), "markerfacecolor": "none",
              "linewidth": max(2.2 - 0.4 * i, 0.8), "label": name}
        ax1.plot([p[0] for p in pts], [p[2] for p in pts], **kw)
        ax2.plot([offset + p[1] for p in pts], [p[2] for p in pts], **kw)
    ax1.set_xlabel("optimizer step")
    ax2.set_xlabel("compute seconds (offline includes its one-time rollouts + scoring)")
    for ax in (ax1, ax2):
        ax.set_ylabel("greedy accuracy (probe set)")
        ax.set_ylim(-0.03, 1.05)
        ax.grid(alpha=0.3)
    # the legend below the axes, off the curves and the tick labels
    handles, labels = ax1.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.02 + 0.045 * ((len(labels) + 1) // 2), 1, 1))
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


# --- the demo's steps: plain functions that run_demo (the CLI) and the lightning-opd flow (flows/) both call ---


@dataclass(frozen=True)
class DemoStep:
    """One stage run of the demo: a registry stage, its config (train runs also record the accuracy probe) and the
    steps whose output it reads (``needs``: what lets independent steps run side by side)."""

    stage: str
    cfg: Any
    needs: tuple[str, ...] = ()


@dataclass(frozen=True)
class DemoPlan:
    """Every stage run of the demo, in order, with its config; derived up front from the run config and the
    world, so that each entry point only runs the steps one after the other."""

    run_dir: Path
    demo: DemoConfig
    probe_model: Path  # the SFT student dir: the probe's tokenizer
    test_prompts: Path
    steps: dict[str, DemoStep]
    evals: dict[str, str]  # row of the accuracy table -> its eval step
    labels: dict[str, str]  # row -> what it is, for tables and plots
    sft_curve: dict[str, int]  # row of the SFT curve -> teacher answers per OPD prompt


def published_lightning_config(train_cfg: TrainConfig, lr: float, out: Path) -> TrainConfig:
    """The Lightning OPD paper's loss on lopd shards: ``lightning`` alone (sampled-token policy gradient,
    no importance ratio, sequence normalisation), reading only the sampled token's teacher log-prob (what the
    paper stores); same student, shards, steps and batch as ``train_cfg``, its own learning rate (the policy
    gradient family's)."""
    return train_cfg.model_copy(update={
        "losses": {"lightning": 1.0}, "loss_schedule": [], "rows": {},
        "lightning": LightningLossConfig(importance="none", normalization="sequence"),
        "optim": train_cfg.optim.model_copy(update={"lr": lr}), "out": out})


def loss_label(cfg: TrainConfig) -> str:
    """What a train config optimises, in words: lopd's top-k losses name k and the tail bucket, so that a top-k
    row is never read as the published Lightning OPD loss."""
    if cfg.all_losses() == {"lightning"}:
        return "Lightning OPD (published loss)"
    terms = " + ".join(f"{w:g} {name}" if w != 1 else name for name, w in cfg.losses.items() if w != 0)
    tail = " + tail" if cfg.tail_bucket and any(n.endswith("_topk") for n in cfg.losses) else ""
    return f"lopd top-k{tail} ({terms})"


def pin_machine(demo: DemoConfig) -> dict[str, Any]:
    """Pin what changes the demo's float results on a CPU and record it: torch threads (``demo.threads``),
    deterministic algorithms in every stage of this process; returns the record for demo.json (threads, torch and
    its CPU kernel level, the CPU, library versions). Results still differ across CPUs whose kernels differ (the
    capability and the CPU model say which; docs/demo.md)."""
    import platform
    from importlib.metadata import version

    torch.set_num_threads(demo.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    cpuinfo = Path("/proc/cpuinfo")
    models = ([line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
               if line.startswith("model name")] if cpuinfo.exists() else [])
    cpu = models[0] if models else platform.processor()
    return {"threads": torch.get_num_threads(), "torch": torch.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpu": cpu, "cores": os.cpu_count(),
            "python": platform.python_version(), "deterministic": torch.are_deterministic_algorithms_enabled(),
            "versions": {name: version(name) for name in ("transformers", "numpy", "pyarrow", "tokenizers")}}


def demo_world(cfg: RunConfig, show_progress: bool = True, pool: Executor | None = None) -> dict[str, Any]:
    """Step 1: the machine pinned and recorded (``pin_machine``), prompt files, models and the two bootstrapped
    teachers (A and B, side by side on ``pool``'s workers when given), reused when complete."""
    t0 = time.perf_counter()
    machine = {**pin_machine(cfg.demo()), "workers": cfg.demo().workers if pool is not None else 1}
    world = {**ensure_world(cfg, ("A", "B"), show_progress, pool), "machine": machine}
    world["seconds"] = round(time.perf_counter() - t0, 2)
    _keep_timing(Path(cfg.run_dir), "world", world["seconds"])
    return world


def demo_plan(cfg: RunConfig, world: dict[str, Any]) -> DemoPlan:
    """The demo's stage runs in order: offline OPD (lopd's top-k loss), the ablations and controls, then an
    eval of every model."""
    demo = cfg.demo()
    ablations = Path(cfg.run_dir) / "ablations"
    sft_cfg: SftConfig = cfg.stage("sft")
    roll_cfg, tl_cfg = cfg.stage("rollouts"), cfg.stage("teacher_logprobs")
    train_cfg: TrainConfig = cfg.stage("train")
    # (a) the published Lightning OPD loss from the same shards
    train_pub = published_lightning_config(train_cfg, demo.pg_lr, ablations / "train_lightning_published")
    # (a) teacher inconsistency: same rollouts, scored by teacher B
    tl_b = tl_cfg.model_copy(update={"teacher": world["teachers"]["B"]["dir"], "out": ablations / "teacher_topk_B",
                                     "allow_teacher_mismatch": True})
    train_b = train_cfg.model_copy(update={"shards": tl_b.out, "out": ablations / "train_inconsistent"})
    # (b) online OPD: live teacher every step, same batch / losses; a longer budget (online_steps_factor) so
    # that the time it needs to reach Lightning OPD's accuracy is measured, not only bounded
    online = OnlineConfig(teacher=tl_cfg.teacher, prompts=roll_cfg.prompts, sampling=roll_cfg.sampling, k=tl_cfg.k,
                          use_chat_template=roll_cfg.use_chat_template)
    train_online = train_cfg.model_copy(update={"online": online, "out": ablations / "train_online",
                                                "steps": int(train_cfg.steps * demo.online_steps_factor)})
    # (c) control: SFT continued on the teacher's data for OPD's steps and batch, with OPD's optimiser at the SFT
    # family's rate (demo.sft_lr): the controls differ from the OPD rows in their data and loss, nothing else
    control = sft_cfg.model_copy(update={"student": sft_cfg.out, "out": ablations / "sft_continued",
                                         "steps": train_cfg.steps, "batch_size": train_cfg.batch_size,
                                         "optim": train_cfg.optim.model_copy(update={"lr": demo.sft_lr})})
    # (e) the SFT curve: the teacher answers the OPD prompts n times each for each n of demo.sft_curve, and the SFT
    # student learns those answers for OPD's steps and batch. The point with n = the rollouts' samples per prompt
    # (row sft_opd_prompts) makes as many teacher calls as the scoring pass; each costs a decode, not a prefill.
    tsd_cfg: TeacherSftDataConfig = cfg.stage("teacher_sft_data")
    curve: dict[str, tuple[int, TeacherSftDataConfig, SftConfig]] = {}
    for n in demo.sft_curve:
        row = "sft_opd_prompts" if n == roll_cfg.sampling.n else f"sft_opd_prompts_x{n}"
        tsd_n = tsd_cfg.model_copy(update={
            "prompts": roll_cfg.prompts, "limit": roll_cfg.limit, "out": ablations / f"teacher_sft_data_{row}",
            "sampling": tsd_cfg.sampling.model_copy(update={"n": n})})
        curve[row] = (n, tsd_n, control.model_copy(update={"data": tsd_n.out, "out": ablations / row}))
    # listed in a valid sequential order that is also the priority with several workers: online OPD (the longest
    # step) starts as soon as the SFT student exists
    steps = {
        "teacher_sft_data": DemoStep("teacher_sft_data", tsd_cfg),
        "sft": DemoStep("sft", sft_cfg, ("teacher_sft_data",)),
        "rollouts": DemoStep("rollouts", roll_cfg, ("sft",)),
        "train_online": DemoStep("train", train_online, ("sft",)),
        "teacher_logprobs": DemoStep("teacher_logprobs", tl_cfg, ("rollouts",)),
        "train_topk": DemoStep("train", train_cfg, ("teacher_logprobs",)),
        "train_lightning_published": DemoStep("train", train_pub, ("teacher_logprobs",)),
        "teacher_logprobs_B": DemoStep("teacher_logprobs", tl_b, ("rollouts",)),
        "train_inconsistent": DemoStep("train", train_b, ("teacher_logprobs_B",)),
        "sft_continued": DemoStep("sft", control, ("sft",)),
        **{step: DemoStep(stage, c, needs) for row, (_, tsd_n, sft_n) in curve.items()
           for step, stage, c, needs in ((f"teacher_sft_data_{row}", "teacher_sft_data", tsd_n, ()),
                                         (row, "sft", sft_n, ("sft", f"teacher_sft_data_{row}")))},
    }
    # eval everything on the full held-out set
    # every row of the table -> the step that writes its model (the teachers come with the world)
    made_by = {"sft": "sft", "topk_opd": "train_topk", "lightning_published": "train_lightning_published",
               "inconsistent_teacher": "train_inconsistent", "online_opd": "train_online",
               "sft_continued": "sft_continued", **{row: row for row in curve}}
    models: dict[str, tuple[Path, tuple[str, ...]]] = {
        "teacher": (world["teachers"]["A"]["dir"], ()), "teacher_B": (world["teachers"]["B"]["dir"], ()),
        **{row: (steps[step].cfg.out / "final" if steps[step].stage == "train" else steps[step].cfg.out, (step,))
           for row, step in made_by.items()}}
    topk = loss_label(train_cfg)
    labels = {"teacher": "teacher A", "teacher_B": "teacher B (other style)", "sft": "SFT student",
              "topk_opd": f"{topk}, offline", "lightning_published": loss_label(train_pub) + ", offline",
              "inconsistent_teacher": f"{topk}, shards scored by teacher B (inconsistent teacher)",
              "online_opd": f"online OPD, {topk}, live teacher",
              "sft_continued": "SFT continued on the teacher's SFT answers (control)",
              **{row: f"SFT on teacher answers to the OPD prompts, {n} per prompt (control)"
                 for row, (n, _, _) in curve.items()}}
    for name, (model_dir, needs) in models.items():
        steps[f"eval_{name}"] = DemoStep("eval", EvalConfig(
            model=model_dir, prompts=world["prompts"]["test"], out=Path(cfg.run_dir) / "eval" / name,
            max_new_tokens=demo.max_new_tokens, engine=EngineConfig(batch_size=512)), needs)
    return DemoPlan(run_dir=Path(cfg.run_dir), demo=demo, probe_model=sft_cfg.out,
                    test_prompts=world["prompts"]["test"], steps=steps, evals={m: f"eval_{m}" for m in models},
                    labels=labels, sft_curve={row: n for row, (n, _, _) in curve.items()})


def run_demo_step(plan: DemoPlan, name: str, show_progress: bool = True, keep_timing: bool = True) -> StageResult:
    """One step of the plan; the result's ``wall_seconds`` is the step's, kept in demo_timings.json when the
    stage really ran (not when it found its output complete; ``keep_timing=False``: the caller keeps it, as the
    main process does for its workers)."""
    step = plan.steps[name]
    t0 = time.perf_counter()
    if step.stage == "train":
        probe_prompts = load_prompts(plan.test_prompts)[: plan.demo.probe_prompts]
        probe = accuracy_probe(plan.probe_model, probe_prompts, plan.demo.max_new_tokens)
        train = run_train if step.cfg.online is None else run_online_train
        result = train(step.cfg, show_progress=show_progress, eval_hook=probe, eval_every=plan.demo.probe_every)
    else:
        result = registry.run_stage(step.stage, step.cfg, show_progress and step.stage != "eval")
    result = replace(result, wall_seconds=round(time.perf_counter() - t0, 2))
    if keep_timing and not result.skipped:
        _keep_timing(plan.run_dir, name, result.wall_seconds)
    return result


def _step_in_worker(plan: DemoPlan, name: str) -> StageResult:
    return run_demo_step(plan, name, show_progress=False, keep_timing=False)


def run_plan(plan: DemoPlan, pool: Executor | None, show_progress: bool = True) -> dict[str, StageResult]:
    """Every step of the plan once its inputs exist: in order in this process, or ``demo.workers`` at a time on
    ``pool``'s processes (same results: every step pins its threads and seeds itself)."""
    total, done = len(plan.steps), [0]

    def submit(ex: Executor, name: str) -> Future[StageResult]:
        log.info("demo: %s started", name)
        return ex.submit(_step_in_worker, plan, name)

    def on_done(name: str, result: StageResult) -> None:
        done[0] += 1
        if pool is not None:
            if not result.skipped:
                _keep_timing(plan.run_dir, name, result.wall_seconds)
            log.info("demo: %s %s in %.1fs (%d/%d steps)", name, "reused" if result.skipped else "done",
                     result.wall_seconds, done[0], total)

    return run_steps({name: step.needs for name, step in plan.steps.items()}, submit,
                     lambda name: run_demo_step(plan, name, show_progress), pool, plan.demo.workers, on_done)


def _keep_timing(run_dir: Path, name: str, seconds: float) -> None:
    # Compute seconds of each step when it really ran, kept across reruns (a reused stage costs ~0 now,
    # but the time-to-accuracy comparison needs what it cost when it ran).
    path = run_dir / "demo_timings.json"
    timings = json.loads(path.read_text()) if path.exists() else {}
    run_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**timings, name: seconds}, indent=2))


def demo_costs(plan: DemoPlan, world: dict[str, Any], timings: dict[str, float]) -> tuple[Cost, dict[str, Cost]]:
    """What every row cost beyond the shared start, and the shared start (the teacher's SFT answers and the SFT
    student), in FLOPs and seconds (``compute``): the offline rows pay the rollouts and one scoring pass (shared by
    the rows that read the same shards, counted in each), online OPD its sampling and scoring every step, the SFT
    curve the teacher's answers. Seconds are each stage's own when it ran (probes excluded)."""
    steps = plan.steps
    p_teacher = count_flop_params(load_model(world["teachers"]["A"]["dir"]))
    p_student = count_flop_params(load_model(steps["sft"].cfg.student))

    def sft_train(step: str) -> Cost:
        out = steps[step].cfg.out
        return compute.training_cost(out.with_name(out.name + "_logs") / "metrics.jsonl", p_student)

    def opd_train(step: str) -> Cost:
        return compute.training_cost(steps[step].cfg.out / "metrics.jsonl", p_student)

    rollouts = compute.rollouts_cost(steps["rollouts"].cfg.out, p_student, timings.get("rollouts", 0.0))
    precompute = rollouts + compute.scoring_cost(steps["teacher_logprobs"].cfg.out, p_teacher,
                                                 timings.get("teacher_logprobs", 0.0))
    shared = (compute.answers_cost(steps["teacher_sft_data"].cfg.out, p_teacher, timings.get("teacher_sft_data", 0.0))
              + sft_train("sft"))
    costs = {"topk_opd": precompute + opd_train("train_topk"),
             "lightning_published": precompute + opd_train("train_lightning_published"),
             "inconsistent_teacher": (rollouts + compute.scoring_cost(steps["teacher_logprobs_B"].cfg.out, p_teacher,
                                                                      timings.get("teacher_logprobs_B", 0.0))
                                      + opd_train("train_inconsistent")),
             "online_opd": compute.online_cost(steps["train_online"].cfg.out / "metrics.jsonl", p_teacher, p_student),
             "sft_continued": sft_train("sft_continued")}
    for row in plan.sft_curve:
        step = f"teacher_sft_data_{row}"
        costs[row] = compute.answers_cost(steps[step].cfg.out, p_teacher, timings.get(step, 0.0)) + sft_train(row)
    return shared, costs


def plot_teacher_compute(curve: list[tuple[float, float]], points: dict[str, tuple[float, float]], out: Path) -> Path:
    """Accuracy against the teacher's FLOPs beyond the shared start: the SFT curve and the OPD rows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5.2))
    xs, ys = zip(*sorted(curve))
    # the SFT curve's points hollow and large, the OPD rows filled or hollow in other shapes and sizes, drawn on
    # top: a row at the same FLOPs and accuracy as a curve point (the scoring pass costs what 4 answers per prompt
    # cost) or as another row still shows
    ax.plot(xs, ys, marker="o", markersize=12, markerfacecolor="none", markeredgewidth=1.5, zorder=2,
            label="SFT on teacher answers to the OPD prompts (1, 2, 4, 8 per prompt)")
    shapes = [("*", 150, True), ("D", 110, False), ("^", 70, True), ("s", 90, False)]
    for i, (label, (x, y)) in enumerate(points.items()):
        marker, size, filled = shapes[i % len(shapes)]
        color = f"C{i + 1}"
        ax.scatter([x], [y], s=size, marker=marker, label=label, zorder=5 - 0.1 * i, linewidths=1.5,
                   facecolors=color if filled else "none", edgecolors=color)
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # minor labels (2x10^10, 3x10^10...) collide
    ax.set_xlabel("teacher FLOPs beyond the shared start (answers: decode; OPD: one scoring prefill)")
    ax.set_ylabel("greedy accuracy (held-out)")
    ax.set_ylim(-0.03, 1.05)
    ax.grid(alpha=0.3, which="both")
    # the legend below the axes, off the data and the tick labels
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=1, frameon=False)
    fig.tight_layout()
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out


def demo_report(plan: DemoPlan, world: dict[str, Any], results: dict[str, StageResult],
                started: float) -> dict[str, Any]:
    """The last step: accuracies, time to the top-k row's final accuracy offline vs online, plots; writes
    demo.json and demo.md. ``started``: ``time.perf_counter()`` when the demo began."""
    run_dir = plan.run_dir
    train_cfg, train_b = plan.steps["train_topk"].cfg, plan.steps["train_inconsistent"].cfg
    train_pub = plan.steps["train_lightning_published"].cfg
    train_online, control = plan.steps["train_online"].cfg, plan.steps["sft_continued"].cfg
    wall = {"world": world["seconds"], **{f"bootstrap_teacher_{s}": round(t["seconds"], 2)
                                          for s, t in world["teachers"].items()}}
    reused = [f"bootstrap_teacher_{s}" for s, t in world["teachers"].items() if t["skipped"]]
    wall.update({name: r.wall_seconds for name, r in results.items()})
    reused += [name for name, r in results.items() if r.skipped]
    evals = {row: json.loads((plan.steps[step].cfg.out / "eval.json").read_text())
             for row, step in plan.evals.items()}
    timings_path = run_dir / "demo_timings.json"
    timings: dict[str, float] = json.loads(timings_path.read_text()) if timings_path.exists() else {}

    # time to the top-k row's final accuracy (on the probe set), offline including its one-time precompute
    offline_curve = accuracy_curve(train_cfg.out / "metrics.jsonl")
    published_curve = accuracy_curve(train_pub.out / "metrics.jsonl")
    online_curve = accuracy_curve(train_online.out / "metrics.jsonl")
    inconsistent_curve = accuracy_curve(train_b.out / "metrics.jsonl")
    precompute = timings.get("rollouts", 0.0) + timings.get("teacher_logprobs", 0.0)
    labels = plan.labels
    shared, costs = demo_costs(plan, world, timings)
    accuracy = {row: evals[row]["pass@1"] for row in plan.evals}
    curve = [(costs[row].teacher_flops, accuracy[row]) for row in plan.sft_curve]
    opd_rows = ("topk_opd", "lightning_published", "online_opd")
    plots = {
        "accuracy_vs_teacher_compute": str(plot_teacher_compute(
            curve, {labels[row]: (costs[row].teacher_flops, accuracy[row]) for row in opd_rows},
            run_dir / "demo_teacher_compute.png")),
        "accuracy_vs_time": str(plot_demo({
            labels["topk_opd"]: (offline_curve, precompute),
            labels["lightning_published"]: (published_curve, precompute),
            labels["online_opd"]: (online_curve, 0.0),
            "inconsistent teacher (offline)": (inconsistent_curve, precompute),
        }, run_dir / "demo_accuracy.png")),
        "topk_training_curves": str(train_cfg.out / "curves.png"),
        "online_training_curves": str(train_online.out / "curves.png"),
    }
    result = {
        "accuracy": accuracy,
        "labels": labels,
        "compute": {"shared_start": shared.to_dict(), "rows": {row: c.to_dict() for row, c in costs.items()}},
        "sft_curve": [{"row": row, "answers_per_prompt": n,
                       "teacher_answers": _rows(results[f"teacher_sft_data_{row}"]),
                       "teacher_flops": costs[row].to_dict()["teacher_flops"],
                       "teacher_seconds": costs[row].to_dict()["teacher_seconds"], "accuracy": accuracy[row]}
                      for row, n in plan.sft_curve.items()],
        # the teacher FLOPs at which the SFT curve reaches each OPD row's accuracy, beside what that row's teacher used
        "break_even": {row: {**compute.break_even(curve, accuracy[row]), "accuracy": accuracy[row],
                             "opd_teacher_flops": costs[row].to_dict()["teacher_flops"]} for row in opd_rows},
        "machine": world["machine"],
        **({"guess_check": guess_check(plan, world)} if plan.demo.format == "guess" else {}),
        "time_to_accuracy": time_to_target(offline_curve, online_curve, precompute),
        "probe_accuracy_at_equal_steps": {
            name: _at_step(curve, train_cfg.steps) for name, curve in (
                ("topk_opd", offline_curve), ("lightning_published", published_curve), ("online_opd", online_curve),
                ("inconsistent_teacher", inconsistent_curve))},
        "budgets": {"offline_steps": train_cfg.steps, "online_steps": train_online.steps,
                    "sft_continued_steps": control.steps, "batch_size": train_cfg.batch_size,
                    "topk_lr": train_cfg.optim.lr, "lightning_published_lr": train_pub.optim.lr,
                    "sft_opd_prompts_teacher_answers": _rows(results["teacher_sft_data_sft_opd_prompts"]),
                    "teacher_scored_rollouts": _rows(results["rollouts"])},
        "wall_seconds": {**wall, "total": round(time.perf_counter() - started, 2)},
        "reused_stages": reused,
        "sft_data": results["teacher_sft_data"].summary,
        "test_prompts": len(load_prompts(plan.test_prompts)),
        "plots": plots,
        "run_dir": str(run_dir),
    }
    (run_dir / "demo.json").write_text(json.dumps(result, indent=2, default=str))
    (run_dir / "demo.md").write_text(_markdown(result, {labels[row]: r for row, r in evals.items()}))
    return result


def guess_check(plan: DemoPlan, world: dict[str, Any]) -> dict[str, Any]:
    """The guess world's diagnostic (``pipeline.demo.diagnose``): how often the SFT student's rollouts (the states
    the offline rows learn from) and every row's greedy answers on the test problems have a wrong guess, the
    accuracy when it is wrong, and whether the final answer then copies the guess or reads the steps."""
    from pipeline.demo.diagnose import greedy_guess_stats, rollout_guess_stats

    test = load_prompts(plan.test_prompts)
    rows = {row: greedy_guess_stats(Path(plan.steps[step].cfg.model), test, plan.demo.max_new_tokens)
            for row, step in plan.evals.items() if row != "teacher_B"}
    rollouts = rollout_guess_stats(plan.steps["rollouts"].cfg.out, load_prompts(world["prompts"]["opd"]),
                                   load_tokenizer(plan.probe_model))
    return {"sft_rollouts": rollouts, "rollout_temperature": plan.steps["rollouts"].cfg.sampling.temperature,
            "greedy": rows}


def guess_check_lines(result: dict[str, Any]) -> list[str]:
    """The guess diagnostic in words, one line per row (empty outside the guess world)."""
    check = result.get("guess_check")
    if not check:
        return []

    def fmt(d: dict[str, Any]) -> str:
        def pct(key: str) -> str:
            return "-" if d[key] is None else f"{d[key]:.3f}"

        return (f"guess wrong {pct('guess_wrong')} ({d['counts']['guess_wrong']} of {d['responses']}); accuracy when "
                f"wrong {pct('accuracy_guess_wrong')}, when right {pct('accuracy_guess_right')}; a wrong guess copied "
                f"{pct('copies_wrong_guess')}, steps read {pct('reads_steps')}")

    lines = [f"SFT student's rollouts (temperature {check['rollout_temperature']}): "
             + fmt(check["sft_rollouts"])]
    lines += [f"{result['labels'].get(row, row)}, greedy: {fmt(d)}" for row, d in check["greedy"].items()]
    return lines


# --- the demo ------------------------------------------------------------------------------------------


def run_demo(cfg: RunConfig, show_progress: bool = True, print_table: bool = True) -> dict[str, Any]:
    """``lopd demo``: the world, every step of the plan in order, the report (flows.stages.lightning_opd runs
    the same steps as Prefect tasks)."""
    started = time.perf_counter()
    demo = cfg.demo()
    with process_pool(demo.workers, pin_machine, (demo,)) if demo.workers > 1 else nullcontext() as pool:
        world = demo_world(cfg, show_progress, pool)
        plan = demo_plan(cfg, world)
        results = run_plan(plan, pool, show_progress)
    result = demo_report(plan, world, results, started)
    if print_table:
        print_demo_table(result)
    return result


def _rows(result: StageResult) -> int | None:
    """Rows a sampling stage holds: counted when it ran, read from its manifest when it was reused."""
    return result.summary.get("kept", result.summary.get("rows"))


def compute_table(result: dict[str, Any]) -> list[tuple[str, str, str, str, str, str]]:
    """Rows of (label, accuracy, teacher FLOPs, teacher s, student FLOPs, student s) for every row, its cost
    beyond the shared start (teacher answers for SFT, the SFT student): the table of the demo and its README."""
    rows = []
    for row, acc in result["accuracy"].items():
        c = result["compute"]["rows"].get(row)
        cost = ((f"{c['teacher_flops']:.2e}", f"{c['teacher_seconds']:.1f}", f"{c['student_flops']:.2e}",
                 f"{c['student_seconds']:.1f}") if c else ("-", "-", "-", "-"))
        rows.append((result["labels"].get(row, row), f"{acc:.3f}", *cost))
    return rows


def break_even_lines(result: dict[str, Any]) -> list[str]:
    """The break-even of the SFT curve against each OPD row, in words."""
    out = []
    largest = max(point["teacher_flops"] for point in result["sft_curve"])
    for row, b in result["break_even"].items():
        if b["where"] == "above":
            sft = f"not reached within the budgets measured (up to {largest:.2e} teacher FLOPs)"
        elif b["where"] == "below":
            sft = f"already matched at the curve's smallest budget ({b['teacher_flops']:.2e} teacher FLOPs)"
        else:
            sft = f"matched at {b['teacher_flops']:.2e} teacher FLOPs"
        out.append(f"{result['labels'][row]}: {b['accuracy']:.3f} with {b['opd_teacher_flops']:.2e} teacher FLOPs; "
                   f"by SFT on teacher answers: {sft}")
    return out


def _markdown(result: dict[str, Any], evals: dict[str, dict[str, Any]]) -> str:
    lines = ["# lopd demo", "", markdown_table(evals), "",
             "## Compute beyond the shared start (teacher answers for SFT + the SFT student)", "",
             "| row | accuracy | teacher FLOPs | teacher s | student FLOPs | student s |", "|---|---|---|---|---|---|",
             *[f"| {' | '.join(r)} |" for r in compute_table(result)], "",
             "## Break-even of the SFT curve", "", *[f"- {line}" for line in break_even_lines(result)], "",
             *(["## Guess, then check: does the final answer read the steps?", "",
                *[f"- {line}" for line in guess_check_lines(result)], ""] if "guess_check" in result else []),
             "## Time to the top-k row's final probe accuracy", "",
             "```json", json.dumps(result["time_to_accuracy"], indent=2), "```", "",
             "## Wall seconds per step", "", "| step | seconds |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in result["wall_seconds"].items()]
    return "\n".join(lines) + "\n"


def print_demo_table(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="lopd demo: greedy accuracy on held-out problems, compute beyond the shared SFT start")
    table.add_column("model")
    for column in ("accuracy", "teacher FLOPs", "teacher s", "student FLOPs", "student s"):
        table.add_column(column, justify="right")
    for row in compute_table(result):
        table.add_row(*row)
    console = Console()
    console.print(table)
    for line in break_even_lines(result):
        console.print(line)
    for line in guess_check_lines(result):
        console.print(line)
    tta = result["time_to_accuracy"]
    if tta["target_met_at_start"]:
        console.print(f"time to the top-k row's final probe accuracy {tta['target_probe_accuracy']}: the SFT student "
                      "already reads it (no speed-up to measure)")
    else:
        speedup = tta["speedup"] or (f">= {tta['speedup_lower_bound']}" if tta["speedup_lower_bound"] else None)
        console.print(f"time to the top-k row's final probe accuracy {tta['target_probe_accuracy']}: offline "
                      f"{tta['offline_seconds']} s (incl. {tta['offline_precompute_seconds']} s rollouts+scoring), "
                      f"online {tta['online_seconds']} s -> speed-up {speedup}")
    console.print(f"total {result['wall_seconds']['total']} s; reused: {', '.join(result['reused_stages']) or 'none'}")
    console.print(f"results: {result['run_dir']}/demo.json, demo.md, demo_accuracy.png, demo_teacher_compute.png")
