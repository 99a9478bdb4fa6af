"""What every converted model is: the base timm model plus the method's new parts and its operating point.

A method subclasses :class:`ConvertedModel` and declares its ``Settings`` (structure, from the recipe's
``model`` section), ``Losses`` (weights, from ``finetune.losses``), supported ``families`` and whether its
full-compute setting reproduces the base model exactly (``exact_at_full_compute``; when it does not,
``full_compute_note`` says what it is instead). It implements these hooks:

* ``operating_space()`` -> :class:`~vitconvert.operating.OperatingSpace`: the named values a user or
  calibration turns (CF-ViT: ``eta`` and ``alpha``; DGE: ``coarsening``), each readable and settable as an
  attribute of the model (override ``_read_point`` / ``_write_point`` to store them otherwise);
* ``forward_at_point(x)`` -> :class:`DynamicOutput`: inference at the current point, with the per-image
  GMACs of the path each image took (callers use ``forward_dynamic``, which adds the small-batch rule below);
* ``forward_train(x)`` -> dict with at least ``logits`` (the final output). Keys ``exit.<name>`` are earlier
  exits: the pipeline distils and supervises each of them like ``logits``. A model that keeps the base model
  unchanged inside it (DVT's ``freeze_last``) sets ``computes_original_logits`` and returns the base's logits as
  ``original_logits``: the pipeline then distils from those and never runs (or loads) a separate teacher;
* ``method_losses(outputs, labels, teacher_logits)`` -> the method's own unweighted loss terms.

Optional hooks: ``method_state``/``load_method_state`` (extra JSON state), ``lr_scales`` (faster rates for
new parts), ``set_train_progress`` (schedules inside the method), ``plot_decisions`` (a picture of what the
model decided on some images: regions, exits), ``simulated_points``. A model whose every operating point can
be evaluated from one pass over the images also subclasses :class:`SimulatesPoints` (``collect`` and
``simulate``); calibration then needs one pass per value of the knobs that change the computation.

A method whose full-compute point runs the base model's own computation at the base's cost (DGE: no routers;
FSLA: no clustering) sets ``full_compute_runs_base``; a cascade whose last stage is the base architecture (DVT,
CF-ViT) has a ``dense`` knob instead (1: the last stage alone on every image). Either is the model's *dense point*
(:meth:`ConvertedModel.dense_point`): one pass of the base's architecture at the base's cost, with the model's
own weights. It is what a model falls back to where its dynamic execution does not pay: calibration chooses it
when no point within the budget runs faster than the base model (:func:`~vitconvert.calibration.confirm_not_slower`),
and it can give the model a small-batch rule (``small_batch``): batches of fewer than ``below`` images on that kind
of device run at the dense point, because there the dynamic path's fixed cost per operation outweighs the MACs it
saves (a 7.5 ms batch-1 forward of the CIFAR-10 DGE ViT launches 2,082 ops against the base's 655), so the model is
never slower than its base. Those images then get the dense point's result and are counted at its GMACs.

The base model is kept as ``self.base`` so its parameters keep their timm names under ``base.``; the
teacher for fine-tuning and the exactness tests rebuild it from those keys.
"""

from __future__ import annotations

import abc
import contextlib
import copy
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from pydantic import BaseModel
from torch import nn

from vitconvert.anatomy import Anatomy
from vitconvert.backbones import describe_family, read_anatomy
from vitconvert.errors import AnatomyError, UserError
from vitconvert.layers.cascade import Cascade
from vitconvert.layers.compiled import compile_settings, mark_rows_dynamic
from vitconvert.layers.costs import model_gmacs
from vitconvert.layers.seams import drop_path_modules
from vitconvert.operating import Budget, CurvePoint, OperatingPoint, OperatingSpace, choose_point
from vitconvert.recipes import Recipe
from vitconvert.registry import get_method
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


@dataclass(frozen=True)
class SmallBatchRule:
    """Batches of fewer than ``below`` images on a ``device_type`` device run at the model's dense point.

    Found by calibration (:func:`vitconvert.calibration.find_small_batch_rule`): the smallest batch size, among
    powers of two up to the calibration batch, at which the chosen point was timed at least as fast as the base
    model. The timings themselves are in the calibration record (``calibration.small_batch``). It was measured
    for the calibrated point: ``set_budget`` keeps it, and calibrating again measures it for the new point.
    """

    below: int
    device_type: str = "cpu"

    def applies(self, x: torch.Tensor) -> bool:
        return x.shape[0] < self.below and x.device.type == self.device_type

    def to_dict(self) -> dict[str, Any]:
        return {"below": self.below, "device_type": self.device_type}

    @classmethod
    def from_dict(cls, data: Any) -> SmallBatchRule:
        """Validated: a bad value is a one-line UserError naming the key."""
        where = "config: state.small_batch"
        if not isinstance(data, dict):
            raise UserError(f"{where} must be a mapping, got {data!r}")
        unknown = sorted(set(data) - {"below", "device_type"})
        if unknown:
            raise UserError(f"{where} has unexpected keys {unknown}; it holds below and device_type")
        below, device_type = data.get("below"), data.get("device_type", "cpu")
        if isinstance(below, bool) or not isinstance(below, int) or below < 1:
            raise UserError(f"{where}.below must be a whole number >= 1, got {below!r}")
        if not isinstance(device_type, str) or not device_type:
            raise UserError(f"{where}.device_type must be a device type such as 'cpu', got {device_type!r}")
        return cls(below, device_type)


class ConvertedModel(nn.Module, metaclass=abc.ABCMeta):
    """Base class of every converted model (see the module docstring)."""

    method: ClassVar[str]
    families: ClassVar[tuple[str, ...]]
    description: ClassVar[str]
    Settings: ClassVar[type[BaseModel]]
    Losses: ClassVar[type[BaseModel]]
    exact_at_full_compute: ClassVar[bool] = True
    full_compute_note: ClassVar[str] = "the base model itself"
    # True for a method whose points may cost more than the base model on purpose (FSLA augment); otherwise a
    # budget never chooses such a point (operating.eligible_points).
    adds_compute: ClassVar[bool] = False
    # True for a method whose full-compute point is the base model's computation at the base's cost (see the module
    # docstring): its dense point.
    full_compute_runs_base: ClassVar[bool] = False
    # True for a method whose images may take different paths at one operating point (exits, granularities): its
    # DynamicOutput tells them apart by ``stage`` or ``gmacs``. False where every image runs the same shapes (FSLA:
    # every image is clustered, at one cost).
    per_image_paths: ClassVar[bool] = True
    # Per-image decisions beside ``stage`` that an exported graph outputs after ``logits``, ``gmacs`` (and ``exit``):
    # names of (B,) entries of DynamicOutput.extras that forward_dynamic and forward_traceable both return (DGE's
    # ``granularity``), checked against the eager model like the exits (vitconvert.deploy).
    decision_outputs: ClassVar[tuple[str, ...]] = ()
    # Why the method's dynamic path has no traceable form yet (export refuses with it); a method that implements
    # forward_traceable exports instead.
    export_refusal: ClassVar[str] = "its dynamic path has no traceable form yet"
    # Why the method's idea does not apply to a family it does not declare (family name -> one line): the refusal
    # and the support matrix say it.
    not_supported: ClassVar[dict[str, str]] = {}

    @property
    def computes_original_logits(self) -> bool:
        """True when :meth:`forward_train` also returns ``original_logits``: the original model's logits, computed by
        an unchanged (frozen) copy of it inside this model, which the fine-tune distils from instead of running the
        teacher a second time."""
        return False

    @property
    def support_note(self) -> str:
        """What this conversion does differently on this model's architecture, in a few words ("" when nothing):
        the support matrix (docs/support-matrix.md) shows it beside "yes"."""
        return ""

    def __init__(self, base: nn.Module, spec: BaseSpec, recipe: Recipe, anatomy: Anatomy) -> None:
        super().__init__()
        if anatomy.family not in self.families:
            raise UserError(
                f"method {self.method!r} supports {', '.join(describe_family(f) for f in self.families)} models; "
                f"{spec.architecture} is a {describe_family(anatomy.family)} model"
                + (f" ({self.not_supported[anatomy.family]})" if anatomy.family in self.not_supported else "")
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
        self.small_batch: SmallBatchRule | None = None
        # Read before the method rewrites anything: the base model's cost (with the same rules as every
        # per-image cost) and the drop-path slots of its blocks, (block index, path under base).
        self.base_gmacs = model_gmacs(base, anatomy.img_size)
        self.drop_path_slots = _drop_path_slots(base, anatomy)

    # --- what a method implements ----------------------------------------------------------------------

    @abc.abstractmethod
    def operating_space(self) -> OperatingSpace:
        """The named values of this model's operating point, their ranges, full-compute values and sweeps."""

    @abc.abstractmethod
    def forward_at_point(self, x: torch.Tensor) -> DynamicOutput:
        """Inference at the current operating point, with per-image GMACs of the path taken."""

    @abc.abstractmethod
    def forward_train(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Training forward: ``logits`` (distilled and supervised), ``exit.<name>`` for earlier exits, and
        whatever the method's own losses need."""

    @abc.abstractmethod
    def method_losses(self, outputs: dict[str, torch.Tensor], labels: torch.Tensor | None,
                      teacher_logits: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The method's own unweighted loss terms; weights come from ``recipe.finetune.losses``.

        Args:
            outputs: What :meth:`forward_train` returned.
            labels: (B,) class indices, (B, classes) probabilities when the fine-tune mixes images
                (``finetune.mixup``/``cutmix``), or None when fine-tuning without labels.
            teacher_logits: (B, classes) of the original model, or None when distillation is off.
        """

    def _read_point(self) -> OperatingPoint:
        """The current values of the operating space's knobs (default: the model's attributes of those names)."""
        return {name: float(getattr(self, name)) for name in self.operating_space().names}

    def _write_point(self, point: OperatingPoint) -> None:
        """Set validated values (default: the model's attributes of those names, in the space's order)."""
        for name, value in point.items():
            setattr(self, name, value)

    def simulated_points(self, collected: dict[str, torch.Tensor]) -> list[OperatingPoint]:
        """Values of the simulated knobs calibration evaluates on ``collected`` (default: their sweeps).

        A cascade may derive thresholds from the collected confidences instead (target exit distributions).
        """
        space = self.operating_space()
        sim = [k for k in space.knobs if k.simulated]
        fixed = {k.name: k.full for k in space.knobs if not k.simulated}
        return [{k.name: p[k.name] for k in sim} for p in space.candidates(fixed)]

    def method_state(self) -> dict[str, Any]:
        """Method-specific JSON state (besides the operating point and calibration)."""
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

    def forward_traceable(self, x: torch.Tensor, point: Mapping[str, torch.Tensor]) -> DynamicOutput:
        """:meth:`forward_at_point` as one traceable graph (``torch.export``, ONNX; :mod:`vitconvert.deploy`).

        ``point`` holds the simulated knobs (exit thresholds: values that decide, not shape, the computation) as
        0-dim tensors, so the exported graph takes them as inputs a runtime can change; the other knobs are baked
        in at their current values. No Python decision may depend on the data: images still take their own paths
        through data-dependent indexing (sub-batches whose size is known only at run time). The default refuses
        with :attr:`export_refusal`.
        """
        raise UserError(f"{self.method} models cannot be exported yet: {self.export_refusal}")

    @contextlib.contextmanager
    def counted_execution(self) -> Iterator[None]:
        """Run, inside this context, the computation that ``DynamicOutput.gmacs`` counts.

        By default that is what always runs. A method that may run a faster path with more MACs (DGE's dense
        execution of a sparse block) switches to its counted path here, so that ``count_macs`` of a forward pass
        equals the reported GMACs.
        """
        yield

    def plot_decisions(self, images: torch.Tensor, path: str | Path) -> Path | None:
        """Draw what the model decided on ``images`` (regions, exits...) into a PNG; None: nothing to draw."""
        return None

    # --- operating point ------------------------------------------------------------------------------

    @property
    def operating_point(self) -> OperatingPoint:
        """The current operating point, ``{name: value}`` in the space's order."""
        return self._read_point()

    def set_operating_point(self, point: Mapping[str, float] | None = None, **values: float) -> OperatingPoint:
        """Switch to an operating point (any subset of the knobs; the others keep their values).

        Example:
            >>> model.set_operating_point(eta=0.6)  # doctest: +SKIP
            {'eta': 0.6, 'alpha': 0.5}
        """
        checked = self.operating_space().validate({**(point or {}), **values})
        self._write_point(checked)
        return self.operating_point

    def dense_point(self) -> OperatingPoint | None:
        """The knob values at which the model runs one pass of the base's architecture at the base's cost, with its
        own weights (see the module docstring; knobs it does not name do not apply there), or None when it has none.
        Default: the full-compute point of a method that sets ``full_compute_runs_base``; a cascade overrides it
        (its ``dense`` knob at 1)."""
        return self.operating_space().full() if self.full_compute_runs_base else None

    def full_compute(self) -> ConvertedModel:
        """Switch to the full-compute setting (the base model itself when ``exact_at_full_compute``)."""
        self.set_operating_point(self.operating_space().full())
        return self

    @property
    def knob_name(self) -> str:
        """Name of the main knob (the first of the operating space): the one value a user usually turns."""
        return self.operating_space().names[0]

    @property
    def knob(self) -> float:
        """The main knob's value (CF-ViT's eta, DGE's coarsening)."""
        return self.operating_point[self.knob_name]

    @knob.setter
    def knob(self, value: float) -> None:
        self.set_operating_point({self.knob_name: value})

    def set_budget(self, budget: Budget | str | float) -> CurvePoint:
        """Pick the operating point for a budget from the stored calibration curve and switch to it.

        Args:
            budget: GMACs (``2.1``), a fraction of the base model (``"50%"``), a top-1 drop (``"drop=0.5"``) or a
                measured speed-up (``"speed=2x"``), or a :class:`~vitconvert.operating.Budget`.
        """
        point = choose_point(self.curve, budget, self.base_gmacs, self.calibration.get("base_top1"),
                             self.adds_compute)
        self.set_operating_point({**self.operating_space().implied(), **point.point})
        return point

    # --- state ----------------------------------------------------------------------------------------

    def get_state(self) -> dict[str, Any]:
        return {
            "point": self.operating_point,
            "curve": [p.to_dict() for p in self.curve],
            "calibration": self.calibration,
            "finetuned": self.finetuned,
            "base_gmacs": self.base_gmacs,
            **({"small_batch": self.small_batch.to_dict()} if self.small_batch is not None else {}),
            **self.method_state(),
        }

    def load_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`get_state` output (validated; a bad value is a one-line UserError)."""
        state = dict(state)
        space = self.operating_space()
        point = space.validate(state.pop("point", {}), "config: state.point.")
        # vitconvert <= 0.1 stored each knob at the top level of the state (eta, alpha, coarsening).
        legacy = space.validate({name: state.pop(name) for name in space.names if name in state}, "config: state.")
        self._write_point({**legacy, **point})
        curve = state.pop("curve", [])
        if not isinstance(curve, list):
            raise UserError(f"config: state.curve must be a list, got {curve!r}")
        self.curve = [CurvePoint.from_dict(p, space, f"config: state.curve[{i}]") for i, p in enumerate(curve)]
        calibration = state.pop("calibration", {})
        if not isinstance(calibration, dict):
            raise UserError(f"config: state.calibration must be a mapping, got {calibration!r}")
        base_top1 = calibration.get("base_top1")
        if base_top1 is not None and (isinstance(base_top1, bool) or not isinstance(base_top1, int | float)):
            raise UserError(f"config: state.calibration.base_top1 must be a number, got {base_top1!r}")
        self.calibration = dict(calibration)
        finetuned = state.pop("finetuned", False)
        if not isinstance(finetuned, bool):
            raise UserError(f"config: state.finetuned must be true or false, got {finetuned!r}")
        self.finetuned = finetuned
        base_gmacs = state.pop("base_gmacs", self.base_gmacs)
        if isinstance(base_gmacs, bool) or not isinstance(base_gmacs, int | float) or not math.isfinite(base_gmacs):
            raise UserError(f"config: state.base_gmacs must be a number, got {base_gmacs!r}")
        small_batch = state.pop("small_batch", None)
        self.small_batch = SmallBatchRule.from_dict(small_batch) if small_batch is not None else None
        if self.small_batch is not None and self.dense_point() is None:
            raise UserError(f"config: state.small_batch is only valid for models with a dense point (one pass of the "
                            f"base model's computation), not this {self.method} model")
        self.load_method_state(state)

    # --- shared behaviour -----------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            return self.forward_train(x)["logits"]
        return self.forward_dynamic(x).logits

    def forward_dynamic(self, x: torch.Tensor) -> DynamicOutput:
        """Inference at the current operating point (or, under the small-batch rule, at full compute), with the
        per-image GMACs of the path taken.

        Under ``torch.compile`` (``torch.compile(model)``, which reaches here through :meth:`forward`) it runs
        :meth:`_forward_compiled` instead: see there why.
        """
        if torch.compiler.is_compiling():
            return self._forward_compiled(x)
        if x.shape[0] == 0:
            return self._empty_output(x)
        if self.small_batch is not None and self.small_batch.applies(x):
            return self.forward_dense(x)
        return self.forward_at_point(x)

    @torch.compiler.disable(recursive=False)
    def _forward_compiled(self, x: torch.Tensor) -> DynamicOutput:
        """:meth:`forward_dynamic` as ``torch.compile`` runs it: its decisions in Python, its computation compiled.

        Why: a dynamic model's Python-side decisions (an empty batch, the small-batch rule, a cascade's sub-batches)
        depend on the batch. Traced by dynamo, each is a guard on the batch size, so new sizes compiled the model
        again. This frame is not traced (``torch.compiler.disable(recursive=False)``), but what it calls still is,
        with the caller's backend and options: :meth:`forward_at_point` compiles with its batch dimension marked
        dynamic (:func:`~vitconvert.layers.compiled.mark_rows_dynamic`), and a cascade's stages compile once for
        every sub-batch size (:meth:`~vitconvert.layers.cascade.Cascade.run`). Decisions and outputs are those of
        the eager :meth:`forward_dynamic`.
        """
        if x.shape[0] == 0:
            return self._empty_output(x)
        small = self.small_batch is not None and self.small_batch.applies(x)
        x = mark_rows_dynamic(x)
        with compile_settings():
            if small:
                # forward_dense, inlined: called from this untraced frame, it would be a frame dynamo traces, with the
                # point's Python state in it
                saved = self.operating_point
                self._write_point({**saved, **(self.dense_point() or {})})
                try:
                    return self.forward_at_point(x)
                finally:
                    self._write_point(saved)
            return self.forward_at_point(x)

    def _empty_output(self, x: torch.Tensor) -> DynamicOutput:
        """The result for an empty batch: every field the method returns, with no rows. Shapes, dtypes and extras
        come from one blank image (timm's own blocks do not all take an empty batch: PVT-v2's attention cannot
        reshape one)."""
        out = self.forward_at_point(x.new_zeros(1, *x.shape[1:]))
        return DynamicOutput(logits=out.logits[:0], gmacs=out.gmacs[:0],
                             stage=out.stage[:0] if out.stage is not None else None,
                             extras={k: v[:0] for k, v in out.extras.items()})

    def forward_dense(self, x: torch.Tensor) -> DynamicOutput:
        """Inference at the dense point, whatever the current point (the small-batch rule's path)."""
        point = self.dense_point()
        if point is None:
            raise ValueError(f"this {self.method} model has no dense point")
        if point == self.operating_space().full():  # a method's own full-compute path (DGE: routers not run)
            return self.forward_full_compute(x)
        saved = self.operating_point
        self._write_point({**saved, **point})
        try:
            return self.forward_at_point(x)
        finally:
            self._write_point(saved)

    def forward_full_compute(self, x: torch.Tensor) -> DynamicOutput:
        """Inference at the full-compute point, whatever the current point."""
        saved = self.operating_point
        self._write_point(self.operating_space().full())
        try:
            return self.forward_at_point(x)
        finally:
            self._write_point(saved)

    def check_input(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` itself, if its images are the model's input size (every method's paths are built for that size);
        else a ValueError saying which size it takes."""
        if tuple(x.shape[-2:]) != tuple(self.anatomy.img_size):
            raise ValueError(f"expected {self.anatomy.img_size[0]}x{self.anatomy.img_size[1]} images (the "
                             f"converted model's input size), got {x.shape[-2]}x{x.shape[-1]}")
        return x

    def base_state_dict(self) -> dict[str, torch.Tensor]:
        """The base model's weights as held by this model (timm key names)."""
        return {k[len("base."):]: v for k, v in self.state_dict().items() if k.startswith("base.")}

    def _count_cascade_costs(self, cascade: Cascade) -> None:
        """Set every stage's GMACs of a cascade method (CF-ViT, DVT) from one blank image, in eval mode."""
        was_training = self.training
        self.eval()
        try:
            p = next(self.parameters())
            cascade.count_costs(torch.zeros(1, 3, *self.anatomy.img_size, device=p.device, dtype=p.dtype),
                                last_alone=self.dense_point() is not None)
        finally:
            self.train(was_training)

    def build_base(self) -> nn.Module:
        """A plain timm model with the base weights currently held by this model."""
        base = self.base_spec.build()
        own = base.state_dict()
        held = self.base_state_dict()
        base.load_state_dict({k: held[k] for k in own}, strict=True)
        return base.eval()

    def extra_repr(self) -> str:
        point = ", ".join(f"{k}={v:g}" for k, v in self.operating_point.items())
        return f"method={self.method}, base={self.base_spec.architecture}, {point}"


class SimulatesPoints(abc.ABC):
    """Capability of a converted model: every operating point evaluated from one collected pass.

    ``collect`` runs the images once at the current values of the knobs that change the computation
    (e.g. every stage of a cascade on every image); ``simulate`` then gives what :meth:`forward_dynamic`
    would return at any values of the simulated knobs (e.g. exit thresholds), without running the model.
    """

    @abc.abstractmethod
    def collect(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-image tensors (first dimension = batch) from which any simulated point can be evaluated."""

    @abc.abstractmethod
    def simulate(self, collected: dict[str, torch.Tensor], point: Mapping[str, float]) -> DynamicOutput:
        """Logits, per-image GMACs and exits at ``point`` (its simulated knobs) from ``collected``."""


def can_simulate(model: nn.Module) -> bool:
    """Whether calibration may evaluate ``model``'s operating points by simulation."""
    return isinstance(model, SimulatesPoints)


def convert(base: nn.Module, spec: BaseSpec, recipe: Recipe, anatomy: Anatomy | None = None) -> ConvertedModel:
    """Convert a base model (with its weights) following a validated recipe.

    The method's new parts are initialised from the recipe's seed (the caller's random state is left
    alone), so converting the same model twice gives the same weights and fine-tuning runs are repeatable.
    """
    size = tuple(spec.img_size) if spec.img_size else None
    anatomy = anatomy or read_anatomy(base, img_size=size)  # type: ignore[arg-type]
    cls = get_method(recipe.method)
    if anatomy.family not in cls.families:
        raise UserError(
            f"recipe {recipe.name!r} (method {recipe.method}) supports "
            f"{', '.join(describe_family(f) for f in cls.families)}; {spec.architecture} is "
            f"{describe_family(anatomy.family)}"
            + (f" ({cls.not_supported[anatomy.family]})" if anatomy.family in cls.not_supported else "")
        )
    recipe = recipe.for_family(anatomy.family)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(recipe.finetune.seed)
        return cls(base, spec, recipe, anatomy).eval()


def _drop_path_slots(base: nn.Module, anatomy: Anatomy) -> list[tuple[int, str]]:
    """(block index, module path) of every stochastic-depth slot the residual block reader finds."""
    slots = []
    for info in anatomy.blocks:
        try:
            names = drop_path_modules(base.get_submodule(info.path))
        except AnatomyError:  # a block the reader does not understand trains without stochastic depth
            continue
        slots += [(info.index, f"{info.path}.{name}") for name in names]
    return slots


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
