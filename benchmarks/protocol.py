"""The suite's measurements on top of :mod:`vitconvert.timing` (the one timing protocol): its settings, the record
each measurement keeps, GMACs on the timed batch, and the rows ``report.py`` tabulates.

Rules every number in ``benchmarks/results`` follows (those of :func:`vitconvert.timing.compare`): untimed
warm-up; on CUDA every timed call bracketed by ``torch.cuda.synchronize()``; every repetition kept (median and
spread reported); the models compared timed side by side in interleaved rounds with the order rotated each
round; a ratio is the median of the per-round paired ratios. This module adds no timing of its own.

Example:
    >>> import torch
    >>> from benchmarks.protocol import measure, random_batch
    >>> a, b = torch.nn.Linear(8, 8).eval(), torch.nn.Linear(8, 2).eval()
    >>> rec = measure({"a": a, "b": b}, torch.randn(4, 8), warmup=1, reps=3)
    >>> rec["config"]["reference"], rec["results"]["a"]["ratio"], rec["results"]["b"]["reps"]
    ('a', 1.0, 3)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import nn

from vitconvert.methods.base import ConvertedModel, DynamicOutput
from vitconvert.timing import Timed, compare, inference_context, load_average, machine_info

__all__ = ["PROTOCOL", "add_path_mix_latency", "dynamic_outputs", "measure", "measure_models", "random_batch",
           "result_row"]

Mode = Literal["throughput", "latency"]

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


def random_batch(img_size: Sequence[int], batch: int, seed: int = 0, device: torch.device | str = "cpu"
                 ) -> torch.Tensor:
    """A reproducible batch of random images (``seed``), for models whose random weights make real images moot."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, *img_size, generator=gen).to(device)


def dynamic_outputs(model: ConvertedModel, x: torch.Tensor, *, one_by_one: bool = False, bf16: bool = False
                    ) -> list[DynamicOutput]:
    """``model.forward_dynamic`` on ``x`` (each image alone when ``one_by_one``, as batch-1 timing runs them), under
    the context the model is timed in; per-image GMACs are ``torch.cat([o.gmacs for o in outputs])``."""
    with inference_context(x.device, bf16):
        if one_by_one:
            return [model.forward_dynamic(x[i:i + 1]) for i in range(x.shape[0])]
        return [model.forward_dynamic(x)]


def measure(models: Mapping[str, Timed], x: torch.Tensor, *, warmup: int, reps: int, mode: Mode = "throughput",
            reference: str | None = None, bf16: bool = False, threads: int | None = None, min_seconds: float = 0.0,
            max_rounds: int | None = None) -> dict[str, Any]:
    """One side-by-side measurement (:func:`vitconvert.timing.compare`) with the record the results keep.

    Args:
        models: Name -> model in eval mode on ``x``'s device, or callable taking ``x``.
        x: The input batch.
        warmup: Untimed rounds.
        reps: Timed rounds (at least; ``min_seconds`` may add some, up to ``max_rounds``).
        mode: ``"throughput"`` records images/s, ``"latency"`` ms per call; the ratios are the same.
        reference: The model the ratios are against (default: the first).
        bf16: bf16 autocast.
        threads: ``torch.set_num_threads`` during the measurement (CPU).
        min_seconds, max_rounds: See :func:`vitconvert.timing.compare`.

    Returns:
        ``{"config": {batch, warmup, reps, rounds, bf16, device, precision, threads, device_name, interleaved,
        reference, load_average_start, load_average_end, wall_seconds}, "results": name ->
        Timing.to_dict()}``.
    """
    device = x.device
    reference = reference or next(iter(models))
    load_start = load_average()
    t0 = time.perf_counter()
    timings = compare(models, x, reference=reference, warmup=warmup, min_rounds=reps,
                      max_rounds=max(reps, max_rounds or reps), min_seconds=min_seconds, bf16=bf16, threads=threads)
    wall = time.perf_counter() - t0
    config = {"batch": int(x.shape[0]), "warmup": warmup, "reps": reps, "rounds": timings[reference].rounds,
              "bf16": bf16, "device": device.type, "precision": "bf16 autocast" if bf16 else "fp32",
              "threads": (threads or torch.get_num_threads()) if device.type == "cpu" else None,
              "device_name": machine_info(device)["device_name"], "interleaved": True, "reference": reference,
              "load_average_start": load_start, "load_average_end": load_average(), "wall_seconds": round(wall, 1)}
    unit = "img/s" if mode == "throughput" else "ms"
    return {"config": config, "results": {name: t.to_dict(unit) for name, t in timings.items()}}


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
        ``{"cpu_throughput": {"config": ..., "results": ..., "setup": ...}, "cpu_latency": ...}``
        (:func:`measure`'s record plus what ``setup`` returned).

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
        for what, pool in (("throughput", models), ("latency", latency_models)):
            cfg = protocol[f"{dev}_{what}"]
            x = random_batch(img_size, cfg["batch"], seed, dev)
            notes: dict[str, Any] = {}
            for name, model in pool.items():
                model.to(dev).eval()
                if setup is not None:
                    note = setup(name, model, x, cfg)
                    if note:
                        notes[name] = note
            record = measure(pool, x, warmup=cfg["warmup"], reps=cfg["reps"], mode=what, bf16=cfg["bf16"],
                             threads=threads if dev == "cpu" else None)
            out[f"{dev}_{what}"] = {**record, "setup": notes}
            for model in pool.values():
                model.to("cpu")
    return out


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
