"""What each method gives with no fine-tune at all (convert + calibrate only), beside ToMe at the same GMACs.

Users with no budget for training ask for this row. Protocol (the splits of :mod:`benchmarks.cifar10`):

* each recipe converts the base folder (``local-dir:``; its pretrained weights, new parameters at their exact
  initial values) and calibrates with ``--budget`` (default 50% of the base's GMACs) on the held-out tail of the
  training folder (the recipe's ``calibrate.holdout``), with the calibration's speed check on;
* the chosen point is evaluated on the validation split (the last 500 images per class), beside the base model;
* ToMe (:mod:`benchmarks.tome`, training-free token merging) runs on the same base at every ``r`` (tokens merged
  per block) on the same validation images; each method's row names the ToMe point of the nearest GMACs at or
  below its own (or ToMe's cheapest point, marked, when a constant r cannot go that low), and the plot shows
  ToMe's whole curve.

ToMe needs class-token pooling on a ViT/DeiT, so its rows exist for ViT bases only.

Writes ``cifar10_no_finetune.json`` (machine, settings, rows, every curve), ``cifar10_no_finetune.md`` (the table)
and ``cifar10_no_finetune.png`` (validation top-1 against GMACs). Usage (from the repo root)::

    nice -n 5 python -m benchmarks.cifar10_no_finetune              # cfvit, dvt, dge on the CIFAR-10 ViT
    python -m benchmarks.cifar10_no_finetune --quick                # 200 calibration / 500 validation images
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):  # allow `python benchmarks/cifar10_no_finetune.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.cifar10_short_recipe import DEFAULT_BASE, RESULTS, _rel, build_data_tree

RECIPES = ("cfvit", "dvt", "dge")
STEM = "cifar10_no_finetune"


def _top1_gmacs(model: torch.nn.Module, split: Any, transform_model: torch.nn.Module, img_size: tuple[int, int],
                batch_size: int = 250) -> tuple[float, float]:
    """Top-1 (%) of a plain module on a split, and its GMACs per image (vitconvert's counter)."""
    from benchmarks.tome import gmacs
    from vitconvert.data import batches

    correct = total = 0
    model.eval()
    with torch.inference_mode():
        for x, y in batches(split, transform_model, batch_size):
            correct += int((model(x).argmax(-1) == y).sum())
            total += len(y)
    return 100.0 * correct / max(total, 1), gmacs(model, img_size)


def tome_curve(base: torch.nn.Module, split: Any, img_size: tuple[int, int], progress: bool = True
               ) -> list[dict[str, Any]]:
    """ToMe at every r from 0 until a block would have no patch tokens left to merge, on ``split``."""
    from benchmarks.tome import ToMe
    from vitconvert.backbones import read_anatomy

    anatomy = read_anatomy(base)
    tome = ToMe(base, 0, anatomy)
    patches = anatomy.grid[0] * anatomy.grid[1]
    depth = len(anatomy.blocks)
    points = []
    r = 0
    while r * depth < patches and (r == 0 or patches - r * depth >= 2):
        tome.r = r
        top1, g = _top1_gmacs(tome, split, base, img_size)
        points.append({"r": r, "top1": round(top1, 2), "gmacs": g})
        if progress:
            print(f"  tome r={r}: top-1 {top1:.2f}%, {g:.4f} GMACs", flush=True)
        r += 1
    return points


def nearest_tome(curve: list[dict[str, Any]], gmacs: float) -> dict[str, Any] | None:
    """The ToMe point of the most GMACs at or below ``gmacs``; else its cheapest point (``above: true``: ToMe with
    a constant r cannot go that low, since the first block always runs every token)."""
    if not curve:
        return None
    below = [p for p in curve if p["gmacs"] <= gmacs * (1 + 1e-9)]
    if below:
        return {**max(below, key=lambda p: p["gmacs"]), "above": False}
    return {**min(curve, key=lambda p: p["gmacs"]), "above": True}


def run_no_finetune(base: Path, out_dir: Path, recipes: tuple[str, ...] = RECIPES, budget: str = "50%",
                    quick: bool = False, progress: bool = True) -> dict[str, Any]:
    import vitconvert
    from benchmarks.common import machine_block
    from vitconvert.calibration import calibrate
    from vitconvert.data import open_image_folder
    from vitconvert.evaluation import evaluate
    from vitconvert.sources import load_base

    if not (base / "config.json").is_file():
        raise SystemExit(f"base model {base} not found; train it with `python -m benchmarks.train_base`")
    calib_max, eval_max = (200, 500) if quick else (None, None)
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="vitconvert-nofinetune-"))
    machine_start = machine_block()
    rows: list[dict[str, Any]] = []
    methods: dict[str, Any] = {}
    times: dict[str, float] = {}
    try:
        data = work / "cifar10"
        build_data_tree(data)
        for recipe in recipes:
            t = time.perf_counter()
            model = vitconvert.apply(f"local-dir:{base}", recipe)
            folder = vitconvert.save(model, work / recipe)
            cal = calibrate(folder, data, budget, device="cpu", max_images=calib_max, progress=progress,
                            dataset="cifar10")
            ev = evaluate(folder, data, device="cpu", max_images=eval_max, throughput=False, progress=progress)
            times[recipe] = round(time.perf_counter() - t, 1)
            methods[recipe] = {"calibration": {k: v for k, v in cal.items() if k != "curve"}, "curve": cal["curve"],
                               "evaluation": {k: v for k, v in ev.items() if k != "points"}}
            rows.append({"method": model.method, "backbone": base.name, "setting": f"{recipe}, no fine-tune, "
                         f"calibrated {cal['budget']}", "gmacs": ev["gmacs"], "base_gmacs": ev["base"]["gmacs"],
                         "top1": ev["top1"], "base_top1": ev["base"]["top1"],
                         "point": cal["chosen"].get("point", cal["chosen"]),
                         "finetune_minutes": 0.0, "device": "cpu", "precision": "fp32"})

        tome: list[dict[str, Any]] = []
        plain, _ = load_base(f"local-dir:{base}", pretrained=True)
        try:
            split = open_image_folder(data).eval_split(eval_max)
            img_size = tuple(int(v) for v in plain.pretrained_cfg["input_size"][1:])
            t = time.perf_counter()
            tome = tome_curve(plain, split, img_size, progress)  # type: ignore[arg-type]
            times["tome"] = round(time.perf_counter() - t, 1)
        except vitconvert.UserError as e:  # not a class-token ViT: no ToMe rows
            print(f"ToMe: {e}", flush=True)
        for row in rows:
            row["tome_at_same_gmacs"] = nearest_tome(tome, row["gmacs"])
        result = {
            "benchmark": STEM, "quick": quick, "date": machine_start["date"], "machine": machine_start,
            "machine_end": machine_block(),
            "settings": {"base": _rel(base), "recipes": list(recipes), "budget": budget, "finetune": None,
                         "calibration": "held-out tail of each training class (recipe calibrate.holdout), speed "
                                        "check on", "evaluation": "validation split (last 500 per class)",
                         "threads": torch.get_num_threads()},
            "times_s": times, "rows": rows, "methods": methods, "tome_curve": tome,
        }
        text = json.dumps(result, indent=1).replace(str(work), "<work>").replace(os.getcwd() + os.sep, "")
        (out_dir / f"{STEM}.json").write_text(text + "\n")
        (out_dir / f"{STEM}.md").write_text(table(result) + "\n")
        plot(result, out_dir / f"{STEM}.png")
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)


def table(result: dict[str, Any]) -> str:
    """The Markdown table of a result (also what the docs include)."""
    s = result["settings"]
    lines = [f"No fine-tune: converted, calibrated at {s['budget']} of the base's GMACs on held-out training images, "
             f"top-1 on the CIFAR-10 validation split; ToMe at the nearest GMACs at or below ({s['base']}, "
             f"{result['date'][:10]}).", "",
             "| method | point | GMACs (of base) | top-1 | base top-1 | drop | ToMe r | ToMe GMACs | ToMe top-1 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        point = ", ".join(f"{k}={v:g}" for k, v in (r.get("point") or {}).items() if isinstance(v, int | float))
        t = r.get("tome_at_same_gmacs")
        low = ", its lowest" if t and t["above"] else ""
        tome = (f"{t['r']} | {t['gmacs']:.4f} ({t['gmacs'] / r['base_gmacs']:.0%}{low})"
                f" | {t['top1']:.2f}" if t else "– | – | –")
        lines.append(f"| {r['method']} | {point} | {r['gmacs']:.4f} ({r['gmacs'] / r['base_gmacs']:.0%}) | "
                     f"{r['top1']:.2f} | {r['base_top1']:.2f} | {r['top1'] - r['base_top1']:+.2f} | {tome} |")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    tome = result["tome_curve"]
    if tome:
        ax.plot([p["gmacs"] for p in tome], [p["top1"] for p in tome], "o-", color="0.5", ms=3,
                label="ToMe (r = 0, 1, ...)")
    for r in result["rows"]:
        ax.plot(r["gmacs"], r["top1"], "s", ms=7, label=f"{r['method']} (no fine-tune)")
    if result["rows"]:
        r0 = result["rows"][0]
        ax.plot(r0["base_gmacs"], r0["base_top1"], "k*", ms=10, label="base model")
    ax.set_xlabel("GMACs per image (expected)")
    ax.set_ylabel("top-1 (%), validation")
    ax.set_title("No fine-tune: calibration only, against ToMe")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(quick: bool, out_dir: Path) -> dict[str, Any]:
    """Entry point for ``python -m benchmarks`` (``no_finetune``): the CIFAR-10 ViT, every cascade and DGE."""
    return run_no_finetune(DEFAULT_BASE, out_dir, quick=quick, progress=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, default=DEFAULT_BASE, help="base model folder (timm local-dir)")
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES))
    parser.add_argument("--budget", default="50%")
    parser.add_argument("-o", "--out", type=Path, default=None, help="results folder (default benchmarks/results)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--quick", action="store_true", help="200 calibration / 500 validation images")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out or (RESULTS / "quick" if args.quick else RESULTS)
    result = run_no_finetune(args.base.resolve(), out, tuple(args.recipes), args.budget, args.quick)
    print(table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
