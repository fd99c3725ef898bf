"""Eval: answer held-out prompts with the chosen engine and grade them with the task checker.

Reports, as configured (``AccuracyConfig``): greedy pass@1 (``eval.greedy``), and over ``eval.samples.n`` sampled
answers per problem avg@n, the unbiased pass@k and the majority vote maj@k for each k in ``eval.ks``
(``pipeline/eval_metrics.py``). Writes ``eval.json``, ``eval.md`` and ``eval_problems.jsonl`` (per problem and
decoding: the grade and the extracted answer of every sample).

The top-level ``pass@1`` of a result is greedy decoding's accuracy when ``greedy`` is on, else the sampled
estimate (= avg@n); the sampled one is always in ``result["sampled"]["pass@1"]`` when 1 is among the ks.
``evaluation_hook`` turns the same measurement into the trainers' eval hook (``train.eval`` / ``sft.eval``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Hashable

import torch

from pipeline.config import AccuracyConfig, EngineConfig, EvalConfig, SamplingConfig, TrainingEvalConfig
from pipeline.engines import make_engine
from pipeline.engines.base import Engine
from pipeline.engines.hf import HFEngine
from pipeline.eval_metrics import default_ks, summarise
from pipeline.models import encode_prompt, load_tokenizer
from pipeline.progress import log
from pipeline.prompts import PromptFileError, PromptRecord, load_prompts
from pipeline.stages.common import StageResult, require_model_dir, timed
from pipeline.tasks import arithmetic
from pipeline.tasks.checkers import get_checker
from pipeline.tracking import check_installed, open_trackers
from storage.errors import LopdUserError


def _math_answer(response: str) -> str | None:
    from math_verify import parse

    parsed = parse(response)
    return str(parsed[-1]) if parsed else None


# The final answer a checker grades, for the majority vote (maj@k): None when the response has none.
ANSWER_EXTRACTORS: dict[str, Callable[[str], Hashable | None]] = {
    "arithmetic": arithmetic.extract_answer,
    "math": _math_answer,
}


def score_answers(engine: Engine, tokenizer: Any, prompts: list[PromptRecord], checker_name: str,
                  sampling: SamplingConfig, use_chat_template: bool = True,
                  ks: list[int] | None = None) -> dict[str, Any]:
    """Accuracy of one decoding setting over ``sampling.n`` answers per prompt: counts, avg@n, and pass@k / maj@k
    for each k in ``ks`` (default ``default_ks(n)``)."""
    checker = get_checker(checker_name)
    extract = ANSWER_EXTRACTORS.get(checker_name)
    ids = [encode_prompt(tokenizer, p.prompt, use_chat_template, p.messages) for p in prompts]
    gens = engine.generate(ids, sampling)
    correct: list[list[bool]] = []
    votes: list[list[Hashable | None]] = []
    for p, samples in zip(prompts, gens):
        texts = [tokenizer.decode(g.response_ids, skip_special_tokens=True) for g in samples]
        correct.append([bool(checker(t, p.answer or "")) for t in texts])
        votes.append([extract(t) if extract else t.strip() for t in texts])
    ks = ks or default_ks(sampling.n)
    total = sum(len(r) for r in correct)
    hits = sum(sum(r) for r in correct)
    problems = [{"id": p.id, "correct": c, "answers": [None if v is None else str(v) for v in v_]}
                for p, c, v_ in zip(prompts, correct, votes)]
    return {"n": sampling.n, "prompts": len(prompts), "samples": total, "correct": hits, "ks": ks,
            "avg": hits / total, "pass": sum(any(r) for r in correct) / len(prompts), **summarise(correct, votes, ks),
            "problems": problems}


def evaluate(engine: Engine, tokenizer: Any, prompts: list[PromptRecord], *, checker: str, max_new_tokens: int,
             samples: SamplingConfig | None = None, use_chat_template: bool = True, greedy: bool = True,
             ks: list[int] | None = None) -> dict[str, Any]:
    """Greedy pass@1 (``greedy``) and, with ``samples``, avg@n, pass@k and maj@k: the headline numbers at the top
    level, the counts under ``greedy`` / ``sampled``, each problem's grades and extracted answers under
    ``problems``."""
    result: dict[str, Any] = {"problems": {}}
    if samples is not None:
        sampled = score_answers(engine, tokenizer, prompts, checker, samples, use_chat_template, ks)
        result["problems"]["sampled"] = sampled.pop("problems")
        result.update({key: v for key, v in sampled.items() if "@" in key})
        result["sampled"] = sampled
    if greedy:
        scored = score_answers(engine, tokenizer, prompts, checker,
                               SamplingConfig(n=1, temperature=0.0, max_new_tokens=max_new_tokens),
                               use_chat_template)
        result["problems"]["greedy"] = scored.pop("problems")
        result["pass@1"] = scored["avg"]
        result["greedy"] = {k: v for k, v in scored.items() if k in ("n", "prompts", "samples", "correct", "avg")}
    return result


def measure(engine: Engine, tokenizer: Any, prompts: list[PromptRecord], cfg: AccuracyConfig) -> dict[str, Any]:
    return evaluate(engine, tokenizer, prompts, checker=cfg.checker, max_new_tokens=cfg.max_new_tokens,
                    samples=cfg.samples, use_chat_template=cfg.use_chat_template, greedy=cfg.greedy, ks=cfg.ks)


def markdown_table(rows: dict[str, dict[str, Any]]) -> str:
    """A Markdown table of accuracy per model (rows: name -> eval result)."""
    order = {"pass": 0, "avg": 1, "maj": 2}
    metrics = sorted({k for r in rows.values() for k in r if "@" in k},
                     key=lambda k: (order.get(k.split("@")[0], 3), int(k.split("@")[1])))
    lines = ["| model | " + " | ".join(metrics) + " | correct / total |", "|---|" + "---|" * len(metrics) + "---|"]
    for name, r in rows.items():
        vals = " | ".join(f"{r[m]:.3f}" if m in r else "–" for m in metrics)
        counts = r.get("greedy") or r["sampled"]
        lines.append(f"| {name} | {vals} | {counts['correct']} / {counts['samples']} |")
    return "\n".join(lines) + "\n"


def load_eval_prompts(cfg: EvalConfig | TrainingEvalConfig, field: str) -> list[PromptRecord]:
    """The prompts of an evaluation, each with its answer (refused naming the first without one)."""
    path = cfg.prompts
    prompts = load_prompts(path, cfg.limit, cfg.prompt_fields, cfg.prompt_split)
    missing = [p.id for p in prompts if p.answer is None]
    if missing:
        raise PromptFileError(f"{field}: {path}: evaluation needs an 'answer' for every prompt; missing for id "
                              f"{missing[0]} (and {len(missing) - 1} more); add the answers or use another prompts "
                              "file")
    return prompts


def run_eval(cfg: EvalConfig, show_progress: bool = True) -> StageResult:
    require_model_dir(cfg.model, field="eval.model", made_by="lopd train")
    check_installed(cfg.report_to, "eval")
    prompts = load_eval_prompts(cfg, "eval.prompts")
    tokenizer = load_tokenizer(cfg.model)
    engine = make_engine(str(cfg.model), cfg.engine)
    with timed() as t:
        result = measure(engine, tokenizer, prompts, cfg)
    engine.close()
    result.update({"model": str(cfg.model), "prompts_file": str(cfg.prompts), "wall_seconds": t["seconds"]})
    cfg.out.mkdir(parents=True, exist_ok=True)
    problems = result.pop("problems")
    with (cfg.out / "eval_problems.jsonl").open("w") as f:
        for mode, rows in problems.items():
            for row in rows:
                f.write(json.dumps({"decoding": mode, **row}) + "\n")
    (cfg.out / "eval.json").write_text(json.dumps(result, indent=2))
    (cfg.out / "eval.md").write_text(markdown_table({Path(cfg.model).name: result}))
    with open_trackers(cfg.report_to, cfg.out, cfg.run_name or cfg.out.name, cfg.model_dump(mode="json"),
                       field="eval") as trackers:
        trackers.log({"step": 0, **{f"eval/{k}": v for k, v in result.items() if "@" in k}})
    log.info("eval: %s %s", cfg.model, ", ".join(f"{k} {v:.3f}" for k, v in result.items() if "@" in k))
    return StageResult("eval", cfg.out, wall_seconds=t["seconds"],
                       summary={k: v for k, v in result.items() if "@" in k})


def evaluation_hook(cfg: TrainingEvalConfig, model_dir: Path,
                    field: str) -> Callable[[torch.nn.Module], dict[str, float]]:
    """The trainers' eval hook for ``cfg`` (``train.eval`` / ``sft.eval``): the in-memory model answers the held-out
    prompts with the hf engine; returns ``eval/<metric>`` (``eval/pass@1``, ``eval/avg@n``, ...). The prompts are
    read, and refused, before training starts."""
    prompts = load_eval_prompts(cfg, f"{field}.prompts")
    get_checker(cfg.checker)
    tokenizer = load_tokenizer(model_dir)

    def hook(model: torch.nn.Module) -> dict[str, float]:
        was_training = model.training
        engine = HFEngine(str(model_dir), EngineConfig(batch_size=cfg.batch_size), model=model)
        result = measure(engine, tokenizer, prompts, cfg)
        model.train(was_training)
        return {f"eval/{k}": v for k, v in result.items() if "@" in k}

    return hook


def training_evaluation(cfg: Any, field: str) -> tuple[Callable[[torch.nn.Module], dict[str, float]] | None,
                                                      int | None]:
    """``(hook, every)`` of a trainer config's ``eval`` section (``sft.eval`` / ``train.eval``), or ``(None, None)``.
    Accuracy is logged with the step's metrics, so ``every`` must be a multiple of ``log_every``."""
    if cfg.eval is None:
        return None, None
    if cfg.eval.every % cfg.log_every:
        raise LopdUserError(f"{field}.eval.every={cfg.eval.every} must be a multiple of {field}.log_every="
                            f"{cfg.log_every} (accuracy is logged with that step's metrics)")
    return evaluation_hook(cfg.eval, cfg.student, f"{field}.eval"), cfg.eval.every
