"""pipeline/demo/schedule.py: steps run once their inputs exist, in order in one process or on worker processes."""

from __future__ import annotations

import json
import multiprocessing
import time
from concurrent.futures import Executor, Future
from pathlib import Path
from typing import Any

import pytest

from pipeline.demo.schedule import check_order, process_pool, ready_steps, run_steps

NEEDS = {"data": (), "sft": ("data",), "rollouts": ("sft",), "online": ("sft",), "score": ("rollouts",),
         "topk": ("score",), "curve_data": (), "curve": ("sft", "curve_data")}


def _record(log_dir: str, step: str, fail: str = "", together: Any = None) -> str:
    """A worker's step: its start and end times in a file of its own. The two steps that need nothing wait for
    each other at ``together`` (a barrier): they pass only if two workers run them at once."""
    start = time.time()
    if step == fail:
        raise RuntimeError(f"step {step} broke")
    if together is not None and not NEEDS[step]:
        together.wait(timeout=60)
    time.sleep(0.1)
    Path(log_dir, f"{step}.json").write_text(json.dumps({"start": start, "end": time.time()}))
    return step.upper()


def test_check_order_refuses_a_step_listed_before_what_it_needs():
    check_order(NEEDS)
    with pytest.raises(ValueError, match="step 'sft' needs \\['data'\\]"):
        check_order({"sft": ("data",), "data": ()})
    with pytest.raises(ValueError, match="needs \\['nowhere'\\]"):
        check_order({"a": ("nowhere",)})


def test_ready_steps_follow_the_listing_and_skip_what_started():
    assert ready_steps(NEEDS, done=set(), started=set()) == ["data", "curve_data"]
    assert ready_steps(NEEDS, done={"data"}, started={"data", "curve_data"}) == ["sft"]
    assert ready_steps(NEEDS, done={"data", "sft", "curve_data"}, started={"data", "sft", "curve_data"}) == [
        "rollouts", "online", "curve"]


def test_in_process_run_is_the_listing_order():
    seen: list[str] = []
    out = run_steps(NEEDS, None, lambda s: seen.append(s) or s.upper(), None, 1, lambda s, r: seen.append(f"+{r}"))
    assert list(out) == list(NEEDS) and out["topk"] == "TOPK"
    assert seen == [x for s in NEEDS for x in (s, f"+{s.upper()}")]


def test_workers_start_a_step_only_after_its_needs_and_run_independent_steps_at_once(tmp_path):
    done_order: list[str] = []

    with multiprocessing.Manager() as manager, process_pool(2) as pool:
        together = manager.Barrier(2)

        def submit(pool: Executor, step: str) -> Future[str]:
            return pool.submit(_record, str(tmp_path), step, "", together)

        out = run_steps(NEEDS, submit, lambda s: "unused", pool, 2, lambda s, r: done_order.append(s))
    assert list(out) == list(NEEDS) and out == {s: s.upper() for s in NEEDS}
    times = {s: json.loads((tmp_path / f"{s}.json").read_text()) for s in NEEDS}
    for step, needs in NEEDS.items():
        for need in needs:
            assert times[step]["start"] >= times[need]["end"], (step, need)
    # never more than two at once (data and curve_data met at the barrier: they ran at the same time)
    events = sorted([(t["start"], 1) for t in times.values()] + [(t["end"], -1) for t in times.values()])
    running = peak = 0
    for _, delta in events:
        running += delta
        peak = max(peak, running)
    assert peak == 2
    assert sorted(done_order) == sorted(NEEDS)


def test_a_failing_step_stops_the_run_and_its_dependents_never_start(tmp_path):
    def submit(pool: Executor, step: str) -> Future[str]:
        return pool.submit(_record, str(tmp_path), step, "rollouts")

    with process_pool(2) as pool, pytest.raises(RuntimeError, match="step rollouts broke"):
        run_steps(NEEDS, submit, lambda s: "unused", pool, 2)
    assert not (tmp_path / "score.json").exists() and not (tmp_path / "topk.json").exists()
