"""FSLA replace without fine-tuning: CIFAR-10 top-1 of clustered attention against dense attention at the same
upsampled resolution, on the project's CIFAR ViT (a diagnostic next to ``cifar10_short_recipe``'s fine-tuned run).

The 32-px CIFAR ViT (``benchmarks/checkpoints/cifar10-vit``, 8x8 patch tokens) is run at ``--size`` pixels
(position embeddings resampled; 64 px = 16x16 = 256 patch tokens + the class token) with recipe
``fsla_replace`` and ``clustering_overhead=0`` (so every cluster size really clusters), on the first
``--per-class`` validation images of each class (the validation split of :mod:`benchmarks.cifar10`). Rows:
the dense model at that size (cluster size 0), each cluster size, and the base model at its own 32 px.

Usage: ``python -m benchmarks.studies.fsla_zero_shot [--size 64] [--per-class 50]`` (about a minute on one thread;
writes ``benchmarks/results/fsla_cifar10_zero_shot.json``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import timm
import torch

import vitconvert
from benchmarks import cifar10
from benchmarks.common import CHECKPOINTS, RESULTS, machine_block
from vitconvert.data import ImageDataset, eval_transform
from vitconvert.layers.costs import model_gmacs

BASE = CHECKPOINTS / "cifar10-vit"
SIZES = (0, 128, 64, 32, 16)


def _top1(model: torch.nn.Module, files: list[tuple[str, int]]) -> float:
    ds = ImageDataset(files, eval_transform(model), in_memory=False)
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    y = torch.tensor([label for _, label in files])
    with torch.no_grad():
        pred = torch.cat([model(x[i:i + 100]).argmax(-1) for i in range(0, len(x), 100)])
    return float((pred == y).float().mean()) * 100


def run(size: int, per_class: int, out: Path) -> dict:
    _, val = cifar10.split_files()
    seen: dict[int, int] = {}
    files = []
    for path, label in val:
        if seen.get(label, 0) < per_class:
            seen[label] = seen.get(label, 0) + 1
            files.append((str(path), label))
    model = vitconvert.apply(f"local-dir:{BASE}", "fsla_replace",
                             overrides=[f"model.img_size={size}", "model.clustering_overhead=0"])
    rows = []
    for cs in SIZES:
        model.set_operating_point(cluster_size=cs)
        t = time.perf_counter()
        rows.append({"cluster_size": cs, "img_size": size, "top1": _top1(model, files), "gmacs": model.gmacs_at(),
                     "seconds": round(time.perf_counter() - t, 1)})
    base = timm.create_model(f"local-dir:{BASE}", pretrained=True).eval()
    rows.append({"cluster_size": None, "img_size": 32, "top1": _top1(base, files), "gmacs": model_gmacs(base, (32, 32)),
                 "note": "the base model at its own 32 px"})
    result = {"benchmark": "fsla_zero_shot", "base": "benchmarks/checkpoints/cifar10-vit", "images": len(files),
              "fine_tuned": False, "rows": rows, "threads": torch.get_num_threads(), "machine": machine_block()}
    out.mkdir(parents=True, exist_ok=True)
    (out / "fsla_cifar10_zero_shot.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--per-class", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for row in run(args.size, args.per_class, args.out)["rows"]:
        print(row)
