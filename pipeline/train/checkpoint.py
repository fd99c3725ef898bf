"""One checkpoint format for every trainer (SFT, offline and online OPD): sharded, resumable, pruned.

Layout of ``<root>/step-000050/``:
    .metadata, __<rank>_0.distcp   model and optimiser state, written with ``torch.distributed.checkpoint``:
                                   each rank writes its own shards (FSDP2) or its share of the replicated
                                   tensors (DDP); nothing is gathered to one rank
    trainer.json                   step, run fingerprint, world size, counters, LR-scheduler state (main rank)
    rank-00000.pt ...              each rank's RNG state and data-stream position
``<root>/latest`` names the newest complete checkpoint. A checkpoint is written to ``.step-N.tmp`` and renamed
when every rank has finished, so a crash mid-save leaves the previous checkpoint as ``latest``.

DCP re-shards on load: the model and optimiser resume on any world size. The data stream's position is per
rank for the offline reader, so the OPD trainer refuses another world size (``Resumed.world_size``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist

from storage.errors import LopdUserError


def run_fingerprint(payload: Any) -> str:
    """The identity of a training run: a hash of what must not change across a resume (content fingerprints
    of the inputs and the settings that shape the optimisation; never paths)."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


@dataclass
class Resumed:
    """What a loaded checkpoint gives back besides the model and optimiser (restored in place)."""

    step: int
    trainer: dict[str, Any]  # trainer.json: counters and whatever the trainer stored there
    rank_state: dict[str, Any] | None  # this rank's file (None when the checkpoint had fewer ranks)
    world_size: int  # ranks that wrote the checkpoint


def _barrier(world_size: int) -> None:
    if world_size > 1:
        dist.barrier()


@contextlib.contextmanager
def _single_process_is_fine() -> Iterator[None]:
    """DCP warns that it assumes a single process when no process group exists: that is the intent here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to (save|load) in a single process.*")
        yield


def _dcp_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    return {"model": model_sd, "optim": optim_sd}


def save(root: Path, step: int, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
         run_key: str, trainer: dict[str, Any], rank_state: dict[str, Any], rank: int, world_size: int,
         keep_last: int | None = None) -> Path:
    """Write checkpoint ``step`` (a collective: every rank calls it). ``trainer`` is JSON, stored once;
    ``rank_state`` is this rank's own (RNG, stream position). ``keep_last`` prunes older checkpoints."""
    import torch.distributed.checkpoint as dcp

    root = Path(root)
    final, tmp = root / f"step-{step:06d}", root / f".step-{step:06d}.tmp"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    _barrier(world_size)
    with _single_process_is_fine():
        dcp.save(_dcp_state(model, optimizer), checkpoint_id=str(tmp))
    torch.save(rank_state, tmp / f"rank-{rank:05d}.pt")
    _barrier(world_size)
    if rank == 0:
        meta = {"step": step, "run_key": run_key, "world_size": world_size, "scheduler": scheduler.state_dict(),
                **trainer}
        (tmp / "trainer.json").write_text(json.dumps(meta, sort_keys=True))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        pointer = root / "latest.tmp"
        pointer.write_text(final.name)
        pointer.replace(root / "latest")
        if keep_last is not None:
            for old in sorted(root.glob("step-*"))[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    _barrier(world_size)
    return final


def latest_step(root: Path) -> int:
    """Step of the latest checkpoint under ``root`` (0 if none), without loading it."""
    pointer = Path(root) / "latest"
    return int(pointer.read_text().strip().removeprefix("step-")) if pointer.exists() else 0


def load_latest(root: Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                run_key: str, rank: int, what: str = "training") -> Resumed | None:
    """Restore model, optimiser and scheduler in place from the latest checkpoint (a collective), or return
    None when there is none. A checkpoint of another run (``run_key``) is refused with a clear error."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    root = Path(root)
    step = latest_step(root)
    if step == 0:
        return None
    path = root / f"step-{step:06d}"
    meta = json.loads((path / "trainer.json").read_text())
    if meta["run_key"] != run_key:
        raise LopdUserError(f"{root}: checkpoint was written by a different {what} run (another {what} config, data "
                            f"or start model: run {meta['run_key']} vs {run_key}); use a new output dir or delete "
                            f"{root} to start over")
    state = _dcp_state(model, optimizer)
    with _single_process_is_fine():
        dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    scheduler.load_state_dict(meta["scheduler"])
    rank_file = path / f"rank-{rank:05d}.pt"
    rank_state = torch.load(rank_file, weights_only=False) if rank_file.exists() else None
    return Resumed(step=step, trainer=meta, rank_state=rank_state, world_size=int(meta["world_size"]))


def prune_all(root: Path) -> None:
    """Remove every checkpoint (once the final model is the durable result)."""
    shutil.rmtree(root, ignore_errors=True)
