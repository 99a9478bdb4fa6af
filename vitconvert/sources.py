"""Model sources: turn what the user typed into a base timm model plus a JSON description of it.

A source is one of

* a timm model name, with short aliases resolved through timm's registry (``deit_small`` ->
  ``deit_small_patch16_224``), optionally with a pretrained tag (``deit_small_patch16_224.fb_in1k``);
* ``hf-hub:owner/name`` or ``local-dir:PATH`` (timm's own conventions);
* any of these plus a checkpoint file (.safetensors, or .pth/.bin/.pt read with ``weights_only=True``)
  and timm-style model kwargs, so a user's own fine-tuned weights convert.

The returned :class:`BaseSpec` is what a converted model stores in its config so the base architecture
can be rebuilt (without weights) when the converted model is loaded again.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import os
import pickle
import re
import socket
import urllib.parse
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from vitconvert.anatomy import model_img_size
from vitconvert.errors import UserError, one_line
from vitconvert.hub import download_config, download_transformers_folder, hub_error, is_hub_failure
from vitconvert.recipes import parse_key_values
from vitconvert.transformers_bases import (
    data_settings,
    is_transformers_config,
    is_transformers_module,
    load_transformers_model,
    preprocessor_config,
    set_data_settings,
    set_layer_norm_eps,
    timm_equivalent,
    timm_from_transformers,
)

# Keys timm's factory accepts for every model but that do not describe the architecture.
_PLAIN_SUFFIX = re.compile(r"((patch|window)\d+|\d+)(_((patch|window)\d+|\d+))*")
_RUNTIME_ARGS = {"pretrained_cfg", "pretrained_cfg_overlay", "cache_dir", "device", "dtype"}


@dataclass
class BaseSpec:
    """Everything needed to rebuild the base architecture and to say where its weights came from.

    Args:
        architecture: Registered timm architecture name (no pretrained tag).
        model_args: Keyword arguments for ``timm.create_model`` (always includes ``num_classes``).
        source: The model string as the user gave it (timm name, ``hf-hub:``, ``local-dir:``).
        pretrained_tag: timm pretrained tag when weights came from timm's registry.
        hub_id: Hub repository of the base weights when known (used for the model card's ``base_model``).
        checkpoint: Path of a user checkpoint the weights were read from, if any.
        pretrained: Whether pretrained weights were loaded at all.
        img_size: Input size the model runs at (models such as PVT-v2 take any size; this is the one its
            data config names).
        layer_norm_eps: The eps of every LayerNorm when it is not the timm architecture's own (a transformers
            checkpoint's ``layer_norm_eps``: timm's constructors take norm layers, not an eps, and the spec must
            stay JSON), applied by :meth:`build`; None keeps timm's.
    """

    architecture: str
    model_args: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    pretrained_tag: str | None = None
    hub_id: str | None = None
    checkpoint: str | None = None
    pretrained: bool = False
    img_size: list[int] | None = None
    layer_norm_eps: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BaseSpec:
        if not isinstance(data, dict) or not isinstance(data.get("architecture"), str):
            raise UserError("config: model_args.base must be a mapping with a string 'architecture'")
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(data) - known
        if unknown:
            raise UserError(f"config: unknown keys in model_args.base: {sorted(unknown)}")
        if not timm.is_model(data["architecture"]):
            raise UserError(f"config: base architecture {data['architecture']!r} is not a timm model")
        if not isinstance(data.get("model_args", {}), dict):
            raise UserError("config: model_args.base.model_args must be a mapping")
        for key, types, expected in (("source", (str,), "a string"), ("pretrained_tag", (str, type(None)), "a string"),
                                     ("hub_id", (str, type(None)), "a string"), ("checkpoint", (str, type(None)),
                                                                                "a path"),
                                     ("pretrained", (bool,), "true or false"),
                                     ("img_size", (list, type(None)), "[height, width]")):
            if key in data and not isinstance(data[key], types):
                raise UserError(f"config: model_args.base.{key} must be {expected}, got {data[key]!r}")
        eps = data.get("layer_norm_eps")
        if eps is not None and not (isinstance(eps, int | float) and not isinstance(eps, bool) and 0 < eps < 1):
            raise UserError(f"config: model_args.base.layer_norm_eps must be a small positive number, got {eps!r}")
        return cls(**data)

    def build(self) -> nn.Module:
        """The base architecture with random weights (weights are loaded by the caller).

        Raises:
            UserError: timm cannot build it with these arguments (e.g. a hand-edited config).
        """
        model = build_timm(self.architecture, self.model_args, "config.json model_args.base.model_args")
        if self.layer_norm_eps is not None:
            set_layer_norm_eps(model, float(self.layer_norm_eps))
        return model


def resolve_model_name(name: str) -> tuple[str, str | None]:
    """Resolve a timm name or short alias to ``(architecture, pretrained_tag)``.

    ``deit_small`` -> ``deit_small_patch16_224``; an alias matching several architectures is an error that
    lists them.
    """
    arch, _, tag = name.partition(".")
    if timm.is_model(arch):
        return arch, tag or None
    candidates = sorted(set(timm.list_models(f"{arch}_*")))
    if not candidates:
        close = sorted(set(timm.list_models(f"*{arch}*")))[:8]
        hint = f" Did you mean one of: {', '.join(close)}?" if close else ""
        raise UserError(f"unknown model {name!r}: not a timm model name or alias.{hint}")
    if len(candidates) > 1:
        # An alias names the plain variant: the one whose extra suffix is only patch/window/size tokens
        # (deit_small -> deit_small_patch16_224, not deit_small_distilled_patch16_224).
        plain = [c for c in candidates if _PLAIN_SUFFIX.fullmatch(c[len(arch) + 1:])]
        if len(plain) == 1:
            return plain[0], tag or None
        pool = plain or candidates
        shown = ", ".join(pool[:12]) + (" ..." if len(pool) > 12 else "")
        raise UserError(f"model alias {name!r} is ambiguous; use one of: {shown}")
    return candidates[0], tag or None


def parse_model_kwargs(items: list[str] | None) -> dict[str, Any]:
    """Parse timm-style ``key=value`` strings; values are read as YAML (``4`` -> int, ``[2,2]`` -> list)."""
    pairs = parse_key_values(items, "--model-kwargs", "img_size=32")
    return {key: tuple(value) if isinstance(value, list) else value for key, value in pairs}


def load_checkpoint_file(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a state dict from .safetensors, or .pth/.bin/.pt with ``weights_only=True``.

    Handles the usual nesting (``state_dict``, ``model``, ``model_ema``, ``module``) and strips ``module.``
    prefixes left by DataParallel/DDP.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path), device="cpu")
        elif suffix in {".pth", ".pt", ".bin", ".ckpt"}:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        else:
            raise UserError(f"checkpoint {path.name!r}: unsupported format; use .safetensors, .pth, .pt or .bin")
    except UserError:
        raise
    except pickle.UnpicklingError:
        # torch's own text spans several lines and suggests weights_only=False, which would run the file's code.
        raise UserError(f"checkpoint {str(path)!r} could not be read: it holds pickled Python objects besides "
                        "tensors, which vitconvert never unpickles; save only the state dict "
                        "(torch.save(model.state_dict(), f)) or convert it to .safetensors") from None
    except Exception as e:  # corrupt files raise many different types
        raise UserError(f"checkpoint {str(path)!r} could not be read ({type(e).__name__}: "
                        f"{one_line(e)[:200]})") from None
    for key in ("state_dict", "model", "model_ema", "module"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"checkpoint {str(path)!r} does not hold a state dict of tensors")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def load_state_dict_checked(model: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Load strictly, reporting missing/unexpected keys and shape mismatches by name."""
    own = model.state_dict()
    problems = shape_differences(
        {k: tuple(v.shape) for k, v in own.items()}, {k: tuple(v.shape) for k, v in state.items()},
        ("missing keys", "unexpected keys", "shape mismatch", "{theirs} vs model {ours}"))
    if problems:
        raise UserError(
            f"{what} does not fit the model ({'; '.join(problems)}); check --model-kwargs (e.g. num_classes, "
            "img_size, embed_dim, depth) against the checkpoint"
        )
    model.load_state_dict(state, strict=True)


def shape_differences(ours: dict[str, tuple[int, ...]], theirs: dict[str, tuple[int, ...]],
                      labels: tuple[str, str, str, str], shown: int = 6) -> list[str]:
    """What keeps ``theirs`` (name -> shape) from loading into ``ours``: one phrase per kind of problem.

    ``labels`` name the three kinds (keys only ours have, keys only theirs have, shape mismatches) and give the
    format of one mismatch (``{ours}`` and ``{theirs}`` are the two shapes).
    """
    only_ours = [k for k in ours if k not in theirs]
    only_theirs = [k for k in theirs if k not in ours]
    shapes = [f"{k} " + labels[3].format(ours=ours[k], theirs=theirs[k])
              for k in ours if k in theirs and ours[k] != theirs[k]]
    return [f"{label}: {_shorten(items, shown)}"
            for label, items in zip(labels[:3], (only_ours, only_theirs, shapes), strict=True) if items]


def _shorten(items: list[str], n: int = 6) -> str:
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


def _offline_error(source: str, err: Exception) -> UserError:
    return UserError(
        f"pretrained weights for {source!r} could not be fetched ({type(err).__name__}); you are offline or "
        "the weights are not cached. Alternatives: --checkpoint FILE with the weights, local-dir:PATH to a "
        "saved timm folder, or --no-pretrained for random weights"
    )


def load_base(
    model: str,
    checkpoint: str | os.PathLike[str] | None = None,
    model_kwargs: dict[str, Any] | None = None,
    pretrained: bool = True,
) -> tuple[nn.Module, BaseSpec]:
    """Build the base model the user named and load its weights.

    Args:
        model: timm name or alias, ``hf-hub:owner/name`` or ``local-dir:PATH``.
        checkpoint: Optional weights file that replaces the source's own weights.
        model_kwargs: Extra ``timm.create_model`` kwargs (e.g. ``img_size=32, num_classes=10``).
        pretrained: Load the source's pretrained weights (ignored when ``checkpoint`` is given).

    Returns:
        The base model in eval mode and its :class:`BaseSpec`.

    Example:
        >>> base, spec = load_base("deit_tiny", pretrained=False, model_kwargs={"num_classes": 10})
        >>> spec.architecture
        'deit_tiny_patch16_224'
    """
    kwargs = dict(model_kwargs or {})
    use_pretrained = pretrained and checkpoint is None
    hub_id: str | None = None
    tag: str | None = None
    if model.startswith("local-dir:"):
        path = Path(model[len("local-dir:"):]).expanduser()
        if not (path / "config.json").is_file():
            raise UserError(f"local-dir: {str(path)!r} has no config.json; point it at a saved timm model folder")
        cfg = _read_json_config(path / "config.json", model)
        if is_transformers_config(cfg):
            return _transformers_base(path, cfg, model, None, checkpoint, kwargs, use_pretrained)
        arch, base_args = _arch_from_config(cfg, model)  # checked before timm reads the folder
        pickled = [n for n in ("pytorch_model.bin", "model.pth", "model.pt") if (path / n).is_file()]
        if not use_pretrained:
            base = build_timm(arch, {**base_args, **kwargs}, "--model-kwargs and config.json model_args", model)
        elif not (path / "model.safetensors").is_file() and pickled:
            # timm would try the pickled file itself; read it here, with weights_only=True, for one-line errors.
            base = build_timm(arch, {**base_args, **kwargs}, "--model-kwargs and config.json model_args", model)
            load_state_dict_checked(base, load_checkpoint_file(path / pickled[0]), f"{model} {pickled[0]}")
        elif not (path / "model.safetensors").is_file():
            raise UserError(f"{model} has no weights (model.safetensors); pass --checkpoint FILE or --no-pretrained")
        else:
            base = _create(f"local-dir:{path}", True, kwargs, model)
        hub_id = (cfg.get("pretrained_cfg") or {}).get("hf_hub_id") if isinstance(cfg.get("pretrained_cfg"),
                                                                                 dict) else None
    elif model.startswith("hf-hub:"):
        repo = model[len("hf-hub:"):]
        hub_id = repo
        with offline_unless_reachable():
            hub_cfg = download_config(repo)
        if is_transformers_config(hub_cfg):
            folder = download_transformers_folder(repo, weights=use_pretrained)
            return _transformers_base(folder, hub_cfg, model, repo, checkpoint, kwargs, use_pretrained)
        if not use_pretrained:
            arch, base_args = _arch_from_config(hub_cfg, model)
            base = build_timm(arch, {**base_args, **kwargs}, "--model-kwargs and the repository's model_args", model)
        else:
            base = _create(model, True, kwargs, model)
    else:
        arch, tag = resolve_model_name(model)
        name = f"{arch}.{tag}" if tag else arch
        base = _create(name, use_pretrained, kwargs, model)
        cfg_hub = getattr(base, "pretrained_cfg", {}).get("hf_hub_id")
        if cfg_hub:
            hub_id = cfg_hub
        tag = getattr(base, "pretrained_cfg", {}).get("tag") or tag

    if checkpoint is not None:
        load_state_dict_checked(base, load_checkpoint_file(checkpoint), f"checkpoint {str(checkpoint)!r}")

    arch = base.pretrained_cfg.get("architecture") or type(base).__name__
    spec = BaseSpec(
        img_size=list(model_img_size(base)),
        architecture=arch,
        model_args=_recorded_args(base, kwargs),
        source=model,
        pretrained_tag=tag,
        hub_id=hub_id if use_pretrained else None,
        checkpoint=str(checkpoint) if checkpoint is not None else None,
        pretrained=use_pretrained or checkpoint is not None,
    )
    return base.eval(), spec


def _transformers_base(folder: Path, cfg: dict[str, Any], source: str, repo: str | None,
                       checkpoint: str | os.PathLike[str] | None, kwargs: dict[str, Any], pretrained: bool
                       ) -> tuple[nn.Module, BaseSpec]:
    """A transformers checkpoint (local folder or downloaded Hub snapshot; without weights when ``pretrained`` is
    false) as the equivalent timm model.

    The architecture is the config's, so ``model_kwargs`` may only repeat it (as a saved spec does when the
    original is rebuilt as a teacher). With weights, the timm model must reproduce the transformers model's logits;
    without (``pretrained=False``), only config.json is read and transformers is not needed.
    """
    eq = timm_equivalent(cfg, source)
    args = _jsonable(eq.model_args)
    differing = sorted(k for k, v in _jsonable(kwargs).items() if args.get(k) != v)
    if differing:
        raise UserError(f"{source} is a transformers {eq.hf_class} checkpoint, whose architecture comes from its "
                        f"config.json; --model-kwargs cannot change {', '.join(differing)}")
    use_weights = pretrained and checkpoint is None
    preprocessor = preprocessor_config(folder, source)
    if use_weights:
        hf_model = load_transformers_model(folder, eq, source)
        base = timm_from_transformers(hf_model, eq, source, lambda a, k: build_timm(a, k, "config.json", source),
                                      load_state_dict_checked)
    else:
        base = build_timm(eq.architecture, eq.model_args, "config.json", source)
        set_layer_norm_eps(base, eq.layer_norm_eps)
    set_data_settings(base, data_settings(eq, preprocessor, source))
    if checkpoint is not None:
        load_state_dict_checked(base, load_checkpoint_file(checkpoint), f"checkpoint {str(checkpoint)!r}")
    spec = BaseSpec(img_size=list(eq.img_size), architecture=eq.architecture, model_args=args, source=source,
                    pretrained_tag=None, hub_id=repo if use_weights else None,
                    checkpoint=str(checkpoint) if checkpoint is not None else None,
                    pretrained=pretrained or checkpoint is not None, layer_norm_eps=eq.layer_norm_eps)
    return base.eval(), spec


def _transformers_module_base(model: nn.Module, base_name: str | None, model_kwargs: dict[str, Any] | None
                              ) -> tuple[nn.Module, BaseSpec]:
    """A transformers model object as the equivalent timm model (its own weights, checked against its logits).

    Data settings come from ``preprocessor_config.json`` beside the folder it was loaded from, when that is a
    local folder; otherwise the timm architecture's defaults stand.
    """
    hf_class = type(model).__name__
    source = f"the transformers {hf_class} module"
    if base_name is not None or model_kwargs:
        raise UserError(f"{source} says its architecture in its config; base_name= and model_kwargs= are for timm "
                        "modules")
    config = model.config.to_dict() if hasattr(model.config, "to_dict") else {}
    eq = timm_equivalent(config, source, hf_class)
    reference = copy.deepcopy(model).float().eval()  # the caller's module keeps its dtype and train/eval mode
    base = timm_from_transformers(reference, eq, source, lambda a, k: build_timm(a, k, "config", source),
                                  load_state_dict_checked)
    name = getattr(model, "name_or_path", "") or ""
    folder = Path(name).expanduser() if name and Path(name).expanduser().is_dir() else None
    set_data_settings(base, data_settings(eq, preprocessor_config(folder, source) if folder else None, source))
    spec = BaseSpec(img_size=list(eq.img_size), architecture=eq.architecture, model_args=_jsonable(eq.model_args),
                    source="", pretrained_tag=None, hub_id=None, checkpoint=None, pretrained=True,
                    layer_norm_eps=eq.layer_norm_eps)
    return base, spec


def _recorded_args(base: nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The constructor kwargs timm recorded on ``base`` (``_model_args``), ``kwargs`` on top, and its head size."""
    model_args = {
        k: v for k, v in (getattr(base, "_model_args", None) or {}).items()
        if k not in _RUNTIME_ARGS and v is not None
    }
    model_args.update(kwargs)
    model_args["num_classes"] = int(getattr(base, "num_classes", model_args.get("num_classes", 0)))
    return _jsonable(model_args)


def base_from_module(
    model: nn.Module,
    base_name: str | None = None,
    model_kwargs: dict[str, Any] | None = None,
) -> tuple[nn.Module, BaseSpec]:
    """Describe a timm model the caller already holds, so a model converted from it saves and loads like any other.

    The architecture comes from ``model.pretrained_cfg["architecture"]`` (or ``base_name``), the constructor
    arguments from what timm's factory recorded (``model._model_args``) with ``model_kwargs`` on top, the
    head size from the model. The description is checked before anything is converted: the architecture it
    names, built without weights, must have exactly the module's parameter names and shapes, otherwise a
    saved model could not be rebuilt; the error says what to pass.

    The module itself is not changed: the returned base is a deep copy (its own weights), so converting and
    fine-tuning never alter the caller's model, and the caller's later changes never reach the converted one.

    Args:
        model: A timm model, e.g. from ``timm.create_model`` (possibly trained since).
        base_name: timm architecture (or alias) when the module does not record one, e.g. a model built from
            its class (``VisionTransformer(...)``) rather than by ``timm.create_model``.
        model_kwargs: Constructor arguments the module does not record, or that override the recorded ones.

    Returns:
        A copy of the module in eval mode and its :class:`BaseSpec` (``source`` is empty: the weights came
        from memory, so after fine-tuning the original can only be given back as a teacher).

    Example:
        >>> m = timm.create_model("deit_tiny_patch16_224", num_classes=10)
        >>> base, spec = base_from_module(m)
        >>> spec.architecture, spec.model_args["num_classes"]
        ('deit_tiny_patch16_224', 10)
    """
    if not isinstance(model, nn.Module):
        raise UserError(f"expected a torch nn.Module, got {type(model).__name__}")
    if is_transformers_module(model):
        return _transformers_module_base(model, base_name, model_kwargs)
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    # No pretrained tag from the module's cfg: timm sets one even for random weights, and a module may have
    # been trained since, so only a tag the caller names is claimed.
    tag = None
    if base_name is not None:
        arch, tag = resolve_model_name(base_name)
    else:
        arch = cfg.get("architecture")
    fix = ("pass base_name= (the timm architecture) and model_kwargs= (its constructor arguments, e.g. img_size, "
           "patch_size, embed_dim, depth, num_heads, num_classes)")
    if not isinstance(arch, str) or not timm.is_model(arch):
        raise UserError(f"the {type(model).__name__} module does not say which timm architecture it is "
                        f"(pretrained_cfg architecture {arch!r}), so a converted model could not be saved; {fix}")
    kwargs = dict(model_kwargs or {})
    args = _recorded_args(model, kwargs)
    recorded = getattr(model, "_model_args", None) is not None
    problem = _rebuild_mismatch(arch, args, model)
    if problem:
        what = "its recorded arguments" if recorded or kwargs else "default arguments (the module records none)"
        raise UserError(f"{arch} built with {what} does not match the {type(model).__name__} module ({problem}); "
                        f"{fix}")
    base = copy.deepcopy(model).eval()
    spec = BaseSpec(img_size=list(model_img_size(base)), architecture=arch, model_args=args, source="",
                    pretrained_tag=tag, hub_id=None, checkpoint=None, pretrained=True)
    return base, spec


def _rebuild_mismatch(arch: str, args: dict[str, Any], model: nn.Module) -> str | None:
    """Why ``arch(**args)`` would not hold ``model``'s weights (missing/extra names, shapes), or None."""
    try:
        # On the meta device nothing is allocated or initialised: only names and shapes are compared.
        with torch.device("meta"):
            rebuilt = timm.create_model(arch, pretrained=False, **args)
    except BUILD_ERRORS as e:
        return f"building it failed: {type(e).__name__}: {one_line(e)[:160]}"
    problems = shape_differences(
        {k: tuple(v.shape) for k, v in model.state_dict().items()},
        {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()},
        ("parameters it lacks", "parameters the module lacks", "shapes (module vs rebuilt)", "{ours} vs {theirs}"),
        shown=3)
    return "; ".join(problems) or None


def _read_json_config(file: Path, source: str) -> dict[str, Any]:
    try:
        cfg = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{source}: {str(file)!r} is not valid JSON ({one_line(e)}); fix or re-save the "
                        "folder") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{source}: {str(file)!r} must hold a JSON object (a timm config), not a "
                        f"{type(cfg).__name__}")
    return cfg


def _arch_from_config(cfg: Any, source: str) -> tuple[str, dict[str, Any]]:
    if not isinstance(cfg, dict):
        raise UserError(f"{source}: config.json must hold a JSON object (a timm config), not a {type(cfg).__name__}")
    arch = cfg.get("architecture")
    if arch is None:
        raise UserError(f"{source}: config.json has no 'architecture'; it is not a saved timm model folder")
    if not isinstance(arch, str) or not timm.is_model(arch):
        raise UserError(f"{source}: config.json names architecture {arch!r}, which timm does not know")
    if not isinstance(cfg.get("model_args") or {}, dict):
        raise UserError(f"{source}: config.json model_args must be a mapping")
    args = dict(cfg.get("model_args") or {})
    if "num_classes" in cfg:
        args.setdefault("num_classes", cfg["num_classes"])
    return arch, args


@functools.cache
def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hub endpoint accepts TCP connections (checked once per process)."""
    from huggingface_hub import constants

    url = urllib.parse.urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "", port), timeout=timeout):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def offline_unless_reachable() -> Iterator[None]:
    """Use huggingface_hub's offline mode while the Hub cannot be reached.

    Cached files then load at once and missing ones fail at once, instead of after the client's
    retries with back-off (about a minute per file).
    """
    from huggingface_hub import constants

    saved = constants.HF_HUB_OFFLINE
    if not saved and not hub_reachable():
        constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved


# What timm's constructors raise for arguments they cannot build (num_heads not dividing the width: an
# AssertionError; patch_size=0: ZeroDivisionError; depth=-1: RuntimeError...).
BUILD_ERRORS = (TypeError, ValueError, AssertionError, ZeroDivisionError, RuntimeError, KeyError, IndexError,
                 AttributeError, OverflowError)


def build_timm(arch: str, kwargs: dict[str, Any], what: str, source: str | None = None) -> nn.Module:
    """``timm.create_model(arch, pretrained=False, **kwargs)``; arguments timm cannot build are a UserError.

    Args:
        arch: A registered timm architecture.
        kwargs: Its arguments (from --model-kwargs or a config).
        what: Where the arguments came from, for the message.
        source: The model as the user named it (default: ``arch``).
    """
    try:
        return timm.create_model(arch, pretrained=False, **kwargs)
    except BUILD_ERRORS as e:
        raise _cannot_build(arch, kwargs, what, source, e) from None


def _cannot_build(arch: str, kwargs: dict[str, Any], what: str, source: str | None, e: Exception) -> UserError:
    shown = ", ".join(f"{k}={v!r}" for k, v in kwargs.items()) or "no arguments"
    return UserError(f"{source or arch}: bad {what} for {arch}: timm cannot build it with {shown} "
                     f"({type(e).__name__}: {one_line(e)[:160] or 'invalid value'})")


def _create(name: str, pretrained: bool, kwargs: dict[str, Any], source: str) -> nn.Module:
    if not pretrained:
        return build_timm(name, kwargs, "--model-kwargs", source)
    try:
        with offline_unless_reachable():
            return timm.create_model(name, pretrained=True, **kwargs)
    except TypeError as e:
        raise UserError(f"{source}: bad --model-kwargs for this architecture ({one_line(e)})") from None
    except (AssertionError, ZeroDivisionError, OverflowError, IndexError) as e:
        raise _cannot_build(name, kwargs, "--model-kwargs", source, e) from None
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise UserError(f"{source}: {e}; if it is a vitconvert model use vitconvert.load") from None
        if "pretrained" in str(e).lower() or "No pretrained weights" in str(e):
            raise UserError(
                f"{source}: timm has no pretrained weights for it; pass --checkpoint FILE or --no-pretrained"
            ) from None
        if kwargs:  # the weights do not fit what the arguments built, or timm cannot build it with them
            raise UserError(f"{source}: timm cannot build it with these --model-kwargs ({one_line(e)[:200]})") from None
        raise
    except Exception as e:
        if name.startswith("hf-hub:") and is_hub_failure(e):
            # A missing repo, revision or file, a bad token or no network: say which, not "offline".
            raise hub_error(name[len("hf-hub:"):].split("@")[0], e) from None
        # huggingface_hub raises its own hierarchy (LocalEntryNotFoundError, RepositoryNotFoundError, ...)
        if isinstance(e, OSError | ConnectionError | ValueError) or is_hub_failure(e):
            raise _offline_error(source, e) from None
        raise


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, bool | int | float | str) or value is None:
        return value
    raise UserError(f"model argument value {value!r} is not JSON-serialisable")
