"""A picture of what DGE's routers decided: the query sub-patches of one block on a few images, and the queries per
region averaged over a stage."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from vitconvert.errors import UserError

_COLORS = ["#d62728", "#ff7f0e", "#2ca02c", "#1f77b4", "#9467bd"]


@torch.no_grad()
def plot_granularity(model: Any, images: torch.Tensor, path: str | Path, block: int | None = None,
                     mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> Path:
    """Draw the granularity each region got on a few images and write a PNG.

    Top row: the image with the query sub-patches of one block outlined (finest red ... coarsest blue; blocks with
    windows, Swin: every token tinted by its query's sub-patch side, the shift undone). Bottom row: queries per
    region averaged over all dynamic blocks of that block's stage (with windows: per token, as a region's share).

    Args:
        model: A DGE model (evaluated at its current knob).
        images: (B, 3, H, W) normalised images at the model's input size (a few; B <= 8 reads well).
        path: PNG file to write.
        block: Dynamic block whose sub-patches are drawn (default: the middle dynamic block of the stage with
            the largest token grid, where regions are most numerous).
        mean: Normalisation mean to undo for display (default: the model's data config).
        std: Normalisation std to undo (default: the model's data config).

    Returns:
        The path written.

    Example:
        >>> plot_granularity(model, images[:4], "granularity.png")  # doctest: +SKIP
    """
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    if getattr(model, "method", None) != "dge":  # the model module imports this one: checked by name
        raise UserError("plot_granularity needs a DGE model")
    blocks = model.dynamic_blocks
    stage_of = {b.index: b.stage for b in model.anatomy.blocks}
    if block is None:
        largest = max({stage_of[i] for i in blocks}, key=lambda s: math.prod(model.anatomy.stages[s].grid))
        in_largest = [i for i in blocks if stage_of[i] == largest]
        block = in_largest[len(in_largest) // 2]
    if block not in blocks:
        raise UserError(f"block {block} is not dynamic; dynamic blocks: {blocks}")
    was_training = model.training
    model.eval()
    try:
        out = model.forward_at_point(images)  # what the point decides, whatever the small-batch rule
    finally:
        model.train(was_training)
    if f"granularity.{block}" not in out.extras:
        raise UserError("no granularities to draw at coarsening=0 (the base model runs); raise the knob")
    cfg = model.pretrained_cfg
    mean_t = torch.tensor(mean if mean is not None else cfg.get("mean", (0.0, 0.0, 0.0))).view(3, 1, 1)
    std_t = torch.tensor(std if std is not None else cfg.get("std", (1.0, 1.0, 1.0))).view(3, 1, 1)
    stage = stage_of[block]
    gh, gw = model.anatomy.stages[stage].grid
    path_of = {b.index: b.path for b in model.anatomy.blocks}
    blk = model.base.get_submodule(path_of[block])
    windowed = blk.parts.windows is not None
    ih, iw = images.shape[-2:]
    sy, sx = ih / gh, iw / gw
    ctx = model._c
    sizes, region = ctx.sizes, ctx.region
    same_stage = [i for i in blocks if stage_of[i] == stage]
    n = images.shape[0]
    fig = Figure(figsize=(2.6 * n, 5.4))
    for i in range(n):
        img = (images[i].float().cpu() * std_t + mean_t).clamp(0, 1).permute(1, 2, 0).numpy()
        ax = fig.add_subplot(2, n, i + 1)
        ax.imshow(img)
        gates = out.extras[f"granularity.{block}"][i].cpu()
        if windowed:  # regions inside (shifted) windows: each token tinted by its query's sub-patch side
            side = blk.token_sizes(gates.unsqueeze(0), (gh, gw))[0].float()
            ax.imshow(side.numpy(), cmap="coolwarm", alpha=0.4, vmin=sizes[0], vmax=sizes[-1],
                      extent=(-0.5, iw - 0.5, ih - 0.5, -0.5), interpolation="nearest")
            gates = gates[:0]  # no outlines
        for ry in range(gates.shape[0]):
            for rx in range(gates.shape[1]):
                p = sizes[int(gates[ry, rx])]
                for y0 in range(ry * region, min((ry + 1) * region, gh), p):
                    for x0 in range(rx * region, min((rx + 1) * region, gw), p):
                        hh, ww = min(p, gh - y0), min(p, gw - x0)
                        ax.add_patch(Rectangle((x0 * sx - 0.5, y0 * sy - 0.5), ww * sx, hh * sy, fill=False,
                                               lw=0.8, ec=_COLORS[int(gates[ry, rx]) % len(_COLORS)]))
        ax.set_title(f"block {block}: {int(out.extras['queries'][i, blocks.index(block)])} queries", fontsize=8)
        ax.axis("off")
        ax2 = fig.add_subplot(2, n, n + i + 1)
        if windowed:  # per token: 1 / side^2 queries, times a region's tokens
            per = torch.stack([model.base.get_submodule(path_of[j]).token_sizes(
                out.extras[f"granularity.{j}"][i:i + 1].cpu(), (gh, gw))[0].float() for j in same_stage])
        else:
            per = torch.stack([torch.tensor(sizes, dtype=torch.float)[out.extras[f"granularity.{j}"][i].cpu()]
                               for j in same_stage])
        queries = (region / per) ** 2
        im = ax2.imshow(queries.mean(0).numpy(), cmap="viridis", vmin=1, vmax=region * region / sizes[0] ** 2)
        ax2.set_title(f"queries/region, stage {stage} mean", fontsize=8)
        ax2.axis("off")
    fig.colorbar(im, ax=fig.axes[-1], fraction=0.046)
    fig.suptitle(f"DGE granularities ({model.base_spec.architecture}, coarsening={model.coarsening:g}, "
                 f"{float(out.gmacs.mean()):.3f} GMACs)", fontsize=9)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path
