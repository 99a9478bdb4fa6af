"""Recipes: YAML files that say which method to apply, with which structure, and how to fine-tune it.

A recipe has four parts::

    name: cfvit                 # how `vitconvert recipes` lists it
    method: cfvit               # a key of vitconvert.methods.METHODS
    description: one line
    model: {...}                # the method's structural settings (its ``Settings`` schema)
    finetune: {...}             # epochs, lr, batch size, loss weights (``losses`` is the method's schema)
    calibrate: {...}            # held-out fraction and default budget
    families:                   # optional: what differs for a family (a key of the method's ``families``)
      pvt_v2: {model: {...}, finetune: {...}}

A family's section is merged into the sections above when the recipe meets a model of that family
(:meth:`Recipe.for_family`, at conversion), so one recipe name serves every family with its own defaults; the
converted model keeps the merged values, with ``family`` naming the section applied. ``--set`` overrides win over
family sections (an overridden key is taken out of every family section).

Recipes are validated with pydantic: an unknown key is reported with its dotted path and the allowed
keys, a bad value with the allowed range. ``overrides`` (``--set key=value`` on the CLI) change single
fields before validation.
"""

from __future__ import annotations

import copy
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError

from vitconvert.errors import UserError
from vitconvert.registry import METHODS, get_method

# The shipped recipes are package data (``vitconvert/builtin_recipes/*.yaml``), so wheels carry them; the
# repository's top-level ``recipes/`` is a link to that folder, where users look first.
RECIPES_DIR = Path(str(resources.files("vitconvert") / "builtin_recipes"))


class Strict(BaseModel):
    """A recipe section (and a method's ``Settings`` / ``Losses``): unknown keys are refused, and once validated it is
    read-only, so what a model was built with cannot drift from its saved recipe (a change is a new recipe, see
    :func:`load_recipe`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class FinetuneSettings(Strict):
    """The short fine-tuning recipe (shared by every method; ``losses`` is method-specific)."""

    epochs: float = Field(3.0, gt=0, le=1000, description="passes over the training images")
    batch_size: int = Field(64, ge=1, le=8192)
    lr: float = Field(2e-4, gt=0, le=1.0, description="peak learning rate (AdamW)")
    min_lr: float = Field(1e-6, ge=0, le=1.0)
    weight_decay: float = Field(0.05, ge=0, le=1.0)
    warmup_epochs: float = Field(0.2, ge=0, le=100)
    clip_grad: float | None = Field(1.0, gt=0)
    ema_decay: float | None = Field(None, gt=0, lt=1)
    drop_path_rate: float = Field(0.0, ge=0, lt=1)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    distill_temperature: float = Field(1.0, gt=0, le=100)
    mixup: float = Field(0.0, ge=0, le=10, description="mixup: each batch mixed with its reverse by a Beta(a, a) "
                         "weight, the teacher seeing the same mixed images (labels mixed too); 0: off")
    cutmix: float = Field(0.0, ge=0, le=10, description="cutmix: a box of the reversed batch pasted in, its area "
                          "Beta(a, a); with mixup, each batch takes one of the two at random; 0: off")
    max_images: int | None = Field(None, ge=1, description="use at most this many training images")
    checkpoint_every: int = Field(200, ge=1, description="optimizer steps between resumable checkpoints")
    seed: int = 0
    augment: dict[str, Any] = Field(default_factory=dict, description="timm create_transform arguments for "
                                    "training, e.g. {scale: [0.5, 1.0], color_jitter: 0.0}; empty: timm's defaults")
    losses: dict[str, float] = Field(default_factory=dict)


class CalibrateSettings(Strict):
    """How operating points are chosen on held-out training images."""

    holdout: float = Field(0.1, gt=0, lt=1, description="fraction of the training folder held out")
    max_images: int | None = Field(2000, ge=1)
    budget: str | float | None = Field(None, description="default budget: GMACs, 'N%' of the base model, 'drop=P' or "
                                       "'best'")
    check_speed: bool = Field(True, description="time the chosen point against the base model on this device and "
                              "choose again, without it, while it runs slower (GMACs, drop and no budget)")


class Recipe(Strict):
    """A validated recipe (read-only). ``model`` and ``finetune.losses`` hold the method's settings, filled in with
    their defaults; :attr:`settings` and :attr:`losses` are the same values as the method's typed models, built once
    when the recipe is validated (:func:`validate_recipe`), not on every access (training reads them every step)."""

    version: Literal[1] = 1
    name: str
    method: str
    description: str = ""
    model: dict[str, Any] = Field(default_factory=dict)
    finetune: FinetuneSettings = Field(default_factory=FinetuneSettings)
    calibrate: CalibrateSettings = Field(default_factory=CalibrateSettings)
    families: dict[str, dict[str, Any]] = Field(default_factory=dict, description="per family: changes to the "
                                                "model / finetune / calibrate sections, merged at conversion")
    family: str | None = Field(None, description="the family section merged into this recipe (for_family)")
    _settings: Any = PrivateAttr(default=None)
    _losses: Any = PrivateAttr(default=None)

    @property
    def settings(self) -> Any:
        """The method's structural settings as its pydantic model (``Settings``)."""
        if self._settings is None:  # a Recipe built directly, not through validate_recipe
            self._settings = get_method(self.method).Settings(**self.model)
        return self._settings

    @property
    def losses(self) -> Any:
        """The method's loss weights as its pydantic model (``Losses``)."""
        if self._losses is None:
            self._losses = get_method(self.method).Losses(**self.finetune.losses)
        return self._losses

    @property
    def validated(self) -> bool:
        """Whether :func:`validate_recipe` made this recipe (so its method sections are checked and complete)."""
        return self._settings is not None and self._losses is not None

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def for_family(self, family: str) -> Recipe:
        """This recipe with ``families[family]`` merged in, no family sections left and ``family`` set; the recipe
        itself when it has no section for ``family`` (or was merged already: its values are then explicit)."""
        if self.family is not None or family not in self.families:
            return self
        return validate_recipe(merged_for_family(self.to_dict(), family), f"{self.name} (families.{family})")


def _format_error(err: ValidationError, source: str, prefix: str = "", schema: type[BaseModel] | None = None) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in (prefix.split(".") if prefix else []) + list(first["loc"]))
    if first["type"] == "extra_forbidden":
        allowed = _allowed_keys(schema, list(first["loc"])[:-1]) if schema else []
        hint = f" (allowed: {', '.join(allowed)})" if allowed else ""
        return f"recipe {source}: unknown key {loc!r}{hint}"
    if first["type"] == "missing":
        return f"recipe {source}: missing required key {loc!r}"
    got = first.get("input")
    return f"recipe {source}: {loc}: {first['msg']} (got {got!r})"


def _allowed_keys(schema: type[BaseModel] | None, path: list[Any]) -> list[str]:
    for part in path:
        if schema is None:
            return []
        field = schema.model_fields.get(str(part))
        ann = field.annotation if field else None
        schema = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    return sorted(schema.model_fields) if schema is not None else []


def merge_into(data: dict[str, Any], changes: dict[str, Any]) -> None:
    """Deep-merge ``changes`` into ``data``: mappings key by key, anything else replaced."""
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            merge_into(data[key], value)
        else:
            data[key] = copy.deepcopy(value)


def merged_for_family(data: dict[str, Any], family: str) -> dict[str, Any]:
    """A recipe mapping with ``families[family]`` merged into its sections, no family sections left and ``family``
    naming the one merged (``data`` is left as it was)."""
    merged = {k: copy.deepcopy(v) for k, v in data.items() if k != "families"}
    merge_into(merged, data["families"][family])
    return {**merged, "families": {}, "family": family}


def _drop_path(data: dict[str, Any], dotted: str) -> None:
    """Remove ``dotted`` from ``data`` when present (with the mappings it leaves empty)."""
    head, _, rest = dotted.partition(".")
    if head not in data:
        return
    if not rest:
        del data[head]
    elif isinstance(data[head], dict):
        _drop_path(data[head], rest)
        if not data[head]:
            del data[head]


def set_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``data['a']['b'] = value`` for ``dotted='a.b'``, creating mappings on the way."""
    parts = dotted.split(".")
    cur = data
    for p in parts[:-1]:
        nxt = cur.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise UserError(f"--set {dotted}: {p!r} is not a mapping")
        cur = nxt
    cur[parts[-1]] = value


def parse_key_values(items: list[str] | None, option: str, example: str) -> list[tuple[str, Any]]:
    """``key=value`` strings as (key, value) pairs; values are read as YAML (``4`` -> int, ``[2,2]`` -> list)."""
    out = []
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"{option} expects key=value (e.g. {example}), got {item!r}")
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            parsed = value
        out.append((key.strip(), parsed))
    return out


def parse_overrides(items: list[str] | None) -> list[tuple[str, Any]]:
    return parse_key_values(items, "--set", "model.alpha=0.6")


def validate_recipe(data: Any, source: str = "<dict>", overrides: list[tuple[str, Any]] | None = None) -> Recipe:
    """Validate a recipe mapping (after applying ``overrides``) and the method's own sections.

    Args:
        data: The parsed YAML mapping.
        source: Name used in error messages (file name or recipe name).
        overrides: ``(dotted.key, value)`` pairs applied first.

    Raises:
        UserError: with the dotted path of the first problem.
    """
    if not isinstance(data, dict):
        raise UserError(f"recipe {source}: expected a mapping at the top level")
    data = copy.deepcopy(data)
    for key, value in overrides or []:
        set_path(data, key, value)
        for section in (data.get("families") or {}).values():  # what the user sets wins in every family
            if isinstance(section, dict):
                _drop_path(section, key)
    method = data.get("method")
    if method not in METHODS:
        raise UserError(f"recipe {source}: method {method!r} is not known; available: {', '.join(sorted(METHODS))}")
    try:
        raw = Recipe(**data)
    except ValidationError as e:
        raise UserError(_format_error(e, source, schema=Recipe)) from None
    cls = METHODS[method]
    for family, section in raw.families.items():  # each family's merged recipe must be valid too
        if family not in cls.families:
            raise UserError(f"recipe {source}: families.{family}: method {method} supports the families "
                            f"{', '.join(cls.families)}")
        if set(section) - {"model", "finetune", "calibrate"}:
            raise UserError(f"recipe {source}: families.{family}: only model, finetune and calibrate can differ "
                            f"per family (got {', '.join(sorted(set(section)))})")
        validate_recipe(merged_for_family(data, family), f"{source} (families.{family})")
    try:
        settings = cls.Settings(**raw.model)
    except ValidationError as e:
        raise UserError(_format_error(e, source, "model", cls.Settings)) from None
    try:
        losses = cls.Losses(**raw.finetune.losses)
    except ValidationError as e:
        raise UserError(_format_error(e, source, "finetune.losses", cls.Losses)) from None
    # The filled-in settings are stored, so saved configs are complete and independent of default changes.
    finetune = {**raw.finetune.model_dump(), "losses": losses.model_dump(mode="json")}
    recipe = Recipe(**{**raw.model_dump(), "model": settings.model_dump(mode="json"), "finetune": finetune})
    recipe._settings, recipe._losses = settings, losses
    return recipe


def find_recipe(name_or_path: str | Path) -> Path:
    """A recipe file by path, or by name among the recipes shipped with vitconvert."""
    path = Path(name_or_path).expanduser()
    if path.suffix in (".yaml", ".yml") or path.is_file():
        if not path.is_file():
            raise UserError(f"recipe file {str(path)!r} does not exist")
        return path
    candidate = RECIPES_DIR / f"{name_or_path}.yaml"
    if candidate.is_file():
        return candidate
    names = ", ".join(r.stem for r in list_recipe_files())
    raise UserError(f"unknown recipe {str(name_or_path)!r}; available: {names} (or pass a .yaml path)")


def list_recipe_files() -> list[Path]:
    return sorted(RECIPES_DIR.glob("*.yaml"))


def load_recipe(name_or_path: str | Path | Recipe | dict[str, Any], overrides: list[str] | None = None) -> Recipe:
    """Load and validate a recipe by name, path, mapping or Recipe.

    Args:
        name_or_path: ``"cfvit"``, ``"recipes/cfvit.yaml"``, a mapping, or a :class:`Recipe`.
        overrides: ``key=value`` strings, e.g. ``["model.alpha=0.6", "finetune.epochs=1"]``.

    Example:
        >>> r = load_recipe("cfvit", ["model.alpha=0.6"])
        >>> r.settings.alpha
        0.6
    """
    parsed = parse_overrides(overrides)
    if isinstance(name_or_path, Recipe):
        if name_or_path.validated and not parsed:
            return name_or_path  # already checked: read-only, so it cannot have changed since
        return validate_recipe(name_or_path.to_dict(), name_or_path.name, parsed)
    if isinstance(name_or_path, dict):
        return validate_recipe(name_or_path, str(name_or_path.get("name", "<dict>")), parsed)
    path = find_recipe(name_or_path)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"recipe {path.name}: not valid YAML ({str(e).splitlines()[0]})") from None
    return validate_recipe(data, path.name, parsed)


def list_recipes() -> list[Recipe]:
    return [load_recipe(p) for p in list_recipe_files()]
