"""Experiment trackers beside ``metrics.jsonl`` (``report_to`` in ``sft``, ``train`` and ``eval``).

Each tracker receives exactly the records the metrics file gets (``MetricsWriter.write``): every numeric value of a
record, at its ``step``; the stage's resolved config is logged once as the run's hyperparameters. Only the main
rank opens trackers. Local modes by default, a server when the library's own environment variable names one:

- ``tensorboard``: event files in ``<out>/tensorboard`` (``tensorboard --logdir`` them);
- ``wandb``: an offline run in ``<out>/wandb`` (``wandb sync`` uploads it later); ``WANDB_MODE=online`` (with
  ``WANDB_API_KEY``, ``WANDB_BASE_URL``) logs to a server; ``WANDB_PROJECT`` (default ``lopd``);
- ``mlflow``: a file store in ``<out>/mlruns``; ``MLFLOW_TRACKING_URI`` names a server or ``sqlite:///...``;
  ``MLFLOW_EXPERIMENT_NAME`` (default ``lopd``);
- ``trackio``: a SQLite database in ``<out>/trackio`` unless ``TRACKIO_DIR`` is set; ``TRACKIO_PROJECT`` (default
  ``lopd``).

MLflow's metric names cannot hold ``@``: ``eval/pass@4`` is logged there as ``eval/pass_at_4``. A resumed run opens
a new tracker run (TensorBoard: the same directory, with the events after the checkpoint's step purged).
"""

from __future__ import annotations

import importlib
import json
import os
import time
from pathlib import Path
from typing import Any, Protocol

from storage.errors import LopdUserError

TRACKERS = ("tensorboard", "wandb", "mlflow", "trackio")
# the module each tracker needs, and the extra that installs it
_MODULES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "trackio": "trackio"}


class Sink(Protocol):
    def log(self, step: int, values: dict[str, float]) -> None: ...

    def close(self) -> None: ...


def check_installed(report_to: list[str], field: str) -> None:
    """Refuse, before any work, a tracker whose library is not installed."""
    for name in report_to:
        try:
            importlib.import_module(_MODULES[name])
        except ImportError as err:
            raise LopdUserError(f"{field}.report_to: {name} is not installed ({err}); pip install 'lopd[{name}]' or "
                                f"remove it from {field}.report_to") from None


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, str | int | float | bool]:
    """Nested config -> dotted keys with scalar values (lists and null as JSON text), as hyperparameter tables
    want them."""
    flat: dict[str, str | int | float | bool] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        elif isinstance(value, (str, int, float, bool)):
            flat[f"{prefix}{key}"] = value
        else:
            flat[f"{prefix}{key}"] = json.dumps(value)
    return flat


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The numeric values of a metrics record, ``step`` aside."""
    return {k: float(v) for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


class TensorBoardSink:
    def __init__(self, out: Path, run_name: str, config: dict[str, Any], resume_step: int):
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        self.writer = SummaryWriter(str(out / "tensorboard"), purge_step=resume_step + 1 if resume_step else None)
        for summary in hparams(flatten(config), {}):
            self.writer.file_writer.add_summary(summary)
        self.writer.add_text("config", "```\n" + json.dumps(config, indent=2) + "\n```")

    def log(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    def __init__(self, out: Path, run_name: str, config: dict[str, Any], resume_step: int):
        import wandb

        self.run = wandb.init(mode=os.environ.get("WANDB_MODE", "offline"), dir=str(out),
                              project=os.environ.get("WANDB_PROJECT", "lopd"), name=run_name, config=config,
                              settings=wandb.Settings(console="off", quiet=True))

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class MlflowSink:
    def __init__(self, out: Path, run_name: str, config: dict[str, Any], resume_step: int):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if uri is None:  # MLflow keeps its file store working but asks for this opt-in
            uri = (out / "mlruns").resolve().as_uri()
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "lopd")
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
        self.run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
        params = [Param(k, str(v)[:6000]) for k, v in flatten(config).items()]
        for i in range(0, len(params), 100):  # the API's batch limit
            self.client.log_batch(self.run_id, params=params[i:i + 100])

    def log(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k.replace("@", "_at_"), v, now, step)
                                                    for k, v in values.items()])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class TrackioSink:
    def __init__(self, out: Path, run_name: str, config: dict[str, Any], resume_step: int):
        os.environ.setdefault("TRACKIO_DIR", str((out / "trackio").resolve()))
        import trackio

        self.trackio = trackio
        trackio.init(project=os.environ.get("TRACKIO_PROJECT", "lopd"), name=run_name, config=config)

    def log(self, step: int, values: dict[str, float]) -> None:
        self.trackio.log(values, step=step)

    def close(self) -> None:
        self.trackio.finish()


_SINKS: dict[str, type] = {"tensorboard": TensorBoardSink, "wandb": WandbSink, "mlflow": MlflowSink,
                           "trackio": TrackioSink}


class Trackers:
    """The open trackers of one run; ``log`` takes a metrics record (``MetricsWriter.write`` calls it)."""

    def __init__(self, sinks: dict[str, Sink]):
        self.sinks = sinks

    def log(self, record: dict[str, Any]) -> None:
        values = scalars(record)
        for sink in self.sinks.values():
            sink.log(int(record["step"]), values)

    def close(self) -> None:
        for sink in self.sinks.values():
            sink.close()

    def __enter__(self) -> "Trackers":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def open_trackers(report_to: list[str], out: Path, run_name: str, config: dict[str, Any], *, field: str,
                  resume_step: int = 0) -> Trackers:
    """Start each tracker of ``report_to`` (pass ``[]`` off the main rank), logging ``config`` as the run's
    hyperparameters; close them with ``close`` or as a context manager. A tracker that fails to start stops the run
    here, before its first step, naming it."""
    check_installed(report_to, field)
    sinks: dict[str, Sink] = {}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name in report_to:
        try:
            sinks[name] = _SINKS[name](out, run_name, config, resume_step)
        except Exception as err:  # any library's start-up failure is the user's to fix: say which tracker
            Trackers(sinks).close()
            raise LopdUserError(f"{field}.report_to: {name} failed to start ({type(err).__name__}: {err}); check "
                                f"its settings (README, Trackers) or remove it from {field}.report_to"
                                ) from None
    return Trackers(sinks)
