"""Ragged execution of a selected subset of queries: each image of a batch keeps a different set of rows.

The candidates of a token grid (see :mod:`vitconvert.layers.regions`) are the full-resolution tokens
(prefix tokens included) followed by each coarser level's pooled table. A boolean selection ``qsel``
(B, T) says which candidates of each image are queries; the classes below gather those rows, run the
attention core on them against per-image keys/values, and give every token the row of the query
covering it (``to_tokens``):

* :class:`PackedQueries`: the batch's queries as one (M, C) matrix, no padding for per-row layers, padding
  only around the attention core (the default for inference);
* :class:`PaddedQueries`: each image's queries padded to the batch's largest count, (B, L, C);
* :class:`AllQueries`: every candidate as a query, (B, T, C), for dense training paths that combine the
  levels afterwards;
* :class:`UniformQueries`: images whose regions all take one level, each with that level's whole cell map as
  its queries (a dense batch at the level's resolution);
* :class:`TokenQueries`: every token as a query row holding the state of the query covering it, (B, N, C):
  the selection run densely, in the base model's shapes (a coarse query's row repeated over its sub-patch),
  for blocks where gathering and scattering the selected rows costs more than it saves. Rows attend and
  pass per-row layers independently, so each token gets exactly the result of the query covering it.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

__all__ = ["AllQueries", "PackedQueries", "PaddedQueries", "QuerySelection", "TokenQueries", "TracedQueries",
           "UniformQueries", "attend_batched"]


class PackedQueries:
    """The batch's selected queries as one (M, C) matrix, grouped by where their rows come from: the
    full-resolution map (prefix and finest tokens), then each coarser level's pooled table; image after
    image inside each group.

    Norms, linear layers and MLPs run on the M rows with no padding. Only the attention core is padded per
    image to the batch's largest query count (one batched SDPA call): per-image calls are far slower on
    CPU (each small parallel call pays thread start-up), and the core is a small share of a block's MACs.
    Row order inside an image does not matter: queries attend independently.
    """

    def __init__(self, qsel: torch.Tensor, tok_src: torch.Tensor, bounds: list[int], sizes: list[int],
                 gates: torch.Tensor) -> None:
        """
        Args:
            qsel: (B, T) which candidates of each image are queries.
            tok_src: (B, N) the candidate covering each token (prefix included).
            bounds: Column bounds of each level's candidates in ``qsel``.
            sizes: Sub-patch side of each level (finest first).
            gates: (B, R) level of each region (kept for per-level layers).
        """
        b, t = qsel.shape
        dev = qsel.device
        groups = [qsel[:, s:e] for s, e in itertools.pairwise(bounds)]
        counts = [g.sum(1) for g in groups]
        self.nq = torch.stack(counts).sum(0)
        self.batch = b
        self.sizes = sizes
        self.gates = gates
        self.widths = [e - s for s, e in itertools.pairwise(bounds)]
        self.bounds = bounds
        self.src = [g.flatten().nonzero().squeeze(1) for g in groups]
        n = [s.numel() for s in self.src]
        self.offsets = [0, *itertools.accumulate(n)]
        self.m = self.offsets[-1]
        rows = torch.full((b, t), -1, dtype=torch.long, device=dev)
        for g, (s, e) in enumerate(itertools.pairwise(bounds)):
            rows[:, s:e][groups[g]] = torch.arange(self.offsets[g], self.offsets[g + 1], device=dev)
        self.cand_rows = rows  # (B, T) row of each selected candidate, -1 for the others
        self.tok_rows = rows.gather(1, tok_src)  # (B, N) query row covering each token (prefix included)
        # Padding for the attention core: slot j of image i holds its rows group after group, padding
        # slots hold row 0; the way back is the inverse on the real slots.
        self.length = int(self.nq.max())
        j = torch.arange(self.length, device=dev).unsqueeze(0)
        pad = torch.zeros(b, self.length, dtype=torch.long, device=dev)
        before = torch.zeros(b, 1, dtype=torch.long, device=dev)
        for g, c in enumerate(counts):
            c = c.unsqueeze(1)
            first = self.offsets[g] + c.cumsum(0) - c
            pad = torch.where((j >= before) & (j < before + c), first + j - before, pad)
            before = before + c
        real = (j < before).flatten()
        self.pad_src = pad.flatten()
        self.unpad = torch.empty(self.m, dtype=torch.long, device=dev)
        self.unpad[self.pad_src[real]] = torch.arange(b * self.length, device=dev)[real]

    def gather(self, full: torch.Tensor, pooled: dict[int, torch.Tensor]) -> torch.Tensor:
        """Query rows from the (B, N, C) full-resolution map and the (B, n_p, C) pooled tables."""
        c = full.shape[-1]
        tables = [full if g == 0 else pooled[self.sizes[g]] for g in range(len(self.src))]
        if torch.is_grad_enabled():
            # Autograd does not record ``out=`` writes (saliency maps, attacks, or a forgotten no_grad).
            return torch.cat([t.reshape(-1, c).index_select(0, src) for t, src in zip(tables, self.src, strict=True)])
        out = full.new_empty(self.m, c)
        for table, src, s, e in zip(tables, self.src, self.offsets, self.offsets[1:], strict=False):
            if e > s:
                torch.index_select(table.reshape(-1, c), 0, src, out=out[s:e])
        return out

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout: float,
               bias: torch.Tensor | None = None) -> torch.Tensor:
        """(M, D) queries against per-image (B, h, Nk, d) keys/values -> (M, D); ``bias`` per padded slot
        (:meth:`slot_cands`)."""
        d = q.shape[-1]
        padded = q.index_select(0, self.pad_src).view(self.batch, self.length, d)
        o = attend_batched(padded, k, v, dropout, bias)
        return o.reshape(-1, d).index_select(0, self.unpad)

    def to_tokens(self, t: torch.Tensor) -> torch.Tensor:
        """Per-query rows -> (B, N, D): every token takes the row of the query covering it."""
        return t.index_select(0, self.tok_rows.flatten()).view(self.batch, -1, t.shape[-1])

    def row_cands(self) -> torch.Tensor:
        """(M,) the candidate each query row holds."""
        return torch.cat([s % w + b for s, w, b in zip(self.src, self.widths, self.bounds, strict=False)])

    def slot_cands(self) -> torch.Tensor:
        """(B, L) the candidate each slot of the padded attention core holds (padding: some real candidate)."""
        return self.row_cands().index_select(0, self.pad_src).view(self.batch, self.length)

    def level_rows(self, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rows of the group-``k`` queries, their image and their column inside the group."""
        src = self.src[k]
        rows = torch.arange(self.offsets[k], self.offsets[k + 1], device=src.device)
        return rows, src // self.widths[k], src % self.widths[k]

    @property
    def flat_tok_rows(self) -> torch.Tensor:
        """(B, N) row of the flat query matrix covering each token."""
        return self.tok_rows


class PaddedQueries:
    """The selected queries of each image padded to the batch's largest count: (B, L, C)."""

    def __init__(self, qsel: torch.Tensor, tok_src: torch.Tensor, bounds: list[int], sizes: list[int],
                 gates: torch.Tensor) -> None:
        """Arguments as :class:`PackedQueries`."""
        b, t = qsel.shape
        pos = qsel.cumsum(1) - 1
        self.nq = pos[:, -1] + 1
        self.sizes = sizes
        self.gates = gates
        self.qsel = qsel
        self.bounds = bounds
        length = int(self.nq.max())
        target = torch.where(qsel, pos, length)
        idx = torch.zeros(b, length + 1, dtype=torch.long, device=qsel.device)
        idx.scatter_(1, target, torch.arange(t, device=qsel.device).expand(b, t))
        self.idx = idx[:, :length]  # padding slots point at candidate 0 (a real token; its output is unused)
        self.tok_rows = pos.gather(1, tok_src)
        # Flat (B * L) row numbers, for layers that work on the flattened rows.
        first = torch.arange(b, device=qsel.device).unsqueeze(1) * length
        self.cand_rows = torch.where(qsel, first + pos, -1)
        self.flat_tok_rows = first + self.tok_rows

    def level_rows(self, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Flat rows of the selected candidates of group ``k``, their image and their column in the group."""
        s, e = self.bounds[k], self.bounds[k + 1]
        img, col = self.qsel[:, s:e].nonzero().unbind(1)
        return self.cand_rows[img, s + col], img, col

    def gather(self, full: torch.Tensor, pooled: dict[int, torch.Tensor]) -> torch.Tensor:
        """(B, L, C) query rows from the full-resolution map and the pooled tables."""
        table = torch.cat([full, *(pooled[p] for p in self.sizes[1:])], dim=1)
        return table.gather(1, self.idx.unsqueeze(-1).expand(-1, -1, table.shape[-1]))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout: float,
               bias: torch.Tensor | None = None) -> torch.Tensor:
        return attend_batched(q, k, v, dropout, bias)

    def to_tokens(self, t: torch.Tensor) -> torch.Tensor:
        """(B, L, D) per-query rows -> (B, N, D)."""
        return t.gather(1, self.tok_rows.unsqueeze(-1).expand(-1, -1, t.shape[-1]))


class TracedQueries:
    """:class:`PackedQueries` as a traceable graph builds it (``torch.export``, ONNX): the batch's selected queries
    as one (M, C) matrix (image after image), padded per image to the batch's largest count only around the attention
    core; M and that length are known only at run time.

    The length is read with ``.item()`` and bounded with ``torch._check`` (at least one query per image: every
    region holds at least one candidate at its level, and 1 on a batch of no images; at most every candidate), so
    the exporter accepts the data-dependent size and no empty tensor reaches the block's layers but on a batch of no
    images, whatever mix of levels the routers chose. No ``out=`` writes, no in-place updates and no Python decision
    on the data.

    Why packed: per-row layers (norms, projections, the MLP) run on the M real rows. Padded to the largest count
    they ran on 1.7x as many rows on DeiT-S with random routers at half the GMACs (1.2x on PVT-v2-b1), where the
    eager model runs packed. Rows move as whole rows of flattened tables: ``index_select`` with 1-D flat row numbers,
    one ONNX ``Gather`` per move; ``torch.gather`` on (B, T, C) with an index expanded over the channels exports as
    ``Expand`` + ``GatherElements`` (an index tensor as large as the data, read per element), which took a quarter
    of onnxruntime's time on PVT-v2-b1.
    """

    def __init__(self, qsel: torch.Tensor, tok_src: torch.Tensor) -> None:
        """
        Args:
            qsel: (B, T) which candidates of each image are queries.
            tok_src: (B, N) the candidate covering each token (prefix included).
        """
        b, t = qsel.shape
        pos = qsel.long().cumsum(1) - 1  # slot of each selected candidate in its image's queries
        self.nq = pos[:, -1] + 1
        # the largest count, 1 on a batch of no images (a cascade's later stage when every image has left)
        length = torch.cat([self.nq, self.nq.new_ones(1)]).max().item()
        torch._check(length >= 1)
        torch._check(length <= t)
        self.batch, self.length, self.tokens, self.candidates = b, length, tok_src.shape[1], t
        first = self.nq.cumsum(0) - self.nq  # (B,) packed row of each image's first query
        # (M,) flat candidate row (of a (B * T, C) table) of each query, image after image, column order inside
        self.src = qsel.flatten().nonzero().squeeze(1)
        # (B * N,) packed row of the query covering each token
        self.tok_rows = (pos.gather(1, tok_src) + first.unsqueeze(1)).flatten()
        # Around the attention core: slot j of image i holds its packed row first + j; padding slots repeat the
        # image's last query (a real row; their outputs are never read back). Back: each row's own slot.
        j = torch.arange(length, device=qsel.device).unsqueeze(0)
        self.pad_rows = (first.unsqueeze(1) + torch.minimum(j, self.nq.unsqueeze(1) - 1)).flatten()
        self.unpad = (self.src // t) * length + pos.flatten().index_select(0, self.src)

    def gather(self, table: torch.Tensor) -> torch.Tensor:
        """(B, T, C) every candidate's row (the full-resolution map, then each level's pooled table) -> (M, C)."""
        return table.reshape(-1, table.shape[-1]).index_select(0, self.src)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout: float,
               bias: torch.Tensor | None = None) -> torch.Tensor:
        """(M, D) queries against per-image (B, h, Nk, d) keys/values -> (M, D); ``bias`` per padded slot
        (:meth:`slot_cands`)."""
        d = q.shape[-1]
        padded = q.index_select(0, self.pad_rows).view(self.batch, self.length, d)
        return attend_batched(padded, k, v, dropout, bias).reshape(-1, d).index_select(0, self.unpad)

    def row_cands(self) -> torch.Tensor:
        """(M,) the candidate each query row holds (for per-candidate rotary rows)."""
        return self.src % self.candidates

    def slot_cands(self) -> torch.Tensor:
        """(B, L) the candidate each padded slot of the attention core holds (for per-candidate attention biases)."""
        return self.row_cands().index_select(0, self.pad_rows).view(self.batch, self.length)

    def to_tokens(self, t: torch.Tensor) -> torch.Tensor:
        """(M, D) per-query rows -> (B, N, D): every token takes the row of the query covering it."""
        d = t.shape[-1]
        return t.index_select(0, self.tok_rows).view(self.batch, self.tokens, d)


class AllQueries:
    """Every candidate as a query (dense training paths): (B, T, C), combined by gates afterwards."""

    def __init__(self, sizes: list[int]) -> None:
        self.sizes = sizes

    def gather(self, full: torch.Tensor, pooled: dict[int, torch.Tensor]) -> torch.Tensor:
        return torch.cat([full, *(pooled[p] for p in self.sizes[1:])], dim=1)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout: float,
               bias: torch.Tensor | None = None) -> torch.Tensor:
        return attend_batched(q, k, v, dropout, bias)


class TokenQueries:
    """Every token as a query: (B, N, C) rows, each the state of the query covering its token (dense execution
    of a selection; see the module docstring). Row i of image b is token i, so no scatter back is needed."""

    def __init__(self, qsel: torch.Tensor, tok_src: torch.Tensor, n_full: int, sizes: list[int],
                 gates: torch.Tensor, cand_first: torch.Tensor | None = None, bounds: list[int] | None = None
                 ) -> None:
        """
        Args:
            qsel: (B, T) which candidates of each image are queries.
            tok_src: (B, N) the candidate covering each token (prefix included); below ``n_full`` the token itself.
            n_full: Columns of the full-resolution map (prefix and finest tokens) among the candidates.
            sizes: Sub-patch side of each level (finest first).
            gates: (B, R) level of each region.
            cand_first: (T,) first token each candidate covers; given, the queries' own rows are indexed too
                (:meth:`to_unique`, :meth:`from_unique`), for per-row layers that need not run on repeated rows.
            bounds: Column bounds of each level's candidates in ``qsel``; given (with ``cand_first``), the
                queries' own rows are ordered level after level (image after image inside a level), and
                ``level_offsets`` / ``level_cells`` say where each level's rows are and which row of that
                level's (B * n_k)-row map each one is, so per-level results are written without a token map.
        """
        self.nq = qsel.sum(1)
        self.gates = gates
        self.sizes = sizes
        self.tok_src = tok_src
        self.batch, self.tokens = tok_src.shape
        self.unique_rows: torch.Tensor | None = None
        self.unique_of: torch.Tensor | None = None
        self.level_offsets: list[int] | None = None
        self.level_cells: list[torch.Tensor] | None = None
        if cand_first is not None:
            # One row per query (the first token it covers), image after image, and for every token that row.
            img, cand = qsel.nonzero().unbind(1)
            if bounds is not None:
                edges = torch.tensor(bounds[1:-1], device=qsel.device)
                level = torch.bucketize(cand, edges, right=True)
                order = torch.argsort(level, stable=True)
                img, cand, level = img[order], cand[order], level[order]
                per_level = torch.bincount(level, minlength=len(bounds) - 1).tolist()
                self.level_offsets = [0, *itertools.accumulate(per_level)]
                widths = [e - s for s, e in itertools.pairwise(bounds)]
                self.level_cells = [img[s:e] * widths[k] + cand[s:e] - bounds[k] for k, (s, e) in
                                    enumerate(itertools.pairwise(self.level_offsets))]
            self.unique_rows = img * self.tokens + cand_first[cand]
            row_of = torch.full(qsel.shape, -1, dtype=torch.long, device=qsel.device)
            row_of[img, cand] = torch.arange(img.numel(), device=qsel.device)
            self.unique_of = row_of.gather(1, tok_src).flatten()
        # Only the tokens of coarser queries are rewritten: their flat row and the flat row of their query in
        # the table of the coarser levels' pooled candidates.
        coarse = tok_src >= n_full
        self.coarse_rows = coarse.flatten().nonzero().squeeze(1)
        img = self.coarse_rows // self.tokens
        self.coarse_src = img * (qsel.shape[1] - n_full) + tok_src.flatten()[self.coarse_rows] - n_full

    def gather(self, full: torch.Tensor, pooled: dict[int, torch.Tensor]) -> torch.Tensor:
        """(B, N, C) query rows: a copy of the full-resolution map with the coarse tokens' rows replaced."""
        c = full.shape[-1]
        # Contiguous, whatever the input's layout: a ViT without prefix tokens feeds its first block the patch
        # embedding's transposed (B, N, C) view plus the position embedding, which keeps that layout, and the rows
        # are written through a flat view below.
        out = full.clone(memory_format=torch.contiguous_format)
        if self.coarse_rows.numel():
            table = torch.cat([pooled[p] for p in self.sizes[1:]], dim=1).reshape(-1, c)
            rows = table.index_select(0, self.coarse_src)
            if torch.is_grad_enabled():
                out = out.reshape(-1, c).index_copy(0, self.coarse_rows, rows).view_as(full)
            else:
                out.view(-1, c).index_copy_(0, self.coarse_rows, rows)
        return out

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout: float,
               bias: torch.Tensor | None = None) -> torch.Tensor:
        return attend_batched(q, k, v, dropout, bias)

    def to_tokens(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def to_unique(self, t: torch.Tensor) -> torch.Tensor:
        """(B, N, D) token rows -> (M, D) one row per query (every token of a query holds the same row)."""
        assert self.unique_rows is not None
        return t.reshape(-1, t.shape[-1]).index_select(0, self.unique_rows)

    def from_unique(self, u: torch.Tensor) -> torch.Tensor:
        """(M, D) one row per query -> (B, N, D): every token takes its query's row."""
        assert self.unique_of is not None
        return u.index_select(0, self.unique_of).view(self.batch, self.tokens, u.shape[-1])


class UniformQueries:
    """Images whose regions all take one level: each image's queries are its prefix tokens and that level's whole
    cell map, (B, P + n_k, C) taken as they are from the pooled table (no gathers, no padding: a dense batch at
    the level's resolution); every token takes the row of its cell."""

    def __init__(self, prefix: int, size: int, tok_index: torch.Tensor, gates: torch.Tensor,
                 cands: torch.Tensor | None = None) -> None:
        """
        Args:
            prefix: Prefix tokens (always queries at full granularity).
            size: Sub-patch side of the level.
            tok_index: (P + HW,) the query row covering each token (prefix first).
            gates: (B, R) level of each region (the same in every region of an image).
            cands: (P + n_k,) the candidate of each query row (for per-candidate attention biases).
        """
        self.cands = cands
        self.prefix = prefix
        self.size = size
        self.tok_index = tok_index
        self.gates = gates

    def gather(self, full: torch.Tensor, pooled: dict[int, torch.Tensor]) -> torch.Tensor:
        if self.size == 1:  # the finest level: the tokens themselves
            return full
        cells = pooled[self.size]
        return torch.cat([full[:, :self.prefix], cells], dim=1) if self.prefix else cells

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout: float,
               bias: torch.Tensor | None = None) -> torch.Tensor:
        return attend_batched(q, k, v, dropout, bias)

    def to_tokens(self, t: torch.Tensor) -> torch.Tensor:
        """(B, P + n_k, D) query rows -> (B, P + HW, D)."""
        return t.index_select(1, self.tok_index)


def attend_batched(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout: float,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
    """(B, L, D) queries against (B, h, Nk, d) keys/values -> (B, L, D); ``bias`` (broadcast to (B, h, L, Nk)) is
    added to the attention logits (Swin's relative position bias and shift mask)."""
    b, length, d = q.shape
    qh = q.view(b, length, k.shape[1], -1).transpose(1, 2)
    if bias is not None and bias.dtype != qh.dtype:  # under autocast the projections' dtype, not the table's
        bias = bias.to(qh.dtype)
    o = F.scaled_dot_product_attention(qh, k, v, attn_mask=bias, dropout_p=dropout).transpose(1, 2)
    if bias is not None and torch.compiler.is_exporting():
        # A run-time query count and a mask: the exporter records the reshape below as a view of the fused kernel's
        # layout, then decomposes the kernel into one with another layout; a copy in (B, L, heads, d) keeps it a
        # view (as :func:`vitconvert.layers.seams.sdpa_with_bias` does).
        o = o.clone(memory_format=torch.contiguous_format)
    return o.reshape(b, length, d)


QuerySelection = PackedQueries | PaddedQueries | AllQueries | TokenQueries | UniformQueries | TracedQueries
