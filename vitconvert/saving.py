"""Converted-model folders, loading, and the timm entrypoints that rebuild converted models.

A folder is ``model.safetensors`` + ``config.json`` + ``README.md``, written atomically. ``config.json``
follows timm's Hub layout (``architecture``, ``num_classes``, ``model_args``, ``pretrained_cfg``), with
``architecture = vitconvert_<method>`` and ``model_args`` holding the base model, the recipe and the model's
state (operating point, calibration curve), so timm itself can rebuild it: this module registers a
``vitconvert_<method>`` entrypoint with timm for every registered method.

Loading validates the config before anything is built (known method, timm base architecture, recipe
values in range, state values) and reads only safetensors weights; nothing from a folder or the Hub runs.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_model
from timm.models import register_model

from vitconvert import methods  # noqa: F401  (imports, and so registers, every method)
from vitconvert._version import __version__
from vitconvert.card import model_card
from vitconvert.errors import UserError, one_line
from vitconvert.hub import download_model
from vitconvert.methods.base import ConvertedModel, convert
from vitconvert.recipes import Recipe, validate_recipe
from vitconvert.registry import METHODS, on_register
from vitconvert.sources import BUILD_ERRORS, BaseSpec, load_state_dict_checked, shape_differences

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
CARD_NAME = "README.md"


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable_dir(folder: str | os.PathLike[str], what: str = "output folder") -> Path:
    """Check that files can be written into ``folder`` (created later if missing) before any work starts.

    Nothing is left behind: the probe is a temporary folder made in ``folder`` or in its nearest existing
    parent and removed at once.

    Raises:
        UserError: a parent is a file, or the place is read-only or not writable by this user.
    """
    folder = Path(folder).expanduser().resolve()
    existing = _nearest_existing(folder)
    if not existing.is_dir():
        raise UserError(f"{what} {str(folder)!r} cannot be created: {str(existing)!r} is a file, not a folder; "
                        "choose another -o")
    try:
        probe = Path(tempfile.mkdtemp(prefix=".vitconvert-probe-", dir=existing))
    except OSError as e:
        raise UserError(f"{what} {str(folder)!r} cannot be written ({e.strerror or type(e).__name__} in "
                        f"{str(existing)!r}); choose another -o") from None
    probe.rmdir()
    return folder


def check_output_dir(out: str | os.PathLike[str], overwrite: bool = False, allow_existing: Path | None = None,
                     what: str = "output folder") -> Path:
    """Check an output folder before the work starts: free (or ``overwrite``), and writable where it will be
    written (:func:`atomic_dir` writes beside it, in its parent).

    Args:
        out: The folder to be written.
        overwrite: An existing ``out`` may be replaced.
        allow_existing: A folder that may be replaced without ``overwrite`` (the model folder itself).
        what: How the message names it.

    Returns:
        ``out``, absolute.
    """
    out = Path(out).expanduser().resolve()
    if out.exists() and not overwrite and out.resolve() != (allow_existing.resolve() if allow_existing else None):
        raise UserError(f"{str(out)!r} already exists; pass --overwrite to replace it or choose another -o")
    check_writable_dir(out.parent, what=f"{what} {str(out)!r}: its parent")
    return out


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike[str], overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``out`` and move it into place only if the block succeeds.

    An interrupted or failed run leaves nothing at ``out`` (and an existing folder or file untouched).
    """
    out = Path(out).expanduser().resolve()
    check_output_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        if out.exists() or out.is_symlink():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            _remove(old)  # a file or link as well as a folder: nothing hidden is left behind
        else:
            tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def model_config(model: ConvertedModel) -> dict[str, Any]:
    """The config.json content for a converted model."""
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
                       "point": model.operating_space().names, "exact_at_full_compute": model.exact_at_full_compute},
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
    if not isinstance(config, dict):
        raise UserError(f"config: expected a JSON object at the top level, got {type(config).__name__}")
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


def _check_outer(config: dict[str, Any]) -> None:
    """The keys besides model_args that loading, cards and timm read."""
    info = config.get("vitconvert", {})
    if not isinstance(info, dict):
        raise UserError(f"config: 'vitconvert' must be a mapping, got {type(info).__name__}")
    if "point" in info and not (isinstance(info["point"], list) and all(isinstance(n, str) for n in info["point"])):
        raise UserError(f"config: vitconvert.point must list the knob names, got {info['point']!r}")
    for key in ("num_classes", "num_features"):
        if key in config and not (_is_int(config[key]) and config[key] >= 0):
            raise UserError(f"config: {key} must be a non-negative integer, got {config[key]!r}")
    if "label_names" in config and not isinstance(config["label_names"], list | dict):
        raise UserError(f"config: label_names must be a list, got {config['label_names']!r}")
    cfg = config.get("pretrained_cfg")
    if cfg is not None and not isinstance(cfg, dict):
        raise UserError(f"config: pretrained_cfg must be a mapping, got {type(cfg).__name__}")


def check_config(config: dict[str, Any], where: str = "in config.json") -> tuple[str, BaseSpec, Recipe,
                                                                                 dict[str, Any]]:
    """Everything :func:`load` checks before building: (method, base spec, recipe, state).

    Raises:
        UserError: naming the first problem (unknown method or architecture, invalid recipe...).
    """
    method, base, recipe, state = config_parts(config)
    _check_outer(config)
    spec = BaseSpec.from_dict(base)
    rec = validate_recipe(recipe, where)
    if rec.method != method:
        raise UserError(f"config {where}: architecture says method {method!r} but the recipe says {rec.method!r}")
    return method, spec, rec, state


def check_folder(folder: Path, where: str | None = None) -> tuple[dict[str, Any], ConvertedModel]:
    """Everything :func:`load` checks, without reading the weights: the config (its layout, the base model's
    arguments, the recipe, the state, the data settings) by building the model from it, and the header of
    ``model.safetensors`` (every key present, every shape right). Push runs this, so it refuses whatever
    loading refuses.

    Returns:
        The config and the model it builds (random weights).
    """
    config = read_config(folder)
    method, _, _, state = check_config(config, where or f"in {folder / CONFIG_NAME}")
    base, recipe = config["model_args"]["base"], config["model_args"]["recipe"]
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        raise UserError(f"model folder {str(folder)!r} has no {WEIGHTS_NAME}; vitconvert loads only safetensors "
                        "weights")
    model = build_from_config(base, recipe, state, method, config.get("pretrained_cfg"))
    try:
        with safe_open(str(weights), framework="pt") as f:
            shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}  # noqa: SIM118
    except Exception as e:  # a truncated or foreign file: safetensors raises its own types
        raise UserError(f"{str(weights)!r} is not a readable safetensors file ({type(e).__name__}: "
                        f"{one_line(e)[:200]})") from None
    if not shapes:
        raise UserError(f"{str(weights)!r} holds no tensors")
    _check_fits(model, shapes, f"weights {str(weights)!r}")
    return config, model


def _check_fits(model: ConvertedModel, shapes: dict[str, tuple[int, ...]], what: str) -> None:
    """The strict check of :func:`load_weights` on shapes alone (shared tensors stored once are fine)."""
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    stored = dict(shapes)
    for key in own:  # save_model stores a shared tensor once, under one of its names
        if key not in stored and (alias := _alias_of(model, key, shapes)) is not None:
            stored[key] = shapes[alias]
    problems = shape_differences(own, stored, ("missing keys", "unexpected keys", "shape mismatch",
                                               "{theirs} vs model {ours}"))
    if problems:
        raise UserError(f"{what} do not fit the model its config.json describes ({'; '.join(problems)})")


# Data settings a saved model carries in its pretrained_cfg (the architecture's defaults are ImageNet's).
DATA_CFG_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode", "fixed_input_size",
                 "min_input_size", "test_input_size", "test_crop_pct", "label_names", "label_descriptions", "license")


def build_from_config(base: dict[str, Any], recipe: dict[str, Any], state: dict[str, Any] | None,
                      method: str | None = None, pretrained_cfg: Any = None) -> ConvertedModel:
    """Rebuild a converted model (random base weights) from the ``model_args`` of a saved config.

    Everything is validated before anything is built: the base architecture must be a timm model, the
    recipe must pass the method's schema, the state must hold known keys with valid values. The data
    settings of the saved ``pretrained_cfg`` (input size, mean/std, crop) are restored.
    """
    spec = BaseSpec.from_dict(base)
    rec = validate_recipe(recipe, "in config.json")
    if method is not None and rec.method != method:
        raise UserError(f"config: architecture says method {method!r} but the recipe says {rec.method!r}")
    if spec.img_size is not None and not (isinstance(spec.img_size, list) and len(spec.img_size) == 2 and all(
            _is_int(v) and v > 0 for v in spec.img_size)):
        raise UserError(f"config: model_args.base.img_size must be [height, width] in pixels, got {spec.img_size!r}")
    base_model = spec.build()
    embed = getattr(base_model, "patch_embed", None)
    fixed = getattr(embed, "img_size", None) if getattr(embed, "strict_img_size", False) else None
    if fixed is not None and spec.img_size is not None and list(fixed) != list(spec.img_size):
        raise UserError(f"config: model_args.base.img_size {spec.img_size} contradicts the base model, which is built "
                        f"for {list(fixed)} (its model_args); re-save the model with vitconvert")
    try:
        model = convert(base_model, spec, rec)
    except UserError:
        raise
    except BUILD_ERRORS as e:  # sizes that contradict the base model's own arguments
        raise UserError(f"config: model_args.base does not describe a model vitconvert can rebuild "
                        f"({type(e).__name__}: {one_line(e)[:160]}); re-save the model with vitconvert") from None
    if not isinstance(state, dict | None):
        raise UserError("config: model_args.state must be a mapping")
    if state:
        model.load_state(state)
    saved = pretrained_cfg if isinstance(pretrained_cfg, dict) else getattr(pretrained_cfg, "__dict__", None) or {}
    data = {k: saved[k] for k in DATA_CFG_KEYS if saved.get(k) is not None}
    _check_data_cfg(data, tuple(model.pretrained_cfg["input_size"]))
    model.pretrained_cfg.update(data)
    return model


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


_INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos", "random")
_CROP_MODES = ("center", "squash", "border")


def _check_data_cfg(data: dict[str, Any], input_size: tuple[int, ...]) -> None:
    """The data settings of a saved pretrained_cfg: what timm's transforms would otherwise crash on later."""
    def bad(key: str, expected: str) -> UserError:
        return UserError(f"config: pretrained_cfg.{key} must be {expected}, got {data[key]!r}")

    for key in ("input_size", "test_input_size", "min_input_size"):
        if key in data:
            v = data[key]
            if not (isinstance(v, list | tuple) and len(v) == 3 and all(_is_int(x) and x > 0 for x in v)):
                raise bad(key, "[channels, height, width] (positive integers)")
    if "input_size" in data and tuple(data["input_size"]) != input_size:
        raise bad("input_size", f"{list(input_size)}, the size the model runs at")
    for key in ("mean", "std"):
        if key in data:
            v = data[key]
            if not (isinstance(v, list | tuple) and len(v) == input_size[0] and all(_is_number(x) for x in v)):
                raise bad(key, f"{input_size[0]} numbers, one per channel")
            if key == "std" and any(x <= 0 for x in v):
                raise bad(key, "positive numbers")
    if "interpolation" in data and data["interpolation"] not in _INTERPOLATIONS:
        raise bad("interpolation", f"one of {', '.join(_INTERPOLATIONS)}")
    for key in ("crop_pct", "test_crop_pct"):
        if key in data and not (_is_number(data[key]) and 0 < data[key] <= 4):
            raise bad(key, "a number in (0, 4]")
    if "crop_mode" in data and data["crop_mode"] not in _CROP_MODES:
        raise bad("crop_mode", f"one of {', '.join(_CROP_MODES)}")
    if "fixed_input_size" in data and not isinstance(data["fixed_input_size"], bool):
        raise bad("fixed_input_size", "true or false")
    for key in ("label_names", "label_descriptions"):
        if key in data and not isinstance(data[key], list | dict):
            raise bad(key, "a list or mapping")
    if "license" in data and not isinstance(data["license"], str):
        raise bad("license", "a string")


def load_weights(model: ConvertedModel, weights: Path) -> None:
    """Read ``weights`` (safetensors) into ``model``, strictly: every key present, every shape right."""
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


def _alias_of(model: ConvertedModel, key: str, state: dict[str, Any]) -> str | None:
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
        folder = download_model(text[len("hf-hub:"):], revision=revision)
    else:
        folder = Path(text[len("local-dir:"):] if text.startswith("local-dir:") else text).expanduser()
        if not folder.is_dir():
            raise UserError(f"model folder {text!r} does not exist")
    config = read_config(folder)
    method, base, recipe, state = config_parts(config)
    if not (folder / WEIGHTS_NAME).is_file():
        raise UserError(f"model folder {text!r} has no {WEIGHTS_NAME}; vitconvert loads only safetensors weights")
    _check_outer(config)
    model = build_from_config(base, recipe, state, method, config.get("pretrained_cfg"))
    load_weights(model, folder / WEIGHTS_NAME)
    if budget is not None:
        model.set_budget(budget)
    return model.to(device).eval()


# --- timm entrypoints ---------------------------------------------------------------------------------------


def timm_entrypoint(method: str, pretrained: bool = False, **kwargs: Any) -> ConvertedModel:
    """Shared body of the ``vitconvert_<method>`` timm entrypoints."""
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


_ENTRYPOINTS: set[str] = set()


def _register_entrypoint(method: str, cls: Any) -> None:
    """Give timm a ``vitconvert_<method>`` entrypoint (once per name: a method registered again keeps it)."""
    if method not in _ENTRYPOINTS:
        _ENTRYPOINTS.add(method)
        register_model(_entrypoint_for(method))


def _entrypoint_for(method: str) -> Any:
    def entrypoint(pretrained: bool = False, **kwargs: Any) -> ConvertedModel:
        return timm_entrypoint(method, pretrained, **kwargs)

    # timm's registry keys entrypoints by function name and module.
    entrypoint.__name__ = entrypoint.__qualname__ = f"vitconvert_{method}"
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = (f"{METHODS[method].__name__} converted model, rebuilt from a saved vitconvert config "
                          "(``model_args``: base, recipe, state).")
    return entrypoint


__all__ = ["build_from_config", "check_config", "check_folder", "check_output_dir", "check_writable_dir", "load",
           "load_weights", "model_config", "save", "timm_entrypoint"]
on_register(_register_entrypoint)
