"""From records to micro-batches: padding, packing, token budgets, collation of the teacher's per-token
arrays and their flattening to the selected tokens the loss reads."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields

import numpy as np
import torch

from pipeline.config import ScaleConfig
from pipeline.train import losses as L
from pipeline.train.weighting import RolloutTable
from storage.records import TeacherRecord

Example = tuple[np.ndarray, int]  # (token_ids, prompt_len)


def pad_batch(sequences: list[list[int]] | list[np.ndarray], prompt_lens: list[int], pad_id: int
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad to ``input_ids_B_L`` and ``attention_B_L``; ``response_mask_B_L`` marks the *targets*
    (position t of the shifted targets is a response token)."""
    lengths_B = np.fromiter((len(s) for s in sequences), dtype=np.int64, count=len(sequences))
    plens_B = np.asarray(prompt_lens, dtype=np.int64)
    width = int(lengths_B.max())
    cols_L = np.arange(width)
    attention_B_L = cols_L[None, :] < lengths_B[:, None]
    input_ids_B_L = np.full((len(sequences), width), pad_id, dtype=np.int64)
    input_ids_B_L[attention_B_L] = np.concatenate([np.asarray(s, dtype=np.int64) for s in sequences])
    # target t (predicting token t+1) is a response token for plen-1 <= t < n-1
    response_mask_B_L = (cols_L[None, :-1] >= plens_B[:, None] - 1) & (cols_L[None, :-1] < lengths_B[:, None] - 1)
    return (torch.from_numpy(input_ids_B_L), torch.from_numpy(attention_B_L.astype(np.int64)),
            torch.from_numpy(response_mask_B_L))


def pack_padded(input_ids_B_L: torch.Tensor, attention_B_L: torch.Tensor, select_B_T: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A right-padded micro-batch as one padding-free row: ``input_ids_1_S`` (S = real tokens), ``position_ids_1_S``
    restarting at 0 for each sequence, and ``select_1_T`` (T = S - 1) marking the same targets in the same
    row-major order as ``select_B_T``. transformers reads restarting position ids (with no attention mask) as
    document boundaries: block-diagonal causal attention (varlen flash-attention 2 or flex attention on GPU, a
    dense block mask under sdpa/eager). A sequence's last position (it would predict the next sequence's first
    token) is never a target: ``pad_batch`` only selects t < length - 1."""
    keep_B_L = attention_B_L.bool()
    input_ids_1_S = input_ids_B_L[keep_B_L][None]
    position_ids_1_S = (keep_B_L.cumsum(-1) - 1)[keep_B_L][None]
    select_B_L = torch.nn.functional.pad(select_B_T, (0, 1), value=False)
    select_1_T = select_B_L[keep_B_L][None, :-1]
    return input_ids_1_S, position_ids_1_S, select_1_T


def split_by_token_budget(lengths: list[int], budget: int | None, parts: int = 1,
                          packed: bool = False) -> list[list[int]]:
    """Indices of the sequences grouped into micro-batches.

    Without a ``budget``: ``parts`` consecutive groups whose sizes differ by at most one (gradient accumulation by
    count; a short step, e.g. the last of an epoch, loses no sequence and forms no empty group). With one:
    sequences sorted longest first, grouped greedily so that a micro-batch's size stays within ``budget``
    tokens: its padded size (its longest sequence x its count), or with ``packed`` its real tokens (the sum of
    its lengths); a sequence longer than the budget goes alone. The step's loss does not depend on the
    grouping: every micro-batch divides by the step's global counts.
    """
    n = len(lengths)
    if budget is None:
        return [chunk.tolist() for chunk in np.array_split(np.arange(n), min(parts, n)) if len(chunk)]
    order = sorted(range(n), key=lambda i: (-lengths[i], i))
    groups: list[list[int]] = []
    if packed:  # first fit: each sequence joins the first micro-batch it fits in
        used: list[int] = []
        for i in order:
            j = next((j for j, u in enumerate(used) if u + lengths[i] <= budget), len(groups))
            if j == len(groups):
                groups.append([])
                used.append(0)
            groups[j].append(i)
            used[j] += lengths[i]
        return groups
    for i in order:
        if groups and lengths[groups[-1][0]] * (len(groups[-1]) + 1) <= budget:
            groups[-1].append(i)  # sorted longest first: the group's first member is its longest
        else:
            groups.append([i])
    return groups


@dataclass
class Batch:
    """Tensors for one micro-batch; the ``_B_T`` tensors are aligned with the shifted targets."""

    input_ids_B_L: torch.Tensor
    attention_B_L: torch.Tensor
    mask_B_T: torch.Tensor
    # the teacher's side (OPD; None in an SFT micro-batch, which trains on its tokens alone)
    teacher_logprobs_B_T: torch.Tensor | None = None
    behavior_logprobs_B_T: torch.Tensor | None = None
    topk_ids_B_T_K: torch.Tensor | None = None
    topk_logprobs_B_T_K: torch.Tensor | None = None
    tail_logprob_B_T: torch.Tensor | None = None
    reward_B: torch.Tensor | None = None  # each rollout's reward, NaN where the shard holds none
    pass_rate_B: torch.Tensor | None = None  # its prompt's pass rate (only with prompt statistics)
    row_weight_B: torch.Tensor | None = None  # fixed per-rollout method weights (SCOPE) from the statistics
    advantage_B: torch.Tensor | None = None  # group-normalised reward of the rollout (KDRL) from the statistics

    def to(self, device: torch.device, non_blocking: bool = False) -> "Batch":
        return Batch(*(None if (v := getattr(self, f)) is None else v.to(device, non_blocking=non_blocking)
                       for f in self.__dataclass_fields__))

    def pin_memory(self) -> "Batch":
        """The same tensors in page-locked host memory: their copy to the GPU (``to(device, non_blocking=True)``)
        is then a DMA that does not wait for the host."""
        return Batch(*(None if (v := getattr(self, f)) is None else v.pin_memory() for f in self.__dataclass_fields__))


def collate(records: list[TeacherRecord], pad_id: int, rollouts: RolloutTable | None = None) -> Batch:
    """Right-pad token ids; scatter each record's per-response-position arrays to target positions
    ``prompt_len-1 .. len-2`` of the shifted sequence (exactly where ``mask_B_T`` is true, row by row).
    ``rollouts`` (the shard set's prompt statistics) adds each row's pass rate and fixed method weight."""
    input_ids_B_L, attention_B_L, mask_B_T = pad_batch([r.token_ids for r in records],
                                                       [r.prompt_len for r in records], pad_id)
    B, T = mask_B_T.shape
    K = records[0].topk_ids.shape[1]
    where = mask_B_T.numpy()

    def scatter(parts: list[np.ndarray], fill: float, dtype: type, tail: tuple[int, ...] = ()) -> torch.Tensor:
        out = np.full((B, T, *tail), fill, dtype=dtype)
        out[where] = np.concatenate(parts).astype(dtype, copy=False)
        return torch.from_numpy(out)

    return Batch(
        input_ids_B_L, attention_B_L, mask_B_T,
        scatter([r.teacher_logprobs for r in records], 0.0, np.float32),
        scatter([r.behavior_logprobs for r in records], 0.0, np.float32),
        scatter([r.topk_ids for r in records], 0, np.int64, (K,)),
        scatter([r.topk_logprobs for r in records], -1e4, np.float32, (K,)),
        scatter([r.tail_logprob for r in records], -1e4, np.float32),
        torch.tensor([np.nan if r.reward is None else r.reward for r in records], dtype=torch.float32),
        *_row_stats(records, rollouts),
    )


def _row_stats(records: list[TeacherRecord], rollouts: RolloutTable | None
               ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(pass_rate_B, row_weight_B, advantage_B) of these records from the prompt statistics (None without)."""
    if rollouts is None:
        return None, None, None
    rows = rollouts.rows([(r.prompt_id, r.sample_index) for r in records])
    row_weight = None if rollouts.row_weight_R is None else torch.from_numpy(rollouts.row_weight_R[rows])
    advantage = None if rollouts.advantage_R is None else torch.from_numpy(rollouts.advantage_R[rows])
    return torch.from_numpy(rollouts.pass_rate_R[rows]), row_weight, advantage


@dataclass
class TokenTargets:
    """The teacher's side of the selected tokens of a micro-batch, flattened in row-major order (the order of
    ``StudentLM``'s selected hidden states). ``seq_weights_N``: 1 / (valid tokens of the token's row), the
    reduction weight of the "sequence" normalisation over whole rows. ``weights_N``: the weighting methods'
    per-token weights (None when none is on: the plain loss); ``reward_N`` / ``pass_rate_N``: the token's row's
    reward and prompt pass rate, for the per-term row routing (None when unknown); ``advantage_N``: the row's
    group-normalised reward (KDRL). The head's pre-pass methods may set ``weights_N`` and the ``pg_*`` fields and
    cut every field to the tokens TIP keeps (``Prepasses``)."""

    teacher_logprobs_N: torch.Tensor
    behavior_logprobs_N: torch.Tensor
    topk_ids_N_K: torch.Tensor
    topk_logprobs_N_K: torch.Tensor
    tail_logprob_N: torch.Tensor
    seq_weights_N: torch.Tensor
    weights_N: torch.Tensor | None = None
    reward_N: torch.Tensor | None = None
    pass_rate_N: torch.Tensor | None = None
    advantage_N: torch.Tensor | None = None
    pg_keep_N: torch.Tensor | None = None  # Clip-Cov: 0 where lightning's term loses its gradient
    pg_kl_coef_N: torch.Tensor | None = None  # KL-Cov: coefficient of |log p_theta - log mu| in lightning's term

    def rows(self, start: int, end: int) -> "TokenTargets":
        """Tokens ``start:end`` as one ``[1, n]`` row, the shape the losses take."""
        return TokenTargets(*(None if (v := getattr(self, f.name)) is None else v[start:end].unsqueeze(0)
                              for f in fields(self)))


def flatten_targets(batch: Batch, weights_B_T: torch.Tensor | None = None) -> TokenTargets:
    select_B_T = batch.mask_B_T.bool()

    def per_token(row_B: torch.Tensor | None) -> torch.Tensor | None:
        return None if row_B is None else row_B.unsqueeze(-1).expand_as(select_B_T)[select_B_T]

    return TokenTargets(batch.teacher_logprobs_B_T[select_B_T], batch.behavior_logprobs_B_T[select_B_T],
                        batch.topk_ids_B_T_K[select_B_T], batch.topk_logprobs_B_T_K[select_B_T],
                        batch.tail_logprob_B_T[select_B_T], L.reduction_weights(select_B_T, "sequence")[select_B_T],
                        None if weights_B_T is None else weights_B_T[select_B_T],
                        per_token(batch.reward_B), per_token(batch.pass_rate_B), per_token(batch.advantage_B))


def prepare_step(records: list[TeacherRecord], cfg: ScaleConfig, pad_id: int,
                 rollouts: RolloutTable | None = None, device_index: int = 0) -> list[Batch]:
    """One step's records as ``train_step`` computes them: micro-batches by count (``grad_accum``) or by the token
    budget (``split_by_token_budget``, packed or padded), each collated and, where CUDA is available, pinned. The
    one code path of both kinds of source: run ahead on the prefetch thread by the shard sources, in the step for
    the others (``step_micro_batches``)."""
    groups = split_by_token_budget([len(r.token_ids) for r in records], cfg.max_tokens_per_micro_batch,
                                   cfg.grad_accum, packed=cfg.packing)
    return pin([collate([records[i] for i in g], pad_id, rollouts) for g in groups], device_index)


def prepare_examples(examples: list[Example], cfg: ScaleConfig, pad_id: int) -> list[Batch]:
    """One SFT step's ``(token_ids, prompt_len)`` examples as micro-batches, grouped as ``prepare_step`` groups
    records: the tokens and the response mask only (next-token loss on the response)."""
    groups = split_by_token_budget([len(e[0]) for e in examples], cfg.max_tokens_per_micro_batch, cfg.grad_accum,
                                   packed=cfg.packing)
    return [Batch(*pad_batch([examples[i][0] for i in g], [examples[i][1] for i in g], pad_id)) for g in groups]


def pin(batches: list[Batch], device_index: int) -> list[Batch]:
    """``batches`` in page-locked memory where CUDA is available (unchanged elsewhere)."""
    if not torch.cuda.is_available():
        return batches
    # the current device is per thread: set it (as DataLoader's pin-memory thread does) so that pinning on the
    # prefetch thread uses this rank's GPU context instead of creating one on GPU 0
    torch.cuda.set_device(device_index)
    return [b.pin_memory() for b in batches]


def take_rows(batch: Batch, rows: list[int]) -> Batch:
    """The micro-batch of ``batch``'s rows ``rows``, trimmed to their longest sequence: what ``collate`` (or
    ``pad_batch``) makes of those rows alone."""
    index = torch.as_tensor(rows, dtype=torch.long)
    width = int(batch.attention_B_L[index].sum(-1).max())
    out = []
    for f in fields(batch):
        value = getattr(batch, f.name)
        if value is None:
            out.append(None)
            continue
        value = value[index]
        if f.name.endswith("_B_L"):
            value = value[:, :width]
        elif "_B_T" in f.name:
            value = value[:, :width - 1]
        out.append(value)
    return Batch(*out)


def balance_micro_batches(batches: list[Batch], target: int) -> tuple[list[Batch], int]:
    """Exactly ``target`` micro-batches from a rank's ``batches`` (``target`` >= their number: the most any rank of
    the step formed), so that every rank runs the same forwards and backwards (FSDP2 all-gathers per forward, DDP
    reduces in the last backward: a rank with fewer would leave the others waiting; verl's
    ``rearrange_micro_batches(same_micro_num_in_dp=True)`` solves the same problem).

    The micro-batch with the most rows is split in two halves (the first takes the extra row) until there are
    ``target``; halves of a micro-batch within the token budget are within it. When every micro-batch is one row,
    the rest are idle: copies of the last row with no target token (``mask_B_T`` all false). The trainer runs them
    like any micro-batch, so every collective happens (the forward's all-gathers, the gradient reduction, BAPO's
    all-reduced sums), and they contribute nothing: a zero loss, zero gradients, zero sums, no metrics. Returns
    the micro-batches, the idle ones last, and how many are idle. The step's gradient does not change: every
    micro-batch divides by the step's global counts."""
    batches = list(batches)
    while len(batches) < target:
        sizes = [b.input_ids_B_L.shape[0] for b in batches]
        i = max(range(len(batches)), key=lambda j: (sizes[j], -j))
        if sizes[i] < 2:
            break
        half = (sizes[i] + 1) // 2
        batches[i:i + 1] = [take_rows(batches[i], list(range(half))),
                            take_rows(batches[i], list(range(half, sizes[i])))]
    idle = target - len(batches)
    last = batches[-1]
    return batches + [idle_copy(take_rows(last, [last.input_ids_B_L.shape[0] - 1])) for _ in range(idle)], idle


def idle_copy(batch: Batch) -> Batch:
    """``batch`` with no target token: the same forward (the same shapes, so the same collectives), nothing to
    learn from."""
    return dataclasses.replace(batch, mask_B_T=torch.zeros_like(batch.mask_B_T))
