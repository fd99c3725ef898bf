"""pipeline/prompts.py beyond plain files: column mapping (`prompt_fields`), chat `messages`, `datasets` directories
(saved with save_to_disk, or data files read with load_dataset, offline); `lopd rollouts` and `lopd eval` on them."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.prompts import PromptFileError, load_prompts, prompts_fingerprint
from tests.conftest import lopd, write_run_config

MATH500_ROWS = [  # MATH-500's columns: problem, solution, answer, subject, level, unique_id
    {"problem": "12+34=", "solution": "4+2=6, 3+1=4", "answer": "46", "subject": "Algebra", "level": 1,
     "unique_id": "test/algebra/1.json"},
    {"problem": "50+25=", "solution": "0+5=5, 5+2=7", "answer": "75", "subject": "Algebra", "level": 2,
     "unique_id": "test/algebra/2.json"},
]
MATH500_FIELDS = {"id": "unique_id", "prompt": "problem"}


def _ids(encoded):
    return list(encoded if isinstance(encoded, list) else encoded["input_ids"])


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_column_mapping_reads_another_layout(tmp_path):
    records = load_prompts(_jsonl(tmp_path / "m.jsonl", MATH500_ROWS), fields=MATH500_FIELDS)
    assert [(r.id, r.prompt, r.answer) for r in records] == [("test/algebra/1.json", "12+34=", "46"),
                                                             ("test/algebra/2.json", "50+25=", "75")]
    with pytest.raises(PromptFileError, match=r"line 1: missing required field 'problem' \(lopd's 'prompt'"):
        load_prompts(_jsonl(tmp_path / "m.jsonl", [{"unique_id": "a", "question": "1"}]), fields=MATH500_FIELDS)


def test_chat_messages_are_checked_and_give_the_prompt(tmp_path):
    rows = [{"id": "a", "messages": [{"role": "system", "content": "12"}, {"role": "user", "content": "1+2="}]}]
    (record,) = load_prompts(_jsonl(tmp_path / "c.jsonl", rows))
    assert record.messages == (("system", "12"), ("user", "1+2=")) and record.prompt == "1+2="
    bad = {r"must end with a user turn \(the model answers it\), ends with 'assistant'":
           [{"role": "user", "content": "1"}, {"role": "assistant", "content": "2"}],
           "must be a non-empty list": [{"role": "robot", "content": "1"}]}
    for message, turns in bad.items():
        with pytest.raises(PromptFileError, match=f"line 1: field 'messages' {message}"):
            load_prompts(_jsonl(tmp_path / "c.jsonl", [{"id": "a", "messages": turns}]))


def test_datasets_directories_saved_or_of_data_files(tmp_path):
    import datasets

    saved = tmp_path / "saved"
    datasets.DatasetDict({"test": datasets.Dataset.from_list(MATH500_ROWS),
                          "train": datasets.Dataset.from_list(MATH500_ROWS[:1])}).save_to_disk(str(saved))
    assert [r.id for r in load_prompts(saved, fields=MATH500_FIELDS, split="test")] == [
        "test/algebra/1.json", "test/algebra/2.json"]
    assert len(load_prompts(saved, fields=MATH500_FIELDS)) == 1  # split train by default
    with pytest.raises(PromptFileError, match=r"has splits \['test', 'train'\], not 'validation'; set prompt_split"):
        load_prompts(saved, fields=MATH500_FIELDS, split="validation")
    with pytest.raises(PromptFileError, match=r"\(split test\): no column 'id', 'prompt'; its columns are \['problem'"):
        load_prompts(saved, split="test")

    files = tmp_path / "files"  # GSM8K's layout: question, answer (with its worked solution)
    files.mkdir()
    pq.write_table(pa.Table.from_pylist([{"question": "2+2=", "answer": "2+2=4 #### 4"}]), files / "train.parquet")
    (record,) = load_prompts(files, fields={"id": "question", "prompt": "question"})
    assert (record.id, record.prompt, record.answer) == ("2+2=", "2+2=", "2+2=4 #### 4")

    before = prompts_fingerprint(files)
    pq.write_table(pa.Table.from_pylist([{"question": "2+3=", "answer": "5"}]), files / "train.parquet")
    assert prompts_fingerprint(files) != before
    (tmp_path / "empty").mkdir()
    with pytest.raises(PromptFileError, match="not a readable datasets directory"):
        load_prompts(tmp_path / "empty")


@pytest.mark.integration
def test_rollouts_and_eval_read_a_dataset_dir_and_chat_messages(tmp_path, tiny_models):
    import datasets

    from pipeline.models import load_tokenizer
    from storage.shardset import ShardSet

    saved = tmp_path / "math500"
    datasets.Dataset.from_list(MATH500_ROWS).save_to_disk(str(saved))
    turns = [{"role": "system", "content": "0"}, {"role": "user", "content": "1+2="}]
    chat = _jsonl(tmp_path / "chat.jsonl", [{"id": "c1", "answer": "3", "messages": turns}])
    cfg = write_run_config(tmp_path, {
        "rollouts": {"prompts": str(saved), "student": str(tiny_models["student"]), "prompt_fields": MATH500_FIELDS,
                     "sampling": {"n": 2, "max_new_tokens": 4}},
        "eval": {"prompts": str(chat), "model": str(tiny_models["student"]), "max_new_tokens": 4}})
    lopd("rollouts", "-c", str(cfg), "-q")
    shards = ShardSet.open(tmp_path / "run" / "rollouts")
    rows = shards.read_shard(0).to_pylist()
    tokenizer = load_tokenizer(tiny_models["student"])
    assert [r["prompt_id"] for r in rows] == ["test/algebra/1.json"] * 2 + ["test/algebra/2.json"] * 2
    assert rows[0]["token_ids"][:rows[0]["prompt_len"]] == _ids(tokenizer.apply_chat_template(
        [{"role": "user", "content": "12+34="}], add_generation_prompt=True, tokenize=True))
    assert shards.metadata["prompt_fields"] == MATH500_FIELDS and shards.metadata["prompt_split"] == "train"

    # chat turns rendered with the chat template: the system turn is part of the prompt
    lopd("rollouts", "-c", str(cfg), "-q", "--set", f"rollouts.prompts={chat}", "--set", "rollouts.prompt_fields={}",
         "--set", f"rollouts.out={tmp_path / 'chat_rollouts'}")
    row = ShardSet.open(tmp_path / "chat_rollouts").read_shard(0).to_pylist()[0]
    want = _ids(tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=True))
    assert row["token_ids"][:row["prompt_len"]] == want and tokenizer.decode(want[1:]) == "01+2="
    out = json.loads(lopd("eval", "-c", str(cfg), "-q").stdout.splitlines()[-1])
    assert out["pass@1"] in (0.0, 1.0)
