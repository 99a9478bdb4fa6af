"""DGE: Dynamic Grained Encoder (Song et al., NeurIPS 2021, arXiv 2301.03831; code StevenGrove/vtpack).

Converted from a pretrained ViT/DeiT (any prefix tokens) or PVT-v2. Every block of the dynamic stages
keeps its keys and values dense but computes its queries at a granularity chosen per region:

* **Router** (one per block, ``routers.<block index>``): the block input (patch tokens, before ``norm1``)
  is averaged over ``region_size`` x ``region_size`` token regions, optionally normalised (parameter-free
  LayerNorm, because a pretrained residual stream grows with depth), and a linear layer gives one logit
  per granularity. ``granularities`` lists the queries per region side, finest first: ``[4, 2, 1]`` with
  ``region_size = 4`` means 16, 4 or 1 query per region, each the average of its sub-patch's tokens.
  The bias starts at +b for the finest and -b for the others (b = 1/2 ln(p (K-1) / (1-p)), p =
  ``init_finest_prob``), the weight at ``router_init_std`` (0: exactly zero), so a freshly converted model
  picks the finest granularity everywhere and equals the base model.
* **Block**: queries q (prefix tokens always at full granularity, then the chosen sub-patch averages)
  attend to ``norm1`` of all tokens (PVT-v2: of the spatially reduced map); the attention and MLP
  updates of each query, ``q_out - q_in``, are broadcast back to the tokens of its sub-patch:
  ``x_out = x + upsample(q_out - q_in)``. At the finest granularity everywhere this is the base block.
* **Training** (the paper's dense path): queries of every granularity are computed (1 + 1/4 + 1/16 of
  the tokens) and their updates combined with straight-through Gumbel-softmax gates (temperature
  ``gumbel_tau``, annealed to ``gumbel_tau_final`` when the pipeline reports progress through
  :meth:`DGE.set_train_progress`). ``forward_train`` returns ``rho``, the dynamic / static GMACs ratio of
  the batch (ratio of batch means, patch embedding and head included), differentiable through the gates;
  the budget loss is ``(rho - budget_target)^2`` times the recipe weight ``finetune.losses.budget``.
* **Inference**: argmax gates and real sparse computation: the selected queries of each image are
  gathered (``inference_layout``: ``padded`` per image to the batch's largest count, or ``packed``
  across the batch for the linear layers and MLP with padding only around the attention core), run
  through attention and MLP, and scattered back. ``DynamicOutput.gmacs`` is the analytic cost of the
  path each image took, counted the way :func:`vitconvert.count_macs` counts (it matches to the MAC).

**Grids not divisible by the region size** (DeiT at 224 px: 14x14; PVT-v2's last stage: 7x7) are
handled as padded grids with the padding excluded: border regions are cut short (14 = 4 + 4 + 4 + 2)
and every average (router input, query, sub-patch) is over the real tokens only (sums divided by the
real-token count); a sub-patch with no real token does not exist, and the cost counts only real
queries. Nothing is resized, so the model stays exact at the finest granularity. Tested on 10x10 and
7x7 ViT grids, PVT-v2 grids 14/7/4/2 (smaller than a region) and timm's DeiT-S at 224 px.

**PVT-v2's MLP** holds a 3x3 depthwise convolution over the token map. ``fc1`` runs on the queries; the
query hidden states define a piecewise-constant map (every token takes its query's state), and each
query gets the convolution evaluated at its own scale: the map averaged over p x p cells (p = its
sub-patch side, real tokens only), convolved with the kernel folded to that scale (``C w C^T / p^2``,
:func:`_fold_kernel`). Then activation and ``fc2`` run on the queries. At the finest granularity this is
timm's MLP (exactness); with one granularity everywhere it equals the full-resolution convolution averaged
over each sub-patch; next to finer regions a coarse query sees its neighbours' cell averages instead of
their border tokens (the training path computes the same thing, so nothing is learned for a different
model). Inference never builds the full hidden map for coarse regions: each used level's cell map is
gathered at its own resolution (1/4 or 1/16 of the tokens) and convolved densely, and level-0 tokens are
convolved from their regions' halo patches ((S+2)^2 tokens, read from the queries covering them) while at
most a quarter of the regions are at level 0 (above that, and on grids the region size does not divide,
PVT-v2's 14x14 and 7x7 at 224 px, the whole token map is faster). The convolution's MACs are counted per
image as that image alone would run them. Why: broadcasting hidden states to the full grid,
convolving and pooling back cost more CPU time than the skipped matmuls saved (1.17x at half the MACs on
pvt_v2_b1, one thread); now 1.55x (``benchmarks/results/dge_speed.json``).

**How it fits the fx anatomy.** :func:`vitconvert.read_anatomy` names the blocks, their stage and grid,
``norm1``/``norm2``, the attention and MLP modules and the prefix-token count. Each dynamic block is then
traced on its own with :func:`vitconvert.fx.trace` to check it is a pre-norm residual block
(``x + branch(attn(norm1(x)))``, then ``+ branch(mlp(norm2(.)))``) and to read the modules between each
core and its residual add (layer scale, drop path), which the DGE path applies to the query updates.
The block is then replaced in place (``set_submodule``) by a :class:`DGEBlock` that adopts the original
children under their own names, so state-dict keys stay ``base.blocks.3.attn.qkv.weight`` and the model's
own timm forward runs unchanged around it; the original block object is kept (unregistered) for the
exact dense path. Routers live in the top-level ``routers`` module dict (keys ``routers.3.*``).

The one knob is ``coarsening`` in [0, 1]: the routers' logits get ``logit(coarsening) * rank`` added
(rank 0 for the finest granularity, 1, 2, ... for coarser ones) before the argmax. 0.5 is the trained
argmax, 0 runs the base blocks (exactly the base model, its full-compute point), 1 the coarsest
granularity everywhere.

Example:
    >>> import vitconvert
    >>> m = vitconvert.apply("deit_small", "dge", pretrained=False)   # doctest: +SKIP
    >>> out = m.forward_dynamic(torch.randn(2, 3, 224, 224))          # doctest: +SKIP
    >>> out.gmacs                                                       # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.fx as fx
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn

from vitconvert import fx as vfx
from vitconvert.anatomy import Anatomy, BlockInfo
from vitconvert.errors import AnatomyError, UserError
from vitconvert.layers.costs import GIGA
from vitconvert.methods.base import ConvertedModel, DynamicOutput
from vitconvert.operating import Knob, OperatingSpace
from vitconvert.recipes import Recipe, Strict
from vitconvert.registry import register_method
from vitconvert.sources import BaseSpec

__all__ = ["DGE", "DGEBlock", "DGELosses", "DGESettings", "Router", "plot_granularity"]


class DGESettings(Strict):
    region_size: int = Field(4, ge=1, le=32, description="router region side in tokens (S)")
    granularities: list[int] = Field(default_factory=lambda: [4, 2, 1],
                                     description="queries per region side, finest (= region_size) first")
    stages: list[int] | None = Field(None, description="dynamic stages (0-based); null: all")
    init_finest_prob: float = Field(0.95, gt=0, lt=1, description="router probability of the finest at start")
    router_init_std: float = Field(0.0, ge=0, le=1, description="router weight init std (0: zeros, exact start)")
    router_norm: bool = Field(True, description="parameter-free LayerNorm on the router input")
    gumbel_tau: float = Field(1.0, gt=0, le=100, description="Gumbel-softmax temperature at the start")
    gumbel_tau_final: float | None = Field(None, gt=0, le=100, description="temperature at the end (annealed)")
    budget_target: float = Field(0.5, gt=0, le=1, description="gamma: target dynamic/static GMACs ratio")
    router_lr_scale: float = Field(1.0, gt=0, le=1e4, description="fine-tuning learning-rate multiplier of the routers")
    coarsening: float = Field(0.5, ge=0, le=1, description="initial knob (0.5 = router argmax)")
    inference_layout: Literal["packed", "padded"] = "packed"

    @field_validator("granularities")
    @classmethod
    def _check_granularities(cls, v: list[int], info: Any) -> list[int]:
        size = info.data.get("region_size", 4)
        if len(v) < 2:
            raise ValueError("give at least two granularities")
        if v[0] != size:
            raise ValueError(f"the finest granularity must be region_size ({size}) queries per side, got {v[0]}")
        if any(a <= b for a, b in itertools.pairwise(v)):
            raise ValueError("granularities must be strictly decreasing (finest first)")
        if any(g < 1 or size % g for g in v):
            raise ValueError(f"every granularity must divide region_size ({size})")
        return v


class DGELosses(Strict):
    distill: float = Field(1.0, ge=0, description="KL from the original model")
    ce: float = Field(1.0, ge=0, description="cross-entropy (when labels exist)")
    budget: float = Field(1.0, ge=0, description="lambda of the budget loss (rho - gamma)^2")


# --- static layout of one token grid --------------------------------------------------------------------


@dataclass
class _Layout:
    """Index tables for one (H, W) grid. Candidates are every granularity's sub-patches, finest first
    (the finest are the tokens themselves); a region's sub-patches are cut short at the grid border."""

    hw: tuple[int, int]
    sizes: list[int]  # sub-patch side in tokens per granularity (1 = finest)
    counts: list[int]  # sub-patches per granularity
    regions: tuple[int, int]
    cand_region: torch.Tensor  # (T,) region of each candidate
    cand_gran: torch.Tensor  # (T,) granularity of each candidate
    tok_region: torch.Tensor  # (HW,) region of each token
    tok_cand: torch.Tensor  # (K, HW) candidate covering each token at each granularity
    tok_cand_t: torch.Tensor  # (HW, K) the same, transposed for gathers
    nq: torch.Tensor  # (R, K) queries a region costs at each granularity
    inv: dict[int, torch.Tensor]  # sub-patch side -> (n,) 1 / real tokens in each sub-patch
    # For PVT-v2's depthwise convolution at each granularity's own scale (level k >= 1):
    cell_cand: dict[int, torch.Tensor]  # k -> (n_k, K) candidate of level g covering each level-k cell (g >= k)
    cand_cell: dict[int, torch.Tensor]  # k -> (T,) level-k cell holding each candidate (used for finer ones)
    cand_weight: dict[int, torch.Tensor]  # k -> (T,) real tokens of the candidate / real tokens of that cell
    halo_tok: torch.Tensor | None  # (R, (S+2)^2) each region's tokens with a 1-token ring, -1 off the grid
    region_tok: torch.Tensor | None  # (R, S^2) each region's tokens; both None unless S divides the grid
    tok_local: torch.Tensor  # (HW,) position of each token inside its region (raster)
    region: int = 4

    def bounds(self, n_full: int) -> list[int]:
        """Column bounds of each granularity's candidates when the first holds ``n_full`` full-size rows."""
        out = [0, n_full]
        for n in self.counts[1:]:
            out.append(out[-1] + n)
        return out

    @property
    def num_regions(self) -> int:
        return self.regions[0] * self.regions[1]


def _sum_pool(m: torch.Tensor, f: int) -> torch.Tensor:
    """(B, h, w, C) -> (B, ceil(h/f), ceil(w/f), C) sums over f x f cells (zero padding at the border).

    Strided maps (the patch tokens after prefix tokens): adds of strided views, so the map is read once and,
    unless the grid needs padding, never copied whole. On CPU these memory-bound passes can eat the saved matmul time if
    written carelessly (``avg_pool2d`` on the prefix-sliced token map first copies it).
    """
    b, h, w, c = m.shape
    nchw = m.permute(0, 3, 1, 2)
    if nchw.is_contiguous(memory_format=torch.channels_last):
        # A whole channels-last map (PVT-v2, or ViT without prefix tokens): the native pooling kernel reads
        # it once, several times faster than the adds below. ceil_mode + divisor 1: sums over real tokens.
        out = F.avg_pool2d(nchw, f, ceil_mode=True, divisor_override=1)
        return out.permute(0, 2, 3, 1)
    ph, pw = (-h) % f, (-w) % f
    if ph or pw:
        m = F.pad(m, (0, 0, 0, pw, 0, ph))
    cols = m.reshape(b, h + ph, (w + pw) // f, f, c)
    s = cols[:, :, :, 0].clone()
    for j in range(1, f):
        s += cols[:, :, :, j]
    rows = s.view(b, (h + ph) // f, f, (w + pw) // f, c)
    out = rows[:, :, 0].clone()
    for i in range(1, f):
        out += rows[:, :, i]
    return out


def _pool(m: torch.Tensor, lay: _Layout, needed: Sequence[int]) -> dict[int, torch.Tensor]:
    """(B, h, w, C) map -> {sub-patch side p: (B, n_p, C) averages over the real tokens of each sub-patch}.

    Each p is summed from the largest side already computed that tiles it (4 from 2 from 1) and only the
    sides in ``needed`` (and their sources) are computed.
    """
    b, _, _, c = m.shape
    needed = sorted(set(needed))
    sources = {p: max(d for d in [1, *needed] if d < p and p % d == 0) for p in needed}
    sums: dict[int, torch.Tensor] = {1: m}
    for p in needed:
        sums[p] = _sum_pool(sums[sources[p]], p // sources[p])
    # Scale once every sum exists (coarser sums are built from finer ones); in place unless autograd records
    # (the pooling kernel's backward keeps its input).
    scale = {p: lay.inv[p].to(m.dtype).unsqueeze(-1) for p in needed}
    if torch.is_grad_enabled():
        return {p: sums[p].reshape(b, -1, c) * scale[p] for p in needed}
    return {p: sums[p].view(b, -1, c).mul_(scale[p]) for p in needed}


def _make_layout(hw: tuple[int, int], region: int, sizes: Sequence[int], device: torch.device) -> _Layout:
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
    real = {p: _sum_pool(ones, p).flatten() for p in {*sizes, region}}  # real tokens per sub-patch
    inv = {p: (1.0 / real[p]).float().to(device) for p in {*sizes[1:], region}}
    # Origin token of every candidate, and the tables of the per-scale depthwise convolution.
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
    return _Layout(
        hw=hw, sizes=list(sizes), counts=counts, regions=(rh, rw), cand_region=cr.to(device),
        cand_gran=cg.to(device), tok_region=((ys // region) * rw + xs // region).to(device), tok_cand=tc.to(device),
        tok_cand_t=tc.t().contiguous().to(device), nq=nq.to(device), inv=inv, cell_cand=cell_cand,
        cand_cell=cand_cell, cand_weight=cand_weight, halo_tok=halo_tok, region_tok=region_tok,
        tok_local=((ys % region) * region + xs % region).to(device), region=region,
    )


@dataclass
class _Record:
    """What one block did in one forward: queries per image (differentiable in training), its gates."""

    block: int
    nq: torch.Tensor  # (B,)
    gates: torch.Tensor | None  # (B, Rh, Rw) granularity index (inference)
    router_ran: bool
    conv_macs: torch.Tensor | None = None  # (B,) PVT-v2: MACs of the depthwise convolution on this path


@dataclass
class _Forced:
    """Gates forced for speed benchmarks: level ``low`` or ``low + 1`` with probability ``frac`` per region."""

    rho: float
    low: int
    frac: float
    mode: str
    seed: int
    generator: torch.Generator = field(default_factory=torch.Generator)


class _Context:
    """State shared by the converted model and its DGE blocks for one forward pass (never registered)."""

    def __init__(self, settings: DGESettings) -> None:
        self.region = settings.region_size
        self.sizes = [settings.region_size // g for g in settings.granularities]
        self.layout_mode = settings.inference_layout
        self.mode = "dense"  # dense: the base blocks; sparse: DGE inference; train: DGE dense training path
        self.tau = settings.gumbel_tau
        self.shift = 0.0  # logit shift per coarseness rank (the knob)
        self.level: int | None = None  # all regions at this granularity, no router (knob at 1)
        self.forced: _Forced | None = None
        self.records: list[_Record] = []
        self._layouts: dict[tuple[int, int, str], _Layout] = {}

    def layout(self, hw: tuple[int, int], device: torch.device) -> _Layout:
        key = (int(hw[0]), int(hw[1]), str(device))
        if key not in self._layouts:
            self._layouts[key] = _make_layout(key[:2], self.region, self.sizes, device)
        return self._layouts[key]

    @contextlib.contextmanager
    def run(self, mode: str) -> Iterator[list[_Record]]:
        old = self.mode
        self.mode, self.records = mode, []
        try:
            yield self.records
        finally:
            self.mode = old
            self.records = []


# --- router and block ------------------------------------------------------------------------------------


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
class _BlockParts:
    """What the fx reading of one block found (names relative to the block)."""

    kind: str  # vit | pvt
    norm1: str
    norm2: str
    attn: str
    mlp: str
    post_attn: list[str]  # modules between the attention output and the residual add (ls1, drop_path1)
    post_mlp: list[str]


def _read_block(block: nn.Module, info: BlockInfo, kind: str) -> _BlockParts:
    """Trace one block and check it is ``x + post_attn(attn(norm1(x))); x + post_mlp(mlp(norm2(x)))``."""

    def rel(path: str) -> str:
        return path[len(info.path) + 1:]

    parts = _BlockParts(kind=kind, norm1=rel(info.norms[0]), norm2=rel(info.norms[1]), attn=rel(info.attn),
                        mlp=rel(info.mlp), post_attn=[], post_mlp=[])
    where = f"dge: block {info.path}"
    gm = vfx.trace(block)
    nodes = list(gm.graph.nodes)
    x = next(n for n in nodes if n.op == "placeholder")
    adds = [n for n in nodes if vfx.is_add(n) and not vfx.scopes(n)]
    out = next(n for n in nodes if n.op == "output")
    if len(adds) != 2 or out.args[0] is not adds[1] or x not in adds[0].args or adds[0] not in adds[1].args:
        raise AnatomyError(f"{where} is not a pre-norm residual block (x + attn branch, then + MLP branch)")

    def top(n: fx.Node) -> str:
        s = vfx.scopes(n)
        return s[0] if s else ""

    def consumers_of(scope: str) -> set[fx.Node]:
        inputs: set[fx.Node] = set()
        for n in nodes:
            if top(n) == scope:
                inputs.update(a for a in n.all_input_nodes if top(a) != scope)
        return inputs

    if x not in consumers_of(parts.norm1) or adds[0] not in consumers_of(parts.norm2):
        raise AnatomyError(f"{where}: {parts.norm1} must normalise the block input and {parts.norm2} the "
                           "attention output (pre-norm block)")
    for add, core, post in ((adds[0], parts.attn, parts.post_attn), (adds[1], parts.mlp, parts.post_mlp)):
        residual = x if add is adds[0] else adds[0]
        branch = next(a for a in add.args if isinstance(a, fx.Node) and a is not residual)
        chain: list[str] = []
        node = branch
        while top(node) != core:
            name = top(node)
            if not name or name in (parts.norm1, parts.norm2, parts.attn, parts.mlp):
                raise AnatomyError(f"{where}: the residual branch of {core} holds {node.name!r} outside a "
                                   "per-token module (only layer scale / drop path / identity are supported)")
            if not chain or chain[-1] != name:
                chain.append(name)
            ins = [a for a in node.all_input_nodes if a.op != "get_attr"]
            if len(ins) != 1:
                raise AnatomyError(f"{where}: unexpected residual branch shape at {node.name!r}")
            node = ins[0]
        post.extend(reversed(chain))
    if kind == "vit":
        attn = block.get_submodule(parts.attn)
        if not isinstance(getattr(attn, "qkv", None), nn.Linear) or not hasattr(attn, "num_heads"):
            raise AnatomyError(f"{where}: dge needs timm's Attention with a fused qkv Linear "
                               f"(found {type(attn).__name__})")
    else:
        attn = block.get_submodule(parts.attn)
        mlp = block.get_submodule(parts.mlp)
        if not all(isinstance(getattr(attn, n, None), nn.Linear) for n in ("q", "kv", "proj")):
            raise AnatomyError(f"{where}: dge needs PVT-v2 attention with q, kv and proj Linear layers")
        if not all(hasattr(mlp, n) for n in ("fc1", "dwconv", "fc2", "act")):
            raise AnatomyError(f"{where}: dge needs PVT-v2's MLP (fc1, dwconv, act, fc2)")
        dw = mlp.dwconv
        if not (isinstance(dw, nn.Conv2d) and dw.kernel_size == (3, 3) and dw.stride == (1, 1)
                and dw.padding == (1, 1) and dw.dilation == (1, 1) and dw.groups == dw.in_channels == dw.out_channels):
            raise AnatomyError(f"{where}: dge needs PVT-v2's 3x3 depthwise convolution (stride 1, padding 1)")
    if any(True for _ in block.named_parameters(recurse=False)) or any(True for _ in block.named_buffers(
            recurse=False)):
        raise AnatomyError(f"{where}: parameters held directly by the block are not supported")
    return parts


class _Packed:
    """The batch's selected queries as one (M, C) matrix, grouped by where their rows come from: the
    full-resolution map (prefix and finest tokens), then each coarser granularity's pooled table; image
    after image inside each group.

    Norms, linear layers and the MLP run on the M rows with no padding. Only the attention core is
    padded per image to the batch's largest query count (one batched SDPA call): per-image calls are
    far slower on CPU (each small parallel call pays thread start-up), and the core is ~6% of a block's
    MACs. Row order inside an image does not matter: queries attend independently.
    """

    def __init__(self, qsel: torch.Tensor, tok_src: torch.Tensor, bounds: list[int], sizes: list[int],
                 gates: torch.Tensor) -> None:
        b, t = qsel.shape
        dev = qsel.device
        groups = [qsel[:, s:e] for s, e in itertools.pairwise(bounds)]
        counts = [g.sum(1) for g in groups]
        self.nq = torch.stack(counts).sum(0)
        self.batch = b
        self.sizes = sizes
        self.gates = gates
        self.widths = [e - s for s, e in itertools.pairwise(bounds)]
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
        out = full.new_empty(self.m, c)
        for g, (src, s, e) in enumerate(zip(self.src, self.offsets, self.offsets[1:], strict=False)):
            if e > s:
                table = full if g == 0 else pooled[self.sizes[g]]
                torch.index_select(table.reshape(-1, c), 0, src, out=out[s:e])
        return out

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout: float) -> torch.Tensor:
        """(M, D) queries against per-image (B, h, Nk, d) keys/values -> (M, D)."""
        d = q.shape[-1]
        padded = q.index_select(0, self.pad_src).view(self.batch, self.length, d)
        o = _attend_batched(padded, k, v, dropout)
        return o.reshape(-1, d).index_select(0, self.unpad)

    def to_tokens(self, t: torch.Tensor) -> torch.Tensor:
        """Per-query rows -> (B, N, D): every token takes the row of the query covering it."""
        return t.index_select(0, self.tok_rows.flatten()).view(self.batch, -1, t.shape[-1])

    def level_rows(self, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rows of the group-``k`` queries, their image and their column inside the group."""
        src = self.src[k]
        rows = torch.arange(self.offsets[k], self.offsets[k + 1], device=src.device)
        return rows, src // self.widths[k], src % self.widths[k]

    @property
    def flat_tok_rows(self) -> torch.Tensor:
        return self.tok_rows


class _Padded:
    """The selected queries of each image padded to the batch's largest count: (B, L, C)."""

    def __init__(self, qsel: torch.Tensor, tok_src: torch.Tensor, bounds: list[int], sizes: list[int],
                 gates: torch.Tensor) -> None:
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
        # Flat (B * L) row numbers, for the per-scale depthwise convolution of PVT-v2.
        first = torch.arange(b, device=qsel.device).unsqueeze(1) * length
        self.cand_rows = torch.where(qsel, first + pos, -1)
        self.flat_tok_rows = first + self.tok_rows

    def level_rows(self, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Flat rows of the selected candidates of group ``k``, their image and their column in the group."""
        s, e = self.bounds[k], self.bounds[k + 1]
        img, col = self.qsel[:, s:e].nonzero().unbind(1)
        return self.cand_rows[img, s + col], img, col

    def gather(self, full: torch.Tensor, pooled: dict[int, torch.Tensor]) -> torch.Tensor:
        table = torch.cat([full, *(pooled[p] for p in self.sizes[1:])], dim=1)
        return table.gather(1, self.idx.unsqueeze(-1).expand(-1, -1, table.shape[-1]))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout: float) -> torch.Tensor:
        return _attend_batched(q, k, v, dropout)

    def to_tokens(self, t: torch.Tensor) -> torch.Tensor:
        return t.gather(1, self.tok_rows.unsqueeze(-1).expand(-1, -1, t.shape[-1]))


class _All:
    """Every candidate as a query (the dense training path): (B, T, C), combined by gates afterwards."""

    def __init__(self, sizes: list[int]) -> None:
        self.sizes = sizes

    def gather(self, full: torch.Tensor, pooled: dict[int, torch.Tensor]) -> torch.Tensor:
        return torch.cat([full, *(pooled[p] for p in self.sizes[1:])], dim=1)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout: float) -> torch.Tensor:
        return _attend_batched(q, k, v, dropout)


def _attend_batched(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout: float) -> torch.Tensor:
    """(B, L, D) queries against (B, h, Nk, d) keys/values -> (B, L, D)."""
    b, length, d = q.shape
    qh = q.view(b, length, k.shape[1], -1).transpose(1, 2)
    return F.scaled_dot_product_attention(qh, k, v, dropout_p=dropout).transpose(1, 2).reshape(b, length, d)


_Selection = _Packed | _Padded | _All


class DGEBlock(nn.Module):
    """A ViT/DeiT or PVT-v2 block with dynamic-granularity queries (see the module docstring).

    It holds the original block's children under their own names, so parameter names do not change.
    """

    def __init__(self, block: nn.Module, parts: _BlockParts, index: int, num_prefix: int,
                 hw: tuple[int, int] | None, router: Router, ctx: _Context) -> None:
        super().__init__()
        for name, child in block.named_children():
            self.add_module(name, child)
        self.parts = parts
        self.index = index
        self.num_prefix = num_prefix
        self.hw = hw  # ViT: fixed grid; PVT-v2: from feat_size
        # Unregistered: the router is registered once, under routers.<index>; the original block shares
        # this module's children and runs the exact dense path.
        object.__setattr__(self, "_router", router)
        object.__setattr__(self, "_orig", block)
        object.__setattr__(self, "_ctx", ctx)

    def extra_repr(self) -> str:
        return f"index={self.index}, kind={self.parts.kind}, prefix={self.num_prefix}"

    # --- forward --------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        ctx: _Context = self.__dict__["_ctx"]
        if ctx.mode == "dense":
            return self.__dict__["_orig"](x, *args, **kwargs)
        if self.parts.kind == "pvt":
            feat = args[0] if args else kwargs["feat_size"]
            hw = (int(feat[0]), int(feat[1]))
        else:
            if (args and args[0] is not None) or kwargs.get("attn_mask") is not None:
                raise UserError("dge: attention masks are not supported")
            assert self.hw is not None
            hw = self.hw
        if ctx.mode == "train":
            return self._forward_train(x, hw)
        return self._forward_sparse(x, hw)

    def _apply_chain(self, names: list[str], t: torch.Tensor) -> torch.Tensor:
        for n in names:
            t = self.get_submodule(n)(t)
        return t

    def _sparse_gates(self, regions: torch.Tensor, lay: _Layout) -> tuple[torch.Tensor, bool]:
        ctx: _Context = self.__dict__["_ctx"]
        b = regions.shape[0]
        if ctx.forced is None and ctx.level is not None:
            return torch.full((b, lay.num_regions), ctx.level, dtype=torch.long, device=regions.device), False
        logits = self.__dict__["_router"](regions)
        if ctx.forced is not None:  # the router still runs, so benchmarks time and count it
            return _forced_gates(ctx.forced, b, lay.num_regions, regions.device), True
        if ctx.shift:
            rank = torch.arange(logits.shape[-1], device=logits.device, dtype=logits.dtype)
            logits = logits + ctx.shift * rank
        return logits.argmax(dim=-1), True

    def _forward_sparse(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        ctx: _Context = self.__dict__["_ctx"]
        lay = ctx.layout(hw, x.device)
        p = self.num_prefix
        b, n, c = x.shape
        pooled = _pool(x[:, p:].reshape(b, hw[0], hw[1], c), lay, [*lay.sizes[1:], lay.region])
        gates, ran = self._sparse_gates(pooled[lay.region], lay)
        sel = gates[:, lay.cand_region] == lay.cand_gran
        qsel = torch.cat([sel.new_ones(b, p), sel], dim=1)
        g_tok = gates[:, lay.tok_region]
        tok_src = p + lay.tok_cand_t.unsqueeze(0).expand(b, -1, -1).gather(2, g_tok.unsqueeze(-1)).squeeze(2)
        tok_src = torch.cat([torch.arange(p, device=x.device).expand(b, p), tok_src], dim=1)
        # Dropping a path per row of a packed batch would drop tokens, not images: pad while training.
        if ctx.layout_mode == "packed" and not self.training:
            q: _Selection = _Packed(qsel, tok_src, lay.bounds(n), lay.sizes, gates)
        else:
            q = _Padded(qsel, tok_src, lay.bounds(n), lay.sizes, gates)
        delta = self._updates(q.gather(x, pooled), x, hw, lay, q, None)
        out = q.to_tokens(delta)
        out = out.add_(x) if not torch.is_grad_enabled() else out + x
        ctx.records.append(_Record(self.index, q.nq.to(torch.float64), gates.reshape(b, *lay.regions), ran,
                                   self._conv_macs(gates, lay)))
        return out

    def _forward_train(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        ctx: _Context = self.__dict__["_ctx"]
        lay = ctx.layout(hw, x.device)
        p = self.num_prefix
        b, _, c = x.shape
        pooled = _pool(x[:, p:].reshape(b, hw[0], hw[1], c), lay, [*lay.sizes[1:], lay.region])
        logits = self.__dict__["_router"](pooled[lay.region])
        if ctx.forced is not None:  # the knob is for inference; forcing also serves the training path's tests
            idx = _forced_gates(ctx.forced, b, lay.num_regions, x.device)
            gates = F.one_hot(idx, logits.shape[-1]).to(x.dtype)
        else:
            gates = F.gumbel_softmax(logits.float(), tau=ctx.tau, hard=True, dim=-1).to(x.dtype)
        gate_tok = gates[:, lay.tok_region]  # (B, HW, K)
        q = _All(lay.sizes)
        delta = self._updates(q.gather(x, pooled), x, hw, lay, q, gate_tok)
        upd = sum(gate_tok[..., k:k + 1] * delta.index_select(1, p + lay.tok_cand[k])
                  for k in range(len(lay.sizes)))
        out_grid = x[:, p:] + upd
        out = torch.cat([x[:, :p] + delta[:, :p], out_grid], dim=1) if p else out_grid
        nq = p + (gates * lay.nq.to(gates.dtype)).sum(dim=(1, 2))
        ctx.records.append(_Record(self.index, nq, None, True, self._conv_macs(gates.detach().argmax(-1), lay)))
        return out

    def _conv_macs(self, gates: torch.Tensor, lay: _Layout) -> torch.Tensor | None:
        if self.parts.kind != "pvt":
            return None
        return _dwconv_macs(self.get_submodule(self.parts.mlp).dwconv, gates, lay)

    # --- the block's computation on queries -------------------------------------------------------------

    def _updates(self, q_in: torch.Tensor, x: torch.Tensor, hw: tuple[int, int], lay: _Layout,
                 q: _Selection, gate_tok: torch.Tensor | None) -> torch.Tensor:
        """Attention + MLP updates of the queries (q_out - q_in), keys and values from all of ``x``."""
        norm1 = self.get_submodule(self.parts.norm1)
        norm2 = self.get_submodule(self.parts.norm2)
        a = self._attention(norm1(q_in), norm1(x), hw, q)
        a = self._apply_chain(self.parts.post_attn, a)
        m = self._mlp(norm2(q_in + a), hw, lay, q, gate_tok)
        m = self._apply_chain(self.parts.post_mlp, m)
        return a.add_(m) if not torch.is_grad_enabled() else a + m

    def _attention(self, qn: torch.Tensor, xn: torch.Tensor, hw: tuple[int, int], q: _Selection) -> torch.Tensor:
        attn = self.get_submodule(self.parts.attn)
        b, n, _ = xn.shape
        heads = attn.num_heads
        if self.parts.kind == "vit":
            dim = heads * attn.head_dim
            w, bias = attn.qkv.weight, attn.qkv.bias
            qp = F.linear(qn, w[:dim], bias[:dim] if bias is not None else None)
            kv = F.linear(xn, w[dim:], bias[dim:] if bias is not None else None)
            k, v = kv.view(b, n, 2, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
            k = attn.k_norm(k)
            if not isinstance(attn.q_norm, nn.Identity):
                qp = attn.q_norm(qp.unflatten(-1, (heads, -1))).flatten(-2)
        else:
            qp = attn.q(qn)
            k, v = _pvt_kv(attn, xn, hw)
        o = q.attend(qp, k, v, attn.attn_drop.p if self.training else 0.0)
        if self.parts.kind == "vit":
            o = attn.norm(o)
            if getattr(attn, "gate", None) is not None:
                o = o * attn.gate(qn).sigmoid()
        return attn.proj_drop(attn.proj(o))

    def _mlp(self, t: torch.Tensor, hw: tuple[int, int], lay: _Layout, q: _Selection,
             gate_tok: torch.Tensor | None) -> torch.Tensor:
        mlp = self.get_submodule(self.parts.mlp)
        if self.parts.kind == "vit":
            return mlp(t)
        # PVT-v2: fc1 on the queries, the depthwise convolution at each granularity's scale, act, fc2.
        if isinstance(q, _All):
            assert gate_tok is not None
            h = _dwconv_all(mlp.dwconv, mlp.relu(mlp.fc1(t)), hw, lay, gate_tok)
        else:
            # The rows plus one zero row (read for tokens off the grid), written by fc1 in place when
            # autograd is off: copying a hidden-width table costs as much as a small convolution.
            rows = t.reshape(-1, t.shape[-1])
            d = mlp.fc1.out_features
            if torch.is_grad_enabled():
                table = torch.cat([mlp.fc1(rows), rows.new_zeros(1, d)])
            else:
                table = rows.new_empty(rows.shape[0] + 1, d)
                torch.matmul(rows, mlp.fc1.weight.t(), out=table[:-1])
                if mlp.fc1.bias is not None:
                    table[:-1] += mlp.fc1.bias
                table[-1].zero_()
            h = _dwconv_selected(mlp.dwconv, mlp.relu(table), hw, lay, q).view(*t.shape[:-1], d)
        h = mlp.drop(mlp.act(h))
        return mlp.drop(mlp.fc2(h))


# --- PVT-v2's depthwise convolution on mixed granularities (see the module docstring) ----------------------


def _fold_kernel(weight: torch.Tensor, p: int) -> torch.Tensor:
    """3x3 depthwise kernel acting on p x p cell averages: C w C^T / p^2 with C = [[1,0,0],[p-1,p,p-1],[0,0,1]].

    C[i, j] counts the output rows of a p-row cell that read neighbour cell i - 1 (above, itself, below)
    through kernel row j: the cell itself is read by all p rows through the centre tap and by p - 1 rows
    through each outer tap, the cell above only by the first row through the top tap. The same holds for
    columns. Written with slices, so MAC counters see no matmul.
    """
    if p == 1:
        return weight

    def fold(w: torch.Tensor, dim: int) -> torch.Tensor:
        a, b, c = w.unbind(dim)
        return torch.stack([a, (p - 1) * (a + c) + p * b, c], dim)

    return fold(fold(weight, 2), 3) / (p * p)


def _conv_at(conv: nn.Conv2d, fmap: torch.Tensor, p: int) -> torch.Tensor:
    """(B, h, w, D) map of p x p cell averages -> (B, h, w, D) depthwise convolution at that scale."""
    out = F.conv2d(fmap.permute(0, 3, 1, 2), _fold_kernel(conv.weight, p), conv.bias, padding=1,
                   groups=conv.groups)
    return out.permute(0, 2, 3, 1)


def _dwconv_all(conv: nn.Conv2d, hidden: torch.Tensor, hw: tuple[int, int], lay: _Layout,
                gate_tok: torch.Tensor) -> torch.Tensor:
    """Training path: (B, T, D) hidden states of every candidate -> their convolution outputs (B, T, D)."""
    b, _, d = hidden.shape
    grid = sum(gate_tok[..., k:k + 1] * hidden.index_select(1, lay.tok_cand[k]) for k in range(len(lay.sizes)))
    fmap = grid.view(b, hw[0], hw[1], d)
    pooled = {1: grid, **_pool(fmap, lay, lay.sizes[1:])}
    outs = [_conv_at(conv, pooled[p].view(b, -(-hw[0] // p), -(-hw[1] // p), d), p).reshape(b, -1, d)
            for p in lay.sizes]
    return torch.cat(outs, dim=1)


# Level-0 tokens are convolved from halo patches while at most this share of the regions is at level 0;
# above it one convolution of the whole token map is faster on CPU (the patches read 2.25x the tokens and
# a convolution over many 6x6 maps runs far below the kernel's speed on one large map).
_HALO_MAX_SHARE = 0.25


def _use_halo(level0: torch.Tensor, lay: _Layout) -> torch.Tensor:
    """Whether level-0 regions go through halo patches, from the level-0 mask of one image or of a batch."""
    return (level0.float().mean(-1) <= _HALO_MAX_SHARE) & (lay.halo_tok is not None)


def _dwconv_macs(conv: nn.Conv2d, gates: torch.Tensor, lay: _Layout) -> torch.Tensor:
    """(B,) MACs of the convolution for each image run alone (as ``count_macs`` counts it), given its (B, R)
    region levels. In a batch the halo-or-whole-map choice is made for the batch, so a batch may compute more."""
    per_cell = conv.out_channels * (conv.in_channels // conv.groups) * conv.kernel_size[0] * conv.kernel_size[1]
    level = gates.reshape(gates.shape[0], -1)
    macs = torch.zeros(level.shape[0], dtype=torch.float64, device=gates.device)
    halo = _use_halo(level == 0, lay)
    for k, n in enumerate(lay.counts):
        used = (level == k).sum(1).to(torch.float64)
        whole_map = per_cell * n * (used > 0).to(torch.float64)  # one convolution over the level's cell map
        if k == 0 and lay.region_tok is not None:  # or halo patches: the level-0 regions' tokens only
            macs += torch.where(halo, per_cell * lay.region_tok.shape[1] * used, whole_map)
        else:
            macs += whole_map
    return macs


def _dwconv_selected(conv: nn.Conv2d, table: torch.Tensor, hw: tuple[int, int], lay: _Layout,
                     q: _Packed | _Padded) -> torch.Tensor:
    """Inference: (R + 1, D) hidden rows of the selected queries and a last row of zeros (read off the grid)
    -> the (R, D) convolution outputs of the queries."""
    r, d = table.shape[0] - 1, table.shape[1]
    hidden = table[:r]
    gates = q.gates
    b = gates.shape[0]
    # Every packed row is a query and gets written; padded layouts keep zeros in their padding slots.
    out = hidden.new_empty(r, d) if isinstance(q, _Packed) else hidden.new_zeros(r, d)
    start = [0, *itertools.accumulate(lay.counts)]

    def put(k: int, rows: torch.Tensor, res: torch.Tensor, index: torch.Tensor) -> None:
        """out[rows] = res[index]; a packed group's rows are one block, written by one gather."""
        if isinstance(q, _Packed):
            torch.index_select(res, 0, index, out=out[q.offsets[k]:q.offsets[k + 1]])
        else:
            out.index_copy_(0, rows, res.index_select(0, index))

    levels = [q.level_rows(k) for k in range(len(lay.sizes))]  # (rows, image, column) of each level
    level0 = gates == 0
    for k, p in enumerate(lay.sizes):
        rows, img, col = levels[k]
        if not rows.numel():
            continue
        if k == 0 and bool(_use_halo(level0.flatten(), lay)):
            # Each level-0 region with a one-token ring (the ring reads the queries covering it): a valid
            # 3x3 convolution of (S+2)^2 tokens gives its S^2 outputs.
            assert lay.halo_tok is not None
            img0, reg0 = level0.nonzero().unbind(1)
            halo = lay.halo_tok[reg0]
            src = torch.where(halo >= 0, q.flat_tok_rows[img0.unsqueeze(1), halo.clamp(min=0)], r)
            side = lay.region + 2
            patches = table.index_select(0, src.flatten()).view(-1, side, side, d).permute(0, 3, 1, 2)
            res = F.conv2d(patches, conv.weight, conv.bias, groups=conv.groups).permute(0, 2, 3, 1)
            rank = level0.flatten().cumsum(0).view(b, -1) - 1  # patch number of each level-0 region
            squares = lay.region * lay.region
            put(0, rows, res.reshape(-1, d), rank[img, lay.tok_region[col]] * squares + lay.tok_local[col])
            continue
        ch, cw = -(-hw[0] // p), -(-hw[1] // p)
        if k == 0:  # the whole token map
            fmap = table.index_select(0, q.flat_tok_rows.flatten()).view(b, ch, cw, d)
            put(0, rows, _conv_at(conv, fmap, p).reshape(-1, d), img * lay.counts[k] + col)
            continue
        # Only the images with level-k regions, and of their finer queries only those in the ring of cells
        # the level-k queries read (the rest of the cell map is computed but never used).
        g_cell = gates[:, lay.cand_region[start[k]:start[k + 1]]]
        here = g_cell == k
        users = here.any(1).nonzero().squeeze(1)
        slot = torch.full((b,), -1, dtype=torch.long, device=gates.device)
        slot[users] = torch.arange(users.numel(), device=gates.device)
        g_cell, here = g_cell[users], here[users]
        cand = lay.cell_cand[k].unsqueeze(0).expand(users.numel(), -1, -1).gather(2, g_cell.unsqueeze(-1)).squeeze(2)
        src = torch.where(g_cell >= k, q.cand_rows[users].gather(1, cand), r)
        cells = table.index_select(0, src.flatten())
        ring = F.max_pool2d(here.view(-1, 1, ch, cw).to(table.dtype), 3, 1, 1).flatten().bool()
        # Finer queries: averaged into their cells with their share of the cell's real tokens.
        for j, (rows_j, img_j, col_j) in enumerate(levels[:k]):
            c = start[j] + col_j
            at = slot[img_j] * lay.counts[k] + lay.cand_cell[k][c]
            keep = (slot[img_j] >= 0) & ring[at.clamp(min=0)]
            if keep.any():
                rows_j, c, at = rows_j[keep], c[keep], at[keep]
                cells.index_add_(0, at, hidden.index_select(0, rows_j) * lay.cand_weight[k][c].unsqueeze(1))
        res = _conv_at(conv, cells.view(-1, ch, cw, d), p).reshape(-1, d)
        put(k, rows, res, slot[img] * lay.counts[k] + col)
    return out


def _pvt_kv(attn: nn.Module, xn: torch.Tensor, hw: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of PVT-v2 attention from all (normalised) tokens, as timm computes them."""
    b, _, c = xn.shape
    if getattr(attn, "pool", None) is not None:
        m = xn.permute(0, 2, 1).reshape(b, c, hw[0], hw[1])
        r = attn.sr(attn.pool(m)).reshape(b, c, -1).permute(0, 2, 1)
        r = attn.act(attn.norm(r))
    elif getattr(attn, "sr", None) is not None:
        m = xn.permute(0, 2, 1).reshape(b, c, hw[0], hw[1])
        r = attn.norm(attn.sr(m).reshape(b, c, -1).permute(0, 2, 1))
    else:
        r = xn
    kv = attn.kv(r).reshape(b, -1, 2, attn.num_heads, c // attn.num_heads).permute(2, 0, 3, 1, 4)
    k, v = kv.unbind(0)
    return k, v


def _forced_gates(forced: _Forced, batch: int, regions: int, device: torch.device) -> torch.Tensor:
    if forced.mode == "pattern":
        # The same spread of coarser regions in every image: a fixed permutation, the first round(frac * R).
        g = torch.Generator().manual_seed(forced.seed + regions)
        order = torch.randperm(regions, generator=g)
        up = torch.zeros(regions, dtype=torch.long)
        up[order[: round(forced.frac * regions)]] = 1
        return (forced.low + up).to(device).expand(batch, regions)
    up = (torch.rand(batch, regions, generator=forced.generator) < forced.frac).long()
    return (forced.low + up).to(device)


# --- analytic costs -------------------------------------------------------------------------------------


def _ln(mod: nn.Module | None, width: int) -> int:
    """MACs per token of a norm layer, as vitconvert.gmacs counts it (LayerNorm: 5 per element)."""
    return 5 * width if isinstance(mod, nn.LayerNorm) else 0


def _block_costs(block: nn.Module, parts: _BlockParts, tokens: int, hw: tuple[int, int]) -> dict[str, float]:
    """MACs of one block: ``dense`` (the base block), and the DGE path as ``fixed + per_query * Nq``."""
    norm1 = block.get_submodule(parts.norm1)
    norm2 = block.get_submodule(parts.norm2)
    attn = block.get_submodule(parts.attn)
    mlp = block.get_submodule(parts.mlp)
    n = tokens
    if parts.kind == "vit":
        c = attn.qkv.in_features
        d = attn.num_heads * attn.head_dim
        mlp_tok = sum(m.in_features * m.out_features for m in mlp.modules() if isinstance(m, nn.Linear))
        mlp_tok += sum(5 * math.prod(m.normalized_shape) for m in mlp.modules() if isinstance(m, nn.LayerNorm))
        gate = c * d if getattr(attn, "gate", None) is not None else 0
        per_q = (_ln(norm1, c) + c * d + _ln(attn.q_norm, d) + 2 * n * d + _ln(attn.norm, d) + gate
                 + d * c + _ln(norm2, c) + mlp_tok)
        fixed = n * (_ln(norm1, c) + 2 * c * d + _ln(attn.k_norm, d))
        dense = n * (_ln(norm1, c) + 3 * c * d + _ln(attn.q_norm, d) + _ln(attn.k_norm, d) + 2 * n * d
                     + _ln(attn.norm, d) + gate + d * c + _ln(norm2, c) + mlp_tok)
    else:
        c = attn.q.in_features
        hidden = mlp.fc1.out_features
        dw: nn.Conv2d = mlp.dwconv
        dw_macs = n * hidden * (hidden // dw.groups) * dw.kernel_size[0] * dw.kernel_size[1]
        if getattr(attn, "pool", None) is not None:
            size = attn.pool.output_size
            nkv = math.prod((size, size) if isinstance(size, int) else size)
            kv = nkv * (c * c + _ln(attn.norm, c) + 2 * c * c)
        elif getattr(attn, "sr", None) is not None:
            sr: nn.Conv2d = attn.sr
            ho = (hw[0] - sr.kernel_size[0]) // sr.stride[0] + 1
            wo = (hw[1] - sr.kernel_size[1]) // sr.stride[1] + 1
            nkv = ho * wo
            kv = nkv * (c * c * sr.kernel_size[0] * sr.kernel_size[1] + _ln(attn.norm, c) + 2 * c * c)
        else:
            nkv = n
            kv = n * 2 * c * c
        mlp_tok = c * hidden + hidden * c
        per_q = _ln(norm1, c) + c * c + 2 * nkv * c + c * c + _ln(norm2, c) + mlp_tok
        fixed = n * _ln(norm1, c) + kv  # + the depthwise convolution, which depends on the levels used
        dense = n * (_ln(norm1, c) + c * c + 2 * nkv * c + c * c + _ln(norm2, c) + mlp_tok) + kv + dw_macs
    return {"fixed": float(fixed), "per_query": float(per_q), "dense": float(dense)}


# --- the converted model ---------------------------------------------------------------------------------


@register_method
class DGE(ConvertedModel):
    """Dynamic Grained Encoder (see the module docstring)."""

    method = "dge"
    families = ("vit", "pvt_v2")
    description = "DGE dynamic-granularity queries per region (ViT/DeiT, PVT-v2)"
    Settings = DGESettings
    Losses = DGELosses

    def __init__(self, base: nn.Module, spec: BaseSpec, recipe: Recipe, anatomy: Anatomy) -> None:
        super().__init__(base, spec, recipe, anatomy)
        s: DGESettings = self.settings
        stages = list(range(len(anatomy.stages))) if s.stages is None else list(s.stages)
        bad = [i for i in stages if not 0 <= i < len(anatomy.stages)]
        if bad or not stages:
            raise UserError(f"recipe: model.stages must list stages in 0..{len(anatomy.stages) - 1}, got {s.stages}")
        kind = "vit" if anatomy.family == "vit" else "pvt"
        ctx = _Context(s)
        object.__setattr__(self, "_ctx", ctx)
        self.num_prefix = anatomy.num_prefix_tokens if kind == "vit" else 0
        self.routers = nn.ModuleDict()
        self.costs: dict[int, dict[str, float]] = {}
        self.dynamic_blocks: list[int] = []
        k = len(s.granularities)
        for info in anatomy.blocks:
            if info.stage not in stages:
                continue
            block = base.get_submodule(info.path)
            parts = _read_block(block, info, kind)
            grid = anatomy.stages[info.stage].grid
            router = Router(info.dim, k, s.init_finest_prob, s.router_init_std, s.router_norm)
            self.routers[str(info.index)] = router
            lay = _make_layout(grid, s.region_size, ctx.sizes, torch.device("cpu"))
            costs = _block_costs(block, parts, info.tokens, grid)
            costs["router"] = float(lay.num_regions * (info.dim * k + _ln(router.norm, info.dim)))
            costs["level_nq"] = [float(self.num_prefix + v) for v in lay.nq.sum(0).tolist()]
            costs["level_conv"] = [0.0] * k
            if kind == "pvt":  # every region at level j: what DGEBlock._conv_macs counts
                gates = torch.arange(k).view(k, 1).expand(k, lay.num_regions)
                costs["level_conv"] = _dwconv_macs(block.get_submodule(parts.mlp).dwconv, gates, lay).tolist()
            self.costs[info.index] = costs
            self.dynamic_blocks.append(info.index)
            new = DGEBlock(block, parts, info.index, self.num_prefix, grid if kind == "vit" else None, router, ctx)
            base.set_submodule(info.path, new)
        self.tau = s.gumbel_tau
        self.coarsening = s.coarsening

    # --- knob -----------------------------------------------------------------------------------------

    @property
    def _c(self) -> _Context:
        return self.__dict__["_ctx"]

    def operating_space(self) -> OperatingSpace:
        # Logit shifts; dense around 0 and wide at the ends: routers trained at a high rate have logit gaps of
        # several units, and the last regions to turn coarse change the cost the most.
        shifts = [-8.0, -6.0, -4.0, -3.0, -2.0, -1.5, -1.0, -0.5, 0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 2.5, 3.0,
                  4.0, 5.0, 6.0, 8.0, 10.0, 12.0]
        sweep = (0.0, *(round(1.0 / (1.0 + math.exp(-b)), 6) for b in shifts), 1.0)
        return OperatingSpace((Knob("coarsening", 0.0, 1.0, full=0.0, sweep=sweep,
                                    description="0: the base blocks; 0.5: the routers' argmax; 1: coarsest"),))

    @property
    def coarsening(self) -> float:
        """The knob: ``logit(coarsening) * rank`` is added to the routers' logits (see the module docstring)."""
        return float(self._coarsening)

    @coarsening.setter
    def coarsening(self, value: float) -> None:
        if not 0.0 <= value <= 1.0:
            raise UserError(f"coarsening must lie in [0, 1], got {value}")
        self._coarsening = float(value)
        ctx = self._c
        ctx.level = len(ctx.sizes) - 1 if value >= 1.0 else None
        ctx.shift = math.log(value / (1.0 - value)) if 0.0 < value < 1.0 else 0.0

    def method_state(self) -> dict[str, Any]:
        return {"gumbel_tau": self.tau}

    def load_method_state(self, state: dict[str, Any]) -> None:
        state = dict(state)
        tau = state.pop("gumbel_tau", None)
        if tau is not None:
            if not isinstance(tau, int | float) or not math.isfinite(tau) or tau <= 0:
                raise UserError(f"config: state.gumbel_tau must be a positive number, got {tau!r}")
            self.tau = float(tau)
        super().load_method_state(state)

    @property
    def tau(self) -> float:
        return self._c.tau

    @tau.setter
    def tau(self, value: float) -> None:
        self._c.tau = float(value)

    def lr_scales(self) -> dict[str, float]:
        """The routers learn at ``router_lr_scale`` times the recipe's rate: from their exact start (P(finest)
        = 0.95) a short recipe at a fine-tuning rate would barely move them."""
        return {"routers": self.settings.router_lr_scale}

    def set_train_progress(self, fraction: float) -> None:
        """Anneal the Gumbel temperature geometrically from ``gumbel_tau`` to ``gumbel_tau_final``.

        Args:
            fraction: Share of fine-tuning done, 0..1 (the pipeline calls this before each step).
        """
        s: DGESettings = self.settings
        end = s.gumbel_tau_final or s.gumbel_tau
        f = min(max(float(fraction), 0.0), 1.0)
        self.tau = s.gumbel_tau * (end / s.gumbel_tau) ** f

    # --- forcing gates for speed benchmarks ---------------------------------------------------------------

    def level_ratios(self) -> list[float]:
        """Dynamic/static GMACs ratio with every region of every dynamic block at each granularity."""
        out = []
        for k in range(len(self._c.sizes)):
            extra = sum(c["fixed"] + c["router"] + c["per_query"] * c["level_nq"][k] + c["level_conv"][k] - c["dense"]
                        for c in self.costs.values())
            out.append(1.0 + extra / GIGA / self.base_gmacs)
        return out

    def force_ratio(self, rho: float | None, mode: Literal["random", "pattern"] = "random", seed: int = 0
                    ) -> float:
        """Force the gates so the expected dynamic/static GMACs ratio is ``rho`` (for speed benchmarks).

        Each region takes one of two neighbouring granularities: at random per image and region
        (``"random"``, so images differ as they do with a trained router) or by a fixed pattern shared
        by all images (``"pattern"``). The routers still run, so their cost is timed and counted.

        Args:
            rho: Target ratio; ``None`` removes the forcing.
            mode: ``"random"`` or ``"pattern"``.
            seed: Seed of the random draws / the pattern.

        Returns:
            The expected ratio of the forced gates (rho clipped to what the granularities can reach).

        Example:
            >>> model.force_ratio(0.5)  # doctest: +SKIP
        """
        ctx = self._c
        if rho is None:
            ctx.forced = None
            return float("nan")
        if mode not in ("random", "pattern"):
            raise UserError(f"force_ratio: mode must be 'random' or 'pattern', got {mode!r}")
        levels = self.level_ratios()
        if rho < levels[-1] - 1e-9:
            raise UserError(f"force_ratio: rho={rho} is below the cheapest setting ({levels[-1]:.3f}: every "
                            "region at the coarsest granularity)")
        if rho >= levels[0]:
            low, frac = 0, 0.0
        else:
            low = next(j for j in range(len(levels) - 1) if levels[j] >= rho >= levels[j + 1])
            frac = (levels[low] - rho) / (levels[low] - levels[low + 1])
        ctx.forced = _Forced(rho=rho, low=low, frac=frac, mode=mode, seed=seed,
                             generator=torch.Generator().manual_seed(seed))
        return levels[low] + frac * (levels[low + 1] - levels[low]) if frac else levels[low]

    @property
    def forced_rho(self) -> float | None:
        """The ratio passed to :meth:`force_ratio`, or None when the routers decide."""
        forced = self._c.forced
        return forced.rho if forced is not None else None

    # --- forward --------------------------------------------------------------------------------------

    def _check_input(self, x: torch.Tensor) -> None:
        if tuple(x.shape[-2:]) != tuple(self.anatomy.img_size):
            raise ValueError(f"expected {self.anatomy.img_size[0]}x{self.anatomy.img_size[1]} images "
                             f"(the base model's size), got {x.shape[-2]}x{x.shape[-1]}")

    def _gmacs(self, records: list[_Record], batch: int, device: torch.device) -> torch.Tensor:
        """Per-image MACs (float64) of the path taken, from the blocks' records."""
        total = torch.full((batch,), self.base_gmacs * GIGA, dtype=torch.float64, device=device)
        for r in records:
            c = self.costs[r.block]
            const = c["fixed"] - c["dense"] + (c["router"] if r.router_ran else 0.0)
            total = total + const + c["per_query"] * r.nq.to(torch.float64)
            if r.conv_macs is not None:
                total = total + r.conv_macs
        return total

    def forward_dynamic(self, x: torch.Tensor) -> DynamicOutput:
        """Inference at the current knob; ``gmacs`` per image from the gates each block chose."""
        self._check_input(x)
        dense = self.coarsening <= 0.0 and self._c.forced is None
        with self._c.run("dense" if dense else "sparse") as records:
            logits = self.base(x)
            recs = list(records)
        b = x.shape[0]
        gm = self._gmacs(recs, b, x.device)
        extras: dict[str, torch.Tensor] = {}
        if recs:
            extras["queries"] = torch.stack([r.nq for r in recs], dim=1).float()
            for r in recs:
                if r.gates is not None:
                    extras[f"granularity.{r.block}"] = r.gates
        return DynamicOutput(logits=logits, gmacs=(gm / GIGA).float(), extras=extras)

    def forward_train(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Dense training path with straight-through Gumbel gates; ``rho`` = dynamic/static GMACs of the batch."""
        self._check_input(x)
        with self._c.run("train") as records:
            logits = self.base(x)
            recs = list(records)
        gm = self._gmacs(recs, x.shape[0], x.device)
        rho = (gm.mean() / (self.base_gmacs * GIGA)).float()
        return {"logits": logits, "rho": rho}

    def method_losses(self, outputs: dict[str, torch.Tensor], labels: torch.Tensor | None,
                      teacher_logits: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        gamma = self.settings.budget_target
        return {"budget": (outputs["rho"].float() - gamma) ** 2}


# --- picture --------------------------------------------------------------------------------------------

_COLORS = ["#d62728", "#ff7f0e", "#2ca02c", "#1f77b4", "#9467bd"]


@torch.no_grad()
def plot_granularity(model: DGE, images: torch.Tensor, path: str | Path, block: int | None = None,
                     mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> Path:
    """Draw the granularity each region got on a few images and write a PNG.

    Top row: the image with the query sub-patches of one block outlined (finest red ... coarsest blue).
    Bottom row: queries per region averaged over all dynamic blocks of that block's stage.

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

    if not isinstance(model, DGE):
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
        out = model.forward_dynamic(images)
    finally:
        model.train(was_training)
    if f"granularity.{block}" not in out.extras:
        raise UserError("no granularities to draw at coarsening=0 (the base model runs); raise the knob")
    cfg = model.pretrained_cfg
    mean_t = torch.tensor(mean if mean is not None else cfg.get("mean", (0.0, 0.0, 0.0))).view(3, 1, 1)
    std_t = torch.tensor(std if std is not None else cfg.get("std", (1.0, 1.0, 1.0))).view(3, 1, 1)
    stage = stage_of[block]
    gh, gw = model.anatomy.stages[stage].grid
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
