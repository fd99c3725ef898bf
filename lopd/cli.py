"""The ``lopd`` command: a thin layer over the stage functions (and over ``flows/`` for Prefect).

Every stage reads one YAML run file (``--config``) and accepts ``--set section.field=value`` overrides.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.text import Text

app = typer.Typer(
    name="lopd",
    help="Offline-first on-policy distillation (Lightning OPD): teacher SFT data -> SFT -> rollouts -> "
    "teacher top-k log-probs (once, into Parquet shards) -> offline OPD training with no live teacher.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
shards_app = typer.Typer(help="Inspect, show, export and verify teacher/rollout shard directories.",
                         no_args_is_help=True)
bench_app = typer.Typer(help="Benchmarks that print one JSON object (speed and size; never run as tests).",
                        no_args_is_help=True)
config_app = typer.Typer(help="Show the resolved run config.", no_args_is_help=True)
prompts_app = typer.Typer(help="Prompt files from benchmark sets.", no_args_is_help=True)
app.add_typer(shards_app, name="shards")
app.add_typer(config_app, name="config")
app.add_typer(prompts_app, name="prompts")
app.add_typer(bench_app, name="bench")

console = Console(stderr=True)
REPO_CONFIGS = Path(__file__).resolve().parents[1] / "configs"

ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="run YAML file (see configs/)")]
SetOpt = Annotated[Optional[list[str]],
                   typer.Option("--set", "-s", help="override, e.g. --set train.steps=50 (repeatable)")]
RunDirOpt = Annotated[Optional[Path], typer.Option("--run-dir", help="override the run_dir of the config")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="no progress bars")]


def _setup_logging(verbose: bool = False) -> None:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s",
                        handlers=[RichHandler(console=console, show_path=False, markup=False)], force=True)
    for noisy in ("httpx", "transformers", "prefect", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def _user_errors() -> tuple[type[BaseException], ...]:
    """The errors people can fix (config, prompts, model dirs, shards, teacher/tokenizer mismatch). Anything
    else is a bug in lopd and keeps its traceback."""
    from pipeline.stages.teacher_logprobs import TokenizerMismatchError  # a ValueError, not yet a LopdUserError
    from storage.errors import LopdUserError

    return (LopdUserError, TokenizerMismatchError)


def _error_line(message: str) -> None:
    console.print(Text.assemble(("error: ", "bold red"), " ".join(message.split())), soft_wrap=True)


def _run(fn: Callable[[], Any]) -> Any:
    """Run a command; turn the errors people can fix into one red line and exit code 2."""
    _setup_logging()
    try:
        return fn()
    except _user_errors() as e:
        _error_line(str(e))
        raise typer.Exit(2) from None
    finally:
        _leave_process_group()


def _leave_process_group() -> None:
    """Under torchrun, leave the process group a trainer joined (``pipeline.train.distributed.leave_distributed``);
    a command that never loaded a trainer does not import torch for it."""
    if "pipeline.train.distributed" in sys.modules:
        from pipeline.train.distributed import leave_distributed

        leave_distributed()


def _stage(name: str, config: Path, overrides: list[str] | None, run_dir: Path | None, quiet: bool,
           **extra: Any) -> None:
    from pipeline.config import load_run_config
    from pipeline.stages import registry

    def go() -> None:
        cfg = load_run_config(config, overrides, run_dir)
        result = registry.run_stage(name, cfg.stage(name), show_progress=not quiet, **extra)
        print(json.dumps(result.to_dict(), default=str))

    _run(go)


@app.command("make-models")
def make_models(
    out: Annotated[Path, typer.Option(help="directory for teacher_init/ and student_init/")],
    config: Annotated[Optional[Path], typer.Option(help="run YAML whose `demo` section sets the sizes")] = None,
) -> None:
    """Create the demo world's tokenizer and untrained teacher/student as standard HF model directories."""
    from pipeline.config import DemoConfig, load_run_config
    from pipeline.demo.world import make_models as _make

    def go() -> None:
        demo = load_run_config(config).demo() if config else DemoConfig()
        paths = _make(out, demo.teacher, demo.student, seed=demo.seed)
        print(json.dumps({k: str(v) for k, v in paths.items()}))

    _run(go)


@app.command("make-prompts")
def make_prompts(
    out: Annotated[Path, typer.Option(help="directory for train/opd/test prompt files (JSONL)")],
    config: Annotated[Optional[Path], typer.Option(help="run YAML whose `demo` section sets the counts")] = None,
) -> None:
    """Write the demo task's prompt files: teacher-SFT prompts, OPD prompts and held-out test prompts."""
    from pipeline.config import DemoConfig, load_run_config
    from pipeline.demo.experiment import write_demo_prompts

    def go() -> None:
        demo = load_run_config(config).demo() if config else DemoConfig()
        print(json.dumps({k: str(v) for k, v in write_demo_prompts(out, demo).items()}))

    _run(go)


@app.command("bootstrap-teacher")
def bootstrap_teacher(
    config: ConfigOpt = REPO_CONFIGS / "demo.yaml",
    style: Annotated[str, typer.Option(help="solution style: A (main teacher) or B (the inconsistent one)")] = "A",
    set_: SetOpt = None, run_dir: RunDirOpt = None, quiet: QuietOpt = False,
) -> None:
    """Demo world only: train the demo teacher from scratch on correct solutions (real use brings a teacher)."""
    from pipeline.config import load_run_config
    from pipeline.demo.experiment import ensure_world

    def go() -> None:
        cfg = load_run_config(config, set_, run_dir)
        world = ensure_world(cfg, styles=(style,), show_progress=not quiet)
        print(json.dumps({k: (str(v) if isinstance(v, Path) else v) for k, v in world.items()}, default=str))

    _run(go)


@app.command("teacher-sft-data")
def teacher_sft_data(config: ConfigOpt, set_: SetOpt = None, run_dir: RunDirOpt = None,
                     quiet: QuietOpt = False) -> None:
    """Stage 1: the teacher answers the training prompts -> SFT data shards stamped with its fingerprint."""
    _stage("teacher_sft_data", config, set_, run_dir, quiet)


@app.command("sft")
def sft(config: ConfigOpt, set_: SetOpt = None, run_dir: RunDirOpt = None, quiet: QuietOpt = False) -> None:
    """Stage 1b: fine-tune the student on the teacher's answers (writes an HF model dir). Resumes from its latest
    checkpoint. Multi-GPU / multi-node: `torchrun --nproc-per-node N --no-python lopd sft -c C` (sft.fsdp: true
    for FSDP2)."""
    _stage("sft", config, set_, run_dir, quiet)


@app.command("rollouts")
def rollouts(config: ConfigOpt, set_: SetOpt = None, run_dir: RunDirOpt = None, quiet: QuietOpt = False) -> None:
    """Stage 2: the SFT student samples n rollouts per prompt, once (with behaviour log-probs)."""
    _stage("rollouts", config, set_, run_dir, quiet)


@app.command("teacher-logprobs")
def teacher_logprobs(
    config: ConfigOpt, set_: SetOpt = None, run_dir: RunDirOpt = None, quiet: QuietOpt = False,
    allow_teacher_mismatch: Annotated[bool, typer.Option(
        "--allow-teacher-mismatch", help="score even if this teacher did not write the SFT data (ablations)")] = False,
) -> None:
    """Stage 3: the teacher scores all rollouts once -> compressed top-k Parquet shards (resumable)."""
    overrides = list(set_ or []) + (["teacher_logprobs.allow_teacher_mismatch=true"] if allow_teacher_mismatch else [])
    _stage("teacher_logprobs", config, overrides, run_dir, quiet)


@app.command("train")
def train(
    config: ConfigOpt, set_: SetOpt = None, run_dir: RunDirOpt = None, quiet: QuietOpt = False,
    online: Annotated[bool, typer.Option("--online", help="online OPD baseline: live teacher every step")] = False,
) -> None:
    """Stage 4: offline OPD from the shards (no teacher loaded). Resumes from the latest checkpoint.
    Multi-GPU / multi-node: `torchrun --nproc-per-node N --no-python lopd train -c C`."""
    from pipeline.config import ConfigError, load_run_config

    def check_online() -> None:
        if load_run_config(config, set_, run_dir).stage("train").online is None:
            raise ConfigError(f"{config}: --online needs a train.online section (teacher, prompts) in the config")

    if online:
        _run(check_online)
    _stage("train", config, set_, run_dir, quiet, online=online)


@app.command("eval")
def eval_(config: ConfigOpt, set_: SetOpt = None, run_dir: RunDirOpt = None, quiet: QuietOpt = False) -> None:
    """Held-out accuracy: greedy pass@1 (eval.greedy), and with eval.samples (n answers per problem) avg@n, the
    unbiased pass@k and maj@k for each k in eval.ks; writes eval.json, eval.md and eval_problems.jsonl."""
    _stage("eval", config, set_, run_dir, quiet)


@app.command("run")
def run_all(
    config: ConfigOpt, set_: SetOpt = None, run_dir: RunDirOpt = None, quiet: QuietOpt = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="print which stages would run, resume or be skipped "
                                                            "as complete, and why; run nothing")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="with --dry-run: the plan as JSON")] = False,
) -> None:
    """All stages in order without Prefect (each skips work that is already complete)."""
    from pipeline.config import STAGES, load_run_config
    from pipeline.stages import registry

    def go() -> None:
        cfg = load_run_config(config, set_, run_dir)
        if dry_run:
            from pipeline.stages.plan import plan_run, plan_table, plans_json

            plans = plan_run(cfg)
            print(json.dumps(plans_json(plans)) if json_out else plan_table(plans), end="\n" if json_out else "")
            return
        for name in STAGES:
            if name in cfg.sections:
                print(json.dumps(registry.run_stage(name, cfg.stage(name), show_progress=not quiet).to_dict(),
                                 default=str))

    _run(go)


@config_app.command("show")
def config_show(config: ConfigOpt, set_: SetOpt = None, run_dir: RunDirOpt = None) -> None:
    """Print the resolved run config: every section of the file validated, with the defaults, the conventional
    paths and every --set filled in (YAML; `lopd <stage> -c` reads it back unchanged)."""
    from pipeline.config import load_run_config
    from pipeline.stages.plan import dump_yaml, resolved_run_config

    _run(lambda: print(dump_yaml(resolved_run_config(load_run_config(config, set_, run_dir))), end=""))


@app.command("demo")
def demo(
    run_dir: Annotated[Optional[Path], typer.Option(help="where everything is written (default: the config's "
                                                         "run_dir); a rerun reuses finished stages")] = None,
    config: ConfigOpt = REPO_CONFIGS / "demo.yaml",
    set_: SetOpt = None,
    json_out: Annotated[bool, typer.Option("--json", help="print only the result JSON on stdout")] = False,
    prefect: Annotated[bool, typer.Option("--prefect/--no-prefect", help="run the stages as a Prefect flow")] = False,
    seed: Annotated[Optional[int], typer.Option(help="reseed the whole world: prompts, teachers, "
                                                     "sampling, SFT, OPD")] = None,
    quiet: QuietOpt = False,
) -> None:
    """The whole method on the built-in CPU world: bootstrap teachers, SFT, rollouts, shards, offline OPD
    (lopd's top-k loss), eval, plus the published Lightning OPD loss, the ablations (inconsistent teacher,
    online OPD) and the SFT controls (continued SFT; the SFT curve: SFT on 1, 2, 4, 8 teacher answers per OPD
    prompt), each row's teacher and student compute, and the break-even of the SFT curve against OPD.
    Independent steps run side by side on demo.workers processes (default 2; the same numbers with 1).
    The default world is 2-digit addition with a direct guess before the steps (the student's wrong guesses are
    states the teacher's answers rarely show); configs/demo-steps.yaml (3-digit) and configs/demo-long.yaml (5-digit)
    are the earlier step-by-step worlds."""
    from pipeline.config import load_run_config

    if seed is not None:
        set_ = [f"demo.seed={seed}", f"sft.seed={seed}", f"train.seed={seed}",
                f"teacher_sft_data.sampling.seed={seed}", f"rollouts.sampling.seed={seed + 1}", *(set_ or [])]

    def go() -> None:
        cfg = load_run_config(config, set_, run_dir)
        if prefect:
            from flows.demo import demo_flow

            result = demo_flow(config_path=str(config), run_dir=str(cfg.run_dir), overrides=list(set_ or []))
            if not json_out:
                from pipeline.demo.experiment import print_demo_table

                print_demo_table(result)
        else:
            from pipeline.demo.experiment import run_demo

            result = run_demo(cfg, show_progress=not (quiet or json_out), print_table=not json_out)
        if json_out:
            print(json.dumps(result, default=str))

    _run(go)


@app.command("ablate")
def ablate(
    config: ConfigOpt = REPO_CONFIGS / "ablate.yaml",
    set_: Annotated[Optional[list[str]], typer.Option("--set", "-s", help="override a field of the ablation "
                    "YAML, e.g. --set 'seeds=[0]' --set steps=50 (repeatable)")] = None,
    run_dir: Annotated[Optional[Path], typer.Option(help="the demo run dir to reuse "
                                                         "(default: the demo config's)")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="print only the result JSON on stdout")] = False,
    quiet: QuietOpt = False,
) -> None:
    """Every method and base loss from the demo's SFT student and shards, several seeds each: mean and spread of
    greedy accuracy, pass@k and training seconds per row (<run_dir>/ablate/ablate.md, .json, .png). Builds the
    demo world and its stages 1-3 when missing; a rerun reuses every finished row x seed."""
    from pipeline.demo.ablate import load_ablate_config, run_ablation

    def go() -> None:
        result = run_ablation(load_ablate_config(config, set_, run_dir), show_progress=not (quiet or json_out))
        if json_out:
            print(json.dumps(result, default=str))
        else:
            Console().print(Path(result["table"]).read_text())
            console.print(f"results: {result['table']}, ablate.json, ablate.png")

    _run(go)


@app.command("serve")
def serve(
    name: Annotated[str, typer.Option(help="deployment name suffix")] = "demo",
    limit: Annotated[int, typer.Option(help="max concurrent flow runs")] = 1,
) -> None:
    """Register and serve the Prefect deployments (lightning-opd/demo and one per stage). Needs a Prefect
    API (`prefect server start`); then `prefect deployment run 'lightning-opd/demo'`."""
    _setup_logging()
    from flows.deployments import serve_all

    serve_all(name=name, limit=limit)


@prompts_app.command("preset")
def prompts_preset(
    name: Annotated[str, typer.Argument(help="aime24, aime25, math500 or gsm8k")],
    source: Annotated[Path, typer.Option("--from", help="the set's local copy in its hub layout: a save_to_disk or "
                                         "data-files directory, or a .jsonl / .parquet file")],
    out: Annotated[Path, typer.Option(help="prompts file to write (JSONL)")],
    split: Annotated[Optional[str], typer.Option(help="split of a datasets directory (default: the set's own)")] = None,
    instruction: Annotated[Optional[str], typer.Option(help="appended to each problem (default: the \\boxed{} "
                                                            "request; '' for none)")] = None,
) -> None:
    """A benchmark (AIME24/25, MATH-500, GSM8K) as a lopd prompts file (id, prompt, answer) for `lopd eval` with
    `checker: math`; answers normalised for the checker (docs: pipeline/presets.py)."""
    from pipeline.presets import INSTRUCTION, PRESETS, write_preset
    from storage.errors import LopdUserError

    def go() -> None:
        if name not in PRESETS:
            raise LopdUserError(f"unknown preset {name!r}; one of {', '.join(PRESETS)}")
        rows = write_preset(name, source, out, split, INSTRUCTION if instruction is None else instruction)
        print(json.dumps({"preset": name, "rows": rows, "out": str(out)}))

    _run(go)


@shards_app.command("inspect")
def shards_inspect(path: Path) -> None:
    """Schema, counts, k, codec, fingerprints and bytes/token of a shard directory."""
    from storage.inspect import inspect_shards

    _run(lambda: print(json.dumps(inspect_shards(path), indent=2, default=str)))


@shards_app.command("show")
def shards_show(
    path: Path,
    rows: Annotated[int, typer.Option("--rows", "-n", help="rollouts to show")] = 2,
    positions: Annotated[int, typer.Option(help="response positions shown per rollout")] = 32,
    top: Annotated[int, typer.Option(help="teacher top-k entries shown per position")] = 5,
    tokenizer: Annotated[Optional[Path], typer.Option(help="model dir whose tokenizer decodes the ids (default: "
                                                          "the one recorded in the shards' provenance)")] = None,
) -> None:
    """A few rollouts as text: per position the sampled token, its teacher and student probabilities and the
    teacher's top-k tokens with their probabilities."""
    from pipeline.shards_view import rollout_views, shard_tokenizer

    def go() -> None:
        out = Console(width=max(Console().width, 140))
        for view in rollout_views(path, shard_tokenizer(path, tokenizer), rows=rows, positions=positions, top=top):
            out.print(view)

    _run(go)


@shards_app.command("export")
def shards_export(
    path: Path,
    readable: Annotated[Path, typer.Option("--readable", help="directory for the plain Parquet files (one per "
                                                            "shard; list columns any Parquet reader understands)")],
    text: Annotated[bool, typer.Option("--text/--no-text", help="add the token text columns (tokens, "
                                                                "topk_tokens) decoded with the tokenizer")] = True,
    tokenizer: Annotated[Optional[Path], typer.Option(help="model dir whose tokenizer decodes the ids (default: "
                                                          "the one recorded in the shards' provenance)")] = None,
) -> None:
    """Write a shard set as plain Parquet that polars, duckdb, pandas and HF datasets read without lopd: token ids,
    log-probs and the teacher's top-k as list columns (decoded, not codec bytes), plus the token text."""
    from storage.inspect import export_readable

    def go() -> None:
        decorate = None
        if text:
            from pipeline.shards_view import shard_tokenizer, with_token_text

            decorate = with_token_text(shard_tokenizer(path, tokenizer))
        print(json.dumps(export_readable(path, readable, decorate), indent=2))

    _run(go)


@shards_app.command("verify")
def shards_verify(path: Path) -> None:
    """Checksums and metadata consistency; exit code 1 on any problem."""
    from storage.inspect import verify_shards

    def go() -> None:
        problems = verify_shards(path)
        for p in problems:
            console.print(Text.assemble(("problem: ", "red"), p), soft_wrap=True)
        if problems:
            raise typer.Exit(1)
        console.print(f"[green]ok:[/] {path}")

    _run(go)


@bench_app.command("storage")
def bench_storage(
    json_out: Annotated[bool, typer.Option("--json")] = True,
    consumer_tokens_per_s: Annotated[float, typer.Option(help="training rate per rank the reader "
                                                              "must keep up with")] = 7500.0,
) -> None:
    """Bytes/token, decode error and read/write speed of the top-k codecs (demo and 151,936-vocab cases)."""
    from storage.bench import run_storage_bench

    print(json.dumps(_run(lambda: run_storage_bench(consumer_tokens_per_s=consumer_tokens_per_s)), default=str))


@bench_app.command("extract")
def bench_extract(
    json_out: Annotated[bool, typer.Option("--json")] = True,
    engine: Annotated[str, typer.Option(help="hf or vllm")] = "hf",
    model: Annotated[Optional[Path], typer.Option(help="teacher model dir (default: a demo-size model)")] = None,
) -> None:
    """Teacher scoring throughput with the full write path vs the bare forward pass."""
    from pipeline.bench.stages import bench_extract as _bench

    print(json.dumps(_run(lambda: _bench(engine=engine, model_dir=model)), default=str))


@bench_app.command("train")
def bench_train(json_out: Annotated[bool, typer.Option("--json")] = True) -> None:
    """Tokens/s of offline OPD vs online OPD on the same model pair and batch shape."""
    from pipeline.bench.stages import bench_train as _bench

    print(json.dumps(_run(_bench), default=str))


@bench_app.command("data-stall")
def bench_data_stall(
    consumer_tokens_per_s: Annotated[float, typer.Option(help="the trainer's tokens/s per rank (default: 8 GPUs x "
                                                              "8B at 40% MFU)")] = 7500.0,
    rows: Annotated[int, typer.Option(help="4,096-token rollouts read (one epoch)")] = 24,
    json_out: Annotated[bool, typer.Option("--json")] = True,
) -> None:
    """The trainer's wait for data: decode + split + collate of 4,096-token rows (k 20 and 128) inside the step
    vs on the prefetch thread, against a consumer at --consumer-tokens-per-s."""
    from pipeline.bench.stages import bench_data_stall as _bench

    print(json.dumps(_run(lambda: _bench(rows=rows, consumer_tokens_per_s=consumer_tokens_per_s)), default=str))


@bench_app.command("train-memory")
def bench_train_memory(
    json_out: Annotated[bool, typer.Option("--json")] = True,
    lengths: Annotated[str, typer.Option(help="sequence lengths, comma-separated")] = "1024,4096,8192",
    losses: Annotated[str, typer.Option(help="losses, comma-separated")] = ",".join(
        ("lightning", "reverse_kl_topk", "forward_kl_topk", "jsd_topk", "tvd_topk", "sft")),
    max_full_tokens: Annotated[int, typer.Option(help="longest T run through the old full-logit path "
                                                 "(its B x T x V tensors outgrow the machine beyond)")] = 4096,
    chunk_tokens: Annotated[int, typer.Option(help="LM-head chunk in tokens (0: the trainer's default for the "
                                              "vocabulary)")] = 0,
) -> None:
    """Peak memory, speed and exactness of one training step: the old full-logit path vs the chunked LM head,
    on a random-init Qwen3-shaped student (hidden 1024, 2 layers, vocab 151,936), one process per case."""
    from pipeline.bench.scale import bench_train_memory as _bench

    print(json.dumps(_run(lambda: _bench(tuple(int(x) for x in lengths.split(",")), tuple(losses.split(",")),
                                         max_full_tokens=max_full_tokens, chunk_tokens=chunk_tokens or None)),
                     default=str))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
