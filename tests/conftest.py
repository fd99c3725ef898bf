"""Shared fixtures: tiny models the project creates itself (no hub), caches kept inside a temp dir."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_CACHE = Path(tempfile.gettempdir()) / "lopd-test-cache"
for var, sub in (("VLLM_CACHE_ROOT", "vllm"), ("HF_HOME", "hf"), ("TORCHINDUCTOR_CACHE_DIR", "inductor")):
    os.environ.setdefault(var, str(_CACHE / sub))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """Untrained demo-world teacher and student directories (random weights, real HF format)."""
    from pipeline.demo.world import ModelShape, make_models

    out = tmp_path_factory.mktemp("models")
    return make_models(
        out,
        teacher=ModelShape(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128),
        student=ModelShape(hidden_size=32, num_layers=1, num_heads=1, intermediate_size=64),
        seed=0,
    )


@pytest.fixture(scope="session")
def trained_models(tmp_path_factory, tiny_models) -> dict[str, Path]:
    """The tiny teacher after a short bootstrap on correct 2-digit solutions: a peaked, non-uniform teacher
    (a random-init teacher is near uniform, so distillation losses against it are ~0)."""
    from pipeline.config import DemoConfig, OptimConfig, ScaleConfig
    from pipeline.demo.experiment import ground_truth_examples
    from pipeline.models import load_model, load_tokenizer
    from pipeline.train.distributed import DistInfo, seed_everything
    from pipeline.train.loop import train_in_process
    from pipeline.train.objective import SftObjective
    from pipeline.train.sources import ExampleBatches
    from pipeline.train.student import save_hf_model

    seed_everything(0)
    tok = load_tokenizer(tiny_models["teacher"])
    model = load_model(tiny_models["teacher"])
    examples = ground_truth_examples(tok, DemoConfig(digits=2), "A", set(), seed=0)
    train_in_process(model, ExampleBatches(examples, ScaleConfig(), 32, tok.pad_token_id, DistInfo()), SftObjective(),
                     ScaleConfig(), OptimConfig(lr=3e-3), steps=60, log_every=20, show_progress=False)
    out = tmp_path_factory.mktemp("trained") / "teacher"
    save_hf_model(model, tok, out)
    return {"teacher": out, "student": tiny_models["student"]}


@pytest.fixture(scope="module")
def prefect_api():
    """An in-process Prefect API for flow tests (one per test module)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield


def write_prompts(path: Path, n: int = 6) -> Path:
    """A JSONL prompts file of ``n`` 2-digit addition problems."""
    import json

    from pipeline.tasks import arithmetic

    with path.open("w") as f:
        for p in arithmetic.make_problems(n, 2, seed=0):
            f.write(json.dumps({"id": p.id, "prompt": p.prompt, "answer": p.answer}) + "\n")
    return path


def write_run_config(tmp_path: Path, sections: dict) -> Path:
    """``tmp_path/run.yaml`` with ``run_dir`` = ``tmp_path/run`` and the given stage sections."""
    import yaml

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "run"), **sections}))
    return path


def rollouts_in_parts_equal_one_process(tmp_path: Path, student: Path, runner: str) -> dict:
    """Run the rollouts flow as 2 parts on ``runner``; assert the parts wrote 2 shards each, the set is complete
    and its shards equal a one-process run's. Returns the flow's result."""
    from flows import stages
    from pipeline.config import load_run_config
    from pipeline.stages.registry import run_stage
    from storage.shardset import ShardSet

    prompts = write_prompts(tmp_path / "prompts.jsonl", n=8)
    config = write_run_config(tmp_path, {"rollouts": {
        "prompts": str(prompts), "student": str(student), "prompts_per_shard": 2,
        "sampling": {"n": 2, "max_new_tokens": 6}}})
    result = stages.rollouts_flow(config_path=str(config), num_parts=2, runner=runner)
    assert sorted(p["shards_written"] for p in result["parts"]) == [2, 2]
    spread = ShardSet.open(tmp_path / "run" / "rollouts")
    assert spread.manifest["complete"] and spread.complete_indices() == [0, 1, 2, 3]
    single = load_run_config(config, [f"rollouts.out={tmp_path / 'single'}"]).stage("rollouts")
    run_stage("rollouts", single, show_progress=False)
    for i in range(4):
        assert spread.read_shard(i).equals(ShardSet.open(tmp_path / "single").read_shard(i))
    return result


def free_port() -> int:
    """A TCP port on 127.0.0.1 that the OS hands out as free (for torchrun, a Prefect server)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_run(tmp: Path, models: dict[str, Path], extra: str = "", n_prompts: int = 48) -> Path:
    """``tmp/run.yaml``: the four data stages over ``n_prompts`` 2-digit problems (with privileged context) on
    ``models``, plus ``extra`` YAML."""
    from pipeline.prompts import PromptRecord, write_prompts_jsonl
    from pipeline.tasks.arithmetic import make_problems

    problems = make_problems(n_prompts, 2, seed=3)
    write_prompts_jsonl([PromptRecord(p.id, p.prompt, p.answer, privileged_context=f"{p.answer}|")
                         for p in problems], tmp / "prompts.jsonl")
    cfg = tmp / "run.yaml"
    cfg.write_text(f"""
run_dir: {tmp / 'run'}
teacher_sft_data:
  prompts: {tmp / 'prompts.jsonl'}
  teacher: {models['teacher']}
  sampling: {{n: 2, max_new_tokens: 12, seed: 0}}
  checker: arithmetic
  prompts_per_shard: 16
sft:
  student: {models['student']}
  steps: 4
  batch_size: 8
rollouts:
  prompts: {tmp / 'prompts.jsonl'}
  sampling: {{n: 2, max_new_tokens: 12, seed: 1}}
  prompts_per_shard: 8
teacher_logprobs:
  teacher: {models['teacher']}
  k: 4
  codec: compact
{extra}
""")
    return cfg


def lopd(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run the ``lopd`` CLI in a subprocess from the repository root; ``check``: assert it succeeded."""
    res = subprocess.run([sys.executable, "-m", "lopd.cli", *args], capture_output=True, text=True, cwd=REPO,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600)
    if check:
        assert res.returncode == 0, res.stderr[-3000:]
    return res


TRAIN = """
train:
  losses: {{reverse_kl_topk: 1.0, lightning: 0.1}}
  steps: {steps}
  batch_size: 8
  optim: {{lr: 3.0e-3}}
  checkpoint_every: 4
  log_every: 1
  shuffle_buffer: 16
eval:
  prompts: {prompts}
  max_new_tokens: 12
"""


@pytest.fixture(scope="session")
def shards_run(tmp_path_factory, trained_models):
    """A run directory with the four data stages done on ``trained_models`` (48 prompts) and a ``train`` / ``eval``
    config: ``(tmp, run.yaml)``. One per session: the training and eval tests write their outputs under their own
    names."""
    tmp = tmp_path_factory.mktemp("train")
    cfg = write_run(tmp, trained_models, TRAIN.format(steps=12, prompts=tmp / "prompts.jsonl"))
    for stage in ("teacher-sft-data", "sft", "rollouts", "teacher-logprobs"):
        lopd(stage, "-c", str(cfg), "-q")
    return tmp, cfg
