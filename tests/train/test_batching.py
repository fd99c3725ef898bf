"""pipeline/train/batching.py: collate places every record array at its target positions; token-budget
micro-batches respect the budget and give the same update as one batch; packing keeps the targets and gives the
same update as padding."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pipeline.train.batching import balance_micro_batches, collate, split_by_token_budget, take_rows
from pipeline.train.objective import micro_batch_loss
from pipeline.train.student import StudentLM
from storage.synthetic import make_records
from tests.train.helpers import named_loss_cfg, ragged_records


def test_collate_places_every_record_array_at_its_target_positions():
    """Ragged rollouts (including an empty response): each per-response array lands at targets
    prompt_len-1 .. len-2 of its row, padding elsewhere; checked element by element."""

    from pipeline.train.batching import collate

    records = make_records(20, 4, num_rollouts=5, response_len=7, prompt_len=3, seed=2)
    records = [dataclasses.replace(r, token_ids=r.token_ids[: r.prompt_len + n],
                                   teacher_logprobs=r.teacher_logprobs[:n], behavior_logprobs=r.behavior_logprobs[:n],
                                   topk_ids=r.topk_ids[:n], topk_logprobs=r.topk_logprobs[:n],
                                   tail_logprob=r.tail_logprob[:n])
               for r, n in zip(records, [7, 0, 3, 5, 1])]
    batch = collate(records, pad_id=0)
    B, L = batch.input_ids_B_L.shape
    assert (B, L) == (5, 10) and batch.mask_B_T.shape == (5, 9)
    for b, r in enumerate(records):
        n = len(r.token_ids)
        assert batch.input_ids_B_L[b, :n].tolist() == r.token_ids.tolist()
        assert batch.input_ids_B_L[b, n:].eq(0).all() and batch.attention_B_L[b].sum() == n
        for t in range(L - 1):
            j = t - (r.prompt_len - 1)  # response position predicted at target t
            inside = 0 <= j < n - r.prompt_len
            assert bool(batch.mask_B_T[b, t]) == inside
            if inside:
                assert batch.teacher_logprobs_B_T[b, t] == r.teacher_logprobs[j]
                assert batch.behavior_logprobs_B_T[b, t] == r.behavior_logprobs[j]
                assert batch.topk_ids_B_T_K[b, t].tolist() == r.topk_ids[j].tolist()
                assert torch.equal(batch.topk_logprobs_B_T_K[b, t], torch.from_numpy(r.topk_logprobs[j]))
                assert batch.tail_logprob_B_T[b, t] == r.tail_logprob[j]
            else:
                assert batch.topk_logprobs_B_T_K[b, t].eq(-1e4).all() and batch.tail_logprob_B_T[b, t] == -1e4


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

    cfg = named_loss_cfg("mixed")
    records = ragged_records(load_model(tiny_models["student"]).config.vocab_size)
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

    records = ragged_records(load_model(tiny_models["student"]).config.vocab_size)
    lengths = [len(r.token_ids) for r in records]
    padded = _accumulated_step(tiny_models["student"], named_loss_cfg(name), records,
                               split_by_token_budget(lengths, None))
    packed_cfg = named_loss_cfg(name).model_copy(update={"packing": True})
    for budget in (None, 26):
        groups = split_by_token_budget(lengths, budget, packed=True)
        if budget:
            assert all(sum(lengths[i] for i in g) <= budget for g in groups)
            assert 1 < len(groups) <= len(split_by_token_budget(lengths, budget))
        _assert_same_step(padded, _accumulated_step(tiny_models["student"], packed_cfg, records, groups))


# --- ranks agree on their micro-batches (balance_micro_batches) -----------------------------------------------------


def test_count_split_of_a_short_step_drops_no_sequence_and_forms_no_empty_group():
    """The last step of an epoch is short: by count, its n sequences form min(parts, n) groups, sizes within one,
    every sequence exactly once (an empty group used to reach collate([]) and crash)."""
    for n, parts in [(7, 2), (3, 4), (1, 4), (9, 4), (8, 4)]:
        groups = split_by_token_budget([5] * n, None, parts)
        assert len(groups) == min(parts, n) and all(groups)
        assert sorted(i for g in groups for i in g) == list(range(n))
        assert max(map(len, groups)) - min(map(len, groups)) <= 1


def _ragged_records(n: int):
    """``ragged_records`` with a reward on every row (collate's NaN for a missing reward never equals itself)."""
    return [dataclasses.replace(r, reward=float(i % 2)) for i, r in enumerate(ragged_records(64, n))]


def _same_batch(a, b) -> bool:
    return all((x is None and y is None) or (x is not None and y is not None and torch.equal(x, y))
               for x, y in zip(vars(a).values(), vars(b).values()))


def test_take_rows_is_the_collation_of_those_rows_alone():
    records = _ragged_records(6)
    batch = collate(records, pad_id=0)
    for rows in ([0], [2, 5], [1, 3, 4], list(range(6))):
        assert _same_batch(take_rows(batch, rows), collate([records[i] for i in rows], pad_id=0))


def test_balance_splits_the_largest_micro_batch_until_the_ranks_agree():
    """A rank that formed fewer micro-batches splits its largest ones (each half the collation of its rows, so within
    the token budget) until it has as many as the others; every row stays exactly once."""
    records = _ragged_records(7)
    budget = 40
    groups = split_by_token_budget([len(r.token_ids) for r in records], budget)
    batches = [collate([records[i] for i in g], pad_id=0) for g in groups]
    target = len(batches) + 3
    balanced, idle = balance_micro_batches(batches, target)
    assert len(balanced) == target and idle == 0
    assert all(b.input_ids_B_L.numel() <= budget for b in balanced)
    rows = sorted(tuple(r[a.bool()].tolist()) for b in balanced for r, a in zip(b.input_ids_B_L, b.attention_B_L))
    assert rows == sorted(tuple(r.token_ids.tolist()) for r in records)


def test_balance_adds_idle_micro_batches_when_every_one_is_a_single_row():
    records = _ragged_records(2)
    batches = [collate([r], pad_id=0) for r in records]
    balanced, idle = balance_micro_batches(batches, 5)
    assert len(balanced) == 5 and idle == 3
    # copies of the last row without target tokens: the same forward, nothing to learn from
    last = batches[-1]
    for b in balanced[2:]:
        assert not b.mask_B_T.any() and last.mask_B_T.any()
        assert _same_batch(dataclasses.replace(b, mask_B_T=last.mask_B_T), last)
    assert balanced[:2] == batches
