"""Foundation: the demo world's task, tokenizer and models, prompt files, configs, the CLI surface."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.config import ConfigError, load_run_config
from pipeline.models import encode_prompt, load_model, load_tokenizer
from pipeline.prompts import PromptFileError, load_prompts
from pipeline.tasks import arithmetic

REPO = Path(__file__).resolve().parents[1]
LOPD = [sys.executable, "-m", "lopd.cli"]


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([*LOPD, *args], capture_output=True, text=True, cwd=cwd or REPO, env=env, timeout=300)


# --- task ---------------------------------------------------------------------------------------------

def test_solution_styles_and_checker():
    a = arithmetic.solution(123, 459, 3, "A")
    b = arithmetic.solution(123, 459, 3, "B")
    assert a == "3+9+0=12,2+5+1=8,1+4+0=5|582"
    assert b == "0+9+3=12;1+5+2=8;0+4+1=5|582"
    assert arithmetic.is_correct(a, "582") and arithmetic.is_correct(b, "582")
    assert not arithmetic.is_correct("3+9+0=12|581", "582")
    assert not arithmetic.is_correct("no answer line", "582")
    assert arithmetic.extract_answer("1|2|3") == "3"


def test_problems_are_disjoint_from_exclusions():
    test = arithmetic.make_problems(200, 3, seed=1)
    train = arithmetic.make_problems(500, 3, seed=2, exclude={(p.a, p.b) for p in test})
    assert not {(p.a, p.b) for p in test} & {(p.a, p.b) for p in train}
    assert all(100 <= p.a <= 999 and 100 <= p.b <= 999 for p in train)


def test_math_verify_checker_grades_latex_answers():
    from pipeline.tasks.checkers import get_checker

    check = get_checker("math")
    assert check("so the answer is $\\boxed{\\frac{1}{2}}$", "0.5")
    assert not check("the answer is $\\boxed{3}$", "4")


# --- models -------------------------------------------------------------------------------------------

def test_make_models_cli_produces_loadable_generating_models(tmp_path):
    res = run_cli("make-models", "--out", str(tmp_path))
    assert res.returncode == 0, res.stderr
    paths = json.loads(res.stdout.strip().splitlines()[-1])
    for role in ("teacher", "student"):
        tok = load_tokenizer(paths[role])
        model = load_model(paths[role])
        assert model.config.head_dim == 32  # vLLM CPU attention needs a supported head_dim
        ids = encode_prompt(tok, "12+34=")
        assert tok.decode(ids) == "<bos>12+34="
        out = model.generate(torch.tensor([ids]), max_new_tokens=5, do_sample=False)
        assert out.shape[1] > len(ids)
    teacher, student = load_model(paths["teacher"]), load_model(paths["student"])
    assert sum(p.numel() for p in student.parameters()) < sum(p.numel() for p in teacher.parameters())


def test_tokenizer_round_trips_the_alphabet(tiny_models):
    tok = load_tokenizer(tiny_models["teacher"])
    text = arithmetic.solution(905, 98, 3)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text) and tok.unk_token_id not in ids
    assert tok.decode(ids) == text


# --- prompts ------------------------------------------------------------------------------------------

def test_prompts_load_jsonl_and_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"id": "a", "prompt": "1+1=", "answer": "2"}, {"id": "b", "prompt": "2+2=", "privileged_context": "x"}]
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    columns = {k: [r.get(k) for r in rows] for k in ("id", "prompt", "answer", "privileged_context")}
    pq.write_table(pa.table(columns), tmp_path / "p.parquet")
    for name in ("p.jsonl", "p.parquet"):
        recs = load_prompts(tmp_path / name)
        assert [r.id for r in recs] == ["a", "b"]
        assert recs[0].answer == "2" and recs[1].privileged_context == "x"


@pytest.mark.parametrize(
    "content, expected",
    [
        ('{"id": "a", "prompt": "1+1="}\n{"id": "b"}\n', ["line 2", "'prompt'"]),
        ('{"id": "a", "prompt": "1+1="}\n{"id": "b", "prompt": "  "}\n', ["line 2", "'prompt'", "empty"]),
        ('{"id": "a", "prompt": "1+1="}\n{"id": "b", "prompt": \n', ["line 2", "invalid JSON"]),
        ('{"prompt": "1+1="}\n', ["line 1", "'id'"]),
    ],
)
def test_bad_prompt_files_name_file_line_and_field(tmp_path, content, expected):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(PromptFileError) as e:
        load_prompts(path)
    msg = str(e.value)
    assert str(path) in msg
    for part in expected:
        assert part in msg


def test_bad_prompts_via_cli_exit_nonzero_and_write_nothing(tmp_path, tiny_models):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "prompt": "1+1="}\n{"id": "b", "prompt": ""}\n')
    cfg = tmp_path / "run.yaml"
    out = tmp_path / "run" / "teacher_sft_data"
    cfg.write_text(f"run_dir: {tmp_path / 'run'}\nteacher_sft_data:\n  prompts: {bad}\n"
                   f"  teacher: {tiny_models['teacher']}\n")
    res = run_cli("teacher-sft-data", "--config", str(cfg), "--quiet")
    assert res.returncode == 2
    assert "line 2" in res.stderr and "prompt" in res.stderr and str(bad) in res.stderr.replace("\n", "")
    assert not out.exists()


# --- configs ------------------------------------------------------------------------------------------

def test_config_rejects_unknown_field_with_section_and_field(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("run_dir: r\ntrain:\n  stepz: 3\n")
    with pytest.raises(ConfigError) as e:
        load_run_config(cfg)
    assert "train.stepz" in str(e.value) and str(cfg) in str(e.value)


def test_config_range_check_and_overrides(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("run_dir: r\ntrain:\n  steps: 3\n")
    with pytest.raises(ConfigError, match="train.steps"):
        load_run_config(cfg, ["train.steps=0"])
    rc = load_run_config(cfg, ["train.optim.lr=0.01"], run_dir=tmp_path / "x")
    train = rc.stage("train")
    assert train.optim.lr == 0.01 and train.steps == 3
    assert train.shards == tmp_path / "x" / "teacher_topk"  # default location inside run_dir


def test_shipped_configs_validate():
    from pipeline.demo.ablate import demo_run_config, load_ablate_config

    for path in (REPO / "configs").glob("*.yaml"):
        if path.name == "ablate.yaml":  # an ablation config, over the demo's run config
            demo_run_config(load_ablate_config(path))
        else:
            load_run_config(path)


def test_cli_help_lists_every_stage():
    res = run_cli("--help")
    assert res.returncode == 0
    for cmd in ("make-models", "teacher-sft-data", "sft", "rollouts", "teacher-logprobs", "train", "eval", "run",
                "demo", "ablate", "serve", "shards", "bench"):
        assert cmd in res.stdout, cmd


def test_pipeline_imports_without_prefect():
    code = ("import sys, importlib; sys.modules['prefect'] = None\n"
            "for m in ['pipeline.config', 'pipeline.demo.experiment', 'pipeline.demo.ablate',\n"
            "          'pipeline.stages.registry',\n"
            "          'pipeline.stages.train',\n"
            "          'pipeline.stages.teacher_logprobs', 'pipeline.stages.sampling', 'storage']:\n"
            "    importlib.import_module(m)\nprint('ok')")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr


def test_config_imports_without_transformers():
    """Reading a config (the CLI's --help, flows' parameters) does not load the model libraries."""
    code = "import sys, pipeline.config; print(sorted(m for m in ('transformers', 'torch') if m in sys.modules))"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 0 and res.stdout.strip() == "[]", res.stdout + res.stderr
