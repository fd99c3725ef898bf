"""Fingerprints: who produced an artefact. One function per thing fingerprinted, one place that compares.

A model fingerprint hashes its config, its weights and its tokenizer. A tokenizer fingerprint covers the
vocabulary, the special tokens and the chat template (a renderer difference between sampling and scoring
biases OPD, so a changed chat template must change the fingerprint).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

from storage.errors import LopdUserError, MissingInputError
from storage.shardset import identity

PROVENANCE_FILE = "lopd_provenance.json"
_CHUNK = 1 << 20
_FULL_HASH_LIMIT = 256 << 20  # hash weight files up to 256 MiB whole; sample larger ones


def _hash_file(h: "hashlib._Hash", path: Path) -> None:
    size = path.stat().st_size
    h.update(f"{path.name}:{size}".encode())
    with path.open("rb") as f:
        if size <= _FULL_HASH_LIMIT:
            for chunk in iter(lambda: f.read(_CHUNK), b""):
                h.update(chunk)
        else:
            # 8B-30B checkpoints: 64 evenly spaced 1 MiB chunks plus the header distinguish any two
            # trained models in practice, at a cost of seconds instead of minutes.
            for i in range(64):
                f.seek(i * (size - _CHUNK) // 63)
                h.update(f.read(_CHUNK))


def tokenizer_fingerprint(model_dir: str | Path) -> str:
    """Hash of the tokenizer files (vocab, merges, special tokens, chat template)."""
    d = Path(model_dir)
    h = hashlib.sha256()
    names = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
             "vocab.json", "merges.txt", "tokenizer.model")
    found = False
    for name in names:
        p = d / name
        if p.exists():
            found = True
            h.update(name.encode())
            h.update(p.read_bytes())
    if not found:
        raise MissingInputError(f"{d}: no tokenizer files (tokenizer.json / tokenizer_config.json); point to a model "
                                "directory saved with its tokenizer")
    return "tok-" + h.hexdigest()[:16]


def model_fingerprint(model_dir: str | Path) -> str:
    """Hash of config.json, every weight file and the tokenizer of a model directory."""
    d = Path(model_dir)
    if not (d / "config.json").exists():
        raise MissingInputError(f"{d}: not a model directory (no config.json); point to a Hugging Face model directory")
    h = hashlib.sha256()
    cfg = json.loads((d / "config.json").read_text())
    cfg.pop("transformers_version", None)
    h.update(json.dumps(cfg, sort_keys=True).encode())
    weights = sorted(p for p in d.iterdir() if p.suffix in (".safetensors", ".bin") and p.is_file())
    if not weights:
        raise MissingInputError(f"{d}: no weight files (*.safetensors / *.bin); point to a saved model directory")
    for p in weights:
        _hash_file(h, p)
    h.update(tokenizer_fingerprint(d).encode())
    return "model-" + h.hexdigest()[:16]


def shard_set_fingerprint(metadata: dict) -> str:
    """What a shard set written by lopd holds, from its metadata without provenance: the fingerprints and
    settings that made it (a stage's output is a function of them), never the paths it was read from."""
    payload = json.dumps(identity(metadata), sort_keys=True).encode()
    return "shards-" + hashlib.sha256(payload).hexdigest()[:16]


def shard_data_fingerprint(manifest: dict) -> str:
    """What a trainer reads from a shard set: its content (shard checksums and totals) and identity metadata,
    never the paths it was made from. Changes whenever a shard's bytes do."""
    payload = {k: manifest.get(k) for k in ("kind", "shards", "totals")}
    payload["metadata"] = identity(manifest.get("metadata", {}))
    return "data-" + hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def read_provenance(model_dir: str | Path) -> dict:
    p = Path(model_dir) / PROVENANCE_FILE
    return json.loads(p.read_text()) if p.exists() else {}


def write_provenance(model_dir: str | Path, provenance: dict) -> None:
    (Path(model_dir) / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2, sort_keys=True))


class TeacherMismatchError(LopdUserError):
    """The scoring teacher differs from the teacher whose SFT data trained the student."""


TeacherRelation = Literal["consistent", "self_distillation", "mismatch"]


def teacher_relation(scoring_teacher: str | None, sft_teacher: str | None, rollout_student: str | None,
                     privileged_context: bool) -> TeacherRelation:
    """How the scoring teacher relates to the rollouts: "consistent" (it wrote the student's SFT data, Lightning
    OPD's condition), "self_distillation" (OPSD: the rollout policy itself scoring its own rollouts with the
    prompts' privileged context, a teacher by design), else "mismatch"."""
    if scoring_teacher == sft_teacher:
        return "consistent"
    if privileged_context and rollout_student is not None and scoring_teacher == rollout_student:
        return "self_distillation"
    return "mismatch"


def check_teacher_consistency(scoring_teacher: str, sft_teacher: str | None, *, allow_mismatch: bool,
                              rollouts_dir: str | Path, teacher_dir: str | Path, rollout_student: str | None = None,
                              privileged_context: bool = False) -> TeacherRelation:
    """Lightning OPD's key condition: the teacher that scores the rollouts must be the teacher that wrote
    the student's SFT data, or the rollout student itself with privileged context (self-distillation). Returns
    the ``teacher_relation``; a "mismatch" raises unless ``allow_mismatch``."""
    relation = teacher_relation(scoring_teacher, sft_teacher, rollout_student, privileged_context)
    if relation != "mismatch" or allow_mismatch:
        return relation
    known = sft_teacher or "unknown (the student has no lopd provenance: it was not fine-tuned by `lopd sft`)"
    selfish = (" It is the rollout student itself: self-distillation needs teacher_logprobs.privileged_context=true."
               if scoring_teacher == rollout_student else "")
    raise TeacherMismatchError(
        "Teacher consistency violated.\n"
        f"  rollouts {rollouts_dir} come from a student fine-tuned on SFT data written by teacher {known}\n"
        f"  but the scoring teacher {teacher_dir} has fingerprint {scoring_teacher}.{selfish}\n"
        "Lightning OPD needs the same teacher for the SFT data and the log-probs; with another teacher the\n"
        "offline gradient is biased and training settles at a worse point. Score with the SFT data's teacher,\n"
        "or pass --allow-teacher-mismatch (recorded in the shards) for an ablation."
    )


def check_shard_teacher(metadata: dict, where: str) -> TeacherRelation:
    """The trainer's check of a teacher top-k shard set, from what its metadata records: consistent, written as
    self-distillation, or a mismatch that ``--allow-teacher-mismatch`` let through at extraction (returned as
    "mismatch"); any other mismatch is refused naming ``where`` (the source of the run)."""
    if metadata.get("self_distillation"):
        return "self_distillation"
    relation = teacher_relation(metadata.get("teacher_fingerprint"), metadata.get("sft_teacher_fingerprint"),
                                None, False)
    if relation == "consistent" or metadata.get("teacher_mismatch_allowed"):
        return relation
    raise TeacherMismatchError(
        f"Teacher consistency violated in {where}: its shards were scored by teacher "
        f"{metadata.get('teacher_fingerprint')} but their rollouts come from a student fine-tuned on SFT data of "
        f"teacher {metadata.get('sft_teacher_fingerprint')}, and the mismatch was not allowed when they were "
        "written. Score that source with its SFT data's teacher, or rewrite it with `lopd teacher-logprobs "
        "--allow-teacher-mismatch` (recorded in the shards) for an ablation."
    )
