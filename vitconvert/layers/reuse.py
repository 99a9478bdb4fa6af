"""Reuse between the members of a multi-resolution cascade (DVT's feature and relation reuse), model-free.

A cascade whose members see the same image at increasing token grids hands each member what the previous
one computed. These pieces know token layouts, not models:

* :func:`resize_grid` resizes a (B, C, h, w) map the way DVT's official code does: a nearest-neighbour
  upsample by the smallest whole factor that reaches the target, then an adaptive average pool to it
  (7 -> 14 -> 10, 10 -> 20 -> 14). Pooling after a nearest upsample averages whole source cells with area
  weights, so no new values are invented and a same-size resize is the identity.
* :func:`resize_tokens` resizes a token sequence ``prefix + h*w patches`` to another grid; prefix tokens
  (class / distillation tokens) have no place on the grid and get zeros, as in DVT.
* :func:`resize_relations` resizes attention logits (B, M, P+n, P+n) to (B, M, P+N, P+N): the patch part
  of the key axis is resized as a grid (prefix columns kept), then the patch part of the query axis
  (prefix rows kept), so the class row and column are carried over rather than mixed with patches.
* :class:`FeatureReuse` turns the previous member's tokens into an additive update for one downstream
  block: its own LayerNorm, Linear(C_up -> hidden) -> GELU -> Linear(hidden -> dim) (DVT: 128, 48), the
  resize, then a zero-initialised Linear(dim -> C) with no bias. DVT concatenates the 48 channels to the
  block's MLP input under a LayerNorm over C + 48; that changes the pretrained norm's statistics, so here
  the branch has its own norm and its projection is added to the block's output (the MLP residual), which
  is exactly the base block while the projection is zero.
* :class:`RelationMixer` mixes stacked logits across layers and heads with a 1x1-conv MLP
  (M -> ratio*M -> M, last conv zero-initialised), so a fresh mixer adds an exact zero bias.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

Grid = tuple[int, int]


def resize_grid(x: torch.Tensor, size: Grid) -> torch.Tensor:
    """(B, C, h, w) -> (B, C, H, W): nearest upsample by a whole factor per side, then adaptive average pool.

    Example:
        >>> resize_grid(torch.arange(4.).view(1, 1, 2, 2), (2, 2)).flatten().tolist()
        [0.0, 1.0, 2.0, 3.0]
        >>> resize_grid(torch.arange(4.).view(1, 1, 2, 2), (3, 3)).shape
        torch.Size([1, 1, 3, 3])
    """
    h, w = x.shape[-2:]
    if (h, w) == tuple(size):
        return x
    fh, fw = max(1, math.ceil(size[0] / h)), max(1, math.ceil(size[1] / w))
    if (fh, fw) != (1, 1):
        x = F.interpolate(x, size=(h * fh, w * fw), mode="nearest")
    return F.adaptive_avg_pool2d(x, size)


def resize_tokens(tokens: torch.Tensor, prefix: int, src: Grid, dst: Grid) -> torch.Tensor:
    """(B, prefix + h*w, C) -> (B, prefix + H*W, C) with the patches resized and zeros for the prefix."""
    b, _, c = tokens.shape
    patches = tokens[:, prefix:].transpose(1, 2).reshape(b, c, *src)
    patches = resize_grid(patches, dst).flatten(2).transpose(1, 2)
    if prefix == 0:
        return patches
    return torch.cat([patches.new_zeros(b, prefix, c), patches], dim=1)


def _resize_last(rel: torch.Tensor, prefix: int, src: Grid, dst: Grid) -> torch.Tensor:
    """Resize the patch part of the last axis of (..., P + h*w) as an h x w grid; keep the prefix part."""
    lead = rel.shape[:-1]
    # Maps as channels of one image per batch item, not one single-channel image per map: the same
    # per-channel op, 1.5x faster on the CPU for the many small maps of a relation stack.
    patches = rel[..., prefix:].reshape(rel.shape[0], -1, *src)
    patches = resize_grid(patches, dst).reshape(*lead, dst[0] * dst[1])
    return torch.cat([rel[..., :prefix], patches], dim=-1) if prefix else patches


def resize_relations(rel: torch.Tensor, prefix: int, src: Grid, dst: Grid) -> torch.Tensor:
    """(B, M, P+h*w, P+h*w) attention logits -> (B, M, P+H*W, P+H*W) (keys first, then queries).

    The prefix rows and columns are kept as they are (their patch parts resized along the other axis),
    DVT's "class row and column handled separately".
    """
    rel = _resize_last(rel, prefix, src, dst)  # keys
    rel = _resize_last(rel.transpose(-1, -2), prefix, src, dst).transpose(-1, -2)  # queries
    return rel.contiguous()


class FeatureReuse(nn.Module):
    """Upstream tokens -> additive update of one downstream block (see the module docstring).

    Args:
        in_dim: Width of the upstream tokens.
        out_dim: Width of the downstream block.
        hidden: Hidden width of the transform (DVT: 128).
        dim: Width of the reused features before the projection (DVT: 48).
    """

    def __init__(self, in_dim: int, out_dim: int, hidden: int = 128, dim: int = 48) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(in_dim)
        self.fc1 = nn.Linear(in_dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.proj = nn.Linear(dim, out_dim, bias=False)
        nn.init.zeros_(self.proj.weight)  # a fresh branch adds exactly zero: the base block is unchanged

    def forward(self, tokens: torch.Tensor, prefix: int, src: Grid, dst: Grid, dst_prefix: int | None = None
                ) -> torch.Tensor:
        """(B, prefix + h*w, in_dim) upstream tokens -> (B, dst_prefix + H*W, out_dim) update.

        The transform runs before the resize, on the (smaller) upstream grid, as in DVT. ``dst_prefix``
        (default ``prefix``) is the downstream prefix count; those rows get zeros.
        """
        u = self.fc2(self.act(self.fc1(self.norm(tokens))))
        dst_prefix = prefix if dst_prefix is None else dst_prefix
        u = resize_tokens(u[:, prefix:], 0, src, dst)
        if dst_prefix:
            u = torch.cat([u.new_zeros(u.shape[0], dst_prefix, u.shape[2]), u], dim=1)
        return self.proj(u)


class RelationMixer(nn.Module):
    """1x1-conv MLP over stacked attention logits (B, M, n, n): M -> ratio*M -> M, last conv zero."""

    def __init__(self, channels: int, ratio: float = 3.0) -> None:
        super().__init__()
        hidden = max(1, round(channels * ratio))
        self.fc1 = nn.Conv2d(channels, hidden, 1)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden, channels, 1)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, rel: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(rel)))
