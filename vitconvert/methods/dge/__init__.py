"""DGE: Dynamic Grained Encoder (Song et al., NeurIPS 2021, arXiv 2301.03831; code StevenGrove/vtpack).

Converted from a pretrained ViT/DeiT (any prefix tokens), EVA / RoPE ViT, BEiT, PVT-v2, Swin or SwinV2. Every
block of the dynamic stages keeps its keys and values dense but computes its queries at a granularity chosen per
region:

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
  (:data:`~vitconvert.methods.dge.execution.EXECUTION_COSTS`, loaded from the committed fit) measured on the
  benchmark CPU. Modelled rather than timed at run time: the same
  gates always take the same path (reproducible results), and no measurement inside a forward pass is
  thrown off by a shared machine's load. ``gmacs`` always counts the DGE computation (what the model
  computes; a dense block runs more MACs to finish sooner); ``extras["dense_blocks"]`` says how many blocks
  ran densely.
* **Export** (:func:`vitconvert.export`): :meth:`DGE.forward_traceable` runs every dynamic block's traceable twin
  (:meth:`DGEBlock._forward_traced`): the same routers and gates, then each image's selected queries padded to the
  batch's largest count (:class:`~vitconvert.layers.ragged.TracedQueries`, a size read at run time and bounded with
  ``torch._check``) whatever the mix of levels, so the graph has one structure where the eager path picks base,
  split, dense or sparse per batch (same results); PVT-v2's convolution runs at every level's scale from the
  queries' token map. ``coarsening`` is baked in (the graph takes only the images); a gate override is refused.
* **Gates from outside**: :meth:`DGE.override_gates` replaces the routers' choice in both paths (speed
  benchmarks force GMACs ratios with it, ``benchmarks/common.py``); the routers still run.

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

**Swin** (a family whose blocks attend inside windows, :class:`~vitconvert.backbones.family.WindowView`): every
path runs on the block's windows as a batch of short images (the map rolled by the shift and partitioned; the
output reversed, so patch merging gets the fine-grid map with every token holding its query's update). Regions
are cut inside each window, keys and values are the window's tokens, and a coarse query's bias is the mean of its
positions' relative-position-bias rows (exact for one position) plus their common row of the shift mask; a level
whose sub-patches would straddle a shifted window's masked regions is never taken there (router logits masked,
the knob's and overrides' levels capped). Maps the windows do not cut whole are refused. On a map the base block was
not built for (CF-ViT's coarse pass runs the model at half size) the block takes the windows timm's rule gives that
map (:meth:`~vitconvert.backbones.family.WindowView.native`) and runs level 0 on them, never the base block.
Gates, queries and ``gmacs`` are reported per image; ``gmacs`` also counts the attention core's padding slots (every
window of an image as long as its fullest).

**Position information inside the attention** (EVA's rotary embedding, BEiT's relative position bias): the family's
:meth:`~vitconvert.backbones.family.QueryAttention.positions` gives each candidate the mean of its positions' rows
(rotary sin/cos rows for the queries, keys keeping their own; bias rows), exact for one position because both enter
the logits linearly. SwinV2's cosine attention normalises pooled queries like any other and its continuous bias is a
table once computed (mean rows, as Swin); its post-norm blocks normalise the attention and MLP outputs.

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

**The package**: :mod:`~vitconvert.methods.dge.model` (settings, the converted model, its knob and forwards),
:mod:`~vitconvert.methods.dge.block` (router, per-forward context, the block and its paths),
:mod:`~vitconvert.methods.dge.costs` (analytic MACs through the cost layer's rules and the family's attention
reading), :mod:`~vitconvert.methods.dge.execution` (the execution cost model) and
:mod:`~vitconvert.methods.dge.plot` (a picture of the granularities).
"""

from __future__ import annotations

from vitconvert.methods.dge.block import Context, DGEBlock, GateOverride, Record, Router
from vitconvert.methods.dge.costs import block_costs
from vitconvert.methods.dge.execution import EXECUTION_COSTS, ExecutionCost, path_costs, path_terms
from vitconvert.methods.dge.model import DGE, DGELosses, DGESettings
from vitconvert.methods.dge.plot import plot_granularity

__all__ = ["DGE", "EXECUTION_COSTS", "Context", "DGEBlock", "DGELosses", "DGESettings", "ExecutionCost",
           "GateOverride", "Record", "Router", "block_costs", "path_costs", "path_terms", "plot_granularity"]
