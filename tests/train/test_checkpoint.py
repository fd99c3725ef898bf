"""pipeline/train/checkpoint.py: pruning beyond keep_last, and loading the latest checkpoint."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.integration


def test_checkpoints_beyond_keep_last_are_pruned(tmp_path):
    from pipeline.train import checkpoint

    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    for step in (2, 4, 6, 8):
        model(torch.ones(1, 3)).sum().backward()
        opt.step()
        checkpoint.save(tmp_path, step, model=model, optimizer=opt, scheduler=sched, run_key="k",
                        trainer={"note": step}, rank_state={"rng": checkpoint.rng_state()}, rank=0, world_size=1,
                        keep_last=2)
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-000006", "step-000008"]
    assert checkpoint.latest_step(tmp_path) == 8 and checkpoint.latest_step(tmp_path / "none") == 0
    fresh = torch.nn.Linear(3, 2)
    fresh_opt = torch.optim.AdamW(fresh.parameters())
    resumed = checkpoint.load_latest(tmp_path, model=fresh, optimizer=fresh_opt, scheduler=sched, run_key="k", rank=0)
    assert resumed.step == 8 and resumed.trainer["note"] == 8 and resumed.world_size == 1
    assert torch.equal(fresh.weight, model.weight)
    assert torch.equal(fresh_opt.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    with pytest.raises(ValueError, match="different"):
        checkpoint.load_latest(tmp_path, model=fresh, optimizer=fresh_opt, scheduler=sched, run_key="other", rank=0)
