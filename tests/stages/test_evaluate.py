"""pipeline/stages/evaluate.py: `lopd eval` writes its JSON and Markdown reports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import lopd

pytestmark = pytest.mark.integration


def test_eval_writes_json_and_markdown(shards_run):
    tmp, cfg = shards_run
    res = lopd("eval", "-c", str(cfg), "-q", "--set", f"eval.model={tmp / 'run' / 'sft_student'}",
               "--set", "eval.samples={n: 3, temperature: 1.0, max_new_tokens: 12}")
    out = json.loads(res.stdout.strip().splitlines()[-1])
    data = json.loads((Path(out["out"]) / "eval.json").read_text())
    assert data["greedy"]["samples"] == 48 and data["sampled"]["samples"] == 144
    assert 0 <= data["pass@1"] <= 1 and data["pass@3"] >= data["avg@3"]
    assert "| model |" in (Path(out["out"]) / "eval.md").read_text()
