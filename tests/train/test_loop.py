"""pipeline/train/loop.py: train_step's accumulation invariance (weights, routing, G-OPD, KDRL), packed SFT, and
the offline OPD trainer on real tiny models and real shards: learning, kill-and-resume, torchrun DDP / FSDP2 (one
and two nodes), the online baseline, SFT runs, the prefetching reader."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import TrainConfig, load_run_config
from pipeline.models import load_model
from pipeline.stages.registry import run_stage
from pipeline.stages.train import run_train
from pipeline.train.batching import collate
from pipeline.train.distributed import DistInfo
from pipeline.train.objective import batch_loss
from pipeline.train.sources import ShardBatches
from pipeline.train.student import StudentLM
from pipeline.train.weighting import RolloutTable
from storage.codecs import decode_table
from storage.errors import LopdUserError
from storage.prompt_stats import load_prompt_stats
from storage.shardset import ShardSet
from tests.conftest import REPO, free_port, lopd
from tests.train.helpers import grouped_records, prefixed_records, source_shard_set, train_cfg

# --- train_step ------------------------------------------------------------------------------------------------------


def test_accumulation_invariance_with_weights_and_routing(tiny_models, stats_shards):
    """``train_step`` with non-trivial weights (PACED, position, G-OPD with its guard and top-k form) and routed
    terms: one micro-batch of 8 and 8 micro-batches of 1 give the same loss and the same update (float64, SGD with
    lr 1, so the update is the gradient), because every normaliser and the PACED scale are the step's global
    sums."""
    from pipeline.models import load_model
    from pipeline.train.batching import prepare_step
    from pipeline.train.distributed import DistInfo
    from pipeline.train.loop import train_step
    from pipeline.train.metrics import StepMeter
    from pipeline.train.objective import OpdObjective

    rollouts = RolloutTable.from_table(load_prompt_stats(stats_shards, "k")[0])
    records = grouped_records()[4:]  # prompts with pass rates 0.5 and 1 (the latter weigh 0 under PACED)
    # G-OPD's top-k form reads a frozen reference (here the teacher model) for reverse_kl_topk's target
    reference = StudentLM(load_model(tiny_models["teacher"]).double()).eval().requires_grad_(False)
    results = []
    for accum in (1, 8):
        cfg = train_cfg(losses={"lightning": 1.0, "reverse_kl_topk": 0.5, "sft": 0.3},
                   rows={"sft": "correct", "reverse_kl_topk": "unsolved"}, batch_size=8, grad_accum=accum,
                   optim={"grad_clip": None},
                   methods={"paced": {}, "position": {"gamma": 0.5}, "gopd": {"lam": 1.25, "k3_guard": 0.1}})
        student = StudentLM(load_model(tiny_models["student"]).double())
        before = [p.detach().clone() for p in student.parameters()]
        opt = torch.optim.SGD(student.parameters(), lr=1.0)
        metrics, _ = train_step(student, opt, OpdObjective(cfg, rollouts, reference),
                                prepare_step(records[:8], cfg, 0, rollouts), cfg, cfg.optim.grad_clip, DistInfo(),
                                torch.device("cpu"), StepMeter(1, 1))
        results.append((metrics, [b - p.detach() for b, p in zip(before, student.parameters())]))
    (one, one_update), (many, many_update) = results
    assert abs(one["loss/total"].item()) > 1e-3
    assert one["weights/paced_kept"].item() < 1.0 < one["weights/paced_token_max"].item()
    for key in ("loss/total", "loss/lightning", "loss/reverse_kl", "loss/sft"):
        assert many[key].item() == pytest.approx(one[key].item(), rel=1e-10), key
    for a, b in zip(one_update, many_update):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_kdrl_through_train_step_is_invariant_to_accumulation(tmp_path, tiny_models):
    """``train_step`` with kdrl (and lightning): one micro-batch of 8 and 8 of 1 give the same losses and the same
    SGD update (float64)."""
    from pipeline.models import load_model
    from pipeline.stages.train import rollout_table
    from pipeline.train.batching import prepare_step
    from pipeline.train.loop import train_step
    from pipeline.train.metrics import StepMeter
    from pipeline.train.objective import OpdObjective

    records = prefixed_records("q", 8)
    shards = source_shard_set(tmp_path / "s", records)
    results = []
    for accum in (1, 8):
        cfg = TrainConfig(student="s", shards="d", out="o", losses={"kdrl": 1.0, "lightning": 0.5}, kdrl_beta=0.1,
                          batch_size=8, grad_accum=accum, optim={"grad_clip": None})
        student = StudentLM(load_model(tiny_models["student"]).double())
        before = [p.detach().clone() for p in student.parameters()]
        opt = torch.optim.SGD(student.parameters(), lr=1.0)
        rollouts = rollout_table(cfg, shards, "k")
        metrics, _ = train_step(student, opt, OpdObjective(cfg, rollouts), prepare_step(records[:8], cfg, 0, rollouts),
                                cfg, cfg.optim.grad_clip, DistInfo(), torch.device("cpu"), StepMeter(1, 1))
        results.append((metrics, [b - p.detach() for b, p in zip(before, student.parameters(), strict=True)]))
    (one, one_update), (many, many_update) = results
    assert abs(one["loss/kdrl"].item()) > 1e-4 and one["kdrl/distill"].item() > 0
    for key in ("loss/total", "loss/kdrl", "loss/lightning"):
        assert many[key].item() == pytest.approx(one[key].item(), rel=1e-10), key
    for a, b in zip(one_update, many_update, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


# --- SFT through the loop --------------------------------------------------------------------------------------------


def test_packed_sft_takes_the_same_steps_as_padded_sft(tiny_models):
    from pipeline.config import OptimConfig, ScaleConfig
    from pipeline.models import load_model
    from pipeline.train.loop import train_in_process
    from pipeline.train.objective import SftObjective
    from pipeline.train.sources import ExampleBatches

    rng = np.random.default_rng(0)
    vocab = load_model(tiny_models["student"]).config.vocab_size
    examples = [(rng.integers(3, vocab, size=int(n)), 3) for n in rng.integers(5, 14, size=24)]
    curves = {}
    for packing in (False, True):
        lm = load_model(tiny_models["student"])
        seen = []
        scale = ScaleConfig(packing=packing, max_tokens_per_micro_batch=40)
        train_in_process(lm, ExampleBatches(iter(examples), scale, 8, 0, DistInfo()), SftObjective(packing=packing),
                         scale, OptimConfig(lr=1e-2), steps=3, log_every=1, show_progress=False,
                         on_log=lambda step, m, seen=seen: seen.append(m))
        curves[packing] = [m["loss/sft"] for m in seen]
        assert (seen[-1]["perf/padding_frac"] == 0) == packing
    np.testing.assert_allclose(curves[True], curves[False], rtol=1e-5)


# --- training runs on real shards (integration) ------------------------------------------------------------------


def _all_records(shards: Path):
    s = ShardSet.open(shards)
    return [r for i in s.complete_indices() for r in decode_table(s.read_shard(i))]


def _loss_on(model_dir: Path, records, cfg) -> float:
    return batch_loss(cfg, load_model(model_dir), collate(records, pad_id=0))


@pytest.mark.integration
def test_offline_training_lowers_the_distillation_loss(shards_run):
    tmp, cfg = shards_run
    rc = load_run_config(cfg, [f"train.out={tmp / 'plain'}"])
    tcfg = rc.stage("train")
    res = run_stage("train", tcfg, show_progress=False)
    records = _all_records(tmp / "run" / "teacher_topk")
    before = _loss_on(tmp / "run" / "sft_student", records, tcfg)
    after = _loss_on(Path(res.summary["final_model"]), records, tcfg)
    assert after < before - 0.05, (before, after)
    rows = [json.loads(x) for x in (tmp / "plain" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 13))
    for key in ("loss/reverse_kl", "loss/lightning", "lightning/reverse_kl_estimate", "is/clip_frac",
                "perf/tokens_per_s", "optim/lr"):
        assert key in rows[-1], key
    assert (tmp / "plain" / "curves.png").stat().st_size > 1000
    # a finished run is not redone
    assert run_stage("train", tcfg, show_progress=False).skipped


@pytest.mark.integration
def test_killed_training_resumes_with_identical_loss_curve(shards_run):
    tmp, cfg = shards_run
    ref_out, out = tmp / "ref", tmp / "killed"
    lopd("train", "-c", str(cfg), "-q", "--set", f"train.out={ref_out}")
    proc = subprocess.Popen([sys.executable, "-m", "lopd.cli", "train", "-c", str(cfg), "-q",
                             "--set", f"train.out={out}"],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and not (out / "ckpt" / "step-000004").exists():
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "final").exists(), "the kill should land before the end"
    res = lopd("train", "-c", str(cfg), "--set", f"train.out={out}")
    assert "resuming from" in res.stderr
    ref = [json.loads(x) for x in (ref_out / "metrics.jsonl").read_text().splitlines()]
    got = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in got] == [r["step"] for r in ref]
    for a, b in zip(ref, got):
        assert a["loss/total"] == b["loss/total"], (a["step"], a["loss/total"], b["loss/total"])
    a_sd, b_sd = load_model(ref_out / "final").state_dict(), load_model(out / "final").state_dict()
    assert all(torch.equal(a_sd[k], b_sd[k]) for k in a_sd)


@pytest.mark.integration
def test_resume_refuses_a_changed_config(shards_run):
    tmp, cfg = shards_run
    out = tmp / "changed"
    lopd("train", "-c", str(cfg), "-q", "--set", f"train.out={out}", "--set", "train.steps=4")
    shutil.rmtree(out / "final")
    res = lopd("train", "-c", str(cfg), "-q", "--set", f"train.out={out}", "--set", "train.optim.lr=0.1", check=False)
    assert res.returncode == 2 and "different training run" in " ".join(res.stderr.split())


@pytest.mark.integration
def test_torchrun_ddp_two_processes_gloo(shards_run):
    tmp, cfg = shards_run
    out = tmp / "ddp"
    torchrun = Path(sys.executable).with_name("torchrun")
    res = subprocess.run([str(torchrun), "--nproc-per-node", "2", "--master-port", str(free_port()), "-m",
                          "lopd.cli", "train", "-c", str(cfg), "-q", "--set", f"train.out={out}",
                          "--set", "train.steps=6"],
                         cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 7))  # only rank 0 writes metrics
    assert all(torch.isfinite(torch.tensor(r["loss/total"])) for r in rows)
    assert (out / "final" / "config.json").exists()
    ckpt = out / "ckpt" / "step-000006"
    ranks = sorted(ckpt.glob("rank-*.pt"))
    assert len(ranks) == 2  # each rank's reader position is saved for resume
    assert all(torch.load(r, weights_only=False)["source"]["reader"] is not None for r in ranks)
    # one process cannot continue two ranks' streams: a clear error, nothing overwritten
    res = lopd("train", "-c", str(cfg), "-q", "--set", f"train.out={out}", "--set", "train.steps=8", check=False)
    assert res.returncode == 2 and "written by 2 process(es), this run has 1" in " ".join(res.stderr.split())
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == list(range(1, 7))


@pytest.mark.integration
def test_online_opd_baseline_runs_with_a_live_teacher(shards_run, trained_models):
    tmp, cfg = shards_run
    rc = load_run_config(cfg, [f"train.out={tmp / 'online'}", "train.steps=3",
                               f"train.online={{teacher: {trained_models['teacher']}, "
                               f"prompts: {tmp / 'prompts.jsonl'}, k: 4, sampling: {{n: 2, max_new_tokens: 8}}}}"])
    res = run_stage("train", rc.stage("train"), show_progress=False, online=True)
    rows = [json.loads(x) for x in (tmp / "online_online" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["perf/sample_seconds"] > 0 and rows[-1]["perf/score_seconds"] > 0
    assert Path(res.summary["final_model"]).exists()


@pytest.mark.integration
def test_torchrun_fsdp2_two_processes_trains_and_resumes(shards_run):
    """FSDP2 (fully_shard) on 2 CPU processes: full-state checkpoints let a longer run resume from them."""
    tmp, cfg = shards_run
    out = tmp / "fsdp"
    torchrun = Path(sys.executable).with_name("torchrun")

    def run(steps: int, port: int) -> subprocess.CompletedProcess:
        return subprocess.run([str(torchrun), "--nproc-per-node", "2", "--master-port", str(port), "-m", "lopd.cli",
                               "train", "-c", str(cfg), "--set", f"train.out={out}", "--set", f"train.steps={steps}",
                               "--set", "train.fsdp=true", "--set", "train.checkpoint_every=2"],
                              cwd=REPO, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "400"})

    first = run(4, free_port())
    assert first.returncode == 0, first.stderr[-3000:]
    second = run(6, free_port())
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming from" in second.stderr and "step-000004" in second.stderr
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert load_model(out / "final").config.num_hidden_layers == 1


@pytest.mark.integration
def test_interrupted_sft_resumes_from_its_checkpoint_with_identical_results(shards_run, monkeypatch):
    """A crash at step 7 (after the step-4 checkpoint); the rerun resumes at step 4, skips the examples already
    seen, and ends with the uninterrupted run's loss curve and weights. A changed config refuses the checkpoint."""
    import pipeline.train.losses as training

    tmp, cfg = shards_run
    overrides = ["sft.steps=10", "sft.checkpoint_every=4", "sft.log_every=1", "sft.batch_size=4"]
    ref_cfg = load_run_config(cfg, overrides + [f"sft.out={tmp / 'sft_ref'}"]).stage("sft")
    cut_cfg = load_run_config(cfg, overrides + [f"sft.out={tmp / 'sft_cut'}"]).stage("sft")
    run_stage("sft", ref_cfg, show_progress=False)

    real_loss, calls = training.sft_cross_entropy, {"n": 0}

    def crash_at_step_7(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt("simulated crash")
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(training, "sft_cross_entropy", crash_at_step_7)
    with pytest.raises(KeyboardInterrupt):
        run_stage("sft", cut_cfg, show_progress=False)
    monkeypatch.setattr(training, "sft_cross_entropy", real_loss)
    ckpt = tmp / "sft_cut_logs" / "ckpt"
    assert (ckpt / "latest").read_text() == "step-000004" and not (tmp / "sft_cut").exists()

    changed = cut_cfg.model_copy(update={"optim": cut_cfg.optim.model_copy(update={"lr": 0.5})})
    with pytest.raises(ValueError, match="different SFT run"):
        run_stage("sft", changed, show_progress=False)

    run_stage("sft", cut_cfg, show_progress=False)
    ref = [json.loads(x) for x in (tmp / "sft_ref_logs" / "metrics.jsonl").read_text().splitlines()]
    got = [json.loads(x) for x in (tmp / "sft_cut_logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in got] == list(range(1, 11))
    assert [r["loss/sft"] for r in got] == [r["loss/sft"] for r in ref]
    a_sd, b_sd = load_model(tmp / "sft_ref").state_dict(), load_model(tmp / "sft_cut").state_dict()
    assert all(torch.equal(a_sd[k], b_sd[k]) for k in a_sd)
    assert not ckpt.exists()  # removed once the final model is written


@pytest.mark.integration
def test_online_baseline_resumes_with_the_samples_of_an_uninterrupted_run(shards_run, trained_models):
    """The online sampler's position (prompt RNG, sample seeds) is checkpointed: stop after step 2, rerun, and
    the loss curve equals a run that never stopped."""
    from pipeline.stages.train import run_online_train

    tmp, cfg = shards_run
    online = (f"train.online={{teacher: {trained_models['teacher']}, prompts: {tmp / 'prompts.jsonl'}, k: 4, "
              "sampling: {n: 2, max_new_tokens: 8, temperature: 1.0}}")
    curves = {}
    for name, stops in (("online_ref", [None]), ("online_cut", [2, None])):
        rc = load_run_config(cfg, [f"train.out={tmp / name}", "train.steps=4", "train.checkpoint_every=2", online])
        tcfg = rc.stage("train")
        for stop in stops:
            run_online_train(tcfg, show_progress=False, stop_after=stop)
        curves[name] = [r["loss/total"]
                        for r in map(json.loads, (tmp / name / "metrics.jsonl").read_text().splitlines())]
    assert len(curves["online_ref"]) == 4
    assert curves["online_cut"] == curves["online_ref"]


@pytest.mark.integration
@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp2"])
def test_torchrun_sft_two_processes_match_one_process(shards_run, fsdp):
    """SFT under torchrun (2 CPU processes, gloo): each rank takes half of every global batch and the loss is
    normalised by the global token count, so the loss curve and the weights equal a one-process run's."""
    tmp, cfg = shards_run
    name = "fsdp2" if fsdp else "ddp"
    common = ["--set", "sft.steps=6", "--set", "sft.batch_size=8", "--set", "sft.log_every=1",
              "--set", "sft.checkpoint_every=3", "--set", f"sft.fsdp={str(fsdp).lower()}"]
    single = tmp / f"sft_single_{name}"
    lopd("sft", "-c", str(cfg), "-q", "--set", f"sft.out={single}", *common)
    multi = tmp / f"sft_multi_{name}"
    torchrun = Path(sys.executable).with_name("torchrun")
    res = subprocess.run([str(torchrun), "--nproc-per-node", "2", "--master-port", str(free_port()),
                          "-m", "lopd.cli", "sft", "-c", str(cfg), "-q", "--set", f"sft.out={multi}", *common],
                         cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    ref = [json.loads(x) for x in (tmp / f"{single.name}_logs" / "metrics.jsonl").read_text().splitlines()]
    got = [json.loads(x) for x in (tmp / f"{multi.name}_logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in got] == list(range(1, 7))
    assert [r["progress/tokens"] for r in got] == [r["progress/tokens"] for r in ref]
    assert got[0]["loss/sft"] == pytest.approx(ref[0]["loss/sft"], rel=1e-5)
    assert [r["loss/sft"] for r in got] == pytest.approx([r["loss/sft"] for r in ref], rel=1e-3)
    a_sd, b_sd = load_model(single).state_dict(), load_model(multi).state_dict()
    assert all(torch.allclose(a_sd[k], b_sd[k], atol=1e-4) for k in a_sd)
    assert (multi / "lopd_provenance.json").exists() and not (tmp / f"{multi.name}_logs" / "ckpt").exists()


def _curve(out: Path) -> list[float]:
    return [json.loads(x)["loss/total"] for x in (out / "metrics.jsonl").read_text().splitlines()]


def _same_weights(a: Path, b: Path) -> bool:
    a_sd, b_sd = load_model(a).state_dict(), load_model(b).state_dict()
    return a_sd.keys() == b_sd.keys() and all(torch.equal(a_sd[k], b_sd[k]) for k in a_sd)


@pytest.mark.integration
def test_prefetching_trainer_matches_the_synchronous_reader_and_resumes_exactly(shards_run):
    """Decoding ahead on a thread changes no step: a run stopped at step 3 (prefetch 3), resumed to 5 with
    the synchronous reader, then to the end with prefetch 2, has the loss curve and final weights of an
    uninterrupted synchronous run. No prefetch thread outlives its run."""
    tmp, cfg = shards_run
    common = ["train.steps=8", "train.checkpoint_every=2"]
    ref = load_run_config(cfg, [f"train.out={tmp / 'sync'}", "train.prefetch_batches=0", *common]).stage("train")
    run_stage("train", ref, show_progress=False)
    out = tmp / "prefetch"
    before = {t for t in threading.enumerate() if t.name == "lopd-prefetch"}  # other tests' threads are theirs
    for depth, stop in ((3, 3), (0, 5), (2, None)):
        tcfg = load_run_config(cfg, [f"train.out={out}", f"train.prefetch_batches={depth}", *common]).stage("train")
        run_train(tcfg, show_progress=False, stop_after=stop)
        assert not {t for t in threading.enumerate() if t.name == "lopd-prefetch"} - before
    assert len(_curve(tmp / "sync")) == 8 and _curve(out) == _curve(tmp / "sync")
    assert _same_weights(tmp / "sync" / "final", out / "final")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(0 <= r["perf/data_wait_frac"] < 1 for r in rows)


@pytest.mark.integration
def test_lightning_only_run_reads_no_topk_and_trains_as_with_it(shards_run):
    """On k > 0 shards a `lightning`-only run skips the top-k columns (its records carry [R, 0] top-k) and
    trains exactly like the same objective read with the top-k (a zero-weight top-k loss makes it read them)."""
    tmp, cfg = shards_run
    outs = {}
    for name, losses in (("lean", "{lightning: 1.0}"), ("full", "{lightning: 1.0, reverse_kl_topk: 0.0}")):
        overrides = [f"train.out={tmp / name}", f"train.losses={losses}", "train.steps=4"]
        tcfg = load_run_config(cfg, overrides).stage("train")
        with contextlib.closing(ShardBatches(tcfg, DistInfo(), micro=4, start=None)) as source:
            k = source.next_records(4, 1)[0].topk_ids.shape[1]
        assert (k == 0) == (name == "lean"), (name, k)
        run_stage("train", tcfg, show_progress=False)
        outs[name] = tmp / name
    assert _curve(outs["lean"]) == _curve(outs["full"]) and len(_curve(outs["lean"])) == 4
    assert _same_weights(outs["lean"] / "final", outs["full"] / "final")


def _torchrun_stage(stage: str, cfg: Path, stop: int, *overrides: str, nproc: int = 2) -> subprocess.CompletedProcess:
    torchrun = Path(sys.executable).with_name("torchrun")
    return subprocess.run([str(torchrun), "--standalone", "--nproc-per-node", str(nproc), "-m",
                           "tests.scale_helpers.stage_worker", stage, str(cfg), str(stop), *overrides],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.integration
def test_torchrun_fsdp2_stopped_and_resumed_run_equals_an_uninterrupted_one(shards_run):
    """FSDP2 on 2 processes: a run that ends after step 3 (sharded checkpoint at step 2) and is started again
    has the loss curve and final weights of a run that never stopped, bit for bit."""
    tmp, cfg = shards_run
    common = ["train.steps=6", "train.checkpoint_every=2", "train.fsdp=true"]
    ref = _torchrun_stage("train", cfg, 0, f"train.out={tmp / 'fsdp_ref'}", *common)
    assert ref.returncode == 0, ref.stderr[-3000:]
    cut = tmp / "fsdp_cut"
    first = _torchrun_stage("train", cfg, 3, f"train.out={cut}", *common)
    assert first.returncode == 0, first.stderr[-3000:]
    assert (cut / "ckpt" / "latest").read_text() == "step-000002"
    assert sorted(p.name for p in (cut / "ckpt" / "step-000002").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    second = _torchrun_stage("train", cfg, 0, f"train.out={cut}", *common)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming from" in second.stderr
    assert len(_curve(tmp / "fsdp_ref")) == 6 and _curve(cut) == _curve(tmp / "fsdp_ref")
    assert _same_weights(tmp / "fsdp_ref" / "final", cut / "final")


@pytest.mark.integration
def test_sft_crashed_on_two_processes_resumes_on_one(shards_run):
    """SFT reads one global example stream, so a run that crashed on 2 FSDP2 processes (sharded checkpoint at
    step 4) resumes on 1 process: DCP re-shards model and optimiser, and the curve and weights match a
    one-process run that never stopped (to the rounding of the 2-process gradient reduction)."""
    tmp, cfg = shards_run
    common = ["sft.steps=8", "sft.batch_size=8", "sft.log_every=1", "sft.checkpoint_every=2", "sft.keep_checkpoints=1"]
    ref_cfg = load_run_config(cfg, [f"sft.out={tmp / 'sft_1proc'}", *common]).stage("sft")
    run_stage("sft", ref_cfg, show_progress=False)
    cut = tmp / "sft_2to1"
    crashed = _torchrun_stage("sft", cfg, 5, f"sft.out={cut}", "sft.fsdp=true", *common)
    assert crashed.returncode != 0 and "simulated crash in step 5" in crashed.stderr
    ckpt = tmp / "sft_2to1_logs" / "ckpt"
    assert (ckpt / "latest").read_text() == "step-000004" and len(list((ckpt / "step-000004").glob("*.distcp"))) == 2
    run_stage("sft", load_run_config(cfg, [f"sft.out={cut}", *common]).stage("sft"), show_progress=False)
    ref = [json.loads(x) for x in (tmp / "sft_1proc_logs" / "metrics.jsonl").read_text().splitlines()]
    got = [json.loads(x) for x in (tmp / "sft_2to1_logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in got] == list(range(1, 9))
    assert [r["loss/sft"] for r in got] == pytest.approx([r["loss/sft"] for r in ref], rel=1e-4)
    a_sd, b_sd = load_model(tmp / "sft_1proc").state_dict(), load_model(cut).state_dict()
    assert all(torch.allclose(a_sd[k], b_sd[k], atol=1e-5) for k in a_sd)


@pytest.fixture(scope="module")
def one_process_on_single_record_units(shards_run) -> tuple[list[str], Path, Path]:
    """The run's top-k shards rewritten with one record per row group, and a one-process run on them (3 steps,
    no stream shuffle): with single-record units, W ranks together read in each step exactly the records one
    process reads (rank r takes units r, r + W, ... of the epoch's order). Returns (overrides, shards, run)."""
    tmp, cfg = shards_run
    src = ShardSet.open(tmp / "run" / "teacher_topk")
    dst = ShardSet.create(tmp / "topk_one_record_units", "teacher_topk", src.metadata)
    for i in src.complete_indices():
        dst.write_shard(i, src.read_shard(i), row_group_size=1)
    dst.finalize(expected_shards=len(src.complete_indices()))
    overrides = ["--set", f"train.shards={dst.root}", "--set", "train.steps=3", "--set", "train.shuffle_buffer=1",
                 "--set", "train.checkpoint_every=3"]
    single = tmp / "single_process_units"
    lopd("train", "-c", str(cfg), "-q", "--set", f"train.out={single}", *overrides)
    return overrides, dst.root, single


@pytest.mark.integration
@pytest.mark.parametrize("shard_size", [None, 2], ids=["fsdp2", "hsdp"])
def test_two_node_torchrun_on_localhost_matches_one_process(shards_run, one_process_on_single_record_units,
                                                            shard_size):
    """Two torchrun agents (--nnodes 2, 2 processes each, gloo) meet by c10d rendezvous on 127.0.0.1 and train
    with FSDP2 over the 4 ranks, or HSDP (replicate 2 x shard 2): each step reads the records one process reads
    and the loss is normalised by the step's global counts, so the loss curve is the one-process run's."""
    tmp, cfg = shards_run
    overrides, _, single = one_process_on_single_record_units
    name = "hsdp" if shard_size else "fsdp2"
    out = tmp / f"two_nodes_{name}"
    mesh = ["--set", f"train.fsdp_shard_size={shard_size}"] if shard_size else []
    torchrun = Path(sys.executable).with_name("torchrun")
    port = free_port()
    agents, logs = [], []
    for node in (0, 1):
        logs.append(open(tmp / f"two_nodes_{name}_agent{node}.log", "w+"))
        agents.append(subprocess.Popen(
            [str(torchrun), "--nnodes", "2", "--nproc-per-node", "2", "--node-rank", str(node), "--rdzv-backend",
             "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"lopd-{name}", "-m", "lopd.cli", "train",
             "-c", str(cfg), "-q", "--set", f"train.out={out}", "--set", "train.fsdp=true", *mesh, *overrides],
            cwd=REPO, stdout=logs[-1], stderr=subprocess.STDOUT, text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}))
    try:
        codes = [agent.wait(timeout=480) for agent in agents]
    finally:
        for agent in agents:
            agent.kill()
    for node, log in enumerate(logs):
        log.seek(0)
        assert codes[node] == 0, f"agent {node}:\n" + log.read()[-3000:]
    ref = [json.loads(x) for x in (single / "metrics.jsonl").read_text().splitlines()]
    got = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in got] == [r["step"] for r in ref] == [1, 2, 3]
    assert [r["progress/tokens"] for r in got] == [r["progress/tokens"] for r in ref]
    assert [r["loss/total"] for r in got] == pytest.approx([r["loss/total"] for r in ref], rel=1e-5)
    assert len(list((out / "ckpt" / "step-000003").glob("rank-*.pt"))) == 4
    a_sd, b_sd = load_model(single / "final").state_dict(), load_model(out / "final").state_dict()
    assert all(torch.allclose(a_sd[k], b_sd[k], atol=1e-5) for k in a_sd)


# --- the multi-rank step: micro-batches agreed, gradients reduced once per step, launches refused ---------------------


def test_ddp_reduces_the_gradient_once_per_step_whatever_the_accumulation(tiny_models):
    """Under DDP every micro-batch but the last runs under no_sync: the gradient buckets are all-reduced once per
    step, so 4 micro-batches cost the communication of 1 (a comm hook counts the reductions)."""
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.nn.parallel import DistributedDataParallel

    from pipeline.config import ScaleConfig
    from pipeline.train.batching import prepare_examples
    from pipeline.train.loop import make_optimizer, train_step
    from pipeline.train.metrics import StepMeter
    from pipeline.train.objective import SftObjective

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        info = DistInfo(0, 1, 0, launched=True)
        model = DistributedDataParallel(StudentLM(load_model(tiny_models["student"])))
        reductions = []

        def counting_hook(state, bucket):
            reductions.append(bucket.index())
            return default_hooks.allreduce_hook(state, bucket)

        model.register_comm_hook(None, counting_hook)
        opt = make_optimizer(model, TrainConfig(student="s", shards="d", out="o").optim)
        examples = [(np.arange(3, 3 + n) % 20, 2) for n in (6, 9, 7, 8, 5, 6, 9, 8)]
        per_step = {}
        for parts in (1, 4):
            cfg = ScaleConfig(grad_accum=parts)
            reductions.clear()
            train_step(model, opt, SftObjective(), prepare_examples(examples, cfg, 0), cfg, 1.0, info,
                       torch.device("cpu"), StepMeter(1, 1))
            per_step[parts] = len(reductions)
        assert per_step[1] >= 1 and per_step[4] == per_step[1]
    finally:
        dist.destroy_process_group()


def test_fsdp2_with_online_opd_or_an_eval_hook_is_refused_before_any_work():
    from pipeline.config import ScaleConfig
    from pipeline.train.loop import check_launch

    two_ranks = DistInfo(0, 2, 0, launched=True)
    for kwargs, what in [({"online": True}, "online OPD"), ({"eval_hook": True}, "evaluation hook")]:
        with pytest.raises(LopdUserError, match=f"train.fsdp=true on 2 ranks: .*{what}.*set train.fsdp=false"):
            check_launch(ScaleConfig(fsdp=True), two_ranks, field="train", **kwargs)
        check_launch(ScaleConfig(fsdp=False), two_ranks, field="train", **kwargs)  # DDP runs them
        check_launch(ScaleConfig(fsdp=True), DistInfo(), field="train", **kwargs)  # one plain process too


@pytest.mark.integration
@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp2"])
def test_token_budget_with_unequal_micro_batch_counts_on_two_ranks_matches_one_process(
        shards_run, one_process_on_single_record_units, fsdp):
    """2 gloo ranks, ragged rows (8-19 tokens) and a 30-token budget: a rank with more long rows forms more
    micro-batches than the other; the ranks agree on a number (splitting or idling, ``micro/added``) instead of
    hanging, and the loss curve and weights equal one process's on the same global batches (rel 1e-5 on the loss,
    atol 1e-5 on the weights: the grouping only reorders sums)."""
    tmp, cfg = shards_run
    overrides, _, _ = one_process_on_single_record_units
    budget = [*overrides, "--set", "train.max_tokens_per_micro_batch=30", "--set", "train.log_every=1"]
    single = tmp / "budget_single_process"
    if not (single / "final").exists():
        lopd("train", "-c", str(cfg), "-q", "--set", f"train.out={single}", *budget)
    out = tmp / f"budget_two_ranks_{'fsdp2' if fsdp else 'ddp'}"
    torchrun = Path(sys.executable).with_name("torchrun")
    res = subprocess.run([str(torchrun), "--nproc-per-node", "2", "--master-port", str(free_port()), "-m", "lopd.cli",
                          "train", "-c", str(cfg), "-q", "--set", f"train.out={out}", "--set",
                          f"train.fsdp={str(fsdp).lower()}", "--set", "train.dist_timeout_minutes=2", *budget],
                         cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    ref = [json.loads(x) for x in (single / "metrics.jsonl").read_text().splitlines()]
    got = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert sum(r["micro/added"] for r in got) > 0  # the ranks' natural counts differed
    assert [r["progress/tokens"] for r in got] == [r["progress/tokens"] for r in ref]
    assert [r["loss/total"] for r in got] == pytest.approx([r["loss/total"] for r in ref], rel=1e-5)
    a_sd, b_sd = load_model(single / "final").state_dict(), load_model(out / "final").state_dict()
    assert all(torch.allclose(a_sd[k], b_sd[k], atol=1e-5) for k in a_sd)


def ragged_sft_data(src_root: Path, dst_root: Path) -> Path:
    """The run's SFT answers with their ends cut at varied lengths (9-19 tokens), so that under a token budget
    the two ranks' halves of a global batch form different numbers of micro-batches."""
    import pyarrow as pa

    src = ShardSet.open(src_root)
    dst = ShardSet.create(dst_root, "samples", src.metadata)
    for i in src.complete_indices():
        table = src.read_shard(i)
        ids, plens, lps = (table.column(c).to_pylist() for c in ("token_ids", "prompt_len", "behavior_logprobs"))
        keep = [max(p + 2, len(x) - (7 * j) % 11) for j, (x, p) in enumerate(zip(ids, plens))]
        for name, values in (("token_ids", [x[:k] for x, k in zip(ids, keep)]),
                             ("behavior_logprobs", [lp[:k - p] for lp, k, p in zip(lps, keep, plens)])):
            field = table.schema.field(name)
            table = table.set_column(table.schema.get_field_index(name), field, pa.array(values, field.type))
        dst.write_shard(i, table)
    dst.finalize(expected_shards=len(src.complete_indices()))
    return dst.root


@pytest.mark.integration
def test_fsdp2_sft_with_a_token_budget_on_two_ranks_matches_one_process(shards_run):
    """SFT, FSDP2 on 2 gloo ranks, ragged answers and a token budget under which the ranks' halves of a global batch
    form different numbers of micro-batches: no hang, and the loss curve and weights equal one process's."""
    tmp, cfg = shards_run
    data = ragged_sft_data(tmp / "run" / "teacher_sft_data", tmp / "sft_data_ragged")
    common = ["--set", f"sft.data={data}", "--set", "sft.steps=4", "--set", "sft.batch_size=8",
              "--set", "sft.log_every=1", "--set", "sft.max_tokens_per_micro_batch=30"]
    single, multi = tmp / "sft_budget_single", tmp / "sft_budget_fsdp2"
    lopd("sft", "-c", str(cfg), "-q", "--set", f"sft.out={single}", *common)
    torchrun = Path(sys.executable).with_name("torchrun")
    res = subprocess.run([str(torchrun), "--nproc-per-node", "2", "--master-port", str(free_port()), "-m", "lopd.cli",
                          "sft", "-c", str(cfg), "-q", "--set", f"sft.out={multi}", "--set", "sft.fsdp=true",
                          "--set", "sft.dist_timeout_minutes=2", *common],
                         cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    ref = [json.loads(x) for x in (tmp / f"{single.name}_logs" / "metrics.jsonl").read_text().splitlines()]
    got = [json.loads(x) for x in (tmp / f"{multi.name}_logs" / "metrics.jsonl").read_text().splitlines()]
    assert sum(r["micro/added"] for r in got) > 0
    assert [r["loss/sft"] for r in got] == pytest.approx([r["loss/sft"] for r in ref], rel=1e-5)
    a_sd, b_sd = load_model(single).state_dict(), load_model(multi).state_dict()
    assert all(torch.allclose(a_sd[k], b_sd[k], atol=1e-5) for k in a_sd)


def test_plot_metrics_draws_the_curves_and_skips_them_without_matplotlib(tmp_path, monkeypatch, caplog):
    import importlib.util

    from pipeline.train.metrics import MetricsWriter, plot_metrics

    writer = MetricsWriter(tmp_path / "metrics.jsonl")
    for step in (1, 2, 3):
        writer.write({"step": step, "loss/sft": 1.0 / step, "optim/lr": 1e-3})
    png = plot_metrics(writer.path, tmp_path / "curves.png", ["loss/sft", "optim/lr"], "SFT")
    assert png == tmp_path / "curves.png" and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    assert plot_metrics(writer.path, tmp_path / "bare.png", ["loss/sft"]) is None
    assert not (tmp_path / "bare.png").exists()
    assert "matplotlib is not installed: no bare.png" in caplog.text
