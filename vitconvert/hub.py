"""Hugging Face Hub access: downloads (used by sources and load) and :func:`push`.

Only ``config.json``, ``model.safetensors`` and ``README.md`` are ever fetched; nothing from a repository is
executed. A push uploads exactly those files (plus image plots the card shows) after validating the folder.
Errors from huggingface_hub (offline, unreachable Hub, missing repo or revision, bad token) become one-line
UserErrors that say how to fix them.
"""

from __future__ import annotations

import json
import os
import re
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


def _offline() -> bool:
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
        isinstance(err, hf_errors.LocalEntryNotFoundError) and _offline()
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


# --- push -----------------------------------------------------------------------------------------------


def _check_repo_id(repo_id: str) -> str:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if not isinstance(repo_id, str) or not repo_id or repo_id.count("/") > 1 or repo_id.startswith("hf-hub:"):
        raise UserError(f"{repo_id!r} is not a valid Hub repository id: use OWNER/NAME (or NAME for your own "
                        "namespace), without the hf-hub: prefix")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise hub_error(repo_id, e, "push") from None
    return repo_id


def _card_images(card: str, folder: Path) -> list[str]:
    """Relative image paths the card shows (Markdown or <img>) that exist inside the folder."""
    refs = re.findall(r"!\[[^\]]*\]\(\s*<?([^)\s>]+)>?[^)]*\)", card)
    refs += re.findall(r"<img[^>]*\ssrc=[\"']([^\"']+)", card)
    root = folder.resolve()
    found = []
    for ref in refs:
        if "://" in ref or ref.startswith(("/", "#")) or not ref.lower().endswith(IMAGE_SUFFIXES):
            continue
        path = (folder / ref).resolve()
        if path.is_file() and path.is_relative_to(root):
            found.append(path.relative_to(root).as_posix())
    return list(dict.fromkeys(found))


def push_files(folder: str | os.PathLike[str], repo_id: str | None = None) -> dict[str, bytes | Path]:
    """Validate a model folder and list what a push uploads: ``path in repo -> local file or bytes``.

    The folder must be a saved vitconvert model: ``config.json`` that passes the same checks as loading
    (known method, timm base architecture, valid recipe), a readable ``model.safetensors``. ``README.md`` is
    generated from the config when missing; ``hf-hub:OWNER/...`` placeholders in it are filled with
    ``repo_id``. Plots the card shows (``curve.png`` and other PNG/JPEG files) are included; nothing else.
    """
    from safetensors import safe_open

    from vitconvert.card import fill_repo_id, model_card
    from vitconvert.recipes import validate_recipe
    from vitconvert.saving import CARD_NAME, CONFIG_NAME, WEIGHTS_NAME, config_parts, read_config
    from vitconvert.sources import BaseSpec

    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise UserError(f"model folder {str(folder)!r} does not exist")
    config = read_config(folder)
    method, base, recipe, _ = config_parts(config)
    BaseSpec.from_dict(base)
    rec = validate_recipe(recipe, f"in {folder / CONFIG_NAME}")
    if rec.method != method:
        raise UserError(f"{folder / CONFIG_NAME}: architecture says method {method!r} but the recipe says "
                        f"{rec.method!r}")
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        found = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pth", ".pt", ".ckpt"))
        hint = f" (found {', '.join(found)}; vitconvert pushes only safetensors)" if found else ""
        raise UserError(f"{str(folder)!r} has no {WEIGHTS_NAME}{hint}; save the model with vitconvert.save")
    try:
        with safe_open(str(weights), framework="pt") as f:
            if not list(f.keys()):
                raise UserError(f"{str(weights)!r} holds no tensors")
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"{str(weights)!r} is not a readable safetensors file ({type(e).__name__}: {e})") from None
    card_path = folder / CARD_NAME
    card = card_path.read_text() if card_path.is_file() else model_card(config, folder, repo_id or folder.name)
    if repo_id:
        card = fill_repo_id(card, repo_id)
    files: dict[str, bytes | Path] = {CONFIG_NAME: folder / CONFIG_NAME, WEIGHTS_NAME: weights,
                                      CARD_NAME: card.encode()}
    for image in _card_images(card, folder):
        files[image] = folder / image
    return files


def push(
    folder: str | os.PathLike[str],
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
    create_pr: bool = False,
) -> str:
    """Upload a saved vitconvert model folder to the Hugging Face Hub.

    The folder is validated first (it must load: known method, timm base architecture, valid recipe,
    ``model.safetensors``). Only ``model.safetensors``, ``config.json``, ``README.md`` (generated when
    missing) and the plots the card shows are uploaded, in one commit; ``.bin``/``.pth`` files and anything
    else in the folder stay local. The repository is created if needed, and so is the branch ``revision``.

    Args:
        folder: A folder written by :func:`vitconvert.save`.
        repo_id: ``OWNER/NAME`` (or ``NAME`` for the token's own namespace).
        private: Create the repository as private (ignored if it already exists).
        revision: Branch to push to (created from ``main`` if missing); default ``main``.
        commit_message: Commit title; default "Upload <folder name> with vitconvert".
        token: Hub token with write access; default: ``HF_TOKEN`` or the token saved by ``hf auth login``.
        create_pr: Open a pull request with the commit instead of committing to the branch.

    Returns:
        The URL of the commit (or of the pull request with ``create_pr``).

    Raises:
        UserError: invalid folder or repo id, missing or rejected token, offline (``HF_HUB_OFFLINE=1``) or
            unreachable Hub. Success is only returned once the Hub lists every uploaded file at the new commit.

    Example:
        >>> import vitconvert
        >>> vitconvert.save(model, "deit_small-cfvit")                        # doctest: +SKIP
        >>> push("deit_small-cfvit", "me/deit_small-cfvit", private=True)     # doctest: +SKIP
        'https://huggingface.co/me/deit_small-cfvit/commit/0b5c...'
        >>> vitconvert.load("hf-hub:me/deit_small-cfvit", budget="50%")       # doctest: +SKIP
    """
    from huggingface_hub import CommitOperationAdd, HfApi, get_token

    from vitconvert import __version__

    repo_id = _check_repo_id(repo_id)
    folder = Path(folder).expanduser()
    files = push_files(folder, repo_id if "/" in repo_id else None)  # validate before any network access
    if _offline():
        raise hub_error(repo_id, _offline_exception(), "push")
    token = token or get_token()
    if not token:
        raise UserError("pushing needs a Hugging Face token with write access: pass --token, set HF_TOKEN or run "
                        "`hf auth login`")
    api = HfApi(token=token, library_name="vitconvert", library_version=__version__)
    try:
        resolved = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        if resolved != repo_id:  # NAME only: the Hub chose the namespace; the card can name it now
            files = push_files(folder, resolved)
        repo_id = resolved
        if revision and not revision.startswith("refs/"):
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(src) if isinstance(src, Path) else src)
                      for name, src in files.items()]
        message = commit_message or f"Upload {folder.resolve().name} with vitconvert {__version__}"
        info = api.create_commit(repo_id, operations, commit_message=message, revision=revision, create_pr=create_pr)
        # Trust only what the Hub lists at the new commit, not the absence of an exception.
        listed = set(api.list_repo_files(repo_id, revision=info.oid))
    except Exception as e:
        if is_hub_failure(e) or (isinstance(e, ValueError) and str(e).startswith("Invalid metadata in README.md")):
            raise hub_error(repo_id, e, "push") from None
        raise
    missing = sorted(set(files) - listed)
    if missing:
        raise UserError(f"the upload to {repo_id!r} did not complete: the Hub does not list {', '.join(missing)} at "
                        f"commit {info.oid}; retry the push")
    return info.pr_url or info.commit_url


def _offline_exception() -> Exception:
    from huggingface_hub.errors import OfflineModeIsEnabled

    return OfflineModeIsEnabled("HF_HUB_OFFLINE=1")
