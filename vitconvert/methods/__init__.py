"""Method registry: one module per method, each registering a :class:`ConvertedModel` subclass and a timm
entrypoint ``vitconvert_<method>`` so ``timm.create_model('hf-hub:...')`` rebuilds saved models."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vitconvert.errors import UserError
from vitconvert.methods.base import ConvertedModel, CurvePoint, DynamicOutput

METHODS: dict[str, type[ConvertedModel]] = {}


def register_method(cls: type[ConvertedModel]) -> type[ConvertedModel]:
    METHODS[cls.method] = cls
    return cls


def get_method(name: str) -> type[ConvertedModel]:
    if name not in METHODS:
        raise UserError(f"method {name!r} is not known; available: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def convert(base: nn.Module, spec: Any, recipe: Any, anatomy: Any | None = None) -> ConvertedModel:
    """Convert a base model (with its weights) following a validated recipe."""
    from vitconvert.anatomy import read_anatomy

    size = getattr(spec, "img_size", None)
    anatomy = anatomy or read_anatomy(base, img_size=tuple(size) if size else None)
    cls = get_method(recipe.method)
    # New parts are initialised from the recipe's seed (and the caller's random state is left alone), so
    # converting the same model twice gives the same weights and fine-tuning runs are repeatable.
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(recipe.finetune.seed)
        return cls(base, spec, recipe, anatomy).eval()


# Data settings a saved model carries in its pretrained_cfg (the architecture's defaults are ImageNet's).
DATA_CFG_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode", "fixed_input_size",
                 "min_input_size", "test_input_size", "test_crop_pct", "label_names", "label_descriptions", "license")


def build_from_config(base: dict[str, Any], recipe: dict[str, Any], state: dict[str, Any] | None,
                      method: str | None = None, pretrained_cfg: Any = None) -> ConvertedModel:
    """Rebuild a converted model (random base weights) from the ``model_args`` of a saved config.

    Everything is validated before anything is built: the base architecture must be a timm model, the
    recipe must pass the method's schema, the state must hold known keys with numeric values. The data
    settings of the saved ``pretrained_cfg`` (input size, mean/std, crop) are restored.
    """
    from vitconvert.recipes import validate_recipe
    from vitconvert.sources import BaseSpec

    spec = BaseSpec.from_dict(base)
    rec = validate_recipe(recipe, "in config.json")
    if method is not None and rec.method != method:
        raise UserError(f"config: architecture says method {method!r} but the recipe says {rec.method!r}")
    base_model = spec.build()
    model = convert(base_model, spec, rec)
    if state:
        model.load_state(state)
    saved = pretrained_cfg if isinstance(pretrained_cfg, dict) else getattr(pretrained_cfg, "__dict__", None) or {}
    model.pretrained_cfg.update({k: saved[k] for k in DATA_CFG_KEYS if saved.get(k) is not None})
    return model


def timm_entrypoint(method: str, pretrained: bool = False, **kwargs: Any) -> ConvertedModel:
    """Shared body of the ``vitconvert_<method>`` timm entrypoints."""
    from vitconvert.saving import load_weights, weights_file_from_cfg

    pretrained_cfg = kwargs.pop("pretrained_cfg", None)
    kwargs.pop("pretrained_cfg_overlay", None)
    cache_dir = kwargs.pop("cache_dir", None)
    base = kwargs.pop("base", None)
    recipe = kwargs.pop("recipe", None)
    state = kwargs.pop("state", None)
    kwargs.pop("num_classes", None)  # recorded by timm's factory; fixed by the base model args
    kwargs.pop("pretrained_model_args", None)
    if base is None or recipe is None:
        raise UserError(
            f"vitconvert_{method} is built from a saved vitconvert model: use "
            f"timm.create_model('hf-hub:OWNER/NAME' or 'local-dir:PATH', pretrained=True)"
        )
    unknown = set(kwargs) - {"device", "dtype"}
    if unknown:
        raise UserError(f"vitconvert_{method}: unexpected model arguments {sorted(unknown)}")
    # Fetch the weights first: a source without model.safetensors is refused before anything is built.
    weights = weights_file_from_cfg(pretrained_cfg, cache_dir) if pretrained else None
    model = build_from_config(base, recipe, state, method, pretrained_cfg)
    if weights is not None:
        load_weights(model, weights)
    return model


# Importing the method modules registers them (and their timm entrypoints).
from vitconvert.methods import cfvit, dge  # noqa: E402

__all__ = ["METHODS", "ConvertedModel", "CurvePoint", "DynamicOutput", "cfvit", "convert", "dge", "get_method",
           "register_method"]
