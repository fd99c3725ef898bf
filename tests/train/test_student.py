"""pipeline/train/student.py: StudentLM equals the model's forward logits, activation checkpointing changes no
gradient, bf16 autocast tracks fp32 with fp32 master state, the attention kernel is configurable, and FSDP2 ranks
but 0 start on the meta device holding only their shards."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.train.batching import collate, flatten_targets
from pipeline.train.distributed import DistInfo
from pipeline.train.head import token_stats
from pipeline.train.objective import compute_losses, micro_batch_loss
from pipeline.train.student import StudentLM
from tests.conftest import REPO
from tests.train.helpers import named_loss_cfg, ragged_records


@pytest.fixture(scope="module")
def tiny_lm(tiny_models):
    from pipeline.models import load_model

    return load_model(tiny_models["student"])


def test_student_lm_matches_the_model_forward_logits(tiny_lm):
    """StudentLM (decoder hidden states x head, chunked) equals the Hugging Face forward's logits path."""
    cfg = named_loss_cfg("mixed")
    records = ragged_records(tiny_lm.config.vocab_size)
    batch = collate(records, pad_id=0)
    mask = batch.mask_B_T.bool()
    norm_tok, norm_seq = mask.sum().float(), mask.any(-1).sum().float()
    student = StudentLM(tiny_lm)
    loss, _ = micro_batch_loss(student, cfg.model_copy(update={"logits_chunk_tokens": 7}), batch, norm_tok, norm_seq)
    grads = torch.autograd.grad(loss, list(tiny_lm.parameters()))
    logits = tiny_lm(input_ids=batch.input_ids_B_L, attention_mask=batch.attention_B_L).logits[:, :-1]

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

    cfg = named_loss_cfg("mixed")
    vocab = load_model(tiny_models["student"]).config.vocab_size
    batch = collate(ragged_records(vocab), pad_id=0)
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

    cfg = named_loss_cfg("mixed")
    records = ragged_records(load_model(tiny_models["student"]).config.vocab_size)
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


def test_attention_kernel_is_configurable_and_packing_matches_under_eager(tiny_models):
    """``attn_implementation`` reaches the model; packing's block-diagonal mask is honoured by eager attention
    too (same loss as padding)."""
    from pipeline.train.student import load_student

    lm = load_student(tiny_models["student"], DistInfo(), fsdp=False, attn_implementation="eager")
    assert lm.config._attn_implementation == "eager"
    records = ragged_records(lm.config.vocab_size)
    batch = collate(records, pad_id=0)
    mask = batch.mask_B_T.bool()
    norms = (mask.sum().float(), mask.any(-1).sum().float())
    losses = [micro_batch_loss(StudentLM(lm), named_loss_cfg("mixed").model_copy(update={"packing": p}), batch,
                               *norms)[0]
              for p in (False, True)]
    assert losses[1].item() == pytest.approx(losses[0].item(), rel=1e-5)


def test_fsdp2_ranks_but_0_start_on_meta_and_hold_only_their_shards(tiny_models, tmp_path):
    """torchrun, 2 CPU processes, FSDP2: rank 1 builds the student on the meta device and receives its shards
    and buffers from rank 0 (whose loaded copy stays on the host: rank 0 shards a meta skeleton too), so both ranks
    end with exactly the weights on disk and hold only their shards; after a step, each rank's
    optimiser state and its DCP checkpoint file hold only its half (nothing is gathered to rank 0)."""

    from pipeline.models import load_model

    torchrun = Path(sys.executable).with_name("torchrun")
    res = subprocess.run([str(torchrun), "--standalone", "--nproc-per-node", "2", "-m",
                          "tests.scale_helpers.fsdp_init_worker", str(tiny_models["student"]), str(tmp_path)],
                         cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert [r["started_on_meta"] for r in ranks] == [False, True]
    # after start-up each rank, rank 0 included, holds its half of the parameters (its shards) and nothing more;
    # rank 0's loaded copy stayed a plain host model that sent the shards (it was never sharded in place or moved)
    assert [r["local_param_bytes"] for r in ranks] == pytest.approx([ranks[0]["full_param_bytes"] / 2] * 2, rel=0.05)
    assert ranks[0]["loaded_untouched"]
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
