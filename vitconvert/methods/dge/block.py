"""DGE's blocks: the router, the per-forward state a model shares with its blocks, and :class:`DGEBlock`, a block of the
base model running its queries at the granularity each region chose.

:class:`DGEBlock` replaces a block in place and adopts its children under their own names (state-dict keys do not
change). Per batch it runs one of four paths (see :mod:`vitconvert.methods.dge`): the base block itself, *sparse*
(the selected queries gathered, :mod:`vitconvert.layers.ragged`), *dense* (every token a query row holding its
query's state) or *split* (a dense batch per level); training runs the paper's dense path with straight-through
Gumbel gates. What depends on the family (the grid of a call, queries apart from keys and values, a convolution in
the MLP, attention inside windows) comes from the block's :class:`~vitconvert.backbones.family.Family`.

A block whose attention runs inside windows of its map (Swin, :class:`~vitconvert.backbones.family.WindowView`)
runs every path on its windows as a batch of short images: regions and routers per window (or per part of one),
keys and values of each window at full resolution, every query row with the bias of the positions it stands for
(:class:`WindowCall`); levels whose sub-patches would straddle a shifted window's masked regions are never chosen
in the regions where they would. An attention that applies positions itself (EVA's rotary embedding, BEiT's
relative position bias) gives every candidate the mean of its positions' rows for one forward
(:class:`~vitconvert.backbones.family.QueryPositions`): queries rotated, or biased per attention slot.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vitconvert.backbones.family import ConvMlp, Family, QueryAttention, QueryPositions, WindowView
from vitconvert.errors import AnatomyError
from vitconvert.layers.compiled import compile_region
from vitconvert.layers.ragged import (
    AllQueries,
    PackedQueries,
    PaddedQueries,
    QuerySelection,
    TokenQueries,
    TracedQueries,
    UniformQueries,
)
from vitconvert.layers.regions import RegionLayout, make_layout, pool_subpatches
from vitconvert.layers.scale_conv import conv_at, dwconv_all, dwconv_macs, dwconv_selected, dwconv_tokens
from vitconvert.layers.seams import apply_post_chain, is_tensor_scale, read_residual_block
from vitconvert.layers.sharing import attach
from vitconvert.methods.dge.execution import path_costs

# --- what a forward records, and the state the blocks share ------------------------------------------------


@dataclass
class Record:
    """What one block did in one forward: queries per image (differentiable in training), its gates."""

    block: int
    nq: torch.Tensor  # (B,)
    gates: torch.Tensor | None  # (B, Rh, Rw) granularity index (inference)
    router_ran: bool
    # (B,) MACs besides fixed + per_query * nq: PVT-v2's depthwise convolution on this path; with windows, the
    # attention core's padding slots (every window of an image as long as its fullest)
    conv_macs: torch.Tensor | None = None
    path: str = "sparse"  # how it ran (inference): sparse, dense (every token a row), split (by level) or base


# (block index, batch, regions, device) -> (batch, regions) granularity index of each region (long, 0 = finest).
GateOverride = Callable[[int, int, int, torch.device], torch.Tensor]


class Context:
    """State shared by the converted model and its DGE blocks for one forward pass (never registered)."""

    def __init__(self, region: int, granularities: list[int], layout: str, execution: str, tau: float) -> None:
        self.region = region
        self.sizes = [region // g for g in granularities]
        self.layout_mode = layout
        self.execution = execution
        # dense: the base blocks; sparse: DGE inference; traced: its traceable twin (export); train: DGE dense training
        self.mode = "dense"
        self.tau = tau
        self.shift = 0.0  # logit shift per coarseness rank (the knob)
        self.level: int | None = None  # all regions at this granularity, no router (knob at 1)
        # Gates from outside instead of the routers' choice (speed benchmarks, tests); None: the routers decide.
        self.gate_override: GateOverride | None = None
        self.records: list[Record] = []
        self._layouts: dict[tuple[int, int, str], RegionLayout] = {}
        self._first: dict[tuple[int, int, str, int], torch.Tensor] = {}
        self._uniform: dict[tuple[int, int, str, int, int], torch.Tensor] = {}

    def layout(self, hw: tuple[int, int], device: torch.device) -> RegionLayout:
        key = (int(hw[0]), int(hw[1]), str(device))
        if key not in self._layouts:
            lay = make_layout(key[:2], self.region, self.sizes, device)
            if torch.compiler.is_exporting():
                # Tensors made while torch.export traces are the tracer's, not real ones: built into the graph
                # (from arange, as constants it folds), never cached for the eager forwards that follow.
                return lay
            self._layouts[key] = lay
        return self._layouts[key]

    def cand_first(self, hw: tuple[int, int], device: torch.device, prefix: int) -> torch.Tensor:
        """(prefix + T,) the first token (prefix included) each candidate covers: the row a dense block runs
        for a query whose row repeats over its sub-patch."""
        key = (int(hw[0]), int(hw[1]), str(device), prefix)
        if key not in self._first:
            lay = self.layout(hw, device)
            k, n = lay.tok_cand.shape
            first = torch.full((sum(lay.counts),), n, dtype=torch.long, device=device)
            tokens = torch.arange(n, device=device).repeat(k)
            first.scatter_reduce_(0, lay.tok_cand.flatten(), tokens, "amin")
            self._first[key] = torch.cat([torch.arange(prefix, device=device), prefix + first])
        return self._first[key]

    def uniform_index(self, hw: tuple[int, int], device: torch.device, prefix: int, level: int) -> torch.Tensor:
        """(prefix + HW,) the row of each token in a query table of the prefix tokens and level ``level``'s whole
        cell map (:class:`~vitconvert.layers.ragged.UniformQueries`)."""
        key = (int(hw[0]), int(hw[1]), str(device), prefix, level)
        if key not in self._uniform:
            lay = self.layout(hw, device)
            first = sum(lay.counts[:level])
            self._uniform[key] = torch.cat([torch.arange(prefix, device=device), prefix + lay.tok_cand[level] - first])
        return self._uniform[key]

    @contextlib.contextmanager
    def run(self, mode: str) -> Iterator[list[Record]]:
        old = self.mode
        self.mode, self.records = mode, []
        try:
            yield self.records
        finally:
            self.mode = old
            self.records = []




@dataclass
class WindowCall:
    """One forward of a block whose attention runs inside windows (:class:`~vitconvert.backbones.family.WindowView`):
    its paths run on a batch of ``images x windows`` windows, image after image."""

    images: int
    windows: tuple[int, int]  # windows per image along each axis
    bias: torch.Tensor  # (windows or 1, heads, T, N): the attention bias of every candidate against every key
    cap: torch.Tensor | None  # (windows, R) the coarsest level each region may take (None: any)
    # the base block on the map, partitioned into windows; None on a map it was not built for (WindowView.native)
    base: Callable[[], torch.Tensor] | None
    rows: torch.Tensor | None = None  # window index (0..windows-1) of each row of a sub-batch; None: the whole batch

    @property
    def per_image(self) -> int:
        """Windows per image (spelled out, not the batch over the images: a cascade's stage may get no image)."""
        return self.windows[0] * self.windows[1]


def candidate_members(lay: RegionLayout) -> torch.Tensor:
    """(T, N) float: row t marks the grid positions candidate t of ``lay`` stands for (prefix tokens not included)."""
    n = lay.hw[0] * lay.hw[1]
    members = torch.zeros(sum(lay.counts), n, device=lay.tok_cand.device)
    members[lay.tok_cand.flatten(), torch.arange(n, device=members.device).repeat(len(lay.counts))] = 1.0
    return members


class TableCache:
    """A block's window tables per map (:meth:`DGEBlock._window_tables`), each valid while the block's tensors are
    the very ones it was made from: it holds them (so no other tensor can take their memory) with their in-place
    write counts (``_version``). A copy of the block starts empty."""

    def __init__(self) -> None:
        self._kept: dict[tuple[int, int], tuple[Any, list[torch.Tensor], list[int], Any]] = {}

    def get(self, hw: tuple[int, int], lay: RegionLayout, sources: list[torch.Tensor]) -> Any:
        kept = self._kept.get(hw)
        if kept is None or kept[0] is not lay or len(kept[1]) != len(sources):
            return None
        same = all(a.data_ptr() == b.data_ptr() and a.dtype == b.dtype and a.device == b.device and v == b._version
                   for a, b, v in zip(kept[1], sources, kept[2], strict=True))
        return kept[3] if same else None

    def put(self, hw: tuple[int, int], lay: RegionLayout, sources: list[torch.Tensor], value: Any) -> None:
        self._kept[hw] = (lay, [t.detach() for t in sources], [t._version for t in sources], value)

    def __deepcopy__(self, memo: dict[int, Any]) -> TableCache:
        return TableCache()


def window_tables(view: WindowView, lay: RegionLayout, hw: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The attention bias of every candidate of ``lay`` (a window's layout) against every position of its window,
    and the coarsest level each region of each window may take: a level is allowed in a region only when none of
    its sub-patches there straddles the window's masked regions (a shifted window's border; level 0, the tokens
    themselves, always is). ``hw`` is the map."""
    bias, whole = view.bias(candidate_members(lay), hw)
    if whole.shape[0] == 1:  # no mask: every level everywhere
        return bias, None
    k = len(lay.counts)
    straddle = (~whole).to(torch.float32)  # (windows, T)
    bad = straddle.new_zeros(straddle.shape[0], lay.num_regions * k)
    bad = bad.index_add(1, lay.cand_region * k + lay.cand_gran, straddle).view(-1, lay.num_regions, k)
    first_bad = torch.where(bad == 0, k, torch.arange(k, device=bad.device)).min(-1).values  # (no cumprod in ONNX)
    return bias, first_bad - 1


class Router(nn.Module):
    """Region features -> one logit per granularity (finest first)."""

    def __init__(self, dim: int, num_granularities: int, finest_prob: float = 0.95, std: float = 0.0,
                 norm: bool = True) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False) if norm else nn.Identity()
        self.fc = nn.Linear(dim, num_granularities)
        k = num_granularities
        b = 0.5 * math.log(finest_prob * (k - 1) / (1.0 - finest_prob))
        with torch.no_grad():
            if std > 0:
                nn.init.trunc_normal_(self.fc.weight, std=std)
            else:
                nn.init.zeros_(self.fc.weight)
            self.fc.bias.fill_(-b)
            self.fc.bias[0] = b

    def forward(self, regions: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(regions))


@dataclass
class BlockParts:
    """What the fx reading of one block found (names relative to the block), and its family's reading of them."""

    norm1: str
    norm2: str
    attn: str
    mlp: str
    # modules between the attention output and the residual add (ls1, drop_path1), or a layer-scale tensor the block
    # holds (BEiT's gamma_1: multiplied)
    post_attn: list[str]
    post_mlp: list[str]
    attention: QueryAttention  # queries apart from keys and values (fused qkv; PVT-v2's spatial reduction)
    conv: ConvMlp | None  # the MLP's depthwise convolution over the map (PVT-v2), else None
    windows: WindowView | None = None  # attention inside windows of the map (Swin), else None
    post_norm: bool = False  # norm1 / norm2 after the attention / MLP (SwinV2), not before


def read_block(block: nn.Module, where: str, family: Family) -> BlockParts:
    """Read one block with the shared residual block reader (pre-norm, or post-norm: SwinV2), and its attention and
    MLP with its family's adapter; an AnatomyError names what DGE cannot run."""
    res = read_residual_block(block, where)
    windows = family.windows(block)
    if res.layout != "tokens" and windows is None:
        raise AnatomyError(f"{where}: dge needs blocks over a token sequence or windows (found a {res.layout} block)")
    attention = family.query_attention(block.get_submodule(res.attn), where)
    conv = family.mlp_conv(block.get_submodule(res.mlp), where)
    persistent = [n for n, _ in block.named_buffers(recurse=False) if n not in block._non_persistent_buffers_set]
    scales = {n for n in [*res.post_attn, *res.post_mlp] if is_tensor_scale(block, n)}
    if any(n not in scales for n, _ in block.named_parameters(recurse=False)) or persistent:
        raise AnatomyError(f"{where}: parameters held directly by the block (other than layer scales on its residual "
                           "branches) are not supported")
    return BlockParts(norm1=res.norm1, norm2=res.norm2, attn=res.attn, mlp=res.mlp, post_attn=list(res.post_attn),
                      post_mlp=list(res.post_mlp), attention=attention, conv=conv, windows=windows,
                      post_norm=res.post_norm)


class DGEBlock(nn.Module):
    """A ViT/DeiT, PVT-v2 or Swin block with dynamic-granularity queries (see the module docstring).

    It holds the original block's children under their own names, so parameter names do not change.
    """

    def __init__(self, block: nn.Module, parts: BlockParts, index: int, num_prefix: int, grid: tuple[int, int],
                 router: Router, ctx: Context, costs: dict[str, Any], family: Family) -> None:
        super().__init__()
        for name, child in block.named_children():
            self.add_module(name, child)
        for name, param in block.named_parameters(recurse=False):  # layer scales (BEiT's gamma_1): the same tensors
            self.register_parameter(name, param)
        # Buffers the block holds itself (Swin's shift mask; never saved: read_block refuses persistent ones): one
        # table shared with the original block, so ``.to()`` moves them for both.
        object.__setattr__(self, "_buffers", block._buffers)
        object.__setattr__(self, "_non_persistent_buffers_set", block._non_persistent_buffers_set)
        self.parts = parts
        self.index = index
        self.num_prefix = num_prefix
        self.grid = grid  # the stage's grid at the model's size (a family may give another per call)
        # Unregistered: the router is registered once, under routers.<index>; the original block shares this
        # module's children and runs the exact dense path; the block's MAC counts (DGE.costs[index]) choose its path.
        attach(self, _router=router, _orig=block, _ctx=ctx, _costs=costs, _family=family, _call=None, _pos=None,
               _tables=TableCache())

    _call: WindowCall | None  # set for one forward of a block with windows
    _pos: QueryPositions | None  # set for one forward of a block whose attention holds positions (EVA's rotary rows)
    _tables: TableCache
    _router: Router
    _orig: nn.Module
    _ctx: Context
    _costs: dict[str, Any]
    _family: Family

    def extra_repr(self) -> str:
        return f"index={self.index}, conv_mlp={self.parts.conv is not None}, prefix={self.num_prefix}"

    # --- forward --------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        ctx = self._ctx
        view = self.parts.windows
        hw_map = (int(x.shape[1]), int(x.shape[2])) if view is not None else (0, 0)
        native = view is None or view.native(hw_map)
        if ctx.mode == "dense" and native:
            return self._orig(x, *args, **kwargs)
        if view is None:
            hw = self._family.block_grid(x, args, kwargs, self.grid)
            attention = self.parts.attention
            if attention.holds_positions:
                self._pos = attention.positions(candidate_members(ctx.layout(hw, x.device)), self.num_prefix, args,
                                                kwargs)
            try:
                return self._run(x, hw, args, kwargs)
            finally:
                self._pos = None
        # Attention inside windows: every path runs on the batch of windows (see the module docstring).
        view.check(hw_map, f"dge: block {self.index}")
        hw = view.window(hw_map)
        lay = ctx.layout(hw, x.device)
        bias, cap = self._window_tables(view, lay, hw_map)
        # The base block runs only on the map it was built for (its windows and mask); on another one every path
        # runs on the windows that map takes, level 0 included.
        base = (lambda: view.partition(self._orig(x, *args, **kwargs))) if native else None
        self._call = WindowCall(x.shape[0], view.windows(hw_map), bias.to(x.dtype), cap, base)
        try:
            if ctx.mode == "dense":
                out = self._forward_tokens(view.partition(x), hw, lay)
            else:
                out = self._run(view.partition(x), hw, (), {})
        finally:
            self._call = None
        return view.reverse(out, hw_map)

    def _window_tables(self, view: WindowView, lay: RegionLayout, hw_map: tuple[int, int]
                       ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """:func:`window_tables` of this block on an ``hw_map`` map, kept between inference forwards while the block's
        tensors are the ones they were made from (a shifted Swin-T block spends ~4 ms a call building them on one
        thread, a tenth of a batch-1 forward). Recomputed when autograd records (the bias is a function of trained
        parameters) and while tracing."""
        if (torch.is_grad_enabled() or torch.compiler.is_compiling() or torch.compiler.is_exporting()
                or not view.tables_keep):
            return window_tables(view, lay, hw_map)
        sources = [*self._orig.parameters(), *self._orig.buffers()]
        hit = self._tables.get(hw_map, lay, sources)
        if hit is None:
            hit = window_tables(view, lay, hw_map)
            self._tables.put(hw_map, lay, sources, hit)
        return hit

    def _forward_tokens(self, x: torch.Tensor, hw: tuple[int, int], lay: RegionLayout) -> torch.Tensor:
        """The base block's computation on windows of a map it was not built for (CF-ViT's coarse pass runs the
        model at half size): every token its own query, the bias of the windows that map takes. Records nothing:
        it is the dense mode, the base model's computation."""
        rows = torch.arange(self.num_prefix + lay.counts[0], device=x.device)  # every token its own row
        q = UniformQueries(self.num_prefix, 1, rows, torch.zeros(x.shape[0], lay.num_regions, dtype=torch.long,
                                                                 device=x.device), rows)
        # the block's updates as every other path computes them: pre-norm, or post-norm (SwinV2) as the reader says
        return x + self._updates(x, x, hw, lay, q, None)

    def token_sizes(self, gates: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        """(B, GH, GW) gates as a forward recorded them -> (B, H, W) sub-patch side of the query covering each
        token of the block's ``hw`` map (with windows: back in the map's own frame, the shift undone)."""
        view = self.parts.windows
        if view is None:
            lay = self._ctx.layout(hw, gates.device)
            level = gates.flatten(1)[:, lay.tok_region]
            return torch.tensor(lay.sizes, device=gates.device)[level].view(-1, *hw)
        lay = self._ctx.layout(view.window(hw), gates.device)
        (gh, gw), (rh, rw), b = view.windows(hw), lay.regions, gates.shape[0]
        per_window = gates.reshape(b, gh, rh, gw, rw).permute(0, 1, 3, 2, 4).reshape(b * gh * gw, rh * rw)
        sizes = torch.tensor(lay.sizes, device=gates.device)[per_window[:, lay.tok_region]]
        return view.reverse(sizes.unsqueeze(-1), hw)[..., 0]

    def _run(self, x: torch.Tensor, hw: tuple[int, int], args: tuple[Any, ...], kwargs: dict[str, Any]
             ) -> torch.Tensor:
        mode = self._ctx.mode
        if mode == "train":
            return self._forward_train(x, hw)
        if mode == "traced":
            return self._forward_traced(x, hw)
        return self._forward_sparse(x, hw, args, kwargs)

    def _base(self, x: torch.Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
        """The base block on the whole batch ``x`` (with windows: on the map, then partitioned)."""
        if self._call is None:
            return self._orig(x, *args, **kwargs)
        assert self._call.base is not None, "the base block runs only on the map it was built for"
        return self._call.base()

    def _cap(self, b: int, call: WindowCall | None) -> torch.Tensor | None:
        """(b, R) the coarsest level each region of the batch's rows may take, or None (any)."""
        if call is None or call.cap is None:
            return None
        return call.cap.repeat(b // call.cap.shape[0], 1)

    def _override(self, b: int, regions: int, device: torch.device, call: WindowCall | None) -> torch.Tensor:
        """Gates from :meth:`DGE.override_gates`, asked per image (with windows: every region of every window of
        the image, window after window) and capped where a level would straddle a mask."""
        fn = self._ctx.gate_override
        assert fn is not None
        if call is None:
            return fn(self.index, b, regions, device)
        gates = fn(self.index, call.images, call.per_image * regions, device).reshape(b, regions)
        cap = self._cap(b, call)
        return gates if cap is None else torch.minimum(gates, cap)

    def _record(self, nq: torch.Tensor, gates: torch.Tensor | None, lay: RegionLayout, ran: bool,
                conv_macs: torch.Tensor | None, path: str = "sparse") -> None:
        """Record what the block did, per image: with windows, the windows' queries summed per image and their
        regions' gates laid out as the windows are (in the shifted frame for a shifted block). At inference the
        attention core runs every window of an image with as many query slots as its fullest window has (padding,
        which the image alone computes too): those slots' MACs are counted with the convolution's, in training too
        (the budget then sees what inference will run)."""
        call = self._call
        if call is None:
            b = nq.shape[0]
            g = gates.reshape(b, *lay.regions) if gates is not None else None
        else:
            b = call.images
            per_window = nq.reshape(b, call.per_image)
            nq = per_window.sum(1)
            pad = (per_window.max(1).values * per_window.shape[1] - nq) * self._costs["core"]
            conv_macs = pad if conv_macs is None else conv_macs.reshape(b, call.per_image).sum(1) + pad
            if gates is not None:
                conv_macs = conv_macs.to(torch.float64)
            (gh, gw), (rh, rw) = call.windows, lay.regions
            g = None if gates is None else gates.reshape(b, gh, gw, rh, rw).permute(0, 1, 3, 2, 4).reshape(
                b, gh * rh, gw * rw)
        self._ctx.records.append(Record(self.index, nq, g, ran, conv_macs, path))

    def _apply_chain(self, names: list[str], t: torch.Tensor) -> torch.Tensor:
        call = self._call
        if call is not None and self.training and t.dim() == 3 and call.rows is None:
            # Windows of one image as one row of the batch: drop path drops images, as the base block does.
            shape = t.shape
            return apply_post_chain(self, names, t.reshape(call.images, -1, shape[-1])).reshape(shape)
        return apply_post_chain(self, names, t)

    def _router_runs(self) -> bool:
        """Whether inference runs the router: not when a uniform level is set and no override is."""
        return self._ctx.gate_override is not None or self._ctx.level is None

    def _sparse_gates(self, regions: torch.Tensor, lay: RegionLayout, call: WindowCall | None,
                      given: torch.Tensor | None = None) -> tuple[torch.Tensor, bool]:
        ctx = self._ctx
        b = regions.shape[0]
        cap = self._cap(b, call)
        if not self._router_runs():
            level = torch.full((b, lay.num_regions), ctx.level, dtype=torch.long, device=regions.device)
            return (level if cap is None else torch.minimum(level, cap)), False
        logits = self._router(regions)
        if ctx.gate_override is not None:  # the router still runs, so benchmarks time and count it
            return (self._override(b, lay.num_regions, regions.device, call) if given is None else given), True
        rank = torch.arange(logits.shape[-1], device=logits.device, dtype=logits.dtype)
        if ctx.shift:
            logits = logits + ctx.shift * rank
        if cap is not None:
            logits = logits.masked_fill(rank > cap.unsqueeze(-1), float("-inf"))
        return logits.argmax(dim=-1), True

    def _select_queries(self, x: torch.Tensor, hw: tuple[int, int], call: WindowCall | None,
                        given: torch.Tensor | None = None) -> tuple[
            RegionLayout, dict[int, torch.Tensor], torch.Tensor, bool, torch.Tensor]:
        """What the inference paths (eager and traced) share before they run: the grid's layout, the pooled
        sub-patch tables (each coarser level's, and the regions' for the router), the gates (B, R) of the regions,
        whether the router ran, and ``qsel`` (B, prefix + T): which candidates of each image are queries (the
        prefix tokens always are)."""
        lay = self._ctx.layout(hw, x.device)
        p = self.num_prefix
        b, _, c = x.shape
        pooled = pool_subpatches(x[:, p:].reshape(b, hw[0], hw[1], c), lay, [*lay.sizes[1:], lay.region])
        gates, ran = self._sparse_gates(pooled[lay.region], lay, call, given)
        sel = gates[:, lay.cand_region] == lay.cand_gran
        return lay, pooled, gates, ran, torch.cat([sel.new_ones(b, self.num_prefix), sel], dim=1)

    def _token_sources(self, gates: torch.Tensor, lay: RegionLayout) -> torch.Tensor:
        """(B, prefix + HW) the candidate covering each token at its region's level (the prefix tokens their own)."""
        p = self.num_prefix
        b = gates.shape[0]
        g_tok = gates[:, lay.tok_region]
        tok_src = p + lay.tok_cand_t.unsqueeze(0).expand(b, -1, -1).gather(2, g_tok.unsqueeze(-1)).squeeze(2)
        return torch.cat([torch.arange(p, device=gates.device).expand(b, p), tok_src], dim=1)

    def _forward_sparse(self, x: torch.Tensor, hw: tuple[int, int], args: tuple[Any, ...],
                        kwargs: dict[str, Any]) -> torch.Tensor:
        ctx = self._ctx
        p = self.num_prefix
        n = x.shape[1]
        lay, pooled, gates, ran, qsel = self._select_queries(x, hw, self._call)
        conv_macs = self._conv_macs(gates, lay)
        path = self._choose_path(gates, qsel, lay, conv_macs)
        if path == "base":  # every region at the finest granularity: the base block computes the same thing
            out = self._base(x, args, kwargs)
            nq = qsel.sum(1)
        elif path == "split":
            out = self._forward_split(x, hw, lay, gates, pooled, args, kwargs)
            nq = qsel.sum(1)
        else:
            tok_src = self._token_sources(gates, lay)
            q: QuerySelection
            if path == "dense":
                # The MLP (PVT-v2: after the convolution) runs on the queries' own rows, not on their repeats;
                # in training the rows stay per image, as drop path needs.
                first = None if self.training else ctx.cand_first(hw, x.device, p)
                q = TokenQueries(qsel, tok_src, n, lay.sizes, gates, first, lay.bounds(n) if first is not None
                                 and self.parts.conv is not None else None)
            # Dropping a path per row of a packed batch would drop tokens, not images: pad while training.
            # With windows always packed: padding every window to the fullest would run every per-row layer on it.
            elif (ctx.layout_mode == "packed" or self._call is not None) and not self.training:
                q = PackedQueries(qsel, tok_src, lay.bounds(n), lay.sizes, gates)
            else:
                q = PaddedQueries(qsel, tok_src, lay.bounds(n), lay.sizes, gates)
            delta = self._updates(q.gather(x, pooled), x, hw, lay, q, None)
            out = q.to_tokens(delta)
            out = out.add_(x) if not torch.is_grad_enabled() else out + x
            nq = q.nq
        self._record(nq.to(torch.float64), gates, lay, ran, conv_macs, path)
        return out

    def _forward_traced(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        """The sparse path as one traceable graph (:meth:`DGE.forward_traceable`): the same gates, queries and
        results as :meth:`_forward_sparse`, with no Python decision on the data. Every batch runs the selected
        queries of the batch packed, padded per image only around the attention core (:class:`TracedQueries`),
        whatever mix of levels the routers chose: the eager path's choice of base, split, dense or sparse per
        batch gives the same results, so the graph keeps one fixed structure. The cost record is the sparse path's.

        Under ``torch.compile`` (not ``torch.export``) the block's computation is a nested compile region
        (:func:`traced_block_region`): dynamo traces it once and every block of the same shapes reuses it, so a
        model's compile time does not grow with its depth."""
        ctx, call, pos = self._ctx, self._call, self._pos
        lay = ctx.layout(hw, x.device)
        # Gates from override_gates are asked here, outside a compile region: the function is the caller's code.
        given = None if ctx.gate_override is None else self._override(x.shape[0], lay.num_regions, x.device, call)
        out, nq, gates = traced_block_region(self, x, hw, given, None if call is None else call.windows,
                                             *_call_tables(call), *_position_tables(pos))
        self._record(nq.to(torch.float64), gates, lay, self._router_runs(), self._conv_macs(gates, lay))
        return out

    def _traced_update(self, x: torch.Tensor, hw: tuple[int, int], given: torch.Tensor | None,
                       call: WindowCall | None, pos: QueryPositions | None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`_forward_traced`'s computation, with no side effect: the block's output, the queries each row of
        ``x`` ran (B,) and the regions' gates (B, R): ``given`` (from :meth:`DGE.override_gates`), else the
        router's. ``call`` and ``pos`` are the block's ``_call`` and ``_pos`` for this forward, passed in so that a
        compile region sees every tensor it reads as an input."""
        lay, pooled, gates, _, qsel = self._select_queries(x, hw, call, given)
        q = TracedQueries(qsel, self._token_sources(gates, lay))
        q_in = q.gather(torch.cat([x, *(pooled[s] for s in lay.sizes[1:])], dim=1))
        norm1 = self.get_submodule(self.parts.norm1)
        norm2 = self.get_submodule(self.parts.norm2)
        if self.parts.post_norm:
            a = self._apply_chain(self.parts.post_attn, norm1(self._attention(q_in, x, hw, q, call, pos)))
            m = self._apply_chain(self.parts.post_mlp, norm2(self._traced_mlp(q_in + a, hw, lay, q)))
        else:
            a = self._apply_chain(self.parts.post_attn, self._attention(norm1(q_in), norm1(x), hw, q, call, pos))
            m = self._apply_chain(self.parts.post_mlp, self._traced_mlp(norm2(q_in + a), hw, lay, q))
        return x + q.to_tokens(a + m), q.nq, gates

    def _traced_mlp(self, t: torch.Tensor, hw: tuple[int, int], lay: RegionLayout, q: TracedQueries) -> torch.Tensor:
        """The MLP of the (M, C) query rows, traceable. PVT-v2's convolution at each query's scale: the
        piecewise-constant token map (every token the state of its query), convolved at full resolution for the
        finest queries and, pooled per level, at each coarser level's scale (what :func:`dwconv_tokens` computes,
        for every level whether or not a query uses it: no decision on the data); each query reads its own.
        Pooling channels first instead (native ``AveragePool`` beside the convolution) removed the pooling's
        ``Split`` + ``Add`` chains but quadrupled onnxruntime's ``Transpose`` time: slower on PVT-v2-b1."""
        mlp = self.parts.conv
        if mlp is None:
            return self.get_submodule(self.parts.mlp)(t)
        p = self.num_prefix
        h = mlp.relu(mlp.fc1(t))
        b, d = q.batch, h.shape[-1]
        fmap = q.to_tokens(h)[:, p:].reshape(b, hw[0], hw[1], d)
        pooled = pool_subpatches(fmap, lay, lay.sizes[1:])
        # Candidate columns: the prefix rows (off the map: no family with a convolution in its MLP has any), the
        # finest tokens, then each coarser level's cells, as the query table's columns.
        maps = [h.new_zeros(b, p, d), conv_at(mlp.dwconv, fmap, 1, hw).reshape(b, -1, d)]
        maps += [conv_at(mlp.dwconv, pooled[s].view(b, -(-hw[0] // s), -(-hw[1] // s), d), s, hw).reshape(b, -1, d)
                 for s in lay.sizes[1:]]
        h = q.gather(torch.cat(maps, dim=1))
        return mlp.drop(mlp.fc2(mlp.drop(mlp.act(h))))

    def _forward_split(self, x: torch.Tensor, hw: tuple[int, int], lay: RegionLayout, gates: torch.Tensor,
                       pooled: dict[int, torch.Tensor], args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
        """Every image's regions at one level: the batch split by level, the finest images through the base
        block, the others with their level's whole cell map as queries (:class:`UniformQueries`), each group
        a dense batch: the sparse path's results without its gathers, padding and per-row index tables."""
        ctx = self._ctx
        level = gates[:, 0]
        present = torch.unique(level).tolist()
        outs, order = [], []
        call = self._call
        for k in present:
            idx = (level == k).nonzero().squeeze(1)
            whole = len(present) == 1
            xk = x if whole else x.index_select(0, idx)
            if k == 0 and call is None:
                res = self._orig(xk, *args, **kwargs)
            else:  # with windows, the finest windows too: the base block runs on the whole map only
                size = lay.sizes[k]
                cells = xk if size == 1 else pooled[size] if whole else pooled[size].index_select(0, idx)
                first = self.num_prefix + sum(lay.counts[:k])
                cands = torch.cat([torch.arange(self.num_prefix, device=x.device),
                                   torch.arange(first, first + lay.counts[k], device=x.device)])
                q = UniformQueries(self.num_prefix, size, ctx.uniform_index(hw, x.device, self.num_prefix, k),
                                   gates if whole else gates.index_select(0, idx), cands)
                if call is not None:
                    call.rows = None if whole else idx
                try:
                    res = q.to_tokens(self._updates(q.gather(xk, {size: cells}), xk, hw, lay, q, None))
                finally:
                    if call is not None:
                        call.rows = None
                res = res.add_(xk) if not torch.is_grad_enabled() else res + xk
            outs.append(res)
            order.append(idx)
        if len(outs) == 1:
            return outs[0]
        if torch.is_grad_enabled():
            inverse = torch.argsort(torch.cat(order))
            return torch.cat(outs).index_select(0, inverse)
        out = x.new_empty(x.shape)
        for idx, res in zip(order, outs, strict=True):
            out.index_copy_(0, idx, res)
        return out

    def _choose_path(self, gates: torch.Tensor, qsel: torch.Tensor, lay: RegionLayout,
                     conv_macs: torch.Tensor | None) -> str:
        """How this batch runs the block: ``base`` when every region is at the finest granularity (the base
        block computes exactly the sparse path's result there), else ``sparse`` or ``dense`` by the setting;
        under ``auto``, ``split`` when each image's regions share one level (always so on grids of one region:
        the batch runs as a dense batch per level, :meth:`_forward_split`), else the path :func:`path_costs`
        estimates cheaper."""
        ctx = self._ctx
        if ctx.execution == "sparse":
            return "sparse"
        if not bool(gates.any()):
            # with windows on a map the base block was not built for, level 0 runs on the windows (split)
            return "base" if self._call is None or self._call.base is not None else "split"
        if ctx.execution == "dense":
            return "dense"
        if lay.num_regions == 1 or bool((gates == gates[:, :1]).all()):
            return "split"
        costs = path_costs(self._costs, gates, qsel, lay, conv_macs, torch.get_num_threads(),
                           gates.device.type)
        return "sparse" if costs["sparse"] < costs["dense"] else "dense"

    def _forward_train(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        ctx = self._ctx
        lay = ctx.layout(hw, x.device)
        p = self.num_prefix
        b, _, c = x.shape
        pooled = pool_subpatches(x[:, p:].reshape(b, hw[0], hw[1], c), lay, [*lay.sizes[1:], lay.region])
        logits = self._router(pooled[lay.region])
        if ctx.gate_override is not None:  # the knob is for inference; overrides also serve the training path's tests
            idx = self._override(b, lay.num_regions, x.device, self._call)
            gates = F.one_hot(idx, logits.shape[-1]).to(x.dtype)
        else:
            cap = self._cap(b, self._call)
            if cap is not None:  # levels that would straddle a mask are never drawn
                rank = torch.arange(logits.shape[-1], device=logits.device)
                logits = logits.masked_fill(rank > cap.unsqueeze(-1), float("-inf"))
            gates = F.gumbel_softmax(logits.float(), tau=ctx.tau, hard=True, dim=-1).to(x.dtype)
        gate_tok = gates[:, lay.tok_region]  # (B, HW, K)
        q = AllQueries(lay.sizes)
        delta = self._updates(q.gather(x, pooled), x, hw, lay, q, gate_tok)
        upd = sum(gate_tok[..., k:k + 1] * delta.index_select(1, p + lay.tok_cand[k])
                  for k in range(len(lay.sizes)))
        out_grid = x[:, p:] + upd
        out = torch.cat([x[:, :p] + delta[:, :p], out_grid], dim=1) if p else out_grid
        nq = p + (gates * lay.nq.to(gates.dtype)).sum(dim=(1, 2))
        self._record(nq, None, lay, True, self._conv_macs(gates.detach().argmax(-1), lay))
        return out

    def _conv_macs(self, gates: torch.Tensor, lay: RegionLayout) -> torch.Tensor | None:
        if self.parts.conv is None:
            return None
        return dwconv_macs(self.parts.conv.dwconv, gates, lay)

    # --- the block's computation on queries -------------------------------------------------------------

    def _updates(self, q_in: torch.Tensor, x: torch.Tensor, hw: tuple[int, int], lay: RegionLayout,
                 q: QuerySelection, gate_tok: torch.Tensor | None) -> torch.Tensor:
        """Attention + MLP updates of the queries (q_out - q_in), keys and values from all of ``x``; post-norm
        blocks normalise the attention and MLP outputs instead of their inputs (a pooled query is then the pooled
        tokens themselves, projected and, with cosine attention, normalised like any query)."""
        norm1 = self.get_submodule(self.parts.norm1)
        norm2 = self.get_submodule(self.parts.norm2)
        if self.parts.post_norm:
            a = self._apply_chain(self.parts.post_attn, norm1(self._attention(q_in, x, hw, q, self._call, self._pos)))
            m = self._apply_chain(self.parts.post_mlp, norm2(self._mlp(q_in + a, hw, lay, q, gate_tok)))
            return a.add_(m) if not torch.is_grad_enabled() else a + m
        xn = norm1(x)
        # every token its own query (a split batch at the finest level): normalised once
        a = self._attention(xn if q_in is x else norm1(q_in), xn, hw, q, self._call, self._pos)
        a = self._apply_chain(self.parts.post_attn, a)
        m = self._mlp(norm2(q_in + a), hw, lay, q, gate_tok)
        m = self._apply_chain(self.parts.post_mlp, m)
        return a.add_(m) if not torch.is_grad_enabled() else a + m

    def _attention(self, qn: torch.Tensor, xn: torch.Tensor, hw: tuple[int, int], q: QuerySelection,
                   call: WindowCall | None, pos: QueryPositions | None) -> torch.Tensor:
        attention = self.parts.attention
        k, v = attention.keys_values(xn, hw)
        qh = attention.queries(qn)
        if pos is not None and pos.key_rope is not None:
            k = attention.rotate(k, pos.key_rope)
        if pos is not None and pos.query_rope is not None:  # each row by the mean rotary row of its positions
            table = pos.query_rope  # (heads or 1, T, E), in its own dtype (timm rotates in float32, then casts)
            cands = _row_cands(q, table.shape[1], qh.device)
            rope = table.index_select(1, cands.flatten()).movedim(0, 1).reshape(*cands.shape, table.shape[0], -1)
            qh = attention.rotate(qh.unflatten(-1, (attention.num_heads, -1)), rope).flatten(-2)
        o = q.attend(qh, k, v, attention.dropout(), self._slot_bias(q, xn.shape[0], call, pos))
        return attention.output(o, qn)

    def _slot_bias(self, q: QuerySelection, b: int, call: WindowCall | None, pos: QueryPositions | None
                   ) -> torch.Tensor | None:
        """The attention bias of every slot the attention core runs, from the candidate it holds (and, with windows,
        its row's window); None when the attention has no bias per query position."""
        if call is not None:
            table = call.bias  # (windows or 1, heads, T, N)
            rows = call.rows if call.rows is not None else torch.arange(b, device=table.device)
        elif pos is not None and pos.bias is not None:
            table = pos.bias  # (1, heads, P + T, P + N)
            rows = torch.zeros(b, dtype=torch.long, device=table.device)
        else:
            return None
        win = rows % table.shape[0]
        if isinstance(q, AllQueries | UniformQueries):  # every row the same candidates
            t = table.shape[2]
            cands = torch.arange(t, device=table.device) if isinstance(q, AllQueries) else q.cands
            assert cands is not None
            sub = table.index_select(2, cands)
            return sub if table.shape[0] == 1 else sub.index_select(0, win)
        packed = isinstance(q, PackedQueries | TracedQueries)
        slots = q.slot_cands() if packed else _row_cands(q, table.shape[2], table.device)
        return table[win.unsqueeze(1), :, slots].permute(0, 2, 1, 3)

    def _mlp(self, t: torch.Tensor, hw: tuple[int, int], lay: RegionLayout, q: QuerySelection,
             gate_tok: torch.Tensor | None) -> torch.Tensor:
        tail = isinstance(q, TokenQueries) and q.unique_rows is not None
        mlp = self.parts.conv
        if mlp is None:  # a per-token MLP
            plain = self.get_submodule(self.parts.mlp)
            if tail:
                assert isinstance(q, TokenQueries)
                return q.from_unique(plain(q.to_unique(t)))
            return plain(t)
        # A convolution in the MLP: fc1 on the queries, the depthwise convolution at each granularity's scale, act,
        # fc2.
        if isinstance(q, AllQueries):
            assert gate_tok is not None
            h = dwconv_all(mlp.dwconv, mlp.relu(mlp.fc1(t)), hw, lay, gate_tok)
        elif isinstance(q, UniformQueries):  # the level's whole cell map: the convolution at its scale
            h = mlp.relu(mlp.fc1(t))
            p = q.size
            cells = h.view(h.shape[0], -(-hw[0] // p), -(-hw[1] // p), h.shape[-1])
            h = conv_at(mlp.dwconv, cells, p, hw).reshape(h.shape)
        elif isinstance(q, TokenQueries):
            if tail and q.level_offsets is not None:
                # the convolution's outputs of the queries themselves, then activation and fc2 on those rows
                assert q.level_cells is not None
                h = dwconv_tokens(mlp.dwconv, mlp.relu(mlp.fc1(t)), hw, lay, q.gates,
                                  (q.level_offsets, q.level_cells))
                return q.from_unique(mlp.drop(mlp.fc2(mlp.drop(_act(mlp.act, h)))))
            h = dwconv_tokens(mlp.dwconv, mlp.relu(mlp.fc1(t)), hw, lay, q.gates)
            if tail:  # activation and fc2 on the queries' own rows
                return q.from_unique(mlp.drop(mlp.fc2(mlp.drop(mlp.act(q.to_unique(h))))))
        else:
            # The rows plus one zero row (read for tokens off the grid), written by fc1 in place when
            # autograd is off: copying a hidden-width table costs as much as a small convolution.
            rows = t.reshape(-1, t.shape[-1])
            d = mlp.fc1.out_features
            # out= writes are neither recorded by autograd nor cast by autocast: those take the plain layer.
            if torch.is_grad_enabled() or torch.is_autocast_enabled(rows.device.type):
                h1 = mlp.fc1(rows)
                table = torch.cat([h1, h1.new_zeros(1, d)])
            else:
                table = rows.new_empty(rows.shape[0] + 1, d)
                if mlp.fc1.bias is not None:  # one fused call: the bias is the product's starting value
                    torch.addmm(mlp.fc1.bias, rows, mlp.fc1.weight.t(), out=table[:-1])
                else:
                    torch.matmul(rows, mlp.fc1.weight.t(), out=table[:-1])
                table[-1].zero_()
            h = dwconv_selected(mlp.dwconv, mlp.relu(table), hw, lay, q).view(*t.shape[:-1], d)
        h = mlp.drop(_act(mlp.act, h))
        return mlp.drop(mlp.fc2(h))


@compile_region
def traced_block_region(block: DGEBlock, x: torch.Tensor, hw: tuple[int, int], given: torch.Tensor | None,
                        windows: tuple[int, int] | None,
                        bias: torch.Tensor | None, cap: torch.Tensor | None, rows: torch.Tensor | None,
                        position_bias: torch.Tensor | None, query_rope: torch.Tensor | None,
                        key_rope: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:meth:`DGEBlock._traced_update`, under ``torch.compile`` a nested compile region
    (:func:`~vitconvert.layers.compiled.compile_region`): dynamo traces one block and every block whose code, shapes
    and guards match calls it, instead of tracing every block of the model into one graph (DGE on DeiT-S: 165
    operations in the outer graph against 1641). A region reads no tensor that is not one of its arguments, so the
    window call's and the positions' tables come as arguments and are put back together here."""
    call = None
    if windows is not None:
        assert bias is not None
        call = WindowCall(x.shape[0] // (windows[0] * windows[1]), windows, bias, cap, None, rows)
    pos = None
    if position_bias is not None or query_rope is not None or key_rope is not None:
        pos = QueryPositions(position_bias, query_rope, key_rope)
    out, nq, gates = block._traced_update(x, hw, given, call, pos)
    # A region's outputs may not alias its inputs, and given gates are returned as they came.
    return out, nq, gates if given is None else gates.clone()


def _call_tables(call: WindowCall | None) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    return (None, None, None) if call is None else (call.bias, call.cap, call.rows)


def _position_tables(pos: QueryPositions | None
                     ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    return (None, None, None) if pos is None else (pos.bias, pos.query_rope, pos.key_rope)


def _row_cands(q: QuerySelection, candidates: int, device: torch.device) -> torch.Tensor:
    """The candidate each query row of ``q`` holds, shaped as the rows' leading dimensions ((M,) packed, (B, L)
    padded, (B, N) token rows, (T,) every candidate, (P + n_k,) one level)."""
    if isinstance(q, PackedQueries | TracedQueries):
        return q.row_cands()
    if isinstance(q, PaddedQueries):
        return q.idx
    if isinstance(q, TokenQueries):
        return q.tok_src
    if isinstance(q, UniformQueries):
        assert q.cands is not None
        return q.cands
    return torch.arange(candidates, device=device)


def _act(act: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """The MLP's activation; timm's GELU in place when autograd is off (``h`` is a fresh buffer of the block's
    own: no new hidden-width tensor is allocated and faulted in) and no hook watches the module."""
    hooked = act._forward_hooks or act._forward_pre_hooks or nn.modules.module._global_forward_hooks or \
        nn.modules.module._global_forward_pre_hooks
    if type(act) is nn.GELU and not torch.is_grad_enabled() and not hooked:
        return torch.ops.aten.gelu_(h, approximate=act.approximate)
    return act(h)
