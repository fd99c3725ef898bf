"""Pieces every stage shares: the result object, logging, progress bars, per-shard seeds."""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

log = logging.getLogger("lopd")


@dataclass
class StageResult:
    """What a stage did: where its output is, whether it was already complete, and its counts."""

    stage: str
    out: Path
    skipped: bool = False
    wall_seconds: float = 0.0
    summary: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "out": str(self.out), "skipped": self.skipped,
                "wall_seconds": round(self.wall_seconds, 3), **self.summary}


def shard_seed(seed: int, shard_index: int) -> int:
    """A shard's own seed, so a redone shard samples exactly what the first attempt would have."""
    return (seed * 1_000_003 + shard_index * 7919) % (2**31 - 1)


def progress_bar(disable: bool = False) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn(),
        disable=disable, transient=False,
    )


@contextmanager
def timed() -> Iterator[dict[str, float]]:
    box = {"start": time.perf_counter(), "seconds": 0.0}
    try:
        yield box
    finally:
        box["seconds"] = time.perf_counter() - box["start"]


def chunks(n: int, size: int) -> list[range]:
    return [range(i, min(i + size, n)) for i in range(0, n, size)]
