"""Run a plan's steps in dependency order, one at a time or on worker processes.

Every demo step after stage 3 (the OPD rows, the ablations, the SFT curve, the evals) depends only on files that
earlier steps wrote, so two steps can run at once in separate processes. Each worker pins its torch threads the
way the main process does, and every step seeds itself, so the numbers do not depend on how many workers ran them
(a test checks the trained weights byte for byte)."""

from __future__ import annotations

import multiprocessing
from concurrent.futures import FIRST_COMPLETED, Executor, Future, ProcessPoolExecutor, wait
from typing import Any, Callable, Mapping, TypeVar

R = TypeVar("R")


def check_order(needs: Mapping[str, tuple[str, ...]]) -> None:
    """Every dependency names a step listed before it, so the listing itself is a valid sequential order."""
    seen: set[str] = set()
    for step, deps in needs.items():
        missing = [d for d in deps if d not in seen]
        if missing:
            raise ValueError(f"step {step!r} needs {missing}, which are not steps listed before it")
        seen.add(step)


def ready_steps(needs: Mapping[str, tuple[str, ...]], done: set[str], started: set[str]) -> list[str]:
    """Steps not yet started whose dependencies are all done, in listing order (the listing is the priority)."""
    return [s for s, deps in needs.items() if s not in started and all(d in done for d in deps)]


def process_pool(workers: int, initializer: Callable[..., None] | None = None,
                 initargs: tuple[Any, ...] = ()) -> ProcessPoolExecutor:
    """Worker processes started fresh (spawn): no copy of the parent's torch state or open files."""
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=initializer,
                               initargs=initargs)


def run_steps(needs: Mapping[str, tuple[str, ...]], submit: Callable[[Executor, str], Future[R]] | None,
              run_here: Callable[[str], R], pool: Executor | None, workers: int,
              on_done: Callable[[str, R], None] = lambda step, result: None) -> dict[str, R]:
    """Run every step once its dependencies are done: in the listing order in this process when ``pool`` is None,
    else up to ``workers`` at a time through ``submit(pool, step)``. ``on_done`` sees each result as it arrives (in
    the main process). A step that fails stops the run: queued steps are cancelled, running ones finish, the error
    is raised. Returns the results in listing order."""
    check_order(needs)
    results: dict[str, R] = {}
    if pool is None:
        for step in needs:
            results[step] = run_here(step)
            on_done(step, results[step])
        return results
    assert submit is not None
    running: dict[Future[R], str] = {}
    started: set[str] = set()
    while len(results) < len(needs):
        for step in ready_steps(needs, set(results), started)[: max(workers - len(running), 0)]:
            running[submit(pool, step)] = step
            started.add(step)
        if not running:
            raise RuntimeError(f"no step can start: {sorted(set(needs) - started)} wait on steps that never finish")
        finished, _ = wait(running, return_when=FIRST_COMPLETED)
        for future in finished:
            step = running.pop(future)
            results[step] = future.result()  # re-raises a worker's error here
            on_done(step, results[step])
    return {step: results[step] for step in needs}
