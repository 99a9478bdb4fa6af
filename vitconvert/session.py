"""What the pipeline steps share: the model a step works on, its original, the device, progress and tallies.

:func:`vitconvert.finetune`, :func:`vitconvert.calibrate` and :func:`vitconvert.evaluate` stand side by side on this
module (none imports another): each opens a :class:`Session` on the model it was given (a folder, ``local-dir:``,
``hf-hub:`` or a converted model), asks it for the original model when it needs one (the teacher, the reference
accuracy, the speed baseline), moves the models to the device for the work and back afterwards, shows progress with
:class:`ProgressBar` and counts accuracy with :class:`Tally`.
"""

from __future__ import annotations

import contextlib
import copy
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitconvert.errors import UserError
from vitconvert.methods.base import ConvertedModel, DynamicOutput
from vitconvert.operating import CurvePoint, OperatingPoint
from vitconvert.saving import load, save
from vitconvert.sources import load_base, load_checkpoint_file, load_state_dict_checked

# Files of a model folder that describe the model itself; anything else (logs, plots) is carried over.
MODEL_FILES = ("model.safetensors", "config.json", "README.md")


# --- the model, its original, the device -------------------------------------------------------------------


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` as a torch.device; default: the first CUDA device if there is one, else the CPU."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UserError(f"device {device!r} is not understood (use cpu, cuda or cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {device!r} requested but CUDA is not available here")
    return dev


def resolve_model(model: str | os.PathLike[str] | ConvertedModel) -> tuple[ConvertedModel, Path | None]:
    """A converted model and the local folder it was loaded from (None for Hub ids and in-memory models)."""
    if isinstance(model, ConvertedModel):
        return model, None
    if not isinstance(model, str | os.PathLike):
        raise UserError(f"expected a converted model, a model folder or hf-hub:OWNER/NAME, got {type(model).__name__}")
    text = str(model)
    loaded = load(text)
    if text.startswith("hf-hub:"):
        return loaded, None
    folder = Path(text[len("local-dir:"):] if text.startswith("local-dir:") else text).expanduser().resolve()
    return loaded, folder


def original_model(model: ConvertedModel, teacher: str | os.PathLike[str] | nn.Module | None = None
                   ) -> tuple[nn.Module, str]:
    """The original base model (the teacher, and the reference accuracy), with a description of where it came from.

    Before fine-tuning the converted model still holds the original weights; afterwards they are rebuilt
    from ``model.base_spec`` (its source and checkpoint), or taken from ``teacher`` (a weights file for
    the base architecture, a timm name, ``hf-hub:`` or ``local-dir:``, or the module itself). A model
    converted from an in-memory module (empty ``source``) cannot be rebuilt once fine-tuned.
    """
    spec = model.base_spec
    if isinstance(teacher, nn.Module):
        # A copy: the pipeline moves the teacher between devices and freezes it; the caller's module stays as it is.
        base, desc = copy.deepcopy(teacher), f"{spec.architecture} module given as teacher"
    elif teacher is not None:
        path = Path(teacher).expanduser()
        if path.is_file():
            base = spec.build()
            load_state_dict_checked(base, load_checkpoint_file(path), f"teacher {str(path)!r}")
            desc = f"{spec.architecture} with weights {path}"
        else:
            name = f"local-dir:{path}" if path.is_dir() else str(teacher)
            base, _ = load_base(name, pretrained=True)
            desc = name
    elif not model.finetuned:
        return model.build_base(), f"{spec.source or spec.architecture} (the base weights the model holds)"
    else:
        if not spec.source and spec.checkpoint is None:
            raise UserError(
                "the model is fine-tuned and was converted from an in-memory module, so the original cannot be "
                "rebuilt; pass that module (or its weights file) as teacher"
            )
        if not spec.pretrained:
            raise UserError(
                "the model is fine-tuned and its base model had random weights, so the original cannot be rebuilt; "
                "pass a teacher (weights file or model name)"
            )
        source = spec.source or spec.architecture
        base, _ = load_base(source, spec.checkpoint, spec.model_args, pretrained=True)
        desc = source + (f" + checkpoint {spec.checkpoint}" if spec.checkpoint else "")
    num_classes = getattr(base, "num_classes", None)
    if num_classes != model.num_classes:
        raise UserError(f"the original model {desc} has {num_classes} classes, the converted model "
                        f"{model.num_classes}")
    return base.eval(), desc


def carried_files(folder: Path | None, skip: tuple[str, ...] = ()) -> dict[str, bytes]:
    """Files of a model folder other than the model itself (logs, plots), to keep when it is rewritten."""
    if folder is None or not folder.is_dir():
        return {}
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())
            if p.is_file() and p.name not in MODEL_FILES and p.name not in skip}


@dataclass
class Session:
    """One pipeline step's working state.

    Attributes:
        model: The converted model the step works on (loaded from ``folder``, or the caller's own).
        folder: The local folder it came from; None for Hub ids and in-memory models.
        device: Where the work runs.
        progress: Whether progress bars are shown.
    """

    model: ConvertedModel
    folder: Path | None
    device: torch.device
    progress: bool = True
    _original: tuple[nn.Module | None, str] | None = field(default=None, init=False, repr=False)

    @classmethod
    def open(cls, model: str | os.PathLike[str] | ConvertedModel, device: str | torch.device | None = None,
             progress: bool = True) -> Session:
        """Resolve the model argument and the device (a bad one is a one-line UserError)."""
        converted, folder = resolve_model(model)
        return cls(converted, folder, resolve_device(device), progress)

    def original(self, teacher: str | os.PathLike[str] | nn.Module | None = None) -> tuple[nn.Module, str]:
        """The original base model and where it came from (:func:`original_model`); raises when it cannot be had."""
        return original_model(self.model, teacher)

    def original_if_any(self) -> tuple[nn.Module | None, str]:
        """The original base model, or None with the reason as its description (what reports then show). Built once
        per session: calibration and evaluation ask for it in several phases."""
        if self._original is None:
            try:
                self._original = self.original()
            except UserError as e:
                self._original = (None, f"not measured: {e}")
        return self._original

    @contextlib.contextmanager
    def on_device(self, *others: nn.Module | None) -> Iterator[None]:
        """The model (in eval mode) and ``others`` on the session's device for the work, back on the CPU after it,
        also when the work fails (a folder's model is reused by the caller)."""
        modules = [m for m in (self.model, *others) if m is not None]
        for m in modules:
            m.to(self.device).eval()
        try:
            yield
        finally:
            for m in modules:
                m.to("cpu")

    def bar(self, description: str, total: int, fields: tuple[str, ...] = ()) -> ProgressBar:
        return ProgressBar(description, total, self.progress, fields)

    def write(self, out: Path, skip: tuple[str, ...] = (), extra: dict[str, Any] | None = None) -> Path:
        """Save the model to ``out`` (atomically), carrying over the folder's other files except ``skip`` (results the
        step made stale), with ``extra`` files added."""
        files: dict[str, Any] = {**carried_files(self.folder, skip), **(extra or {})}
        return save(self.model, out, overwrite=True, extra_files=files)


# --- progress --------------------------------------------------------------------------------------------------


class ProgressBar:
    """A rich progress bar; without a terminal, a plain line every ~5% so logs of background runs show it."""

    def __init__(self, description: str, total: int, enabled: bool = True, fields: tuple[str, ...] = ()) -> None:
        from rich.console import Console

        self.enabled = enabled
        self.total = total
        self.description = description
        self.console = Console(stderr=True)
        self.done = 0
        self.start = time.perf_counter()
        self.next_line = 0
        self.progress = None
        if enabled and self.console.is_terminal:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn()]
            columns += [TextColumn(f"{f} {{task.fields[{f}]}}") for f in fields]
            columns += [TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn()]
            self.progress = Progress(*columns, console=self.console, transient=False)
            self.task = self.progress.add_task(description, total=total, **{f: "-" for f in fields})

    def __enter__(self) -> ProgressBar:
        if self.progress is not None:
            self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.stop()

    def update(self, advance: int = 1, **fields: str) -> None:
        self.done += advance
        if not self.enabled:
            return
        if self.progress is not None:
            self.progress.update(self.task, advance=advance, **fields)
            return
        if self.done >= self.next_line or self.done >= self.total:
            elapsed = time.perf_counter() - self.start
            eta = elapsed / max(self.done, 1) * (self.total - self.done)
            extra = "".join(f" {k} {v}" for k, v in fields.items())
            print(f"{self.description} {self.done}/{self.total}{extra} elapsed {elapsed:.0f}s ETA {eta:.0f}s",
                  file=sys.stderr, flush=True)
            self.next_line = self.done + max(1, self.total // 20)


# --- tallies ---------------------------------------------------------------------------------------------------


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, k: int) -> int:
    """How many rows of ``logits`` have the label among their ``k`` highest scores."""
    k = min(k, logits.shape[-1])
    return int((logits.topk(k, dim=-1).indices == labels[:, None]).any(dim=-1).sum())


class Tally:
    """Top-1/top-5 hits, GMACs and exits of one operating point (or of a plain model's logits), accumulated over
    batches; calibration and evaluation count the same way."""

    def __init__(self) -> None:
        self.correct1 = self.correct5 = self.images = 0
        self.gmacs = 0.0
        self.exits: dict[int, int] = {}

    def add_logits(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        logits = logits.float().cpu()
        self.correct1 += topk_correct(logits, labels, 1)
        self.correct5 += topk_correct(logits, labels, 5)
        self.images += int(labels.shape[0])

    def add(self, out: DynamicOutput, labels: torch.Tensor) -> None:
        self.add_logits(out.logits, labels)
        self.gmacs += float(out.gmacs.double().sum())
        if out.stage is not None:
            for s, c in zip(*out.stage.cpu().unique(return_counts=True), strict=True):
                self.exits[int(s)] = self.exits.get(int(s), 0) + int(c)

    @property
    def top1(self) -> float:
        return 100.0 * self.correct1 / max(self.images, 1)

    @property
    def top5(self) -> float:
        return 100.0 * self.correct5 / max(self.images, 1)

    @property
    def mean_gmacs(self) -> float:
        return self.gmacs / max(self.images, 1)

    def exit_shares(self) -> dict[int, float]:
        return {s: c / max(self.images, 1) for s, c in sorted(self.exits.items())}

    def point(self, point: OperatingPoint, n: int) -> CurvePoint:
        extra = {"top5": 100.0 * self.correct5 / n, **{f"exit_{s}": c / n for s, c in sorted(self.exits.items())}}
        return CurvePoint(point=dict(point), gmacs=self.gmacs / n, top1=100.0 * self.correct1 / n, extra=extra)


__all__ = ["MODEL_FILES", "ProgressBar", "Session", "Tally", "carried_files", "original_model", "resolve_device",
           "resolve_model", "topk_correct"]
