"""Per-block instrumentation of a DGE model for the studies that look inside it (``fit_execution``,
``profile_dge``, ``dge_blocks``): wall time of every dynamic block's forward, and the path ``auto`` chose with the
arguments it chose from.

Blocks are timed through forward hooks, inside the model's own forward (each block sees the input the model gives
it), which :func:`vitconvert.timing.compare` cannot do: it times whole calls. CPU only (no CUDA synchronisation).

Example:
    >>> with timed_blocks(model) as timer:  # doctest: +SKIP
    ...     timer.label = "sparse"
    ...     model(x)
    >>> timer.median("sparse")  # doctest: +SKIP
    {0: 0.0123, 1: ...}
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from vitconvert.methods.dge import DGE, DGEBlock

__all__ = ["BlockTimer", "block_times", "timed_blocks"]

# Called after a block chose its path: (block, the arguments of DGEBlock._choose_path, the path).
ChoiceHook = Callable[[DGEBlock, tuple[Any, ...], str], None]


@dataclass
class BlockTimer:
    """Wall seconds of every call of each dynamic block, kept under the ``label`` current at the call."""

    blocks: list[DGEBlock]
    label: str = ""
    seconds: dict[tuple[int, str], list[float]] = field(default_factory=dict)

    def median(self, label: str) -> dict[int, float]:
        """Median seconds per block index of the calls made under ``label``."""
        return {b.index: statistics.median(self.seconds[(b.index, label)]) for b in self.blocks}


@contextlib.contextmanager
def timed_blocks(model: DGE, on_choice: ChoiceHook | None = None) -> Iterator[BlockTimer]:
    """Time every dynamic block through forward hooks (each block sees the input the model gives it) and report each
    path choice to ``on_choice``; everything is removed on exit."""
    blocks = [m for m in model.base.modules() if isinstance(m, DGEBlock)]
    timer = BlockTimer(blocks)
    start: dict[int, float] = {}
    hooks = []
    for blk in blocks:
        hooks.append(blk.register_forward_pre_hook(lambda m, a: start.__setitem__(m.index, time.perf_counter())))
        hooks.append(blk.register_forward_hook(lambda m, a, o: timer.seconds.setdefault(
            (m.index, timer.label), []).append(time.perf_counter() - start[m.index])))
        if on_choice is not None:
            choose = blk._choose_path

            def spy(*args: Any, blk: DGEBlock = blk, choose: Any = choose) -> str:
                path = choose(*args)
                on_choice(blk, args, path)
                return path
            # An instance attribute shadows the method for this block only (DGEBlock calls self._choose_path).
            object.__setattr__(blk, "_choose_path", spy)
    try:
        yield timer
    finally:
        for h in hooks:
            h.remove()
        for blk in blocks:
            blk.__dict__.pop("_choose_path", None)


def block_times(model: DGE, x: torch.Tensor, iters: int) -> list[dict[str, Any]]:
    """Per dynamic block: median wall ms of the base block, the sparse and the dense path on ``x``'s batch, and
    the path ``auto`` takes (timed through forward hooks; each block sees the input the model gives it)."""
    chosen: dict[int, str] = {}
    saved = model.execution
    override = model.gate_override
    timer: BlockTimer

    def record_choice(blk: DGEBlock, args: tuple[Any, ...], path: str) -> None:
        if timer.label == "auto":
            chosen[blk.index] = path

    try:
        with timed_blocks(model, record_choice) as timer, torch.inference_mode():
            for _ in range(iters):
                for execution in ("base", "sparse", "dense", "auto"):
                    timer.label = execution
                    if execution == "base":  # the base blocks themselves, at the same inputs' shapes
                        model.override_gates(lambda i, b, r, dev: torch.zeros(b, r, dtype=torch.long, device=dev))
                        model.execution = "dense"
                    else:
                        model.override_gates(override)
                        model.execution = execution
                    model(x)
    finally:
        model.execution = saved
        model.override_gates(override)
    med = {e: timer.median(e) for e in ("base", "sparse", "dense", "auto")}
    return [{"block": blk.index, "auto": chosen.get(blk.index),
             **{f"{e}_ms": round(1000 * med[e][blk.index], 3) for e in med}} for blk in timer.blocks]
