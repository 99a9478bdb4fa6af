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
import io
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from vitconvert.data import DataArg, ImageFolderData, SourceData, Split, batches, open_data
from vitconvert.errors import UserError
from vitconvert.methods.base import ConvertedModel, DynamicOutput, SimulatesPoints, SmallBatchRule, can_simulate
from vitconvert.operating import (
    CurvePoint,
    OperatingPoint,
    choose_point,
    eligible_points,
    format_point,
    frontier,
    parse_budget,
    unique_points,
)
from vitconvert.saving import check_output_dir, save
from vitconvert.throughput import device_name, measure_throughput, spread_batch
from vitconvert.train import ProgressBar, carried_files, original_model, resolve_device, resolve_model

# Speed budgets time at most this many operating points (spread over the frontier), each for this long.
MAX_TIMED_POINTS = 8
SPEED_SECONDS = 3.0
SPEED_CHECK_SECONDS = 1.0  # per timed point when checking a GMACs/drop choice (a few points, not the frontier)
SMALL_BATCH_MAX_ROUNDS = 300  # timed batches per model at the small batch sizes (a batch-1 forward can take 3 ms)
STALE_AFTER_CALIBRATION = ("curve.png", "eval.json", "eval.png")


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, k: int) -> int:
    """How many rows of ``logits`` have the label among their ``k`` highest scores."""
    k = min(k, logits.shape[-1])
    return int((logits.topk(k, dim=-1).indices == labels[:, None]).any(dim=-1).sum())


class Tally:
    """Top-1/top-5 hits, GMACs and exits of one operating point (or of a plain model's logits), accumulated over
    batches; calibration and evaluation count the same way."""

    def __init__(self) -> None:
        self.correct1 = self.correct5 = self.images = 0
        self.gmacs = 0.0
        self.exits: dict[int, int] = {}

    def add_logits(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        logits = logits.float().cpu()
        self.correct1 += topk_correct(logits, labels, 1)
        self.correct5 += topk_correct(logits, labels, 5)
        self.images += int(labels.shape[0])

    def add(self, out: DynamicOutput, labels: torch.Tensor) -> None:
        self.add_logits(out.logits, labels)
        self.gmacs += float(out.gmacs.double().sum())
        if out.stage is not None:
            for s, c in zip(*out.stage.cpu().unique(return_counts=True), strict=True):
                self.exits[int(s)] = self.exits.get(int(s), 0) + int(c)

    @property
    def top1(self) -> float:
        return 100.0 * self.correct1 / max(self.images, 1)

    @property
    def top5(self) -> float:
        return 100.0 * self.correct5 / max(self.images, 1)

    @property
    def mean_gmacs(self) -> float:
        return self.gmacs / max(self.images, 1)

    def exit_shares(self) -> dict[int, float]:
        return {s: c / max(self.images, 1) for s, c in sorted(self.exits.items())}

    def point(self, point: OperatingPoint, n: int) -> CurvePoint:
        extra = {"top5": 100.0 * self.correct5 / n, **{f"exit_{s}": c / n for s, c in sorted(self.exits.items())}}
        return CurvePoint(point=dict(point), gmacs=self.gmacs / n, top1=100.0 * self.correct1 / n, extra=extra)


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
                ips = measure_throughput({"converted": model, "base": base}, x, min_seconds=SPEED_SECONDS)
                p.extra["throughput"] = round(ips["converted"], 1)
                p.extra["throughput_ratio"] = round(ips["converted"] / ips["base"], 3)
                bar.update()
    finally:
        model.set_operating_point(saved)
    return {"device": device_name(x.device), "batch_size": x.shape[0], "threads": torch.get_num_threads(),
            "points_timed": len(timed),
            "protocol": "points on the accuracy/GMACs frontier; one batch of held-out images; the model and its "
                        "original timed in interleaved rounds after warm-up; median time per batch"}


def confirm_not_slower(model: ConvertedModel, base: torch.nn.Module, curve: list[CurvePoint],
                       pick: Callable[[list[CurvePoint]], CurvePoint], x: torch.Tensor, progress: bool = True
                       ) -> tuple[CurvePoint, dict[str, Any]]:
    """The point ``pick`` chooses from ``curve``, timed against ``base`` on the batch ``x`` (on the device both
    models are on): while it runs slower than the base model, it is set aside and ``pick`` chooses again (at most
    :data:`MAX_TIMED_POINTS` timings).

    GMACs do not say how fast a point runs on this device (a DVT cascade where a quarter of the images reach the
    last member costs 75% of the MACs and ran 0.86x on a 1-thread CPU), so a GMACs or drop budget would
    otherwise be free to choose a point slower than the model it replaces. Points costing at least the base
    model's GMACs are not timed (they run the base computation). If every timed point is slower, the fastest
    one is kept and the record says the check failed. Timed points keep ``throughput`` and
    ``throughput_ratio`` in their ``extra``, as a speed budget's do.
    """
    saved = model.operating_point
    slow: list[CurvePoint] = []
    timed: list[CurvePoint] = []
    try:
        with ProgressBar("calibrate: checking speed", MAX_TIMED_POINTS, progress) as bar:
            while True:
                chosen = pick([p for p in curve if all(p is not s for s in slow)] or curve)
                done = (chosen.gmacs >= model.base_gmacs * (1 - 1e-9) or len(timed) >= MAX_TIMED_POINTS
                        or any(chosen is t for t in timed))
                if done:
                    break
                model.set_operating_point(chosen.point)
                ips = measure_throughput({"converted": model, "base": base}, x, min_seconds=SPEED_CHECK_SECONDS)
                chosen.extra["throughput"] = round(ips["converted"], 1)
                chosen.extra["throughput_ratio"] = round(ips["converted"] / ips["base"], 3)
                timed.append(chosen)
                if chosen.extra["throughput_ratio"] < 1.0:
                    slow.append(chosen)
                bar.update()
    finally:
        model.set_operating_point(saved)
    met = not any(chosen is s for s in slow)
    if not met:  # nothing timed ran at the base's speed: the fastest of them
        chosen = max(timed, key=lambda p: (p.extra["throughput_ratio"], p.top1))
    return chosen, {"device": device_name(x.device), "batch_size": x.shape[0], "threads": torch.get_num_threads(),
                    "points_timed": len(timed), "points_slower": len(slow), "not_slower": met,
                    "protocol": "the chosen point and its original timed in interleaved rounds on one batch of "
                                "held-out images; a point slower than the original is set aside and the budget "
                                "chooses again"}


def find_small_batch_rule(model: ConvertedModel, base: torch.nn.Module, x: torch.Tensor, progress: bool = True
                          ) -> tuple[SmallBatchRule | None, dict[str, Any]]:
    """Time the current point against ``base`` (both on ``x``'s device) on the first 1, 2, 4, ... images of the
    calibration batch ``x`` until it is not slower; the rule makes smaller batches run at the full-compute point
    (the base computation).

    Fixed costs per operation do not shrink with the batch, so a point faster than its base at 64 images can be
    slower at one (DGE on the CIFAR-10 ViT: 1.6x at 64, 0.7x at 1). Only a model with ``full_compute_runs_base``
    gets a rule; for the others (cascades) the batch-1 speed is measured and recorded. No rule is returned when
    the point is not slower at batch 1; when it is slower at every size tried, ``below`` is ``batch_size``.
    """
    batch_size = x.shape[0]
    sizes = [1 << i for i in range(max(1, batch_size).bit_length()) if 1 << i < batch_size]
    if not model.full_compute_runs_base:
        sizes = sizes[:1]
    ratios: dict[int, float] = {}
    below: int | None = None
    with ProgressBar("calibrate: checking small batches", len(sizes), progress) as bar:
        for b in sizes:
            ips = measure_throughput({"converted": model, "base": base}, x[:b], min_seconds=SPEED_CHECK_SECONDS,
                                     max_rounds=SMALL_BATCH_MAX_ROUNDS)
            ratios[b] = round(ips["converted"] / ips["base"], 3)
            bar.update()
            if ratios[b] >= 1.0:
                below = b
                break
    record: dict[str, Any] = {"ratios": {str(k): v for k, v in ratios.items()}, "threads": torch.get_num_threads()}
    if not model.full_compute_runs_base or below == 1:
        record["below"] = None
        return None, record
    below = below if below is not None else batch_size
    record["below"] = below
    return SmallBatchRule(below, x.device.type), record


def plot_curve(curve: list[CurvePoint], base_gmacs: float, base_top1: float | None, *, chosen: CurvePoint | None = None,
               measured: list[CurvePoint] | None = None, measured_base: float | None = None,
               title: str = "", curve_label: str = "calibration curve", measured_label: str = "measured") -> bytes:
    """PNG of top-1 against expected GMACs: the curve, the chosen/measured point and the base model.

    Drawn on a bare Agg canvas, so the caller's matplotlib backend is left alone.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4.2), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if curve:
        pts = sorted(curve, key=lambda p: p.gmacs)
        ax.plot([p.gmacs for p in pts], [p.top1 for p in pts], "-o", ms=2.5, lw=1.2, color="tab:blue",
                label=curve_label)
    if chosen is not None:
        ax.plot([chosen.gmacs], [chosen.top1], "o", ms=8, mfc="none", mew=1.8, color="tab:orange",
                label=f"chosen point ({format_point(chosen.point)})")
    for i, p in enumerate(measured or []):
        ax.plot([p.gmacs], [p.top1], "*", ms=13, color="tab:red", label=measured_label if i == 0 else None)
    calib_label = "base model (calibration images)" if measured_base is not None else "base model"
    for top1, label, color in ((base_top1, calib_label, "black"), (measured_base, "base model (measured)", "tab:gray")):
        if top1 is not None:
            ax.plot([base_gmacs], [top1], "s", ms=8, color=color, label=f"{label}: {top1:.2f}%")
    ax.axvline(base_gmacs, color="black", lw=0.6, ls=":")
    ax.set_xlabel("expected GMACs per image")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _short(split: Split, data: ImageFolderData | SourceData) -> str:
    """The split description with paths relative to the data folder's parent (no local paths on cards)."""
    return data.short(split.description)


def calibrate(
    model: str | os.PathLike[str] | ConvertedModel,
    data: DataArg,
    budget: str | float | None = None,
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
    cm, folder = resolve_model(model)
    dev = resolve_device(device)
    settings = cm.recipe.calibrate
    if out is not None:
        out_path: Path | None = check_output_dir(out, overwrite, allow_existing=folder)
    elif folder is not None:
        out_path = check_output_dir(folder, overwrite=True, what="model folder")  # rewritten in place
    elif isinstance(model, ConvertedModel):
        out_path = None  # an in-memory model is calibrated in place and not written
    else:
        raise UserError("calibrate needs an output folder (-o) for a Hub model")
    if batch_size < 1:
        raise UserError(f"batch size must be at least 1, got {batch_size}")
    budget = budget if budget is not None else settings.budget
    if budget is not None:
        parse_budget(budget)  # a bad budget is refused before the measurement pass
    folder_data = open_data(data, holdout=settings.holdout, name=dataset)
    folder_data.check_classes(cm.num_classes)
    split = folder_data.heldout_split(max_images if max_images is not None else settings.max_images)

    base: torch.nn.Module | None = None
    cm.small_batch = None  # measured again below, for the point chosen now
    cm.to(dev).eval()
    try:
        curve = measure_curve(cm, split, dev, batch_size, progress)
        base_top1: float | None = None
        base_desc: str | None
        try:
            base, base_desc = original_model(cm)
        except UserError as e:
            base, base_desc = None, f"not measured: {e}"
        if base is not None:
            base_top1, _ = measure_base(base.to(dev), split, dev, batch_size, cm, progress)
        speed_budget = budget is not None and parse_budget(budget)[0] == "speed"
        if speed_budget and base is None:
            raise UserError(f"a speed budget times the model against its original, which is {base_desc}")
        checked = (settings.check_speed if check_speed is None else check_speed) and base is not None
        # One batch of held-out images for every timing below (decoded once).
        x_time = spread_batch(split.files, cm, batch_size).to(dev) if speed_budget or checked else None
        speed: dict[str, Any] | None = None
        if speed_budget:
            assert base is not None and x_time is not None
            speed = time_points(cm, base.eval(), frontier(curve), x_time, progress)
        cm.curve = curve

        def pick(points: list[CurvePoint]) -> CurvePoint:
            if budget is None:
                return max(eligible_points(points, cm.base_gmacs, cm.adds_compute), key=lambda p: (p.top1, -p.gmacs))
            return choose_point(points, budget, cm.base_gmacs, base_top1, cm.adds_compute)

        chosen = pick(curve)
        speed_check: dict[str, Any] | None = None
        if checked and speed is None:
            assert base is not None and x_time is not None
            chosen, speed_check = confirm_not_slower(cm, base.eval(), curve, pick, x_time, progress)
        cm.set_operating_point(chosen.point)
        small_batch: dict[str, Any] | None = None
        if (speed is not None or speed_check is not None) and batch_size > 1 \
                and chosen.gmacs < cm.base_gmacs * (1 - 1e-9):
            assert base is not None and x_time is not None
            cm.small_batch, small_batch = find_small_batch_rule(cm, base.eval(), x_time, progress)
    finally:
        cm.to("cpu")
        if base is not None:
            base.to("cpu")
    cm.calibration = {
        "budget": str(budget) if budget is not None else "best top-1",
        "chosen": chosen.to_dict(),
        "base_top1": base_top1,
        "base_model": base_desc,
        "base_gmacs": cm.base_gmacs,
        "images": len(split),
        "split": _short(split, folder_data),
        "dataset": folder_data.name,
        **({"dataset_id": dataset} if dataset and "/" in dataset else {}),
        "holdout": settings.holdout,
        "simulated": can_simulate(cm),
        **({"throughput": speed} if speed is not None else {}),
        **({"speed_check": speed_check} if speed_check is not None else {}),
        **({"small_batch": small_batch} if small_batch is not None else {}),
        "finetuned": cm.finetuned,
        "device": str(dev),
        "seconds": round(time.perf_counter() - start, 2),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    png = plot_curve(curve, cm.base_gmacs, base_top1, chosen=chosen,
                     title=f"{cm.base_spec.architecture} + {cm.method}: {len(split)} held-out training images",
                     curve_label="held-out training images")
    if out_path is not None:
        extra = carried_files(folder, skip=STALE_AFTER_CALIBRATION)
        extra["curve.png"] = png
        save(cm, out_path, overwrite=True, extra_files=extra)
    return {**chosen.point, "top1": chosen.top1, "gmacs": chosen.gmacs,
            "gmacs_fraction": chosen.gmacs / cm.base_gmacs if cm.base_gmacs else None, **cm.calibration,
            "curve": [p.to_dict() for p in curve], "out": str(out_path) if out_path is not None else None}
