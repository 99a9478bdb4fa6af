"""Data sources besides image folders (hfds/ save_to_disk and parquet, tar shards, a user's Dataset/DataLoader),
their held-out rules, and the top-level Python pipeline on them."""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from utils import TINY_MODELS

import vitconvert
from vitconvert.data import SourceData, open_data, open_image_folder
from vitconvert.errors import UserError

CLASSES, PER_CLASS, VAL = 3, 6, 2
NAMES = [f"c{c}" for c in range(CLASSES)]


pytestmark = pytest.mark.usefixtures("one_thread")


def _image(c: int, i: int) -> Image.Image:
    rng = np.random.default_rng(100 * c + i)
    base = np.array([c * 80, 255 - c * 80, 128], dtype=np.float64)
    return Image.fromarray(np.clip(base + rng.normal(0, 30, (32, 32, 3)), 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path | str]:
    """The same images as an image folder (train/ + val/), hfds save_to_disk, hfds parquet and a tar."""
    datasets = pytest.importorskip("datasets")
    root = tmp_path_factory.mktemp("sources")
    rows: dict[str, dict[str, list]] = {"train": {"image": [], "label": []}, "validation": {"image": [], "label": []}}
    tar_path = root / "shards.tar"
    with tarfile.open(tar_path, "w") as tar:
        for split, n, offset in (("train", PER_CLASS, 0), ("validation", VAL, 50)):
            for c in range(CLASSES):
                for i in range(n):
                    img = _image(c, offset + i)
                    folder = root / "folder" / ("train" if split == "train" else "val") / NAMES[c]
                    folder.mkdir(parents=True, exist_ok=True)
                    img.save(folder / f"{i:03d}.png")
                    rows[split]["image"].append(img)
                    rows[split]["label"].append(c)
                    if split == "train":
                        buf = io.BytesIO()
                        img.save(buf, format="PNG")
                        info = tarfile.TarInfo(f"{NAMES[c]}/{i:03d}.png")
                        info.size = len(buf.getvalue())
                        tar.addfile(info, io.BytesIO(buf.getvalue()))
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=NAMES)})
    dd = datasets.DatasetDict({k: datasets.Dataset.from_dict(v, features=features) for k, v in rows.items()})
    dd.save_to_disk(str(root / "saved"))
    (root / "parquet" / "data").mkdir(parents=True)
    for split, ds in dd.items():
        ds.to_parquet(str(root / "parquet" / "data" / f"{split}-00000-of-00001.parquet"))
    return {"folder": root / "folder", "saved": f"hfds/{root / 'saved'}", "parquet": f"hfds/{root / 'parquet'}",
            "tar": tar_path}


def _pixels(split_files: list) -> list[tuple[int, bytes]]:
    out = []
    for item, label in split_files:
        if isinstance(item, Path):
            with Image.open(item) as im:
                out.append((label, im.convert("RGB").tobytes()))
        else:
            image, real = item.load()
            out.append((real, image.tobytes()))
    return out


@pytest.mark.parametrize("kind", ["saved", "parquet", "tar"])
def test_every_source_draws_the_folder_splits(sources: dict, kind: str) -> None:
    folder = open_image_folder(sources["folder"], holdout=0.34)
    data = open_data(str(sources[kind]), holdout=0.34)
    assert isinstance(data, SourceData) and data.classes == NAMES
    data.check_classes(CLASSES)
    with pytest.raises(UserError, match="has 3 classes but the model's head has 10"):
        data.check_classes(10)
    # The same images in the same order: held out = the last 2 of each class, train = the first 4.
    assert _pixels(data.heldout_split().files) == _pixels(folder.heldout_split().files)
    assert _pixels(data.train_split().files) == _pixels(folder.train_split().files)
    assert _pixels(data.train_split(3).files) == _pixels(folder.train_split(3).files)
    if kind == "tar":  # a tar holds one split: evaluation uses the held-out images
        assert not data.has_val and data.eval_split().files == data.heldout_split().files
    else:
        assert data.has_val and _pixels(data.eval_split().files) == _pixels(folder.eval_split().files)
    assert data.train_split().fingerprint() == open_data(str(sources[kind]), holdout=0.34).train_split().fingerprint()


class _Unlabelled(torch.utils.data.Dataset):
    """A user's dataset with no targets attribute: labels are known only by reading items."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        return _image(i % CLASSES, i), i % CLASSES


class _Stream(torch.utils.data.IterableDataset):
    def __iter__(self) -> Iterator[tuple[Image.Image, int]]:
        yield _image(0, 0), 0


def test_user_datasets_and_loaders(sources: dict) -> None:
    from torchvision.datasets import ImageFolder

    folder = open_image_folder(sources["folder"] / "train", holdout=0.34)
    tv = ImageFolder(str(sources["folder"] / "train"))
    for given in (tv, torch.utils.data.DataLoader(tv, batch_size=4, shuffle=True)):
        data = open_data(given, holdout=0.34)
        assert data.classes == NAMES and data.name == "ImageFolder"
        assert _pixels(data.heldout_split().files) == _pixels(folder.heldout_split().files)
    # Labels unknown up front: the last third of all indices is held out.
    data = open_data(_Unlabelled(9), holdout=0.34)
    assert [i.index for i, _ in data.heldout_split().files] == [6, 7, 8]
    assert [label for _, label in data.train_split().files] == [-1] * 6
    with pytest.raises(UserError, match="not a map-style Dataset"):
        open_data(_Stream())
    with pytest.raises(UserError, match=r"could not be read as a Hugging Face dataset|no dataset saved"):
        open_data(f"hfds/{sources['folder']}")


def test_missing_datasets_package_names_the_extra(monkeypatch: pytest.MonkeyPatch, sources: dict) -> None:
    import builtins

    real = builtins.__import__

    def no_datasets(name: str, *args, **kwargs):
        if name == "datasets":
            raise ImportError("no datasets")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    with pytest.raises(UserError, match=r"needs the Hugging Face datasets package: pip install 'vitconvert\[hf\]'"):
        open_data(str(sources["saved"]))


def test_python_pipeline_on_each_kind_of_data(sources: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import vitconvert.evaluation as evaluation

    monkeypatch.setattr(evaluation, "THROUGHPUT_SECONDS", 0.1)
    arch, kwargs = TINY_MODELS["vit"]
    recipe = ["model.gca_start_block=1", "finetune.batch_size=4", "finetune.epochs=1", "calibrate.holdout=0.34"]
    model = vitconvert.apply(arch, "cfvit", model_kwargs={**kwargs, "num_classes": CLASSES}, pretrained=False,
                             overrides=recipe)
    loader = torch.utils.data.DataLoader(_Unlabelled(12), batch_size=4)
    out = vitconvert.finetune(model, loader, tmp_path / "ft", device="cpu", progress=False)
    assert model.finetuned and (out / "train_log.json").is_file()
    result = vitconvert.calibrate(out, str(sources["parquet"]), "60%", device="cpu", progress=False)
    assert result["dataset"] == "parquet" and result["images"] == 6
    report = vitconvert.evaluate(out, sources["tar"], device="cpu", progress=False, batch_size=4)
    assert report["split"] == "held-out" and report["images"] == 6
    assert report["throughput"]["converted_images_per_s"] > 0
    loaded = vitconvert.load(out)
    assert loaded.calibration["dataset"] == "parquet" and (out / "eval.json").is_file()
