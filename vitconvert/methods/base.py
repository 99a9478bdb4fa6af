"""What every converted model is: the base timm model plus the method's new parts and state.

A method subclasses :class:`ConvertedModel`, declares its ``Settings`` (structure, from the recipe's
``model`` section), ``Losses`` (weights, from ``finetune.losses``) and supported ``families``, and
implements:

* ``forward_dynamic(x)`` -> :class:`DynamicOutput`: inference at the current operating point, with the
  per-image GMACs of the path each image took;
* ``forward_train(x)`` -> dict of logits; ``method_losses(outputs, labels)`` -> its own loss terms;
* ``knob`` (one number a user turns, e.g. CF-ViT's exit threshold eta), ``full_compute_knob`` (the value
  at which the model reproduces the base model exactly) and ``sweep_knob`` (values calibration tries);
* optionally ``collect(x)`` and ``simulate(collected, knob)`` when every operating point can be evaluated
  from one pass over the images (CF-ViT: both stages' logits); calibration then needs no re-runs.

The base model is kept as ``self.base`` so its parameters keep their timm names under ``base.``; the
teacher for fine-tuning and the exactness tests rebuild it from those keys.
"""

from __future__ import annotations

import abc
import copy
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from pydantic import BaseModel
from torch import nn

from vitconvert.anatomy import Anatomy
from vitconvert.errors import UserError
from vitconvert.recipes import Recipe
from vitconvert.sources import BaseSpec


@dataclass
class DynamicOutput:
    """Inference result of a dynamic model for a batch.

    Attributes:
        logits: (B, num_classes).
        gmacs: (B,) GMACs of the path each image took.
        stage: (B,) index of the exit that answered (cascades), else None.
        extras: method-specific per-image tensors (e.g. selected regions, gate choices).
    """

    logits: torch.Tensor
    gmacs: torch.Tensor
    stage: torch.Tensor | None = None
    extras: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class CurvePoint:
    """One operating point measured on held-out images."""

    knob: float
    gmacs: float
    top1: float
    extra: dict[str, float] = field(default_factory=dict)


def parse_budget(budget: str | float) -> tuple[str, float]:
    """``2.1`` -> ('gmacs', 2.1); ``'50%'`` or ``'0.5x'`` -> ('fraction', 0.5); ``'drop=0.5'`` -> ('drop', 0.5)."""
    if isinstance(budget, int | float):
        kind, value = "gmacs", float(budget)
    else:
        text = str(budget).strip().lower()
        try:
            if text.startswith("drop="):
                kind, value = "drop", float(text[5:])
            elif text.endswith("%"):
                kind, value = "fraction", float(text[:-1]) / 100
            elif text.endswith("x"):
                kind, value = "fraction", float(text[:-1])
            else:
                kind, value = "gmacs", float(text)
        except ValueError:
            raise UserError(
                f"budget {budget!r} is not understood; use GMACs (2.1), a fraction of the base model ('50%' or "
                "'0.5x') or a maximum top-1 drop in points ('drop=0.5')"
            ) from None
    if not math.isfinite(value) or value < 0 or (kind == "fraction" and value > 1.0):
        raise UserError(f"budget {budget!r} is out of range (fractions lie in 0..100%, GMACs and drops >= 0)")
    return kind, value


def choose_point(curve: list[CurvePoint], budget: str | float, base_gmacs: float, base_top1: float | None
                 ) -> CurvePoint:
    """The most accurate point within a GMACs budget, or the cheapest within an accuracy drop."""
    if not curve:
        raise UserError("the model has no calibration curve; run `vitconvert calibrate` first")
    kind, value = parse_budget(budget)
    if kind == "drop":
        if base_top1 is None:
            raise UserError("a 'drop=' budget needs the base model's accuracy; recalibrate with the base model")
        ok = [p for p in curve if p.top1 >= base_top1 - value]
        if not ok:
            return max(curve, key=lambda p: (p.top1, -p.gmacs))
        return min(ok, key=lambda p: (p.gmacs, -p.top1))
    limit = value if kind == "gmacs" else value * base_gmacs
    ok = [p for p in curve if p.gmacs <= limit + 1e-9]
    if not ok:
        return min(curve, key=lambda p: p.gmacs)
    return max(ok, key=lambda p: (p.top1, -p.gmacs))


class ConvertedModel(nn.Module, metaclass=abc.ABCMeta):
    """Base class of every converted model (see the module docstring)."""

    method: ClassVar[str]
    families: ClassVar[tuple[str, ...]]
    description: ClassVar[str]
    Settings: ClassVar[type[BaseModel]]
    Losses: ClassVar[type[BaseModel]]
    knob_name: ClassVar[str] = "knob"
    full_compute_knob: ClassVar[float]

    def __init__(self, base: nn.Module, spec: BaseSpec, recipe: Recipe, anatomy: Anatomy) -> None:
        super().__init__()
        if anatomy.family not in self.families:
            from vitconvert.backbones import describe_family

            raise UserError(
                f"method {self.method!r} supports {', '.join(describe_family(f) for f in self.families)} models; "
                f"{spec.architecture} is a {describe_family(anatomy.family)} model"
            )
        self.base = base
        self.base_spec = spec
        self.recipe = recipe
        self.anatomy = anatomy
        self.settings = recipe.settings
        self.num_classes = anatomy.num_classes
        self.num_features = anatomy.num_features
        self.pretrained_cfg = converted_pretrained_cfg(base, anatomy, self.method)
        self.default_cfg = self.pretrained_cfg
        self.curve: list[CurvePoint] = []
        self.calibration: dict[str, Any] = {}
        self.finetuned = False
        self.base_gmacs = 0.0

    # --- what a method implements ----------------------------------------------------------------------

    @abc.abstractmethod
    def forward_dynamic(self, x: torch.Tensor) -> DynamicOutput:
        """Inference at the current operating point, with per-image GMACs of the path taken."""

    @abc.abstractmethod
    def forward_train(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Training forward: a dict with at least ``logits`` (the output distilled and supervised)."""

    @abc.abstractmethod
    def method_losses(self, outputs: dict[str, torch.Tensor], labels: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """The method's own unweighted loss terms; weights come from ``recipe.finetune.losses``."""

    @property
    @abc.abstractmethod
    def knob(self) -> float:
        """The one number a user turns (exit threshold, gate bias...)."""

    @knob.setter
    @abc.abstractmethod
    def knob(self, value: float) -> None: ...

    @abc.abstractmethod
    def sweep_knob(self) -> list[float]:
        """Knob values calibration evaluates."""

    def method_state(self) -> dict[str, Any]:
        """Method-specific JSON state (in addition to the knob and calibration)."""
        return {}

    def load_method_state(self, state: dict[str, Any]) -> None:
        if state:
            raise UserError(f"config: unexpected method state keys {sorted(state)}")

    def lr_scales(self) -> dict[str, float]:
        """Learning-rate multipliers for fine-tuning: parameter-name prefix -> factor (default: none).

        New parts that must travel far from their initialisation in a short recipe (DGE's routers) get a
        larger rate than the pretrained weights around them.
        """
        return {}

    def set_train_progress(self, fraction: float) -> None:
        """Called by the pipeline before each training step with the share of fine-tuning done (0..1)."""

    # --- shared behaviour -----------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            return self.forward_train(x)["logits"]
        return self.forward_dynamic(x).logits

    def full_compute(self) -> ConvertedModel:
        """Switch to the setting at which the model reproduces the base model exactly."""
        self.knob = self.full_compute_knob
        return self

    def set_budget(self, budget: str | float) -> CurvePoint:
        """Pick the operating point for a budget from the stored calibration curve and switch to it.

        Args:
            budget: GMACs (``2.1``), a fraction of the base model (``"50%"``) or a top-1 drop (``"drop=0.5"``).
        """
        point = choose_point(self.curve, budget, self.base_gmacs, self.calibration.get("base_top1"))
        self.knob = point.knob
        return point

    def get_state(self) -> dict[str, Any]:
        return {
            self.knob_name: self.knob,
            "curve": [p.__dict__ for p in self.curve],
            "calibration": self.calibration,
            "finetuned": self.finetuned,
            "base_gmacs": self.base_gmacs,
            **self.method_state(),
        }

    def load_state(self, state: dict[str, Any]) -> None:
        state = dict(state)
        if self.knob_name in state:
            value = state.pop(self.knob_name)
            if not isinstance(value, int | float) or not math.isfinite(value):
                raise UserError(f"config: state.{self.knob_name} must be a number, got {value!r}")
            self.knob = float(value)
        try:
            self.curve = [CurvePoint(**p) for p in state.pop("curve", [])]
        except TypeError as e:
            raise UserError(f"config: bad calibration curve ({e})") from None
        self.calibration = dict(state.pop("calibration", {}))
        self.finetuned = bool(state.pop("finetuned", False))
        self.base_gmacs = float(state.pop("base_gmacs", self.base_gmacs))
        self.load_method_state(state)

    def base_state_dict(self) -> dict[str, torch.Tensor]:
        """The base model's weights as held by this model (timm key names)."""
        return {k[len("base."):]: v for k, v in self.state_dict().items() if k.startswith("base.")}

    def build_base(self) -> nn.Module:
        """A plain timm model with the base weights currently held by this model."""
        base = self.base_spec.build()
        own = base.state_dict()
        held = self.base_state_dict()
        base.load_state_dict({k: held[k] for k in own}, strict=True)
        return base.eval()

    def extra_repr(self) -> str:
        return f"method={self.method}, base={self.base_spec.architecture}, {self.knob_name}={self.knob:g}"


def converted_pretrained_cfg(base: nn.Module, anatomy: Anatomy, method: str) -> dict[str, Any]:
    """The base model's data config, re-pointed at the converted model's parameter names."""
    cfg = copy.deepcopy(dict(getattr(base, "pretrained_cfg", {}) or {}))
    for key in ("url", "hf_hub_id", "hf_hub_filename", "file", "source", "state_dict", "tag", "custom_load"):
        cfg.pop(key, None)
    cfg["architecture"] = f"vitconvert_{method}"
    cfg["input_size"] = (3, *anatomy.img_size)
    cfg["num_classes"] = anatomy.num_classes
    first_conv = cfg.get("first_conv")
    if isinstance(first_conv, str):
        cfg["first_conv"] = f"base.{first_conv}"
    classifier = cfg.get("classifier")
    if isinstance(classifier, str):
        cfg["classifier"] = f"base.{classifier}"
    elif isinstance(classifier, list | tuple):
        cfg["classifier"] = [f"base.{c}" for c in classifier]
    return cfg
