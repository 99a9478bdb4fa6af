"""Evaluate a converted model at its operating point against the base model, in one run.

Reports top-1/top-5, expected GMACs (the mean of the per-image GMACs of the paths the images really
took), exit fractions (``DynamicOutput.stage``) and summaries of the method's per-image extras, the base
model's accuracy on the same images, and batched throughput of both models measured side by side
(same device, batch and images, timed batches interleaved so background load hits both alike).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import timm
import torch

from vitconvert.card import model_card
from vitconvert.data import DataArg, Split, batches, open_data, spread_batch
from vitconvert.errors import UserError
from vitconvert.methods.base import ConvertedModel
from vitconvert.operating import Budget, CurvePoint
from vitconvert.plots import plot_curve
from vitconvert.saving import CARD_NAME, check_writable_dir, read_config
from vitconvert.session import Session, Tally
from vitconvert.timing import compare, device_name

# Throughput timing keeps going (up to max_rounds) until this many seconds have been spent.
THROUGHPUT_SECONDS = 10.0


def summarise_extras(extras: dict[str, list[torch.Tensor]]) -> dict[str, Any]:
    """Per-image extras -> numbers: shares of each value for bool/integer entries, means for float ones."""
    out: dict[str, Any] = {}
    for name, parts in extras.items():
        values = torch.cat(parts)
        if values.dtype == torch.bool:
            out[f"{name}_share"] = float(values.float().mean())
        elif not values.is_floating_point():
            uniq, counts = values.unique(return_counts=True)
            out[f"{name}_shares"] = {str(int(u)): int(c) / values.numel() for u, c in zip(uniq, counts, strict=True)}
        else:
            out[f"{name}_mean"] = float(values.float().mean())
    return out


def evaluate(
    model: str | os.PathLike[str] | ConvertedModel,
    data: DataArg,
    out: str | os.PathLike[str] | None = None,
    *,
    budget: Budget | str | float | None = None,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    max_images: int | None = None,
    throughput: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Top-1/top-5, expected GMACs, exit fractions and throughput of a converted model and of its base model.

    Args:
        model: Model folder, ``local-dir:PATH``, ``hf-hub:OWNER/NAME`` or a converted model.
        data: ImageFolder, ``hfds/PATH``, ``.tar`` shards or your own ``Dataset`` / ``DataLoader``; its
            validation split (``val/``) when present, else the held-out part of each class.
        out: Folder for ``eval.json`` and ``eval.png``; default: the model folder (nothing is written for
            Hub or in-memory models).
        budget: Operating point from the stored calibration curve (GMACs, ``"50%"``, ``"drop=0.5"``);
            default: the stored one.
        batch_size: Images per forward pass (also the throughput batch).
        device: ``cpu``, ``cuda``...; default CUDA when available.
        max_images: Evaluate at most this many images, evenly across classes.
        throughput: Also time both models.
        progress: Show progress bars.

    Returns:
        The eval.json content.

    Example:
        >>> r = evaluate("deit_small-cfvit", "imagenet/", budget="50%")  # doctest: +SKIP
        >>> r["top1"], r["gmacs"], r["base"]["top1"]                      # doctest: +SKIP
    """
    start = time.perf_counter()
    session = Session.open(model, device, progress)
    cm = session.model
    if budget is not None:
        cm.set_budget(Budget.parse(budget))
    if batch_size < 1:
        raise UserError(f"batch size must be at least 1, got {batch_size}")
    out_path = Path(out).expanduser().resolve() if out is not None else session.folder
    if out_path is not None:  # eval.json and eval.png go into it: checked before the images are run
        if out_path.exists() and not out_path.is_dir():
            raise UserError(f"eval output {str(out_path)!r} is a file; -o takes a folder for eval.json and eval.png")
        check_writable_dir(out_path, "eval output folder")
    folder_data = open_data(data, holdout=cm.recipe.calibrate.holdout)
    folder_data.check_classes(cm.num_classes)
    split = folder_data.eval_split(max_images)
    n = len(split)
    base, base_desc = session.original_if_any()
    with session.on_device(base), torch.inference_mode():
        tally, base_tally, extras = _score(session, base, split, batch_size)
        speed = _time(session, base, split, batch_size) if throughput else None
    mean_gmacs = tally.mean_gmacs
    exit_fractions = {str(s): share for s, share in tally.exit_shares().items()} or None
    top1 = tally.top1
    base_top1 = base_tally.top1 if base is not None else None
    point: dict[str, Any] = {
        "knob": cm.knob, **cm.operating_point, "point": cm.operating_point,
        "budget": str(budget) if budget is not None else None,
        "top1": top1, "top5": tally.top5, "gmacs": mean_gmacs,
        "gmacs_fraction": mean_gmacs / cm.base_gmacs if cm.base_gmacs else None,
        "top1_drop": base_top1 - top1 if base_top1 is not None else None,
        "throughput": speed["converted_images_per_s"] if speed else None,
        "throughput_ratio": speed["speedup"] if speed else None,
        "exit_fractions": exit_fractions, "extras": summarise_extras(extras),
    }
    split_name = "val" if folder_data.has_val else "held-out"
    report: dict[str, Any] = {
        # The measured point, flat, for quick reading; "points" also holds earlier budgets on the same data.
        **{k: point[k] for k in ("top1", "top5", "gmacs", "gmacs_fraction", "top1_drop", "knob")},
        "points": [point],
        "model": str(model) if not isinstance(model, ConvertedModel) else None,
        "method": cm.method,
        "knob_name": cm.knob_name,
        "base_architecture": cm.base_spec.architecture,
        "finetuned": cm.finetuned,
        "dataset": folder_data.name,
        "split": split_name,
        "split_description": folder_data.short(split.description),
        "images": n,
        "classes": len(folder_data.classes),
        "device": device_name(session.device),
        "batch_size": batch_size,
        "base": {"model": base_desc, "gmacs": cm.base_gmacs, "top1": base_top1,
                 "top5": base_tally.top5 if base is not None else None,
                 "throughput": speed["base_images_per_s"] if speed else None},
        "throughput": speed,
        "calibration": {k: cm.calibration.get(k) for k in ("budget", "base_top1", "images", "split")}
        if cm.calibration else None,
        "versions": {"torch": torch.__version__, "timm": timm.__version__, "python": platform.python_version()},
        "seconds": round(time.perf_counter() - start, 2),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    if out_path is not None:
        out_path.mkdir(parents=True, exist_ok=True)
        report["points"] = _merge_points(out_path / "eval.json", report)
        curve_points = [CurvePoint(p.get("point") or {cm.knob_name: p["knob"]}, p["gmacs"], p["top1"])
                        for p in report["points"]]
        png = plot_curve(cm.curve, cm.base_gmacs, cm.calibration.get("base_top1"), measured=curve_points,
                         measured_base=base_top1,
                         title=f"{cm.base_spec.architecture} + {cm.method}: {n} images ({split_name})",
                         curve_label="calibration curve (held-out training images)",
                         measured_label=f"measured on {split_name} ({n} images)")
        _write_atomic(out_path / "eval.json", (json.dumps(report, indent=2) + "\n").encode())
        _write_atomic(out_path / "eval.png", png)
        if (out_path / "config.json").is_file():
            # A model folder: its card shows the evaluation table, so render it again.
            card = model_card(read_config(out_path), out_path)
            _write_atomic(out_path / CARD_NAME, card.encode())
    return report


def _merge_points(path: Path, report: dict[str, Any]) -> list[dict[str, Any]]:
    """Points of an earlier eval.json on the same images and model, with this run's point replacing its own."""
    points = list(report["points"])
    try:
        old = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, json.JSONDecodeError):
        old = {}
    same = all(old.get(k) == report[k] for k in ("split_description", "method", "finetuned", "base_architecture"))
    if isinstance(old, dict) and same and isinstance(old.get("points"), list):
        this = points[0].get("point") or {"knob": points[0]["knob"]}
        points += [p for p in old["points"]
                   if isinstance(p, dict) and (p.get("point") or {"knob": p.get("knob")}) != this]
    return sorted(points, key=lambda p: p.get("gmacs") or 0.0)


def _write_atomic(path: Path, content: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(content)
    tmp.replace(path)


def _score(session: Session, base: torch.nn.Module | None, split: Split, batch_size: int
           ) -> tuple[Tally, Tally, dict[str, list[torch.Tensor]]]:
    """One pass over ``split``: the converted model's and the base model's tallies, and the per-image extras."""
    cm = session.model
    tally, base_tally = Tally(), Tally()
    extras: dict[str, list[torch.Tensor]] = {}
    with session.bar("evaluate", -(-len(split) // batch_size)) as bar:
        for x, y in batches(split, cm, batch_size):
            x = x.to(session.device)
            result = cm.forward_dynamic(x)
            tally.add(result, y)
            for name, value in result.extras.items():
                # Only one number per image can be summarised (e.g. confidence, a gate's choice).
                if value.dim() == 1 and value.shape[0] == x.shape[0]:
                    extras.setdefault(name, []).append(value.cpu())
            if base is not None:
                base_tally.add_logits(base(x), y)
            bar.update()
    return tally, base_tally, extras


def _time(session: Session, base: torch.nn.Module | None, split: Split, batch_size: int) -> dict[str, Any]:
    """Both models timed side by side on one batch of the split's images (vitconvert.timing)."""
    cm, dev = session.model, session.device
    xb = spread_batch(split.files, cm, batch_size).to(dev)
    models = {"converted": cm} if base is None else {"converted": cm, "base": base}
    res = compare(models, xb, reference="base" if base is not None else None, min_seconds=THROUGHPUT_SECONDS)
    conv = res["converted"]
    return {"batch_size": batch_size, "device": device_name(dev), "threads": torch.get_num_threads(),
            "dtype": "float32", "converted_images_per_s": round(conv.images_per_s, 1),
            "base_images_per_s": round(res["base"].images_per_s, 1) if "base" in res else None,
            "speedup": round(conv.ratio, 3) if "base" in res else None,
            "speedup_p10_p90": [round(conv.ratio_spread.p10, 3), round(conv.ratio_spread.p90, 3)]
            if "base" in res else None,
            "protocol": "one batch of real images spread over the split; 2 warm-up rounds, then paired rounds "
                        "timing every model once, order rotated each round (vitconvert.timing); median "
                        "images/s, speed-up the median of per-round paired ratios"}

