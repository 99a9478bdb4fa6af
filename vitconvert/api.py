"""The Python API the CLI is a thin layer over: converting (:func:`apply`) and reading a model's anatomy.

Fine-tuning, calibration, evaluation and pushing live in :mod:`vitconvert.train`, :mod:`vitconvert.calibration`,
:mod:`vitconvert.evaluation` and :mod:`vitconvert.publish`; saving and loading in :mod:`vitconvert.saving`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from vitconvert.anatomy import Anatomy
from vitconvert.backbones import read_anatomy
from vitconvert.errors import UserError
from vitconvert.methods.base import ConvertedModel, convert
from vitconvert.recipes import Recipe, load_recipe
from vitconvert.sources import base_from_module, load_base, load_checkpoint_file, load_state_dict_checked


def inspect_model(model: str, checkpoint: str | None = None, model_kwargs: dict[str, Any] | None = None,
                  pretrained: bool = False) -> Anatomy:
    """Read the anatomy of a model given like ``apply``'s MODEL argument (weights are not needed)."""
    base, _ = load_base(model, checkpoint, model_kwargs, pretrained=pretrained)
    return read_anatomy(base)


def apply(
    model: str | nn.Module,
    recipe: str | os.PathLike[str] | Recipe | dict[str, Any],
    *,
    checkpoint: str | os.PathLike[str] | None = None,
    model_kwargs: dict[str, Any] | None = None,
    pretrained: bool = True,
    overrides: list[str] | None = None,
    base_name: str | None = None,
) -> ConvertedModel:
    """Convert a base model into a dynamic-token model following a recipe.

    Args:
        model: timm name or alias, ``hf-hub:owner/name``, ``local-dir:PATH``, or a timm model you hold
            (``timm.create_model(...)``, maybe trained since). A module is deep-copied: the converted model
            has its own weights and the module is left as it was. Its architecture and constructor arguments
            are read from what timm recorded (``pretrained_cfg``, ``_model_args``) and checked against its
            parameters; when they cannot be recovered, apply says so and asks for ``base_name`` /
            ``model_kwargs``.
        recipe: Recipe name (``"cfvit"``), YAML path, mapping or :class:`Recipe`.
        checkpoint: Weights file to load into the base model (.safetensors, .pth/.bin with weights_only).
        model_kwargs: timm ``create_model`` kwargs, e.g. ``{"img_size": 32, "num_classes": 10}``; for a module,
            the constructor arguments it does not record.
        pretrained: Load the source's pretrained weights (names only; a module keeps its own weights).
        overrides: ``key=value`` recipe overrides, e.g. ``["model.alpha=0.6"]``.
        base_name: For a module: the timm architecture when the module does not record it.

    Returns:
        The converted model in eval mode, at the recipe's operating point.

    Example:
        >>> m = apply("deit_tiny", "cfvit", pretrained=False)
        >>> m.full_compute()  # reproduces the base model exactly
        >>> net = timm.create_model("deit_tiny_patch16_224", num_classes=10)  # or your own trained model
        >>> m = apply(net, "cfvit")                                          # net itself is left unchanged
    """
    rec = load_recipe(recipe, overrides)
    if isinstance(model, nn.Module):
        base, spec = base_from_module(model, base_name, model_kwargs)
        if checkpoint is not None:
            load_state_dict_checked(base, load_checkpoint_file(checkpoint), f"checkpoint {str(checkpoint)!r}")
            spec.checkpoint = str(checkpoint)
        return convert(base, spec, rec)
    if not isinstance(model, str):
        raise UserError(f"apply() takes a timm model (nn.Module), a model name or a path, not {type(model).__name__}")
    if base_name is not None:
        raise UserError("base_name= is for converting an nn.Module; a model name already says its architecture")
    base, spec = load_base(model, checkpoint, model_kwargs, pretrained)
    return convert(base, spec, rec)


def output_dir_for(model: str, recipe: Recipe) -> Path:
    """Default output folder: ``<model>-<recipe>`` in the current directory."""
    stem = model.split(":", 1)[-1].rstrip("/").replace("/", "_").split(".")[0] or "model"
    return Path(f"{Path(stem).name}-{recipe.name}")
