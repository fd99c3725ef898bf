"""The resolved config of a run and what ``lopd run`` would do with it.

``resolved_run_config`` is the run as the stages see it: every section of the file validated, with the defaults,
the conventional paths and every ``--set`` filled in (``lopd config show`` prints it; loading it again gives the
same config). ``plan_run`` says, per stage and without loading a model, whether ``lopd run`` would find its
output complete (skip), resume it, run it, or stop for a missing input:

- shard stages: the shard set's manifest (complete, expected shards) and, when complete, the settings recorded in
  its ``config.yaml`` and the fingerprint of the model that wrote it;
- ``sft`` / ``train``: the stage's own run key (``sft_identity`` / ``train_run_key``: fingerprints of the start
  model and data, and the settings), exactly the check the stage makes before it trains;
- ``eval``: never cached, always runs;
- a stage that reads the output of a stage that runs runs too.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from pipeline.config import STAGES, RunConfig
from pipeline.fingerprint import model_fingerprint, read_provenance
from pipeline.stages.common import read_stage_config, stage_config_path
from storage.shardset import ShardSet, ShardSetError

SHARD_STAGES = ("teacher_sft_data", "rollouts", "teacher_logprobs")
# the model whose fingerprint a shard stage's output records as ``model_fingerprint`` / ``teacher_fingerprint``
_WRITER = {"teacher_sft_data": ("teacher", "model_fingerprint"), "rollouts": ("student", "model_fingerprint"),
           "teacher_logprobs": ("teacher", "teacher_fingerprint")}
_COMMAND = {name: "lopd " + name.replace("_", "-") for name in STAGES}


def resolved_run_config(run: RunConfig) -> dict[str, Any]:
    """The run as its stages see it: ``run_dir``, ``seed`` and each section present, validated, defaults filled."""
    out: dict[str, Any] = {"run_dir": str(run.run_dir), "seed": run.seed}
    for name in STAGES:
        if name in run.sections:
            out[name] = run.stage(name).model_dump(mode="json")
    if "demo" in run.sections:
        out["demo"] = run.demo().model_dump(mode="json")
    if "prefect" in run.sections:
        out["prefect"] = run.sections["prefect"]
    return out


def dump_yaml(data: dict[str, Any]) -> str:
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False, width=120)


@dataclass
class StagePlan:
    """What ``lopd run`` would do with one stage: ``complete`` (skipped), ``resume``, ``run`` or ``blocked``."""

    stage: str
    status: str
    detail: str
    out: str


def changed_fields(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted names of the leaves that differ between two resolved configs (``a.b: old -> new``)."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [c for key in sorted(set(old) | set(new), key=str)
                for c in changed_fields(old.get(key), new.get(key), f"{prefix}{key}.")]
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} -> {new!r}"]


def _input_paths(cfg: BaseModel) -> list[tuple[str, Path]]:
    """Every path field a stage reads (``out`` excluded), nested sections and lists included."""
    paths: list[tuple[str, Path]] = []
    for name in type(cfg).model_fields:
        value = getattr(cfg, name)
        if isinstance(value, Path) and name != "out":
            paths.append((name, value))
        elif isinstance(value, BaseModel):
            paths += [(f"{name}.{n}", p) for n, p in _input_paths(value)]
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if isinstance(item, BaseModel):
                    paths += [(f"{name}[{i}].{n}", p) for n, p in _input_paths(item)]
    return paths


def _same_path(a: Path, b: Path) -> bool:
    return Path(a).resolve() == Path(b).resolve() or Path(b).resolve() in Path(a).resolve().parents


def _shard_settings(name: str, dump: dict[str, Any]) -> dict[str, Any]:
    """The settings of a shard stage that its shard set's identity records: not the paths (a moved run resumes;
    the models are compared by fingerprint), the parts, or the engine beyond its name (and dtype for scoring)."""
    kept = {k: v for k, v in dump.items() if k not in ("num_parts", "part")
            and not (isinstance(v, str) and k in ("prompts", "teacher", "student", "rollouts", "out"))}
    keep_engine = ("name", "dtype") if name == "teacher_logprobs" else ("name",)
    kept["engine"] = {k: v for k, v in dump.get("engine", {}).items() if k in keep_engine}
    return kept


def _known_to(recorded: dict[str, Any], current: dict[str, Any]) -> dict[str, Any]:
    """``current`` without the top-level fields a recorded config predates (a field added to lopd later means, at
    its default, what lopd did before it)."""
    return {k: v for k, v in current.items() if k in recorded}


def _shard_status(name: str, cfg: Any) -> tuple[str, str]:
    if not (Path(cfg.out) / "manifest.json").is_file():
        return "run", "no output yet"
    try:
        shards = ShardSet.open(Path(cfg.out))
    except ShardSetError as err:
        return "blocked", f"the output is damaged: {err}"
    fix = f"point {name}.out at a new directory or remove {cfg.out}"
    field, key = _WRITER[name]
    model = getattr(cfg, field)
    if (Path(model) / "config.json").is_file() and model_fingerprint(model) != shards.metadata.get(key):
        return "blocked", (f"{name}.{field} {model} is not the model that wrote the shards there: the stage refuses "
                           f"to mix them; {fix}")
    recorded = read_stage_config(name, cfg)
    if recorded is not None:
        changes = changed_fields(_shard_settings(name, recorded),
                                 _known_to(recorded, _shard_settings(name, cfg.model_dump(mode="json"))))
        if changes:
            return "blocked", (f"the shards there were written with other settings ({'; '.join(changes)}): the "
                               f"stage refuses to mix them; {fix}")
    done, expected = len(shards.complete_indices()), shards.manifest.get("expected_shards")
    if not (shards.manifest.get("complete") and expected == done):
        return "resume", f"{done} of {expected if expected is not None else '?'} shards complete"
    unchecked = "" if recorded else f" (no {stage_config_path(name, cfg).name} beside them: settings not compared)"
    return "complete", f"{done} shards{unchecked}"


def _sft_status(cfg: Any) -> tuple[str, str]:
    from pipeline.stages.sft import sft_identity
    from pipeline.train import checkpoint

    done = read_provenance(cfg.out)
    data = ShardSet.open(Path(cfg.data))
    key = checkpoint.run_fingerprint(sft_identity(cfg, data.metadata.get("teacher_fingerprint"),
                                                  model_fingerprint(cfg.student), data.manifest))
    if done.get("sft_run_key") == key:
        return "complete", f"{cfg.out} (same data, base model and settings)"
    step = checkpoint.latest_step(Path(cfg.out).with_name(Path(cfg.out).name + "_logs") / "ckpt")
    if step:
        return "resume", f"from checkpoint step {step} of {cfg.steps} (if its run key matches)"
    return "run", "retrains: the model there was trained otherwise" if done else "no output yet"


def _train_status(cfg: Any) -> tuple[str, str]:
    from pipeline.fingerprint import shard_data_fingerprint
    from pipeline.stages.train import train_run_key
    from pipeline.train import checkpoint

    sources = cfg.sources()
    if len(sources) == 1:
        data_fp = shard_data_fingerprint(ShardSet.open(Path(sources[0].path)).manifest)
    else:
        data_fp = checkpoint.run_fingerprint({"sources": [
            {"name": s.label, "weight": s.weight, "data": shard_data_fingerprint(ShardSet.open(Path(s.path)).manifest)}
            for s in sources]})
    done = read_provenance(Path(cfg.out) / "final")
    if done.get("train_run_key") == train_run_key(cfg, model_fingerprint(cfg.student), data_fp) \
            and done.get("steps") == cfg.steps:
        return "complete", f"{Path(cfg.out) / 'final'} ({cfg.steps} steps, same start model, shards and settings)"
    step = checkpoint.latest_step(Path(cfg.out) / "ckpt")
    if step:
        return "resume", f"from checkpoint step {step} of {cfg.steps} (if its run key matches)"
    return "run", "retrains: the final model there was trained otherwise" if done else "no output yet"


def plan_run(run: RunConfig) -> list[StagePlan]:
    """What ``lopd run`` would do with each stage of ``run``, in order (no model is loaded)."""
    plans: list[StagePlan] = []
    for name in (n for n in STAGES if n in run.sections):
        cfg = run.stage(name)
        reads = [p for p in plans if any(_same_path(path, Path(p.out)) for _, path in _input_paths(cfg))]
        missing = [f"{name}.{field} ({path})" for field, path in _input_paths(cfg)
                   if not Path(path).exists() and not any(_same_path(path, Path(p.out)) for p in plans)]
        blocked = [p.stage for p in reads if p.status == "blocked"]
        reruns = [p.stage for p in reads if p.status in ("run", "resume")]
        if missing:
            status, detail = "blocked", f"missing input {', '.join(missing)}"
        elif blocked:
            status, detail = "blocked", f"reads the output of {', '.join(blocked)}, which is blocked"
        elif reruns:
            status, detail = "run", f"after {', '.join(reruns)} (it reads their output)"
        elif name in SHARD_STAGES:
            status, detail = _shard_status(name, cfg)
        elif name == "sft":
            status, detail = _sft_status(cfg)
        elif name == "train":
            status, detail = _train_status(cfg)
        else:
            status, detail = "run", "eval is not cached: it runs every time"
        plans.append(StagePlan(name, status, detail, str(cfg.out)))
    return plans


def plan_table(plans: list[StagePlan]) -> str:
    """The plan as aligned text, one stage a line (``lopd run --dry-run``)."""
    width = max([len(p.stage) for p in plans] + [5])
    lines = [f"{'stage':<{width}}  {'status':<8}  detail"]
    lines += [f"{p.stage:<{width}}  {p.status:<8}  {p.detail}" for p in plans]
    return "\n".join(lines) + "\n"


def plans_json(plans: list[StagePlan]) -> list[dict[str, str]]:
    return [asdict(p) for p in plans]
