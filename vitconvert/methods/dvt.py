"""DVT: Dynamic Vision Transformer cascades (Wang et al., NeurIPS 2021, arXiv 2105.15075).

Converted from one pretrained ViT/DeiT, PVT-v2 or Swin. K members (default 3) see the same image at
increasing token grids; member k+1 runs only on the images member k did not answer confidently, as a real
sub-batch of the shared :class:`~vitconvert.layers.cascade.Cascade` (what each member hands on, its
features and attention logits, is index-selected along with the images).

**Members.** Every member starts from the base checkpoint. The last one *is* the base model (``base.*``,
timm's names); the others are copies resized with timm's own ``set_input_size`` (position embeddings
resampled; Swin's windows recomputed for the smaller maps) under ``members.<k>.*``, fed the image resized
(bilinear, antialiased) so the unchanged patch embedding yields their grid. ``share_weights`` picks the
paper's layout (false: K independent sets of weights, K x parameters) or one set of weights (true: every
parameter whose name and shape match the base's is the base's tensor; only resized position embeddings and
Swin's resized relative-position tables stay per member; the safetensors file stores shared tensors once).
The default is independent weights, as in the paper: with one set of weights, the short fine-tune has to
serve the low- and high-resolution inputs with the same tensors, and the last member (which decides the
accuracy at high budgets) drifts away from the base model it starts as. Both cost the same GMACs per image;
they differ in parameters (deit_small: 67.9M independent, 24.0M shared, 22.1M base; swin_tiny 85.4M /
28.9M / 28.3M; pvt_v2_b1 42.4M / 14.4M / 14.0M). Their accuracies after the short recipe have not been
measured against each other yet (the CIFAR-10 runs could not be scheduled on the shared machine).

**Member sizes.** ``scales`` (default 0.5, 0.72, 1: a 14x14 DeiT gets 7x7, 10x10, 14x14 as in the paper,
the 8x8 CIFAR ViT 4x4, 6x6, 8x8) are per-side fractions of the native grid (ViT) or input size
(PVT-v2, Swin); ``grids`` / ``img_sizes`` give them explicitly. PVT-v2 and Swin sizes are rounded to a
multiple of half the total stride (16 px for four stages with patch 4). Swin-T at 224 px gets 112 / 160 /
224 px: 112 px keeps 7x7 windows on the 28/14/7 maps (the 4x4 last map gets a 4x4 window, timm shrinks
it), 160 px runs 5x5 windows on its 40/20/10/5 maps (:meth:`vitconvert.backbones.swin.Swin.set_input_size`:
windows that do not divide a
map are padded, and padding 128 px's 8x8 stage-3 map to 14x14 would cost 2.05 GMACs against 1.18 at
112 px); a changed window resamples the pretrained relative-position table (the fine-tune adapts it).
PVT-v2-b1 at 224 px gets 112 / 160 / 224 px (last-stage maps 4x4, 5x5, 7x7; its overlapping strided
convolutions take any size).

**Feature reuse** (all families). The previous member's last-block output (before the final norm: ViT
tokens, or the last stage's map for PVT-v2/Swin) goes, for every downstream block that receives it, through
a :class:`~vitconvert.layers.reuse.FeatureReuse` branch (own LayerNorm, C -> 128 -> 48, resized to the
block's grid by nearest upsample + adaptive average pool, prefix tokens zero, zero-initialised projection).
``feature_reuse_at`` says where the 48 channels enter: ``mlp`` (DVT's wiring) concatenates them to the input of
the block's MLP, as zero-initialised extra columns of the layers that read it (timm's ``fc1``, found by
:func:`~vitconvert.layers.seams.mlp_input_layers`: the projection is 48 -> the MLP's hidden width, added to
``fc1``'s output by a forward hook); ``output`` projects them 48 -> C and adds them to the block's output (its
MLP residual). ViT: every block of members 2..K; PVT-v2 and Swin: every block of the last stage (the only
stage whose map is "the previous member's last-stage map" resolution-wise). A fresh branch adds exact zeros.
DVT's code normalises the concatenation with one LayerNorm over C + 48; here the pretrained ``norm2`` keeps
normalising the C channels (its statistics unchanged) and the branch has its own norm before its MLP.

**Relation reuse** (ViT only). Each member but the last reports the pre-softmax logits of every layer
(the logits actually used, including the bias it received, so relations cascade); the next member mixes
the stacked (B, L*h, n, n) maps with a :class:`~vitconvert.layers.reuse.RelationMixer` (1x1 convs,
L*h -> 3*L*h -> L*h, last conv zero), resizes them with the class rows/columns handled separately and
adds layer l's slice to its layer l logits before the softmax (:func:`~vitconvert.layers.seams.rewrite_attention`).
Logits are materialised only in members that hand them on; the last member keeps fused attention with
the bias as SDPA's additive mask. PVT-v2 and Swin get no relation reuse: PVT-v2's spatial-reduction
attention attends to a pooled key map whose size and pooling grid change with the input resolution (and
its early stages would have to materialise 3136 x 49 logits per head for no comparable target), and
Swin's logits are per window: windows cover different image regions at different resolutions and the
shifted-window masks differ, so a resized map would not describe the same token pairs.

**Operating point.** ``threshold_0 .. threshold_{K-2}``: member k answers an image whose confidence (``exit_score``:
max softmax as in the paper, or the margin between the top two probabilities) is above threshold k. All 1 (never
exit) is the full-compute point: every image reaches the last member, which, with zero-initialised reuse, is exactly
the base model (it costs the cumulative GMACs of all members, more than the base: choose a budget). ``dense`` 1 runs
the last member alone on every image, without reuse: the base's computation and cost with the fine-tuned weights,
the dense point calibration falls back to where early exit does not pay (:meth:`ConvertedModel.dense_point`).
Calibration follows DVT (MSDNet style): it collects every member's logits on held-out training images once
(:class:`SimulatesPoints`), and for each ``q`` of ``exit_q`` (default DVT's p/20, p = 1..59) sets target exit shares
proportional to q^k and derives the thresholds that realise them
(:func:`~vitconvert.layers.cascade.thresholds_for_exit_shares`); the curve is stored and :meth:`set_budget` picks
another point of it on a loaded model.

**Training.** Every member's logits are ``exit.<name>`` outputs (names like ``7x7`` or ``128px``), so the
pipeline distils each from the original model and adds cross-entropy when labels exist, DVT's equal
weights over exits. Nothing is detached: later members' losses reach earlier ones through reuse, as in the
official code.

**Cost.** ``costs`` are each member's GMACs given the earlier members ran (reuse branches, mixers and the
resized image's patch embedding included), counted by :func:`~vitconvert.layers.costs.count_macs`; an
image is charged the cumulative cost of the members it ran.
"""

from __future__ import annotations

import copy
import functools
import itertools
from collections.abc import Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from vitconvert import fx as vfx
from vitconvert.anatomy import Anatomy
from vitconvert.backbones import family_of
from vitconvert.errors import UserError
from vitconvert.layers.cascade import Carry, Cascade, ExitScore, Stage, StageFn
from vitconvert.layers.compiled import rows_marked
from vitconvert.layers.resize import resize_images
from vitconvert.layers.reuse import FeatureReuse, RelationMixer, resize_relations
from vitconvert.layers.seams import mlp_input_layers, rewrite_attention
from vitconvert.layers.sharing import attach, detach, tie_parameters
from vitconvert.methods.base import ConvertedModel, DynamicOutput, SimulatesPoints
from vitconvert.operating import Knob, OperatingPoint, OperatingSpace
from vitconvert.recipes import Recipe, Strict
from vitconvert.registry import register_method
from vitconvert.sources import BaseSpec

# DVT's budget family: target exit shares proportional to q**k, q = p / 20 for p = 1..59 (inference.py).
DVT_EXIT_Q = tuple(round(p / 20, 2) for p in range(1, 60))


class DVTSettings(Strict):
    scales: list[float] = Field([0.5, 0.72, 1.0], min_length=2, max_length=8,
                                description="per-side size of each member / the base's (grid for ViT, image for "
                                "PVT-v2 and Swin), increasing, the last 1")
    grids: list[int] | None = Field(None, min_length=2, max_length=8, description="ViT: member grid sides "
                                    "(square), increasing, the last the native grid; overrides scales")
    img_sizes: list[int] | None = Field(None, min_length=2, max_length=8, description="member input sides in "
                                        "pixels, increasing, the last the base's; overrides scales")
    share_weights: bool = Field(False, description="one set of weights for every member (false: independent "
                                "copies, as in the paper)")
    feature_reuse: bool = True
    # "output" for configs saved before the choice existed (their projections are 48 -> C); recipes set it.
    feature_reuse_at: Literal["output", "mlp"] = Field(
        "output", description="where reused features enter each block: 'mlp' = concatenated to the MLP's input "
        "(DVT's wiring), 'output' = a projection added to the block's output")
    relation_reuse: bool = Field(True, description="ViT only: upstream attention logits biased into each layer")
    reuse_hidden: int = Field(128, ge=1, le=4096, description="hidden width of the feature-reuse transform")
    reuse_dim: int = Field(48, ge=1, le=4096, description="width of the reused features before the projection")
    relation_ratio: float = Field(3.0, gt=0, le=16, description="hidden / input channels of the relation mixer")
    resize: Literal["bilinear", "bicubic", "area"] = "bilinear"
    thresholds: list[float] | None = Field(None, description="initial exit thresholds (K-1, each in [0, 1]); "
                                           "null: 1 = never exit")
    exit_score: ExitScore = Field("max_softmax", description="a member's confidence: max softmax (the paper) or margin "
                                  "(top-1 minus top-2 probability)")
    exit_q: list[float] | None = Field(None, min_length=1, description="q values of the target exit shares "
                                       "(proportional to q^k) calibration derives thresholds for; null: DVT's")
    new_lr_scale: float = Field(1.0, gt=0, le=1e3, description="fine-tuning learning-rate multiplier of the "
                                "reuse branches and relation mixers")
    freeze_last: bool = Field(False, description="the last member stays the base model: frozen, no reuse into it, "
                              "and the distillation teacher (a label-free fine-tune then trains only the earlier "
                              "members, at about half the cost per step)")


class DVTLosses(Strict):
    distill: float = Field(1.0, ge=0, description="KL from the original model, at every member's exit")
    ce: float = Field(1.0, ge=0, description="cross-entropy at every member's exit (when labels exist)")
    cascade_kl: float = Field(0.0, ge=0, description="KL from the last member's (detached) output at every earlier "
                              "exit, as CF-ViT's coarse output learns from its fine output")


def _capture_output(module: nn.Module, args: tuple, output: Any) -> Any:
    """Forward hook of the modules that take feature reuse: the blocks (PVT-v2 / Swin last stage, reuse at the
    block output) or the MLP input layers (reuse concatenated to the MLP input, every family).

    It adds what the model set as ``module._dvt_add`` (reshaped to the output: (B, N, C) rows onto a Swin
    block's (B, H, W, C) map) and keeps the output in ``module._dvt_out`` when ``module._dvt_capture`` is set.
    It reads only its module's attributes (no closure), so copies of the model (EMA, deepcopy) carry working
    hooks of their own.
    """
    add = getattr(module, "_dvt_add", None)
    if add is not None:
        output = output + add.to(output.dtype).reshape(output.shape)
    if getattr(module, "_dvt_capture", False):
        attach(module, _dvt_out=(output, module._dvt_family.block_grid(args[0], args[1:], {},
                                                                        getattr(module, "_dvt_grid", None))))
    return output


@register_method
class DVT(ConvertedModel, SimulatesPoints):
    """A K-member DVT cascade with real early exit (see the module docstring)."""

    method = "dvt"
    families = ("vit", "eva", "beit", "pvt_v2", "swin", "swinv2")
    description = "DVT cascade of increasing token grids with feature/relation reuse and early exit"
    Settings = DVTSettings
    Losses = DVTLosses

    @property
    def support_note(self) -> str:
        """Which reuse the members get: relation reuse only where attention is global over one token chain."""
        reuse = [name for name, on in (("feature", self.settings.feature_reuse), ("relation", self.relation)) if on]
        return " + ".join(reuse) + " reuse" if reuse else "no reuse"

    def __init__(self, base: nn.Module, spec: BaseSpec, recipe: Recipe, anatomy: Anatomy) -> None:
        super().__init__(base, spec, recipe, anatomy)
        s: DVTSettings = self.settings
        family = family_of(anatomy)
        # One token sequence through a chain of blocks (ViT): members run as fx graphs around the blocks, sized by
        # their token grids. Otherwise (hierarchical) each member is the timm model at its input size, with hooks.
        self.split = family.splits_at_blocks
        self.img_sizes, self.grids = self._member_sizes(s, anatomy)
        k_members = len(self.img_sizes)
        self.names = [f"{g[0]}x{g[1]}" if self.split else f"{i[0]}px" if i[0] == i[1] else f"{i[0]}x{i[1]}px"
                      for g, i in zip(self.grids, self.img_sizes, strict=True)]
        if len(set(self.names)) != k_members:
            raise UserError(f"dvt members must differ in size; got {', '.join(self.names)}")
        # Relation maps of one resolution describe the token pairs of another only under global attention.
        self.relation = bool(s.relation_reuse and self.split and family.global_attention)
        self.num_prefix = anatomy.num_prefix_tokens
        if s.freeze_last and s.share_weights:
            raise UserError("dvt: model.freeze_last keeps the last member's weights as they are, which members sharing "
                            "them (model.share_weights) cannot; turn one of them off")
        # Members that take reuse from the one before them (a frozen last member stays the base model: none).
        self.receivers = tuple(range(1, k_members - 1 if s.freeze_last else k_members))

        # Members 0..K-2: copies of the base resized with timm's set_input_size; the last member is the base.
        copies = []
        base_params = dict(base.named_parameters())
        for size in self.img_sizes[:-1]:
            member = copy.deepcopy(base)
            try:  # Swin: windows fitted to each member's maps (padded windows cost more than smaller ones)
                family.set_input_size(member, size, anatomy, keep_windows=False)
            except Exception as e:  # timm refuses sizes its layout cannot take
                raise UserError(f"dvt: {spec.architecture} cannot run at {size[0]}x{size[1]} px "
                                f"({type(e).__name__}: {e}); choose other member sizes") from None
            if s.share_weights:
                tie_parameters(member, base_params)
            copies.append(member)
        self.members = nn.ModuleList(copies)

        self.num_blocks = len(anatomy.blocks)
        # Features are reused by the blocks of the last stage (a ViT's only one): the previous member's last-stage
        # map is their resolution's counterpart.
        dim = anatomy.stages[-1].dim
        reuse_blocks = list(anatomy.stages[-1].blocks)
        heads = anatomy.blocks[0].num_heads
        if any(b.num_heads != heads for b in anatomy.blocks):
            self.relation = False  # relation maps are stacked over layers: every layer needs the same heads
        self.reuse_blocks = reuse_blocks
        self.reuse = nn.ModuleDict()
        # Where each reuse block takes the branch: its output, or the layers reading its MLP's input (the branch
        # then projects to their outputs' widths, split between them).
        self.reuse_into: list[list[str]] = []
        self.reuse_widths: list[list[int]] = []
        for i in reuse_blocks:
            path = anatomy.blocks[i].path
            if s.feature_reuse_at == "mlp":
                block = base.get_submodule(path)
                layers = mlp_input_layers(block, path)
                self.reuse_into.append([f"{path}.{name}" for name in layers])
                self.reuse_widths.append([int(block.get_submodule(name).out_features) for name in layers])
            else:
                self.reuse_into.append([path])
                self.reuse_widths.append([dim])
        if s.feature_reuse:
            for k in self.receivers:
                self.reuse[str(k)] = nn.ModuleList(
                    FeatureReuse(dim, sum(w), s.reuse_hidden, s.reuse_dim) for w in self.reuse_widths)
        # Keys of reuse / mixers by member index, looked up rather than formatted: under torch.compile a stage's
        # index may be a symbolic int (its frame runs for every member), which str() cannot print.
        self.member_keys = [str(k) for k in range(k_members)]
        self.mixers = nn.ModuleDict()
        if self.relation:
            for k in self.receivers:
                self.mixers[str(k)] = RelationMixer(self.num_blocks * heads, s.relation_ratio)

        graphs: list[dict[str, Any]] = []
        for k in range(k_members):
            model = self._member(k)
            hooked = set()
            if not self.split:
                # A token-sequence model run whole (EVA, BEiT: position information inside the blocks) tells its
                # blocks their grid: the member's patch grid.
                grid = None if family.block_layout == "map" else (
                    self.img_sizes[k][0] // anatomy.patch_size[0], self.img_sizes[k][1] // anatomy.patch_size[1])
                for i in reuse_blocks:
                    block = model.get_submodule(anatomy.blocks[i].path)
                    attach(block, _dvt_family=family, _dvt_grid=grid)
                    block.register_forward_hook(_capture_output)
                    hooked.add(anatomy.blocks[i].path)
            if s.feature_reuse_at == "mlp" or not self.split:
                for into in self.reuse_into:
                    for path in into:
                        if path not in hooked:
                            model.get_submodule(path).register_forward_hook(_capture_output)
            graphs.append(self._split_graphs(model, k) if self.split else {})
        if self.split:  # the members' heads differ in their weights and token counts only: one compiled head
            vfx.share_code(g["head"] for g in graphs)
        stages = [Stage(name, self._stage_fn(k), 0.0) for k, name in enumerate(self.names)]
        # Not modules: the graphs call the members' own modules, registered once under base / members.
        attach(self, _graphs=graphs, _family=family, cascade=Cascade(stages, s.exit_score))
        thresholds = s.thresholds if s.thresholds is not None else [1.0] * (k_members - 1)
        if len(thresholds) != k_members - 1 or any(not 0.0 <= t <= 1.0 for t in thresholds):
            raise UserError(f"recipe: model.thresholds must be {k_members - 1} values in [0, 1], got {thresholds}")
        self.thresholds = [float(t) for t in thresholds]
        self.dense = False
        if s.freeze_last:
            self.base.requires_grad_(False)
        if not self.split:
            self.grids = self._last_stage_grids()
        self._count_costs()

    @property
    def computes_original_logits(self) -> bool:
        return self.settings.freeze_last

    def train(self, mode: bool = True) -> DVT:
        """As nn.Module's; a frozen last member stays in eval mode (it is the teacher: no dropout, no drop path)."""
        super().train(mode)
        if self.settings.freeze_last:
            self.base.eval()
        return self

    def _hands_on(self, k: int) -> bool:
        """Whether member ``k`` hands its features (and relations) to the next member."""
        return k + 1 in self.receivers

    # --- structure ------------------------------------------------------------------------------------

    def _member_sizes(self, s: DVTSettings, anatomy: Anatomy) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """Each member's input size and its grid (split models: the token grid; others: the last-stage map)."""
        h, w = anatomy.img_size
        if self.split:
            gh, gw = anatomy.grid
            ph, pw = h // gh, w // gw
            if s.grids is not None:
                sides = [(g, g) for g in s.grids]
            elif s.img_sizes is not None:
                sides = [(i // ph, i // pw) for i in s.img_sizes]
            else:
                sides = [(max(1, round(gh * f)), max(1, round(gw * f))) for f in s.scales]
            if sides[-1] != (gh, gw):
                raise UserError(f"dvt: the last member must run at the base model's grid {gh}x{gw}, got "
                                f"{sides[-1][0]}x{sides[-1][1]}")
            imgs = [(a * ph, b * pw) for a, b in sides]
            grids = sides
        else:
            if s.grids is not None:
                raise UserError("dvt: model.grids is for ViT models; give PVT-v2 / Swin members as img_sizes")
            step_whole_maps = family_of(anatomy).size_step(anatomy)
            if s.img_sizes is not None:
                imgs = [(i, i) for i in s.img_sizes]
            else:
                # Multiples of the family's step (16 px for four stages with patch 4: whole maps up to the third
                # stage, the last one rounded up by padding) when that keeps the members apart, else whole patches
                # (timm pads odd maps when merging patches).
                for step in (step_whole_maps, anatomy.patch_size[0]):
                    imgs = [(max(step, round(h * f / step) * step), max(step, round(w * f / step) * step))
                            for f in s.scales[:-1]] + [(h, w)]
                    if all(a[0] < b[0] for a, b in itertools.pairwise(imgs)):
                        break
            if imgs[-1] != (h, w):
                raise UserError(f"dvt: the last member must run at the base model's size {h}x{w}, got "
                                f"{imgs[-1][0]}x{imgs[-1][1]}")
            grids = imgs  # replaced by each member's last-stage map once the members exist
        if any(a[0] >= b[0] or a[1] >= b[1] for a, b in itertools.pairwise(imgs)):
            raise UserError(f"dvt: member sizes must increase, got {[f'{g[0]}x{g[1]}' for g in imgs]}")
        return imgs, grids
    @torch.no_grad()
    def _last_stage_grids(self) -> list[tuple[int, int]]:
        """PVT-v2/Swin: each member's last-stage map, read by running it once (padding makes it a ceil)."""
        grids = []
        p = next(self.parameters())
        for k, size in enumerate(self.img_sizes):
            model = self._member(k)
            block = model.get_submodule(self.anatomy.blocks[self.reuse_blocks[-1]].path)
            was_training = model.training
            attach(block, _dvt_capture=True)
            try:
                model.eval()
                model(torch.zeros(1, 3, *size, device=p.device, dtype=p.dtype))
                grids.append(detach(block, "_dvt_out")[1])
            finally:
                model.train(was_training)
                detach(block, "_dvt_capture")
                detach(block, "_dvt_out")
        return grids

    def _member(self, k: int) -> nn.Module:
        return self.base if k == len(self.img_sizes) - 1 else self.members[k]

    def _split_graphs(self, model: nn.Module, k: int) -> dict[str, Any]:
        """fx graphs of one member split at its blocks (kept out of the module tree: they hold the member's own
        modules)."""
        logits, bias = self.relation and self._hands_on(k), self.relation and k in self.receivers
        embed, head = vfx.split_at_blocks(model, self.anatomy.block_paths)
        blocks = [model.get_submodule(p) for p in self.anatomy.block_paths]
        if logits or bias:
            blocks = [rewrite_attention(b, bias=bias, logits=logits) for b in blocks]
            vfx.share_code(blocks)  # one compiled block for all of them under torch.compile (_run_split)
        return {"embed": embed, "head": head, "blocks": blocks, "logits": logits, "bias": bias}

    # --- operating point ------------------------------------------------------------------------------

    def operating_space(self) -> OperatingSpace:
        return OperatingSpace((
            *(Knob(f"threshold_{k}", 0.0, 1.0, full=1.0, sweep=(0.5, 0.7, 0.9, 1.0), simulated=True,
                   description=f"member {self.names[k]} answers when its confidence exceeds this")
              for k in range(len(self.img_sizes) - 1)),
            Knob("dense", 0.0, 1.0, full=0.0, sweep=(0.0, 1.0), integer=True, implied=0.0,
                 description=f"1: member {self.names[-1]} alone on every image, without reuse (the base model's "
                             f"computation and cost; the thresholds do not apply)"),
        ))

    def dense_point(self) -> OperatingPoint:
        return {"dense": 1.0}  # the other knobs do not apply there

    def _read_point(self) -> OperatingPoint:
        return {**{f"threshold_{k}": t for k, t in enumerate(self.thresholds)}, "dense": float(self.dense)}

    def _write_point(self, point: OperatingPoint) -> None:
        for name, value in point.items():
            if name == "dense":
                self.dense = bool(value)
            else:
                self.thresholds[int(name.rsplit("_", 1)[1])] = float(value)

    def simulated_points(self, collected: dict[str, torch.Tensor]) -> list[OperatingPoint]:
        """DVT's calibration: thresholds realising exit shares proportional to q^k, for every q of ``exit_q``,
        plus the full-compute point (at the dense point, where no member exits, only that one)."""
        if self.dense:
            return [{f"threshold_{k}": 1.0 for k in range(len(self.thresholds))}]
        logits = [collected[name] for name in self.names]
        k_members = len(logits)
        points = [self.operating_space().full()]
        for q in self.settings.exit_q or DVT_EXIT_Q:
            weights = [q ** (k + 1) for k in range(k_members)]
            total = sum(weights)
            shares = [w / total for w in weights[:-1]]
            thresholds = self.cascade.thresholds_for_exit_shares(logits, shares)
            points.append({f"threshold_{k}": t for k, t in enumerate(thresholds)})
        return points

    def set_exit_shares(self, images: torch.Tensor, shares: list[float]) -> OperatingPoint:
        """Set the thresholds under which ``shares`` of ``images`` exit at each member but the last."""
        with torch.no_grad():
            logits = self.cascade.run_all(self.check_input(images))
        return self.set_operating_point({f"threshold_{k}": t for k, t in
                                         enumerate(self.cascade.thresholds_for_exit_shares(logits, shares))})

    @property
    def costs(self) -> dict[str, float]:
        """GMACs per image of each member, given the earlier members ran (reuse included)."""
        return {stage.name: stage.gmacs for stage in self.cascade.stages}

    def method_state(self) -> dict[str, Any]:
        return {"costs": self.costs}

    def load_method_state(self, state: dict[str, Any]) -> None:
        state = dict(state)
        state.pop("costs", None)  # recounted from the structure, never trusted from a file
        super().load_method_state(state)

    def lr_scales(self) -> dict[str, float]:
        """The reuse branches and mixers start at zero output and may learn faster than pretrained weights."""
        return {"reuse": self.settings.new_lr_scale, "mixers": self.settings.new_lr_scale}

    # --- members --------------------------------------------------------------------------------------

    def _resized(self, x: torch.Tensor, k: int) -> torch.Tensor:
        size = self.img_sizes[k]
        if tuple(x.shape[-2:]) == tuple(size):
            return x
        return resize_images(x, size, self.settings.resize)

    def _stage_fn(self, k: int) -> StageFn:
        # A partial of a bound method, not a closure: deepcopy (EMA) rebinds it to the copy.
        return functools.partial(self._run_member, k)

    def _run_member(self, k: int, x: torch.Tensor, carry: Carry) -> tuple[torch.Tensor, Carry]:
        if not self.split:
            return self._run_hooked(x, carry, k)
        # Under torch.compile (not torch.export) a member compiles block by block, unless the reused features enter the
        # MLP: they reach the block as a module attribute, whose batch size dynamo would fix in the block's graph.
        if torch.compiler.is_dynamo_compiling() and self.settings.feature_reuse_at != "mlp":
            return self._run_split_between_graphs(x, carry, k)
        return self._run_split(x, carry, k)

    def _reuse_before(self, model: nn.Module, j: int, add: torch.Tensor) -> None:
        """Hand reuse block ``j``'s branch output to the modules that add it (split between MLP input layers)."""
        into = self.reuse_into[j]
        parts = add.split(self.reuse_widths[j], dim=-1) if len(into) > 1 else (add,)
        for path, part in zip(into, parts, strict=True):
            attach(model.get_submodule(path), _dvt_add=part)

    def _reuse_after(self, model: nn.Module, j: int) -> None:
        for path in self.reuse_into[j]:
            detach(model.get_submodule(path), "_dvt_add")

    def _run_split(self, x: torch.Tensor, carry: Carry, k: int) -> tuple[torch.Tensor, Carry]:
        """One member of a token-sequence model: :meth:`_enter`, :meth:`_layer` for each block, the head graph.

        Under ``torch.compile`` this frame is not traced (:attr:`_run_split_between_graphs`, the same function under
        ``torch.compiler.disable(recursive=False)``, which ``torch.export`` does not accept); what it calls is, each a
        compiled frame of its own ("regional compilation"). The blocks of a member share one class
        (:func:`~vitconvert.fx.share_code`) and :meth:`_layer` takes the block and its reuse branch as arguments,
        so one compiled layer serves every layer of the member: a member compiles three graphs (entry, layer, head),
        whatever its depth, where traced whole it was one graph of every block with its reuse (DVT on DeiT-S: 3046
        operations against the base's 263). Every tensor handed to a compiled frame gets its rows marked as a
        run-time size (:func:`~vitconvert.layers.compiled.rows_marked`), so no batch size compiles again. With the
        reused features entering the MLP (``feature_reuse_at: mlp``) a member is traced whole (:meth:`_run_member`).
        """
        g = self._graphs[k]
        tokens, mixed = self._enter(x, carry, k)
        reuse = self.reuse[self.member_keys[k]] if k > 0 and self.member_keys[k] in self.reuse and "features" in carry \
            else None
        features = carry.get("features")
        relations = []
        for i, block in enumerate(g["blocks"]):
            tokens, logits = self._layer(k, i, block, rows_marked(tokens),
                                         None if mixed is None else rows_marked(mixed[:, i]),
                                         None if reuse is None else reuse[i], features)
            if logits is not None:
                relations.append(logits)
        new: Carry = {}
        if self._hands_on(k):
            new["features"] = tokens
            if relations:
                new["relations"] = torch.cat(relations, dim=1)
        return g["head"](rows_marked(tokens, 1)), new  # one head graph for every member's token count

    def _enter(self, x: torch.Tensor, carry: Carry, k: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Member ``k``'s tokens entering its first block and, where it takes relation reuse, the upstream attention
        logits mixed for each of its layers, (B, L, heads, P+N, P+N) at the upstream grid (or None)."""
        tokens = self._graphs[k]["embed"](self._resized(x, k))
        if not (self._graphs[k]["bias"] and "relations" in carry):  # no carry: the last member alone (the dense point)
            return tokens, None
        # Mixed at the upstream grid, resized one layer at a time just before its block: the resized maps of all
        # layers at once (L*h maps of (P+N)^2) would leave the cache before attention reads them.
        mixed = self.mixers[self.member_keys[k]](carry["relations"])
        # heads spelled out, not -1: an empty sub-batch has no size to infer it from
        return tokens, mixed.view(mixed.shape[0], self.num_blocks, mixed.shape[1] // self.num_blocks, *mixed.shape[-2:])

    def _layer(self, k: int, i: int, block: nn.Module, tokens: torch.Tensor, mixed: torch.Tensor | None,
               reuse: nn.Module | None, features: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Block ``i`` of member ``k`` with its reuse: the upstream logits ``mixed`` for this layer resized into an
        attention bias, the reuse branch on the upstream ``features``. Returns the tokens and the attention logits
        the block hands on (or None).

        ``i`` is read only where the reused features enter the MLP (a member then compiles whole): a compiled frame
        guards on the ints it reads, and one compiled layer serves every layer (:meth:`_run_split`)."""
        p, grids = self.num_prefix, self.grids
        into_mlp = reuse is not None and self.settings.feature_reuse_at == "mlp"
        if into_mlp:
            self._reuse_before(self._member(k), i, reuse(features, p, grids[k - 1], grids[k]))
        if mixed is not None:
            out = block(tokens, attn_bias=resize_relations(mixed, p, grids[k - 1], grids[k]))
        else:
            out = block(tokens)
        if into_mlp:
            self._reuse_after(self._member(k), i)
        logits = None
        if self._graphs[k]["logits"]:
            out, logits = out
        if reuse is not None and not into_mlp:
            out = out + reuse(features, p, grids[k - 1], grids[k])
        return out, logits

    _run_split_between_graphs = torch.compiler.disable(_run_split, recursive=False)

    def _run_hooked(self, x: torch.Tensor, carry: Carry, k: int) -> tuple[torch.Tensor, Carry]:
        model = self._member(k)
        blocks = [model.get_submodule(self.anatomy.blocks[i].path) for i in self.reuse_blocks]
        hands_on = self._hands_on(k)
        key = self.member_keys[k]
        reuse = self.reuse[key] if k > 0 and key in self.reuse and "features" in carry else None
        prefix = self.num_prefix if self._family.block_layout == "tokens" else 0
        try:
            if reuse is not None:
                up, up_grid = carry["features"], self.grids[k - 1]
                for j, branch in enumerate(reuse):
                    self._reuse_before(model, j, branch(up, prefix, up_grid, self.grids[k]))
            attach(blocks[-1], _dvt_capture=hands_on)
            logits = model(self._resized(x, k))
            new: Carry = {}
            if hands_on:
                out, grid = detach(blocks[-1], "_dvt_out")
                # (B, prefix + H*W, C): a token sequence keeps its prefix tokens, as the split path's features do
                new["features"] = out.reshape(out.shape[0], prefix + grid[0] * grid[1], out.shape[-1])
            return logits, new
        finally:
            for j, block in enumerate(blocks):
                self._reuse_after(model, j)
                for name in ("_dvt_add", "_dvt_capture", "_dvt_out"):
                    detach(block, name)

    # --- inference ------------------------------------------------------------------------------------

    def forward_at_point(self, x: torch.Tensor) -> DynamicOutput:
        """Real early exit: member k+1 runs only on the images member k did not answer (at the dense point, the
        last member alone)."""
        x = self.check_input(x)
        out = self.cascade.run_last(x) if self.dense else self.cascade.run(x, self.thresholds)
        return DynamicOutput(logits=out.logits, gmacs=out.gmacs, stage=out.exit,
                             extras={f"confidence_{k}": c for k, c in enumerate(out.confidence)})

    def forward_traceable(self, x: torch.Tensor, point: Mapping[str, torch.Tensor]) -> DynamicOutput:
        """Real early exit with the thresholds as tensors (an exported graph's inputs; at the dense point they
        are inputs that change nothing)."""
        x = self.check_input(x)
        if self.dense:
            out = self.cascade.run_last(x)
            return DynamicOutput(logits=out.logits, gmacs=out.gmacs, stage=out.exit)
        thresholds = torch.stack([point[f"threshold_{k}"].reshape(()) for k in range(len(self.thresholds))])
        out = self.cascade.run_traceable(x, thresholds)
        return DynamicOutput(logits=out.logits, gmacs=out.gmacs, stage=out.exit)

    def collect(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every member on every image (calibration simulates any thresholds from these logits); at the dense
        point the last member alone."""
        x = self.check_input(x)
        if self.dense:
            return {self.names[-1]: self.cascade.run_last(x).logits.float()}
        return {name: lg.float() for name, lg in zip(self.names, self.cascade.run_all(x), strict=True)}

    def simulate(self, collected: dict[str, torch.Tensor], point: Mapping[str, float]) -> DynamicOutput:
        if point.get("dense", self.dense):
            out = self.cascade.simulate_last(collected[self.names[-1]])
        else:
            thresholds = [float(point.get(f"threshold_{k}", t)) for k, t in enumerate(self.thresholds)]
            out = self.cascade.simulate([collected[name] for name in self.names], thresholds)
        return DynamicOutput(logits=out.logits, gmacs=out.gmacs, stage=out.exit,
                             extras={f"confidence_{k}": c for k, c in enumerate(out.confidence)})

    # --- training -------------------------------------------------------------------------------------

    def forward_train(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.cascade.run_all(self.check_input(x))
        out = {"logits": logits[-1]}
        out.update({f"exit.{name}": lg for name, lg in zip(self.names[:-1], logits[:-1], strict=True)})
        if self.settings.freeze_last:
            # The frozen last member gets an empty carry (nothing is handed to it) and has no parameter that requires a
            # gradient, so autograd records nothing for it: its logits are the original model's, the teacher's.
            out["original_logits"] = logits[-1]
        return out

    def method_losses(self, outputs: dict[str, torch.Tensor], labels: torch.Tensor | None,
                      teacher_logits: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        # DVT's loss is cross-entropy (+ our distillation) at every exit: the pipeline's terms. cascade_kl also
        # teaches each earlier member the last member's answer, which is what its exit decision stands in for.
        if self.recipe.losses.cascade_kl <= 0:
            return {}
        target = outputs["logits"].detach().float().log_softmax(dim=-1)
        return {f"cascade_kl@{name}": F.kl_div(outputs[f"exit.{name}"].float().log_softmax(dim=-1), target,
                                               reduction="batchmean", log_target=True)
                for name in self.names[:-1]}

    # --- accounting -----------------------------------------------------------------------------------

    def _count_costs(self) -> None:
        """Each member's GMACs on one image given the earlier members' carry."""
        self._count_cascade_costs(self.cascade)


__all__ = ["DVT", "DVTLosses", "DVTSettings"]
