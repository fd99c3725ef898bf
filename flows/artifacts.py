"""Prefect artifacts of a flow run: an eval's table, a run report, the paths of its plots."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE


@task(cache_policy=NO_CACHE)
def publish_eval_table(eval_dir: Path) -> None:
    """Publish an eval's Markdown table (eval.md) as the ``eval-table`` artifact."""
    create_markdown_artifact(markdown=(eval_dir / "eval.md").read_text(), key="eval-table",
                             description=f"greedy accuracy on held-out prompts ({eval_dir})")


@task(cache_policy=NO_CACHE)
def publish_report(markdown_file: Path) -> None:
    """Publish a run report (e.g. demo.md: accuracy table, time to accuracy) as the ``lopd-report`` artifact."""
    create_markdown_artifact(markdown=markdown_file.read_text(), key="lopd-report", description=str(markdown_file))


@task(cache_policy=NO_CACHE)
def publish_plots(plots: dict[str, str]) -> None:
    """Publish the paths of a run's plots (PNG files on the machine that ran the flow) as the ``plots`` artifact."""
    rows = [f"| {name} | [{Path(p).name}]({Path(p).resolve().as_uri()}) | `{Path(p).resolve()}` |"
            for name, p in plots.items()]
    create_markdown_artifact(markdown="\n".join(["| plot | link | path |", "|---|---|---|", *rows]) + "\n",
                             key="plots", description="plots written by this flow run")
