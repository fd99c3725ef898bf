"""Shards for people: ``lopd shards show`` (a few rollouts as text, with the teacher's top-k at each position) and the
token text columns of ``lopd shards export --readable``.

``storage.inspect`` turns shards into plain numeric tables; this module adds what needs the tokenizer: the text of
every token id. The tokenizer is the one recorded in the shard set's provenance (the scoring teacher's for top-k
shards, the sampling model's for samples), or the one given.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

import pyarrow as pa
from rich.console import Group
from rich.table import Table
from rich.text import Text

from pipeline.models import load_tokenizer
from storage.errors import LopdUserError
from storage.inspect import iter_readable
from storage.shardset import ShardSet

# where each kind of shard set records the model whose tokenizer wrote its ids
_TOKENIZER_DIR = {"teacher_topk": "teacher_dir", "samples": "model_dir"}


def shard_tokenizer(path: Path, tokenizer: Path | None = None) -> Any:
    """The tokenizer of the shard set at ``path``: ``tokenizer`` if given, else the model dir in its provenance."""
    if tokenizer is None:
        shards = ShardSet.open(Path(path))
        recorded = shards.metadata.get("provenance", {}).get(_TOKENIZER_DIR.get(shards.kind, ""))
        if recorded is None or not Path(recorded).is_dir():
            where = f"records {recorded}, which does not exist" if recorded else "records no model directory"
            raise LopdUserError(f"{path}: the shard set {where}; pass --tokenizer DIR (a model directory whose "
                                "tokenizer wrote the ids)")
        tokenizer = Path(recorded)
    return load_tokenizer(tokenizer)


def token_texts(tokenizer: Any) -> Callable[[int], str]:
    """id -> the text that id decodes to alone (cached: a shard repeats its ids)."""
    cache: dict[int, str] = {}

    def text(token_id: int) -> str:
        if token_id not in cache:
            cache[token_id] = tokenizer.decode([token_id])
        return cache[token_id]

    return text


def with_token_text(tokenizer: Any) -> Callable[[pa.Table], pa.Table]:
    """A ``decorate`` for ``storage.inspect.export_readable``: adds ``tokens`` (list<string>, one per token id) and,
    for top-k shards, ``topk_tokens`` (list<list<string>>)."""
    text = token_texts(tokenizer)

    def decorate(table: pa.Table) -> pa.Table:
        table = table.append_column("tokens", pa.array(
            [[text(t) for t in ids] for ids in table["token_ids"].to_pylist()], pa.list_(pa.string())))
        if "topk_ids" in table.column_names:
            table = table.append_column("topk_tokens", pa.array(
                [[[text(t) for t in pos] for pos in row] for row in table["topk_ids"].to_pylist()],
                pa.list_(pa.list_(pa.string()))))
        return table

    return decorate


def _shown(s: str) -> str:
    """A token's text with its whitespace visible: spaces as ␣, control characters escaped, '' for nothing."""
    return repr(s)[1:-1].replace(" ", "␣") if s else "''"


def rollout_views(path: Path, tokenizer: Any, rows: int = 2, positions: int = 32, top: int = 5) -> list[Group]:
    """The first ``rows`` rollouts of a shard set as rich renderables: the prompt and response text, then per response
    position (up to ``positions``) the sampled token, its log-prob under the teacher and the rollout policy, and the
    teacher's ``top`` most likely tokens with their probabilities (top-k shards)."""
    text = token_texts(tokenizer)
    views = []
    for table in iter_readable(path, rows):
        for row in table.to_pylist():
            plen, ids = row["prompt_len"], row["token_ids"]
            reward = "" if row.get("reward") is None else f"  reward {row['reward']:g}"
            head = Text.assemble((f"{row['prompt_id']} / sample {row['sample_index']}", "bold"), reward, "\n",
                                 ("prompt: ", "dim"), tokenizer.decode(ids[:plen]), "\n",
                                 ("response: ", "dim"), tokenizer.decode(ids[plen:]))
            grid = Table(show_edge=False, pad_edge=False, box=None, header_style="bold")
            grid.add_column("t", justify="right")
            grid.add_column("sampled")
            teacher = "teacher_logprobs" in row
            if teacher:
                grid.add_column("teacher p", justify="right")
            grid.add_column("student p", justify="right")
            if teacher and row["topk_ids"] and row["topk_ids"][0]:
                k = len(row["topk_ids"][0])
                grid.add_column(f"teacher top-{min(top, k)} (p)")
                grid.add_column(f"outside top-{k}", justify="right")
            for t, token in enumerate(ids[plen:plen + positions]):
                cells = [str(t), _shown(text(token))]
                if teacher:
                    cells.append(f"{math.exp(row['teacher_logprobs'][t]):.3f}")
                cells.append(f"{math.exp(row['behavior_logprobs'][t]):.3f}")
                if teacher and row["topk_ids"][t]:
                    cells.append("  ".join(f"{_shown(text(i))} {math.exp(lp):.3f}" for i, lp in
                                           list(zip(row["topk_ids"][t], row["topk_logprobs"][t]))[:top]))
                    cells.append(f"{math.exp(row['tail_logprob'][t]):.3f}")
                grid.add_row(*cells)
            more = len(ids) - plen - positions
            views.append(Group(head, grid, *([Text(f"... {more} more positions", style="dim")] if more > 0 else []),
                               Text("")))
    return views
