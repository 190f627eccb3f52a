"""Find captioner weights on this machine: a folder the user names, or the HF cache.

Nothing here touches the network. Captioning models are gigabytes; a click in
the web app must never start a download or hang on an unreachable hub, so the
user fetches weights once, deliberately (``hf download <id>``), and we only
look. When they are absent, :class:`CaptionerUnavailable` says which model is
missing, where we looked, how to get it, and that ``filename`` works offline.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from captioning.errors import CaptionerUnavailable


@dataclass(frozen=True)
class ModelSpec:
    """What one backend needs on disk.

    Args:
        backend: registry name, used in messages.
        repo_id: the default Hugging Face model id.
        required: files that must be in the model folder.
        size: rough download size, so the user knows what they are in for.
        only_required: download just the ``required`` files (the repository holds more than the model needs).
    """

    backend: str
    repo_id: str
    required: tuple[str, ...]
    size: str
    only_required: bool = False


def hub_cache_dir() -> Path:
    """The Hugging Face cache, read from the environment on every call.

    huggingface_hub freezes these variables at import; reading them here keeps
    a changed ``HF_HOME`` (tests, a second app instance) effective.
    """
    explicit = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def how_to_get(spec: ModelSpec, repo_id: str | None = None) -> str:
    """Where to get the weights and where they go, in one sentence the web app and the command line both show."""
    repo_id = repo_id or spec.repo_id
    files = "".join(f" {name}" for name in spec.required) if spec.only_required and repo_id == spec.repo_id else ""
    return (f"To add it ({spec.size}): on a connected machine run `hf download {repo_id}{files}`, then copy the "
            f"Hugging Face cache to {hub_cache_dir()}. Meanwhile `filename` captions from file names and works "
            "offline (docs/captioning.md: other folders, older huggingface_hub).")


def _looks_like_hub_id(text: str) -> bool:
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "~")) and os.sep not in text.replace("/", "")


def _missing_files(folder: Path, spec: ModelSpec) -> list[str]:
    return [name for name in spec.required if not (folder / name).is_file()]


def _from_cache(repo_id: str) -> Path | None:
    """The cached snapshot folder of ``repo_id``, or None; local lookup only."""
    from huggingface_hub import snapshot_download  # imported here: only needed when no folder was named

    try:
        return Path(snapshot_download(repo_id, cache_dir=hub_cache_dir(), local_files_only=True))
    except OSError:  # LocalEntryNotFoundError is an OSError: not cached
        return None


def find_weights(spec: ModelSpec, model_path: str | None = None) -> Path:
    """Return the local folder holding ``spec``'s model.

    ``model_path`` may be a folder, or a hub id (``org/name``) to find in the
    cache instead of ``spec.repo_id``.

    Raises:
        CaptionerUnavailable: the folder does not exist, lacks a required file,
            or the model is not in the Hugging Face cache.
    """
    if model_path:
        folder = Path(model_path).expanduser()
        if folder.is_dir():
            missing = _missing_files(folder, spec)
            if missing:
                raise CaptionerUnavailable(
                    f"captioner '{spec.backend}': {folder} is not a complete model folder "
                    f"(missing {', '.join(missing)}; expected a copy of {spec.repo_id} or a model like it). "
                    + how_to_get(spec),
                    summary=f"{folder} lacks {', '.join(missing)}",
                )
            return folder
        if not _looks_like_hub_id(model_path):
            raise CaptionerUnavailable(
                f"captioner '{spec.backend}': model folder {folder} does not exist. " + how_to_get(spec),
                summary=f"{folder} does not exist",
            )
        repo_id = model_path
    else:
        repo_id = spec.repo_id
    folder = _from_cache(repo_id)
    if folder is None:
        raise CaptionerUnavailable(
            f"captioner '{spec.backend}' needs the model {repo_id}, which is not on this machine (nothing is "
            "downloaded automatically). " + how_to_get(spec, repo_id),
            summary=f"{repo_id} not downloaded",
        )
    missing = _missing_files(folder, spec)
    if missing:
        raise CaptionerUnavailable(
            f"captioner '{spec.backend}': the cached copy of {repo_id} at {folder} is incomplete "
            f"(missing {', '.join(missing)}). " + how_to_get(spec, repo_id),
            summary=f"{repo_id} incomplete",
        )
    return folder


def read_config(folder: Path) -> dict:
    """``config.json`` of a transformers model folder ({} when absent or unreadable)."""
    try:
        return json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
