"""Converted-model folders: ``model.safetensors`` + ``config.json`` + ``README.md``, written atomically.

``config.json`` follows timm's Hub layout (``architecture``, ``num_classes``, ``model_args``,
``pretrained_cfg``), with ``architecture = vitconvert_<method>`` and ``model_args`` holding the base
model, the recipe and the method's state, so after ``import vitconvert`` timm itself can rebuild it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_model

from vitconvert.errors import UserError
from vitconvert.methods import ConvertedModel, build_from_config

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
CARD_NAME = "README.md"


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike[str], overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``out`` and move it into place only if the block succeeds.

    An interrupted or failed run leaves nothing at ``out`` (and an existing folder untouched).
    """
    out = Path(out).expanduser().resolve()
    if out.exists() and not overwrite:
        raise UserError(f"{str(out)!r} already exists; pass --overwrite to replace it or choose another -o")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def model_config(model: ConvertedModel) -> dict[str, Any]:
    """The config.json content for a converted model."""
    from vitconvert import __version__

    cfg = dict(model.pretrained_cfg)
    label_names = cfg.pop("label_names", None)
    config: dict[str, Any] = {
        "architecture": f"vitconvert_{model.method}",
        "num_classes": model.num_classes,
        "num_features": model.num_features,
        "global_pool": model.anatomy.pool,
        "model_args": {
            "base": model.base_spec.to_dict(),
            "recipe": model.recipe.to_dict(),
            "state": model.get_state(),
        },
        "pretrained_cfg": cfg,
        "vitconvert": {"version": __version__, "method": model.method, "family": model.anatomy.family,
                       "knob": model.knob_name},
    }
    if label_names:
        config["label_names"] = list(label_names)
    return json.loads(json.dumps(config))  # tuples -> lists, and proves it serialises


def save(model: ConvertedModel, out: str | os.PathLike[str], overwrite: bool = False,
         extra_files: dict[str, bytes | str] | None = None, card: str | None = None) -> Path:
    """Write a converted model folder atomically.

    Args:
        model: The converted model.
        out: Destination folder.
        overwrite: Replace an existing folder.
        extra_files: More files to write into the folder (name -> content), e.g. a training log or plot.
        card: Model card text; generated from the config when omitted.

    Example:
        >>> save(model, "deit_small-cfvit")  # doctest: +SKIP
    """
    from vitconvert.card import model_card

    with atomic_dir(out, overwrite) as tmp:
        save_model(model, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        config = model_config(model)
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        for name, content in (extra_files or {}).items():
            path = tmp / name
            if isinstance(content, bytes):
                path.write_bytes(content)
            else:
                path.write_text(content)
        (tmp / CARD_NAME).write_text(card if card is not None else model_card(config, tmp, Path(out).name))
    return Path(out).expanduser().resolve()


def read_config(path: Path) -> dict[str, Any]:
    cfg_file = path / CONFIG_NAME
    if not cfg_file.is_file():
        raise UserError(f"{str(path)!r} is not a vitconvert model folder (no config.json)")
    try:
        config = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{str(cfg_file)!r} is not valid JSON ({e})") from None
    return config


def config_parts(config: dict[str, Any]) -> tuple[str, dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Validate the outer layout of a config: (method, base, recipe, state)."""
    from vitconvert.methods import METHODS

    arch = config.get("architecture")
    if not isinstance(arch, str) or not arch.startswith("vitconvert_") or arch[len("vitconvert_"):] not in METHODS:
        known = ", ".join(f"vitconvert_{m}" for m in sorted(METHODS))
        raise UserError(f"config: architecture {arch!r} is not a vitconvert model (known: {known})")
    args = config.get("model_args")
    if not isinstance(args, dict) or not isinstance(args.get("base"), dict) or not isinstance(args.get("recipe"), dict):
        raise UserError("config: model_args must hold 'base' and 'recipe' mappings")
    state = args.get("state") or {}
    if not isinstance(state, dict):
        raise UserError("config: model_args.state must be a mapping")
    return arch[len("vitconvert_"):], args["base"], args["recipe"], state


def load_weights(model: ConvertedModel, weights: Path) -> None:
    from vitconvert.sources import load_state_dict_checked

    if not weights.is_file():
        raise UserError(f"{str(weights.parent)!r} has no {WEIGHTS_NAME}")
    try:
        state = load_file(str(weights), device="cpu")
    except Exception as e:
        raise UserError(f"{str(weights)!r} could not be read ({type(e).__name__}: {e})") from None
    # Shared tensors are stored once by save_model; restore the aliases before the strict check.
    own = model.state_dict()
    for key in own:
        if key not in state:
            alias = _alias_of(model, key, state)
            if alias is not None:
                state[key] = state[alias]
    load_state_dict_checked(model, state, f"weights {str(weights)!r}")


def _alias_of(model: ConvertedModel, key: str, state: dict[str, torch.Tensor]) -> str | None:
    tensor = model.state_dict(keep_vars=True)[key]
    for other, t in model.state_dict(keep_vars=True).items():
        if other != key and other in state and t.data_ptr() == tensor.data_ptr():
            return other
    return None


def weights_file_from_cfg(pretrained_cfg: Any, cache_dir: Any = None) -> Path:
    """The safetensors file for timm's ``pretrained=True`` path (hf-hub or local-dir sources only).

    Resolved (downloaded) before the model is built, so a source without ``model.safetensors`` is refused
    before any construction work; only the model's own files are fetched.
    """
    cfg = pretrained_cfg if isinstance(pretrained_cfg, dict) else getattr(pretrained_cfg, "__dict__", {}) or {}
    source = cfg.get("source")
    if source == "local-dir":
        weights = Path(cfg["file"]) / WEIGHTS_NAME
        if not weights.is_file():
            raise UserError(f"local-dir:{cfg['file']} has no {WEIGHTS_NAME}; vitconvert loads only safetensors weights")
        return weights
    if source == "hf-hub" or cfg.get("hf_hub_id"):
        from vitconvert.hub import download_model

        return download_model(cfg["hf_hub_id"], cache_dir=cache_dir) / WEIGHTS_NAME
    raise UserError("vitconvert models load weights only from hf-hub: or local-dir: sources")


def load(path: str | os.PathLike[str], budget: str | float | None = None, device: str | torch.device = "cpu",
         revision: str | None = None) -> ConvertedModel:
    """Load a converted model from a folder, ``local-dir:PATH`` or ``hf-hub:OWNER/NAME``.

    Loading never runs code from the folder or the Hub: the config is validated (known method, known base
    architecture, recipe values in range) before anything is built, and only safetensors weights are read.

    Args:
        path: Model folder, ``local-dir:PATH`` or ``hf-hub:OWNER/NAME``.
        budget: Operating point to switch to, from the stored calibration curve (GMACs, ``"50%"``,
            ``"drop=0.5"``); default: the stored operating point.
        device: Where to put the model.
        revision: Hub branch, tag or commit (``hf-hub:`` only).

    Example:
        >>> model = vitconvert.load("hf-hub:me/deit_small-cfvit", budget="50%")  # doctest: +SKIP
    """
    text = str(path)
    if text.startswith("hf-hub:"):
        from vitconvert.hub import download_model

        folder = download_model(text[len("hf-hub:"):], revision=revision)
    else:
        folder = Path(text[len("local-dir:"):] if text.startswith("local-dir:") else text).expanduser()
        if not folder.is_dir():
            raise UserError(f"model folder {text!r} does not exist")
    config = read_config(folder)
    method, base, recipe, state = config_parts(config)
    if not (folder / WEIGHTS_NAME).is_file():
        raise UserError(f"model folder {text!r} has no {WEIGHTS_NAME}; vitconvert loads only safetensors weights")
    model = build_from_config(base, recipe, state, method, config.get("pretrained_cfg"))
    load_weights(model, folder / WEIGHTS_NAME)
    if budget is not None:
        model.set_budget(budget)
    return model.to(device).eval()
