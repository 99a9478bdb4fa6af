"""Hugging Face Hub access: downloads (used by sources and load).

Only ``config.json``, ``model.safetensors`` and ``README.md`` are ever fetched; nothing from a repository is
executed. Errors from huggingface_hub (offline, missing repo, bad token) become one-line UserErrors.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vitconvert.errors import UserError

MODEL_FILES = ["config.json", "model.safetensors", "README.md"]


def hub_error(repo_id: str, err: Exception) -> UserError:
    """Translate a huggingface_hub exception into a one-line UserError with the fix."""
    from huggingface_hub import errors as hf_errors

    name = type(err).__name__
    if isinstance(err, hf_errors.RepositoryNotFoundError):
        return UserError(f"Hub repository {repo_id!r} does not exist or is not visible with your token")
    if isinstance(err, hf_errors.RevisionNotFoundError):
        return UserError(f"Hub repository {repo_id!r} has no such revision")
    if isinstance(err, hf_errors.EntryNotFoundError):
        return UserError(f"Hub repository {repo_id!r} lacks a required file ({err})")
    if isinstance(err, hf_errors.LocalEntryNotFoundError | hf_errors.OfflineModeIsEnabled):
        return UserError(
            f"cannot reach the Hub for {repo_id!r} and it is not in the local cache (offline or HF_HUB_OFFLINE=1); "
            "connect, or use local-dir:PATH"
        )
    if isinstance(err, hf_errors.HFValidationError):
        return UserError(f"{repo_id!r} is not a valid Hub repository id (expected OWNER/NAME)")
    if isinstance(err, hf_errors.HfHubHTTPError):
        status = getattr(getattr(err, "response", None), "status_code", None)
        if status in (401, 403):
            return UserError(f"the Hub refused access to {repo_id!r} (HTTP {status}); check your token (--token or "
                             "HF_TOKEN)")
        return UserError(f"Hub request for {repo_id!r} failed (HTTP {status}): {str(err).splitlines()[0]}")
    return UserError(f"Hub request for {repo_id!r} failed ({name}: {str(err).splitlines()[0] if str(err) else ''})")


def _split(repo: str) -> tuple[str, str | None]:
    repo_id, _, revision = repo.partition("@")
    return repo_id, revision or None


def download_file(repo: str, filename: str, revision: str | None = None, cache_dir: Any = None) -> Path:
    """Download one file of a Hub repository (``OWNER/NAME`` or ``OWNER/NAME@REVISION``) into the cache."""
    from huggingface_hub import hf_hub_download

    repo_id, rev = _split(repo)
    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision or rev, cache_dir=cache_dir))
    except Exception as e:
        raise hub_error(repo_id, e) from None


def download_config(repo: str, revision: str | None = None) -> dict[str, Any]:
    return json.loads(download_file(repo, "config.json", revision).read_text())


def download_model(repo: str, revision: str | None = None, cache_dir: Any = None) -> Path:
    """Download a converted model's files (config, safetensors weights, card) and return the folder."""
    from huggingface_hub import snapshot_download

    repo_id, rev = _split(repo)
    try:
        folder = snapshot_download(repo_id, revision=revision or rev, allow_patterns=MODEL_FILES,
                                   cache_dir=cache_dir)
    except Exception as e:
        raise hub_error(repo_id, e) from None
    return Path(folder)
