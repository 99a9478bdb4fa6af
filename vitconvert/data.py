"""Image folders for fine-tuning, calibration and evaluation.

A data folder is a torchvision-style ImageFolder, ``ROOT/<class>/<image>``, with classes in sorted
order, or ``ROOT/train/<class>/...`` plus an optional ``ROOT/val/<class>/...``. Three splits are drawn
from it, deterministically (no randomness, so every command sees the same images):

* **held-out**: the last ``holdout`` fraction (sorted by file name) of each class of the training folder;
  calibration chooses operating points on it, so they are never chosen on the images reported;
* **train**: the rest of the training folder; fine-tuning never sees held-out images;
* **eval**: ``ROOT/val`` when it exists, else the held-out split.

``max_images`` caps a split evenly across classes (the first files of each class), e.g. 10,000 images of
a 10-class folder are the first 1,000 of each class.

Images are decoded once into memory when they are small (CIFAR-size folders decode in seconds and then
cost nothing per epoch); transforms are timm's own, from the model's pretrained config.
"""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config
from timm.data.readers.img_extensions import get_img_extensions
from torch import nn

from vitconvert.errors import UserError, one_line

FileList = list[tuple[Path, int]]

# Decode everything up front when the whole split fits in this many bytes of RGB pixels.
IN_MEMORY_BYTES = 1 << 30


@dataclass
class Split:
    """A list of labelled image files and a sentence saying where they came from."""

    files: FileList
    description: str

    def __len__(self) -> int:
        return len(self.files)

    def fingerprint(self) -> str:
        """Hash of the exact file list and labels (resuming checks it is the same run)."""
        h = hashlib.sha1()
        for path, label in self.files:
            h.update(f"{path}\t{label}\n".encode())
        return h.hexdigest()[:16]


@dataclass
class ImageFolderData:
    """An image folder, its classes, and the deterministic train / held-out / eval splits.

    Attributes:
        root: The folder the user gave.
        train_dir: Where training classes are read from (``root`` or ``root/train``).
        val_dir: ``root/val`` when present.
        classes: Class folder names, sorted (label order).
        per_class: Image files of each class of ``train_dir``, sorted.
        holdout: Fraction of each training class held out for calibration.
        name: Dataset name recorded with calibration results.
    """

    root: Path
    train_dir: Path
    val_dir: Path | None
    classes: list[str]
    per_class: list[list[Path]]
    holdout: float
    name: str

    def _cut(self, files: list[Path]) -> int:
        # At least one image on each side, so every class is both trained on and calibrated on.
        n_hold = min(len(files) - 1, max(1, round(self.holdout * len(files))))
        return len(files) - n_hold

    def train_split(self, max_images: int | None = None) -> Split:
        """The training images: each class minus its held-out tail."""
        parts = [files[: self._cut(files)] for files in self.per_class]
        files = _take_evenly(parts, max_images)
        return Split(files, f"{self.train_dir}: first {1 - self.holdout:.0%} of each class "
                            f"(sorted), {len(files)} images" + _capped(max_images, files))

    def heldout_split(self, max_images: int | None = None) -> Split:
        """The held-out training images: the last ``holdout`` fraction of each class (sorted)."""
        parts = [files[self._cut(files):] for files in self.per_class]
        files = _take_evenly(parts, max_images)
        return Split(files, f"{self.train_dir}: held-out last {self.holdout:.0%} of each class "
                            f"(sorted), {len(files)} images" + _capped(max_images, files))

    def eval_split(self, max_images: int | None = None) -> Split:
        """``val/`` when present, else the held-out split."""
        if self.val_dir is None:
            return self.heldout_split(max_images)
        parts = _list_classes(self.val_dir, self.classes)
        files = _take_evenly(parts, max_images)
        return Split(files, f"{self.val_dir} (validation folder), {len(files)} images"
                            + _capped(max_images, files))

    def check_classes(self, num_classes: int) -> None:
        """Raise a UserError when the folder's class count does not match the model's head."""
        if len(self.classes) != num_classes:
            raise UserError(
                f"{str(self.train_dir)!r} has {len(self.classes)} class folders but the model's head has "
                f"{num_classes} outputs; use a folder with one subfolder per class of the model"
            )


def open_image_folder(data: str | os.PathLike[str] | ImageFolderData, holdout: float = 0.1,
                      name: str | None = None) -> ImageFolderData:
    """Read an image folder's layout (file names only; nothing is decoded).

    Args:
        data: ``ROOT`` with one subfolder per class, or ``ROOT`` with ``train/`` (and optionally ``val/``).
        holdout: Fraction of each training class held out for calibration.
        name: Dataset name to record; default: the folder's name (its parent's for ``.../train``).

    Example:
        >>> d = open_image_folder("cifar10", holdout=0.1)  # doctest: +SKIP
        >>> len(d.train_split(10_000))                      # doctest: +SKIP
        10000
    """
    if isinstance(data, ImageFolderData):
        return data
    root = Path(data).expanduser()
    if not root.exists():
        raise UserError(f"data folder {str(data)!r} does not exist")
    if not root.is_dir():
        raise UserError(f"data {str(data)!r} is not a folder; expected ROOT/<class>/<image> (an ImageFolder)")
    root = root.resolve()
    train_dir, val_dir = root, None
    if (root / "train").is_dir():
        train_dir = root / "train"
        if (root / "val").is_dir():
            val_dir = root / "val"
    classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise UserError(f"data folder {str(train_dir)!r} has no class subfolders; expected "
                        f"{train_dir}/<class>/<image>.jpg (an ImageFolder)")
    per_class = _list_classes(train_dir, classes)
    for cls, files in zip(classes, per_class, strict=True):
        if len(files) < 2:
            raise UserError(f"class folder {str(train_dir / cls)!r} has {len(files)} image(s); each class needs "
                            "at least 2 (some are held out for calibration)")
    if name is None:
        name = root.parent.name if root.name in ("train", "training") else root.name
    return ImageFolderData(root, train_dir, val_dir, classes, per_class, holdout, name)


def _list_classes(folder: Path, classes: Sequence[str]) -> list[list[Path]]:
    found = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if list(found) != list(classes):
        missing = sorted(set(classes) - set(found))
        extra = sorted(set(found) - set(classes))
        raise UserError(f"{str(folder)!r} does not have the training classes (missing: {missing[:5]}, "
                        f"extra: {extra[:5]})")
    exts = get_img_extensions()
    out = []
    for cls in classes:
        files = []
        for dirpath, dirnames, filenames in os.walk(folder / cls, followlinks=True):
            dirnames.sort()
            files += [Path(dirpath) / f for f in filenames if f.lower().endswith(exts) and not f.startswith(".")]
        if not files:
            raise UserError(f"class folder {str(folder / cls)!r} has no images ({', '.join(exts)})")
        out.append(sorted(files, key=lambda p: str(p.relative_to(folder / cls))))
    return out


def _take_evenly(parts: list[list[Path]], max_images: int | None) -> FileList:
    """All files (label order), or at most ``max_images`` taken round-robin so classes stay balanced."""
    if max_images is None or max_images >= sum(len(p) for p in parts):
        return [(f, label) for label, files in enumerate(parts) for f in files]
    if max_images < 1:
        raise UserError(f"max_images must be >= 1, got {max_images}")
    taken = [0] * len(parts)
    remaining = max_images
    while remaining:
        for label, files in enumerate(parts):
            if remaining and taken[label] < len(files):
                taken[label] += 1
                remaining -= 1
    return [(f, label) for label, files in enumerate(parts) for f in files[: taken[label]]]


def _capped(max_images: int | None, files: FileList) -> str:
    return f" (capped at max_images={max_images})" if max_images is not None and len(files) >= max_images else ""


# --- transforms and datasets --------------------------------------------------------------------------


def data_config(model: nn.Module) -> dict[str, Any]:
    """timm's data config (input size, interpolation, crop, mean/std) from the model's pretrained config."""
    return resolve_data_config(model=model)


def eval_transform(model: nn.Module) -> Callable[[Image.Image], torch.Tensor]:
    """timm's evaluation transform for ``model`` (resize, center crop, normalise)."""
    return create_transform(**data_config(model), is_training=False)


# create_transform arguments a recipe may set (the data config's own keys come from the model).
AUGMENT_KEYS = ("no_aug", "scale", "ratio", "hflip", "vflip", "color_jitter", "color_jitter_prob", "grayscale_prob",
                "gaussian_blur_prob", "auto_augment", "re_prob", "re_mode", "re_count", "train_crop_mode")


def train_transform(model: nn.Module, **augment: Any) -> Callable[[Image.Image], torch.Tensor]:
    """timm's training transform for ``model`` (random resized crop, flip, colour jitter, normalise).

    Args:
        model: Supplies the data config (size, interpolation, mean/std).
        augment: timm ``create_transform`` arguments (``scale``, ``color_jitter``, ``auto_augment``, ...).
    """
    unknown = sorted(set(augment) - set(AUGMENT_KEYS))
    if unknown:
        raise UserError(f"recipe finetune.augment: unknown keys {unknown} (allowed: {', '.join(AUGMENT_KEYS)})")
    args = {k: tuple(v) if isinstance(v, list) else v for k, v in augment.items()}
    try:
        return create_transform(**data_config(model), is_training=True, **args)
    except (TypeError, ValueError, AssertionError) as e:
        raise UserError(f"recipe finetune.augment: {e}") from None


class ImageDataset(torch.utils.data.Dataset):
    """Labelled images with a transform; optionally decoded into memory and deterministically augmented.

    With ``seed`` set, the random transform of sample ``i`` in epoch ``e`` is seeded from
    ``(seed, e, i)`` alone. Augmentation then does not depend on the number of data workers, on the
    number of data-parallel processes, or on where an interrupted run resumed.

    Args:
        files: ``(path, label)`` pairs.
        transform: PIL image -> tensor.
        seed: Seed for per-sample augmentation (None: use the global random state).
        in_memory: Decode all images now; default: when they fit in :data:`IN_MEMORY_BYTES`.
        seed_numpy: Also seed numpy per sample (transforms that draw from it: RandAugment, AugMix).
    """

    def __init__(self, files: FileList, transform: Callable[[Image.Image], torch.Tensor], seed: int | None = None,
                 in_memory: bool | None = None, seed_numpy: bool = False) -> None:
        self.files = list(files)
        self.transform = transform
        self.seed = seed
        self.seed_numpy = seed_numpy
        self.epoch = 0
        self.images: list[Image.Image] | None = None
        if in_memory is None and self.files:
            w, h = _image_size(self.files[0][0])
            in_memory = w * h * 3 * len(self.files) <= IN_MEMORY_BYTES
        if in_memory:
            self.images = [_read(p) for p, _ in self.files]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.files[index]
        image = self.images[index] if self.images is not None else _read(path)
        if self.seed is None:
            return self.transform(image), label
        with _seeded(_sample_seed(self.seed, self.epoch, index), self.seed_numpy):
            return self.transform(image), label


# What PIL raises for a file that is not a readable image (UnidentifiedImageError is an OSError; truncated or
# malformed files also raise ValueError or SyntaxError; oversized ones DecompressionBombError).
_PIL_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def _read(path: Path) -> Image.Image:
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except _PIL_ERRORS as e:
        raise UserError(f"image {str(path)!r} could not be read ({one_line(e)}); remove or replace it") from None


def _image_size(path: Path) -> tuple[int, int]:
    try:
        with Image.open(path) as im:
            return im.size
    except _PIL_ERRORS as e:
        raise UserError(f"image {str(path)!r} could not be read ({one_line(e)}); remove or replace it") from None


def _sample_seed(seed: int, epoch: int, index: int) -> int:
    digest = hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


class _seeded:
    """Seed python's and torch's CPU random state from one number, restoring both afterwards.

    timm's and torchvision's transforms draw from these two; numpy only in RandAugment/AugMix, so its
    state (~100x dearer to save and restore) is handled only when ``numpy`` is set.
    """

    def __init__(self, seed: int, numpy: bool = False) -> None:
        self.seed = seed
        self.numpy = numpy

    def __enter__(self) -> None:
        self.state = (random.getstate(), torch.get_rng_state(), np.random.get_state() if self.numpy else None)
        random.seed(self.seed)
        # The CPU generator alone: torch.manual_seed would also reseed every CUDA device (~100x slower).
        torch.default_generator.manual_seed(self.seed)
        if self.numpy:
            np.random.seed(self.seed % (1 << 32))

    def __exit__(self, *exc: object) -> None:
        random.setstate(self.state[0])
        torch.set_rng_state(self.state[1])
        if self.state[2] is not None:
            np.random.set_state(self.state[2])


def loader(dataset: torch.utils.data.Dataset, batch_size: int, workers: int = 0,
           sampler: torch.utils.data.Sampler | None = None, pin_memory: bool = False
           ) -> torch.utils.data.DataLoader:
    """A DataLoader in dataset order (or ``sampler``'s), keeping a last partial batch."""
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler, shuffle=False,
                                       num_workers=workers, pin_memory=pin_memory, drop_last=False,
                                       persistent_workers=False)


def batches(split: Split, model: nn.Module, batch_size: int, workers: int = 0
            ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Evaluation batches ``(images, labels)`` of a split, with the model's eval transform, in order."""
    ds = ImageDataset(split.files, eval_transform(model))
    yield from loader(ds, batch_size, workers)
