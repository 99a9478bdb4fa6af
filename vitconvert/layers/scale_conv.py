"""A 3x3 depthwise convolution (PVT-v2's MLP) evaluated at each query's own scale.

Queries of mixed levels (see :mod:`vitconvert.layers.regions`) define a piecewise-constant hidden map:
every token takes the state of the query covering it. A query of sub-patch side p gets the convolution
evaluated at its own scale: the map averaged over p x p cells (real tokens only), convolved with the
kernel folded to that scale (:func:`fold_kernel`). At side 1 this is the convolution itself; with one level
everywhere it equals the full-resolution convolution of the map averaged over each cell (also for the
short cells at the bottom and right border of a grid p does not divide, which are folded with their real
size, :func:`conv_at`); next to finer queries a coarse query sees its neighbours' cell averages instead of
their border tokens.

Two ways to run it:

* :func:`dwconv_all` (dense training paths): every level's cell map built from the gated full map,
  each convolved whole.
* :func:`dwconv_selected` (inference): level-0 tokens are convolved from their regions' halo patches
  ((S+2)^2 tokens, read from the queries covering them) while at most :data:`HALO_MAX_SHARE` of the regions
  are at level 0; each used coarser level's cell map is then gathered at its own resolution from the selected
  queries (1/4 or 1/16 of the tokens, finer queries added into the cells next to coarse ones) and convolved.
  Above that share, and on grids the region size does not divide, the whole token map is built for level 0
  and the coarser cell maps are pooled from it (one native pooling pass beats adding the finer queries into
  the cells row by row at the hidden width).
* :func:`dwconv_tokens` (dense inference, every token a row): the same outputs from the token map.

:func:`dwconv_macs` gives the MACs each image would run alone, as :func:`vitconvert.count_macs` counts them.
Why all this: broadcasting hidden states to the full grid, convolving and pooling back cost more CPU time
than the skipped matmuls saved (PVT-v2-b1 at half the MACs: 1.17x faster that way, 1.55x this way;
``benchmarks/results/dge_speed.json``).
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

from vitconvert.layers.costs import conv_macs
from vitconvert.layers.ragged import PackedQueries, PaddedQueries
from vitconvert.layers.regions import RegionLayout, pool_subpatches

__all__ = ["HALO_MAX_SHARE", "conv_at", "conv_at_cells", "dwconv_all", "dwconv_macs", "dwconv_selected",
           "dwconv_tokens", "fold_kernel", "use_halo"]


def fold_kernel(weight: torch.Tensor, cell: int | tuple[int, int]) -> torch.Tensor:
    """3x3 depthwise kernel acting on averages of cells of ``cell`` = (n_h, n_w) real tokens (or n x n).

    Per dimension the fold is C w C^T / n with C = [[1,0,0],[n-1,n,n-1],[0,0,1]]: C[i, j] counts the output
    rows of an n-row cell that read neighbour cell i - 1 (above, itself, below) through kernel row j: the
    cell itself is read by all n rows through the centre tap and by n - 1 rows through each outer tap, the
    cell above only by the first row through the top tap, the cell below only by the last row. It needs
    only the cell's own real size: the neighbours are read through one row whatever their size. Written
    with slices, so MAC counters see no matmul.
    """
    nh, nw = (cell, cell) if isinstance(cell, int) else cell
    if nh == nw == 1:
        return weight

    def fold(w: torch.Tensor, dim: int, n: int) -> torch.Tensor:
        a, b, c = w.unbind(dim)
        return torch.stack([a, (n - 1) * (a + c) + n * b, c], dim)

    return fold(fold(weight, 2, nh), 3, nw) / (nh * nw)


def _conv_cells(conv: nn.Conv2d, x: torch.Tensor, cell: tuple[int, int], r0: int, r1: int, c0: int,
                c1: int) -> torch.Tensor:
    """Outputs [r0:r1, c0:c1] of the zero-padded 'same' convolution of the (B, D, ch, cw) cell map ``x`` with
    the kernel folded to ``cell``: only the strip and its one-cell ring are read."""
    ch, cw = x.shape[-2:]
    src = x[:, :, max(r0 - 1, 0):min(r1 + 1, ch), max(c0 - 1, 0):min(c1 + 1, cw)]
    pad = (int(c0 == 0), int(c1 == cw), int(r0 == 0), int(r1 == ch))
    if any(pad):
        src = F.pad(src, pad)
    return F.conv2d(src, fold_kernel(conv.weight, cell), conv.bias, groups=conv.groups)


def conv_at(conv: nn.Conv2d, fmap: torch.Tensor, p: int, hw: tuple[int, int]) -> torch.Tensor:
    """(B, ch, cw, D) map of p x p cell averages of an ``hw`` token grid -> (B, ch, cw, D) depthwise
    convolution at that scale.

    Where p does not divide the grid, the last cell row / column holds fewer real tokens than p: one
    convolution with the full-size fold, then those cells again with kernels folded to their real size
    (thin strips; :func:`conv_at_cells` counts them).
    """
    x = fmap.permute(0, 3, 1, 2)
    out = F.conv2d(x, fold_kernel(conv.weight, p), conv.bias, padding=1, groups=conv.groups)
    ch, cw = x.shape[-2:]
    nh, nw = hw[0] - (ch - 1) * p, hw[1] - (cw - 1) * p  # real rows / columns of the last cells
    short_h, short_w = nh < p, nw < p
    if short_h and cw - short_w > 0:  # the last cell row, its corner aside
        out[:, :, ch - 1:, :cw - short_w] = _conv_cells(conv, x, (nh, p), ch - 1, ch, 0, cw - short_w)
    if short_w and ch - short_h > 0:  # the last cell column, its corner aside
        out[:, :, :ch - short_h, cw - 1:] = _conv_cells(conv, x, (p, nw), 0, ch - short_h, cw - 1, cw)
    if short_h and short_w:
        out[:, :, ch - 1:, cw - 1:] = _conv_cells(conv, x, (nh, nw), ch - 1, ch, cw - 1, cw)
    return out.permute(0, 2, 3, 1)


def conv_at_cells(hw: tuple[int, int], p: int) -> int:
    """Output cells :func:`conv_at` computes per image and channel on an ``hw`` grid at scale p: the whole
    cell map, plus its short last row and column once more."""
    ch, cw = -(-hw[0] // p), -(-hw[1] // p)
    sh, sw = int(hw[0] % p != 0), int(hw[1] % p != 0)
    return 2 * ch * cw - (ch - sh) * (cw - sw)


def dwconv_all(conv: nn.Conv2d, hidden: torch.Tensor, hw: tuple[int, int], lay: RegionLayout,
               gate_tok: torch.Tensor) -> torch.Tensor:
    """Dense path: (B, T, D) hidden states of every candidate -> their convolution outputs (B, T, D).

    ``gate_tok`` (B, HW, K) is the one-hot level of each token; the full map takes each token's state at
    its level, and every level's cell map is pooled from it."""
    b, _, d = hidden.shape
    grid = sum(gate_tok[..., k:k + 1] * hidden.index_select(1, lay.tok_cand[k]) for k in range(len(lay.sizes)))
    fmap = grid.view(b, hw[0], hw[1], d)
    pooled = {1: grid, **pool_subpatches(fmap, lay, lay.sizes[1:])}
    outs = [conv_at(conv, pooled[p].view(b, -(-hw[0] // p), -(-hw[1] // p), d), p, hw).reshape(b, -1, d)
            for p in lay.sizes]
    return torch.cat(outs, dim=1)


# Level-0 tokens are convolved from halo patches while at most this share of the regions is at level 0;
# above it one convolution of the whole token map is faster on CPU (the patches read 2.25x the tokens). On the
# benchmark CPU (oneDNN, channels-last) the 6x6 patches of half the regions convolve in about half the time of
# the whole map, and the coarser cells are then averaged from the patches instead of pooled from a whole
# hidden-width map (``benchmarks/results/wallclock.json``: the PVT-v2 rows).
HALO_MAX_SHARE = 0.6


def use_halo(level0: torch.Tensor, lay: RegionLayout) -> torch.Tensor:
    """Whether level-0 regions go through halo patches, from the level-0 mask of one image or of a batch."""
    return (level0.float().mean(-1) <= HALO_MAX_SHARE) & (lay.halo_tok is not None)


def dwconv_macs(conv: nn.Conv2d, gates: torch.Tensor, lay: RegionLayout) -> torch.Tensor:
    """(B,) MACs of the convolution for each image run alone (as ``count_macs`` counts it), given its (B, R)
    region levels. In a batch the halo-or-whole-map choice is made for the batch, so a batch may compute more."""
    per_cell = conv_macs(1, conv)
    level = gates.reshape(gates.shape[0], -1)
    macs = torch.zeros(level.shape[0], dtype=torch.float64, device=gates.device)
    halo = use_halo(level == 0, lay)
    for k, p in enumerate(lay.sizes):
        used = (level == k).sum(1).to(torch.float64)
        # One convolution over the level's cell map (with its short border cells again).
        whole_map = per_cell * conv_at_cells(lay.hw, p) * (used > 0).to(torch.float64)
        if k == 0 and lay.region_tok is not None:  # or halo patches: the level-0 regions' tokens only
            macs += torch.where(halo, per_cell * lay.region_tok.shape[1] * used, whole_map)
        else:
            macs += whole_map
    return macs


def dwconv_selected(conv: nn.Conv2d, table: torch.Tensor, hw: tuple[int, int], lay: RegionLayout,
                    q: PackedQueries | PaddedQueries) -> torch.Tensor:
    """Inference: (R + 1, D) hidden rows of the selected queries and a last row of zeros (read off the grid)
    -> the (R, D) convolution outputs of the queries (``q.gates``: the (B, R) level of each region).

    Without autograd, packed outputs are written over ``table``'s own rows once every level has read them: one
    hidden-width buffer less to allocate and fault in (large CPU buffers are fresh pages on every call)."""
    r, d = table.shape[0] - 1, table.shape[1]
    hidden = table[:r]
    gates = q.gates
    b = gates.shape[0]
    levels = [q.level_rows(k) for k in range(len(lay.sizes))]  # (rows, image, column) of each level
    level0 = gates == 0
    whole_map = bool(levels[0][0].numel()) and not bool(use_halo(level0.flatten(), lay))
    start = [0, *itertools.accumulate(lay.counts)]
    results: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]] = []  # written once every level is read

    def put(k: int, rows: torch.Tensor, res: torch.Tensor, index: torch.Tensor) -> None:
        """out[rows] = res[index], once every level's inputs have been read."""
        results.append((k, rows, res, index))

    pooled: dict[int, torch.Tensor] | None = None  # cell maps pooled from the whole token map, once it is built
    fine_cells: dict[int, torch.Tensor] = {}  # level k -> the level-0 regions' level-k cells (halo patches)
    fine_regions: tuple[torch.Tensor, torch.Tensor] | None = None  # (image, region) of each halo patch
    for k, p in enumerate(lay.sizes):
        rows, img, col = levels[k]
        if not rows.numel():
            continue
        if k == 0 and not whole_map:
            # Each level-0 region with a one-token ring (the ring reads the queries covering it): a valid
            # 3x3 convolution of (S+2)^2 tokens gives its S^2 outputs.
            assert lay.halo_tok is not None
            img0, reg0 = level0.view(b, -1).nonzero().unbind(1)
            halo = lay.halo_tok[reg0]
            src = torch.where(halo >= 0, q.flat_tok_rows[img0.unsqueeze(1), halo.clamp(min=0)], r)
            side = lay.region + 2
            patches = table.index_select(0, src.flatten()).view(-1, side, side, d)
            res = F.conv2d(patches.permute(0, 3, 1, 2), conv.weight, conv.bias, groups=conv.groups)
            rank = level0.flatten().cumsum(0).view(b, -1) - 1  # patch number of each level-0 region
            squares = lay.region * lay.region
            put(0, rows, res.permute(0, 2, 3, 1).reshape(-1, d),
                rank[img, lay.tok_region[col]] * squares + lay.tok_local[col])
            # The level-0 regions' cells of the coarser levels used, averaged from the patches' inner S x S
            # tokens (strided adds; the regions are whole, the grid being divisible): what the coarser cell maps
            # hold there, without adding the level-0 rows into them one by one.
            sums, step = patches[:, 1:-1, 1:-1], 1
            for j in range(1, len(lay.sizes)):
                f = lay.sizes[j] // step
                sums = sum(sums[:, a::f, c::f] for a in range(f) for c in range(f))
                step = lay.sizes[j]
                if levels[j][0].numel():
                    fine_cells[j] = sums.reshape(-1, d) * (1.0 / (step * step))
            fine_regions = (img0, reg0)
            continue
        ch, cw = -(-hw[0] // p), -(-hw[1] // p)
        if k == 0:  # the whole token map
            fmap = table.index_select(0, q.flat_tok_rows.flatten()).view(b, ch, cw, d)
            put(0, rows, conv_at(conv, fmap, p, hw).reshape(-1, d), img * lay.counts[k] + col)
            # The coarser levels' cell maps are this piecewise-constant map averaged over their cells (a cell
            # under a coarser query holds its state, one of finer queries their average by real tokens): one
            # native pooling pass at the hidden width, instead of gathering the cells and adding the finer
            # queries into them row by row (an index_add at the hidden width, slow on CPU).
            used = [lay.sizes[j] for j in range(1, len(lay.sizes)) if levels[j][0].numel()]
            if used:
                pooled = pool_subpatches(fmap, lay, used)
            continue
        g_cell = gates[:, lay.cand_region[start[k]:start[k + 1]]]
        users = (g_cell == k).any(1).nonzero().squeeze(1)
        slot = torch.full((b,), -1, dtype=torch.long, device=gates.device)
        slot[users] = torch.arange(users.numel(), device=gates.device)
        if pooled is not None:
            # Only the images with level-k regions are convolved (what dwconv_macs counts).
            cells = pooled[p] if users.numel() == b else pooled[p].index_select(0, users)
            res = conv_at(conv, cells.view(-1, ch, cw, d), p, hw).reshape(-1, d)
            put(k, rows, res, slot[img] * lay.counts[k] + col)
            continue
        # Only the images with level-k regions, and of their finer queries only those in the ring of cells
        # the level-k queries read (the rest of the cell map is computed but never used).
        g_cell = g_cell[users]
        here = g_cell == k
        cand = lay.cell_cand[k].unsqueeze(0).expand(users.numel(), -1, -1).gather(2, g_cell.unsqueeze(-1)).squeeze(2)
        src = torch.where(g_cell >= k, q.cand_rows[users].gather(1, cand), r)
        cells = table.index_select(0, src.flatten())
        ring = F.max_pool2d(here.view(-1, 1, ch, cw).to(table.dtype), 3, 1, 1).flatten().bool()
        # Finer queries: averaged into their cells with their share of the cell's real tokens.
        for j, (rows_j, img_j, col_j) in enumerate(levels[:k]):
            if j == 0 and k in fine_cells and fine_regions is not None:  # from the halo patches, cell by cell
                img_f, reg_f = fine_regions
                keep = slot[img_f] >= 0
                side_k = lay.region // p  # cells per region side
                local = torch.arange(side_k * side_k, device=gates.device)
                ry, rx = (reg_f[keep] // lay.regions[1]).unsqueeze(1), (reg_f[keep] % lay.regions[1]).unsqueeze(1)
                at = (slot[img_f[keep]].unsqueeze(1) * lay.counts[k] + (ry * side_k + local // side_k) * cw
                      + rx * side_k + local % side_k)
                patch = keep.nonzero() * (side_k * side_k) + local  # (kept patches, cells per region)
                cells.index_copy_(0, at.flatten(), fine_cells[k].index_select(0, patch.flatten()))
                continue
            c = start[j] + col_j
            at = slot[img_j] * lay.counts[k] + lay.cand_cell[k][c]
            keep = (slot[img_j] >= 0) & ring[at.clamp(min=0)]
            if keep.any():
                rows_j, c, at = rows_j[keep], c[keep], at[keep]
                weight = lay.cand_weight[k][c].unsqueeze(1).to(hidden.dtype)  # the tables are float32
                cells.index_add_(0, at, hidden.index_select(0, rows_j) * weight)
        res = conv_at(conv, cells.view(-1, ch, cw, d), p, hw).reshape(-1, d)
        put(k, rows, res, slot[img] * lay.counts[k] + col)
    # Every packed row is a query and gets written: without autograd, over the hidden rows themselves (no longer
    # read), a packed group's rows as one block by one gather. Padded layouts keep zeros in their padding slots.
    if isinstance(q, PackedQueries) and not torch.is_grad_enabled():
        for k, _, res, index in results:
            torch.index_select(res, 0, index, out=hidden[q.offsets[k]:q.offsets[k + 1]])
        return hidden
    out = hidden.new_empty(r, d) if isinstance(q, PackedQueries) else hidden.new_zeros(r, d)
    for _, rows, res, index in results:  # autograd records index_copy_, not out= writes
        out.index_copy_(0, rows, res.index_select(0, index))
    return out


def dwconv_tokens(conv: nn.Conv2d, hidden: torch.Tensor, hw: tuple[int, int], lay: RegionLayout,
                  gates: torch.Tensor, queries: tuple[list[int], list[torch.Tensor]] | None = None) -> torch.Tensor:
    """Dense inference: (B, HW, D) hidden state of the query covering each token -> (B, HW, D) the convolution
    output of that query, for the (B, R) region levels ``gates``.

    The piecewise-constant token map is the map every level's cells are averaged from (a cell covered by a
    coarser query holds that query's state; one holding finer queries their average by real tokens), so this
    gives what :func:`dwconv_selected` gives each query, on every token it covers.

    With ``queries`` = (row offsets of each level, row of that level's (B * n_k)-row output map for each of its
    queries), as :class:`~vitconvert.layers.ragged.TokenQueries` orders the queries' own rows: the (M, D) outputs
    of the queries themselves, read straight from each level's map (no token map written for coarse levels).
    """
    b, n, d = hidden.shape
    fmap = hidden.view(b, hw[0], hw[1], d)
    out = conv_at(conv, fmap, 1, hw)  # the base model's convolution; right for every level-0 token
    if queries is not None:
        offsets, cells_of = queries
        maps = [out.reshape(-1, d)]
        used = [lay.sizes[k] for k in range(1, len(lay.sizes)) if offsets[k + 1] > offsets[k]]
        pooled = pool_subpatches(fmap, lay, used) if used else {}
        for p in lay.sizes[1:]:
            maps.append(conv_at(conv, pooled[p].view(b, -(-hw[0] // p), -(-hw[1] // p), d), p, hw).reshape(-1, d)
                        if p in pooled else out.new_empty(0, d))
        if torch.is_grad_enabled():
            return torch.cat([m.index_select(0, c) for m, c in zip(maps, cells_of, strict=True)])
        res = out.new_empty(offsets[-1], d)
        for m, c, s, e in zip(maps, cells_of, offsets, offsets[1:], strict=False):
            if e > s:
                torch.index_select(m, 0, c, out=res[s:e])
        return res
    level = gates.reshape(b, -1)[:, lay.tok_region]  # (B, HW) level of each token
    used_k = [k for k in range(1, len(lay.sizes)) if bool((level == k).any())]
    if not used_k:
        return out.reshape(b, n, d)
    flat = out.reshape(-1, d)
    pooled = pool_subpatches(fmap, lay, [lay.sizes[k] for k in used_k])
    first = [0, *itertools.accumulate(lay.counts)]
    for k in used_k:
        p = lay.sizes[k]
        cells = conv_at(conv, pooled[p].view(b, -(-hw[0] // p), -(-hw[1] // p), d), p, hw).reshape(-1, d)
        rows = (level == k).flatten().nonzero().squeeze(1)  # flat token rows at level k
        img, tok = rows // n, rows % n
        src = img * lay.counts[k] + lay.tok_cand[k][tok] - first[k]
        if torch.is_grad_enabled():
            flat = flat.index_copy(0, rows, cells.index_select(0, src))
        else:
            flat.index_copy_(0, rows, cells.index_select(0, src))
    return flat.view(b, n, d)
