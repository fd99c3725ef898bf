"""Benchmark presets (pipeline/presets.py): rows written in AIME24 / AIME25 / MATH-500 / GSM8K's hub layouts become
lopd prompts files with answers the math checker reads; models by hub id (pipeline/hub.py) resolve to their snapshot
in a local HF cache built on disk, offline, through `lopd eval` on the tiny student."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.presets import INSTRUCTION, preset_records, write_preset
from pipeline.prompts import PromptFileError, load_prompts
from tests.conftest import lopd, write_run_config

AIME24 = [  # HuggingFaceH4/aime_2024 (split train): id (int), problem, solution, answer, url, year
    {"id": 60, "problem": "Find $x$ if $x+1=34$.", "solution": "$x=33$", "answer": "033",
     "url": "https://artofproblemsolving.com/wiki/index.php/2024_AIME_I_Problems/Problem_1", "year": 2024},
    {"id": 61, "problem": "Find $7\\cdot 6$.", "solution": "42", "answer": "42", "url": "u", "year": 2024},
]
AIME25 = [{"problem": "Find 2+2.", "answer": "4", "id": "0"}, {"problem": "Find 9+9.", "answer": "18", "id": "1"}]
AIME25_OPENCOMPASS = [{"question": "Find 2+2.", "answer": "4"}]  # opencompass/AIME2025: question, answer
MATH500 = [  # HuggingFaceH4/MATH-500 (split test)
    {"problem": "Compute $\\frac{28}{6}$.", "solution": "$\\frac{14}{3}$", "answer": "\\frac{14}{3}",
     "subject": "Prealgebra", "level": 2, "unique_id": "test/prealgebra/1.json"},
    {"problem": "12+34=", "solution": "46", "answer": "46", "subject": "Algebra", "level": 1,
     "unique_id": "test/algebra/2.json"},
]
GSM8K = [  # openai/gsm8k (config main): question, answer (worked solution, then '#### <number>')
    {"question": "12+34=", "answer": "12+34=<<12+34=46>>46\n#### 46"},
    {"question": "A shop sells 1,000 pens a day. How many in 2 days?", "answer": "1000*2=2000\n#### 2,000"},
]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _cli(*args) -> tuple[int, str]:
    """The CLI in-process: (exit code, stderr as one line)."""
    from typer.testing import CliRunner

    from lopd.cli import app

    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, " ".join(result.stderr.split())


def _answers(records):
    return [(r.id, r.answer) for r in records]


def test_presets_read_each_layout_and_normalise_answers(tmp_path):
    import datasets

    pq.write_table(pa.Table.from_pylist(AIME24), tmp_path / "aime24.parquet")
    aime24 = preset_records("aime24", tmp_path / "aime24.parquet")
    assert _answers(aime24) == [("60", "33"), ("61", "42")]
    assert aime24[0].prompt == f"Find $x$ if $x+1=34$.\n\n{INSTRUCTION}"

    assert _answers(preset_records("aime25", _jsonl(tmp_path / "aime25.jsonl", AIME25))) == [("0", "4"), ("1", "18")]
    (oc,) = preset_records("aime25", _jsonl(tmp_path / "oc.jsonl", AIME25_OPENCOMPASS), instruction="")
    assert (oc.id, oc.prompt, oc.answer) == ("aime25-0", "Find 2+2.", "4")

    math500 = tmp_path / "math500"  # load_dataset(...).save_to_disk: a DatasetDict with split test
    datasets.DatasetDict({"test": datasets.Dataset.from_list(MATH500)}).save_to_disk(str(math500))
    assert _answers(preset_records("math500", math500)) == [("test/prealgebra/1.json", "\\frac{14}{3}"),
                                                             ("test/algebra/2.json", "46")]

    gsm8k = tmp_path / "gsm8k"  # a hub snapshot's data files: main/test-*.parquet, main/train-*.parquet
    (gsm8k / "main").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(GSM8K), gsm8k / "main" / "test-00000-of-00001.parquet")
    pq.write_table(pa.Table.from_pylist(GSM8K[:1]), gsm8k / "main" / "train-00000-of-00001.parquet")
    assert _answers(preset_records("gsm8k", gsm8k)) == [("gsm8k-0", "46"), ("gsm8k-1", "2000")]
    assert len(preset_records("gsm8k", gsm8k, split="train")) == 1

    for name, source in (("aime24", tmp_path / "aime24.parquet"), ("aime25", tmp_path / "oc.jsonl"),
                         ("math500", math500), ("gsm8k", gsm8k)):  # written files load as lopd prompts
        assert write_preset(name, source, tmp_path / f"{name}.out.jsonl") == len(load_prompts(
            tmp_path / f"{name}.out.jsonl"))
        assert load_prompts(tmp_path / f"{name}.out.jsonl") == preset_records(name, source)

    with pytest.raises(PromptFileError, match=r"line 1: column 'answer': GSM8K's answer column has no '#### <number>'"):
        preset_records("gsm8k", _jsonl(tmp_path / "g.jsonl", [{"question": "1+1=", "answer": "2"}]))
    with pytest.raises(PromptFileError, match=r"line 1: no column 'problem or question' \(aime25's layout, as "
                                              r"math-ai/aime25 has it\); its columns are \['answer', 'prompt'\]"):
        preset_records("aime25", _jsonl(tmp_path / "a.jsonl", [{"prompt": "x", "answer": "1"}]))
    with pytest.raises(PromptFileError, match=r"an AIME answer is an integer from 0 to 999, got '1/2'"):
        preset_records("aime24", _jsonl(tmp_path / "a.jsonl", [{"id": 1, "problem": "x", "answer": "1/2"}]))


def _hf_cache(home, repo_id, model_dir):
    """The hub cache layout ``huggingface_hub`` writes: blobs, a snapshot of symlinks to them, refs/main."""
    repo = home / "hub" / f"models--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for i, f in enumerate(sorted(p for p in model_dir.iterdir() if p.is_file())):
        shutil.copyfile(f, repo / "blobs" / f"blob{i}")
        (snapshot / f.name).symlink_to(f"../../blobs/blob{i}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def test_a_model_by_hub_id_resolves_to_its_cached_snapshot(tmp_path, monkeypatch, tiny_models):
    from huggingface_hub import constants

    from pipeline.config import load_run_config
    from pipeline.fingerprint import model_fingerprint
    from pipeline.stages.common import require_model_dir
    from storage.errors import MissingInputError

    snapshot = _hf_cache(tmp_path / "hf", "lopd-test/tiny-student", tiny_models["student"])
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    cfg = write_run_config(tmp_path, {"eval": {"prompts": "p.jsonl", "model": "lopd-test/tiny-student"},
                                      "rollouts": {"prompts": "p.jsonl", "student": "lopd-test/not-cached"}})
    run = load_run_config(cfg)
    assert run.stage("eval").model == snapshot
    assert model_fingerprint(snapshot) == model_fingerprint(tiny_models["student"])  # content, not the path
    student = run.stage("rollouts").student
    assert str(student) == "lopd-test/not-cached"
    with pytest.raises(MissingInputError, match=r"rollouts.student: lopd-test/not-cached is not a directory, nor the "
                                                r"hub id of a model in the local Hugging Face cache .*download it with "
                                                r"`hf download lopd-test/not-cached` on a machine with internet"):
        require_model_dir(student, field="rollouts.student", made_by="lopd sft")
    with pytest.raises(MissingInputError, match=r"eval.model: /nowhere/model does not exist; run `lopd train`"):
        require_model_dir(Path("/nowhere/model"), field="eval.model", made_by="lopd train")

    code, err = _cli("eval", "-c", cfg, "-q", "--set", "eval.model=lopd-test/absent")  # one line, exit 2
    assert code == 2 and err.startswith("error: eval.model: lopd-test/absent is not a directory") and \
        "hf download lopd-test/absent" in err
    code, err = _cli("prompts", "preset", "gsm8k", "--from", _jsonl(tmp_path / "p.jsonl", AIME25), "--out",
                     tmp_path / "x.jsonl")
    assert code == 2 and "p.jsonl: line 1: no column 'question' (gsm8k's layout, as openai/gsm8k has it)" in err
    code, err = _cli("prompts", "preset", "gsm9k", "--from", tmp_path / "p.jsonl", "--out", tmp_path / "x.jsonl")
    assert code == 2 and "unknown preset 'gsm9k'; one of aime24, aime25, math500, gsm8k" in err


@pytest.mark.integration
def test_preset_prompts_through_lopd_eval_on_a_model_by_hub_id(tmp_path, monkeypatch, tiny_models):
    """`lopd prompts preset gsm8k` then `lopd eval` (math checker, 2 samples) with the model given by hub id,
    HF_HUB_OFFLINE=1 and HF_HOME holding only the cache built here."""
    _hf_cache(tmp_path / "hf", "lopd-test/tiny-student", tiny_models["student"])
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    prompts = tmp_path / "gsm8k.jsonl"
    out = lopd("prompts", "preset", "gsm8k", "--from", str(_jsonl(tmp_path / "test.jsonl", GSM8K)),
               "--out", str(prompts), "--instruction", "")
    assert json.loads(out.stdout.splitlines()[-1]) == {"preset": "gsm8k", "rows": 2, "out": str(prompts)}
    assert _answers(load_prompts(prompts)) == [("gsm8k-0", "46"), ("gsm8k-1", "2000")]

    cfg = write_run_config(tmp_path, {"eval": {
        "prompts": str(prompts), "model": "lopd-test/tiny-student", "checker": "math", "max_new_tokens": 4,
        "samples": {"n": 2, "max_new_tokens": 4}}})
    result = json.loads(lopd("eval", "-c", str(cfg), "-q").stdout.splitlines()[-1])
    assert {"pass@1", "pass@2", "maj@2", "avg@2"} <= set(result)
    recorded = (tmp_path / "run" / "eval" / "config.yaml").read_text()
    assert "models--lopd-test--tiny-student/snapshots/0123456789abcdef" in recorded

    # every preset's layout through `lopd rollouts` (one prompts file of all four, the student again by hub id)
    merged = tmp_path / "benchmarks.jsonl"
    parts = [("aime24", AIME24), ("aime25", AIME25), ("math500", MATH500), ("gsm8k", GSM8K)]
    for name, rows in parts:
        write_preset(name, _jsonl(tmp_path / f"{name}-copy.jsonl", rows), tmp_path / f"{name}.jsonl", instruction="")
    merged.write_text("".join((tmp_path / f"{name}.jsonl").read_text() for name, _ in parts))
    ids = [p.id for p in load_prompts(merged)]
    assert len(ids) == len(set(ids)) == 8
    (tmp_path / "r").mkdir()
    cfg = write_run_config(tmp_path / "r", {"rollouts": {
        "prompts": str(merged), "student": "lopd-test/tiny-student", "checker": "math",
        "sampling": {"n": 1, "max_new_tokens": 4}}})
    lopd("rollouts", "-c", str(cfg), "-q")
    from storage.shardset import ShardSet

    shards = ShardSet.open(tmp_path / "r" / "run" / "rollouts")
    rows = [row for i in shards.complete_indices() for row in shards.read_shard(i).to_pylist()]
    assert sorted(row["prompt_id"] for row in rows) == sorted(ids)
