"""CIFAR-10 split and in-memory loading helpers for the vitconvert benchmarks.

Data layout: ``<root>/<class>/<NNNN>.jpg`` (ImageFolder), 10 classes, 5,000 JPEGs of
32x32 per class. Labels are the class folders in alphabetical order.

Split (deterministic, no randomness): for each class, file names are sorted; the
**last 500** files of each class form the validation split (5,000 images) and the
**first 4,500** form the training split (45,000 images). ``first_n_per_class`` takes
the first N training files of each class (the fine-tuning recipe uses N=1,000, i.e.
10,000 images).

Decoded images are cached as uint8 tensors (N x 3 x 32 x 32) under
``~/.cache/vitconvert/`` (override with ``$VITCONVERT_CACHE``), keyed by the data root
and the exact file list, so decoding (~30 s for all 50k) happens once.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ROOT = REPO_ROOT / ".." / "shared" / "data" / "cifar10" / "train"
CLASS_NAMES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
VAL_PER_CLASS = 500
IMG_EXTS = (".jpg", ".jpeg", ".png")

FileList = list[tuple[str, int]]


def resolve_root(root: str | os.PathLike[str] | None = None) -> Path:
    """Resolve a data root; relative paths are taken relative to the repo root, not the cwd."""
    path = Path(root) if root is not None else DEFAULT_ROOT
    if not path.is_absolute():
        path = REPO_ROOT / path
    return path.resolve()


def class_names(root: str | os.PathLike[str] | None = None) -> list[str]:
    """Class folder names under ``root``, sorted alphabetically (label order)."""
    base = resolve_root(root)
    return sorted(p.name for p in base.iterdir() if p.is_dir())


def split_files(
    root: str | os.PathLike[str] | None = None, val_per_class: int = VAL_PER_CLASS
) -> tuple[FileList, FileList]:
    """Split into ``(train, val)`` lists of ``(path, label)``; the last ``val_per_class`` per class are val."""
    base = resolve_root(root)
    train: FileList = []
    val: FileList = []
    for label, name in enumerate(class_names(base)):
        files = sorted(f for f in os.listdir(base / name) if f.lower().endswith(IMG_EXTS))
        if len(files) <= val_per_class:
            raise ValueError(f"class {name!r} has only {len(files)} files (need > {val_per_class})")
        paths = [(str(base / name / f), label) for f in files]
        train.extend(paths[:-val_per_class])
        val.extend(paths[-val_per_class:])
    return train, val


def first_n_per_class(files: Sequence[tuple[str, int]], n: int) -> FileList:
    """First ``n`` entries of each label, keeping the input order (e.g. 1,000/class of train)."""
    counts: dict[int, int] = {}
    out: FileList = []
    for path, label in files:
        if counts.get(label, 0) < n:
            out.append((path, label))
            counts[label] = counts.get(label, 0) + 1
    return out


def cache_dir() -> Path:
    """Directory for decoded-tensor caches (outside the repo)."""
    return Path(os.environ.get("VITCONVERT_CACHE", Path.home() / ".cache" / "vitconvert"))


def _cache_key(files: Sequence[tuple[str, int]]) -> str:
    h = hashlib.sha1()
    for path, label in files:
        h.update(f"{path}\t{label}\n".encode())
    return h.hexdigest()[:16]


def load_tensor(
    files: Sequence[tuple[str, int]], cache: bool = True, name: str = "cifar10"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode ``files`` with PIL into ``(uint8 N x 3 x H x W, int64 labels)``, cached on disk."""
    path = cache_dir() / f"{name}_{len(files)}_{_cache_key(files)}.pt"
    if cache and path.is_file():
        data = torch.load(path, weights_only=True)
        return data["images"], data["labels"]
    arrays = []
    for p, _ in files:
        with Image.open(p) as im:
            arrays.append(np.asarray(im.convert("RGB"), dtype=np.uint8))
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    labels = torch.tensor([label for _, label in files], dtype=torch.int64)
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save({"images": images, "labels": labels}, tmp)
        tmp.replace(path)
    return images, labels


def load_split(
    split: str, root: str | os.PathLike[str] | None = None, per_class: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load ``'train'`` or ``'val'`` as tensors; ``per_class`` keeps the first N per class."""
    train, val = split_files(root)
    files = {"train": train, "val": val}[split]
    if per_class is not None:
        files = first_n_per_class(files, per_class)
    return load_tensor(files, name=f"cifar10_{split}")


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 NCHW -> float32 normalised with the CIFAR-10 mean/std."""
    mean = torch.tensor(MEAN).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(STD).view(1, 3, 1, 1) * 255.0
    return (images.float() - mean) / std


def augment(images: torch.Tensor, generator: torch.Generator | None = None, pad: int = 4) -> torch.Tensor:
    """Random crop with ``pad`` px zero padding + horizontal flip, on a uint8/float NCHW batch."""
    n, _, h, w = images.shape
    padded = torch.nn.functional.pad(images, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    out = _crop(padded, dy, dx, h, w)
    flip = torch.rand(n, generator=generator) < 0.5
    out[flip] = out[flip].flip(3)
    return out


def _crop(padded: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, h: int, w: int) -> torch.Tensor:
    n, c, hp, wp = padded.shape
    rows = dy.view(n, 1, 1, 1) + torch.arange(h).view(1, 1, h, 1)
    cols = dx.view(n, 1, 1, 1) + torch.arange(w).view(1, 1, 1, w)
    idx = rows * wp + cols  # n x 1 x h x w
    flat = padded.reshape(n, c, hp * wp)
    return flat.gather(2, idx.reshape(n, 1, h * w).expand(n, c, h * w)).reshape(n, c, h, w)
