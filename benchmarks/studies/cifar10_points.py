"""Validation top-1 of a fine-tuned model at chosen operating points (CIFAR-10), e.g. its full-compute path.

The short-recipe run (``python -m benchmarks.cifar10_short_recipe --work DIR``) keeps its fine-tuned model in
``DIR/finetuned``; this script measures that model on the same validation split (the last 500 files of each
class) at the points given, for the comparison the guide asks for when a fine-tune with labels lifts a weak
base: the converted model against the same fine-tune's dense path (FSLA replace: ``cluster_size=0``; DGE:
``coarsening=0``). It measures accuracy and counted GMACs only, no speed.

Usage (from the repo root)::

    python -m benchmarks.studies.cifar10_points DIR/finetuned --point cluster_size=0 --point cluster_size=32 \\
        -o benchmarks/results/cifar10_fsla_replace_points.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

if __package__ in (None, ""):  # allow `python benchmarks/studies/cifar10_points.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import vitconvert
from benchmarks import cifar10
from benchmarks.common import machine_block
from vitconvert.data import ImageDataset, eval_transform
from vitconvert.session import Tally


def parse_point(text: str) -> dict[str, float]:
    """``"cluster_size=0,alpha=0.5"`` -> ``{"cluster_size": 0.0, "alpha": 0.5}``."""
    point = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        if not sep:
            raise SystemExit(f"--point {text!r}: write KNOB=VALUE[,KNOB=VALUE]")
        point[name.strip()] = float(value)
    return point


def measure(model_dir: Path, points: list[dict[str, float]], batch_size: int = 100) -> list[dict[str, Any]]:
    """Top-1, top-5 and mean counted GMACs on the CIFAR-10 validation split at each point."""
    model = vitconvert.load(model_dir).eval()
    _, val = cifar10.split_files()
    loader = DataLoader(ImageDataset(val, eval_transform(model), in_memory=False), batch_size=batch_size)
    rows = []
    for point in points:
        model.set_operating_point(point)
        tally = Tally()
        with torch.no_grad():
            for images, labels in loader:
                tally.add(model.forward_dynamic(images), labels)
        rows.append({"point": point, "top1": tally.top1, "top5": tally.top5, "gmacs": tally.mean_gmacs,
                     "images": len(val)})
        print(rows[-1], flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="a fine-tuned model folder")
    parser.add_argument("--point", action="append", required=True, help="KNOB=VALUE[,KNOB=VALUE] (repeatable)")
    parser.add_argument("-o", "--out", type=Path, required=True, help="JSON file to write")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    rows = measure(args.model, [parse_point(p) for p in args.point])
    result = {"benchmark": "cifar10_points", "machine": machine_block(),
              "split": "cifar10 validation: the last 500 files of each class (5,000 images)", "rows": rows}
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
