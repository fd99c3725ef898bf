"""pipeline/train/sources.py: several shard sets mixed by weight in one run: the draws keep each source within
one record of its share, over a long stream and under torchrun, and a mixed run stops and resumes exactly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.config import TrainConfig
from pipeline.fingerprint import read_provenance
from pipeline.stages.train import run_train
from pipeline.train.distributed import DistInfo
from pipeline.train.sources import MixedShardBatches, mixed_draws
from tests.conftest import REPO
from tests.train.helpers import two_sources


def test_mixed_draws_keep_every_source_within_one_record_of_its_share():
    weights = [5.0, 3.0, 2.0]
    counts = [0, 0, 0]
    for m in range(1, 2001):
        mixed_draws(weights, counts, 1)
        assert all(abs(c - m * w / 10.0) < 1.0 for c, w in zip(counts, weights, strict=True)), (m, counts)
    assert counts == [1000, 600, 400]
    # resuming from the counts continues the same sequence
    whole, first = [0, 0], [0, 0]
    seq = mixed_draws([1.0, 3.0], whole, 50)
    assert mixed_draws([1.0, 3.0], first, 20) + mixed_draws([1.0, 3.0], first, 30) == seq


def test_mixed_stream_honours_the_weights_over_a_long_stream(tmp_path):
    """Over 60 steps of 8 records (several epochs of each set) the records come from the sources in the weights'
    proportions, within one record at every step; each source's records are its own set's."""
    cfg = TrainConfig(student="s", shards=two_sources(tmp_path), out="o", batch_size=8, shuffle_buffer=4)
    source = MixedShardBatches(cfg, DistInfo(), micro=8, start=None)
    seen = {"a": 0, "b": 0}
    for step in range(1, 61):
        for r in source.next_records(8, 1):
            seen[r.prompt_id.removeprefix("math/").removeprefix("code/")[0]] += 1
        assert abs(seen["a"] - 6 * step) < 1 and abs(seen["b"] - 2 * step) < 1
    state = source.state_dict()
    assert state["records"] == {"math": 360, "code": 120}
    assert source.metrics(DistInfo())["source/math/frac"] == 0.75
    source.close()


def test_two_sources_train_stop_and_resume_exactly(tmp_path, tiny_models):
    """A run over two sources killed after step 3 and resumed (with the prefetching reader, then without) has the
    loss curve, per-source counts and final weights of an uninterrupted run; a single path keeps its run key."""
    from pipeline.models import load_model

    sources = two_sources(tmp_path)
    common = dict(student=tiny_models["student"], shards=sources, steps=6, batch_size=4, log_every=1,
                  checkpoint_every=1, shuffle_buffer=4, losses={"reverse_kl_topk": 1.0, "lightning": 0.5})
    run_train(TrainConfig(out=tmp_path / "ref", **common), show_progress=False)
    for depth, stop in ((2, 3), (0, None)):
        run_train(TrainConfig(out=tmp_path / "cut", prefetch_batches=depth, **common), show_progress=False,
                  stop_after=stop)

    def rows(out):
        return [json.loads(x) for x in (tmp_path / out / "metrics.jsonl").read_text().splitlines()]

    ref, cut = rows("ref"), rows("cut")
    keys = ["loss/total", "source/math/records", "source/code/records", "source/math/tokens", "source/code/tokens"]
    assert len(ref) == 6 and [[r[k] for k in keys] for r in cut] == [[r[k] for k in keys] for r in ref]
    assert ref[-1]["source/math/records"] == 18 and ref[-1]["source/code/records"] == 6
    a, b = load_model(tmp_path / "ref" / "final").state_dict(), load_model(tmp_path / "cut" / "final").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    provenance = read_provenance(tmp_path / "ref" / "final")
    assert provenance["sources"]["math"]["weight"] == 3.0
    assert provenance["sources"]["code"]["teacher_relation"] == "consistent"


@pytest.mark.integration
def test_two_sources_under_torchrun_with_two_ranks(tmp_path, tiny_models):
    """Two processes (gloo): each rank mixes its own slice of each source; the per-source counts are summed over
    the ranks at every log step (all ranks take part, no hang)."""

    import yaml

    from tests.conftest import free_port

    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "run"), "train": {
        "student": str(tiny_models["student"]), "shards": two_sources(tmp_path), "steps": 3, "batch_size": 8,
        "log_every": 1, "shuffle_buffer": 4, "losses": {"reverse_kl_topk": 1.0}}}))
    torchrun = Path(sys.executable).with_name("torchrun")
    res = subprocess.run([str(torchrun), "--nproc-per-node", "2", "--master-port", str(free_port()), "-m", "lopd.cli",
                          "train", "-c", str(cfg), "-q"], cwd=REPO,
                         capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(x) for x in (tmp_path / "run" / "train" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert [(r["source/math/records"], r["source/code/records"]) for r in rows] == [(6, 2), (12, 4), (18, 6)]
