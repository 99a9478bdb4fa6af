"""Operating points: the named values a converted model runs at, the curve calibration measures over
them, and choosing a point for a budget.

A method declares its :class:`OperatingSpace`: a few :class:`Knob` s (CF-ViT: ``eta`` and ``alpha``; DGE:
``coarsening``; a K-member cascade: one exit threshold per member but the last), each with its range, its
full-compute value and the values calibration tries. An operating point is a plain ``{name: value}``
mapping, validated against the space; ``config.json`` stores the current point and the measured curve.

Budgets: GMACs (``2.1``), a share of the base model's GMACs (``"50%"`` or ``"0.5x"``), a maximum top-1
drop in points (``"drop=0.5"``) or a measured speed-up over the base model (``"speed=2x"``: throughput on the
device and batch size calibration timed, stored as ``extra["throughput_ratio"]`` of the timed points);
:func:`choose_point` picks the most accurate point within a GMACs or speed budget, or the cheapest within
a drop.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from vitconvert.errors import UserError

OperatingPoint = dict[str, float]


@dataclass(frozen=True)
class Knob:
    """One named value of an operating point.

    Attributes:
        name: Attribute name on the model (``eta``, ``coarsening``, ``threshold_0``...).
        low, high: Allowed range (inclusive).
        full: The value at the model's full-compute setting.
        sweep: Values calibration tries by default.
        simulated: Calibration can evaluate any value of this knob from one collected pass (exit
            thresholds); other knobs change the computation and need a pass per value.
        integer: Only whole numbers are valid (e.g. a cluster size).
        description: One line for error messages and cards.
        implied: The value a stored point without this knob had (a knob added after such points were stored, like
            a cascade's ``dense``: 0); None when a point must name it or keeps the model's current value.
    """

    name: str
    low: float
    high: float
    full: float
    sweep: tuple[float, ...]
    simulated: bool = False
    integer: bool = False
    description: str = ""
    implied: float | None = None

    def check(self, value: Any, where: str = "") -> float:
        """``value`` as a float if it is valid for this knob, else a UserError naming the knob and range."""
        prefix = f"{where}{self.name}"
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise UserError(f"{prefix} must be a number in [{self.low:g}, {self.high:g}], got {value!r}")
        if not self.low <= value <= self.high:
            raise UserError(f"{prefix} must lie in [{self.low:g}, {self.high:g}], got {value:g}")
        if self.integer and value != int(value):
            raise UserError(f"{prefix} must be a whole number, got {value:g}")
        return float(value)


@dataclass(frozen=True)
class OperatingSpace:
    """The knobs of one converted model, in the order users read them (the first is the main one)."""

    knobs: tuple[Knob, ...]

    def __post_init__(self) -> None:
        names = [k.name for k in self.knobs]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"an operating space needs distinct knob names, got {names}")

    @property
    def names(self) -> list[str]:
        return [k.name for k in self.knobs]

    def knob(self, name: str) -> Knob:
        for k in self.knobs:
            if k.name == name:
                return k
        raise UserError(f"unknown operating-point value {name!r}; this model has {', '.join(self.names)}")

    def full(self) -> OperatingPoint:
        """The full-compute point."""
        return {k.name: k.full for k in self.knobs}

    def implied(self) -> OperatingPoint:
        """The values a stored point implies for the knobs it does not name (:attr:`Knob.implied`)."""
        return {k.name: k.implied for k in self.knobs if k.implied is not None}

    def validate(self, point: Mapping[str, Any], where: str = "", partial: bool = True) -> OperatingPoint:
        """A checked copy of ``point`` (floats, known names, values in range); ``partial=False`` needs every knob."""
        if not isinstance(point, Mapping):
            raise UserError(f"{where}operating point must be a mapping of {', '.join(self.names)}, got {point!r}")
        unknown = [n for n in point if n not in self.names]
        if unknown:
            raise UserError(f"{where}unknown operating-point value(s) {unknown}; this model has "
                            f"{', '.join(self.names)}")
        if not partial and (missing := [n for n in self.names if n not in point]):
            raise UserError(f"{where}operating point lacks {missing}")
        return {k.name: k.check(point[k.name], where) for k in self.knobs if k.name in point}

    def candidates(self, fixed: Mapping[str, float] | None = None) -> list[OperatingPoint]:
        """Every combination of the knobs' sweeps (a knob in ``fixed`` keeps that one value)."""
        fixed = dict(fixed or {})
        axes = [(fixed[k.name],) if k.name in fixed else k.sweep for k in self.knobs]
        return [dict(zip(self.names, values, strict=True)) for values in itertools.product(*axes)]

    def split(self, point: Mapping[str, float]) -> tuple[OperatingPoint, OperatingPoint]:
        """(values that need a forward pass, values a simulation can apply afterwards)."""
        structural = {k.name: point[k.name] for k in self.knobs if not k.simulated and k.name in point}
        simulated = {k.name: point[k.name] for k in self.knobs if k.simulated and k.name in point}
        return structural, simulated


@dataclass
class CurvePoint:
    """One operating point measured on held-out images: its values, expected GMACs and top-1 (percent)."""

    point: OperatingPoint
    gmacs: float
    top1: float
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def knob(self) -> float:
        """The point's first (main) value: CF-ViT's eta, DGE's coarsening."""
        return next(iter(self.point.values()))

    def to_dict(self) -> dict[str, Any]:
        return {"point": dict(self.point), "gmacs": self.gmacs, "top1": self.top1, "extra": dict(self.extra)}

    @classmethod
    def from_dict(cls, data: Any, space: OperatingSpace, where: str = "config: curve point") -> CurvePoint:
        """Read a stored point; ``{"knob": v}`` (the one-knob format of vitconvert <= 0.1) names the main knob."""
        if not isinstance(data, Mapping):
            raise UserError(f"{where} must be a mapping, got {data!r}")
        data = dict(data)
        if "point" not in data and "knob" in data:
            data["point"] = {space.names[0]: data.pop("knob")}
        unknown = set(data) - {"point", "gmacs", "top1", "extra"}
        if unknown or "point" not in data:
            raise UserError(f"{where} needs point, gmacs and top1 (got keys {sorted(data)})")
        point = space.validate(data["point"], f"{where}: ")
        point = {name: point.get(name, space.implied().get(name)) for name in space.names
                 if name in point or name in space.implied()}
        numbers = {}
        for key in ("gmacs", "top1"):
            value = data.get(key)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise UserError(f"{where}: {key} must be a number, got {value!r}")
            numbers[key] = float(value)
        extra = data.get("extra") or {}
        if not isinstance(extra, Mapping):
            raise UserError(f"{where}: extra must be a mapping, got {extra!r}")
        return cls(point, numbers["gmacs"], numbers["top1"], dict(extra))


BudgetKind = Literal["gmacs", "fraction", "drop", "speed", "best"]


@dataclass(frozen=True)
class Budget:
    """A budget, parsed once where it enters (CLI option, API argument, recipe) and passed on as this.

    Attributes:
        kind: ``gmacs`` (per image), ``fraction`` (of the base model's GMACs), ``drop`` (top-1 points below the
            base model), ``speed`` (measured speed-up over the base model) or ``best`` (the most accurate point).
        value: The number, in the kind's unit (a fraction as 0.5, not 50).
        text: How it was written, for records and cards.
    """

    kind: BudgetKind
    value: float
    text: str

    @classmethod
    def parse(cls, budget: str | float | Budget) -> Budget:
        """``2.1`` -> gmacs 2.1; ``'50%'`` or ``'0.5x'`` -> fraction 0.5; ``'drop=0.5'`` -> drop 0.5; ``'speed=2x'``
        (or ``'speed=2'``) -> speed 2.0; ``'best'`` -> the most accurate point. A Budget is returned as it is.

        Raises:
            UserError: for anything else, or a value out of range (one line saying what is understood).
        """
        if isinstance(budget, Budget):
            return budget
        kind: BudgetKind
        if isinstance(budget, int | float) and not isinstance(budget, bool):
            kind, value = "gmacs", float(budget)
        else:
            text = str(budget).strip().lower()
            try:
                if text == "best":
                    kind, value = "best", 0.0
                elif text.startswith("drop="):
                    kind, value = "drop", float(text[5:])
                elif text.startswith("speed="):
                    kind, value = "speed", float(text[6:].removesuffix("x"))
                elif text.endswith("%"):
                    kind, value = "fraction", float(text[:-1]) / 100
                elif text.endswith("x"):
                    kind, value = "fraction", float(text[:-1])
                else:
                    kind, value = "gmacs", float(text)
            except ValueError:
                raise UserError(
                    f"budget {budget!r} is not understood; use GMACs (2.1), a fraction of the base model ('50%' or "
                    "'0.5x'), a maximum top-1 drop in points ('drop=0.5'), a speed-up over the base ('speed=2x') "
                    "or the most accurate point ('best')"
                ) from None
        bad = (kind == "fraction" and value > 1.0) or (kind == "speed" and value <= 0)
        if not math.isfinite(value) or value < 0 or bad:
            raise UserError(f"budget {budget!r} is out of range (fractions lie in 0..100%, GMACs and drops >= 0, "
                            "speed-ups > 0)")
        return cls(kind, value, str(budget))

    def __str__(self) -> str:
        return self.text

    def describe(self, adds_compute: bool = False) -> str:
        """What the budget chooses, in words (model cards)."""
        if self.kind == "best":
            return ("the most accurate point with the method on" if adds_compute
                    else "the most accurate point")
        if self.kind == "drop":
            return f"the cheapest point within {self.value:g} top-1 points of the base model"
        if self.kind == "speed":
            return f"the most accurate point measured at least {self.value:g}x as fast as the base model"
        limit = f"{self.value:g} GMACs" if self.kind == "gmacs" else f"{self.value:.0%} of the base model's GMACs"
        return f"the most accurate point within {limit}"


def choose_point(curve: Sequence[CurvePoint], budget: Budget | str | float, base_gmacs: float,
                 base_top1: float | None, adds_compute: bool = False) -> CurvePoint:
    """The most accurate point within a GMACs or speed budget, or the cheapest within an accuracy drop, or the most
    accurate of all (``best``; ties go to fewer GMACs).

    When nothing meets the budget: the cheapest point (GMACs budgets), the fastest timed one (speed) or the
    most accurate (drops). A speed budget considers only points whose speed was measured. Where speeds were
    measured, GMACs and drop budgets never pick a point slower than the base model (:func:`not_slower`).
    Points costing more GMACs than the base model are left out (:func:`eligible_points`) unless the method
    ``adds_compute`` on purpose; such a method's ``best`` and drop budgets also leave out the points where it is
    switched off (:func:`method_on`), since a user who chose it chose the added compute.
    """
    if not curve:
        raise UserError("the model has no calibration curve; run `vitconvert calibrate` first")
    parsed = Budget.parse(budget)
    kind, value = parsed.kind, parsed.value
    curve = eligible_points(curve, base_gmacs, adds_compute)
    if kind in ("best", "drop"):
        curve = method_on(curve, base_gmacs, adds_compute)
    if kind == "best":
        return max(curve, key=lambda p: (p.top1, -p.gmacs))
    if kind != "speed":
        curve = not_slower(curve, base_gmacs)
    if kind == "speed":
        timed = [p for p in curve if isinstance(p.extra.get("throughput_ratio"), int | float)]
        if not timed:
            raise UserError("no operating point's speed was measured; calibrate with a speed budget "
                            "(--budget speed=2x) on the device you will run on")
        ok = [p for p in timed if p.extra["throughput_ratio"] >= value]
        if not ok:
            return max(timed, key=lambda p: (p.extra["throughput_ratio"], p.top1))
        return max(ok, key=lambda p: (p.top1, p.extra["throughput_ratio"]))
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


def eligible_points(curve: Sequence[CurvePoint], base_gmacs: float, adds_compute: bool = False) -> list[CurvePoint]:
    """The points a budget may choose: none that costs more GMACs than the base model (a DVT cascade where every
    image reaches the last member runs all members, more than the model it replaces), unless the method adds
    compute on purpose (FSLA's augment mode buys accuracy with it) or no point is that cheap."""
    if adds_compute:
        return list(curve)
    return [p for p in curve if p.gmacs <= base_gmacs * (1 + 1e-6)] or list(curve)


def method_on(curve: Sequence[CurvePoint], base_gmacs: float, adds_compute: bool) -> list[CurvePoint]:
    """For a method that adds compute (FSLA's augment mode), the points where it runs: those above the base
    model's GMACs. A point at the base's GMACs is the method switched off (FSLA with cluster size 0 is Swin): a
    budget that only asks for accuracy would otherwise ship the base model whenever a point ties with it (the
    CIFAR-10 Swin's ``drop=0.0`` chose cluster size 0). Other methods, or a curve with no such point: ``curve``."""
    if not adds_compute:
        return list(curve)
    return [p for p in curve if p.gmacs > base_gmacs * (1 + 1e-6)] or list(curve)


def not_slower(curve: Sequence[CurvePoint], base_gmacs: float) -> list[CurvePoint]:
    """The points of ``curve`` not measured slower than the base model (all of them when none was timed).

    A timed point counts by its ``throughput_ratio``; an untimed one by the timed points of no fewer GMACs
    (it is kept when one of them reached the base's speed: fewer MACs on the same path run no slower); the
    full-compute point (the base model's GMACs) runs the base model and is always kept.
    """
    timed = [p for p in curve if isinstance(p.extra.get("throughput_ratio"), int | float)]
    if not timed:
        return list(curve)

    def ok(p: CurvePoint) -> bool:
        if p.gmacs >= base_gmacs * (1 - 1e-9):
            return True
        ratio = p.extra.get("throughput_ratio")
        if isinstance(ratio, int | float):
            return ratio >= 1.0
        return any(t.extra["throughput_ratio"] >= 1.0 for t in timed if t.gmacs >= p.gmacs)

    kept = [p for p in curve if ok(p)]
    return kept or list(curve)


def format_point(point: Mapping[str, float]) -> str:
    """``eta=0.48, alpha=0.5`` for tables and messages."""
    return ", ".join(f"{k}={v:g}" for k, v in point.items())


def unique_points(points: Iterable[OperatingPoint]) -> list[OperatingPoint]:
    """``points`` without repeats, in their first order."""
    seen: set[tuple[tuple[str, float], ...]] = set()
    out = []
    for p in points:
        key = tuple(sorted(p.items()))
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out


def frontier(curve: Sequence[CurvePoint]) -> list[CurvePoint]:
    """The points no other point beats on both GMACs and top-1 (the only ones a budget can choose), cheapest first."""
    out: list[CurvePoint] = []
    for p in sorted(curve, key=lambda p: (p.gmacs, -p.top1)):
        if not out or p.top1 > out[-1].top1:
            out.append(p)
    return out
