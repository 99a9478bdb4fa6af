"""Reuse between the members of a multi-resolution cascade (DVT's feature and relation reuse), model-free.

A cascade whose members see the same image at increasing token grids hands each member what the previous
one computed. These pieces know token layouts, not models:

* :func:`resize_grid` resizes a (B, C, h, w) map the way DVT's official code does: a nearest-neighbour
  upsample by the smallest whole factor that reaches the target, then an adaptive average pool to it
  (7 -> 14 -> 10, 10 -> 20 -> 14). Pooling after a nearest upsample averages whole source cells with area
  weights, so no new values are invented and a same-size resize is the identity. Both steps are separable
  and each output cell reads one or two source cells per axis, so the resize runs as a few weighted row
  gathers per axis (:func:`resize_taps`) on the tensors' own layout: no upsampled intermediate, no transposes
  (the upsample + pool took ~9% of a DVT cascade's CPU time on deit_small, the transposes around it ~5%).
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

import functools
import math

import torch
from torch import nn

Grid = tuple[int, int]


def tap_lists(src: int, dst: int) -> tuple[list[list[int]], list[list[float]]]:
    """:func:`resize_taps` as Python lists (index, weight), each T rows of ``dst`` values: plain integer arithmetic,
    which dynamo folds into constants (see :func:`resize_axis`)."""
    f = max(1, math.ceil(dst / src))
    length = src * f
    cells: list[dict[int, int]] = []
    for i in range(dst):
        start, stop = (i * length) // dst, -(-((i + 1) * length) // dst)
        counts: dict[int, int] = {}
        for j in range(start, stop):
            counts[j // f] = counts.get(j // f, 0) + 1
        cells.append(counts)
    taps = max(len(c) for c in cells)
    index = [[0] * dst for _ in range(taps)]
    weight = [[0.0] * dst for _ in range(taps)]
    for i, counts in enumerate(cells):
        total = sum(counts.values())
        for t, (cell, count) in enumerate(sorted(counts.items())):
            index[t][i], weight[t][i] = cell, count / total
    return index, weight


@functools.cache
def resize_taps(src: int, dst: int) -> tuple[torch.Tensor, torch.Tensor]:
    """DVT's resize along one axis as weighted taps: ``(index, weight)``, each (T, dst), with
    ``out[i] = sum_t weight[t, i] * x[index[t, i]]``.

    The axis is nearest-upsampled by ``f = ceil(dst / src)`` (upsampled cell ``j`` is source cell ``j // f``),
    then adaptive-average-pooled to ``dst`` (output ``i`` averages upsampled cells ``floor(i L / dst)`` up to
    ``ceil((i + 1) L / dst)``, ``L = src f``). Unused taps point at cell 0 with weight 0.

    Example:
        >>> index, weight = resize_taps(2, 3)
        >>> index.tolist(), weight.tolist()
        ([[0, 0, 1], [0, 1, 0]], [[1.0, 0.5, 1.0], [0.0, 0.5, 0.0]])
    """
    index, weight = tap_lists(src, dst)
    return torch.tensor(index, dtype=torch.long), torch.tensor(weight, dtype=torch.float32)


def resize_axis(x: torch.Tensor, dim: int, dst: int) -> torch.Tensor:
    """Resize dimension ``dim`` of ``x`` to ``dst`` cells with :func:`resize_taps` (any other dims stay)."""
    src = x.shape[dim]
    if src == dst:
        return x
    if torch.compiler.is_compiling():
        # Under torch.compile the taps are two constants of the graph, made from the lists dynamo folds: a cached
        # tensor would be guarded on, and computing the taps with tensor arithmetic (as an export may) put about 20
        # ops per resize into the graph: a DVT member with relation reuse resizes 4 times per block, and those ops
        # were most of what inductor compiled (DVT compiled in 11x the base model's time).
        lists = tap_lists(src, dst)
        index = torch.tensor(lists[0], dtype=torch.long, device=x.device)
        weight = torch.tensor(lists[1], dtype=torch.float32, device=x.device).to(x.dtype)
    else:
        index, weight = resize_taps(src, dst)
        index, weight = index.to(x.device), weight.to(device=x.device, dtype=x.dtype)
    shape = [1] * x.dim()
    shape[dim] = dst
    if index.shape[0] == 2:  # the usual case (growing grids): one fused pass, w0 x0 + w1 x1 with w0 + w1 = 1
        x0, x1, w1 = x.index_select(dim, index[0]), x.index_select(dim, index[1]), weight[1].view(shape)
        if torch.compiler.is_exporting():  # exporters spell lerp as two formulas and a Where: 6 passes, not 3
            return x0 + w1 * (x1 - x0)
        return torch.lerp(x0, x1, w1)
    out = x.index_select(dim, index[0]) * weight[0].view(shape)
    for t in range(1, index.shape[0]):
        out = out + x.index_select(dim, index[t]) * weight[t].view(shape)
    return out


def resize_grid(x: torch.Tensor, size: Grid) -> torch.Tensor:
    """(B, C, h, w) -> (B, C, H, W): nearest upsample by a whole factor per side, then adaptive average pool.

    Example:
        >>> resize_grid(torch.arange(4.).view(1, 1, 2, 2), (2, 2)).flatten().tolist()
        [0.0, 1.0, 2.0, 3.0]
        >>> resize_grid(torch.arange(4.).view(1, 1, 2, 2), (3, 3)).shape
        torch.Size([1, 1, 3, 3])
    """
    return resize_axis(resize_axis(x, -2, size[0]), -1, size[1])


def _resize_flat(x: torch.Tensor, dim: int, src: Grid, dst: Grid) -> torch.Tensor:
    """Resize dimension ``dim`` of ``x``, an h*w grid flattened row by row, to H*W."""
    dim = dim % x.dim()
    x = x.unflatten(dim, src)
    x = resize_axis(resize_axis(x, dim, dst[0]), dim + 1, dst[1])
    return x.flatten(dim, dim + 1)


def resize_tokens(tokens: torch.Tensor, prefix: int, src: Grid, dst: Grid) -> torch.Tensor:
    """(B, prefix + h*w, C) -> (B, prefix + H*W, C) with the patches resized and zeros for the prefix."""
    b, _, c = tokens.shape
    patches = _resize_flat(tokens[:, prefix:], 1, src, dst)
    if prefix == 0:
        return patches
    return torch.cat([patches.new_zeros(b, prefix, c), patches], dim=1)


def resize_relations(rel: torch.Tensor, prefix: int, src: Grid, dst: Grid) -> torch.Tensor:
    """(B, M, P+h*w, P+h*w) attention logits -> (B, M, P+H*W, P+H*W) (keys first, then queries).

    The prefix rows and columns are kept as they are (their patch parts resized along the other axis),
    DVT's "class row and column handled separately".
    """
    if tuple(src) == tuple(dst):
        return rel
    keys = _resize_flat(rel[..., prefix:], -1, src, dst)
    rel = torch.cat([rel[..., :prefix], keys], dim=-1) if prefix else keys
    queries = _resize_flat(rel[..., prefix:, :], -2, src, dst)
    return torch.cat([rel[..., :prefix, :], queries], dim=-2) if prefix else queries.contiguous()


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
        # A 1x1 convolution is a matmul over channels; written as one, it avoids the CPU's slow convolution
        # path for these maps (16 ms a call on deit_small) and counts the same MACs.
        h = self.act(_conv1x1(self.fc1, rel))
        return _conv1x1(self.fc2, h)


def _conv1x1(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)`` for a 1x1 convolution, as a matmul over the channels of (B, C, h, w) ``x``."""
    out = torch.matmul(conv.weight.flatten(1), x.flatten(2))
    if conv.bias is not None:
        out = out + conv.bias.view(1, -1, 1)
    return out.unflatten(2, x.shape[2:])
