"""Measured speed: images per second of models timed side by side on the same batch and device.

Used by evaluation (the converted model against its base) and by calibration for speed budgets
(``--budget speed=2x``). Models are timed in interleaved rounds after untimed warm-up, so background load
hits them alike; the result is the median time per batch.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch

from vitconvert.data import ImageDataset, eval_transform


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so wall-clock times cover it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def measure_throughput(models: dict[str, torch.nn.Module], x: torch.Tensor, *, warmup: int = 2, min_rounds: int = 5,
                       max_rounds: int = 30, min_seconds: float) -> dict[str, float]:
    """Images per second of each model on batch ``x``: median of timed batches, models interleaved.

    Args:
        models: name -> model (already on ``x``'s device, in eval mode).
        x: One batch of real images (early exits depend on the images).
        warmup: Untimed batches per model first.
        min_rounds, max_rounds: Timed batches per model (small batches need many: a 5 ms forward is noisy).
        min_seconds: Keep timing (up to ``max_rounds``) until this much time has been spent.
    """
    device = x.device
    for model in models.values():
        for _ in range(warmup):
            model(x)
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in models}
    start = time.perf_counter()
    rounds = 0
    while rounds < min_rounds or (rounds < max_rounds and time.perf_counter() - start < min_seconds):
        for name, model in models.items():
            t0 = time.perf_counter()
            model(x)
            sync(device)
            times[name].append(time.perf_counter() - t0)
        rounds += 1
    return {name: x.shape[0] / statistics.median(ts) for name, ts in times.items()}


def spread_batch(files: Sequence[tuple[Any, int]], model: torch.nn.Module, batch_size: int) -> torch.Tensor:
    """A batch of images spread evenly over the split (which is sorted by class), for timing."""
    n = len(files)
    idx = [round(i * (n - 1) / max(1, batch_size - 1)) for i in range(batch_size)] if n > 1 else [0] * batch_size
    ds = ImageDataset([files[i] for i in idx], eval_transform(model), in_memory=False)
    return torch.stack([ds[i][0] for i in range(len(ds))])


def device_name(device: torch.device) -> str:
    """The device as reports name it: ``cuda:0 (NVIDIA H200)`` or ``cpu (x86_64, 2 cores)``."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
