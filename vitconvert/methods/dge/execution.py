"""Which way a DGE block runs a batch: the execution cost model behind ``execution: auto``.

Gathering the selected queries, padding them around the attention core and scattering the updates back costs time
the skipped MACs must pay for. :func:`path_terms` says what one block does on one batch on each path (matrix-product
MACs, elements moved, depthwise-convolution MACs, operators launched) and :func:`path_costs` weighs them with
per-device constants (:data:`EXECUTION_COSTS`) into an estimated time per path. A model, not a measurement: the same
gates always take the same path, whatever the machine's load, so results are reproducible.

The constants live in ``execution_costs.json`` beside this module, written by
``python -m benchmarks.studies.fit_execution --install`` from its committed fit (per-block times of both paths over
the CIFAR-10 ViT and PVT-v2 bases, DeiT-S and PVT-v2-b1, batches 1-64, forced gate mixes); each entry records where
it came from. Blocks are of two kinds: ``plain`` (a per-token MLP) and ``conv_mlp`` (a depthwise convolution in the
MLP, PVT-v2), whose dense path also convolves the map at each level present. A device without an entry uses the
CPU's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from typing import Any, Literal

import torch

from vitconvert.layers.regions import RegionLayout

BlockKind = Literal["plain", "conv_mlp"]


@dataclass(frozen=True)
class ExecutionCost:
    """Relative CPU time of what the sparse and the dense paths do besides matrix products, in units of one
    matrix-product MAC (see :func:`path_costs`)."""

    move: float  # one tensor element read or written by a gather, scatter, copy or norm
    conv: float  # one MAC of the depthwise convolution (memory-bound: far below the matrix-product rate)
    op: float  # one operator launched, per thread (dispatch, allocation, OpenMP fork/join)
    sparse_rows: float = 1.0  # one MAC of the sparse path's per-query work (gathered, padded rows run slower)


def load_execution_costs(text: str | None = None) -> dict[str, dict[str, ExecutionCost]]:
    """device type -> block kind -> constants, from ``execution_costs.json`` (or the JSON ``text``)."""
    if text is None:
        text = resources.files(__package__).joinpath("execution_costs.json").read_text()
    data: dict[str, Any] = json.loads(text)
    fields = ("move", "conv", "op", "sparse_rows")
    return {device: {kind: ExecutionCost(**{k: float(v) for k, v in entry.items() if k in fields})
                     for kind, entry in kinds.items()}
            for device, kinds in data.items() if isinstance(kinds, dict)}


EXECUTION_COSTS = load_execution_costs()
# Operators one block launches besides the base block's own, by kind: properties of the code paths, not fitted.
SPARSE_OPS = {"plain": 45, "conv_mlp": 110}
DENSE_OPS = {"plain": 8, "conv_mlp": 10}  # ... plus DENSE_LEVEL_OPS per coarse level present
DENSE_LEVEL_OPS = {"plain": 0, "conv_mlp": 12}


def block_kind(conv_mlp: bool) -> BlockKind:
    return "conv_mlp" if conv_mlp else "plain"


def path_terms(costs: dict[str, Any], gates: torch.Tensor, qsel: torch.Tensor, lay: RegionLayout,
               conv_macs: torch.Tensor | None) -> dict[str, dict[str, float]]:
    """What one DGE block does on one batch on each path, besides what both paths do alike: matrix-product
    MACs (``mm``; the sparse path's per-query ones apart, ``rows``), tensor elements moved by gathers, scatters,
    copies and extra norms (``move``), depthwise convolution MACs (``conv``) and operators launched (``ops``).
    See :func:`path_costs`."""
    kind = block_kind(conv_macs is not None)
    b = gates.shape[0]
    n, c, d = costs["tokens"], costs["width"], costs["hidden"]
    nq = qsel.sum(1)
    m, longest = float(nq.sum()), float(nq.max())
    coarse = float((gates[:, lay.tok_region] != 0).sum())  # tokens of coarser queries
    sparse = {"mm": b * costs["fixed"], "rows": costs["per_query"] * m,
              # gather the queries, pad them for the attention core and back, broadcast the updates to the tokens
              "move": c * (2 * m + b * longest + b * n), "conv": 0.0, "ops": float(SPARSE_OPS[kind])}
    # Dense: every token a row, but the MLP (PVT-v2: fc2) once per query; the token map copied with the coarse
    # rows replaced and normalised once more (norm1 of the queries); the MLP's rows gathered and broadcast back.
    mlp = costs["mlp_row"]
    dense = {"mm": b * costs["fixed"] + (costs["per_query"] - mlp) * b * n + mlp * m, "rows": 0.0,
             "move": c * (4 * b * n + coarse + m), "conv": 0.0, "ops": float(DENSE_OPS[kind])}
    if conv_macs is not None:
        sparse["conv"] = float(conv_macs.sum())
        # the hidden table gathered at least once more for the level maps, and written back per query
        sparse["move"] += d * (b * n + 2 * m)
        per_tok = costs["dense_conv"] / n  # full-resolution depthwise MACs per token
        dense["conv"] = per_tok * b * n
        for k, size in enumerate(lay.sizes[1:], start=1):
            if bool((gates == k).any()):
                # the level's cell map pooled from the token map, convolved, written to its tokens
                dense["move"] += d * b * n / lay.sizes[k - 1] ** 2
                dense["conv"] += per_tok * b * n / size**2
                dense["ops"] += DENSE_LEVEL_OPS[kind]
        dense["move"] += d * m  # the queries' rows read from each level's map
    return {"sparse": sparse, "dense": dense}


def path_costs(costs: dict[str, Any], gates: torch.Tensor, qsel: torch.Tensor, lay: RegionLayout,
               conv_macs: torch.Tensor | None, threads: int = 1, device_type: str = "cpu") -> dict[str, float]:
    """Estimated time of one DGE block on one batch, sparse and dense, in matrix-product-MAC units.

    A model, not a measurement: the block's matrix-product MACs on each path (the sparse path runs the selected
    queries, the dense one every token), plus what each path moves (the sparse path gathers the queries,
    pads them around the attention core and scatters the updates back, at the block's width and, in PVT-v2's
    MLP, at the hidden width; the dense path copies the token map once), the depthwise convolution at each
    scale, and a fixed cost per operator (which makes small batches on small maps run dense), weighted by
    :data:`EXECUTION_COSTS`. Deterministic: the same gates always take the same path, whatever the machine's
    load, so results are reproducible.

    Args:
        costs: The block's MAC counts (``DGE.costs[index]``).
        gates: (B, R) level of each region.
        qsel: (B, T) which candidates are queries.
        lay: The block's region layout.
        conv_macs: (B,) MACs of PVT-v2's depthwise convolution on the sparse path, or None (ViT).
        threads: Threads the operators run on.
        device_type: ``cpu``, ``cuda``...
    """
    unit = EXECUTION_COSTS.get(device_type, EXECUTION_COSTS["cpu"])[block_kind(conv_macs is not None)]
    terms = path_terms(costs, gates, qsel, lay, conv_macs)
    return {path: t["mm"] + unit.sparse_rows * t["rows"] + unit.move * t["move"] + unit.conv * t["conv"]
            + unit.op * threads * t["ops"] for path, t in terms.items()}


