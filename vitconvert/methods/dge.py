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
  gathered, run through attention and MLP, and scattered back (``inference_layout``: ``packed`` or
  ``padded``, :mod:`vitconvert.layers.ragged`). ``DynamicOutput.gmacs`` is the analytic cost of the path
  each image took, counted the way :func:`vitconvert.count_macs` counts (it matches to the MAC).
* **Sparse or dense, per block and batch** (``execution``): gathering the selected queries, padding them
  around the attention core and scattering the updates back costs time the skipped MACs must pay for. Where
  they do not (few coarse regions, small maps, a batch of one, PVT-v2's convolution at mixed scales), the block
  runs *densely*: every token is a query row holding its query's state (a coarse query repeated over its
  sub-patch, :class:`~vitconvert.layers.ragged.TokenQueries`; PVT-v2's convolution from the token map,
  :func:`~vitconvert.layers.scale_conv.dwconv_tokens`), in the base block's shapes and with the same results;
  a batch with every region at the finest granularity runs the base block itself. Under ``auto`` (the default)
  a batch whose images each take one level in all their regions (always so on grids of one region, like
  PVT-v2's last stages on small images) runs *split*: one dense batch per level, the finest images through
  the base block, the others with their level's whole cell map as queries (no gathers, no padding). Otherwise
  ``auto`` takes the path :func:`path_costs` estimates cheaper: a deterministic model of the block's matrix-product
  MACs, elements moved and operators launched on each path, with per-device constants
  (:data:`EXECUTION_COSTS`) measured on the benchmark CPU. Modelled rather than timed at run time: the same
  gates always take the same path (reproducible results), and no measurement inside a forward pass is
  thrown off by a shared machine's load. ``gmacs`` always counts the DGE computation (what the model
  computes; a dense block runs more MACs to finish sooner); ``extras["dense_blocks"]`` says how many blocks
  ran densely.
* **Gates from outside**: :meth:`DGE.override_gates` replaces the routers' choice in both paths (speed
  benchmarks force GMACs ratios with it, ``benchmarks/dge_forcing.py``); the routers still run.

**Regions** come from :mod:`vitconvert.layers.regions`: grids not divisible by the region size (DeiT at
224 px: 14x14; PVT-v2's last stages: 14x14 and 7x7) get border regions cut short, every average (router
input, query, sub-patch) is over the real tokens only and the cost counts only real queries. Nothing is
resized, so the model stays exact at the finest granularity. Tested on 10x10 and 7x7 ViT grids, PVT-v2
grids 14/7/4/2 (smaller than a region) and timm's DeiT-S at 224 px.

**PVT-v2's MLP** holds a 3x3 depthwise convolution over the token map. ``fc1`` runs on the queries, each
query gets the convolution evaluated at its own scale (its sub-patch side,
:mod:`vitconvert.layers.scale_conv`), then activation and ``fc2`` run on the queries. At the finest
granularity this is timm's MLP (exactness); with one granularity everywhere it equals the full-resolution
convolution averaged over each sub-patch; next to finer regions a coarse query sees its neighbours' cell
averages instead of their border tokens (the training path computes the same thing, so nothing is learned
for a different model). The convolution's MACs are counted per image as that image alone would run them.

**How it fits the fx anatomy.** :func:`vitconvert.read_anatomy` names the blocks, their stage and grid,
``norm1``/``norm2``, the attention and MLP modules and the prefix-token count. Each dynamic block is then
read by the shared pre-norm residual block reader (:func:`vitconvert.layers.seams.read_residual_block`:
``x + branch(attn(norm1(x)))``, then ``+ branch(mlp(norm2(.)))``), which also gives the modules between each
core and its residual add (layer scale, drop path) that the DGE path applies to the query updates.
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
import copy
import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn

from vitconvert.anatomy import Anatomy, BlockInfo
from vitconvert.errors import AnatomyError, UserError
from vitconvert.layers.costs import GIGA, norm_macs
from vitconvert.layers.ragged import (
    AllQueries,
    PackedQueries,
    PaddedQueries,
    QuerySelection,
    TokenQueries,
    UniformQueries,
)
from vitconvert.layers.regions import RegionLayout, make_layout, pool_subpatches
from vitconvert.layers.scale_conv import conv_at, dwconv_all, dwconv_macs, dwconv_selected, dwconv_tokens
from vitconvert.layers.seams import read_residual_block
from vitconvert.methods.base import ConvertedModel, DynamicOutput
from vitconvert.operating import Knob, OperatingSpace
from vitconvert.recipes import Recipe, Strict
from vitconvert.registry import register_method
from vitconvert.sources import BaseSpec

__all__ = ["DGE", "DGEBlock", "DGELosses", "DGESettings", "GateOverride", "Router", "plot_granularity"]


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
    execution: Literal["auto", "sparse", "dense"] = Field(
        "auto", description="inference per block and batch: auto (the cheaper of sparse and dense by the cost "
                            "model), sparse (always gather the queries) or dense (every token a query row)")

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


# --- what a forward records, and the state the blocks share ------------------------------------------------


@dataclass
class _Record:
    """What one block did in one forward: queries per image (differentiable in training), its gates."""

    block: int
    nq: torch.Tensor  # (B,)
    gates: torch.Tensor | None  # (B, Rh, Rw) granularity index (inference)
    router_ran: bool
    conv_macs: torch.Tensor | None = None  # (B,) PVT-v2: MACs of the depthwise convolution on this path
    path: str = "sparse"  # how it ran (inference): sparse, dense (every token a row), split (by level) or base


# (block index, batch, regions, device) -> (batch, regions) granularity index of each region (long, 0 = finest).
GateOverride = Callable[[int, int, int, torch.device], torch.Tensor]


class _Context:
    """State shared by the converted model and its DGE blocks for one forward pass (never registered)."""

    def __init__(self, settings: DGESettings) -> None:
        self.region = settings.region_size
        self.sizes = [settings.region_size // g for g in settings.granularities]
        self.layout_mode = settings.inference_layout
        self.execution = settings.execution
        self.mode = "dense"  # dense: the base blocks; sparse: DGE inference; train: DGE dense training path
        self.tau = settings.gumbel_tau
        self.shift = 0.0  # logit shift per coarseness rank (the knob)
        self.level: int | None = None  # all regions at this granularity, no router (knob at 1)
        # Gates from outside instead of the routers' choice (speed benchmarks, tests); None: the routers decide.
        self.gate_override: GateOverride | None = None
        self.records: list[_Record] = []
        self._layouts: dict[tuple[int, int, str], RegionLayout] = {}
        self._first: dict[tuple[int, int, str, int], torch.Tensor] = {}
        self._uniform: dict[tuple[int, int, str, int, int], torch.Tensor] = {}

    def layout(self, hw: tuple[int, int], device: torch.device) -> RegionLayout:
        key = (int(hw[0]), int(hw[1]), str(device))
        if key not in self._layouts:
            self._layouts[key] = make_layout(key[:2], self.region, self.sizes, device)
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
    """Read one block with the shared pre-norm residual block reader, then check what DGE itself needs."""
    where = f"dge: block {info.path}"
    res = read_residual_block(block, where)
    if res.layout != "tokens":
        raise AnatomyError(f"{where}: dge needs blocks over a token sequence (found a {res.layout} block)")
    parts = _BlockParts(kind=kind, norm1=res.norm1, norm2=res.norm2, attn=res.attn, mlp=res.mlp,
                        post_attn=list(res.post_attn), post_mlp=list(res.post_mlp))
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


class DGEBlock(nn.Module):
    """A ViT/DeiT or PVT-v2 block with dynamic-granularity queries (see the module docstring).

    It holds the original block's children under their own names, so parameter names do not change.
    """

    def __init__(self, block: nn.Module, parts: _BlockParts, index: int, num_prefix: int,
                 hw: tuple[int, int] | None, router: Router, ctx: _Context, costs: dict[str, Any]) -> None:
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
        object.__setattr__(self, "_costs", costs)  # the block's MAC counts (DGE.costs[index]), for the path choice

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
        return self._forward_sparse(x, hw, args, kwargs)

    def _apply_chain(self, names: list[str], t: torch.Tensor) -> torch.Tensor:
        for n in names:
            t = self.get_submodule(n)(t)
        return t

    def _sparse_gates(self, regions: torch.Tensor, lay: RegionLayout) -> tuple[torch.Tensor, bool]:
        ctx: _Context = self.__dict__["_ctx"]
        b = regions.shape[0]
        if ctx.gate_override is None and ctx.level is not None:
            return torch.full((b, lay.num_regions), ctx.level, dtype=torch.long, device=regions.device), False
        logits = self.__dict__["_router"](regions)
        if ctx.gate_override is not None:  # the router still runs, so benchmarks time and count it
            return ctx.gate_override(self.index, b, lay.num_regions, regions.device), True
        if ctx.shift:
            rank = torch.arange(logits.shape[-1], device=logits.device, dtype=logits.dtype)
            logits = logits + ctx.shift * rank
        return logits.argmax(dim=-1), True

    def _forward_sparse(self, x: torch.Tensor, hw: tuple[int, int], args: tuple[Any, ...],
                        kwargs: dict[str, Any]) -> torch.Tensor:
        ctx: _Context = self.__dict__["_ctx"]
        lay = ctx.layout(hw, x.device)
        p = self.num_prefix
        b, n, c = x.shape
        pooled = pool_subpatches(x[:, p:].reshape(b, hw[0], hw[1], c), lay, [*lay.sizes[1:], lay.region])
        gates, ran = self._sparse_gates(pooled[lay.region], lay)
        sel = gates[:, lay.cand_region] == lay.cand_gran
        qsel = torch.cat([sel.new_ones(b, p), sel], dim=1)
        conv_macs = self._conv_macs(gates, lay)
        path = self._choose_path(gates, qsel, lay, conv_macs)
        if path == "base":  # every region at the finest granularity: the base block computes the same thing
            out = self.__dict__["_orig"](x, *args, **kwargs)
            nq = qsel.sum(1)
        elif path == "split":
            out = self._forward_split(x, hw, lay, gates, pooled, args, kwargs)
            nq = qsel.sum(1)
        else:
            g_tok = gates[:, lay.tok_region]
            tok_src = p + lay.tok_cand_t.unsqueeze(0).expand(b, -1, -1).gather(2, g_tok.unsqueeze(-1)).squeeze(2)
            tok_src = torch.cat([torch.arange(p, device=x.device).expand(b, p), tok_src], dim=1)
            q: QuerySelection
            if path == "dense":
                # The MLP (PVT-v2: after the convolution) runs on the queries' own rows, not on their repeats;
                # in training the rows stay per image, as drop path needs.
                first = None if self.training else ctx.cand_first(hw, x.device, p)
                q = TokenQueries(qsel, tok_src, n, lay.sizes, gates, first, lay.bounds(n) if first is not None
                                 and self.parts.kind == "pvt" else None)
            # Dropping a path per row of a packed batch would drop tokens, not images: pad while training.
            elif ctx.layout_mode == "packed" and not self.training:
                q = PackedQueries(qsel, tok_src, lay.bounds(n), lay.sizes, gates)
            else:
                q = PaddedQueries(qsel, tok_src, lay.bounds(n), lay.sizes, gates)
            delta = self._updates(q.gather(x, pooled), x, hw, lay, q, None)
            out = q.to_tokens(delta)
            out = out.add_(x) if not torch.is_grad_enabled() else out + x
            nq = q.nq
        ctx.records.append(_Record(self.index, nq.to(torch.float64), gates.reshape(b, *lay.regions), ran,
                                   conv_macs, path))
        return out

    def _forward_split(self, x: torch.Tensor, hw: tuple[int, int], lay: RegionLayout, gates: torch.Tensor,
                       pooled: dict[int, torch.Tensor], args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
        """Every image's regions at one level: the batch split by level, the finest images through the base
        block, the others with their level's whole cell map as queries (:class:`UniformQueries`), each group
        a dense batch: the sparse path's results without its gathers, padding and per-row index tables."""
        ctx: _Context = self.__dict__["_ctx"]
        level = gates[:, 0]
        present = torch.unique(level).tolist()
        outs, order = [], []
        for k in present:
            idx = (level == k).nonzero().squeeze(1)
            whole = len(present) == 1
            xk = x if whole else x.index_select(0, idx)
            if k == 0:
                res = self.__dict__["_orig"](xk, *args, **kwargs)
            else:
                size = lay.sizes[k]
                cells = pooled[size] if whole else pooled[size].index_select(0, idx)
                q = UniformQueries(self.num_prefix, size, ctx.uniform_index(hw, x.device, self.num_prefix, k),
                                   gates if whole else gates.index_select(0, idx))
                res = q.to_tokens(self._updates(q.gather(xk, {size: cells}), xk, hw, lay, q, None))
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
        ctx: _Context = self.__dict__["_ctx"]
        if ctx.execution == "sparse":
            return "sparse"
        if not bool(gates.any()):
            return "base"
        if ctx.execution == "dense":
            return "dense"
        if lay.num_regions == 1 or bool((gates == gates[:, :1]).all()):
            return "split"
        costs = path_costs(self.__dict__["_costs"], gates, qsel, lay, conv_macs, torch.get_num_threads(),
                           gates.device.type)
        return "sparse" if costs["sparse"] < costs["dense"] else "dense"

    def _forward_train(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        ctx: _Context = self.__dict__["_ctx"]
        lay = ctx.layout(hw, x.device)
        p = self.num_prefix
        b, _, c = x.shape
        pooled = pool_subpatches(x[:, p:].reshape(b, hw[0], hw[1], c), lay, [*lay.sizes[1:], lay.region])
        logits = self.__dict__["_router"](pooled[lay.region])
        if ctx.gate_override is not None:  # the knob is for inference; overrides also serve the training path's tests
            idx = ctx.gate_override(self.index, b, lay.num_regions, x.device)
            gates = F.one_hot(idx, logits.shape[-1]).to(x.dtype)
        else:
            gates = F.gumbel_softmax(logits.float(), tau=ctx.tau, hard=True, dim=-1).to(x.dtype)
        gate_tok = gates[:, lay.tok_region]  # (B, HW, K)
        q = AllQueries(lay.sizes)
        delta = self._updates(q.gather(x, pooled), x, hw, lay, q, gate_tok)
        upd = sum(gate_tok[..., k:k + 1] * delta.index_select(1, p + lay.tok_cand[k])
                  for k in range(len(lay.sizes)))
        out_grid = x[:, p:] + upd
        out = torch.cat([x[:, :p] + delta[:, :p], out_grid], dim=1) if p else out_grid
        nq = p + (gates * lay.nq.to(gates.dtype)).sum(dim=(1, 2))
        ctx.records.append(_Record(self.index, nq, None, True, self._conv_macs(gates.detach().argmax(-1), lay)))
        return out

    def _conv_macs(self, gates: torch.Tensor, lay: RegionLayout) -> torch.Tensor | None:
        if self.parts.kind != "pvt":
            return None
        return dwconv_macs(self.get_submodule(self.parts.mlp).dwconv, gates, lay)

    # --- the block's computation on queries -------------------------------------------------------------

    def _updates(self, q_in: torch.Tensor, x: torch.Tensor, hw: tuple[int, int], lay: RegionLayout,
                 q: QuerySelection, gate_tok: torch.Tensor | None) -> torch.Tensor:
        """Attention + MLP updates of the queries (q_out - q_in), keys and values from all of ``x``."""
        norm1 = self.get_submodule(self.parts.norm1)
        norm2 = self.get_submodule(self.parts.norm2)
        a = self._attention(norm1(q_in), norm1(x), hw, q)
        a = self._apply_chain(self.parts.post_attn, a)
        m = self._mlp(norm2(q_in + a), hw, lay, q, gate_tok)
        m = self._apply_chain(self.parts.post_mlp, m)
        return a.add_(m) if not torch.is_grad_enabled() else a + m

    def _attention(self, qn: torch.Tensor, xn: torch.Tensor, hw: tuple[int, int], q: QuerySelection) -> torch.Tensor:
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

    def _mlp(self, t: torch.Tensor, hw: tuple[int, int], lay: RegionLayout, q: QuerySelection,
             gate_tok: torch.Tensor | None) -> torch.Tensor:
        mlp = self.get_submodule(self.parts.mlp)
        tail = isinstance(q, TokenQueries) and q.unique_rows is not None
        if self.parts.kind == "vit":
            if tail:
                assert isinstance(q, TokenQueries)
                return q.from_unique(mlp(q.to_unique(t)))
            return mlp(t)
        # PVT-v2: fc1 on the queries, the depthwise convolution at each granularity's scale, act, fc2.
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


def _act(act: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """The MLP's activation; timm's GELU in place when autograd is off (``h`` is a fresh buffer of the block's
    own: no new hidden-width tensor is allocated and faulted in) and no hook watches the module."""
    hooked = act._forward_hooks or act._forward_pre_hooks or nn.modules.module._global_forward_hooks or \
        nn.modules.module._global_forward_pre_hooks
    if type(act) is nn.GELU and not torch.is_grad_enabled() and not hooked:
        return torch.ops.aten.gelu_(h, approximate=act.approximate)
    return act(h)


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



# --- analytic costs -------------------------------------------------------------------------------------


def _ln(mod: nn.Module | None, width: int) -> int:
    """MACs per token of a norm layer by the cost layer's rule (0 for Identity or no norm)."""
    return int(norm_macs(1, width, mod)) if mod is not None else 0


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
        hidden = max((m.out_features for m in mlp.modules() if isinstance(m, nn.Linear)), default=c)
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
        return {"fixed": float(fixed), "per_query": float(per_q), "dense": float(dense), "tokens": float(n),
                "width": float(c), "hidden": float(hidden), "dense_conv": float(dw_macs),
                "mlp_row": float(hidden * c)}  # what the dense path runs once per query: fc2
    return {"fixed": float(fixed), "per_query": float(per_q), "dense": float(dense), "tokens": float(n),
            "width": float(c), "hidden": float(hidden), "mlp_row": float(mlp_tok)}  # the dense path's MLP: per query


# --- which way a block runs: the execution cost model -----------------------------------------------------


@dataclass(frozen=True)
class ExecutionCost:
    """Relative CPU time of what the sparse and the dense paths do besides matrix products, in units of one
    matrix-product MAC (see :func:`path_costs`)."""

    move: float  # one tensor element read or written by a gather, scatter, copy or norm
    conv: float  # one MAC of the depthwise convolution (memory-bound: far below the matrix-product rate)
    op: float  # one operator launched, per thread (dispatch, allocation, OpenMP fork/join)
    sparse_rows: float = 1.0  # one MAC of the sparse path's per-query work (gathered, padded rows run slower)


# Fitted on the benchmark CPU (2-core x86_64, fp32, 2 threads) by benchmarks/fit_execution.py: per-block times
# of both paths over the CIFAR-10 ViT and PVT-v2 bases, DeiT-S and PVT-v2-b1, batches 1-64, forced gate mixes
# (benchmarks/results/execution_fit_t2.json). PVT-v2: the joint fit (it picks the faster path for every
# configuration but a few near-ties, within 1% of the best in total). ViT: its blocks' sparse rows ran ~16%
# slower than dense ones (the crossover of the measured times near 65% of the queries), which the element
# counts do not explain, so the model says so directly, with a smaller operator cost (DeiT-S at batch 1 pays
# on the sparse path). A device without an entry uses the CPU's.
EXECUTION_COSTS: dict[str, dict[str, ExecutionCost]] = {
    "cpu": {"vit": ExecutionCost(move=0.0, conv=0.0, op=5.0e5, sparse_rows=1.16),
            "pvt": ExecutionCost(move=41.2, conv=30.8, op=1.24e6)},
}
SPARSE_OPS = {"vit": 45, "pvt": 110}  # operators one sparse block launches besides the base block's own
DENSE_OPS = {"vit": 8, "pvt": 10}  # ... and the dense path (plus DENSE_LEVEL_OPS per coarse level present)
DENSE_LEVEL_OPS = {"vit": 0, "pvt": 12}


def path_terms(costs: dict[str, Any], gates: torch.Tensor, qsel: torch.Tensor, lay: RegionLayout,
               conv_macs: torch.Tensor | None) -> dict[str, dict[str, float]]:
    """What one DGE block does on one batch on each path, besides what both paths do alike: matrix-product
    MACs (``mm``; the sparse path's per-query ones apart, ``rows``), tensor elements moved by gathers, scatters,
    copies and extra norms (``move``), depthwise convolution MACs (``conv``) and operators launched (``ops``).
    See :func:`path_costs`."""
    kind = "pvt" if conv_macs is not None else "vit"
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
    unit = EXECUTION_COSTS.get(device_type, EXECUTION_COSTS["cpu"])["pvt" if conv_macs is not None else "vit"]
    terms = path_terms(costs, gates, qsel, lay, conv_macs)
    return {path: t["mm"] + unit.sparse_rows * t["rows"] + unit.move * t["move"] + unit.conv * t["conv"]
            + unit.op * threads * t["ops"] for path, t in terms.items()}


# --- the converted model ---------------------------------------------------------------------------------


def _view_with(root: nn.Module, replacements: dict[str, nn.Module]) -> tuple[nn.Module, list[nn.Module]]:
    """``root`` with the submodules at ``replacements``' paths swapped, sharing every parameter, buffer and other
    module with ``root``: the containers on those paths are shallow copies with their own child tables.

    Returns the view and the copied containers (their ``training`` flags must follow ``root``'s). The view is not
    registered anywhere, so state dicts and ``.to()`` see only ``root``; parameters are moved in place and buffer
    tables are shared, so the view follows them.
    """
    copies: dict[int, nn.Module] = {}

    def copied(module: nn.Module) -> nn.Module:
        if id(module) not in copies:
            twin = copy.copy(module)
            object.__setattr__(twin, "_modules", dict(module._modules))
            copies[id(module)] = twin
        return copies[id(module)]

    view = copied(root)
    for path, replacement in replacements.items():
        *parents, leaf = path.split(".")
        node, original = view, root
        for name in parents:
            original = original._modules[name]
            node._modules[name] = copied(original)
            node = node._modules[name]
        node._modules[leaf] = replacement
    return view, list(copies.values())


@register_method
class DGE(ConvertedModel):
    """Dynamic Grained Encoder (see the module docstring)."""

    method = "dge"
    families = ("vit", "pvt_v2")
    description = "DGE dynamic-granularity queries per region (ViT/DeiT, PVT-v2)"
    Settings = DGESettings
    Losses = DGELosses
    full_compute_runs_base = True  # coarsening 0: the base blocks, routers not run

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
        originals: dict[str, nn.Module] = {}
        for info in anatomy.blocks:
            if info.stage not in stages:
                continue
            block = base.get_submodule(info.path)
            parts = _read_block(block, info, kind)
            grid = anatomy.stages[info.stage].grid
            router = Router(info.dim, k, s.init_finest_prob, s.router_init_std, s.router_norm)
            self.routers[str(info.index)] = router
            lay = make_layout(grid, s.region_size, ctx.sizes, torch.device("cpu"))
            costs = _block_costs(block, parts, info.tokens, grid)
            costs["router"] = float(lay.num_regions * (info.dim * k + _ln(router.norm, info.dim)))
            costs["level_nq"] = [float(self.num_prefix + v) for v in lay.nq.sum(0).tolist()]
            costs["level_conv"] = [0.0] * k
            if kind == "pvt":  # every region at level j: what DGEBlock._conv_macs counts
                gates = torch.arange(k).view(k, 1).expand(k, lay.num_regions)
                costs["level_conv"] = dwconv_macs(block.get_submodule(parts.mlp).dwconv, gates, lay).tolist()
            self.costs[info.index] = costs
            self.dynamic_blocks.append(info.index)
            new = DGEBlock(block, parts, info.index, self.num_prefix, grid if kind == "vit" else None, router, ctx,
                           costs)
            base.set_submodule(info.path, new)
            originals[info.path] = block
        # The base model as timm built it, sharing every weight (unregistered): full compute runs it with no DGE
        # dispatch per block, so the small-batch rule's path costs what the base model costs.
        view, containers = _view_with(base, originals)
        object.__setattr__(self, "_plain", view)
        object.__setattr__(self, "_plain_containers", containers)
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

    @contextlib.contextmanager
    def counted_execution(self) -> Iterator[None]:
        """Sparse execution: the DGE computation ``gmacs`` counts (a dense block runs more MACs to finish sooner)."""
        saved = self._c.execution
        self._c.execution = "sparse"
        try:
            yield
        finally:
            self._c.execution = saved

    @property
    def execution(self) -> str:
        """``auto`` (each block and batch takes the path :func:`path_costs` estimates cheaper), ``sparse`` or
        ``dense`` (see :class:`DGESettings`); the results are the same whichever runs."""
        return self._c.execution

    @execution.setter
    def execution(self, value: str) -> None:
        if value not in ("auto", "sparse", "dense"):
            raise UserError(f"execution must be auto, sparse or dense, got {value!r}")
        self._c.execution = value

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

    # --- cost queries and gates from outside ---------------------------------------------------------------

    def level_ratios(self) -> list[float]:
        """Dynamic/static GMACs ratio with every region of every dynamic block at each granularity."""
        out = []
        for k in range(len(self._c.sizes)):
            extra = sum(c["fixed"] + c["router"] + c["per_query"] * c["level_nq"][k] + c["level_conv"][k] - c["dense"]
                        for c in self.costs.values())
            out.append(1.0 + extra / GIGA / self.base_gmacs)
        return out

    def override_gates(self, fn: GateOverride | None) -> None:
        """Take every dynamic block's gates from ``fn`` instead of its router (``None``: the routers decide).

        ``fn(block_index, batch, regions, device)`` returns the (batch, regions) granularity index of each
        region (long, 0 = finest), in both the inference and the training path. The routers still run, so
        their cost is timed and counted; the knob is ignored while an override is set.

        Example:
            >>> finest = lambda i, b, r, dev: torch.zeros(b, r, dtype=torch.long, device=dev)  # doctest: +SKIP
            >>> model.override_gates(finest)  # doctest: +SKIP
        """
        self._c.gate_override = fn

    @property
    def gate_override(self) -> GateOverride | None:
        """The function given to :meth:`override_gates`, or None when the routers decide."""
        return self._c.gate_override

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

    def forward_at_point(self, x: torch.Tensor) -> DynamicOutput:
        """Inference at the current knob; ``gmacs`` per image from the gates each block chose."""
        self._check_input(x)
        # An empty batch has no regions to route; the base blocks return the base model's empty result.
        if (self.coarsening <= 0.0 and self._c.gate_override is None) or x.shape[0] == 0:
            return self.forward_full_compute(x)
        with self._c.run("sparse") as records:
            logits = self.base(x)
            recs = list(records)
        b = x.shape[0]
        gm = self._gmacs(recs, b, x.device)
        extras: dict[str, torch.Tensor] = {}
        if recs:
            extras["queries"] = torch.stack([r.nq for r in recs], dim=1).float()
            # Blocks this batch ran not sparse (every token a query row, split by level, or the base block): same
            # results, and ``gmacs`` still counts the DGE computation, which is what the model computes.
            extras["dense_blocks"] = torch.full((b,), float(sum(r.path != "sparse" for r in recs)), device=x.device)
            for r in recs:
                if r.gates is not None:
                    extras[f"granularity.{r.block}"] = r.gates
        return DynamicOutput(logits=logits, gmacs=(gm / GIGA).float(), extras=extras)

    def forward_full_compute(self, x: torch.Tensor) -> DynamicOutput:
        """The base blocks, routers not run, whatever the knob or a gate override (the small-batch rule's path)."""
        self._check_input(x)
        logits = self.__dict__["_plain"](x)
        return DynamicOutput(logits=logits, gmacs=torch.full((x.shape[0],), self.base_gmacs, device=x.device))

    def train(self, mode: bool = True) -> DGE:
        super().train(mode)
        for container in self.__dict__["_plain_containers"]:  # the rest of the view is shared with self.base
            container.training = mode
        return self

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

    def plot_decisions(self, images: torch.Tensor, path: str | Path) -> Path:
        """Write a PNG of the granularity each region got on ``images`` (:func:`plot_granularity`)."""
        return plot_granularity(self, images, path)


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
