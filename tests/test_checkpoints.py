"""The CIFAR-10 base checkpoints the project ships: loadable timm folders, small, and convertible exactly."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest
import timm
import torch

import vitconvert

ROOT = Path(__file__).resolve().parent.parent
CHECKPOINTS = sorted((ROOT / "benchmarks" / "checkpoints").glob("cifar10-*"))
RECIPE_FOR = {"vit": ["cfvit", "dge"], "pvt": ["dge"], "swin": []}


def test_checkpoints_exist() -> None:
    assert {p.name for p in CHECKPOINTS} >= {"cifar10-vit", "cifar10-pvt"}


@pytest.mark.parametrize("folder", CHECKPOINTS, ids=lambda p: p.name)
def test_checkpoint_converts_exactly(folder: Path) -> None:
    assert (folder / "model.safetensors").stat().st_size < 10 * 2**20
    base = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    assert base.pretrained_cfg["input_size"][1:] == (32, 32) and base.num_classes == 10
    x = torch.randn(4, 3, 32, 32)
    for recipe in RECIPE_FOR[folder.name.split("-", 1)[1]]:
        model = vitconvert.apply(f"local-dir:{folder}", recipe).full_compute()
        with torch.no_grad():
            assert (model(x) - base(x)).abs().max().item() <= 1e-4
        assert model.base_spec.source == f"local-dir:{folder}"


def test_quickstart_example_runs(capsys) -> None:
    runpy.run_path(str(ROOT / "examples" / "quickstart.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "cfvit: full-compute max |diff| 0.00e+00" in out
    assert out.count("reload identical: True") == 2
