"""pipeline/tracking.py: `report_to` in `lopd train` (and `lopd eval`) on the tiny shards; every logged scalar and the
hyperparameters read back with each library's own reader (TensorBoard's event reader, wandb's record protobufs from
the offline run file, the MLflow client on the file store, trackio's SQLite storage), equal to metrics.jsonl."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

from pipeline.config import load_run_config
from pipeline.tracking import flatten, scalars
from pipeline.train.metrics import read_metrics
from tests.conftest import REPO, lopd

pytestmark = pytest.mark.integration

TRACKERS = "[tensorboard, wandb, mlflow, trackio]"


def _wandb_records(path):
    """The protobuf records of a wandb offline run file: a 7-byte header, then 32 KiB blocks of LevelDB-log framed
    records (crc32, little-endian length, type: 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2

    data, pos, block, part, records = path.read_bytes(), 7, 32768, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            pos += left
            continue
        part += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(part)
            records.append(record)
            part = b""
    return records


def test_report_to_every_tracker_logs_what_metrics_jsonl_holds(shards_run, tmp_path, monkeypatch):
    tmp, cfg = shards_run
    out = tmp_path / "train"
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))
    sets = [f"train.out={out}", "train.steps=3", f"train.report_to={TRACKERS}", "train.run_name=tiny",
            f"train.eval={{prompts: {tmp / 'prompts.jsonl'}, every: 2, limit: 4, max_new_tokens: 12}}"]
    lopd("train", "-c", str(cfg), "-q", *[a for s in sets for a in ("--set", s)])
    config = load_run_config(cfg, sets).stage("train").model_dump(mode="json")
    rows = read_metrics(out / "metrics.jsonl")
    want = {r["step"]: scalars(r) for r in rows}
    assert sorted(want) == [0, 1, 2, 3] and "eval/pass@1" in want[2] and "loss/total" in want[3]

    # TensorBoard: scalars (float32) and the hparams plugin's session start
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    got = {}
    for tag in events.Tags()["scalars"]:
        for event in events.Scalars(tag):
            got.setdefault(event.step, {})[tag] = event.value
    assert got == {step: {k: float(np.float32(v)) for k, v in values.items()} for step, values in want.items()}
    content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    numbers = {k: float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v
               for k, v in flatten(config).items()}
    assert {k: getattr(v, v.WhichOneof("kind")) for k, v in hparams.items()} == numbers

    # wandb: the offline run's history and config records
    (run_file,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
    records = _wandb_records(run_file)
    history = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            items = {i.key or ".".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            history[items.pop("_step")] = {k: v for k, v in items.items() if not k.startswith("_")}
    assert history == want
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run.display_name == "tiny" and run.project == "lopd"
    logged = {i.key or ".".join(i.nested_key): json.loads(i.value_json) for i in run.config.update}
    assert {k: v for k, v in logged.items() if k != "_wandb"} == config

    # MLflow: the file store through its client; '@' is not allowed in its metric names
    from mlflow.tracking import MlflowClient

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient((out / "mlruns").as_uri())
    (found,) = client.search_runs([client.get_experiment_by_name("lopd").experiment_id])
    assert found.info.run_name == "tiny"
    assert found.data.params == {k: str(v) for k, v in flatten(config).items()}
    got = {}
    for key in found.data.metrics:
        for m in client.get_metric_history(found.info.run_id, key):
            got.setdefault(m.step, {})[key.replace("_at_", "@")] = m.value
    assert got == want

    # trackio: its SQLite storage
    from trackio.sqlite_storage import SQLiteStorage

    logs = SQLiteStorage.get_logs("lopd", "tiny")
    assert {r["step"]: {k: v for k, v in r.items() if k not in ("step", "timestamp")} for r in logs} == want
    assert {k: v for k, v in SQLiteStorage.get_run_config("lopd", "tiny").items() if not k.startswith("_")} == config


def test_a_tracker_that_cannot_start_stops_the_run_before_its_first_step(shards_run, tmp_path):
    tmp, cfg = shards_run
    out = tmp_path / "train"
    res = subprocess.run([sys.executable, "-m", "lopd.cli", "train", "-c", str(cfg), "--set", f"train.out={out}",
                          "--set", "train.report_to=[tensorboard, wandb]"], capture_output=True, text=True, cwd=REPO,
                         env={**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "nonsense"}, timeout=300)
    assert res.returncode == 2 and "train.report_to: wandb failed to start" in res.stderr
    assert not (out / "metrics.jsonl").exists() or read_metrics(out / "metrics.jsonl") == []
    assert not (out / "ckpt").exists()


def test_eval_reports_its_results_to_the_trackers(shards_run, tmp_path):
    tmp, cfg = shards_run
    out = tmp_path / "eval"
    lopd("eval", "-c", str(cfg), "-q", "--set", f"eval.model={tmp / 'run' / 'sft_student'}", "--set",
         f"eval.out={out}", "--set", "eval.limit=4", "--set", "eval.report_to=[tensorboard]")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    result = json.loads((out / "eval.json").read_text())
    assert [(e.step, e.value) for e in events.Scalars("eval/pass@1")] == [(0, float(np.float32(result["pass@1"])))]
