"""The trainer at scale, checked on CPU: the chunked LM head equals the full-logit path (loss and gradients, every
loss), bf16 mixed precision tracks fp32, activation checkpointing changes no gradient, token-budget micro-batches
respect the budget and give the same update as one batch."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from pipeline.config import TOPK_LOSSES, TrainConfig
from pipeline.train.batching import TokenTargets, collate, split_by_token_budget
from pipeline.train.head import fused_head_loss, token_stats
from pipeline.train.objective import compute_losses, micro_batch_loss
from pipeline.train.student import StudentLM
from storage.synthetic import make_records

LOSS_SETS = {
    "lightning_sequence": {"lightning": 1.0},
    "lightning_token_ppo": {"lightning": 1.0},
    "reverse_kl_topk": {"reverse_kl_topk": 1.0},
    "forward_kl_topk": {"forward_kl_topk": 1.0},
    "jsd_topk": {"jsd_topk": 1.0},
    "tvd_topk": {"tvd_topk": 1.0},
    "sft": {"sft": 1.0},
    "mixed": {"reverse_kl_topk": 1.0, "lightning": 0.1, "sft": 0.5},
}


def _cfg(name: str, tail_bucket: bool = True) -> TrainConfig:
    extra = {"lightning": {"importance": "ppo_clip", "normalization": "token"}} if name == "lightning_token_ppo" else {}
    return TrainConfig(student="s", shards="d", out="o", losses=LOSS_SETS[name], tail_bucket=tail_bucket, **extra)


def _case(N=37, H=8, V=23, K=5, rows=(9, 1, 20, 7), seed=0, dtype=torch.float64):
    """Hidden states of N selected tokens in 4 rows, an LM head, the teacher's top-k (the last vocab row among
    the ids) with tail mass, sampled tokens, behaviour log-probs."""
    assert sum(rows) == N
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g, dtype=dtype)
    weight = torch.randn(V, H, generator=g, dtype=dtype) / H**0.5
    teacher = (2 * torch.randn(N, V, generator=g, dtype=dtype)).log_softmax(-1)
    topk_lp, topk_ids = teacher.topk(K, -1)
    topk_ids[::3, 0] = V - 1  # the last vocabulary row is an id like any other
    topk_lp = teacher.gather(-1, topk_ids)
    outside = torch.ones_like(teacher, dtype=torch.bool).scatter_(-1, topk_ids, False)
    tail = teacher.masked_fill(~outside, -float("inf")).logsumexp(-1)
    targets = torch.randint(0, V, (N,), generator=g)
    row_len = torch.repeat_interleave(torch.tensor(rows), torch.tensor(rows)).to(dtype)
    tt = TokenTargets(teacher.gather(-1, targets[:, None])[:, 0], teacher.gather(-1, targets[:, None])[:, 0] - 0.3,
                      topk_ids, topk_lp, tail, 1.0 / row_len)
    return hidden, weight, targets, tt, len(rows)


def _full_path(cfg, hidden, weight, targets, tt, n_rows):
    """The reference: full logits, stats over all tokens at once, one loss call."""
    need_topk = bool(set(cfg.losses) & TOPK_LOSSES)
    stats = token_stats(hidden @ weight.T, targets, tt.topk_ids_N_K if need_topk else None)
    ones = torch.ones(1, len(targets), dtype=torch.bool)
    norm_tok, norm_seq = torch.tensor(float(len(targets))), torch.tensor(float(n_rows))
    return compute_losses(cfg, stats[None], tt.rows(0, len(targets)), ones, norm_tok, norm_seq)


def _chunked(cfg, hidden, weight, targets, tt, n_rows, chunk):
    need_topk = bool(set(cfg.losses) & TOPK_LOSSES)
    norm_tok, norm_seq = torch.tensor(float(len(targets))), torch.tensor(float(n_rows))

    def chunk_loss(stats, s, e):
        return compute_losses(cfg, stats[None], tt.rows(s, e), torch.ones(1, e - s, dtype=torch.bool), norm_tok,
                              norm_seq)

    return fused_head_loss(hidden, weight, targets, chunk_loss, topk_ids_N_K=tt.topk_ids_N_K if need_topk else None,
                           chunk_tokens=chunk)


# tail_bucket=False only changes the top-k losses
CASES = [(n, True) for n in LOSS_SETS] + [(n, False) for n in LOSS_SETS if set(LOSS_SETS[n]) & TOPK_LOSSES]


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("name,tail_bucket", CASES)
def test_chunked_head_equals_full_logits(name, tail_bucket, dtype, rtol):
    cfg = _cfg(name, tail_bucket)
    hidden, weight, targets, tt, n_rows = _case(dtype=dtype)
    h_ref, w_ref = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    ref, ref_metrics = _full_path(cfg, h_ref, w_ref, targets, tt, n_rows)
    ref.backward()
    for chunk in (1, 6, 37, 1000):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss, metrics = _chunked(cfg, h, w, targets, tt, n_rows, chunk)
        (2.0 * loss).backward()  # the stored gradients scale with the upstream gradient
        assert abs(loss.item()) > 1e-4
        assert loss.item() == pytest.approx(ref.item(), rel=rtol, abs=rtol)
        # atol: float32 gradients of ~1e-2 that cancel carry ~2e-7 of rounding, which BLAS kernels vary by CPU
        torch.testing.assert_close(h.grad, 2.0 * h_ref.grad, rtol=rtol, atol=rtol * 1e-1)
        torch.testing.assert_close(w.grad, 2.0 * w_ref.grad, rtol=rtol, atol=rtol * 1e-1)
        for key, value in ref_metrics.items():
            assert metrics[key].item() == pytest.approx(value.item(), rel=1e-4, abs=1e-6), key


def test_chunked_head_with_tied_embeddings_accumulates_both_uses():
    """A tied head weight also feeds the input: its gradient is the sum of both paths, as with full logits."""
    hidden, weight, targets, tt, n_rows = _case()
    cfg = _cfg("mixed")
    grads = []
    for chunked in (False, True):
        w = weight.clone().requires_grad_()
        h = hidden + w[targets].roll(1, 0)  # the "embedding" use of the same weight
        loss = (_chunked(cfg, h, w, targets, tt, n_rows, 5) if chunked
                else _full_path(cfg, h, w, targets, tt, n_rows))[0]
        loss.backward()
        grads.append(w.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-10, atol=1e-12)


# --- on a real tiny model ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_lm(tiny_models):
    from pipeline.models import load_model

    return load_model(tiny_models["student"])


def _batch(vocab: int, n: int = 8, seed: int = 0):
    records = make_records(vocab, 4, num_rollouts=n, response_len=9, prompt_len=4, seed=seed)
    lengths = [9, 2, 5, 7, 1, 9, 3, 6][:n]
    records = [dataclasses.replace(r, token_ids=r.token_ids[: r.prompt_len + m],
                                   teacher_logprobs=r.teacher_logprobs[:m], behavior_logprobs=r.behavior_logprobs[:m],
                                   topk_ids=r.topk_ids[:m], topk_logprobs=r.topk_logprobs[:m],
                                   tail_logprob=r.tail_logprob[:m])
               for r, m in zip(records, lengths)]
    return records


def test_student_lm_matches_the_model_forward_logits(tiny_lm):
    """StudentLM (decoder hidden states x head, chunked) equals the Hugging Face forward's logits path."""
    cfg = _cfg("mixed")
    records = _batch(tiny_lm.config.vocab_size)
    batch = collate(records, pad_id=0)
    mask = batch.mask_B_T.bool()
    norm_tok, norm_seq = mask.sum().float(), mask.any(-1).sum().float()
    student = StudentLM(tiny_lm)
    loss, _ = micro_batch_loss(student, cfg.model_copy(update={"logits_chunk_tokens": 7}), batch, norm_tok, norm_seq)
    grads = torch.autograd.grad(loss, list(tiny_lm.parameters()))
    logits = tiny_lm(input_ids=batch.input_ids_B_L, attention_mask=batch.attention_B_L).logits[:, :-1]
    from pipeline.train.batching import flatten_targets

    tt = flatten_targets(batch)
    stats = token_stats(logits[mask], batch.input_ids_B_L[:, 1:][mask], tt.topk_ids_N_K)
    ref, _ = compute_losses(cfg, stats[None], tt.rows(0, int(mask.sum())),
                            torch.ones(1, int(mask.sum()), dtype=torch.bool), norm_tok, norm_seq)
    ref_grads = torch.autograd.grad(ref, list(tiny_lm.parameters()))
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)


def test_activation_checkpointing_changes_no_gradient(tiny_models):
    from pipeline.models import load_model

    cfg = _cfg("mixed")
    vocab = load_model(tiny_models["student"]).config.vocab_size
    batch = collate(_batch(vocab), pad_id=0)
    mask = batch.mask_B_T.bool()
    grads = []
    for checkpointing in (False, True):
        lm = load_model(tiny_models["student"])
        if checkpointing:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        lm.train()
        loss, _ = micro_batch_loss(StudentLM(lm), cfg, batch, mask.sum().float(), mask.any(-1).sum().float())
        loss.backward()
        grads.append([p.grad.clone() for p in lm.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)


def test_bf16_autocast_tracks_fp32_and_keeps_fp32_master_state(tiny_models):
    """bf16 compute (autocast) on a tiny model: the loss stays within 2% of fp32 over 5 steps; weights, gradients
    and Adam moments stay fp32."""
    from pipeline.models import load_model
    from pipeline.train.student import autocast_context

    cfg = _cfg("mixed")
    records = _batch(load_model(tiny_models["student"]).config.vocab_size)
    batch = collate(records, pad_id=0)
    mask = batch.mask_B_T.bool()
    curves = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        lm = load_model(tiny_models["student"])
        student = StudentLM(lm)
        opt = torch.optim.AdamW(student.parameters(), lr=3e-3)
        curve = []
        for _ in range(5):
            opt.zero_grad()
            with autocast_context(precision, torch.device("cpu"), fsdp_sharded=False):
                loss, _ = micro_batch_loss(student, cfg, batch, mask.sum().float(), mask.any(-1).sum().float())
            loss.backward()
            opt.step()
            curve.append(loss.item())
        curves[precision] = curve
        if precision == "bf16":
            assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in student.parameters())
            assert all(s["exp_avg"].dtype == torch.float32 for s in opt.state.values())
    assert curves["bf16"] != curves["fp32"]  # bf16 really ran
    np.testing.assert_allclose(curves["bf16"], curves["fp32"], rtol=0.02)


def test_token_budget_never_exceeded_and_split_by_count_without_one():
    lengths = [50, 3, 17, 90, 17, 2, 64, 33]
    for budget in (90, 100, 128, 1000):
        groups = split_by_token_budget(lengths, budget)
        assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
        assert all(max(lengths[i] for i in g) * len(g) <= budget for g in groups)
    assert split_by_token_budget(lengths, 40)[0] == [3]  # longer than the budget: alone
    assert split_by_token_budget(lengths, None, parts=2) == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_token_budget_micro_batches_give_the_same_update(tiny_models):
    """One step on 8 sequences: one micro-batch (no budget) vs micro-batches formed by a small token budget,
    every one normalised by the step's global counts: same loss and same accumulated gradients (fp32; Adam's
    first step would amplify rounding in near-zero gradients, so the gradients are what is compared)."""
    from pipeline.models import load_model

    cfg = _cfg("mixed")
    records = _batch(load_model(tiny_models["student"]).config.vocab_size)
    lengths = [len(r.token_ids) for r in records]
    assert len(split_by_token_budget(lengths, 26)) > 2
    one = _accumulated_step(tiny_models["student"], cfg, records, split_by_token_budget(lengths, None))
    split = _accumulated_step(tiny_models["student"], cfg, records, split_by_token_budget(lengths, 26))
    _assert_same_step(one, split)


def _accumulated_step(model_dir, cfg, records, groups) -> tuple[float, list[torch.Tensor]]:
    """Loss and accumulated gradients of one step over ``records`` in micro-batches ``groups``, each normalised
    by the counts of all the records (as the trainer's global normalisers)."""
    from pipeline.models import load_model

    mask = collate(records, pad_id=0).mask_B_T.bool()
    norms = (mask.sum().float(), mask.any(-1).sum().float())
    lm = load_model(model_dir)
    rows_seen: list[int] = []  # rows of each decoder call: 1 when the micro-batch was packed
    lm.get_decoder().register_forward_pre_hook(lambda m, args, kwargs: rows_seen.append(len(kwargs["input_ids"])),
                                               with_kwargs=True)
    student = StudentLM(lm)
    total = 0.0
    for g in groups:
        loss, _ = micro_batch_loss(student, cfg, collate([records[i] for i in g], pad_id=0), *norms)
        loss.backward()
        total += loss.item()
    assert rows_seen == ([1] * len(groups) if cfg.packing else [len(g) for g in groups])
    return total, [p.grad.clone() for p in student.parameters()]


def _assert_same_step(a: tuple[float, list[torch.Tensor]], b: tuple[float, list[torch.Tensor]]) -> None:
    assert b[0] == pytest.approx(a[0], rel=1e-5)
    for x, y in zip(a[1], b[1]):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-7)


def test_fsdp2_ranks_but_0_start_on_meta_and_hold_only_their_shards(tiny_models, tmp_path):
    """torchrun, 2 CPU processes, FSDP2: rank 1 builds the student on the meta device and receives its shards
    and buffers from rank 0, so both ranks end with exactly the weights on disk; after a step, each rank's
    optimiser state and its DCP checkpoint file hold only its half (nothing is gathered to rank 0)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from pipeline.models import load_model

    torchrun = Path(sys.executable).with_name("torchrun")
    res = subprocess.run([str(torchrun), "--standalone", "--nproc-per-node", "2", "-m",
                          "tests.scale_helpers.fsdp_init_worker", str(tiny_models["student"]), str(tmp_path)],
                         cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert [r["started_on_meta"] for r in ranks] == [False, True]
    reference = load_model(tiny_models["student"])
    expected = {f"lm.{k}": v for k, v in reference.state_dict().items()}
    expected_buffers = {f"lm.{k}": v for k, v in reference.named_buffers()}
    for r in (0, 1):
        got = torch.load(tmp_path / f"rank-{r}.pt")
        if r == 0:  # the full state dict is gathered on rank 0 only (cpu_offload)
            assert got["full"].keys() == expected.keys()
            assert all(torch.equal(got["full"][k], expected[k]) for k in expected)
        assert got["buffers"].keys() == expected_buffers.keys()
        assert all(torch.equal(got["buffers"][k], expected_buffers[k]) for k in expected_buffers)
    assert ranks[0]["loss"] == ranks[1]["loss"]
    full_optim = ranks[0]["full_optim_numel"]
    assert [r["local_optim_numel"] for r in ranks] == pytest.approx([full_optim / 2] * 2, rel=0.05)
    ckpt = Path(ranks[0]["ckpt"])
    sizes = [(ckpt / f"__{r}_0.distcp").stat().st_size for r in (0, 1)]
    assert min(sizes) > 0.4 * sum(sizes)  # one file per rank, each about half of model + optimiser


def test_pack_padded_keeps_the_targets_and_restarts_positions():
    from pipeline.train.batching import pack_padded, pad_batch

    seqs = [[5, 6, 7, 8, 9], [1, 2], [3, 4, 5, 6]]
    ids_B_L, attention_B_L, select_B_T = pad_batch(seqs, [2, 1, 3], pad_id=0)
    ids_1_S, pos_1_S, select_1_T = pack_padded(ids_B_L, attention_B_L, select_B_T)
    assert ids_1_S.tolist() == [[5, 6, 7, 8, 9, 1, 2, 3, 4, 5, 6]]
    assert pos_1_S.tolist() == [[0, 1, 2, 3, 4, 0, 1, 0, 1, 2, 3]]
    assert ids_1_S[:, 1:][select_1_T].tolist() == ids_B_L[:, 1:][select_B_T].tolist() == [7, 8, 9, 2, 6]
    assert not select_1_T[0, 4] and not select_1_T[0, 6]  # a sequence's last token never predicts the next one


@pytest.mark.parametrize("name", ["lightning_sequence", "reverse_kl_topk", "mixed"])
def test_packed_micro_batches_give_the_same_update_as_padded_ones(tiny_models, name):
    """Packing each micro-batch into one padding-free row changes neither the loss nor the gradients (fp32): the
    same targets in the same order, attention confined to each sequence; a packed token budget counts real
    tokens, so it forms no more micro-batches than the padded one."""
    from pipeline.models import load_model

    records = _batch(load_model(tiny_models["student"]).config.vocab_size)
    lengths = [len(r.token_ids) for r in records]
    padded = _accumulated_step(tiny_models["student"], _cfg(name), records, split_by_token_budget(lengths, None))
    packed_cfg = _cfg(name).model_copy(update={"packing": True})
    for budget in (None, 26):
        groups = split_by_token_budget(lengths, budget, packed=True)
        if budget:
            assert all(sum(lengths[i] for i in g) <= budget for g in groups)
            assert 1 < len(groups) <= len(split_by_token_budget(lengths, budget))
        _assert_same_step(padded, _accumulated_step(tiny_models["student"], packed_cfg, records, groups))


def test_packed_sft_takes_the_same_steps_as_padded_sft(tiny_models):
    from pipeline.config import OptimConfig
    from pipeline.models import load_model
    from pipeline.train.loop import sft_train

    rng = np.random.default_rng(0)
    vocab = load_model(tiny_models["student"]).config.vocab_size
    examples = [(rng.integers(3, vocab, size=int(n)), 3) for n in rng.integers(5, 14, size=24)]
    curves = {}
    for packing in (False, True):
        lm = load_model(tiny_models["student"])
        seen = []
        sft_train(lm, iter(examples), steps=3, batch_size=8, optim=OptimConfig(lr=1e-2), pad_id=0, log_every=1,
                  show_progress=False, on_log=lambda step, m, seen=seen: seen.append(m), packing=packing,
                  max_tokens_per_micro_batch=40)
        curves[packing] = [m["loss/sft"] for m in seen]
        assert (seen[-1]["perf/padding_frac"] == 0) == packing
    np.testing.assert_allclose(curves[True], curves[False], rtol=1e-5)


def test_attention_kernel_is_configurable_and_packing_matches_under_eager(tiny_models):
    """``attn_implementation`` reaches the model; packing's block-diagonal mask is honoured by eager attention
    too (same loss as padding)."""
    from pipeline.train.distributed import DistInfo
    from pipeline.train.student import load_student

    lm = load_student(tiny_models["student"], DistInfo(), fsdp=False, attn_implementation="eager")
    assert lm.config._attn_implementation == "eager"
    records = _batch(lm.config.vocab_size)
    batch = collate(records, pad_id=0)
    mask = batch.mask_B_T.bool()
    norms = (mask.sum().float(), mask.any(-1).sum().float())
    losses = [micro_batch_loss(StudentLM(lm), _cfg("mixed").model_copy(update={"packing": p}), batch, *norms)[0]
              for p in (False, True)]
    assert losses[1].item() == pytest.approx(losses[0].item(), rel=1e-5)


def test_the_gpu_process_group_serves_the_trainers_cpu_collectives():
    """The trainer all-reduces small CPU tensors (token counts, method sums, logged losses) beside the CUDA
    gradients. A group made with "nccl" alone maps only cuda to a backend, so those calls would fail on the first
    multi-GPU step; lopd's GPU group maps cpu to gloo and cuda to nccl (parsed here by torch itself)."""
    from torch.distributed.distributed_c10d import Backend, BackendConfig

    from pipeline.train.distributed import process_group_backend

    assert BackendConfig(Backend("nccl")).get_device_backend_map() == {"cuda": "nccl"}  # why the mapping is needed
    assert BackendConfig(process_group_backend(cuda=True)).get_device_backend_map() == {"cpu": "gloo",
                                                                                         "cuda": "nccl"}
    assert process_group_backend(cuda=False) == "gloo"
