"""Eval: answer held-out prompts with the chosen engine and grade them with the task checker.

Reports pass@1 from greedy decoding and, when sampling is configured, avg@n (mean accuracy over n samples)
and pass@n (any of n correct), with counts. Writes ``eval.json`` and ``eval.md``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.config import EvalConfig, SamplingConfig
from pipeline.engines import make_engine
from pipeline.engines.base import Engine
from pipeline.models import encode_prompt, load_tokenizer
from pipeline.progress import log
from pipeline.prompts import PromptFileError, PromptRecord, load_prompts
from pipeline.stages.common import StageResult, require_model_dir, timed
from pipeline.tasks.checkers import get_checker


def score_answers(engine: Engine, tokenizer: Any, prompts: list[PromptRecord], checker_name: str,
                  sampling: SamplingConfig, use_chat_template: bool = True) -> dict[str, Any]:
    """Accuracy of one decoding setting: avg@n and pass@n over ``sampling.n`` answers per prompt."""
    checker = get_checker(checker_name)
    ids = [encode_prompt(tokenizer, p.prompt, use_chat_template) for p in prompts]
    gens = engine.generate(ids, sampling)
    per_prompt = []
    for p, samples in zip(prompts, gens):
        per_prompt.append([checker(tokenizer.decode(g.response_ids, skip_special_tokens=True), p.answer or "")
                           for g in samples])
    total = sum(len(r) for r in per_prompt)
    correct = sum(sum(r) for r in per_prompt)
    return {"n": sampling.n, "prompts": len(prompts), "samples": total, "correct": correct,
            "avg": correct / total, "pass": sum(any(r) for r in per_prompt) / len(prompts)}


def evaluate(engine: Engine, tokenizer: Any, prompts: list[PromptRecord], *, checker: str, max_new_tokens: int,
             samples: SamplingConfig | None = None, use_chat_template: bool = True) -> dict[str, Any]:
    greedy = score_answers(engine, tokenizer, prompts, checker,
                           SamplingConfig(n=1, temperature=0.0, max_new_tokens=max_new_tokens), use_chat_template)
    result: dict[str, Any] = {"pass@1": greedy["avg"], "greedy": greedy}
    if samples is not None:
        sampled = score_answers(engine, tokenizer, prompts, checker, samples, use_chat_template)
        result[f"avg@{samples.n}"] = sampled["avg"]
        result[f"pass@{samples.n}"] = sampled["pass"]
        result["sampled"] = sampled
    return result


def markdown_table(rows: dict[str, dict[str, Any]]) -> str:
    """A Markdown table of accuracy per model (rows: name -> eval result)."""
    metrics = sorted({k for r in rows.values() for k in r if "@" in k}, key=lambda k: (k.split("@")[0] != "pass", k))
    lines = ["| model | " + " | ".join(metrics) + " | correct / total (greedy) |",
             "|---|" + "---|" * len(metrics) + "---|"]
    for name, r in rows.items():
        vals = " | ".join(f"{r[m]:.3f}" if m in r else "–" for m in metrics)
        lines.append(f"| {name} | {vals} | {r['greedy']['correct']} / {r['greedy']['samples']} |")
    return "\n".join(lines) + "\n"


def run_eval(cfg: EvalConfig, show_progress: bool = True) -> StageResult:
    require_model_dir(cfg.model, field="eval.model", made_by="lopd train")
    prompts = load_prompts(cfg.prompts, cfg.limit)
    missing = [p.id for p in prompts if p.answer is None]
    if missing:
        raise PromptFileError(f"{cfg.prompts}: eval needs an 'answer' for every prompt; missing for id {missing[0]} "
                              f"(and {len(missing) - 1} more); add the answers or use another prompts file")
    tokenizer = load_tokenizer(cfg.model)
    engine = make_engine(str(cfg.model), cfg.engine)
    with timed() as t:
        result = evaluate(engine, tokenizer, prompts, checker=cfg.checker, max_new_tokens=cfg.max_new_tokens,
                          samples=cfg.samples, use_chat_template=cfg.use_chat_template)
    engine.close()
    result.update({"model": str(cfg.model), "prompts_file": str(cfg.prompts), "wall_seconds": t["seconds"]})
    cfg.out.mkdir(parents=True, exist_ok=True)
    (cfg.out / "eval.json").write_text(json.dumps(result, indent=2))
    (cfg.out / "eval.md").write_text(markdown_table({Path(cfg.model).name: result}))
    log.info("eval: %s pass@1 %.3f (%d/%d)", cfg.model, result["pass@1"], result["greedy"]["correct"],
             result["greedy"]["samples"])
    return StageResult("eval", cfg.out, wall_seconds=t["seconds"],
                       summary={k: v for k, v in result.items() if "@" in k})
