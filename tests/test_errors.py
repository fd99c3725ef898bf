"""Bad input gets one line naming the file/field and the fix, exit code 2, no traceback and nothing left in
the run dir; a bug in lopd keeps its traceback. Every case of docs/errors.md is a test here."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lopd.cli import app
from storage.codecs import codec_info, encode_records
from storage.shardset import ShardSet
from storage.synthetic import make_records


def lopd(*args: str) -> tuple[int, str]:
    """Run the CLI in-process; (exit code, stderr as one line of text)."""
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, " ".join(result.stderr.split())


def assert_one_line_error(code: int, err: str, *parts: str) -> None:
    assert code == 2, err
    assert err.startswith("error:") and "Traceback" not in err, err
    for part in parts:
        assert part in err, (part, err)


@pytest.fixture(scope="module")
def topk_shards(tmp_path_factory, tiny_models) -> Path:
    """A finished teacher top-k shard set over the tiny student's vocabulary (3 shards)."""
    from pipeline.models import load_tokenizer

    vocab = len(load_tokenizer(tiny_models["student"]))
    shards = ShardSet.create(tmp_path_factory.mktemp("topk") / "teacher_topk", "teacher_topk",
                             {"teacher_fingerprint": "t", **codec_info("compact", 4, vocab)})
    for i in range(3):
        records = make_records(vocab, 4, num_rollouts=8, response_len=6, prompt_len=3, seed=i)
        shards.write_shard(i, encode_records(records, "compact", 4, vocab))
    shards.finalize(expected_shards=3)
    return shards.root


def write_config(tmp_path: Path, body: str) -> Path:
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"run_dir: {tmp_path / 'run'}\n{body}")
    return cfg


def test_train_refuses_a_complete_shard_set_with_a_missing_sidecar(tmp_path, tiny_models, topk_shards):
    shards = tmp_path / "teacher_topk"
    shutil.copytree(topk_shards, shards)
    (shards / "shard-00001.json").unlink()
    cfg = write_config(tmp_path, f"train:\n  student: {tiny_models['student']}\n  shards: {shards}\n  steps: 2\n"
                                 "  batch_size: 4\n")
    code, err = lopd("train", "-c", cfg, "-q")
    assert_one_line_error(code, err, "shard-00001.parquet", "no sidecar shard-00001.json", "rerun the stage")
    assert not (tmp_path / "run" / "train").exists()


# --- prompt files -------------------------------------------------------------------------------------

GOOD = b'{"id": "a", "prompt": "1+1="}\n'
PROMPT_CASES = {
    "non_utf8": ("p.jsonl", GOOD + b'{"id": "b", "prompt": "\xbb2+2="}\n',
                 ["line 2", "not UTF-8", "0xbb", "save the file as UTF-8"]),
    "json_array": ("p.jsonl", b'[{"id": "a", "prompt": "1+1="}]\n', ["line 1", "a JSON array", "one object per line"]),
    "json_array_pretty": ("p.jsonl", b'[\n  {"id": "a", "prompt": "1+1="}\n]\n', ["line 1", "a JSON array"]),
    "numeric_prompt": ("p.jsonl", b'{"id": "a", "prompt": 12}\n',
                       ["line 1", "field 'prompt' must be a string", "got a number"]),
    "numeric_answer": ("p.jsonl", b'{"id": "a", "prompt": "1+1=", "answer": 2}\n',
                       ["line 1", "field 'answer' must be a string"]),
    "list_id": ("p.jsonl", b'{"id": [1], "prompt": "1+1="}\n', ["line 1", "field 'id' must be a string"]),
    "empty_prompt": ("p.jsonl", GOOD + b'{"id": "b", "prompt": " "}\n', ["line 2", "field 'prompt' is empty"]),
    "invalid_json": ("p.jsonl", GOOD + b'{"id": "b", "prompt": \n',
                     ["line 2", "invalid JSON", "one JSON object per line"]),
    "missing_field": ("p.jsonl", b'{"prompt": "1+1="}\n', ["line 1", "missing required field 'id'"]),
    "duplicate_id": ("p.jsonl", GOOD + GOOD, ["duplicate id 'a'"]),
    "empty_file": ("p.jsonl", b"\n\n", ["no prompts in file"]),
    "not_parquet": ("p.parquet", b"PAR1 this is not parquet", ["not a readable Parquet file"]),
    "csv": ("p.csv", b"id,prompt\na,1+1=\n", ["unsupported prompts format '.csv'", "use .jsonl or .parquet"]),
}


def _teacher_sft_data_config(tmp_path: Path, prompts: Path, teacher: Path) -> Path:
    return write_config(tmp_path, f"teacher_sft_data:\n  prompts: {prompts}\n  teacher: {teacher}\n")


@pytest.mark.parametrize("case", sorted(PROMPT_CASES))
def test_bad_prompt_files(tmp_path, tiny_models, case):
    name, content, expected = PROMPT_CASES[case]
    prompts = tmp_path / name
    prompts.write_bytes(content)
    code, err = lopd("teacher-sft-data", "-c", _teacher_sft_data_config(tmp_path, prompts, tiny_models["teacher"]),
                     "-q")
    assert_one_line_error(code, err, str(prompts), *expected)
    assert not (tmp_path / "run").exists()


def test_parquet_prompts_with_a_numeric_prompt_column(tmp_path, tiny_models):
    import pyarrow as pa
    import pyarrow.parquet as pq

    prompts = tmp_path / "p.parquet"
    pq.write_table(pa.table({"id": ["a", "b"], "prompt": [1, 2]}), prompts)
    code, err = lopd("teacher-sft-data", "-c", _teacher_sft_data_config(tmp_path, prompts, tiny_models["teacher"]),
                     "-q")
    assert_one_line_error(code, err, f"{prompts}: row 0", "field 'prompt' must be a string")
    assert not (tmp_path / "run").exists()


def test_prompts_with_a_bom_and_crlf_line_ends_are_accepted(tmp_path):
    from pipeline.prompts import load_prompts

    prompts = tmp_path / "p.jsonl"
    prompts.write_bytes(b'\xef\xbb\xbf{"id": "a", "prompt": "1+1=", "answer": "2"}\r\n'
                        b'{"id": 7, "prompt": "2+2="}\r\n\r\n')
    records = load_prompts(prompts)
    assert [(r.id, r.prompt, r.answer) for r in records] == [("a", "1+1=", "2"), ("7", "2+2=", None)]


# --- configs and --set ------------------------------------------------------------------------------------

CONFIG_CASES = {
    "broken_yaml": (b"run_dir: r\ntrain:\n  steps: 3\n bad: [\n", [], ["not valid YAML at line", "fix the syntax"]),
    "non_utf8": (b"run_dir: r\ntrain:\n  steps: \xff\n", [], ["not UTF-8 text", "0xff", "save it as UTF-8"]),
    "top_level_list": (b"- run_dir: r\n", [], ["expected a mapping of sections", "got list"]),
    "section_not_mapping": (b"run_dir: r\ntrain: 5\n", [], ["section 'train' must be a mapping of fields"]),
    "unknown_field": (b"run_dir: r\ntrain:\n  stepz: 3\n", [], ["train.stepz: unknown field"]),
    "unknown_section": (b"run_dir: r\ntrian:\n  steps: 3\n", [],
                        ["<top level>: unknown section(s) ['trian']; known sections"]),
    "out_of_range": (b"run_dir: r\ntrain:\n  steps: 0\n", [], ["train.steps", "greater than or equal to 1", "(got 0)"]),
    "set_wrong_type": (b"run_dir: r\ntrain:\n  steps: 3\n", ["--set", "train.steps=abc"],
                       ["--set train.steps=abc", "train.steps", "valid integer", '(got "abc")']),
    "set_wrong_type_nested": (b"run_dir: r\ntrain:\n  steps: 3\n", ["--set", "train.optim.lr=fast"],
                              ["train.optim.lr", "valid number", '(got "fast")']),
    "set_no_equals": (b"run_dir: r\n", ["--set", "train.steps"], ["--set train.steps", "expected section.field=value"]),
    "set_into_a_value": (b"run_dir: r\ntrain:\n  steps: 3\n", ["--set", "train.steps.x=1"],
                         ["'steps' is not a section"]),
    "set_bad_yaml": (b"run_dir: r\n", ["--set", "train.losses={lightning: 1"],
                     ["--set train.losses", "not valid YAML", "quote it"]),
    "no_run_dir": (b"train:\n  steps: 3\n", [], ["missing required field 'run_dir'"]),
}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_bad_configs_and_overrides(tmp_path, monkeypatch, case):
    content, extra, expected = CONFIG_CASES[case]
    monkeypatch.chdir(tmp_path)  # the configs' relative run_dir `r` would land here
    cfg = tmp_path / "run.yaml"
    cfg.write_bytes(content)
    code, err = lopd("train", "-c", cfg, *extra, "-q")
    assert_one_line_error(code, err, *expected)
    assert set(p.name for p in tmp_path.iterdir()) == {"run.yaml"}


def test_missing_config_file(tmp_path):
    code, err = lopd("sft", "-c", tmp_path / "nope.yaml")
    assert_one_line_error(code, err, f"{tmp_path / 'nope.yaml'}: config file not found")


# --- model directories ----------------------------------------------------------------------------------

def test_missing_and_non_model_directories_name_the_field_and_the_stage_that_makes_them(tmp_path, tiny_models):
    prompts = tmp_path / "p.jsonl"
    prompts.write_bytes(b'{"id": "a", "prompt": "1+1=", "answer": "2"}\n')
    (tmp_path / "empty").mkdir()
    cases = [
        ("teacher-sft-data", f"teacher_sft_data:\n  prompts: {prompts}\n  teacher: {tmp_path / 'nope'}\n",
         ["teacher_sft_data.teacher:", "does not exist",
          "point teacher_sft_data.teacher at a Hugging Face model directory"]),
        ("teacher-sft-data", f"teacher_sft_data:\n  prompts: {prompts}\n  teacher: {tmp_path / 'empty'}\n",
         ["is not a model directory (no config.json, no weight files", "no tokenizer files"]),
        ("teacher-sft-data", f"teacher_sft_data:\n  prompts: {prompts}\n  teacher: {prompts}\n",
         ["is a file, not a model directory"]),
        ("rollouts", f"rollouts:\n  prompts: {prompts}\n",
         ["rollouts.student:", "sft_student does not exist", "run `lopd sft` first"]),
        ("eval", f"eval:\n  prompts: {prompts}\n", ["eval.model:", "final does not exist", "run `lopd train` first"]),
        ("teacher-logprobs", f"teacher_logprobs:\n  teacher: {tiny_models['teacher']}\n",
         ["teacher_logprobs.rollouts:", "rollouts does not exist", "run `lopd rollouts` first"]),
    ]
    for command, body, expected in cases:
        code, err = lopd(command, "-c", write_config(tmp_path, body), "-q")
        assert_one_line_error(code, err, *expected)
        assert not (tmp_path / "run").exists(), command


# --- shard directories ----------------------------------------------------------------------------------

def test_directories_that_are_not_the_expected_shard_set(tmp_path, tiny_models, topk_shards):
    (tmp_path / "empty").mkdir()
    teacher = tiny_models["teacher"]
    cases = [
        (f"rollouts: {tmp_path / 'empty'}", ["teacher_logprobs.rollouts:", "has no manifest.json", "lopd rollouts"]),
        (f"rollouts: {teacher}", ["has no manifest.json", "lopd rollouts"]),
        (f"rollouts: {topk_shards}", ["holds 'teacher_topk' shards, this stage reads 'samples'",
                                      "point teacher_logprobs.rollouts at the output of `lopd rollouts`"]),
    ]
    for line, expected in cases:
        cfg = write_config(tmp_path, f"teacher_logprobs:\n  teacher: {teacher}\n  {line}\n")
        code, err = lopd("teacher-logprobs", "-c", cfg, "-q")
        assert_one_line_error(code, err, *expected)
        assert not (tmp_path / "run").exists()
    cfg = write_config(tmp_path, f"train:\n  student: {tiny_models['student']}\n  shards: {tmp_path / 'empty'}\n")
    code, err = lopd("train", "-c", cfg, "-q")
    assert_one_line_error(code, err, str(tmp_path / "empty"), "has no manifest.json")
    assert not (tmp_path / "run").exists()


def test_shards_verify_and_inspect_on_damaged_sets_print_problems_not_tracebacks(tmp_path, topk_shards):
    shards = tmp_path / "s"
    shutil.copytree(topk_shards, shards)
    manifest = shards / "manifest.json"
    manifest.write_bytes(manifest.read_bytes()[:10] + b"\xff" + manifest.read_bytes()[11:])
    code, err = lopd("shards", "verify", shards)
    assert code == 1 and "Traceback" not in err
    assert err.startswith("problem:") and f"{manifest}: unreadable manifest" in err and "delete manifest.json" in err
    code, err = lopd("shards", "inspect", shards)
    assert_one_line_error(code, err, f"{manifest}: unreadable manifest")
    code, err = lopd("shards", "inspect", tmp_path / "nope")
    assert_one_line_error(code, err, "does not exist: not a lopd shard set")


# --- bugs keep their traceback ------------------------------------------------------------------------

def test_an_internal_error_is_not_reported_as_a_user_error():
    from lopd.cli import _run

    def bug() -> None:
        {}["missing"]

    with pytest.raises(KeyError):
        _run(bug)
    with pytest.raises(ZeroDivisionError):
        _run(lambda: 1 / 0)
