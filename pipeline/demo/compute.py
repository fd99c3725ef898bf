"""What each row of the demo cost the teacher and the student, in FLOPs and measured seconds, and the teacher budget
at which plain SFT on teacher answers matches offline OPD (the break-even of the SFT curve).

FLOPs per token, P the parameters that cost compute (the input embedding excluded unless tied):

    forward (prefill or one decode step)   2 P        training (forward + backward)   6 P

Prefill and decode cost the same FLOPs per token but not the same time: a teacher answer is a decode, one token
after another, while scoring a rollout is one prefill over all its tokens, which hardware runs far faster per
token. So the teacher's FLOPs are reported split by kind (``teacher_decode_flops``, ``teacher_prefill_flops``)
beside its measured seconds; attention's own FLOPs (small at these lengths) are left out.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from pipeline.train.metrics import read_metrics
from storage.shardset import ShardSet


def forward_flops(params: int, tokens: int) -> float:
    """2 P per token: one forward pass (a prefill token, or one decode step)."""
    return 2.0 * params * tokens


def train_flops(params: int, tokens: int) -> float:
    """6 P per token: forward and backward."""
    return 6.0 * params * tokens


@dataclass(frozen=True)
class Cost:
    """A row's compute beyond what every row shares (the world and the SFT student), by side and kind."""

    teacher_seconds: float = 0.0
    teacher_decode_flops: float = 0.0
    teacher_prefill_flops: float = 0.0
    student_seconds: float = 0.0
    student_decode_flops: float = 0.0
    student_prefill_flops: float = 0.0
    student_train_flops: float = 0.0

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    @property
    def teacher_flops(self) -> float:
        return self.teacher_decode_flops + self.teacher_prefill_flops

    @property
    def student_flops(self) -> float:
        return self.student_decode_flops + self.student_prefill_flops + self.student_train_flops

    def to_dict(self) -> dict[str, float]:
        out = {k: (round(v, 2) if k.endswith("seconds") else float(f"{v:.4g}")) for k, v in asdict(self).items()}
        return {**out, "teacher_flops": float(f"{self.teacher_flops:.4g}"),
                "student_flops": float(f"{self.student_flops:.4g}")}


def sequence_tokens(shard_root: Path) -> tuple[int, int]:
    """``(prompt tokens, response tokens)`` over every row of a shard set (samples or teacher top-k)."""
    shards = ShardSet.open(shard_root)
    prompt = response = 0
    for i in shards.complete_indices():
        table = shards.read_shard(i, columns=["token_ids", "prompt_len"])
        lengths = [len(ids) for ids in table.column("token_ids").to_pylist()]
        plens = table.column("prompt_len").to_pylist()
        prompt += sum(plens)
        response += sum(n - p for n, p in zip(lengths, plens))
    return prompt, response


def sampling_cost(params: int, prompt_tokens: int, response_tokens: int) -> tuple[float, float]:
    """``(prefill FLOPs, decode FLOPs)`` of sampling answers: the prompts once, then every answer token."""
    return forward_flops(params, prompt_tokens), forward_flops(params, response_tokens)


def break_even(curve: list[tuple[float, float]], target: float) -> dict[str, float | str | None]:
    """The teacher FLOPs at which the SFT curve ``[(teacher FLOPs, accuracy), ...]`` first reaches ``target``
    (an OPD row's accuracy), linear in log10(FLOPs) between the two budgets around the crossing.

    ``where``: "within" the measured budgets, "below" (the smallest budget already reaches it: the break-even is at
    most that budget), or "above" (no budget reaches it: SFT needs more teacher compute than was measured)."""
    points = sorted(curve)
    if points[0][1] >= target:
        return {"teacher_flops": points[0][0], "where": "below"}
    for (f0, a0), (f1, a1) in zip(points, points[1:]):
        if a0 < target <= a1:
            x = math.log10(f0) + (target - a0) / (a1 - a0) * (math.log10(f1) - math.log10(f0))
            return {"teacher_flops": float(f"{10 ** x:.4g}"), "where": "within"}
    return {"teacher_flops": None, "where": "above"}


def _last_metrics(path: Path) -> dict[str, float]:
    return [r for r in read_metrics(path) if "progress/model_tokens" in r][-1]


def training_cost(metrics_path: Path, student_params: int) -> Cost:
    """A training run's student cost: 6 P per token through the model (prompt and response), its training
    seconds (evaluation probes excluded)."""
    last = _last_metrics(metrics_path)
    return Cost(student_seconds=last["perf/train_seconds"],
                student_train_flops=train_flops(student_params, last["progress/model_tokens"]))


def online_cost(metrics_path: Path, teacher_params: int, student_params: int) -> Cost:
    """Online OPD: every step the student samples (prefill of the prompts, decode of the answers) and the live
    teacher scores the whole sequences (prefill); then the student trains on them. Seconds: the run's sampling and
    scoring time, and its training time without them."""
    last = _last_metrics(metrics_path)
    tokens, responses = last["progress/model_tokens"], last["progress/tokens"]
    score_s = last["perf/score_seconds"]  # the run's training seconds include its sampling and scoring
    return Cost(teacher_seconds=score_s, teacher_prefill_flops=forward_flops(teacher_params, tokens),
                student_seconds=last["perf/train_seconds"] - score_s,
                student_prefill_flops=forward_flops(student_params, tokens - responses),
                student_decode_flops=forward_flops(student_params, responses),
                student_train_flops=train_flops(student_params, tokens))


def answers_cost(shard_root: Path, teacher_params: int, seconds: float) -> Cost:
    """Teacher answers (SFT data): the teacher prefills each prompt and decodes each answer token."""
    prompt, response = sequence_tokens(shard_root)
    prefill, decode = sampling_cost(teacher_params, prompt, response)
    return Cost(teacher_seconds=seconds, teacher_prefill_flops=prefill, teacher_decode_flops=decode)


def rollouts_cost(shard_root: Path, student_params: int, seconds: float) -> Cost:
    """The SFT student's rollouts: a prefill of each prompt and a decode of each answer token."""
    prompt, response = sequence_tokens(shard_root)
    prefill, decode = sampling_cost(student_params, prompt, response)
    return Cost(student_seconds=seconds, student_prefill_flops=prefill, student_decode_flops=decode)


def scoring_cost(shard_root: Path, teacher_params: int, seconds: float) -> Cost:
    """The teacher scoring rollouts once: one prefill over every token of each."""
    prompt, response = sequence_tokens(shard_root)
    return Cost(teacher_seconds=seconds, teacher_prefill_flops=forward_flops(teacher_params, prompt + response))
