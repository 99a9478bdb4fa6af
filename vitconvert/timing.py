"""Wall-clock speed of models compared side by side: the one timing protocol of vitconvert.

Calibration's speed decisions (a speed budget, "never slower than the base model", the small-batch rule),
evaluation's throughput and every number in ``benchmarks/results`` are measured by :func:`compare`:

* **warm-up**: untimed rounds first (allocator, oneDNN/cuBLAS kernel choice, lazy initialisation);
* **interleaved rounds**: each round times every model once on the same input, and the order is rotated from
  round to round (A B C, B C A, C A B, ...), so background load on a shared machine and cache effects hit
  every model alike and none always runs right after another;
* **synchronised**: on CUDA each timed call is bracketed by ``torch.cuda.synchronize``, so the time covers the
  queued GPU work; calls run under ``torch.inference_mode`` (and optionally bf16 autocast);
* **every repetition kept**: per model the median images/s and its spread (p10/p90, min/max);
* **paired ratios**: a model's speed-up over the reference is the median over rounds of the per-round ratio
  (reference seconds / own seconds). Both were timed in the same round, so a load spike that slows a round
  slows both and cancels out; a ratio of medians would not pair them;
* **stopping rule**: at least ``min_rounds`` rounds, then more until ``min_seconds`` of timed rounds have passed
  or ``max_rounds`` are done (small batches need many rounds: a 5 ms forward is noisy).

Example:
    >>> import torch
    >>> from vitconvert.timing import compare
    >>> a, b = torch.nn.Linear(64, 64).eval(), torch.nn.Linear(64, 8).eval()
    >>> res = compare({"converted": b, "base": a}, torch.randn(16, 64), reference="base", min_rounds=3)
    >>> res["base"].ratio, res["converted"].rounds
    (1.0, 3)
    >>> res["converted"].images_per_s > 0
    True
"""

from __future__ import annotations

import contextlib
import datetime
import importlib.metadata
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

__all__ = ["Spread", "Timed", "Timing", "compare", "device_name", "inference_context", "load_average", "machine_info",
           "num_threads", "sync"]

#: Anything :func:`compare` can time: a module or a callable taking the input batch.
Timed = nn.Module | Callable[[torch.Tensor], Any]


# --- statistics --------------------------------------------------------------------------------------------


def _quantile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default), without numpy."""
    s = sorted(values)
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


@dataclass(frozen=True)
class Spread:
    """Median and spread of repeated measurements, with every value kept.

    Example:
        >>> s = Spread.of([4.0, 1.0, 3.0, 2.0, 5.0])
        >>> s.median, s.p10, s.p90, s.min, s.max
        (3.0, 1.4, 4.6, 1.0, 5.0)
    """

    median: float
    p10: float
    p90: float
    min: float
    max: float
    values: tuple[float, ...]

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        """The spread of ``values`` (at least one)."""
        if not values:
            raise ValueError("a spread needs at least one value")
        return cls(statistics.median(values), _quantile(values, 0.10), _quantile(values, 0.90), min(values),
                   max(values), tuple(values))

    def to_dict(self) -> dict[str, Any]:
        """``median``, ``p10``, ``p90``, ``min``, ``max``, ``reps`` and ``all`` (the values, in order)."""
        return {"median": self.median, "p10": self.p10, "p90": self.p90, "min": self.min, "max": self.max,
                "reps": len(self.values), "all": list(self.values)}


@dataclass(frozen=True)
class Timing:
    """One model's timed calls in a :func:`compare` run, paired round by round with the reference's.

    Attributes:
        name: The model's name in the run.
        batch: Images per call (the input's first dimension).
        reference: Name of the model the ratios are against (its own ratio is 1).
        seconds: Wall seconds of every timed call, in round order (warm-up excluded).
        paired: Per round, the reference's seconds / this model's seconds (> 1: faster than the reference).
        cpu_seconds: Process CPU seconds of every timed call (CPU inputs only, else None): a cross-check that
            ignores time spent descheduled on a shared machine.
        cpu_paired: The per-round ratios of ``cpu_seconds`` (None where those are).
    """

    name: str
    batch: int
    reference: str
    seconds: tuple[float, ...]
    paired: tuple[float, ...]
    cpu_seconds: tuple[float, ...] | None = None
    cpu_paired: tuple[float, ...] | None = None

    @property
    def rounds(self) -> int:
        """Timed calls (one per round)."""
        return len(self.seconds)

    @property
    def throughput(self) -> Spread:
        """Images per second of each call."""
        return Spread.of([self.batch / max(s, 1e-12) for s in self.seconds])

    @property
    def latency_ms(self) -> Spread:
        """Milliseconds per call (for a batch of one: per image)."""
        return Spread.of([1000.0 * s for s in self.seconds])

    @property
    def images_per_s(self) -> float:
        """Median images per second."""
        return self.throughput.median

    @property
    def ratio(self) -> float:
        """Speed-up over the reference: the median of the per-round paired ratios."""
        return statistics.median(self.paired)

    @property
    def ratio_spread(self) -> Spread:
        """The per-round paired ratios (p10/p90 say how steady the speed-up was)."""
        return Spread.of(self.paired)

    @property
    def ratio_halves(self) -> tuple[float, float] | None:
        """Paired median of the first and of the second half of the rounds (a stability check); None below 2."""
        half = self.rounds // 2
        if not half:
            return None
        return statistics.median(self.paired[:half]), statistics.median(self.paired[half:])

    @property
    def cpu_time_ratio(self) -> float | None:
        """Median per-round ratio of process CPU time (CPU inputs only)."""
        return statistics.median(self.cpu_paired) if self.cpu_paired else None

    def to_dict(self, unit: Literal["img/s", "ms"] = "img/s") -> dict[str, Any]:
        """The flat record the benchmark JSON files keep: :meth:`Spread.to_dict` of images/s (or of ms per call),
        ``batch``, ``unit``, ``seconds`` (median per call), ``ratio`` (+ ``_p10``/``_p90``/``_all``/``_halves``),
        and on CPU ``cpu_seconds`` and ``cpu_time_ratio`` (+ ``_p10``/``_p90``)."""
        if unit not in ("img/s", "ms"):
            raise ValueError(f"unit must be 'img/s' or 'ms', got {unit!r}")
        ratios = self.ratio_spread
        out = {**(self.throughput if unit == "img/s" else self.latency_ms).to_dict(), "batch": self.batch,
               "unit": unit, "seconds": statistics.median(self.seconds), "ratio": ratios.median,
               "ratio_p10": ratios.p10, "ratio_p90": ratios.p90, "ratio_all": list(self.paired),
               "ratio_halves": list(self.ratio_halves) if self.ratio_halves else None}
        if self.cpu_seconds is not None and self.cpu_paired is not None:
            cpu = Spread.of(self.cpu_paired)
            out.update(cpu_seconds=statistics.median(self.cpu_seconds), cpu_time_ratio=cpu.median,
                       cpu_time_ratio_p10=cpu.p10, cpu_time_ratio_p90=cpu.p90)
        return out


# --- running ------------------------------------------------------------------------------------------------


def sync(device: torch.device | str) -> None:
    """Wait for the device's queued work (CUDA), so wall-clock times cover it; nothing elsewhere."""
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


@contextlib.contextmanager
def num_threads(n: int | None) -> Iterator[None]:
    """``torch.set_num_threads(n)`` for the duration, restored after (``None``: leave as is)."""
    old = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(old)


@contextlib.contextmanager
def inference_context(device: torch.device | str, bf16: bool = False) -> Iterator[None]:
    """``torch.inference_mode``, plus bf16 autocast on ``device``'s type when ``bf16``: how every model is timed.

    Code that prepares a timed model on the same input (e.g. pinning an exit share) should run under it too.
    """
    dev = torch.device(device)
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    with torch.inference_mode(), autocast:
        yield


def compare(models: Mapping[str, Timed], x: torch.Tensor, *, reference: str | None = None, warmup: int = 2,
            min_rounds: int = 5, max_rounds: int | None = None, min_seconds: float = 0.0, bf16: bool = False,
            threads: int | None = None) -> dict[str, Timing]:
    """Time several models on the same input in paired, interleaved rounds (see the module docstring).

    Args:
        models: Name -> module (in eval mode, on ``x``'s device) or callable taking ``x``.
        x: The input: a batch for throughput, one image for latency. Where early exits depend on the images,
            use real ones.
        reference: Name of the model every ``ratio`` is against (default: the first).
        warmup: Untimed rounds first.
        min_rounds: Timed rounds at least.
        max_rounds: Timed rounds at most (it takes ``min_seconds`` to go past ``min_rounds``); default
            ``max(min_rounds, 30)``.
        min_seconds: After ``min_rounds``, keep timing rounds until this much wall time has been spent on them.
            The default 0 times exactly ``min_rounds``.
        bf16: Run under bf16 autocast on ``x``'s device type.
        threads: ``torch.set_num_threads`` for the duration (default: leave as is).

    Returns:
        Name -> :class:`Timing`, in the order of ``models``.

    Raises:
        ValueError: No models, an unknown reference, a module in training mode or inconsistent rounds.

    Example:
        >>> import torch
        >>> m = torch.nn.Linear(8, 8).eval()
        >>> res = compare({"a": m, "b": lambda x: m(x).relu()}, torch.randn(4, 8), min_rounds=4)
        >>> [res["b"].rounds, len(res["b"].paired), res["a"].ratio]
        [4, 4, 1.0]
    """
    if not models:
        raise ValueError("nothing to time")
    names = list(models)
    reference = names[0] if reference is None else reference
    if reference not in models:
        raise ValueError(f"reference {reference!r} is not among {names}")
    max_rounds = max(min_rounds, 30) if max_rounds is None else max_rounds
    if warmup < 0 or min_rounds < 1 or max_rounds < min_rounds:
        raise ValueError(f"need warmup >= 0 and 1 <= min_rounds <= max_rounds, got warmup={warmup}, "
                         f"min_rounds={min_rounds}, max_rounds={max_rounds}")
    training = [n for n, m in models.items() if isinstance(m, nn.Module) and m.training]
    if training:
        raise ValueError(f"{', '.join(training)} in training mode: call .eval() before timing (dropout, drop path "
                         "and batch statistics would be timed)")
    device = x.device
    on_cpu = device.type == "cpu"
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    with num_threads(threads), inference_context(device, bf16):
        for _ in range(warmup):
            for n in names:
                models[n](x)
        sync(device)
        start = time.perf_counter()
        rounds = 0
        while rounds < min_rounds or (rounds < max_rounds and time.perf_counter() - start < min_seconds):
            k = rounds % len(names)
            for n in names[k:] + names[:k]:
                sync(device)
                c0, t0 = time.process_time(), time.perf_counter()
                models[n](x)
                sync(device)
                wall[n].append(time.perf_counter() - t0)
                cpu[n].append(time.process_time() - c0)
            rounds += 1
    batch = int(x.shape[0])
    out: dict[str, Timing] = {}
    for n in names:
        paired = tuple(r / max(s, 1e-12) for r, s in zip(wall[reference], wall[n], strict=True))
        # CPU time only means something when the compute stays on this process's threads (always so on CPU).
        cpu_paired = (tuple(r / max(s, 1e-9) for r, s in zip(cpu[reference], cpu[n], strict=True))
                      if on_cpu else None)
        out[n] = Timing(n, batch, reference, tuple(wall[n]), paired, tuple(cpu[n]) if on_cpu else None, cpu_paired)
    return out


# --- where it was measured ----------------------------------------------------------------------------------


def _cpu_name() -> str:
    # platform.processor() is empty on most Linux builds; /proc/cpuinfo has the marketing name.
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def device_name(device: torch.device | str) -> str:
    """The device as reports name it: ``cuda:0 (NVIDIA H200)`` or ``cpu (AMD EPYC 7B13, 2 cores)``.

    Example:
        >>> device_name("cpu").startswith("cpu (")
        True
    """
    dev = torch.device(device)
    if dev.type == "cuda":
        return f"{dev} ({torch.cuda.get_device_name(dev)})"
    return f"cpu ({_cpu_name()}, {os.cpu_count()} cores)"


def load_average() -> list[float] | None:
    """The 1-, 5- and 15-minute load averages (None where the platform has none): how busy the machine was."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def machine_info(device: torch.device | str | None = None) -> dict[str, Any]:
    """Where and when a measurement was taken: date, OS, CPU, threads, library versions, device, niceness, load.

    Args:
        device: The device measured on (default: CPU).

    Example:
        >>> info = machine_info()
        >>> info["device"], info["torch_threads"] >= 1
        ('cpu', True)
    """
    dev = torch.device(device or "cpu")
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "processor": platform.processor() or platform.machine(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "timm": _version("timm"),
        "vitconvert": _version("vitconvert"),
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else _cpu_name(),
        "nice": os.nice(0) if hasattr(os, "nice") else None,
        "load_average": load_average(),
    }
