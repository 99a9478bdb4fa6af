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
SIZE_OF = {"cifar10-pvt64": 64}  # the others take CIFAR's own 32 px


def test_checkpoints_exist() -> None:
    assert {p.name for p in CHECKPOINTS} >= {"cifar10-vit", "cifar10-pvt", "cifar10-pvt64", "cifar10-swin"}


@pytest.mark.parametrize("folder", CHECKPOINTS, ids=lambda p: p.name)
def test_checkpoint_converts_exactly(folder: Path) -> None:
    assert (folder / "model.safetensors").stat().st_size < 10 * 2**20
    base = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    size = SIZE_OF.get(folder.name, 32)
    assert base.pretrained_cfg["input_size"][1:] == (size, size) and base.num_classes == 10
    x = torch.randn(4, 3, size, size)
    for recipe in RECIPE_FOR[folder.name.split("-", 1)[1].rstrip("0123456789")]:
        model = vitconvert.apply(f"local-dir:{folder}", recipe).full_compute()
        with torch.no_grad():
            assert (model(x) - base(x)).abs().max().item() <= 1e-4
        assert model.base_spec.source == f"local-dir:{folder}"


def test_quickstart_example_runs(capsys) -> None:
    runpy.run_path(str(ROOT / "examples" / "quickstart.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "cfvit: full-compute max |diff| 0.00e+00" in out
    assert out.count("reload identical: True") == 2


def test_pvt64_base_starts_from_the_32px_one_and_upsamples_like_the_eval_transform() -> None:
    import numpy as np
    from PIL import Image

    from benchmarks import train_base

    spec = train_base.MODELS["cifar10-pvt64"]
    start = train_base.create(spec).state_dict()
    source = timm.create_model(f"local-dir:{ROOT / 'benchmarks/checkpoints/cifar10-pvt'}", pretrained=True).state_dict()
    assert start.keys() == source.keys() and all(torch.equal(start[k], source[k]) for k in start)
    # Training upsamples in torch; evaluation resizes with PIL (timm's transform): the same to uint8 rounding.
    torch.manual_seed(0)
    image = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8)
    ours = train_base.prepare(image, 64)
    pil = Image.fromarray(image[0].permute(1, 2, 0).numpy()).resize((64, 64), Image.BILINEAR)
    theirs = train_base.prepare(torch.from_numpy(np.array(pil)).permute(2, 0, 1)[None], 64)
    assert ours.shape == (1, 3, 64, 64)
    assert (ours - theirs).abs().max().item() <= 1.0 / (255 * min(train_base.cifar10.STD)) + 1e-6
    assert train_base.prepare(image, 32).shape == (1, 3, 32, 32)
