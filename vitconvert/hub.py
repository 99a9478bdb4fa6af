"""Hugging Face Hub downloads and the translation of Hub errors (uploads are :mod:`vitconvert.publish`).

Only ``config.json``, ``model.safetensors`` and ``README.md`` are ever fetched for a converted or timm model, and
for a transformers checkpoint its config, ``preprocessor_config.json`` and weights (safetensors when it has them;
transformers reads a .bin only with ``weights_only=True``); nothing from a repository is executed. Errors from
huggingface_hub (offline, unreachable Hub, missing repo or revision, bad token) become one-line UserErrors that
say how to fix them. huggingface_hub is imported where it is used, so commands that never touch the Hub do not
pay for importing it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vitconvert.errors import UserError

MODEL_FILES = ["config.json", "model.safetensors", "README.md"]
# Plots a card may show; anything else in a model folder (checkpoints, logs, .bin/.pth) is never uploaded.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_NETWORK_ERRORS = {"ConnectError", "ConnectTimeout", "NetworkError", "TimeoutException", "ReadTimeout",
                   "ConnectionError", "RemoteProtocolError", "ProxyError", "SSLError"}
_HTTP_MODULES = ("huggingface_hub", "httpx", "httpx2", "httpcore", "requests", "urllib3", "hf_xet")


def hub_endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def is_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _is_network_error(err: BaseException) -> bool:
    return any(c.__name__ in _NETWORK_ERRORS for c in type(err).__mro__) or isinstance(err, ConnectionError)


def hub_error(repo_id: str, err: Exception, action: str = "download") -> UserError:
    """Translate a huggingface_hub (or HTTP client) exception into a one-line UserError with the fix.

    Args:
        repo_id: The repository the request was for.
        err: The exception raised by huggingface_hub / the HTTP client.
        action: ``"download"`` or ``"push"`` (changes the advice for offline mode, 401/403 and missing repos).
    """
    from huggingface_hub import errors as hf_errors

    name = type(err).__name__
    first_line = str(err).strip().splitlines()[0] if str(err).strip() else ""
    pushing = action == "push"
    if isinstance(err, hf_errors.OfflineModeIsEnabled) or (
        isinstance(err, hf_errors.LocalEntryNotFoundError) and is_offline()
    ):
        if pushing:
            return UserError("HF_HUB_OFFLINE=1 is set, so nothing can be pushed; unset HF_HUB_OFFLINE and retry")
        return UserError(
            f"HF_HUB_OFFLINE=1 is set and {repo_id!r} is not in the local Hub cache; unset HF_HUB_OFFLINE to "
            "download it, or use local-dir:PATH"
        )
    if isinstance(err, hf_errors.LocalEntryNotFoundError) or _is_network_error(err):
        where = "is not in the local Hub cache" if not pushing else "could not be pushed"
        return UserError(
            f"cannot reach the Hub at {hub_endpoint()} and {repo_id!r} {where} ({first_line[:120] or name}); "
            "check your network connection (or HF_ENDPOINT)" + ("" if pushing else ", or use local-dir:PATH")
        )
    if isinstance(err, hf_errors.GatedRepoError):
        return UserError(f"Hub repository {repo_id!r} is gated: accept its terms on the Hub, then pass a token "
                         "(--token or HF_TOKEN)")
    if isinstance(err, hf_errors.RepositoryNotFoundError):
        if pushing:
            return UserError(f"Hub repository {repo_id!r} does not exist or your token cannot write to it; check "
                             "the OWNER/NAME and the token (--token or HF_TOKEN)")
        return UserError(f"Hub repository {repo_id!r} does not exist or is not visible with your token (private "
                         "repositories need --token or HF_TOKEN)")
    if isinstance(err, hf_errors.RevisionNotFoundError):
        return UserError(f"Hub repository {repo_id!r} has no such revision (branch, tag or commit)")
    if isinstance(err, hf_errors.EntryNotFoundError):
        return UserError(f"Hub repository {repo_id!r} lacks a required file ({first_line[:160]})")
    if isinstance(err, hf_errors.HFValidationError):
        return UserError(f"{repo_id!r} is not a valid Hub repository id: use OWNER/NAME with letters, digits, "
                         "'-', '_' and '.' (at most 96 characters)")
    if isinstance(err, hf_errors.HfHubHTTPError):
        response = getattr(err, "response", None)
        status = getattr(response, "status_code", None)
        server_msg = response.headers.get("X-Error-Message") if response is not None else None
        detail = f": {server_msg}" if server_msg else ""
        if status == 401:
            return UserError(f"the Hub rejected the token for {repo_id!r} (HTTP 401{detail}); pass a valid token "
                             "with --token or HF_TOKEN" + (" (it needs write access)" if pushing else ""))
        if status == 403:
            if pushing:
                return UserError(f"your token cannot write to {repo_id!r} (HTTP 403{detail}); use a token with "
                                 "write access to that namespace")
            return UserError(f"the Hub refused access to {repo_id!r} (HTTP 403{detail}); check your token")
        return UserError(f"Hub request for {repo_id!r} failed (HTTP {status}{detail or ': ' + first_line[:160]})")
    if pushing and isinstance(err, ValueError) and first_line.startswith("Invalid metadata in README.md"):
        return UserError(f"the Hub rejected the README.md front matter of {repo_id!r}: {str(err)[:300]}")
    return UserError(f"Hub request for {repo_id!r} failed ({name}: {first_line[:160]})")


def is_hub_failure(err: BaseException) -> bool:
    """Errors that come from the Hub or the network (translated), as opposed to bugs (re-raised)."""
    module = type(err).__module__.split(".")[0]
    return module in _HTTP_MODULES or isinstance(err, OSError)


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
        if not is_hub_failure(e):
            raise
        raise hub_error(repo_id, e) from None


def download_config(repo: str, revision: str | None = None) -> dict[str, Any]:
    """The parsed config.json of a Hub repository."""
    path = download_file(repo, "config.json", revision)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"config.json of hf-hub:{repo} is not valid JSON ({e})") from None


def download_model(repo: str, revision: str | None = None, cache_dir: Any = None) -> Path:
    """Download a converted model's files (config, safetensors weights, card) and return the folder.

    Only :data:`MODEL_FILES` are fetched; a repository that lacks ``config.json`` or ``model.safetensors``
    (e.g. one holding only ``pytorch_model.bin``) is refused here, before anything is built.
    """
    from huggingface_hub import snapshot_download

    repo_id, rev = _split(repo)
    try:
        folder = Path(snapshot_download(repo_id, revision=revision or rev, allow_patterns=MODEL_FILES,
                                        cache_dir=cache_dir))
    except Exception as e:
        if not is_hub_failure(e):
            raise
        raise hub_error(repo_id, e) from None
    if not (folder / "config.json").is_file():
        raise UserError(f"hf-hub:{repo_id} has no config.json, so it is not a saved vitconvert or timm model")
    if not (folder / "model.safetensors").is_file():
        raise UserError(f"hf-hub:{repo_id} has no model.safetensors; vitconvert loads only safetensors weights "
                        "(never .bin/.pth pickles): re-save the model with vitconvert.save and push it again")
    return folder


# A transformers checkpoint: what vitconvert reads of it (safetensors preferred; .bin only when there are none).
TRANSFORMERS_FILES = ["config.json", "preprocessor_config.json"]
TRANSFORMERS_WEIGHTS = (["model.safetensors", "model.safetensors.index.json", "model-*-of-*.safetensors"],
                        ["pytorch_model.bin", "pytorch_model.bin.index.json", "pytorch_model-*-of-*.bin"])


def download_transformers_folder(repo: str, revision: str | None = None, cache_dir: Any = None,
                                 weights: bool = True) -> Path:
    """Download a transformers image classifier's config, preprocessor config and weights; return the folder.

    The .bin weights are fetched only when the repository has no safetensors ones; ``weights=False`` fetches
    the two configs only.
    """
    from huggingface_hub import snapshot_download

    repo_id, rev = _split(repo)
    folder = None
    for weights_files in TRANSFORMERS_WEIGHTS if weights else ([],):
        try:
            folder = Path(snapshot_download(repo_id, revision=revision or rev, allow_patterns=TRANSFORMERS_FILES
                                            + weights_files, cache_dir=cache_dir))
        except Exception as e:
            if not is_hub_failure(e):
                raise
            raise hub_error(repo_id, e) from None
        if not weights or any((folder / name).is_file() for name in weights_files[:2]):
            return folder
    raise UserError(f"hf-hub:{repo_id} has no weights (model.safetensors or pytorch_model.bin); pass "
                    "--no-pretrained for random weights")
