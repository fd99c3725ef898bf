"""Prefect flows and deployments over the stage functions of ``pipeline/``. No math here.

- ``flows.tasks``: one task per stage, the task runners that spread a stage's shards, the demo's steps as tasks.
- ``flows.caching``: the stage tasks' cache key (config + fingerprints of its inputs) and when to ignore it.
- ``flows.artifacts``: the eval table, run report and plots published as Prefect artifacts.
- ``flows.stages``: one flow per stage and ``lightning-opd``, which chains the stages of a run config (or runs
  the demo's steps in order).
- ``flows.demo``: ``demo_flow``, what ``lopd demo --prefect`` calls.
- ``flows.deployments``: ``serve_all``, what ``lopd serve`` calls.

``pipeline/`` never imports Prefect; resume never depends on Prefect's cache (each stage skips complete work).
"""

import logging
import os

# Read by Prefect when it is first imported (and inherited by the flow-run processes that `serve` starts):
# no telemetry, and the pipeline's own "lopd" log lines go to the flow-run logs in the UI.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "lopd")
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")  # lopd logs outside a flow run
logging.getLogger("lopd").setLevel(logging.INFO)
