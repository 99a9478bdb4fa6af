"""The region / sub-patch layout of a token grid, and pooling a token map over it.

A grid of (H, W) tokens is cut into ``region`` x ``region`` token regions and, at each level k, into
sub-patches of side ``sizes[k]`` (level 0 is the finest, usually side 1: the tokens themselves). Every
level's sub-patches are the *candidates* of that level; :class:`RegionLayout` holds the index tables that
map tokens, candidates, regions and coarser cells onto each other, and :func:`pool_subpatches` averages a
token map over the sub-patches.

Grids the region size does not divide are handled as padded grids with the padding excluded: border regions
and sub-patches are cut short at the grid border (14 = 4 + 4 + 4 + 2) and every average is over the real
tokens only (sums divided by the real-token count). A sub-patch with no real token does not exist. Nothing
is resized. Pure tensor code: it knows nothing about what chooses the levels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vitconvert.layers.compiled import graph_tracing

__all__ = ["RegionLayout", "make_layout", "pool_subpatches", "sum_pool"]


@dataclass
class RegionLayout:
    """Index tables for one (H, W) grid. Candidates are every level's sub-patches, finest first (with side 1
    the finest are the tokens themselves); a region's sub-patches are cut short at the grid border."""

    hw: tuple[int, int]
    sizes: list[int]  # sub-patch side in tokens per level (1 = finest)
    counts: list[int]  # sub-patches per level
    regions: tuple[int, int]
    cand_region: torch.Tensor  # (T,) region of each candidate
    cand_gran: torch.Tensor  # (T,) level of each candidate
    tok_region: torch.Tensor  # (HW,) region of each token
    tok_cand: torch.Tensor  # (K, HW) candidate covering each token at each level
    tok_cand_t: torch.Tensor  # (HW, K) the same, transposed for gathers
    nq: torch.Tensor  # (R, K) candidates a region holds at each level
    inv: dict[int, torch.Tensor]  # sub-patch side -> (n,) 1 / real tokens in each sub-patch
    # For maps of level-k cells (k >= 1) mixing the candidates of several levels:
    cell_cand: dict[int, torch.Tensor]  # k -> (n_k, K) candidate of level g covering each level-k cell (g >= k)
    cand_cell: dict[int, torch.Tensor]  # k -> (T,) level-k cell holding each candidate (used for finer ones)
    cand_weight: dict[int, torch.Tensor]  # k -> (T,) real tokens of the candidate / real tokens of that cell
    halo_tok: torch.Tensor | None  # (R, (S+2)^2) each region's tokens with a 1-token ring, -1 off the grid
    region_tok: torch.Tensor | None  # (R, S^2) each region's tokens; both None unless S divides the grid
    tok_local: torch.Tensor  # (HW,) position of each token inside its region (raster)
    region: int = 4

    def bounds(self, n_full: int) -> list[int]:
        """Column bounds of each level's candidates when the first holds ``n_full`` full-size rows."""
        out = [0, n_full]
        for n in self.counts[1:]:
            out.append(out[-1] + n)
        return out

    @property
    def num_regions(self) -> int:
        return self.regions[0] * self.regions[1]


def sum_pool(m: torch.Tensor, f: int) -> torch.Tensor:
    """(B, h, w, C) -> (B, ceil(h/f), ceil(w/f), C) sums over f x f cells (zero padding at the border).

    Strided maps (the patch tokens after prefix tokens): adds of strided views, so the map is read once and,
    unless the grid needs padding, never copied whole. On CPU these memory-bound passes can eat the saved matmul time if
    written carelessly (``avg_pool2d`` on the prefix-sliced token map first copies it).
    """
    b, h, w, c = m.shape
    nchw = m.permute(0, 3, 1, 2)
    # The ONNX exporter drops divisor_override (AveragePool has none): an exported graph would average, not sum. A
    # compiled graph takes the adds too: its compiler chooses the layouts, and with a run-time batch size the layout
    # test cannot be decided while tracing.
    if not graph_tracing() and nchw.is_contiguous(memory_format=torch.channels_last):
        # A whole channels-last map (PVT-v2, or ViT without prefix tokens): the native pooling kernel reads
        # it once, several times faster than the adds below. ceil_mode + divisor 1: sums over real tokens.
        out = F.avg_pool2d(nchw, f, ceil_mode=True, divisor_override=1)
        return out.permute(0, 2, 3, 1)
    ph, pw = (-h) % f, (-w) % f
    if ph or pw:
        m = F.pad(m, (0, 0, 0, pw, 0, ph))
    if torch.compiler.is_exporting():
        # In an exported graph, one ReduceSum per direction, each over the middle axis of a 3-D view (a pattern
        # onnxruntime reduces without transposing): the strided adds below export as Split + Add chains that copy
        # the map before adding it (a quarter of DGE's kernel time on PVT-v2-b1's hidden-width maps).
        cols = m.reshape(b * (h + ph) * ((w + pw) // f), f, c).sum(1)
        return cols.reshape(b * ((h + ph) // f), f, ((w + pw) // f) * c).sum(1).reshape(
            b, (h + ph) // f, (w + pw) // f, c)
    cols = m.reshape(b, h + ph, (w + pw) // f, f, c)
    s = cols[:, :, :, 0].clone()
    for j in range(1, f):
        s += cols[:, :, :, j]
    rows = s.view(b, (h + ph) // f, f, (w + pw) // f, c)
    out = rows[:, :, 0].clone()
    for i in range(1, f):
        out += rows[:, :, i]
    return out


def pool_subpatches(m: torch.Tensor, lay: RegionLayout, needed: Sequence[int]) -> dict[int, torch.Tensor]:
    """(B, h, w, C) map -> {sub-patch side p: (B, n_p, C) averages over the real tokens of each sub-patch}.

    Each p is summed from the largest side already computed that tiles it (4 from 2 from 1) and only the
    sides in ``needed`` (and their sources) are computed. ``needed`` may hold any side of ``lay.sizes[1:]``
    and the region side.
    """
    b, _, _, c = m.shape
    needed = sorted(set(needed))
    sources = {p: max(d for d in [1, *needed] if d < p and p % d == 0) for p in needed}
    sums: dict[int, torch.Tensor] = {1: m}
    for p in needed:
        sums[p] = sum_pool(sums[sources[p]], p // sources[p])
    # Scale once every sum exists (coarser sums are built from finer ones); in place unless autograd records
    # (the pooling kernel's backward keeps its input).
    scale = {p: lay.inv[p].to(m.dtype).unsqueeze(-1) for p in needed}
    if torch.is_grad_enabled():
        return {p: sums[p].reshape(b, -1, c) * scale[p] for p in needed}
    return {p: sums[p].view(b, -1, c).mul_(scale[p]) for p in needed}


def make_layout(hw: tuple[int, int], region: int, sizes: Sequence[int], device: torch.device) -> RegionLayout:
    """The tables of an (H, W) grid cut into ``region``-side regions and, per level, ``sizes[k]``-side
    sub-patches (finest first; every size divides ``region``)."""
    h, w = hw
    rh, rw = -(-h // region), -(-w // region)
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    cand_region, cand_gran, tok_cand, counts = [], [], [], []
    offset = 0
    for k, p in enumerate(sizes):
        ch, cw = -(-h // p), -(-w // p)
        cy, cx = torch.meshgrid(torch.arange(ch), torch.arange(cw), indexing="ij")
        cand_region.append(((cy * p // region) * rw + cx * p // region).flatten())
        cand_gran.append(torch.full((ch * cw,), k))
        tok_cand.append(offset + (ys // p) * cw + xs // p)
        counts.append(ch * cw)
        offset += ch * cw
    cr, cg = torch.cat(cand_region), torch.cat(cand_gran)
    nq = torch.zeros(rh * rw, len(sizes))
    nq.index_put_((cr, cg), torch.ones(len(cr)), accumulate=True)
    tc = torch.stack(tok_cand)
    ones = torch.ones(1, h, w, 1, dtype=torch.float64)
    real = {p: sum_pool(ones, p).flatten() for p in {*sizes, region}}  # real tokens per sub-patch
    inv = {p: (1.0 / real[p]).float().to(device) for p in {*sizes[1:], region}}
    # Origin token of every candidate, and the tables of maps of level-k cells.
    origin = torch.cat([torch.stack(torch.meshgrid(torch.arange(-(-h // p)) * p, torch.arange(-(-w // p)) * p,
                                                   indexing="ij"), -1).reshape(-1, 2) for p in sizes])
    cand_tokens = torch.cat([real[p] for p in sizes])
    cell_cand, cand_cell, cand_weight = {}, {}, {}
    for k, p in enumerate(sizes[1:], start=1):
        cw = -(-w // p)
        first = origin[sum(counts[:k]): sum(counts[:k + 1])]  # cells of level k = its candidates
        cell_cand[k] = tc[:, first[:, 0] * w + first[:, 1]].t().contiguous().to(device)
        cell = (origin[:, 0] // p) * cw + origin[:, 1] // p
        cand_cell[k] = cell.to(device)
        cand_weight[k] = (cand_tokens / real[p][cell]).float().to(device)
    halo_tok = region_tok = None
    if h % region == 0 and w % region == 0:
        ry, rx = torch.meshgrid(torch.arange(rh) * region, torch.arange(rw) * region, indexing="ij")
        oy, ox = torch.meshgrid(torch.arange(-1, region + 1), torch.arange(-1, region + 1), indexing="ij")
        hy, hx = ry.reshape(-1, 1) + oy.reshape(1, -1), rx.reshape(-1, 1) + ox.reshape(1, -1)
        inside = (hy >= 0) & (hy < h) & (hx >= 0) & (hx < w)
        halo_tok = torch.where(inside, hy * w + hx, -1).to(device)
        ring = ((oy >= 0) & (oy < region) & (ox >= 0) & (ox < region)).reshape(-1)
        region_tok = halo_tok[:, ring].contiguous()
    return RegionLayout(
        hw=hw, sizes=list(sizes), counts=counts, regions=(rh, rw), cand_region=cr.to(device),
        cand_gran=cg.to(device), tok_region=((ys // region) * rw + xs // region).to(device), tok_cand=tc.to(device),
        tok_cand_t=tc.t().contiguous().to(device), nq=nq.to(device), inv=inv, cell_cand=cell_cand,
        cand_cell=cand_cell, cand_weight=cand_weight, halo_tok=halo_tok, region_tok=region_tok,
        tok_local=((ys % region) * region + xs % region).to(device), region=region,
    )
