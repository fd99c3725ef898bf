"""pipeline/train/loop.py: one optimiser step at its edges. A micro-batch without target tokens (an empty response
alone, an idle copy), BAPO with idle copies on 2 ranks, ``weight_norm: sum`` with a weight sum below 1, the logged
rate and the schedule's floor, a non-finite gradient, the grouping in the run key of the per-micro-batch methods,
the MFU's head FLOPs. The 2-rank cases run 2 gloo processes of DDP in float64 with SGD at lr 1 (the update is the
gradient) and compare ``optim/grad_norm`` and the update with one process."""

from __future__ import annotations

import dataclasses
import math
import pickle
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from pipeline.config import OptimConfig, ScaleConfig
from pipeline.models import load_model
from pipeline.train.batching import Batch, collate, prepare_examples, prepare_step
from pipeline.train.distributed import DistInfo
from pipeline.train.loop import make_scheduler, run_loop, start_run, train_step
from pipeline.train.metrics import StepMeter
from pipeline.train.objective import OpdObjective, SftObjective
from pipeline.train.student import StudentLM
from pipeline.train.weighting import RolloutTable
from storage.errors import LopdUserError
from storage.prompt_stats import load_prompt_stats
from tests.conftest import free_port
from tests.train.helpers import grouped_records, train_cfg

CPU = torch.device("cpu")


def _empty_response(record):
    """``record`` cut to its prompt: a valid rollout with no response token."""
    return dataclasses.replace(record, token_ids=record.token_ids[: record.prompt_len],
                               teacher_logprobs=record.teacher_logprobs[:0],
                               behavior_logprobs=record.behavior_logprobs[:0],
                               topk_ids=record.topk_ids[:0], topk_logprobs=record.topk_logprobs[:0],
                               tail_logprob=record.tail_logprob[:0])


def _step(model_dir: Path, objective, micro_batches: list[Batch], cfg: ScaleConfig, info: DistInfo = DistInfo(),
          wrap=None):
    """One ``train_step`` of a float64 student with SGD at lr 1: (metrics, grad norm, update = before - after)."""
    student = StudentLM(load_model(model_dir).double())
    model = student if wrap is None else wrap(student)
    before = [p.detach().clone() for p in student.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    metrics, grad_norm = train_step(model, opt, objective, micro_batches, cfg, None, info, CPU, StepMeter(1, 1))
    return metrics, grad_norm, [b - p.detach() for b, p in zip(before, student.parameters())]


def _assert_same_step(a, b, keys):
    (ma, na, ua), (mb, nb, ub) = a, b
    for key in keys:
        # metrics are read out in float32 (the update is compared in float64 below)
        assert float(mb[key]) == pytest.approx(float(ma[key]), rel=1e-6), key
    assert nb == pytest.approx(na, rel=1e-9) and na > 0
    for x, y in zip(ua, ub):
        torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-12)


# --- a micro-batch without target tokens -----------------------------------------------------------------------------


@pytest.mark.parametrize("order", ["empty_last", "empty_first"])
def test_sft_with_an_empty_response_alone_in_a_micro_batch_takes_the_one_micro_batch_step(tiny_models, order):
    """SFT, grad_accum 2, target tokens per micro-batch [8, 0] or [0, 8]: the step equals one micro-batch of both
    rows (loss, gradient norm, update) and ``loss/sft`` is reported (it used to raise KeyError or vanish)."""
    full, empty = (np.arange(3, 13) % 19, 2), (np.arange(3, 6) % 19, 3)  # 8 response tokens; 0
    examples = [full, empty] if order == "empty_last" else [empty, full]
    one = _step(tiny_models["student"], SftObjective(), prepare_examples(examples, ScaleConfig(), 0), ScaleConfig())
    split = prepare_examples(examples, ScaleConfig(grad_accum=2), 0)
    assert sorted(int(b.mask_B_T.sum()) for b in split) == [0, 8]
    two = _step(tiny_models["student"], SftObjective(), split, ScaleConfig(grad_accum=2))
    assert "loss/sft" in two[0] and float(two[0]["loss/sft"]) > 0
    _assert_same_step(one, two, ["loss/sft"])


def test_opd_with_an_empty_response_alone_in_a_micro_batch_takes_the_one_micro_batch_step(tiny_models, stats_shards):
    """OPD (lightning + top-k + SFT on correct rows, PACED and position weights): 8 micro-batches of one row, one
    of them an empty response, take the step of one micro-batch of all 8, with every metric key present."""
    rollouts = RolloutTable.from_table(load_prompt_stats(stats_shards, "k")[0])
    records = grouped_records()[4:12]
    records[3] = _empty_response(records[3])
    results = []
    for accum in (1, 8):
        cfg = train_cfg(losses={"lightning": 1.0, "reverse_kl_topk": 0.5, "sft": 0.3}, rows={"sft": "correct"},
                        batch_size=8, grad_accum=accum, methods={"paced": {}, "position": {"gamma": 0.5}})
        micro_batches = prepare_step(records, cfg, 0, rollouts)
        results.append(_step(tiny_models["student"], OpdObjective(cfg, rollouts), micro_batches, cfg))
    assert int(prepare_step(records, train_cfg(batch_size=8, grad_accum=8), 0, rollouts)[3].mask_B_T.sum()) == 0
    one, many = results
    assert set(one[0]) == set(many[0])
    _assert_same_step(one, many, ["loss/total", "loss/lightning", "loss/reverse_kl", "loss/sft"])


# --- 2 gloo ranks ----------------------------------------------------------------------------------------------------


def _rank_worker(rank: int, port: int, scenario: str, args: dict, out: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        info = DistInfo(rank, 2, rank, launched=True)
        micro_batches = args["micro_batches"][rank]
        objective = args["objective"]
        if scenario == "nan":  # one good step so that AdamW has state, then the step with a NaN
            student = StudentLM(load_model(args["model"]).double())
            model = DistributedDataParallel(student)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
            train_step(model, opt, objective, args["good"][rank], args["cfg"], None, info, CPU, StepMeter(1, 1))
            params_before = [p.detach().clone() for p in student.parameters()]
            state_before = pickle.dumps(opt.state_dict())
            metrics, grad_norm = train_step(model, opt, objective, micro_batches, args["cfg"], None, info, CPU,
                                            StepMeter(1, 1))
            same_params = all(torch.equal(a, b.detach()) for a, b in zip(params_before, student.parameters()))
            result = {"grad_norm": grad_norm, "skipped": float(metrics["optim/skipped"]), "same_params": same_params,
                      "same_state": pickle.dumps(opt.state_dict()) == state_before}
        else:
            metrics, grad_norm, update = _step(args["model"], objective, micro_batches, args["cfg"], info,
                                               DistributedDataParallel)
            result = {"metrics": {k: float(v) for k, v in metrics.items()}, "grad_norm": grad_norm, "update": update}
        torch.save(result, f"{out}.{rank}")
        dist.barrier()  # neither rank leaves (rank 0 hosts the store) while the other still talks to it
    finally:
        dist.destroy_process_group()


def _two_ranks(tmp_path: Path, scenario: str, **args) -> list[dict]:
    """Run ``scenario`` on 2 spawned gloo ranks; each saves its result. A rank that hangs fails the test."""
    out = str(tmp_path / scenario)
    context = mp.start_processes(_rank_worker, args=(free_port(), scenario, args, out), nprocs=2, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + 300
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"{scenario}: the 2 ranks did not finish in 300 s")
    return [torch.load(f"{out}.{rank}", weights_only=False) for rank in range(2)]


@pytest.mark.integration
def test_two_ranks_with_an_empty_micro_batch_and_idle_copies_match_one_process(tmp_path, tiny_models, stats_shards):
    """OPD on 2 ranks: rank 0 holds 2 one-row micro-batches, one of them an empty response, rank 1 holds 4, so
    rank 0 adds 2 idle copies. No hang, every loss key summed over the ranks, and the step (grad norm, SGD update)
    equals one process running micro-batches of the same rows (the loss is summed per step)."""
    rollouts = RolloutTable.from_table(load_prompt_stats(stats_shards, "k")[0])
    records = grouped_records()[4:10]
    records[1] = _empty_response(records[1])
    cfg = train_cfg(losses={"lightning": 1.0, "reverse_kl_topk": 0.5}, batch_size=6, grad_accum=1)
    ranks = [[collate([records[0]], 0, rollouts), collate([records[1]], 0, rollouts)],
             [collate([r], 0, rollouts) for r in records[2:6]]]
    got = _two_ranks(tmp_path, "empty", model=tiny_models["student"], objective=OpdObjective(cfg, rollouts),
                     micro_batches=ranks, cfg=cfg)
    one = _step(tiny_models["student"], OpdObjective(cfg, rollouts),
                [collate([r], 0, rollouts) for r in records], cfg)
    for rank in got:
        assert rank["metrics"]["micro/idle"] == 2 and rank["metrics"]["micro/per_rank"] == 4
        assert rank["grad_norm"] == pytest.approx(one[1], rel=1e-9)
        for key in ("loss/total", "loss/lightning", "loss/reverse_kl"):
            assert rank["metrics"][key] == pytest.approx(float(one[0][key]), rel=1e-6), key
        for x, y in zip(rank["update"], one[2]):
            torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-12)


@pytest.mark.integration
def test_sft_on_two_ranks_with_an_empty_micro_batch_matches_one_process(tmp_path, tiny_models):
    """SFT on 2 ranks: rank 0 holds [8 tokens] and [an empty response], rank 1 [6 tokens] and adds an idle copy.
    No hang, ``loss/sft`` summed over the ranks, and the step equals one process's on the three examples."""
    examples = [(np.arange(3, 13) % 19, 2), (np.arange(3, 6) % 19, 3), (np.arange(4, 12) % 19, 2)]
    cfg = ScaleConfig()
    ranks = [[prepare_examples([examples[0]], cfg, 0)[0], prepare_examples([examples[1]], cfg, 0)[0]],
             [prepare_examples([examples[2]], cfg, 0)[0]]]
    got = _two_ranks(tmp_path, "sft", model=tiny_models["student"], objective=SftObjective(), micro_batches=ranks,
                     cfg=cfg)
    one = _step(tiny_models["student"], SftObjective(), prepare_examples(examples, ScaleConfig(grad_accum=3), 0),
                ScaleConfig(grad_accum=3))
    assert [r["metrics"]["micro/idle"] for r in got] == [1, 1]  # summed over the ranks: rank 1's copy
    for rank in got:
        assert rank["metrics"]["loss/sft"] == pytest.approx(float(one[0]["loss/sft"]), rel=1e-6)
        assert rank["grad_norm"] == pytest.approx(one[1], rel=1e-9)
        for x, y in zip(rank["update"], one[2]):
            torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-12)


@pytest.mark.integration
def test_bapo_with_idle_copies_on_two_ranks_equals_one_process(tmp_path, tiny_models, stats_shards):
    """BAPO adapts its clip bounds per micro-batch index, summed over the ranks. Rank 0 holds [a, b] and two idle
    copies, rank 1 holds [c, d, e, f]: micro-batches 3 and 4 must take the bounds of e and f alone, so the step equals
    one process running [a+c, b+d, e, f]. Before idle copies had no target tokens, rank 0's copies of b added b's
    sums to e's and f's bounds."""
    rollouts = RolloutTable.from_table(load_prompt_stats(stats_shards, "k")[0])
    records = grouped_records()[:6]
    a, b, c, d, e, f = records
    cfg = train_cfg(losses={"lightning": 1.0}, batch_size=6, lightning={"importance": "ppo_clip"},
                    methods={"bapo": {"step": 0.2}})
    assert (cfg.methods.bapo.low, cfg.methods.bapo.high, cfg.methods.bapo.high_max) == (0.6, 1.2, 2.0)
    # e and f alone are balanced (positive advantages, ratios about 1.6: clipped at the start bound 1.2); b is far
    # from balanced (advantages about -17). With b's sums added to theirs, e's and f's bounds would rise to
    # (0.8, 2.0) and their clipped tokens would pass: another gradient.
    def shaped(r, teacher: float, behavior: float):
        n = r.num_response_tokens
        return dataclasses.replace(r, teacher_logprobs=np.full(n, teacher, np.float32),
                                   behavior_logprobs=np.full(n, behavior, np.float32))

    b, e, f = shaped(b, -20.0, -2.94), shaped(e, 0.0, -3.4), shaped(f, 0.0, -3.4)
    one_rows = [collate(rows, 0, rollouts) for rows in ([a, c], [b, d], [e], [f])]
    one = _step(tiny_models["student"], OpdObjective(cfg, rollouts), one_rows, cfg)
    ranks = [[collate([a], 0, rollouts), collate([b], 0, rollouts)], [collate([r], 0, rollouts) for r in (c, d, e, f)]]
    got = _two_ranks(tmp_path, "bapo", model=tiny_models["student"], objective=OpdObjective(cfg, rollouts),
                     micro_batches=ranks, cfg=cfg)
    assert float(one[0]["loss/lightning"]) != 0
    for rank in got:
        assert rank["metrics"]["micro/idle"] == 2
        assert rank["grad_norm"] == pytest.approx(one[1], rel=1e-9)
        for x, y in zip(rank["update"], one[2]):
            torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-12)


@pytest.mark.integration
def test_a_nan_in_one_micro_batch_skips_the_step_on_both_ranks(tmp_path, tiny_models, stats_shards):
    """A NaN teacher log-prob in one micro-batch of rank 1: the gradient norm is NaN on both ranks (DDP reduces the
    gradient), both skip the update, and the weights and AdamW's state stay byte-identical."""
    rollouts = RolloutTable.from_table(load_prompt_stats(stats_shards, "k")[0])
    records = grouped_records()[:8]
    cfg = train_cfg(losses={"reverse_kl_topk": 1.0}, batch_size=8, grad_accum=2)
    bad = list(records[4:8])
    bad[1] = dataclasses.replace(bad[1], topk_logprobs=np.full_like(bad[1].topk_logprobs, np.nan))
    good = [prepare_step(records[:4], cfg, 0, rollouts), prepare_step(records[4:8], cfg, 0, rollouts)]
    poisoned = [prepare_step(records[:4], cfg, 0, rollouts), prepare_step(bad, cfg, 0, rollouts)]
    got = _two_ranks(tmp_path, "nan", model=tiny_models["student"], objective=OpdObjective(cfg, rollouts),
                     micro_batches=poisoned, good=good, cfg=cfg)
    for rank in got:
        assert math.isnan(rank["grad_norm"]) and rank["skipped"] == 1.0
        assert rank["same_params"] and rank["same_state"]


# --- normalisers, the rate, the schedule -----------------------------------------------------------------------------


def test_weight_norm_sum_below_one_is_the_weighted_mean(tiny_models, stats_shards):
    """``weight_norm: sum`` with PACED weights whose sum over the step's tokens is 0.1: the SFT term is the
    weighted mean sum_t w_t l_t / sum_t w_t (here all weights equal, so the plain mean of -log p), not that sum
    divided by 1."""
    rollouts = RolloutTable.from_table(load_prompt_stats(stats_shards, "k")[0])
    record = grouped_records()[5]  # a prompt with pass rate 0.5: kernel 0.25^alpha
    m = record.num_response_tokens
    alpha = math.log(0.1 / m) / math.log(0.25)  # each token's weight 0.1 / m: the sum is 0.1
    cfg = train_cfg(losses={"sft": 1.0}, batch_size=1, weight_norm="sum",
                    methods={"paced": {"alpha": alpha, "beta": alpha}})
    batch = collate([record], 0, rollouts)
    metrics, _, _ = _step(tiny_models["student"], OpdObjective(cfg, rollouts), [batch], cfg)
    lm = load_model(tiny_models["student"]).double()
    with torch.no_grad():
        logp = lm(batch.input_ids_B_L).logits[:, :-1].log_softmax(-1)
    target = batch.input_ids_B_L[:, 1:]
    nll = -logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)[batch.mask_B_T.bool()]
    weights = torch.full_like(nll, 0.1 / m)
    assert float(weights.sum()) == pytest.approx(0.1)
    assert float(metrics["loss/sft"]) == pytest.approx(float((weights * nll).sum() / weights.sum()), rel=1e-6)


def test_the_logged_rate_is_the_rate_the_update_used_and_cosine_ends_at_its_floor(tiny_models):
    """Warm-up 3, cosine over 6 steps, peak 0.3: the updates use 0.1, 0.2, 0.3, 0.3, 0.165, 0.03 (the last at the
    10% floor) and ``optim/lr`` logs exactly those."""
    optim = OptimConfig(lr=0.3, warmup_steps=3, schedule="cosine", grad_clip=None)
    run = start_run(StudentLM(load_model(tiny_models["student"])), DistInfo(), ScaleConfig(), optim, 6)
    used: list[float] = []
    step = run.optimizer.step

    def recording_step(*a, **kw):
        used.append(run.optimizer.param_groups[0]["lr"])
        return step(*a, **kw)

    run.optimizer.step = recording_step
    examples = iter([(np.arange(3, 3 + n) % 19, 2) for n in (6, 9, 7, 8, 5, 6, 9, 8, 7, 6, 5, 9)])
    from pipeline.train.sources import ExampleBatches

    logged: list[float] = []
    run_loop(run, SftObjective(), ExampleBatches(examples, ScaleConfig(), 2, 0, DistInfo()), ScaleConfig(), steps=6,
             grad_clip=None, log_every=1, show_progress=False, on_log=lambda s, rec: logged.append(rec["optim/lr"]))
    expected = [0.1, 0.2, 0.3, 0.3, 0.3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5))), 0.03]
    assert used == pytest.approx(expected, rel=1e-12)
    assert logged == used


def test_the_schedule_reaches_its_floor_on_the_last_step_only():
    sched = make_scheduler(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0),
                           OptimConfig(lr=1.0, warmup_steps=0, schedule="cosine"), 5)
    rates = []
    for _ in range(5):
        rates.append(sched.get_last_lr()[0])
        sched.optimizer.step()
        sched.step()
    assert rates[0] == 1.0 and rates[-1] == pytest.approx(0.1) and min(rates[:-1]) > 0.1


def test_consecutive_non_finite_steps_stop_the_run_with_an_error(tiny_models):
    """NaN weights make every gradient norm NaN: the loop skips ``max_nonfinite_steps`` updates, then stops with
    an error that says what happened and what to do."""
    lm = load_model(tiny_models["student"])
    with torch.no_grad():
        lm.get_input_embeddings().weight.fill_(float("nan"))
    cfg = ScaleConfig(max_nonfinite_steps=2)
    run = start_run(StudentLM(lm), DistInfo(), cfg, OptimConfig(), 5)
    examples = iter([(np.arange(3, 9) % 19, 2)] * 20)
    from pipeline.train.sources import ExampleBatches

    records: list[dict] = []
    with pytest.raises(LopdUserError, match=r"2 steps in a row .* non-finite gradient norm .*max_nonfinite_steps"):
        run_loop(run, SftObjective(), ExampleBatches(examples, cfg, 2, 0, DistInfo()), cfg, steps=5, grad_clip=1.0,
                 log_every=1, show_progress=False, on_log=lambda s, rec: records.append(rec))
    assert [r["optim/skipped_steps"] for r in records] == [1]  # step 2 raised before its log
    assert run.optimizer.state_dict()["state"] == {}  # AdamW never stepped


# --- the run key and the meter ---------------------------------------------------------------------------------------


def test_the_grouping_is_in_the_run_key_of_the_per_micro_batch_methods_only():
    from pipeline.stages.train import train_run_key

    def key(**kw) -> str:
        return train_run_key(train_cfg(**kw), "m", "d")

    ppo = {"importance": "ppo_clip"}
    for methods in ({"tip": {}}, {"bapo": {}}, {"cov": {"mode": "kl_cov"}}):
        base = {"losses": {"lightning": 1.0}, "lightning": ppo, "methods": methods}
        assert key(**base) != key(**base, packing=True)
        assert key(**base) != key(**base, grad_accum=2)
    assert key() == key(packing=True)  # the others take the same step however it is grouped


def test_mfu_counts_the_head_on_the_response_tokens_only(tiny_models):
    run = start_run(StudentLM(load_model(tiny_models["student"])), DistInfo(), ScaleConfig(peak_tflops=1.0),
                    OptimConfig(), 1)
    meter = run.meter
    head = run.model.lm.get_output_embeddings().weight.numel()
    assert meter.head_params == head and 0 < head < meter.flop_params
    meter.tokens, meter.model_tokens, meter.seconds = 10, 30, 1.0
    body = meter.flop_params - head
    assert meter.metrics(CPU)["perf/mfu"] == pytest.approx(round(6 * (body * 30 + head * 10) / 1e12, 4))
