"""What a run reports: the metrics file, the training curves, throughput, MFU and memory."""

from __future__ import annotations

import importlib.util
import json
import math
import resource
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.progress import log


class MetricsWriter:
    """Appends one JSON object per step to ``metrics.jsonl`` (main rank only). On resume it truncates
    lines past the checkpoint step, so the file always tells one consistent history. ``tracker`` (the run's
    ``pipeline.tracking.Trackers``, main rank) gets every record written."""

    def __init__(self, path: Path, enabled: bool = True, resume_step: int = 0, tracker: Any | None = None):
        self.path = Path(path)
        self.enabled = enabled
        self.tracker = tracker
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self.path.exists():
                kept = [line for line in self.path.read_text().splitlines()
                        if line.strip() and json.loads(line).get("step", 0) <= resume_step]
                self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
            if self.tracker is not None:
                self.tracker.log(record)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_metrics(metrics_path: Path, out_png: Path, keys: list[str] | None = None, title: str = "") -> Path | None:
    """One PNG with a panel per metric (loss parts, KL estimate, accuracy...) against the step. None (with a
    warning) where matplotlib is missing, e.g. a bare GPU image: metrics.jsonl holds every figure anyway."""
    if importlib.util.find_spec("matplotlib") is None:
        log.warning("matplotlib is not installed: no %s (%s holds every figure)", out_png.name, metrics_path)
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    if not rows:
        return None
    keys = keys or [k for k in rows[-1] if k.startswith(("loss/", "lightning/", "is/", "eval/", "kl/"))]
    keys = [k for k in keys if any(k in r for r in rows)]
    if not keys:
        return None
    cols = min(3, len(keys))
    nrows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.0 * nrows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        pts = [(r["step"], r[key]) for r in rows if key in r and r[key] is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 30 else None)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png

# Dense bf16 peak FLOP/s per device, for the MFU estimate (fp32 runs use TF32 peaks at half of these).
_PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0,
                     "B200": 2250.0, "GB200": 2500.0}


def detect_peak_tflops(device: torch.device, precision: str) -> float | None:
    """Peak dense TFLOP/s of this rank's GPU (None on CPU or an unknown GPU: give ``peak_tflops``)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in _PEAK_BF16_TFLOPS.items():
        if key in name:
            return tflops if precision == "bf16" else tflops / 2
    return None


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory of this rank: allocated GPU memory, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**30 if sys.platform == "darwin" else rss / 2**20


@dataclass
class StepMeter:
    """Throughput counters of a run: model tokens (attended, for FLOPs), padded positions, time computing and
    time waiting for data. ``metrics`` turns them into the perf/* keys people watch at scale."""

    flop_params: int
    world_size: int
    peak_tflops: float | None = None
    tokens: int = 0  # global response tokens trained on (the loss's tokens)
    model_tokens: int = 0  # global attended tokens through the model (prompt + response)
    padded: int = 0  # this rank's padded positions
    slots: int = 0  # this rank's B x L positions
    seconds: float = 0.0  # wall time of steps, data wait included
    data_seconds: float = 0.0
    skipped_steps: int = 0  # steps whose update was skipped (non-finite gradient norm)
    head_params: int = 0  # the LM head's parameters (within flop_params): they run on the response tokens only

    def state_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("tokens", "model_tokens", "padded", "slots", "seconds", "data_seconds",
                                              "skipped_steps")}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, v in state.items():
            setattr(self, k, v)

    def count_positions(self, attention_B_L: torch.Tensor, packed: bool) -> None:
        """Count a micro-batch's positions: B x L with padding, only the real tokens when packed."""
        real = int(attention_B_L.sum())
        self.slots += real if packed else attention_B_L.numel()
        self.padded += 0 if packed else attention_B_L.numel() - real

    def metrics(self, device: torch.device) -> dict[str, float]:
        seconds = max(self.seconds, 1e-9)
        out = {"perf/tokens_per_s": round(self.tokens / seconds, 1),
               "perf/model_tokens_per_s": round(self.model_tokens / seconds, 1),
               "perf/padding_frac": round(self.padded / max(self.slots, 1), 4),
               "perf/data_wait_frac": round(self.data_seconds / seconds, 4),
               "perf/peak_mem_gb": round(peak_memory_gb(device), 3)}
        if self.peak_tflops:
            # the decoder runs on every attended token, the chunked LM head only on the response tokens
            flops = 6.0 * ((self.flop_params - self.head_params) * self.model_tokens + self.head_params * self.tokens)
            out["perf/mfu"] = round(flops / seconds / (self.peak_tflops * 1e12 * self.world_size), 4)
        return out
