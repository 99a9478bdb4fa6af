"""Forced DGE gates for speed benchmarks: an expected dynamic/static GMACs ratio instead of the routers' choice.

Plugs into :meth:`vitconvert.methods.dge.DGE.override_gates` (the routers still run, so their cost is timed
and counted). Each region takes one of two neighbouring granularities: at random per image and region
(``"random"``, so images differ as they do with a trained router) or by a fixed pattern shared by all
images (``"pattern"``).

Example:
    >>> from benchmarks.dge_forcing import force_ratio
    >>> force_ratio(model, 0.5)  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from vitconvert.errors import UserError
from vitconvert.methods.dge import DGE

__all__ = ["ForcedGates", "force_ratio", "forced_rho"]


@dataclass
class ForcedGates:
    """Gates at level ``low`` or ``low + 1``, the latter with probability ``frac`` per region; a
    :data:`vitconvert.methods.dge.GateOverride`."""

    rho: float
    low: int
    frac: float
    mode: str
    seed: int
    generator: torch.Generator = field(default_factory=torch.Generator)

    def __call__(self, block: int, batch: int, regions: int, device: torch.device) -> torch.Tensor:
        if self.mode == "pattern":
            # The same spread of coarser regions in every image: a fixed permutation, the first round(frac * R).
            g = torch.Generator().manual_seed(self.seed + regions)
            order = torch.randperm(regions, generator=g)
            up = torch.zeros(regions, dtype=torch.long)
            up[order[: round(self.frac * regions)]] = 1
            return (self.low + up).to(device).expand(batch, regions)
        up = (torch.rand(batch, regions, generator=self.generator) < self.frac).long()
        return (self.low + up).to(device)


def force_ratio(model: DGE, rho: float | None, mode: Literal["random", "pattern"] = "random", seed: int = 0
                ) -> float:
    """Force the gates of ``model`` so the expected dynamic/static GMACs ratio is ``rho``.

    Args:
        model: A DGE model.
        rho: Target ratio; ``None`` removes the forcing (the routers decide again).
        mode: ``"random"`` or ``"pattern"``.
        seed: Seed of the random draws / the pattern.

    Returns:
        The expected ratio of the forced gates (rho clipped to what the granularities can reach); NaN when
        the forcing is removed.
    """
    if rho is None:
        model.override_gates(None)
        return float("nan")
    if mode not in ("random", "pattern"):
        raise UserError(f"force_ratio: mode must be 'random' or 'pattern', got {mode!r}")
    levels = model.level_ratios()
    if rho < levels[-1] - 1e-9:
        raise UserError(f"force_ratio: rho={rho} is below the cheapest setting ({levels[-1]:.3f}: every "
                        "region at the coarsest granularity)")
    if rho >= levels[0]:
        low, frac = 0, 0.0
    else:
        low = next(j for j in range(len(levels) - 1) if levels[j] >= rho >= levels[j + 1])
        frac = (levels[low] - rho) / (levels[low] - levels[low + 1])
    model.override_gates(ForcedGates(rho=rho, low=low, frac=frac, mode=mode, seed=seed,
                                     generator=torch.Generator().manual_seed(seed)))
    return levels[low] + frac * (levels[low + 1] - levels[low]) if frac else levels[low]


def forced_rho(model: DGE) -> float | None:
    """The ratio last passed to :func:`force_ratio`, or None when the gates are not forced by it."""
    override = model.gate_override
    return override.rho if isinstance(override, ForcedGates) else None
