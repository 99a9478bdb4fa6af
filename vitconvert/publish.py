"""Uploading a saved model folder to the Hugging Face Hub: :func:`push`.

A push validates the folder exactly as loading does (known method, timm base architecture, valid recipe,
readable ``model.safetensors``) and uploads ``model.safetensors``, ``config.json``, the model card and the
plots the card shows, in one commit; nothing else in the folder leaves the machine. With ``with_onnx`` the model
is also exported (:func:`vitconvert.deploy.export`, checked against the model) before anything is sent, and the
file goes up as ``model.onnx`` in the same commit, with a card section on running it in onnxruntime; loading
never downloads it.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

from vitconvert._version import __version__
from vitconvert.card import ONNX_NAME, fill_repo_id, model_card, onnx_section, set_onnx_section
from vitconvert.deploy import export, onnx_interface
from vitconvert.errors import UserError
from vitconvert.hub import IMAGE_SUFFIXES, hub_error, is_hub_failure, is_offline
from vitconvert.saving import CARD_NAME, CONFIG_NAME, WEIGHTS_NAME, check_folder, load


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


def push_files(folder: str | os.PathLike[str], repo_id: str | None = None,
               onnx: str | os.PathLike[str] | None = None) -> dict[str, bytes | Path]:
    """Validate a model folder and list what a push uploads: ``path in repo -> local file or bytes``.

    The folder must be a saved vitconvert model: ``config.json`` that passes the same checks as loading
    (known method, timm base architecture, valid recipe), a readable ``model.safetensors``. ``README.md`` is
    generated from the config when missing; ``hf-hub:OWNER/...`` placeholders in it are filled with
    ``repo_id``. Plots the card shows (``curve.png`` and other PNG/JPEG files) are included; nothing else.

    ``onnx``, an exported file of this folder's model, is uploaded as ``model.onnx`` and the card gets its
    "Run with ONNX Runtime" section (written from the file's inputs and outputs); without it the card has no
    such section, whatever the folder's README.md says (a ``model.onnx`` in the folder is never uploaded).
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise UserError(f"model folder {str(folder)!r} does not exist")
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        found = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pth", ".pt", ".ckpt"))
        hint = f" (found {', '.join(found)}; vitconvert pushes only safetensors)" if found else ""
        raise UserError(f"{str(folder)!r} has no {WEIGHTS_NAME}{hint}; save the model with vitconvert.save")
    # The checks of loading itself (the model is built from the config, the weights' header must fit it): a
    # folder that would not load is never uploaded.
    config, _ = check_folder(folder, f"in {folder / CONFIG_NAME}")
    card_path = folder / CARD_NAME
    card = card_path.read_text() if card_path.is_file() else model_card(config, folder, repo_id or folder.name)
    if repo_id:
        card = fill_repo_id(card, repo_id)
    section = None
    if onnx is not None:
        knobs, outputs = onnx_interface(onnx)
        section = onnx_section(config, knobs, outputs, repo_id or folder.name)
    card = set_onnx_section(card, section)
    files: dict[str, bytes | Path] = {CONFIG_NAME: folder / CONFIG_NAME, WEIGHTS_NAME: weights,
                                      CARD_NAME: card.encode()}
    if onnx is not None:
        files[ONNX_NAME] = Path(onnx)
    for image in _card_images(card, folder):
        files[image] = folder / image
    return files


def _export_onnx(folder: Path, out: Path) -> Path:
    """The folder's model at its stored point as ONNX (checked against the model); a refusal stops the push."""
    try:
        return export(load(folder), out)
    except UserError as e:
        raise UserError(f"{e}; nothing was pushed (without --with-onnx the model is pushed alone)") from None


def push(
    folder: str | os.PathLike[str],
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
    create_pr: bool = False,
    with_onnx: bool = False,
) -> str:
    """Upload a saved vitconvert model folder to the Hugging Face Hub.

    The folder is validated first (it must load: known method, timm base architecture, valid recipe,
    ``model.safetensors``). Only ``model.safetensors``, ``config.json``, ``README.md`` (generated when
    missing) and the plots the card shows are uploaded, in one commit; ``.bin``/``.pth`` files and anything
    else in the folder stay local. The repository is created if needed, and so is the branch ``revision``.

    With ``with_onnx`` the model is exported at its stored operating point (:func:`vitconvert.deploy.export`:
    the graph is checked against the model) before anything is sent, and uploaded as ``model.onnx`` in the same
    commit; the card gets a "Run with ONNX Runtime" section. A model that cannot be exported (a refusal, a
    graph that does not reproduce it, or no ``export`` extra) stops the push there, in one line. Without it, a
    ``model.onnx`` an earlier push left at the revision is deleted in the commit: it was exported from other
    weights or another point.

    Args:
        folder: A folder written by :func:`vitconvert.save`.
        repo_id: ``OWNER/NAME`` (or ``NAME`` for the token's own namespace).
        private: Create the repository as private (ignored if it already exists).
        revision: Branch to push to (created from ``main`` if missing); default ``main``.
        commit_message: Commit title; default "Upload <folder name> with vitconvert".
        token: Hub token with write access; default: ``HF_TOKEN`` or the token saved by ``hf auth login``.
        create_pr: Open a pull request with the commit instead of committing to the branch.
        with_onnx: Also export the model to ONNX and upload it as ``model.onnx`` (needs the ``export`` extra).

    Returns:
        The URL of the commit (or of the pull request with ``create_pr``).

    Raises:
        UserError: invalid folder or repo id, missing or rejected token, offline (``HF_HUB_OFFLINE=1``) or
            unreachable Hub, a model ``with_onnx`` cannot export. Success is only returned once the Hub lists
            every uploaded file at the new commit.

    Example:
        >>> import vitconvert
        >>> vitconvert.save(model, "deit_small-cfvit")                        # doctest: +SKIP
        >>> push("deit_small-cfvit", "me/deit_small-cfvit", private=True)     # doctest: +SKIP
        'https://huggingface.co/me/deit_small-cfvit/commit/0b5c...'
        >>> vitconvert.load("hf-hub:me/deit_small-cfvit", budget="50%")       # doctest: +SKIP
    """
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, get_token

    repo_id = _check_repo_id(repo_id)
    folder = Path(folder).expanduser()
    files = push_files(folder, repo_id if "/" in repo_id else None)  # validate before any network access
    if is_offline():
        raise hub_error(repo_id, _offline_exception(), "push")
    token = token or get_token()
    if not token:
        raise UserError("pushing needs a Hugging Face token with write access: pass --token, set HF_TOKEN or run "
                        "`hf auth login`")
    with tempfile.TemporaryDirectory(prefix="vitconvert-push-") as tmp:
        onnx = _export_onnx(folder, Path(tmp) / ONNX_NAME) if with_onnx else None  # before any network access
        if onnx is not None:
            files = push_files(folder, repo_id if "/" in repo_id else None, onnx)
        api = HfApi(token=token, library_name="vitconvert", library_version=__version__)
        try:
            resolved = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
            if resolved != repo_id:  # NAME only: the Hub chose the namespace; the card can name it now
                files = push_files(folder, resolved, onnx)
            repo_id = resolved
            if revision and not revision.startswith("refs/"):
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            operations: list[CommitOperationAdd | CommitOperationDelete] = [
                CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(src) if isinstance(src, Path) else src)
                for name, src in files.items()]
            # A model.onnx of an earlier push would no longer match these weights (or this point), and the card
            # no longer describes it.
            stale = onnx is None and ONNX_NAME in api.list_repo_files(repo_id, revision=revision)
            if stale:
                operations.append(CommitOperationDelete(path_in_repo=ONNX_NAME))
            message = commit_message or f"Upload {folder.resolve().name} with vitconvert {__version__}"
            info = api.create_commit(repo_id, operations, commit_message=message, revision=revision,
                                     create_pr=create_pr)
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
    if stale and ONNX_NAME in listed:
        raise UserError(f"the push to {repo_id!r} did not complete: the Hub still lists the earlier {ONNX_NAME} at "
                        f"commit {info.oid}; retry the push")
    return info.pr_url or info.commit_url


def _offline_exception() -> Exception:
    from huggingface_hub.errors import OfflineModeIsEnabled

    return OfflineModeIsEnabled("HF_HUB_OFFLINE=1")
