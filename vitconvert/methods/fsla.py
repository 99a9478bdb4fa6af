"""FSLA: BOAT's feature-space local attention (Yu et al., BMVC 2022, arXiv 2201.13027), in two modes.

Tokens are clustered per image and head by their queries (balanced hierarchical clustering) and attend
within their cluster plus the sibling cluster's boundary tokens; the algorithm, its padding for token counts
that are not ``cluster_size x 2^k`` and its MAC count are :mod:`vitconvert.layers.clustering`. The two modes
are two registered methods sharing this module, because the contract declares families and settings per
method: the exactness suite pairs every recipe with the families its method supports, and a mode's schema
rejects keys that mean nothing in the other mode.

* ``fsla`` (mode **augment**, Swin and SwinV2; the paper's setting): in the shifted-window blocks of every stage whose
  token grid exceeds the window (Swin-T at 224 px: 1 + 1 + 3 = 5 blocks), a feature-space attention
  sub-layer is inserted after the window attention (:func:`vitconvert.layers.seams.insert_residual_branch`):
  ``x = x + FSLA(LN(x))`` with its own LayerNorm and qkv, a 3x3 depthwise convolution of V in image layout
  (the LePE-style positional term BOAT adds) and an output projection initialised to zero, so a freshly
  converted model equals Swin exactly, at any cluster size. The new LayerNorm and qkv start as copies of the
  block's ``norm1`` and window-attention qkv (``init_from_window``): their features are what the pretrained
  model already computes, so the clustering is meaningful from the first step and the short fine-tune only
  has to learn the projection (SwinV2's post-norm ``norm1`` normalises the attention's output, not the stream:
  there only the qkv is copied). No drop path on the branch (BOAT-Swin has none either).
* ``fsla_replace`` (mode **replace**, ViT/DeiT, EVA, BEiT and PVT-v2): the attention core of the chosen blocks
  (q, k, v -> output) becomes clustered attention over the block's own q, k, v
  (:func:`vitconvert.layers.seams.replace_attention_core`), so attention costs about N x cluster size instead
  of N^2 and no weights are added. Class/distillation tokens stay global (they attend to, and are read by,
  every token). **Position terms** need no family knowledge, because only the core is swapped: EVA's rotary
  embedding (a block input the anatomy lists in ``shared_inputs``, kept as an input of the rewritten block) has
  rotated q and k per token before the core, and BEiT's relative position bias arrives as SDPA's float
  ``attn_mask``, which the clustered core gathers per cluster pair (the bias of exactly the pairs it scores).
  **PVT-v2**: clustering needs keys and values that are the same tokens as the queries
  (keys follow the queries' permutation). In PVT-v2's spatial-reduction stages keys are N / sr^2 pooled
  tokens, already few per query, so only the blocks with ``sr_ratio == 1`` (the last stage of b0-b5, whose
  attention is global over all its tokens) are replaced; the gain therefore grows with resolution and is
  bounded by that stage's share of the cost.

**Operating point**: one integer knob, ``cluster_size`` (the largest cluster). ``0`` means the base model's
computation: no FSLA branch (augment) or dense attention (replace). Replace: its full-compute point is 0,
exactly the base model (one cluster holding all tokens is the same: the layer runs dense whenever
clustering does not pay). Augment: its full-compute point is the trained cluster size (the window area by
default); with the zero-initialised projection the fresh model equals Swin at every value, so it is exact at
its full-compute point too, and 0 remains a cheaper point (the base model's GMACs) calibration may choose.
Calibration evaluates the sweep (a structural knob: one pass per value, no simulation).

**Never slower than dense**: a block clusters only when that costs less than its dense attention
(:mod:`vitconvert.layers.clustering`), with ``clustering_overhead`` MAC-equivalents per token, channel and level
charged for the clustering's sorts and gathers, which cost far more time than their MACs on CPU. The replace
recipe sets 500 (measured: DeiT-S at 768 px clusters, 1.63x faster than dense; at 384 px clustering ran
0.99x, so it stays dense there); the augment recipe sets 0, as BOAT clusters in every FSLA block. GMACs follow
what really runs.

**Resolution**: ``img_size`` (e.g. 384 or [768, 768]) runs the converted model at another input size: a
ViT's position embeddings are resampled (timm's ``set_input_size``), Swin gets the new grid with its windows
(and relative-position tables) kept, PVT-v2 takes any size; the base spec records the new size, so the saved
model, its teacher and ``pretrained_cfg['input_size']`` all follow it, and ``base_gmacs`` is the dense model
at that size.

**Export** (:func:`vitconvert.export`): :meth:`_FSLABase.forward_traceable` runs the clustering's functional twin
(:mod:`vitconvert.layers.clustering`), the same permutation as the eager path; the cluster size shapes the graph, so it
is baked in and the graph takes only the images.

**Cost**: ``DynamicOutput.gmacs`` is the base model's GMACs plus, per FSLA block, the analytic count of what
that block runs at the current cluster size (:func:`vitconvert.layers.clustering.clustered_attention_macs`
and the rules of :mod:`vitconvert.layers.costs`); tests check it against ``count_macs`` of a real forward.

Why one module of this size (about 640 lines): it holds both modes, their sub-layers and the cluster picture, which
change together (the knob, the costs, the resolution logic and the picture are the base class both modes share).

Example:
    >>> import vitconvert
    >>> m = vitconvert.apply("swin_tiny_patch4_window7_224", "fsla", pretrained=False)   # doctest: +SKIP
    >>> m.set_operating_point(cluster_size=49).cluster_size                                # doctest: +SKIP
    49
"""

from __future__ import annotations

import abc
import copy
import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn

from vitconvert.anatomy import Anatomy
from vitconvert.backbones import family_of, read_anatomy
from vitconvert.errors import AnatomyError, UserError
from vitconvert.layers.clustering import (
    DEFAULT_ITERS,
    DEFAULT_TEMPERATURE,
    balanced_clusters,
    clustered_attention,
    clustered_attention_macs,
    inverse_permutation,
    plan_clusters,
    traceable_path,
    tracing,
    workspace,
)
from vitconvert.layers.costs import GIGA, attention_macs, conv_macs, linear_macs, norm_macs
from vitconvert.layers.seams import insert_residual_branch, read_residual_block, replace_attention_core
from vitconvert.layers.sharing import attach
from vitconvert.methods.base import ConvertedModel, DynamicOutput
from vitconvert.operating import Knob, OperatingPoint, OperatingSpace
from vitconvert.recipes import Recipe, Strict
from vitconvert.registry import register_method
from vitconvert.sources import BaseSpec

__all__ = ["FSLA", "ClusteredCore", "FSLABranch", "FSLALosses", "FSLAReplace", "FSLAReplaceSettings",
           "FSLASettings"]

MAX_CLUSTER = 65536
# Inference slices of an FSLA sub-layer: about this many bytes of qkv per slice (see FSLABranch.forward).
SLICE_BYTES = 8 * 2**20


class _Common(Strict):
    cluster_size: int | None = Field(None, ge=0, le=MAX_CLUSTER, description="initial knob (largest cluster); "
                                     "augment: null = window area; replace: 0 = dense attention")
    overlap: int = Field(20, ge=0, le=4096, description="sibling-cluster boundary tokens each cluster also reads")
    iters: int = Field(DEFAULT_ITERS, ge=0, le=10, description="soft k-means steps per split")
    temperature: float = Field(DEFAULT_TEMPERATURE, gt=0, le=1e4, description="soft-assignment sharpness")
    sweep: list[int] | None = Field(None, description="cluster sizes calibration evaluates (null: the mode's default)")
    clustering_overhead: float = Field(0.0, ge=0, le=1e5, description="MAC-equivalents per token, channel and "
                                       "level charged to the clustering when deciding whether it beats dense "
                                       "attention (not counted in GMACs; 0: MACs alone decide)")
    img_size: int | list[int] | None = Field(None, description="run at this input size (ViT: position embeddings "
                                             "resampled); null: the base model's")

    @field_validator("img_size")
    @classmethod
    def _check_size(cls, v: int | list[int] | None) -> int | list[int] | None:
        if v is None:
            return v
        sizes = [v] if isinstance(v, int) else v
        if len(sizes) not in (1, 2) or any(s < 8 or s > 8192 for s in sizes):
            raise ValueError("give one size or a list of height and width, each 8..8192 pixels")
        return v

    @field_validator("sweep")
    @classmethod
    def _check_sweep(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (not v or any(c < 0 or c > MAX_CLUSTER for c in v)):
            raise ValueError(f"give cluster sizes in 0..{MAX_CLUSTER}")
        return v


class FSLASettings(_Common):
    stages: list[int] | None = Field(None, description="stages with FSLA blocks (null: every stage whose grid "
                                     "exceeds the window)")
    init_from_window: bool = Field(True, description="new LayerNorm and qkv start as copies of norm1 and the "
                                   "window attention's qkv (else LN 1/0 and trunc-normal 0.02)")
    new_lr_scale: float = Field(10.0, gt=0, le=1e4, description="fine-tuning learning-rate multiplier of the "
                                "FSLA sub-layers")


class FSLAReplaceSettings(_Common):
    blocks: list[int] | None = Field(None, description="block indices to replace (null: every block with "
                                     "global attention)")


class FSLALosses(Strict):
    distill: float = Field(1.0, ge=0, description="KL from the original model")
    ce: float = Field(1.0, ge=0, description="cross-entropy (when labels exist)")


class _Context:
    """The knob, shared by the model and its layers (never registered, so it is not state)."""

    def __init__(self, s: _Common) -> None:
        self.cluster_size = 0
        self.overlap = s.overlap
        self.iters = s.iters
        self.temperature = s.temperature
        self.overhead = s.clustering_overhead


class ClusteredCore(nn.Module):
    """Drop-in for a block's ``scaled_dot_product_attention`` call (see :func:`replace_attention_core`).

    At cluster size 0 it is the original SDPA call with the same arguments (bit-identical); otherwise
    :func:`clustered_attention` with the first ``num_global`` tokens global. What the block computes before the call
    is the block's, so position terms need nothing here: a rotary embedding has already rotated q and k per token
    (EVA), and a float ``attn_mask`` (BEiT's relative position bias, one logit term per token pair) is gathered per
    cluster pair. A boolean or causal mask (which pairs may attend at all) keeps the call dense.
    """

    def __init__(self, ctx: _Context, num_global: int) -> None:
        super().__init__()
        attach(self, _ctx=ctx)
        self.num_global = num_global

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
                dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
                dropout: nn.Module | None = None) -> torch.Tensor:
        if dropout is not None:  # timm: attn_drop.p in training, 0 in eval, decided at run time
            dropout_p = dropout.p if dropout.training and isinstance(dropout, nn.Dropout) else 0.0
        c = self._ctx
        if c.cluster_size == 0 or is_causal or k.shape[-2] != q.shape[-2] or (
                attn_mask is not None and not attn_mask.is_floating_point()):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p,
                                                  is_causal=is_causal, scale=scale)
        return clustered_attention(q, k, v, c.cluster_size, c.overlap, self.num_global, c.iters, c.temperature,
                                   scale=scale, dropout_p=dropout_p, overhead=c.overhead, bias=attn_mask)

    def extra_repr(self) -> str:
        return f"num_global={self.num_global}"


class FSLABranch(nn.Module):
    """BOAT's feature-space attention sub-layer on a (B, H, W, C) token map; returns the residual update.

    ``proj`` starts at zero (weight and bias), so the update is exactly zero until fine-tuning moves it.
    """

    def __init__(self, dim: int, num_heads: int, ctx: _Context) -> None:
        super().__init__()
        if dim % num_heads:
            raise AnatomyError(f"fsla: width {dim} is not divisible by {num_heads} heads")
        attach(self, _ctx=ctx)
        self.num_heads = num_heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.pos = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)  # positional term on V (BOAT/LePE)
        self.proj = nn.Linear(dim, dim)
        nn.init.trunc_normal_(self.qkv.weight, std=0.02)
        nn.init.zeros_(self.qkv.bias)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self._ctx
        if c.cluster_size == 0:  # the base model's computation: no update at all
            return torch.zeros_like(x)
        # Inference runs the sub-layer on slices of the batch (every image is clustered and attended on its own,
        # so this computes the same thing), with its temporaries in reused buffers (clustering.workspace): a
        # slice's qkv, clustering buffers and gathered keys and values then stay in cache, and no call pays page
        # faults for fresh memory (on the benchmark VM a fresh 77 MB tensor, Swin-T's first stage at batch 64,
        # costs more in page faults than the pass that fills it). With gradients the whole batch runs at once
        # in fresh tensors (autograd keeps them).
        # Under autocast too: out= writes are not cast by autocast, so that run takes the plain layers. And while
        # exporting (or in forward_traceable): slices, reused buffers and out= writes have no place in a traced graph
        # (the batch size is symbolic there), and clustered_attention then takes its functional twin.
        if (torch.is_grad_enabled() and (x.requires_grad or self.proj.weight.requires_grad)) \
                or torch.is_autocast_enabled(x.device.type) or tracing():
            return self._update(x)
        step = max(1, SLICE_BYTES // (3 * x[0].numel() * x.element_size()))
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        for i in range(0, x.shape[0], step):
            self._update(x[i:i + step], out[i:i + step])
        return out

    def _update(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """The residual update of ``x`` (B, H, W, C); with ``out`` (contiguous; inference only) written there,
        with the temporaries in reused buffers."""
        c = self._ctx
        b, hh, ww, dim = x.shape
        n, h = hh * ww, self.num_heads
        t = self.norm(x).reshape(b * n, dim)
        if out is None:
            qkv = self.qkv(t)
        else:
            qkv = torch.addmm(self.qkv.bias, t, self.qkv.weight.t(), out=workspace("fsla_qkv", (b * n, 3 * dim), t))
        q, k, v = qkv.view(b, n, 3, h, dim // h).permute(2, 0, 3, 1, 4).unbind(0)
        attn = clustered_attention(q, k, v, c.cluster_size, c.overlap, 0, c.iters, c.temperature, overhead=c.overhead,
                                   out=None if out is None else workspace("fsla_attn", (b, n, h, dim // h), t))
        if out is None:
            v_map = v.transpose(1, 2).reshape(b, hh, ww, dim).permute(0, 3, 1, 2)
        else:
            # V in image layout as a channels-last tensor in a reused buffer: the convolution then reads it as it
            # is, instead of first gathering the strided view into a fresh NCHW copy (at Swin-T's first stage at
            # batch 1 that copy took 1.3 of the convolution's 1.6 ms; the same values either way).
            v_map = workspace("fsla_v", (b, n, h, dim // h), t).copy_(v.transpose(1, 2))
            v_map = v_map.view(b, hh, ww, dim).permute(0, 3, 1, 2)
        pos = self.pos(v_map).flatten(2).transpose(1, 2)
        y = attn.transpose(1, 2).reshape(b, n, dim)  # a view: clustered_attention lays heads out as (B, N, h, d)
        if out is None:
            return self.proj(y + pos).reshape(b, hh, ww, dim)
        y.add_(pos)  # no gradient here, and y is this call's scratch buffer
        torch.addmm(self.proj.bias, y.reshape(b * n, dim), self.proj.weight.t(), out=out.view(b * n, dim))
        return out

    def macs(self, grid: tuple[int, int], cluster_size: int) -> float:
        """MACs of one image through this branch at ``cluster_size`` (what :meth:`forward` runs)."""
        if cluster_size == 0:
            return 0.0
        c = self._ctx
        n, dim = grid[0] * grid[1], self.proj.in_features
        return (norm_macs(n, dim) + linear_macs(n, dim, 3 * dim) + conv_macs(n, self.pos) + linear_macs(n, dim, dim)
                + clustered_attention_macs(n, dim, cluster_size, c.overlap, 0, c.iters, c.overhead))


def _pair(v: int | list[int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (v[0], v[-1])


def _resize(base: nn.Module, spec: BaseSpec, anatomy: Anatomy, size: tuple[int, int]
            ) -> tuple[BaseSpec, Anatomy]:
    """Run ``base`` at ``size``: rebuild what depends on it (its family says what: a ViT's position embeddings are
    resampled, Swin keeps its windows and so its relative-position tables), record it in a copy of ``spec``, re-read
    the anatomy."""
    if tuple(anatomy.img_size) == size:
        return spec, anatomy
    try:
        changed = family_of(anatomy).set_input_size(base, size, anatomy, keep_windows=True)
    except UserError as e:
        raise UserError(f"fsla: {spec.architecture}: {e}") from None
    except Exception as e:  # timm refuses sizes its layout cannot take
        raise UserError(f"fsla: {spec.architecture} cannot run at {size[0]}x{size[1]}: {e}") from None
    spec = dataclasses.replace(spec, model_args={**copy.deepcopy(spec.model_args), **changed}, img_size=list(size))
    return spec, read_anatomy(base, img_size=size)


class _FSLABase(ConvertedModel):
    """What both modes share: resolution, the knob, costs and the forward passes."""

    Losses = FSLALosses
    mode: ClassVar[str]
    full_compute_runs_base = True  # replace: full compute is cluster size 0, the base blocks (augment: see FSLA)
    per_image_paths = False  # every image is clustered, into clusters of the same sizes: one cost for all

    def __init__(self, base: nn.Module, spec: BaseSpec, recipe: Recipe, anatomy: Anatomy) -> None:
        s = recipe.settings
        if s.img_size is not None and anatomy.family in self.families:
            spec, anatomy = _resize(base, spec, anatomy, _pair(s.img_size))
        super().__init__(base, spec, recipe, anatomy)
        attach(self, _ctx=_Context(s))
        self.fsla_blocks: list[int] = []
        self._build()
        if not self.fsla_blocks:
            raise UserError(f"{self.method}: no block of {spec.architecture} qualifies "
                            f"({self._none_reason()}); nothing to convert")
        self.cluster_size = self._initial_cluster_size()

    # --- what each mode supplies ------------------------------------------------------------------------

    @abc.abstractmethod
    def _build(self) -> None:
        ...

    @abc.abstractmethod
    def _none_reason(self) -> str:
        ...

    @abc.abstractmethod
    def _initial_cluster_size(self) -> int:
        ...

    @abc.abstractmethod
    def _default_sweep(self) -> list[int]:
        ...

    @abc.abstractmethod
    def _extra_macs(self, cluster_size: int) -> float:
        """MACs per image added to (or, negative, saved from) the base model at ``cluster_size``."""

    # --- knob -----------------------------------------------------------------------------------------

    @property
    def _c(self) -> _Context:
        return self._ctx

    @property
    def cluster_size(self) -> int:
        """The knob: the largest cluster (0: the base model's computation)."""
        return self._c.cluster_size

    @cluster_size.setter
    def cluster_size(self, value: float) -> None:
        if value != int(value) or not 0 <= value <= MAX_CLUSTER:
            raise UserError(f"cluster_size must be a whole number in 0..{MAX_CLUSTER}, got {value}")
        self._c.cluster_size = int(value)

    def _full(self) -> int:
        return 0

    def operating_space(self) -> OperatingSpace:
        sweep = self.settings.sweep or self._default_sweep()
        full = self._full()
        values = tuple(dict.fromkeys([full, *[int(v) for v in sweep]]))
        return OperatingSpace((Knob("cluster_size", 0.0, float(MAX_CLUSTER), full=float(full),
                                    sweep=tuple(float(v) for v in values), integer=True,
                                    description="largest cluster (0: the base model's computation)"),))

    def _read_point(self) -> dict[str, float]:
        return {"cluster_size": float(self.cluster_size)}

    def dense_point(self) -> OperatingPoint:
        return {"cluster_size": 0.0}  # the base blocks: no clustering and no added sub-layers

    def gmacs_at(self, cluster_size: int | None = None) -> float:
        """GMACs of one image at ``cluster_size`` (default: the current knob)."""
        cs = self.cluster_size if cluster_size is None else int(cluster_size)
        return self.base_gmacs + self._extra_macs(cs) / GIGA

    # --- forward --------------------------------------------------------------------------------------

    def forward_at_point(self, x: torch.Tensor) -> DynamicOutput:
        """Inference at the current cluster size; every image costs the same (the clusters' shapes are fixed)."""
        self.check_input(x)
        logits = self.base(x)
        gm = torch.full((x.shape[0],), self.gmacs_at(), dtype=torch.float32, device=x.device)
        return DynamicOutput(logits=logits, gmacs=gm)

    def forward_traceable(self, x: torch.Tensor, point: Mapping[str, torch.Tensor]) -> DynamicOutput:
        """:meth:`forward_at_point` as an exported graph runs it: the cluster size shapes the computation (the
        clusters' sizes, the number of splits), so it is baked in and ``point`` is empty. While exporting, the
        clustering and clustered attention take their functional twin
        (:func:`vitconvert.layers.clustering.traceable_clustered_attention`: no numpy sort, no reused buffers),
        which gives the same permutation as the eager path. In eager mode too, so that what the graph runs can be
        compared with :meth:`forward_at_point`."""
        with traceable_path():
            return self.forward_at_point(x)

    def forward_train(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The same computation with gradients (none through the clustering, which is an index)."""
        self.check_input(x)
        return {"logits": self.base(x)}

    def method_losses(self, outputs: dict[str, torch.Tensor], labels: torch.Tensor | None,
                      teacher_logits: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        return {}  # distillation from the original model and cross-entropy are the shared loss's

    # --- what the clustering decided ------------------------------------------------------------------

    @abc.abstractmethod
    def _probe(self) -> tuple[int, nn.Module, tuple[int, int], int]:
        """(block index, module whose inputs give the queries of the first FSLA block, token grid, global tokens)."""

    @abc.abstractmethod
    def _probe_queries(self, module: nn.Module, args: tuple[Any, ...]) -> torch.Tensor:
        """(B, heads, N, d) queries of the probed block's clustered tokens from the probe module's inputs."""

    @torch.no_grad()
    def cluster_map(self, images: torch.Tensor, head: int = 0) -> torch.Tensor | None:
        """The cluster of every token of the first FSLA block for one head: (B, grid h, grid w) leaf indices.

        None when that block does not cluster at the current cluster size (0, or dense attention pays).
        """
        _, module, grid, g = self._probe()
        captured: list[torch.Tensor] = []
        handle = module.register_forward_pre_hook(lambda mod, args: captured.append(self._probe_queries(mod, args)))
        was_training = self.training
        self.eval()
        try:
            self.forward_at_point(images)  # what the point decides, whatever the small-batch rule
        finally:
            handle.remove()
            self.train(was_training)
        if not captured:
            return None
        q = captured[0][:, head:head + 1]
        n, width = q.shape[-2], q.shape[-1] * captured[0].shape[1]
        c = self._c
        plan = plan_clusters(n, max(self.cluster_size, 1), c.overlap)
        dense = attention_macs(n + g, n + g, width, width)
        if self.cluster_size == 0 or clustered_attention_macs(n + g, width, self.cluster_size, c.overlap, g, c.iters,
                                                              c.overhead) >= dense:
            return None
        perm = balanced_clusters(q, plan, c.iters, c.temperature)[:, 0]
        leaf = inverse_permutation(perm)[:, :n] // plan.leaf
        return leaf.view(-1, *grid)

    def plot_decisions(self, images: torch.Tensor, path: str | Path) -> Path | None:
        """Write a PNG of the clusters of the first FSLA block (head 0) on ``images``; None when it does not
        cluster at the current cluster size."""
        from matplotlib.figure import Figure

        maps = self.cluster_map(images)
        if maps is None:
            return None
        cfg = self.pretrained_cfg
        mean = torch.tensor(cfg.get("mean", (0.0, 0.0, 0.0))).view(3, 1, 1)
        std = torch.tensor(cfg.get("std", (1.0, 1.0, 1.0))).view(3, 1, 1)
        index = self._probe()[0]
        n = images.shape[0]
        # Shuffled colours, so that neighbouring leaf indices (siblings) do not look alike.
        colours = torch.randperm(int(maps.max()) + 1, generator=torch.Generator().manual_seed(0))
        fig = Figure(figsize=(2.4 * n, 5.0))
        for i in range(n):
            img = (images[i].float().cpu() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()
            ax = fig.add_subplot(2, n, i + 1)
            ax.imshow(img)
            ax.axis("off")
            ax2 = fig.add_subplot(2, n, n + i + 1)
            ax2.imshow(img)
            ax2.imshow(colours[maps[i].cpu()].numpy(), cmap="tab20", alpha=0.6, interpolation="nearest",
                       extent=(-0.5, img.shape[1] - 0.5, img.shape[0] - 0.5, -0.5))
            ax2.axis("off")
        fig.suptitle(f"FSLA clusters of block {index}, head 0 ({self.base_spec.architecture}, "
                     f"cluster_size={self.cluster_size})", fontsize=9)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100)
        return path


@register_method
class FSLA(_FSLABase):
    """Mode augment: BOAT-Swin's feature-space attention sub-layers (see the module docstring)."""

    method = "fsla"
    families = ("swin", "swinv2")
    not_supported: ClassVar[dict[str, str]] = {
        f: "it adds FSLA beside window attention; global attention is fsla_replace's case"
        for f in ("vit", "eva", "beit", "pvt_v2")}
    description = "BOAT feature-space local attention sub-layers after Swin's shifted-window attention"
    Settings = FSLASettings
    mode = "augment"
    full_compute_runs_base = False  # full compute has FSLA on (zero-initialised sub-layers); dense: cluster size 0
    adds_compute = True  # BOAT's sub-layers buy accuracy with compute: budgets may choose points above Swin's GMACs

    def _build(self) -> None:
        s: FSLASettings = self.settings
        a = self.anatomy
        if s.stages is not None and any(not 0 <= i < len(a.stages) for i in s.stages):
            raise UserError(f"recipe: model.stages must list stages in 0..{len(a.stages) - 1}, got {s.stages}")
        # The branches live inside the base blocks (keys base.<block>.fsla.*); a plain dict, not a second
        # registration, so no tensor is saved twice.
        attach(self, _branches={})
        self.branch_paths: list[str] = []
        self.grids: dict[int, tuple[int, int]] = {}
        self.window_areas: list[int] = []
        for stage in a.stages:
            if s.stages is not None and stage.index not in s.stages:
                continue
            for pos, index in enumerate(stage.blocks):
                info = a.blocks[index]
                block = self.base.get_submodule(info.path)
                parts = read_residual_block(block, f"fsla: block {info.path}")
                window = parts.window_size or stage.grid
                # BOAT: shifted blocks only (odd position in the stage), and only where the grid exceeds the window.
                if pos % 2 == 0 or (stage.grid[0] <= window[0] and stage.grid[1] <= window[1]):
                    continue
                branch = FSLABranch(info.dim, info.num_heads, self._c)
                if s.init_from_window:
                    # A post-norm block's norm1 (SwinV2) normalises the attention's output, not the stream the
                    # branch reads: the branch's LayerNorm keeps its 1/0 start there.
                    _copy_init(branch, block, None if parts.post_norm else parts.norm1, parts.attn, info.path)
                self.base.set_submodule(info.path, insert_residual_branch(block, branch, name="fsla"))
                self._branches[index] = branch
                self.branch_paths.append(f"base.{info.path}.fsla")
                self.grids[index] = tuple(stage.grid)
                self.window_areas.append(window[0] * window[1])
                self.fsla_blocks.append(index)

    def _none_reason(self) -> str:
        return "FSLA goes into shifted blocks of stages whose token grid exceeds the window"

    def _initial_cluster_size(self) -> int:
        s: FSLASettings = self.settings
        return s.cluster_size if s.cluster_size is not None else self._window_area()

    def _window_area(self) -> int:
        return max(self.window_areas) if self.window_areas else 0

    def _full(self) -> int:
        s: FSLASettings = self.settings
        return s.cluster_size if s.cluster_size else self._window_area()

    def _default_sweep(self) -> list[int]:
        w = self._window_area()
        return [w, 0, max(1, w // 2), 2 * w]

    def lr_scales(self) -> dict[str, float]:
        """The new sub-layers learn at ``new_lr_scale`` times the recipe's rate: their projection starts at zero
        and has to travel far in a short recipe, while the pretrained weights around them only adapt."""
        return {path: self.settings.new_lr_scale for path in self.branch_paths}

    def _probe(self) -> tuple[int, nn.Module, tuple[int, int], int]:
        index = self.fsla_blocks[0]
        return index, self._branches[index], self.grids[index], 0

    def _probe_queries(self, module: nn.Module, args: tuple[Any, ...]) -> torch.Tensor:
        x = args[0]
        b, hh, ww, dim = x.shape
        h = module.num_heads
        qkv = module.qkv(module.norm(x).reshape(b, hh * ww, dim))
        return qkv.reshape(b, hh * ww, 3, h, dim // h)[:, :, 0].transpose(1, 2)

    def _extra_macs(self, cluster_size: int) -> float:
        branches = self._branches
        return sum(branches[i].macs(self.grids[i], cluster_size) for i in self.fsla_blocks)


def _copy_init(branch: FSLABranch, block: nn.Module, norm1: str | None, attn: str, where: str) -> None:
    """Start the branch's LayerNorm and qkv from the block's ``norm1`` (None: keep the LayerNorm's start) and
    window-attention qkv."""
    norm = block.get_submodule(norm1) if norm1 is not None else branch.norm
    attn_mod = block.get_submodule(attn)
    qkv = getattr(attn_mod, "qkv", None)
    if not isinstance(norm, nn.LayerNorm) or not isinstance(qkv, nn.Linear) or qkv.weight.shape != \
            branch.qkv.weight.shape:
        raise AnatomyError(f"fsla: block {where}: init_from_window needs a LayerNorm norm1 and a fused qkv Linear "
                           "of the block's width; set model.init_from_window=false")
    with torch.no_grad():
        branch.norm.weight.copy_(norm.weight)
        branch.norm.bias.copy_(norm.bias)
        branch.qkv.weight.copy_(qkv.weight)
        if qkv.bias is not None:
            branch.qkv.bias.copy_(qkv.bias)
        elif isinstance(getattr(attn_mod, "q_bias", None), torch.Tensor) and branch.qkv.bias is not None:
            # SwinV2 keeps the query and value biases apart (no key bias)
            q_bias, v_bias = attn_mod.q_bias, attn_mod.v_bias
            branch.qkv.bias.copy_(torch.cat((q_bias, torch.zeros_like(q_bias), v_bias)))


@register_method
class FSLAReplace(_FSLABase):
    """Mode replace: clustered attention instead of global attention (see the module docstring)."""

    method = "fsla_replace"
    families = ("vit", "eva", "beit", "pvt_v2")
    not_supported: ClassVar[dict[str, str]] = {
        "swin": "window attention is already local: the augment mode (fsla) adds FSLA instead",
        "swinv2": "window attention is already local: the augment mode (fsla) adds FSLA instead",
    }
    description = "BOAT-style clustered attention replacing global attention (ViT/DeiT; PVT-v2's sr=1 blocks)"
    Settings = FSLAReplaceSettings
    mode = "replace"

    def _build(self) -> None:
        s: FSLAReplaceSettings = self.settings
        a = self.anatomy
        if s.blocks is not None and any(not 0 <= i < len(a.blocks) for i in s.blocks):
            raise UserError(f"recipe: model.blocks must list blocks in 0..{len(a.blocks) - 1}, got {s.blocks}")
        num_global = a.num_prefix_tokens  # class/distillation tokens stay global
        family = family_of(a)
        self.block_costs: dict[int, tuple[int, int, int]] = {}  # index -> (tokens, width, global tokens)
        for info in a.blocks:
            if s.blocks is not None and info.index not in s.blocks:
                continue
            block = self.base.get_submodule(info.path)
            where = f"fsla_replace: block {info.path}"
            attn = block.get_submodule(read_residual_block(block, where).attn)
            # Global attention's keys are its queries; other kinds are asked (PVT-v2: keys pooled unless sr == 1).
            if info.attn_kind != "global" and not family.query_attention(attn, where).keys_are_queries:
                continue  # keys are pooled tokens (PVT-v2's spatial reduction), not the queries (see the docstring)
            if hasattr(attn, "fused_attn"):
                attn.fused_attn = True  # the swap needs the SDPA call; the same attention up to float rounding
            width = _attn_width(attn, info.dim)
            # The block's other inputs (EVA's rotary embedding) stay inputs of the replacement.
            new = replace_attention_core(block, ClusteredCore(self._c, num_global), name="attn_core",
                                         inputs=info.shared_inputs)
            self.base.set_submodule(info.path, new)
            self.block_costs[info.index] = (info.tokens, width, num_global)
            self.fsla_blocks.append(info.index)

    def _none_reason(self) -> str:
        return "clustered attention replaces global attention; PVT-v2 has it only in blocks with sr_ratio 1"

    def _probe(self) -> tuple[int, nn.Module, tuple[int, int], int]:
        index = self.fsla_blocks[0]
        info = self.anatomy.blocks[index]
        core = self.base.get_submodule(f"{info.path}.attn_core")
        return index, core, tuple(self.anatomy.stages[info.stage].grid), core.num_global

    def _probe_queries(self, module: nn.Module, args: tuple[Any, ...]) -> torch.Tensor:
        return args[0][:, :, module.num_global:]

    def _initial_cluster_size(self) -> int:
        s: FSLAReplaceSettings = self.settings
        return s.cluster_size if s.cluster_size is not None else 0

    def _default_sweep(self) -> list[int]:
        # Only sizes at which some block really clusters (else the point is the dense model again).
        chosen = self.settings.cluster_size
        sizes = [c for c in (1024, 512, 256, 128, 64, 32, 16, *([chosen] if chosen else [])) if self._extra_macs(c) < 0]
        return [0, *sizes]

    def _extra_macs(self, cluster_size: int) -> float:
        if cluster_size == 0:
            return 0.0
        c = self._c
        return sum(clustered_attention_macs(t, w, cluster_size, c.overlap, g, c.iters, c.overhead)
                   - attention_macs(t, t, w, w)
                   for t, w, g in self.block_costs.values())


def _attn_width(attn: nn.Module, dim: int) -> int:
    """Heads x head dim of an attention module (timm's ``attn_dim`` when it differs from the block width)."""
    heads, head_dim = getattr(attn, "num_heads", None), getattr(attn, "head_dim", None)
    if isinstance(heads, int) and isinstance(head_dim, int):
        return heads * head_dim
    qkv = getattr(attn, "qkv", None)  # BEiT keeps no head_dim: its fused projection's third
    return qkv.out_features // 3 if isinstance(qkv, nn.Linear) else dim
