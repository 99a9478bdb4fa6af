"""Choose a converted model's operating point on held-out training images.

Calibration measures top-1 and expected GMACs at the candidate points of the model's operating space
(every combination of its knobs' sweeps). A model that can simulate its points
(:class:`~vitconvert.methods.base.SimulatesPoints`, e.g. a cascade's exit thresholds) runs one pass per
value of the knobs that change the computation and simulates the rest, which may also be derived from the
collected outputs (``model.simulated_points``: a cascade's thresholds from target exit distributions);
other models run ``forward_dynamic`` at every point. The whole curve, the base model's top-1 on the same
images, the split and the chosen point are stored in the model (``model.curve``, ``model.calibration``),
so ``vitconvert.load(dir, budget=...)`` can switch to any budget later without data.

Calibration also checks the chosen point's speed against the base model on the device
(:func:`confirm_not_slower`) and, for a model that can fall back to the base computation, finds the batch size
below which it should (:func:`find_small_batch_rule`).

Images come from the held-out fraction of the *training* folder (``calibrate.holdout``), never from
``val/``: an operating point chosen on the images it is then reported on would flatter it.
"""

from __future__ import annotations

import datetime
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vitconvert.data import DataArg, Split, batches, open_data, spread_batch
from vitconvert.errors import UserError
from vitconvert.methods.base import ConvertedModel, SimulatesPoints, SmallBatchRule, can_simulate
from vitconvert.operating import Budget, CurvePoint, choose_point, frontier, unique_points
from vitconvert.plots import plot_curve
from vitconvert.saving import check_output_dir
from vitconvert.session import ProgressBar, Session, Tally
from vitconvert.timing import compare, device_name

# Speed budgets time at most this many operating points (spread over the frontier), each for this long.
MAX_TIMED_POINTS = 8
SPEED_SECONDS = 3.0
SPEED_CHECK_SECONDS = 1.0  # per timed point when checking a GMACs/drop choice (a few points, not the frontier)
SMALL_BATCH_MAX_ROUNDS = 300  # timed batches per model at the small batch sizes (a batch-1 forward can take 3 ms)
STALE_AFTER_CALIBRATION = ("curve.png", "eval.json", "eval.png")


@torch.inference_mode()
def measure_curve(model: ConvertedModel, split: Split, device: torch.device, batch_size: int = 64,
                  progress: bool = True, simulate: bool | None = None) -> list[CurvePoint]:
    """Top-1 (percent) and expected GMACs at the candidate operating points of ``model`` on ``split``.

    Args:
        model: The converted model (on ``device``, in eval mode); its operating point is restored afterwards.
        split: Labelled images.
        device: Where to run.
        batch_size: Images per forward pass.
        progress: Show a progress bar.
        simulate: Evaluate simulated knobs from one pass per structural setting (default: when the model can).
    """
    space = model.operating_space()
    n = len(split)
    saved = model.operating_point
    batches_per_pass = -(-n // batch_size)
    points: list[CurvePoint] = []
    try:
        if simulate if simulate is not None else can_simulate(model):
            if not isinstance(model, SimulatesPoints):
                raise UserError(f"{model.method} models cannot simulate operating points; calibrate without it")
            structural = unique_points(space.split(p)[0] for p in space.candidates())
            with ProgressBar("calibrate: collect", len(structural) * batches_per_pass, progress) as bar:
                for fixed in structural:
                    model.set_operating_point(fixed)
                    parts: list[dict[str, torch.Tensor]] = []
                    ys: list[torch.Tensor] = []  # labels as the items give them (a dataset may know them only so)
                    for x, y in batches(split, model, batch_size):
                        parts.append({k: v.cpu() for k, v in model.collect(x.to(device)).items()})
                        ys.append(y)
                        bar.update()
                    collected = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
                    labels = torch.cat(ys)
                    for sim in unique_points(model.simulated_points(collected)):
                        tally = Tally()
                        tally.add(model.simulate(collected, {**fixed, **sim}), labels)
                        points.append(tally.point(space.validate({**fixed, **sim}), n))
            return points
        candidates = space.candidates()
        with ProgressBar(f"calibrate: {len(candidates)} settings", len(candidates) * batches_per_pass,
                         progress) as bar:
            for point in candidates:
                model.set_operating_point(point)
                tally = Tally()
                for x, y in batches(split, model, batch_size):
                    tally.add(model.forward_dynamic(x.to(device)), y)
                    bar.update()
                points.append(tally.point(point, n))
        return points
    finally:
        model.set_operating_point(saved)


@torch.inference_mode()
def measure_base(base: torch.nn.Module, split: Split, device: torch.device, batch_size: int, transform_model: Any,
                 progress: bool = True) -> tuple[float, float]:
    """Top-1 and top-5 (percent) of a plain model on ``split`` (transforms from ``transform_model``)."""
    tally = Tally()
    with ProgressBar("base model", -(-len(split) // batch_size), progress) as bar:
        for x, y in batches(split, transform_model, batch_size):
            tally.add_logits(base(x.to(device)), y)
            bar.update()
    return tally.top1, tally.top5


def time_points(model: ConvertedModel, base: torch.nn.Module, points: list[CurvePoint], x: torch.Tensor,
                progress: bool = True) -> dict[str, Any]:
    """Measure the speed-up over ``base`` at (up to :data:`MAX_TIMED_POINTS` of) ``points``, in place.

    The points are spread over their GMACs (the cheapest and the most expensive always among them); each
    gets ``extra["throughput"]`` (images/s) and ``extra["throughput_ratio"]`` (against ``base``, timed in the
    same interleaved rounds on ``x``, one batch of held-out images spread over the split, on the device both
    models are on). Returns how it was timed.
    """
    timed = points
    if len(points) > MAX_TIMED_POINTS:
        idx = sorted({round(i * (len(points) - 1) / (MAX_TIMED_POINTS - 1)) for i in range(MAX_TIMED_POINTS)})
        timed = [points[i] for i in idx]
    saved = model.operating_point
    try:
        with ProgressBar(f"calibrate: timing {len(timed)} points", len(timed), progress) as bar:
            for p in timed:
                model.set_operating_point(p.point)
                res = compare({"converted": model, "base": base}, x, reference="base", min_seconds=SPEED_SECONDS)
                p.extra["throughput"] = round(res["converted"].images_per_s, 1)
                p.extra["throughput_ratio"] = round(res["converted"].ratio, 3)
                bar.update()
    finally:
        model.set_operating_point(saved)
    return {"device": device_name(x.device), "batch_size": x.shape[0], "threads": torch.get_num_threads(),
            "points_timed": len(timed),
            "protocol": "points on the accuracy/GMACs frontier; one batch of held-out images; the model and its "
                        "original timed in paired interleaved rounds after warm-up (vitconvert.timing); median "
                        "images/s, speed-up the median of per-round paired ratios"}


def confirm_not_slower(model: ConvertedModel, base: torch.nn.Module, curve: list[CurvePoint],
                       pick: Callable[[list[CurvePoint]], CurvePoint], x: torch.Tensor, progress: bool = True
                       ) -> tuple[CurvePoint, dict[str, Any]]:
    """The point ``pick`` chooses from ``curve``, timed against ``base`` on the batch ``x`` (on the device both
    models are on): while it runs slower than the base model, it is set aside and ``pick`` chooses again (at most
    :data:`MAX_TIMED_POINTS` timings).

    GMACs do not say how fast a point runs on this device (a DVT cascade where a quarter of the images reach the
    last member costs 75% of the MACs and ran 0.86x on a 1-thread CPU), so a GMACs or drop budget would
    otherwise be free to choose a point slower than the model it replaces. The model's dense point (one pass of
    the base's computation, :meth:`~vitconvert.methods.base.ConvertedModel.dense_point`) and points costing at least
    the base model's GMACs are not timed. If every timed point is slower, the model falls back to its dense point
    when it has one in ``curve`` (timed, for the record), else the fastest timed point is kept and the record says
    the check failed. Timed points keep ``throughput`` and ``throughput_ratio`` in their ``extra``, as a speed
    budget's do.
    """
    saved = model.operating_point
    dense_values = model.dense_point()
    dense = next((p for p in curve if dense_values is not None and p.point == {**p.point, **dense_values}), None)
    slow: list[CurvePoint] = []
    timed: list[CurvePoint] = []
    untimed = False  # the choice after MAX_TIMED_POINTS slower ones: not known to be at the base's speed
    try:
        with ProgressBar("calibrate: checking speed", MAX_TIMED_POINTS, progress) as bar:
            while True:
                chosen = pick([p for p in curve if all(p is not s for s in slow)] or curve)
                if (chosen.gmacs >= model.base_gmacs * (1 - 1e-9) or chosen is dense
                        or any(chosen is t for t in timed)):
                    break
                if len(timed) >= MAX_TIMED_POINTS:
                    untimed = True
                    break
                model.set_operating_point(chosen.point)
                res = compare({"converted": model, "base": base}, x, reference="base",
                              min_seconds=SPEED_CHECK_SECONDS)
                chosen.extra["throughput"] = round(res["converted"].images_per_s, 1)
                chosen.extra["throughput_ratio"] = round(res["converted"].ratio, 3)
                timed.append(chosen)
                if chosen.extra["throughput_ratio"] < 1.0:
                    slow.append(chosen)
                bar.update()
        met = not untimed and not any(chosen is s for s in slow)
        fell_back = not met and dense is not None
        if fell_back:  # nothing timed ran at the base's speed: run dense
            assert dense is not None
            chosen = dense
            model.set_operating_point(chosen.point)
            res = compare({"converted": model, "base": base}, x, reference="base", min_seconds=SPEED_CHECK_SECONDS)
            chosen.extra["throughput"] = round(res["converted"].images_per_s, 1)
            chosen.extra["throughput_ratio"] = round(res["converted"].ratio, 3)
        elif not met:  # and no dense point: the fastest timed one
            chosen = max(timed, key=lambda p: (p.extra["throughput_ratio"], p.top1))
    finally:
        model.set_operating_point(saved)
    return chosen, {"device": device_name(x.device), "batch_size": x.shape[0], "threads": torch.get_num_threads(),
                    "points_timed": len(timed), "points_slower": len(slow), "not_slower": met or fell_back,
                    "fell_back_to_dense": fell_back,
                    "protocol": "the chosen point and its original timed in interleaved rounds on one batch of "
                                "held-out images; a point slower than the original is set aside and the budget "
                                "chooses again"}


def find_small_batch_rule(model: ConvertedModel, base: torch.nn.Module, x: torch.Tensor, progress: bool = True
                          ) -> tuple[SmallBatchRule | None, dict[str, Any]]:
    """Time the current point against ``base`` (both on ``x``'s device) on the first 1, 2, 4, ... images of the
    calibration batch ``x`` until it is not slower; the rule makes smaller batches run at the full-compute point
    (the base computation).

    Fixed costs per operation do not shrink with the batch, so a point faster than its base at 64 images can be
    slower at one (DGE on the CIFAR-10 ViT: 1.6x at 64, 0.7x at 1). Only a model with a dense point gets a rule;
    for the others the batch-1 speed is measured and recorded. No rule is returned when
    the point is not slower at batch 1; when it is slower at every size tried, ``below`` is ``batch_size``.
    """
    batch_size = x.shape[0]
    sizes = [1 << i for i in range(max(1, batch_size).bit_length()) if 1 << i < batch_size]
    has_dense = model.dense_point() is not None
    if not has_dense:
        sizes = sizes[:1]
    ratios: dict[int, float] = {}
    below: int | None = None
    with ProgressBar("calibrate: checking small batches", len(sizes), progress) as bar:
        for b in sizes:
            res = compare({"converted": model, "base": base}, x[:b], reference="base",
                          min_seconds=SPEED_CHECK_SECONDS, max_rounds=SMALL_BATCH_MAX_ROUNDS)
            ratios[b] = round(res["converted"].ratio, 3)
            bar.update()
            if ratios[b] >= 1.0:
                below = b
                break
    record: dict[str, Any] = {"ratios": {str(k): v for k, v in ratios.items()}, "threads": torch.get_num_threads()}
    if not has_dense or below == 1:
        record["below"] = None
        return None, record
    below = below if below is not None else batch_size
    record["below"] = below
    return SmallBatchRule(below, x.device.type), record


def calibrate(
    model: str | os.PathLike[str] | ConvertedModel,
    data: DataArg,
    budget: Budget | str | float | None = None,
    out: str | os.PathLike[str] | None = None,
    *,
    overwrite: bool = False,
    max_images: int | None = None,
    device: str | torch.device | None = None,
    batch_size: int = 64,
    progress: bool = True,
    dataset: str | None = None,
    check_speed: bool | None = None,
) -> dict[str, Any]:
    """Measure the accuracy/GMACs curve on held-out training images and switch to the point for a budget.

    Args:
        model: Model folder, ``local-dir:PATH``, ``hf-hub:OWNER/NAME`` or a converted model (updated in place).
        data: The training ImageFolder (``ROOT/<class>/...`` or ``ROOT/train/<class>/...``), ``hfds/PATH``, a
            ``.tar`` (or a folder of shards) or your own ``Dataset`` / ``DataLoader``; its held-out share
            (``calibrate.holdout`` of each class, the last files or indices) is used.
        budget: GMACs (``2.1``), a fraction of the base model (``"50%"``), a top-1 drop (``"drop=0.5"``) or a
            speed-up over the base model measured here at ``batch_size`` (``"speed=2x"``: the points on the
            accuracy/GMACs frontier are timed, and their throughput is stored with the curve);
            default: the recipe's ``calibrate.budget``, else the most accurate point.
        out: Output folder; default: update the model folder in place (atomically).
        overwrite: Replace an existing ``out``.
        max_images: Use at most this many held-out images, evenly across classes (default: the recipe's).
        device: ``cpu``, ``cuda``...; default CUDA when available.
        batch_size: Images per forward pass.
        progress: Show progress bars.
        dataset: Dataset name for the model card (e.g. a Hub dataset id); default: the folder's name.
        check_speed: Time the chosen point against the base model on ``device`` at ``batch_size`` and choose
            again while it runs slower (:func:`confirm_not_slower`; GMACs, drop and no budget); default: the
            recipe's ``calibrate.check_speed`` (on).

    Returns:
        The chosen point (knob, top-1, GMACs), the calibration record (also stored in the model),
        ``curve`` and ``out``.

    Example:
        >>> calibrate("deit_small-cfvit", "imagenet/train", budget="50%")["chosen"]  # doctest: +SKIP
        {'point': {'eta': 0.53, 'alpha': 0.5}, 'gmacs': 2.29, 'top1': 79.6, 'extra': {'top5': 94.8}}
    """
    start = time.perf_counter()
    session = Session.open(model, device, progress)
    cm, settings = session.model, session.model.recipe.calibrate
    # Everything the user gave is checked before the measurement pass: output, batch size, budget, data.
    out_path = _output_path(session, model, out, overwrite)
    if batch_size < 1:
        raise UserError(f"batch size must be at least 1, got {batch_size}")
    raw = budget if budget is not None else settings.budget
    parsed = Budget.parse(raw) if raw is not None else None
    source = open_data(data, holdout=settings.holdout, name=dataset)
    source.check_classes(cm.num_classes)
    split = source.heldout_split(max_images if max_images is not None else settings.max_images)

    cm.small_batch = None  # measured again below, for the point chosen now
    base, base_desc = session.original_if_any()
    if parsed is not None and parsed.kind == "speed" and base is None:
        raise UserError(f"a speed budget times the model against its original, which is {base_desc}")
    base_top1: float | None = None
    with session.on_device(base), torch.inference_mode():
        curve = measure_curve(cm, split, session.device, batch_size, progress)
        if base is not None:
            base_top1 = measure_base(base, split, session.device, batch_size, cm, progress)[0]
        cm.curve = curve
        choice = _choose(session, base, base_top1, parsed, split, batch_size,
                         settings.check_speed if check_speed is None else check_speed)
    cm.calibration = {
        "budget": str(parsed) if parsed is not None else "best",
        "chosen": choice.point.to_dict(),
        "base_top1": base_top1,
        "base_model": base_desc,
        "base_gmacs": cm.base_gmacs,
        "images": len(split),
        "split": source.short(split.description),
        "dataset": source.name,
        **({"dataset_id": dataset} if dataset and "/" in dataset else {}),
        "holdout": settings.holdout,
        "simulated": can_simulate(cm),
        **choice.records(),
        "finetuned": cm.finetuned,
        "device": str(session.device),
        "seconds": round(time.perf_counter() - start, 2),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    if out_path is not None:
        png = plot_curve(curve, cm.base_gmacs, base_top1, chosen=choice.point,
                         title=f"{cm.base_spec.architecture} + {cm.method}: {len(split)} held-out training images",
                         curve_label="held-out training images")
        session.write(out_path, skip=STALE_AFTER_CALIBRATION, extra={"curve.png": png})
    chosen = choice.point
    return {**chosen.point, "top1": chosen.top1, "gmacs": chosen.gmacs,
            "gmacs_fraction": chosen.gmacs / cm.base_gmacs if cm.base_gmacs else None, **cm.calibration,
            "curve": [p.to_dict() for p in curve], "out": str(out_path) if out_path is not None else None}


def _output_path(session: Session, model: Any, out: Any, overwrite: bool) -> Path | None:
    """Where the calibrated model goes (checked now, written at the end); None: an in-memory model, kept in place."""
    if out is not None:
        return check_output_dir(out, overwrite, allow_existing=session.folder)
    if session.folder is not None:
        return check_output_dir(session.folder, overwrite=True, what="model folder")  # rewritten in place
    if isinstance(model, ConvertedModel):
        return None
    raise UserError("calibrate needs an output folder (-o) for a Hub model")


@dataclass
class _Choice:
    """The chosen point and the speed measurements that chose it (each stored in the calibration record)."""

    point: CurvePoint
    throughput: dict[str, Any] | None = None  # a speed budget's timings of the frontier
    speed_check: dict[str, Any] | None = None  # a GMACs/drop budget's check against the base model
    small_batch: dict[str, Any] | None = None  # the small-batch rule's timings

    def records(self) -> dict[str, Any]:
        named = {"throughput": self.throughput, "speed_check": self.speed_check, "small_batch": self.small_batch}
        return {k: v for k, v in named.items() if v is not None}


def _choose(session: Session, base: torch.nn.Module | None, base_top1: float | None, budget: Budget | None,
            split: Split, batch_size: int, check_speed: bool) -> _Choice:
    """The point for ``budget`` on the model's curve, timed against the base model on this device where that
    decides (a speed budget; a GMACs or drop choice that must not run slower), and the small-batch rule for it."""
    cm = session.model
    speed_budget = budget is not None and budget.kind == "speed"
    checked = check_speed and base is not None
    # One batch of held-out images for every timing below (decoded once).
    x = spread_batch(split.files, cm, batch_size).to(session.device) if speed_budget or checked else None

    def pick(points: list[CurvePoint]) -> CurvePoint:
        return choose_point(points, budget or Budget.parse("best"), cm.base_gmacs, base_top1, cm.adds_compute)

    throughput = speed_check = None
    if speed_budget and base is not None and x is not None:  # the budget reads the timings: they come first
        throughput = time_points(cm, base, frontier(cm.curve), x, session.progress)
    if checked and not speed_budget and base is not None and x is not None:
        point, speed_check = confirm_not_slower(cm, base, cm.curve, pick, x, session.progress)
    else:
        point = pick(cm.curve)
    choice = _Choice(point, throughput, speed_check)
    cm.set_operating_point(point.point)
    if base is not None and x is not None and batch_size > 1 and choice.point.gmacs < cm.base_gmacs * (1 - 1e-9):
        cm.small_batch, choice.small_batch = find_small_batch_rule(cm, base, x, session.progress)
    return choice
