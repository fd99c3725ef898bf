"""Where a rank's batches come from: the shard stream, several shard sets mixed by weight, or a live teacher
(the online baseline); prepared ahead on a background thread."""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from pipeline.config import TOPK_LOSSES, EngineConfig, OnlineConfig, ScaleConfig, TrainConfig
from pipeline.engines.hf import HFEngine
from pipeline.models import encode_prompt, load_tokenizer
from pipeline.prompts import load_prompts
from pipeline.train.batching import Batch, Example, prepare_examples, prepare_step
from pipeline.train.distributed import DistInfo, all_reduce_sum
from pipeline.train.weighting import RolloutTable, source_key
from storage.errors import LopdUserError
from storage.prefetch import prefetch
from storage.reader import ReaderState, iter_batches
from storage.records import TeacherRecord


class OnlineBatches:
    """The online OPD baseline's data: each call samples fresh rollouts from the current student and has a
    live teacher score them (same record type as the shards, so the same losses apply)."""

    def __init__(self, online: OnlineConfig, student: torch.nn.Module, student_dir: Path, k: int, seed: int,
                 rank: int = 0):
        self.cfg = online
        self.tokenizer = load_tokenizer(student_dir)
        self.student_engine = HFEngine(str(student_dir), EngineConfig(batch_size=512), model=student)
        self.teacher_engine = HFEngine(str(online.teacher), EngineConfig(batch_size=512))
        self.prompts = load_prompts(online.prompts)
        self.prompt_ids = [encode_prompt(self.tokenizer, p.prompt, online.use_chat_template, p.messages)
                           for p in self.prompts]
        self.k = k
        self.rng = random.Random(seed + 1_000_003 * rank)  # each data-parallel rank draws its own prompts
        self.sample_seed = online.sampling.seed + 1_000_003 * rank
        self.calls = 0
        self.sample_seconds = 0.0
        self.score_seconds = 0.0

    def state_dict(self) -> dict[str, Any]:
        """Where the sampler is: a resumed run draws the prompts and samples the uninterrupted run would."""
        return {"rng": self.rng.getstate(), "calls": self.calls,
                "sample_seconds": self.sample_seconds, "score_seconds": self.score_seconds}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.setstate(state["rng"])
        self.calls = state["calls"]
        self.sample_seconds, self.score_seconds = state["sample_seconds"], state["score_seconds"]

    def close(self) -> None:
        self.student_engine.close()  # drops the engine's reference only: the student itself is the run's
        self.teacher_engine.close()

    def next_records(self, n: int, parts: int) -> list[TeacherRecord]:
        """``parts`` sampling rounds of ``n / parts`` sequences (fresh prompts each round)."""
        return [r for _ in range(parts) for r in self.next(n // parts)]

    def next(self, n_sequences: int) -> list[TeacherRecord]:
        n_prompts = max(1, n_sequences // self.cfg.sampling.n)
        chosen = [self.rng.randrange(len(self.prompts)) for _ in range(n_prompts)]
        was_training = self.student_engine.model.training
        self.student_engine.model.eval()
        t0 = time.perf_counter()
        gens = self.student_engine.generate([self.prompt_ids[i] for i in chosen],
                                            self.cfg.sampling.model_copy(
                                                update={"seed": self.sample_seed + self.calls}))
        t1 = time.perf_counter()
        self.student_engine.model.train(was_training)
        seqs, starts, meta = [], [], []
        for i, samples in zip(chosen, gens):
            for j, g in enumerate(samples):
                seqs.append(self.prompt_ids[i] + g.response_ids)
                starts.append(len(self.prompt_ids[i]))
                meta.append((i, j, g))
        scored = self.teacher_engine.score(seqs, starts, self.k)
        self.sample_seconds += t1 - t0
        self.score_seconds += time.perf_counter() - t1
        self.calls += 1
        return [TeacherRecord(prompt_id=self.prompts[i].id, sample_index=j,
                              token_ids=np.asarray(seq, dtype=np.int32), prompt_len=start,
                              teacher_logprobs=sc.token_logprobs,
                              behavior_logprobs=np.asarray(g.logprobs, dtype=np.float32),
                              topk_ids=sc.topk_ids, topk_logprobs=sc.topk_logprobs, tail_logprob=sc.tail_logprob,
                              reward=None)
                for (i, j, g), seq, start, sc in zip(meta, seqs, starts, scored)][:n_sequences]


class BatchSource(Protocol):
    """Where a rank's records come from: the shard reader (offline) or the live sampler (online). A source that
    prepares its steps itself (the shard sources given ``pad_id``: split and collated ahead, on the prefetch
    thread) says so with ``prepared = True`` and has ``next_micro_batches(n, parts) -> list[Batch]`` instead;
    ``step_micro_batches`` reads either kind."""

    def next_records(self, n: int, parts: int) -> list[TeacherRecord]:
        """This rank's ``n`` records of the next step (``parts``: the micro-batches they were drawn as)."""

    def state_dict(self) -> dict[str, Any]:
        """The stream position, saved per rank in checkpoints."""

    def close(self) -> None:
        """Stop background decoding and free engines; the run calls it when it ends, on error too."""


def step_micro_batches(source: BatchSource, cfg: TrainConfig, n: int, pad_id: int,
                       rollouts: RolloutTable | None = None) -> list[Batch]:
    """The next step's ``n`` records of this rank as micro-batches: as the source prepared them (then the wait is
    only on its queue), or its records through ``prepare_step`` here."""
    if getattr(source, "prepared", False):
        return source.next_micro_batches(n, cfg.grad_accum)  # type: ignore[attr-defined]
    return prepare_step(source.next_records(n, cfg.grad_accum), cfg, pad_id, rollouts,
                        torch.cuda.current_device() if torch.cuda.is_available() else 0)


class StepBatches:
    """What the loop reads of an OPD source: each step's ``n`` records of this rank as micro-batches
    (``step_micro_batches``), the source's state for checkpoints and its metrics at log steps (the mixed sources'
    draw counts, a collective: every rank calls it; the online baseline's sampling and scoring time)."""

    def __init__(self, source: BatchSource, cfg: TrainConfig, n: int, pad_id: int,
                 rollouts: RolloutTable | None = None):
        self.source, self.cfg, self.n, self.pad_id, self.rollouts = source, cfg, n, pad_id, rollouts

    def next_step(self) -> list[Batch]:
        return step_micro_batches(self.source, self.cfg, self.n, self.pad_id, self.rollouts)

    def state_dict(self) -> dict[str, Any]:
        return self.source.state_dict()

    def metrics(self, info: DistInfo) -> dict[str, float]:
        if isinstance(self.source, MixedShardBatches):
            return self.source.metrics(info)
        if isinstance(self.source, OnlineBatches):
            return {"perf/sample_seconds": round(self.source.sample_seconds, 3),
                    "perf/score_seconds": round(self.source.score_seconds, 3)}
        return {}

    def close(self) -> None:
        self.source.close()


class ExampleBatches:
    """The SFT source: every rank reads the same deterministic stream of ``(token_ids, prompt_len)`` examples,
    takes every world_size-th example of each global batch of ``batch_size`` and forms its micro-batches
    (``prepare_examples``: by count or token budget, packed or padded). The position is global (steps x batch
    size), so a checkpoint resumes under another world size: ``start_step`` skips what was consumed."""

    def __init__(self, examples: Iterator[Example], cfg: ScaleConfig, batch_size: int, pad_id: int, info: DistInfo,
                 start_step: int = 0):
        self.examples, self.cfg, self.batch_size, self.pad_id, self.info = examples, cfg, batch_size, pad_id, info
        for _ in range(start_step * batch_size):
            next(examples)

    def next_step(self) -> list[Batch]:
        batch = [next(self.examples) for _ in range(self.batch_size)][self.info.rank :: self.info.world_size]
        return prepare_examples(batch, self.cfg, self.pad_id)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def metrics(self, info: DistInfo) -> dict[str, float]:
        return {}

    def close(self) -> None:
        pass


class _StepStream:
    """What the shard sources share: their stream of ``(records, state)`` steps, each prepared for ``train_step``
    (``prepare_step``) when the source is given ``pad_id``, and produced ``cfg.prefetch_batches`` steps ahead on a
    background thread (``storage.prefetch``) when that is > 0, so decoding, splitting and collating overlap the
    step, which waits (StepMeter's data wait) only on the queue. Each step comes with the state after it: a
    checkpoint holds the position of the last step used, whatever was prepared ahead, and resumes exactly. Without
    ``pad_id`` the steps stay records, read with ``next_records`` (tests, tools looking at the stream)."""

    steps: Iterator[tuple[Any, Any]]
    prepared: bool

    def _start(self, steps: Iterator[tuple[list[TeacherRecord], Any]], cfg: TrainConfig, pad_id: int | None,
               rollouts: RolloutTable | None, device_index: int) -> None:
        self.prepared = pad_id is not None
        if pad_id is not None:
            steps = ((prepare_step(records, cfg, pad_id, rollouts, device_index), state) for records, state in steps)
        self.steps = prefetch(steps, cfg.prefetch_batches) if cfg.prefetch_batches else steps

    def _next(self, prepared: bool) -> tuple[Any, Any]:
        if prepared != self.prepared:
            raise RuntimeError("this source was made " + ("with pad_id: read next_micro_batches" if self.prepared
                                                          else "without pad_id: read next_records"))
        return next(self.steps)

    def close(self) -> None:
        self.steps.close()  # ends the prefetch thread, if any


class ShardBatches(_StepStream):
    """The offline source: this rank's slice of the shuffled, resumable shard stream, one step (``grad_accum``
    reader batches of ``micro`` records) at a time. The top-k columns are read only when a loss of the run
    needs them. Given ``pad_id`` (and the prompt statistics ``rollouts``, if any) it hands out each step split and
    collated (``next_micro_batches``), prepared ahead on the prefetch thread with ``cfg.prefetch_batches`` > 0;
    the state is the reader state after the step (``_StepStream``)."""

    def __init__(self, cfg: TrainConfig, info: DistInfo, micro: int, start: ReaderState | None,
                 pad_id: int | None = None, rollouts: RolloutTable | None = None):
        stream = iter_batches(cfg.sources()[0].path, micro, seed=cfg.seed, shuffle_buffer=cfg.shuffle_buffer,
                              rank=info.rank, world_size=info.world_size, start=start,
                              need_topk=bool(cfg.all_losses() & TOPK_LOSSES))
        self._start(self._steps(stream, cfg.grad_accum), cfg, pad_id, rollouts, info.local_rank)
        self.position: ReaderState | None = start

    @staticmethod
    def _steps(stream: Iterator[tuple[list[TeacherRecord], ReaderState]], parts: int
               ) -> Iterator[tuple[list[TeacherRecord], ReaderState]]:
        while True:
            records: list[TeacherRecord] = []
            for _ in range(parts):
                batch, position = next(stream)
                records.extend(batch)
            yield records, position

    def next_records(self, n: int, parts: int) -> list[TeacherRecord]:
        """The next step's records; ``parts`` x ``micro`` = ``n``, both fixed when the source was made."""
        records, self.position = self._next(prepared=False)
        return records

    def next_micro_batches(self, n: int, parts: int) -> list[Batch]:
        """The next step's micro-batches (``prepare_step`` of its records), when made with ``pad_id``."""
        batches, self.position = self._next(prepared=True)
        return batches

    def state_dict(self) -> dict[str, Any]:
        return {"reader": self.position.to_dict() if self.position is not None else None}


def mixed_draws(weights: list[float], counts: list[int], n: int) -> list[int]:
    """The sources of the next ``n`` records of a weighted mix, given the records drawn from each so far.

        draw m goes to argmax_s ((m + 1) w_s - c_s)      (w normalised to sum 1; ties to the first source)

    with c_s the records source s has had before it: each draw goes to the source furthest behind its share (a
    smooth weighted round robin), so after any m draws every c_s is within one record of m w_s, deterministically
    (a resumed stream continues from the counts alone). ``counts`` is updated in place."""
    total = sum(weights)
    shares = [w / total for w in weights]
    out = []
    for _ in range(n):
        m = sum(counts) + 1
        s = max(range(len(shares)), key=lambda i: (m * shares[i] - counts[i], -i))
        counts[s] += 1
        out.append(s)
    return out


class MixedShardBatches(_StepStream):
    """The offline source over several shard sets (``train.shards`` as a list, e.g. one teacher per domain): each
    step's records are drawn one at a time from the sources by ``mixed_draws`` (exact shares of the weights), each
    source being this rank's slice of its own shuffled, resumable stream (``iter_batches``, one record at a
    time). The state after a step holds each source's reader state and its counts of records and response tokens,
    so a resumed run draws exactly what the uninterrupted one would have; ``metrics`` reports the counts as
    ``source/<name>/records``, ``source/<name>/tokens`` and ``source/<name>/frac`` (share of the records). Given
    ``pad_id`` it hands out each step split and collated, prepared ahead as ``ShardBatches`` does (``_StepStream``)."""

    def __init__(self, cfg: TrainConfig, info: DistInfo, micro: int, start: dict[str, Any] | None,
                 pad_id: int | None = None, rollouts: RolloutTable | None = None):
        sources = cfg.sources()
        self.labels = [src.label for src in sources]
        self.weights = [src.weight for src in sources]
        state = start or {"readers": {label: None for label in self.labels},
                          "records": {label: 0 for label in self.labels},
                          "tokens": {label: 0 for label in self.labels}}
        if sorted(state["readers"]) != sorted(self.labels):
            raise LopdUserError(f"cannot resume: the checkpoint mixes sources {sorted(state['readers'])}, this run "
                                f"{sorted(self.labels)}; use a new train.out")
        need_topk = bool(cfg.all_losses() & TOPK_LOSSES)
        streams = [iter_batches(src.path, 1, seed=cfg.seed, shuffle_buffer=cfg.shuffle_buffer, rank=info.rank,
                                world_size=info.world_size, need_topk=need_topk,
                                start=ReaderState.from_dict(r) if (r := state["readers"][src.label]) else None)
                   for src in sources]
        self._start(self._steps(streams, state, micro * cfg.grad_accum), cfg, pad_id, rollouts, info.local_rank)
        self.state = state

    def _steps(self, streams: list[Iterator[tuple[list[TeacherRecord], ReaderState]]], state: dict[str, Any],
               n: int) -> Iterator[tuple[list[TeacherRecord], dict[str, Any]]]:
        readers, records, tokens = dict(state["readers"]), dict(state["records"]), dict(state["tokens"])
        while True:
            counts = [records[label] for label in self.labels]
            batch = []
            for s in mixed_draws(self.weights, counts, n):
                (record,), position = next(streams[s])
                label = self.labels[s]
                readers[label] = position.to_dict()
                records[label] += 1
                tokens[label] += len(record.teacher_logprobs)
                # prompt ids as the merged prompt statistics key them (sets may reuse ids)
                batch.append(dataclasses.replace(record, prompt_id=source_key(label, record.prompt_id)))
            yield batch, {"readers": dict(readers), "records": dict(records), "tokens": dict(tokens)}

    def next_records(self, n: int, parts: int) -> list[TeacherRecord]:
        """The next step's ``n`` records (``micro`` x ``grad_accum``, fixed when the source was made)."""
        records, self.state = self._next(prepared=False)
        return records

    def next_micro_batches(self, n: int, parts: int) -> list[Batch]:
        """The next step's micro-batches (``prepare_step`` of its records), when made with ``pad_id``."""
        batches, self.state = self._next(prepared=True)
        return batches

    def state_dict(self) -> dict[str, Any]:
        return self.state

    def metrics(self, info: DistInfo) -> dict[str, float]:
        """Records and response tokens drawn from each source so far (summed over ranks: call on every rank)."""
        local = [float(self.state[key][label]) for label in self.labels for key in ("records", "tokens")]
        totals = all_reduce_sum(torch.tensor(local, dtype=torch.float64), info).tolist()
        all_records = sum(totals[0::2])
        out: dict[str, float] = {}
        for i, label in enumerate(self.labels):
            out[f"source/{label}/records"] = int(totals[2 * i])
            out[f"source/{label}/tokens"] = int(totals[2 * i + 1])
            out[f"source/{label}/frac"] = round(totals[2 * i] / max(all_records, 1), 6)
        return out
