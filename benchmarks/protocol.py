"""Wall-clock measuring helpers shared by the benchmark scripts.

Rules every number in ``benchmarks/results`` follows:

* warm-up calls are run and thrown away (allocator, oneDNN/cuBLAS kernel choice, lazy inits);
* on CUDA every timed call is bracketed by ``torch.cuda.synchronize()``;
* each timed call is one repetition; we report the median and the spread (p10/p90, min/max) and keep
  every repetition, so a reader can judge the noise;
* models being compared are measured side by side, interleaved (A, B, A, B, ... with the order rotated
  each round), so background load on a shared machine hits them equally; the ratio we quote is the
  median of the per-round (paired) ratios.

Example:
    >>> import timm, torch
    >>> from benchmarks.timing import compare, inference_fn
    >>> a = timm.create_model("deit_tiny_patch16_224").eval()
    >>> x = torch.randn(8, 3, 224, 224)
    >>> res = compare({"timm": inference_fn(a)}, x, warmup=1, reps=3)  # doctest: +SKIP
    >>> res["timm"]["median"]  # images per second                     # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

Fn = Callable[[torch.Tensor], Any]


# --- environment -------------------------------------------------------------------------------------


@contextlib.contextmanager
def num_threads(n: int | None) -> Iterator[None]:
    """Temporarily set ``torch.set_num_threads(n)`` (``None``: leave as is)."""
    old = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(old)


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


def _version(module: str) -> str | None:
    try:
        mod = __import__(module)
    except Exception:
        return None
    return str(getattr(mod, "__version__", "unknown"))


def machine_info(device: str | torch.device | None = None) -> dict[str, Any]:
    """Where and when a measurement was taken: OS, CPU, threads, library versions, device, load.

    Args:
        device: The device measured on (default: CPU).

    Example:
        >>> info = machine_info()
        >>> sorted(info)[:3]
        ['cpu', 'cpu_count', 'cuda']
    """
    dev = torch.device(device or "cpu")
    info: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
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
    }
    info["load_average"] = _load_average()
    return info


# --- callables ---------------------------------------------------------------------------------------


def inference_fn(model: nn.Module | Callable[[torch.Tensor], Any], *, bf16: bool = False) -> Fn:
    """Wrap a model for timing: ``torch.inference_mode`` and, optionally, bf16 autocast on its device.

    Args:
        model: A module (put in eval mode) or any callable taking the input batch.
        bf16: Run under ``torch.autocast(dtype=torch.bfloat16)`` on the input's device type.
    """
    if isinstance(model, nn.Module):
        model.eval()

    def fn(x: torch.Tensor) -> Any:
        with inference_context(x.device, bf16):
            return model(x)

    return fn


@contextlib.contextmanager
def inference_context(device: torch.device | str, bf16: bool = False) -> Iterator[None]:
    """``torch.inference_mode`` plus, optionally, bf16 autocast on ``device``: how every model is timed."""
    dev = torch.device(device)
    ctx = torch.autocast(dev.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    with torch.inference_mode(), ctx:
        yield


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_once(fn: Fn, x: torch.Tensor) -> tuple[float, float]:
    """Wall-clock and process CPU seconds of one call."""
    _sync(x.device)
    c0, t0 = time.process_time(), time.perf_counter()
    fn(x)
    _sync(x.device)
    return time.perf_counter() - t0, time.process_time() - c0


def _quantile(values: list[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default) without needing numpy."""
    s = sorted(values)
    if len(s) == 1:
        return s[0]
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summarize(values: list[float]) -> dict[str, Any]:
    """Median, p10/p90, min/max and the raw values of a list of repetitions."""
    return {
        "median": statistics.median(values),
        "p10": _quantile(values, 0.10),
        "p90": _quantile(values, 0.90),
        "min": min(values),
        "max": max(values),
        "reps": len(values),
        "all": list(values),
    }


# --- single measurements ----------------------------------------------------------------------------


def throughput(fn: Fn, batch: torch.Tensor, *, warmup: int = 2, reps: int = 10,
               threads: int | None = None) -> dict[str, Any]:
    """Images per second of ``fn(batch)``: one timed call per repetition, warm-up excluded.

    Args:
        fn: Callable taking the batch (see :func:`inference_fn`).
        batch: Input batch (its device decides whether CUDA is synchronised).
        warmup: Untimed calls first.
        reps: Timed calls.
        threads: ``torch.set_num_threads`` during the measurement.

    Returns:
        ``summarize`` of the per-call images/s, plus ``batch`` and ``seconds`` (median seconds per call).

    Example:
        >>> m = torch.nn.Linear(8, 8)
        >>> r = throughput(inference_fn(m), torch.randn(4, 8), warmup=1, reps=3)
        >>> r["reps"], r["batch"]
        (3, 4)
    """
    return compare({"_": fn}, batch, warmup=warmup, reps=reps, threads=threads)["_"]


def latency(fn: Fn, x: torch.Tensor, *, warmup: int = 3, reps: int = 20,
            threads: int | None = None) -> dict[str, Any]:
    """Milliseconds per call of ``fn(x)`` (use a batch of one for batch-1 latency).

    Returns:
        ``summarize`` of the per-call milliseconds.

    Example:
        >>> m = torch.nn.Linear(8, 8)
        >>> latency(inference_fn(m), torch.randn(1, 8), warmup=1, reps=3)["reps"]
        3
    """
    return compare({"_": fn}, x, warmup=warmup, reps=reps, threads=threads, mode="latency")["_"]


# --- side-by-side -------------------------------------------------------------------------------------


def compare(fns: Mapping[str, Fn], x: torch.Tensor, *, warmup: int = 2, reps: int = 10,
            threads: int | None = None, mode: str = "throughput",
            reference: str | None = None) -> dict[str, dict[str, Any]]:
    """Measure several callables on the same input, interleaved, so background load affects them equally.

    Each round times every callable once; the order is rotated from round to round (A B C, B C A, ...)
    so none always runs right after another. Warm-up rounds are untimed.

    Args:
        fns: Name -> callable taking ``x``.
        x: The input (batch for throughput, usually one image for latency).
        warmup: Untimed rounds.
        reps: Timed rounds.
        threads: ``torch.set_num_threads`` during the measurement.
        mode: ``"throughput"`` (images/s, higher is better) or ``"latency"`` (ms per call).
        reference: Name of the callable the others are compared with (default: the first). Every
            entry gets ``ratio`` = median over rounds of its paired speed-up over the reference
            (throughput ratio, or reference latency / own latency) and ``ratio_p10``/``ratio_p90``.

    Returns:
        Name -> :func:`summarize` dict (plus ``batch``, ``seconds`` and the ratio fields).

    Example:
        >>> a, b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 2)
        >>> r = compare({"a": inference_fn(a), "b": inference_fn(b)}, torch.randn(4, 8), warmup=1, reps=3)
        >>> r["a"]["ratio"]
        1.0
    """
    if mode not in ("throughput", "latency"):
        raise ValueError(f"mode must be 'throughput' or 'latency', got {mode!r}")
    if not fns:
        raise ValueError("nothing to measure")
    if reps < 1 or warmup < 0:
        raise ValueError("reps must be >= 1 and warmup >= 0")
    names = list(fns)
    reference = reference or names[0]
    if reference not in fns:
        raise ValueError(f"reference {reference!r} is not among {names}")
    seconds: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    with num_threads(threads):
        for _ in range(warmup):
            for n in names:
                _time_once(fns[n], x)
        for r in range(reps):
            k = r % len(names)
            for n in names[k:] + names[:k]:
                wall, used = _time_once(fns[n], x)
                seconds[n].append(wall)
                cpu[n].append(used)
    batch = int(x.shape[0])
    half = reps // 2
    out: dict[str, dict[str, Any]] = {}
    for n in names:
        scale = (lambda s: batch / s) if mode == "throughput" else (lambda s: 1000.0 * s)
        values = [scale(s) for s in seconds[n]]
        res = summarize(values)
        res["batch"] = batch
        res["unit"] = "img/s" if mode == "throughput" else "ms"
        res["seconds"] = statistics.median(seconds[n])
        # Paired per-round speed-up: both were timed within the same round, so a load spike that slows
        # one round slows both and cancels out.
        paired = [ref / own for ref, own in zip(seconds[reference], seconds[n], strict=True)]
        res["ratio"] = statistics.median(paired)
        res["ratio_p10"] = _quantile(paired, 0.10)
        res["ratio_p90"] = _quantile(paired, 0.90)
        res["ratio_all"] = paired
        # Stability check: the paired median of the first and of the second half of the rounds.
        res["ratio_halves"] = ([statistics.median(paired[:half]), statistics.median(paired[half:])]
                               if half else None)
        if x.device.type == "cpu":
            # CPU time the process used: insensitive to time spent descheduled on a shared machine.
            # Only meaningful when compute stays on this process's threads (always so on CPU).
            cpu_paired = [ref / max(own, 1e-9) for ref, own in zip(cpu[reference], cpu[n], strict=True)]
            res["cpu_seconds"] = statistics.median(cpu[n])
            res["cpu_time_ratio"] = statistics.median(cpu_paired)
            res["cpu_time_ratio_p10"] = _quantile(cpu_paired, 0.10)
            res["cpu_time_ratio_p90"] = _quantile(cpu_paired, 0.90)
        out[n] = res
    return out


# --- the benchmark protocol ---------------------------------------------------------------------------


#: Settings of each measurement (``quick`` for ``python -m benchmarks --quick``). CPU throughput at batch
#: 64 in fp32, batch-1 latency, and on CUDA timm-style batch 256 in bf16 autocast. 8 CPU throughput rounds
#: (15 in the cfvit/tome results of 2026-11-21; there the paired-median ratio of the first 8 rounds is
#: within 4.5% of all 15's), so that ``python -m benchmarks`` fits in the hour.
PROTOCOL: dict[str, dict[str, dict[str, Any]]] = {
    "full": {
        "cpu_throughput": {"batch": 64, "warmup": 2, "reps": 8, "bf16": False},
        "cpu_latency": {"batch": 1, "warmup": 5, "reps": 40, "bf16": False},
        "cuda_throughput": {"batch": 256, "warmup": 10, "reps": 40, "bf16": True},
        "cuda_latency": {"batch": 1, "warmup": 10, "reps": 100, "bf16": True},
    },
    "quick": {
        "cpu_throughput": {"batch": 16, "warmup": 1, "reps": 3, "bf16": False},
        "cpu_latency": {"batch": 1, "warmup": 2, "reps": 5, "bf16": False},
        "cuda_throughput": {"batch": 64, "warmup": 3, "reps": 10, "bf16": True},
        "cuda_latency": {"batch": 1, "warmup": 3, "reps": 10, "bf16": True},
    },
}

#: ``setup(name, model, x, config) -> dict`` runs before a measurement (e.g. to pin an early-exit fraction
#: on that exact input; ``config["bf16"]`` says whether to use autocast); what it returns is recorded next
#: to the timings.
Setup = Callable[[str, nn.Module, torch.Tensor, dict[str, Any]], dict[str, Any] | None]


def measure_models(models: Mapping[str, nn.Module], img_size: tuple[int, int], *, quick: bool = False,
                   latency_models: Mapping[str, nn.Module] | None = None, setup: Setup | None = None,
                   threads: int | None = None, devices: tuple[str, ...] | None = None,
                   seed: int = 0) -> dict[str, Any]:
    """Throughput and batch-1 latency of several models, side by side, following :data:`PROTOCOL`.

    The first model is the reference every ``ratio`` is relative to (put the timm model first). CPU
    is always measured; CUDA too when available (models are moved there and back).

    Args:
        models: Name -> model for throughput (first = reference).
        img_size: Input height and width.
        quick: Use the quick protocol (smaller batches, fewer repetitions).
        latency_models: Models for batch-1 latency, if different (default: ``models``).
        setup: Called per model and measurement before timing (see :data:`Setup`).
        threads: ``torch.set_num_threads`` during CPU measurements (default: torch's).
        devices: Restrict to these device types (default: cpu, plus cuda when available).
        seed: Seed of the random input batch.

    Returns:
        ``{"cpu_throughput": {"config": ..., "results": compare(...), "setup": ...}, "cpu_latency": ...}``.

    Example:
        >>> ms = {"a": torch.nn.Conv2d(3, 4, 8, 8), "b": torch.nn.Conv2d(3, 2, 8, 8)}
        >>> out = measure_models(ms, (16, 16), quick=True, devices=("cpu",))
        >>> sorted(out), out["cpu_throughput"]["results"]["a"]["ratio"]
        (['cpu_latency', 'cpu_throughput'], 1.0)
    """
    protocol = PROTOCOL["quick" if quick else "full"]
    devices = devices or (("cpu", "cuda") if torch.cuda.is_available() else ("cpu",))
    latency_models = latency_models or models
    out: dict[str, Any] = {}
    for dev in devices:
        device = torch.device(dev)
        for what, pool in (("throughput", models), ("latency", latency_models)):
            cfg = protocol[f"{dev}_{what}"]
            gen = torch.Generator().manual_seed(seed)
            x = torch.randn(cfg["batch"], 3, *img_size, generator=gen).to(device)
            fns: dict[str, Fn] = {}
            notes: dict[str, Any] = {}
            for name, model in pool.items():
                model.to(device).eval()
                fns[name] = inference_fn(model, bf16=cfg["bf16"])
                if setup is not None:
                    note = setup(name, model, x, cfg)
                    if note:
                        notes[name] = note
            load_start = _load_average()
            t0 = time.perf_counter()
            results = compare(fns, x, warmup=cfg["warmup"], reps=cfg["reps"],
                              threads=threads if dev == "cpu" else None, mode=what)
            wall = time.perf_counter() - t0
            out[f"{dev}_{what}"] = {
                "config": {**cfg, "device": dev, "precision": "bf16 autocast" if cfg["bf16"] else "fp32",
                           "threads": (threads or torch.get_num_threads()) if dev == "cpu" else None,
                           "device_name": machine_info(device)["device_name"],
                           "interleaved": True, "reference": next(iter(pool)),
                           "load_average_start": load_start, "load_average_end": _load_average(),
                           "wall_seconds": round(wall, 1)},
                "results": results,
                "setup": notes,
            }
            for model in pool.values():
                model.to("cpu")
    return out


def _load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def add_path_mix_latency(measured: Mapping[str, Any], name: str, weights: Mapping[str, float], derived: str) -> None:
    """Batch-1 latency of ``name``, whose images take different paths (a cascade's exits), as the weighted mean of
    the paths' medians (each path timed alone by :func:`measure_models`), added to every device's latency results.

    One image at a time, an exit distribution is a mix of whole paths; timing one random image stream instead would
    only add the variance of which path each draw took.
    """
    for dev in ("cpu", "cuda"):
        lat = measured.get(f"{dev}_latency")
        if lat is None:
            continue
        res = lat["results"]
        ms = sum(w * res[path]["median"] for path, w in weights.items())
        res[name] = {"median": ms, "ratio": res[lat["config"]["reference"]]["median"] / ms, "unit": "ms",
                     "derived": derived}


def result_row(measured: Mapping[str, Any], name: str, **fields: Any) -> list[dict[str, Any]]:
    """Rows for ``SUMMARY.md`` (one per device) from :func:`measure_models` output for model ``name``.

    The keys ``report.py`` understands: method, backbone, setting, device, precision, gmacs, base_gmacs,
    throughput, base_throughput, throughput_ratio (+ _p10/_p90/_halves), cpu_time_ratio, batch,
    latency_ms, base_latency_ms, latency_ratio, top1, base_top1, finetune_minutes, notes. Extra
    ``fields`` are copied into every row.
    """
    rows = []
    for dev in ("cpu", "cuda"):
        thr = measured.get(f"{dev}_throughput")
        if thr is None or name not in thr["results"]:
            continue
        ref = thr["config"]["reference"]
        r, b = thr["results"][name], thr["results"][ref]
        row = {
            **fields,
            "device": thr["config"]["device_name"] if dev == "cuda" else "cpu",
            "precision": thr["config"]["precision"],
            "batch": thr["config"]["batch"],
            "throughput": r["median"],
            "base_throughput": b["median"],
            "throughput_ratio": r["ratio"],
            "throughput_ratio_p10": r["ratio_p10"],
            "throughput_ratio_p90": r["ratio_p90"],
            "throughput_ratio_halves": r.get("ratio_halves"),
            "cpu_time_ratio": r.get("cpu_time_ratio"),
        }
        lat = measured.get(f"{dev}_latency")
        if lat is not None and name in lat["results"]:
            lref = lat["config"]["reference"]
            row.update(latency_ms=lat["results"][name]["median"],
                       base_latency_ms=lat["results"][lref]["median"],
                       latency_ratio=lat["results"][name]["ratio"])
        rows.append(row)
    return rows


def machine_block() -> dict[str, Any]:
    """:func:`machine_info` plus a note on how shared the machine was (load average, niceness)."""
    info = machine_info()
    info["shared_machine"] = ("CPU shared with other users while measuring; models compared side by side, "
                              "interleaved, medians of repeated runs; ratios are per-round paired medians")
    return info


__all__ = ["PROTOCOL", "compare", "inference_context", "inference_fn", "latency", "machine_block",
           "machine_info", "measure_models", "num_threads", "result_row", "summarize", "throughput"]
