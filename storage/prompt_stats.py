"""Per-prompt statistics of a teacher shard set: computed once, stored beside the shards, reused.

The sample-weighting methods of the trainer (pass-rate kernels, correctness routing, group-relative weights)
need facts about every rollout of a prompt while a batch holds only some of them. This module reads the small
columns of every shard once (no top-k, no token ids) and writes one row per rollout:

| column | type | content |
|---|---|---|
| `prompt_id` | string | |
| `sample_index` | int32 | |
| `reward` | float32 | the rollout's reward (the task checker's verdict); NaN when the shard holds null |
| `num_tokens` | int32 | response tokens R |
| `teacher_mean` | float32 | mean over the response of the teacher's log-prob of the sampled token |
| `behavior_mean` | float32 | mean over the response of the rollout policy's log-prob of the sampled token |
| `n_rollouts` | int32 | rollouts of this prompt in the set |
| `pass_rate` | float32 | share of the prompt's rollouts with reward > 0 (= mean reward for 0/1); NaN if one is null |
| `reward_mean`, `reward_std` | float32 | mean and sample std (divided by n - 1; 0 for a lone rollout) of the rewards |

It lives at ``<shards>/prompt_stats.parquet`` (the shard set's integrity checks look at ``shard-*`` files only)
with the caller's ``key`` (a content fingerprint of the shard set) and ``STATS_VERSION`` (what the columns mean) in
its Parquet metadata: a file whose key or version differs, from a set that has changed since or from an older
definition of the columns, is recomputed. Written atomically (temp file, fsync, rename), so
concurrent ranks that compute it at once leave one complete file; a read-only shard directory only costs the
recomputation on each run.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from storage.errors import LopdUserError
from storage.shardset import ShardSet

STATS_FILE = "prompt_stats.parquet"
KV_KEY = b"lopd.prompt_stats_key"
KV_VERSION = b"lopd.prompt_stats_version"
# 2: reward_std is the sample standard deviation (version 1, unversioned files, held the population one)
STATS_VERSION = b"2"
_COLUMNS = ["prompt_id", "sample_index", "reward", "num_response_tokens", "teacher_logprobs", "behavior_logprobs"]


def compute_prompt_stats(shard_set: ShardSet) -> pa.Table:
    """One row per rollout of the set's complete shards, with its prompt's statistics (see module docstring).
    Reads one row group at a time and keeps only per-rollout numbers, so memory grows with the rollouts, not
    with their tokens."""
    parts = [_rollout_means(group) for i in shard_set.complete_indices()
             for group in shard_set.iter_row_groups(i, columns=_COLUMNS)]
    table = pa.concat_tables(parts)
    reward = table["reward"].to_numpy(zero_copy_only=False).astype(np.float64)  # null -> NaN
    _, group_of_row = np.unique(np.asarray(table["prompt_id"].to_pylist(), dtype=str), return_inverse=True)
    n_rollouts = np.bincount(group_of_row)
    # NaN rewards propagate: a prompt with a null reward has no pass rate
    reward_mean = np.bincount(group_of_row, weights=reward) / n_rollouts
    deviation = reward - reward_mean[group_of_row]
    # the sample std (Bessel's n - 1), as GRPO's group advantage in verl and TRL (torch.std); a lone rollout has no
    # spread to measure: 0 (the methods that compare a prompt's rollouts refuse such prompts)
    squares = np.bincount(group_of_row, weights=deviation**2)
    reward_std = np.sqrt(squares / np.maximum(n_rollouts - 1, 1))
    correct = np.where(np.isnan(reward), np.nan, reward > 0)
    pass_rate = np.bincount(group_of_row, weights=correct) / n_rollouts
    per_prompt = {"n_rollouts": pa.array(n_rollouts[group_of_row].astype(np.int32), pa.int32()),
                  "pass_rate": _f32(pass_rate[group_of_row]), "reward_mean": _f32(reward_mean[group_of_row]),
                  "reward_std": _f32(reward_std[group_of_row])}
    for name, column in per_prompt.items():
        table = table.append_column(name, column)
    return table


def _rollout_means(group: pa.Table) -> pa.Table:
    """The per-rollout columns of one row group: ids, reward (null -> NaN), tokens, mean teacher and behaviour
    log-probs."""
    n_tokens = group["num_response_tokens"].to_numpy().astype(np.int64)
    return pa.table({
        "prompt_id": group["prompt_id"].combine_chunks(),
        "sample_index": group["sample_index"].combine_chunks(),
        "reward": _f32(group["reward"].to_numpy(zero_copy_only=False).astype(np.float64)),
        "num_tokens": group["num_response_tokens"].combine_chunks(),
        "teacher_mean": _f32(_row_means(group["teacher_logprobs"], n_tokens)),
        "behavior_mean": _f32(_row_means(group["behavior_logprobs"], n_tokens)),
    })


def _f32(x: np.ndarray) -> pa.Array:
    return pa.array(x.astype(np.float32), pa.float32())


def load_prompt_stats(shard_set: ShardSet, key: str) -> tuple[pa.Table, str]:
    """The set's statistics: read from ``<root>/prompt_stats.parquet`` when it was computed for ``key`` under this
    ``STATS_VERSION``, else computed and written there. Returns ``(table, how)``, ``how`` one of "read", "computed"
    or, when the shard directory is not writable (a shared read-only dataset), "computed (not stored: <reason>)"."""
    path = shard_set.root / STATS_FILE
    if path.exists():
        try:
            stored = pq.read_table(path)
            metadata = stored.schema.metadata or {}
            if metadata.get(KV_KEY) == key.encode() and metadata.get(KV_VERSION) == STATS_VERSION:
                return stored, "read"
        except (OSError, pa.ArrowInvalid):  # an unreadable file is recomputed like a stale one
            pass
    table = compute_prompt_stats(shard_set).replace_schema_metadata({KV_KEY: key.encode(), KV_VERSION: STATS_VERSION})
    tmp = path.with_name(f".{STATS_FILE}.{os.getpid()}.tmp")
    try:
        pq.write_table(table, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        return table, f"computed (not stored: {err.strerror or err})"
    return table, "computed"


def require_group_stats(table: pa.Table, root: Path, *, groups: bool, why: str) -> None:
    """Refuse statistics a method cannot use: a null reward (always), a prompt with fewer than 2 rollouts
    (``groups``: the method compares the rollouts of a prompt). ``why`` names the method asking."""
    reward = table["reward"].to_numpy()
    if np.isnan(reward).any():
        missing = int(np.isnan(reward).sum())
        first = table["prompt_id"][int(np.flatnonzero(np.isnan(reward))[0])].as_py()
        raise LopdUserError(f"{root}: {why} needs each rollout's reward, but {missing} of {table.num_rows} rollouts "
                            f"have none (first: prompt_id={first!r}); sample the rollouts with a checker "
                            "(rollouts.checker) and score them again, or turn the method off")
    if groups:
        n = table["n_rollouts"].to_numpy()
        if table.num_rows and n.min() < 2:
            first = table["prompt_id"][int(np.argmin(n))].as_py()
            raise LopdUserError(f"{root}: {why} compares the rollouts of each prompt, but {int((n < 2).sum())} "
                                f"prompt(s) have fewer than 2 (first: prompt_id={first!r}); sample more per "
                                "prompt (rollouts.sampling.n >= 2) or turn the method off")


def _row_means(column: pa.ChunkedArray, n_tokens: np.ndarray) -> np.ndarray:
    """Mean of each row's list values (float64 sums); 0 for an empty row."""
    values = [c.flatten().to_numpy(zero_copy_only=False) for c in column.chunks]
    values = np.concatenate(values).astype(np.float64) if values else np.zeros(0)
    row_of_value = np.repeat(np.arange(len(n_tokens)), n_tokens)
    return np.bincount(row_of_value, weights=values, minlength=len(n_tokens)) / np.maximum(n_tokens, 1)
