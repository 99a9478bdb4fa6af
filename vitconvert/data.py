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

Other sources (:func:`open_data`) follow the same rules through one small interface,
:class:`LabelledSource` (length, labels, item loader, description, fingerprint):

* ``hfds/PATH``: a local Hugging Face dataset, saved with ``save_to_disk`` or as parquet files
  (``PATH/**/<split>-*.parquet``), needs the ``[hf]`` extra (``datasets``); its ``train`` split (or its only
  split) is the training set, ``validation`` (else ``test``) the evaluation set;
* a ``.tar`` file of ``<class>/<image>`` entries, or a folder of ``.tar`` shards (one per class, or each
  holding ``<class>/`` folders), read with timm's ``ReaderImageInTar``;
* a ``torch.utils.data.Dataset`` (or a ``DataLoader``, whose dataset is used) yielding ``(image, label)``.

Their held-out split is the last ``holdout`` share of each class *in index order* (the index order of
the source: sorted entry names for tars, row order for Hugging Face datasets), or of all indices when a
dataset's labels are not known without reading its items (it has no ``targets``/``labels``); train is the
rest; eval is the source's own validation split when it has one, else the held-out split.

Images are decoded once into memory when they are small (CIFAR-size folders decode in seconds and then
cost nothing per epoch); transforms are timm's own, from the model's pretrained config.

Why one module of this size (about 750 lines): every source is the same three splits under the same rules, and
the splitting, capping, fingerprinting and decoding are shared by all of them; split into per-source modules they
would have to import each other's rules.
"""

from __future__ import annotations

import abc
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

# (path or source item, label); label -1: known only once the item is read (see LabelledSource.labels).
FileList = list[tuple[Any, int]]

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

    @property
    def has_val(self) -> bool:
        """Whether evaluation has its own images (``val/``) rather than the held-out split."""
        return self.val_dir is not None

    def short(self, text: str) -> str:
        """``text`` with paths relative to the data folder's parent (no local paths on cards)."""
        return text.replace(str(self.root.parent) + os.sep, "")

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


class LabelledSource(abc.ABC):
    """A random-access labelled image collection: what every data source gives the pipeline.

    Attributes:
        key: Stable identity of the source (kind and location), part of every fingerprint.
        description: Where the images come from, in words (no split).
        classes: Class names in label order ([] when unknown).
        labels: Label of each index, or None when only reading the items tells (then held-out images are
            taken from the end of all indices rather than of each class).
    """

    key: str
    description: str
    classes: list[str]
    labels: list[int] | None

    @abc.abstractmethod
    def __len__(self) -> int:
        """Number of items."""

    @abc.abstractmethod
    def load(self, index: int) -> tuple[Image.Image | torch.Tensor, int]:
        """Item ``index`` as ``(image, label)``; a tensor image is taken as already transformed."""

    def fingerprint(self) -> str:
        """Hash of the source's identity, length and labels (resuming checks it is the same data)."""
        h = hashlib.sha1(f"{self.key}\t{len(self)}\n".encode())
        h.update(str(self.labels).encode())
        return h.hexdigest()[:16]


@dataclass(frozen=True)
class SourceItem:
    """Item ``index`` of a :class:`LabelledSource`, in a :class:`Split`'s file list instead of a path."""

    source: LabelledSource
    index: int

    def __str__(self) -> str:
        return f"{self.source.key}#{self.index}"

    def load(self) -> tuple[Image.Image | torch.Tensor, int]:
        image, label = self.source.load(self.index)
        if isinstance(image, Image.Image):
            image = image.convert("RGB")
        return image, int(label)


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
        self.labels = [label for _, label in self.files]
        if in_memory is None and self.files:
            w, h = _size(self.files[0][0])
            in_memory = w * h * 3 * len(self.files) <= IN_MEMORY_BYTES
        if in_memory:
            self.images = []
            for i, (path, _) in enumerate(self.files):
                self.images.append(_read(path) if not isinstance(path, SourceItem) else self._item(i))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.files)

    def _item(self, index: int) -> Image.Image | torch.Tensor:
        image, self.labels[index] = self.files[index][0].load()
        return image

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, _ = self.files[index]
        if self.images is not None:
            image = self.images[index]
        else:
            image = _read(path) if not isinstance(path, SourceItem) else self._item(index)
        label = self.labels[index]
        if isinstance(image, torch.Tensor):  # a user's dataset that applies its own transform
            return image, label
        if self.seed is None:
            return self.transform(image), label
        with _seeded(_sample_seed(self.seed, self.epoch, index), self.seed_numpy):
            return self.transform(image), label


def _size(path: Path | SourceItem) -> tuple[int, int]:
    if isinstance(path, SourceItem):
        image = path.load()[0]
        return (image.size if isinstance(image, Image.Image) else (image.shape[-1], image.shape[-2]))
    return _image_size(path)


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


# --- other sources: Hugging Face datasets, tar shards, a user's Dataset --------------------------------


HF_EXTRA = "pip install 'vitconvert[hf]'"


@dataclass
class SourceData:
    """A :class:`LabelledSource` (and optionally its validation source) with the same three splits as a folder.

    Attributes:
        train: The training source; its held-out share is taken per class (see the module docstring).
        val: The source's own validation split, if any.
        holdout: Share of each class (or of all indices when labels are unknown) held out for calibration.
        name: Dataset name recorded with calibration and evaluation results.
    """

    train: LabelledSource
    val: LabelledSource | None
    holdout: float
    name: str

    @property
    def classes(self) -> list[str]:
        return self.train.classes

    @property
    def has_val(self) -> bool:
        return self.val is not None

    def short(self, text: str) -> str:
        return text

    def _parts(self) -> tuple[list[list[int]], bool]:
        labels = self.train.labels
        if labels is None:  # labels unknown until read: one group of all indices
            return [list(range(len(self.train)))], False
        groups: dict[int, list[int]] = {}
        for i, label in enumerate(labels):
            groups.setdefault(int(label), []).append(i)
        return [groups[k] for k in sorted(groups)], True

    def _cut(self, indices: list[int]) -> int:
        n_hold = min(len(indices) - 1, max(1, round(self.holdout * len(indices))))
        return len(indices) - n_hold

    def _split(self, source: LabelledSource, parts: list[list[int]], max_images: int | None, what: str) -> Split:
        items = _take_evenly([[SourceItem(source, i) for i in part] for part in parts], max_images)  # type: ignore[misc]
        labels = source.labels
        files = [(item, labels[item.index] if labels is not None else -1) for item, _ in items]
        return Split(files, f"{source.description}: {what}, {len(files)} images" + _capped(max_images, files))

    def train_split(self, max_images: int | None = None) -> Split:
        """The training items: each class minus its held-out tail (index order)."""
        parts, per_class = self._parts()
        what = f"first {1 - self.holdout:.0%} of " + ("each class (index order)" if per_class else "all items")
        return self._split(self.train, [p[: self._cut(p)] for p in parts], max_images, what)

    def heldout_split(self, max_images: int | None = None) -> Split:
        """The held-out items: the last ``holdout`` share of each class (index order)."""
        parts, per_class = self._parts()
        what = f"held-out last {self.holdout:.0%} of " + ("each class (index order)" if per_class else "all items")
        return self._split(self.train, [p[self._cut(p):] for p in parts], max_images, what)

    def eval_split(self, max_images: int | None = None) -> Split:
        """The source's validation split when it has one, else the held-out split."""
        if self.val is None:
            return self.heldout_split(max_images)
        labels = self.val.labels
        if labels is None:
            parts = [list(range(len(self.val)))]
        else:
            groups: dict[int, list[int]] = {}
            for i, label in enumerate(labels):
                groups.setdefault(int(label), []).append(i)
            parts = [groups[k] for k in sorted(groups)]
        return self._split(self.val, parts, max_images, "validation split")

    def check_classes(self, num_classes: int) -> None:
        """Raise a UserError when the source's class count is known and does not match the model's head."""
        labels = self.train.labels
        known = len(self.classes) or (max(labels) + 1 if labels else 0)
        if known and known != num_classes:
            raise UserError(f"{self.train.description} has {known} classes but the model's head has {num_classes} "
                            "outputs; use data with one class per output of the model")
        if labels is not None and len(self.train) < 2:
            raise UserError(f"{self.train.description} has {len(self.train)} item(s); at least 2 are needed")


class TorchSource(LabelledSource):
    """A user's ``torch.utils.data.Dataset`` of ``(image, label)`` items (PIL images, or tensors already
    transformed). Labels are read from ``targets``/``labels`` (torchvision) or a timm ``ImageDataset``'s
    reader when present; otherwise they are known only when items are read.

    Args:
        dataset: The dataset; a ``DataLoader``'s ``dataset`` is used (vitconvert batches it itself).
    """

    def __init__(self, dataset: Any) -> None:
        if isinstance(dataset, torch.utils.data.DataLoader):
            dataset = dataset.dataset
        if isinstance(dataset, torch.utils.data.IterableDataset) or not hasattr(dataset, "__getitem__"):
            raise UserError(f"{type(dataset).__name__} is not a map-style Dataset (indexable, with a length); "
                            "vitconvert needs random access to draw its deterministic splits")
        self.dataset = dataset
        self.labels = _dataset_labels(dataset)
        self.classes = _dataset_classes(dataset)
        name = type(dataset).__name__
        self.description = f"{name} dataset of {len(dataset)} items"
        self.key = f"dataset:{type(dataset).__module__}.{name}"

    def __len__(self) -> int:
        return len(self.dataset)

    def load(self, index: int) -> tuple[Image.Image | torch.Tensor, int]:
        item = self.dataset[index]
        if not isinstance(item, tuple | list) or len(item) < 2:
            raise UserError(f"{type(self.dataset).__name__}[{index}] is not an (image, label) pair")
        image, label = item[0], item[1]
        if not isinstance(image, Image.Image | torch.Tensor):
            raise UserError(f"{type(self.dataset).__name__}[{index}] image is a {type(image).__name__}; expected a "
                            "PIL image or a transformed tensor")
        return image, int(label)


def _dataset_labels(dataset: Any) -> list[int] | None:
    for owner in (dataset, getattr(dataset, "reader", None)):
        if owner is None:
            continue
        for attr in ("targets", "labels"):
            values = getattr(owner, attr, None)
            if values is not None and len(values) == len(dataset):
                return [int(v) for v in values]
        samples = getattr(owner, "samples", None)
        if isinstance(samples, list) and len(samples) == len(dataset) and all(
                isinstance(x, tuple) and len(x) == 2 and isinstance(x[1], int) for x in samples[:1]):
            return [int(x[1]) for x in samples]
    return None


def _dataset_classes(dataset: Any) -> list[str]:
    classes = getattr(dataset, "classes", None)
    if isinstance(classes, list | tuple) and all(isinstance(c, str) for c in classes):
        return list(classes)
    for owner in (dataset, getattr(dataset, "reader", None)):
        mapping = getattr(owner, "class_to_idx", None) or getattr(owner, "class_name_to_idx", None)
        if isinstance(mapping, dict) and mapping:
            return [name for name, _ in sorted(mapping.items(), key=lambda kv: kv[1])]
    return []


class TarSource(LabelledSource):
    """A ``.tar`` of ``<class>/<image>`` entries or a folder of ``.tar`` shards, read by timm's ``ReaderImageInTar``
    (labels from the entries' folder names, or from each tar's name when a shard holds one class).

    Args:
        path: The ``.tar`` file or the folder of shards.
    """

    def __init__(self, path: Path) -> None:
        from timm.data.readers.reader_image_in_tar import ReaderImageInTar

        try:
            self.reader = ReaderImageInTar(str(path), cache_tarinfo=False)
        except (AssertionError, OSError, ValueError) as e:
            raise UserError(f"tar data {str(path)!r} could not be read ({type(e).__name__}: {e})") from None
        self.labels = [int(t) for t in self.reader.targets]
        self.classes = [name for name, _ in sorted(self.reader.class_name_to_idx.items(), key=lambda kv: kv[1])]
        self.description = f"{path.name} (tar)"
        self.key = f"tar:{path}"

    def __len__(self) -> int:
        return len(self.reader)

    def load(self, index: int) -> tuple[Image.Image, int]:
        fileobj, label = self.reader[index]
        try:
            with Image.open(fileobj) as im:
                return im.convert("RGB"), int(label)
        except OSError as e:
            raise UserError(f"{self.key}: entry {self.reader.filename(index)!r} could not be read ({e})") from None


class HfSource(LabelledSource):
    """One split of a Hugging Face ``datasets.Dataset``: its first ``Image`` column and its ``label`` column
    (or first ``ClassLabel``); labels and class names come from the columns without decoding images.

    Args:
        dataset: The ``datasets.Dataset``.
        key: Identity (path and split).
        description: Where it comes from.
    """

    def __init__(self, dataset: Any, key: str, description: str) -> None:
        import datasets

        features = dataset.features
        images = [k for k, f in features.items() if isinstance(f, datasets.Image)]
        classes = [k for k, f in features.items() if isinstance(f, datasets.ClassLabel)]
        label_col = "label" if "label" in features else (classes[0] if classes else None)
        if not images or label_col is None:
            raise UserError(f"{description}: needs an Image column and a label column (features: "
                            f"{', '.join(features)})")
        self.dataset = dataset
        self.image_col = images[0]
        self.label_col = label_col
        self.labels = [int(v) for v in dataset[label_col]]
        feature = features[label_col]
        self.classes = list(feature.names) if isinstance(feature, datasets.ClassLabel) else []
        self.key = key
        self.description = description

    def __len__(self) -> int:
        return len(self.dataset)

    def load(self, index: int) -> tuple[Image.Image, int]:
        row = self.dataset[index]
        return row[self.image_col], int(row[self.label_col])


_HF_VAL_SPLITS = ("validation", "valid", "val", "test")


def open_hfds(spec: str, holdout: float = 0.1, name: str | None = None) -> SourceData:
    """A local Hugging Face dataset given as ``hfds/PATH`` (``save_to_disk`` folder or parquet files).

    Args:
        spec: ``hfds/PATH``; ``hfds//abs/path`` for an absolute path.
        holdout: Share of each training class held out for calibration.
        name: Dataset name to record; default: the folder's name.

    Example:
        >>> d = open_hfds("hfds/data/cifar10-hf")  # doctest: +SKIP
    """
    try:
        import datasets
    except ImportError:
        raise UserError(f"hfds/ data needs the Hugging Face datasets package: {HF_EXTRA}") from None
    path = Path(spec.split("/", 1)[1]).expanduser()
    if not path.exists():
        raise UserError(f"{spec!r}: {str(path)!r} does not exist (hfds/ takes a local dataset folder)")
    path = path.resolve()
    try:
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            loaded = datasets.load_from_disk(str(path))
        else:
            files = sorted(path.rglob("*.parquet")) if path.is_dir() else [path]
            if not files or any(f.suffix != ".parquet" for f in files):
                raise UserError(f"{spec!r}: no dataset saved with save_to_disk and no .parquet files in {str(path)!r}")
            by_split: dict[str, list[str]] = {}
            for f in files:  # Hub layout: <split>-00000-of-00001.parquet (or <split>.parquet)
                split = f.name.split("-", 1)[0].split(".", 1)[0]
                by_split.setdefault(split if split in ("train", *_HF_VAL_SPLITS) else "train", []).append(str(f))
            loaded = datasets.load_dataset("parquet", data_files=by_split)
    except UserError:
        raise
    except Exception as e:  # datasets raises many types for unreadable folders
        raise UserError(f"{spec!r} could not be read as a Hugging Face dataset ({type(e).__name__}: {e})") from None
    label = name or path.name
    if isinstance(loaded, datasets.DatasetDict):
        splits = list(loaded)
        train_name = "train" if "train" in loaded else splits[0]
        val_name = next((s for s in _HF_VAL_SPLITS if s in loaded and s != train_name), None)
        train = HfSource(loaded[train_name], f"hfds:{path}:{train_name}", f"{label} ({train_name} split)")
        val = (HfSource(loaded[val_name], f"hfds:{path}:{val_name}", f"{label} ({val_name} split)")
               if val_name else None)
    else:
        train, val = HfSource(loaded, f"hfds:{path}", label), None
    return SourceData(train, val, holdout, label)


# What the pipeline's ``data`` arguments accept (see open_data).
DataArg = str | os.PathLike | torch.utils.data.Dataset | torch.utils.data.DataLoader | ImageFolderData | SourceData


def open_data(data: DataArg, holdout: float = 0.1, name: str | None = None) -> ImageFolderData | SourceData:
    """Open any data source the pipeline accepts, with its deterministic train / held-out / eval splits.

    Args:
        data: An image folder (see :func:`open_image_folder`), ``hfds/PATH``, a ``.tar`` file or a folder of
            ``.tar`` shards, a ``torch.utils.data.Dataset`` or ``DataLoader``, or an already opened source.
        holdout: Share of each class held out for calibration.
        name: Dataset name to record (for ``hfds/``, a Hub dataset id makes the card's ``datasets``).

    Example:
        >>> open_data("hfds/cifar10-parquet", holdout=0.1).eval_split()  # doctest: +SKIP
    """
    if isinstance(data, ImageFolderData | SourceData):
        return data
    if isinstance(data, torch.utils.data.Dataset | torch.utils.data.DataLoader):
        source = TorchSource(data)
        return SourceData(source, None, holdout, name or type(source.dataset).__name__)
    if isinstance(data, str) and data.lower().startswith("hfds/"):
        return open_hfds(data, holdout, name)
    if not isinstance(data, str | os.PathLike):
        raise UserError(f"data must be an image folder, hfds/PATH, a .tar, or a torch Dataset/DataLoader, not "
                        f"{type(data).__name__}")
    path = Path(data).expanduser()
    is_tar = path.is_file() and path.suffix.lower() == ".tar"
    shards = path.is_dir() and any(path.glob("*.tar")) and not any(
        p.is_dir() and not p.name.startswith(".") for p in path.iterdir())
    if is_tar or shards:
        source = TarSource(path.resolve())
        return SourceData(source, None, holdout, name or path.stem)
    return open_image_folder(data, holdout, name)


def spread_batch(files: Sequence[tuple[Any, int]], model: nn.Module, batch_size: int) -> torch.Tensor:
    """A batch of ``batch_size`` images spread evenly over a split's files (sorted by class, so every class is in
    it), decoded with ``model``'s evaluation transform: the real images speed checks time on (early exits depend on
    the images)."""
    n = len(files)
    idx = [round(i * (n - 1) / max(1, batch_size - 1)) for i in range(batch_size)] if n > 1 else [0] * batch_size
    ds = ImageDataset([files[i] for i in idx], eval_transform(model), in_memory=False)
    return torch.stack([ds[i][0] for i in range(len(ds))])

