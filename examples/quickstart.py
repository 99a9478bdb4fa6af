"""Quickstart, offline: convert the CIFAR-10 DeiT shipped in benchmarks/checkpoints with CF-ViT and DGE,
check the exactness contract, run early-exit / sparse inference and round-trip through a folder.

Run from the repository root:  python examples/quickstart.py
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import timm
import torch

import vitconvert

ROOT = Path(__file__).resolve().parent.parent
BASE = f"local-dir:{ROOT / 'benchmarks' / 'checkpoints' / 'cifar10-vit'}"


def main() -> None:
    base = timm.create_model(BASE, pretrained=True).eval()
    images = torch.randn(16, 3, 32, 32)

    for recipe in ("cfvit", "dge"):
        model = vitconvert.apply(BASE, recipe)
        with torch.no_grad():
            exact = (model.full_compute()(images) - base(images)).abs().max().item()
            model.knob = 0.5  # CF-ViT: exit threshold eta; DGE: router coarsening
            out = model.forward_dynamic(images)
        print(f"{recipe}: full-compute max |diff| {exact:.2e}; at {model.knob_name}=0.5 mean GMACs "
              f"{out.gmacs.mean():.4f} of {model.base_gmacs:.4f}")
        with tempfile.TemporaryDirectory() as tmp:
            path = vitconvert.save(model, Path(tmp) / f"vit-{recipe}")
            again = vitconvert.load(path)
            with torch.no_grad():
                same = torch.equal(again.forward_dynamic(images).logits, out.logits)
            print(f"  saved to {path.name}: {sorted(p.name for p in path.iterdir())}; reload identical: {same}")


if __name__ == "__main__":
    main()
