"""Models by Hugging Face hub id (``teacher: Qwen/Qwen3-8B``), found in the local HF cache with no network.

A model field that names an existing directory is that directory. One that does not, and is spelled like a hub id
(``org/name`` or ``name``), is looked up in the local cache (``$HF_HOME/hub``, ``HF_HUB_CACHE``) and becomes the
snapshot directory of the cached revision ``refs/main`` points at (``huggingface_hub.snapshot_download`` with
``local_files_only=True``): everything downstream, fingerprints included, reads that directory's content, exactly
as it reads a local model directory. Nothing is downloaded; a run never touches the network. An id that is not
cached stays as written, and the stage that needs the model refuses it before loading anything
(``pipeline.stages.common.require_model_dir``) with ``not_cached_hint``'s advice.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator


def hub_id(path: str | Path) -> str | None:
    """``path`` as a hub model id, or None when it cannot be one (absolute, ``./x``, ``a/b/c``, ``..``, ``--``)."""
    text = str(path)
    if text.startswith((".", "/", "~")):
        return None
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(text)
    except HFValidationError:
        return None
    return text


def resolve_model(path: Path) -> Path:
    """A model field's value: the directory itself when it exists, else the cached snapshot directory of the hub
    id it spells, else ``path`` unchanged (the stage reports it; see ``not_cached_hint``)."""
    if path.exists():
        return path
    repo_id = hub_id(path)
    if repo_id is None:
        return path
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except LocalEntryNotFoundError:
        return path


def not_cached_hint(path: Path) -> str | None:
    """What to do about a missing model given as a hub id (None: ``path`` cannot be a hub id)."""
    repo_id = hub_id(path)
    if repo_id is None:
        return None
    from huggingface_hub.constants import HF_HUB_CACHE

    return (f"is not a directory, nor the hub id of a model in the local Hugging Face cache ({HF_HUB_CACHE}); "
            f"download it with `hf download {repo_id}` on a machine with internet (into this cache, or copy the "
            "cache over), or set HF_HOME / HF_HUB_CACHE to the cache that holds it")


# A config field holding a model: a directory, or a hub id found in the local cache (resolved on validation).
ModelPath = Annotated[Path, AfterValidator(resolve_model)]
