"""The whole mission offline on shipped data: ``vitconvert demo`` / :func:`run_demo`.

Converts the project's CIFAR-10 checkpoint (``benchmarks/checkpoints/cifar10-vit``, a DeiT-Tiny-like ViT at
32 px, in the source repository), fine-tunes it for one epoch on the CIFAR-10 sample that ships inside the
package (``vitconvert/demo_data/cifar10-sample``: 150 images per class, see its README), calibrates the
operating point for a GMACs budget on held-out training images, evaluates it on the sample's ``val/`` images
against the base model, writes the plots, and loads the result back through
``timm.create_model('local-dir:...')``. Nothing is downloaded. The numbers only show that the pipeline
works: the sample is small and overlaps the benchmarks' validation split, so it is no benchmark.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import timm
import torch

from vitconvert.api import apply
from vitconvert.calibration import calibrate
from vitconvert.errors import UserError
from vitconvert.evaluation import evaluate
from vitconvert.saving import load, save
from vitconvert.train import finetune

SAMPLE_DATA = Path(__file__).resolve().parent / "demo_data" / "cifar10-sample"
# In a source checkout; a wheel does not carry the 6 MB checkpoint.
DEFAULT_CHECKPOINT = Path(__file__).resolve().parents[1] / "benchmarks" / "checkpoints" / "cifar10-vit"


def run_demo(
    out: str | os.PathLike[str] = "vitconvert-demo",
    *,
    recipe: str = "cfvit",
    epochs: float = 1.0,
    budget: str = "50%",
    model: str | None = None,
    data: str | os.PathLike[str] | None = None,
    overrides: list[str] | None = None,
    max_images: int | None = None,
    throughput: bool = True,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Apply, fine-tune, calibrate, evaluate and reload the shipped CIFAR-10 ViT, offline.

    Args:
        out: Work folder: ``converted/`` (as applied) and ``model/`` (fine-tuned, calibrated, evaluated,
            with ``curve.png`` and ``eval.png``).
        recipe: Recipe to apply (``cfvit``, ``dge``, ...).
        epochs: Fine-tuning epochs (fractions allowed).
        budget: Calibration budget (``"50%"`` of the base model's GMACs, GMACs, or ``"drop=0.5"``).
        model: Base model (``local-dir:PATH`` ...); default: the repository's ``cifar10-vit`` checkpoint.
        data: Image folder; default: the shipped CIFAR-10 sample.
        overrides: More recipe overrides, e.g. ``["finetune.batch_size=16"]``.
        max_images: Use at most this many images in each step (quick runs).
        throughput: Also time the converted model against the base model.
        overwrite: Replace an existing work folder.
        progress: Show progress bars.

    Returns:
        A summary: base and converted top-1, GMACs, the operating point, throughput ratio, seconds per step,
        the folders and plots, and whether timm's reload gave identical logits.

    Example:
        >>> summary = run_demo("demo", epochs=1)  # doctest: +SKIP
        >>> summary["top1"], summary["gmacs_share"]  # doctest: +SKIP
    """
    if model is None:
        if not (DEFAULT_CHECKPOINT / "config.json").is_file():
            raise UserError(f"the demo checkpoint is not here ({DEFAULT_CHECKPOINT}; it lives in the source "
                            "repository, not in the wheel): clone the repository, or pass --model local-dir:PATH")
        model = f"local-dir:{DEFAULT_CHECKPOINT}"
    data_path = Path(data) if data is not None else SAMPLE_DATA
    if not data_path.is_dir():
        raise UserError(f"demo data {str(data_path)!r} is missing; pass --data with an image folder")
    root = Path(out).expanduser().resolve()
    if root.exists() and not overwrite:
        raise UserError(f"{str(root)!r} already exists; pass --overwrite to replace it or choose another --out")
    sets = [f"finetune.epochs={epochs}", *(overrides or [])]
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    converted = apply(model, recipe, overrides=sets)
    converted_dir = save(converted, root / "converted", overwrite=True)
    seconds["apply"] = time.perf_counter() - t

    t = time.perf_counter()
    model_dir = finetune(converted_dir, data_path, root / "model", overwrite=True, device="cpu", progress=progress,
                         max_images=max_images)
    seconds["finetune"] = time.perf_counter() - t

    t = time.perf_counter()
    chosen = calibrate(model_dir, data_path, budget, device="cpu", progress=progress, max_images=max_images,
                       dataset="cifar10-sample")
    seconds["calibrate"] = time.perf_counter() - t

    t = time.perf_counter()
    report = evaluate(model_dir, data_path, device="cpu", progress=progress, max_images=max_images,
                      throughput=throughput)
    seconds["evaluate"] = time.perf_counter() - t

    t = time.perf_counter()
    ours = load(model_dir)
    via_timm = timm.create_model(f"local-dir:{model_dir}", pretrained=True)
    x = torch.randn(4, 3, *ours.anatomy.img_size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        identical = bool(torch.equal(ours.eval()(x), via_timm.eval()(x)))
    seconds["reload"] = time.perf_counter() - t
    if not identical:
        raise RuntimeError("timm.create_model('local-dir:...') did not reproduce the saved model")

    base = report["base"]
    return {
        "recipe": recipe, "method": ours.method, "point": ours.operating_point, "budget": budget,
        "base_top1": base["top1"], "top1": report["top1"], "base_gmacs": base["gmacs"], "gmacs": report["gmacs"],
        "gmacs_share": report["gmacs_fraction"], "throughput_ratio": report["points"][0]["throughput_ratio"],
        "eval_images": report["images"], "eval_split": report["split"], "calibration_images": chosen["images"],
        "timm_reload_identical": identical, "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "model_dir": str(model_dir), "plots": [str(model_dir / "curve.png"), str(model_dir / "eval.png")],
    }
