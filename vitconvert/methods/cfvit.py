"""CF-ViT: coarse-to-fine vision transformer (Chen et al., AAAI 2023, arXiv 2203.03821).

Converted from a pretrained ViT/DeiT with a class token or an attention-pooling head (SigLIP, MAP), or an EVA/RoPE
ViT or BEiT with a class token (the token path), or a PVT-v2, Swin or SwinV2 (the region path, below). One set of
transformer weights serves both stages; on the token path only the position embeddings differ.

* Coarse stage: the image is resized so the unchanged patch embedding yields a coarse grid (half the
  native grid per side by default: 7x7 for 14x14), then class token, all blocks, norm, head. Blocks from
  ``gca_start_block`` on also report the class token's attention row (an fx rewrite that keeps fused
  attention), averaged over heads into the global class attention (GCA) by an exponential moving average.
* Early exit: an image whose coarse confidence (max softmax) exceeds ``eta`` stops there. Only the other
  images run the fine stage, as a real sub-batch: the two stages are a two-stage
  :class:`~vitconvert.layers.cascade.Cascade`, which also simulates any ``eta`` from one pass (calibration).
* Fine stage: the ``alpha`` fraction of coarse patches with the highest GCA is re-split 2x2 into fine
  patches; the others stay coarse (their coarse input embeddings). The coarse stage's final features pass
  through a small MLP (last layer zero-initialised) and are added to the fine tokens they cover.

**Without a class token, with an attention-pooling head (SigLIP, MAP).** The pooling head's latent queries attend
once, to the last block's normalised tokens: that attention (mean over heads and latents) is what the classifier reads
of each token, the role the class token's attention plays, and it is the score, read in the coarse pass's head (an fx
rewrite of the head keeping fused attention). Last layer only: no block has a query that stands for the classifier.

**EVA / RoPE ViT.** Its blocks share a rotary embedding computed for the model's grid (a buffer). The coarse pass is
the model at the coarse grid exactly as timm runs it at that size (the buffer of the model resized by timm's
``set_input_size``, kept as ``coarse_<name>``); the fx split hands the shared input to every block. In the fine pass
each token gets its own row, gathered per image like the tokens ((B, 1, T, E), broadcast over heads): a fine patch
its full-grid row, a coarse patch the mean of its 2x2 positions' rows. The rotation is linear in its cos/sin entries,
so a query scores a coarse key as the mean of its scores against that key at the four positions (and a coarse query
likewise), the same averaging as the coarse token's embedding; the coarse grid's own row would place the token at
one point between the four and rotate it as a unit vector, which no mixture of the four positions does.

**BEiT.** Every block adds a relative position bias B (heads, S, S) over prefix tokens + the grid, computed from its
table. Each block is rewritten to take its bias as an input (:func:`vitconvert.fx.lift_attention_bias`; the table stays
the one parameter), and a sequence whose tokens average grid positions gets M B M^T, M the (T, S) averaging matrix
(a coarse token: its 2x2 positions; the class token its own entry): between coarse tokens the mean over the 4x4
position pairs. The coarse pass is the all-coarse case, the fine pass per image (B, heads, T, T); the full sequence in
order is B itself (the base blocks run), so full compute is exact. Resampling the table to the coarse grid (timm's
``set_input_size``) was the other candidate; it serves the coarse pass only, while the fine pass needs the mixed case
anyway, and one rule for both keeps a coarse token's bias the same in both passes.

The operating point is ``eta`` (the knob a user turns; simulated from one pass) and ``alpha`` (changes the
fine stage; calibration explores the recipe's ``explore_alpha`` when given, else keeps ``model.alpha``). At
``eta = 1`` (never exit) and ``alpha = 1`` (re-split everything) the model is exactly the base model on
the full image: that is its full-compute point. ``dense`` 1 runs the fine stage alone on every image, without
the coarse stage or reuse: the base's computation and cost with the fine-tuned weights, the dense point
calibration falls back to where early exit does not pay (:meth:`ConvertedModel.dense_point`).

**Hierarchical backbones (PVT-v2): the region path.** No class token and no single token grid, so: the coarse
stage is the base model itself on the half-size image; each token of its last normalised map is scored by its
share of the predicted logit (``w_pred . t_i``: the head is linear over their mean, so the scores average to the
logit minus the bias; no parameter, nothing to train, and defined where no token attends to the whole image); the
fine stage runs every block whose map 2x2 regions tile as a two-level query block (DGE's
:class:`~vitconvert.methods.dge.DGEBlock`, levels given from outside): the ``alpha`` share of regions with the
highest resized score keep their four tokens as queries, the others one averaged query whose update is broadcast;
keys and values stay dense and PVT-v2's depthwise convolution runs at each query's scale
(:mod:`vitconvert.layers.scale_conv`). The coarse pass's last tokens are added to the first block's input through
a :class:`~vitconvert.layers.reuse.FeatureReuse` (zero-initialised projection). At ``alpha = 1`` with a fresh reuse
layer this is the base model.

**Windows (Swin): the window is the unit.** A block whose attention runs inside windows of its map
(:class:`~vitconvert.backbones.family.WindowView`) runs DGE's window frame: its map rolled by the block's shift and cut
into windows, 2x2 regions cut inside each window. CF-ViT refines *whole windows* (as SparseViT, arXiv 2303.17605, on
Swin): the ``alpha`` share of each block's windows with the highest score keep every token as a query, the others
run at DGE's coarse level inside the window (one query per 2x2 region, its update broadcast; keys and values stay the
window's tokens). A window's score is the score map resized to the block's map and averaged over the window's tokens,
per block (a shifted block's windows are other groups of tokens). Chosen over 2x2 regions of the map as the unit:
every window of a block has the same size, so the fine pass's cost depends only on how many windows are refined,
never on which (the cascade charges one cost per stage; with windows of 7, 2x2 regions are cut short at each window's
border, which whole-window choices make the same for every image), and a batch whose windows each take one level runs
DGE's *split* path: the refined windows as one dense batch, the others as another at their cell resolution, no
per-query gathers (the unit that pays on real hardware, SparseViT's lesson). A block with one window per image
(Swin-T's last stage at 224 px) is always refined. A shifted block whose masked parts would split a 2x2 region
(an odd ``window - shift``; not Swin-T's 7/3) could not take the coarse level in those regions, which would make an
unrefined window's cost depend on its place: such a block runs at full resolution. The coarse pass is the base model
on the half-size image with each block taking the windows timm's rule gives a block built for that map (a side no
longer than the window is one window, unshifted: Swin-T's last stages at 112 px), the relative position bias of a
smaller window read from the block's own table at the offsets it has (not a resampled table); it runs on DGE's window
blocks at every token (:meth:`~vitconvert.methods.dge.DGEBlock.forward`, dense mode on a map the base block was not
built for).

**SwinV2** is read as Swin, with the two differences its window view and query attention carry: post-norm blocks
(``x + norm1(attn(x))``; DGE's blocks read it from the block, in both passes and at every level) with cosine
attention, and a continuous position bias, for which a window the coarse pass shrinks gets the bias timm computes for
a block built with that window (:meth:`~vitconvert.backbones.swinv2.SwinV2Windows.relative_bias`: its coordinates
normalised by ``pretrained_window_size`` when set, else by the window): the coarse pass is timm's SwinV2 at half the
size. Its bias MLP runs on every forward (no kept tables), counted in both stages' GMACs.

Fine-tuning trains both stages at once (fine output: distillation + cross-entropy; coarse output: KL to the
detached fine output). The added parts (coarse position embedding, reuse MLP) may learn at ``new_lr_scale``
times the recipe's rate; in a short recipe on CIFAR-10 10x gave 0.3 points more top-1 at half the
GMACs (``recipes/cfvit.yaml`` records the measured steps).
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterator, Mapping
from typing import Any, Literal

import torch
import torch.fx as fx
import torch.nn.functional as F
from pydantic import Field
from timm.layers import resample_abs_pos_embed
from torch import nn

from vitconvert import fx as vfx
from vitconvert.anatomy import Anatomy
from vitconvert.backbones import family_of
from vitconvert.backbones.family import Family, WindowView
from vitconvert.errors import AnatomyError, UserError
from vitconvert.layers.cascade import Carry, Cascade, ExitScore, Stage
from vitconvert.layers.compiled import graph_tracing
from vitconvert.layers.regions import make_layout
from vitconvert.layers.resize import resize_images
from vitconvert.layers.reuse import FeatureReuse, resize_grid
from vitconvert.layers.scale_conv import dwconv_macs
from vitconvert.layers.sharing import attach
from vitconvert.methods.base import ConvertedModel, DynamicOutput, SimulatesPoints
from vitconvert.methods.dge import Context, DGEBlock, block_costs
from vitconvert.methods.dge.block import read_block, window_tables
from vitconvert.operating import Knob, OperatingPoint, OperatingSpace
from vitconvert.recipes import Recipe, Strict
from vitconvert.registry import register_method
from vitconvert.sources import BaseSpec


class CFViTSettings(Strict):
    coarse_grid_ratio: float = Field(0.5, gt=0, lt=1, description="coarse grid side / native grid side")
    alpha: float = Field(0.5, gt=0, le=1, description="fraction of coarse patches re-split in the fine stage")
    gca_beta: float = Field(0.99, ge=0, lt=1, description="EMA factor of global class attention")
    gca_start_block: int = Field(3, ge=0, description="first block (0-based) whose class attention counts")
    eta: float = Field(1.0, ge=0, le=1, description="initial exit threshold (1 = never exit)")
    exit_score: ExitScore = Field("max_softmax", description="the coarse stage's confidence: max softmax (the paper) "
                                  "or margin (top-1 minus top-2 probability)")
    reuse_mlp_ratio: float = Field(4.0, gt=0, le=16, description="hidden width of the feature-reuse MLP / dim")
    resize: Literal["bilinear", "bicubic", "area"] = "bilinear"
    new_lr_scale: float = Field(1.0, gt=0, le=1e3, description="fine-tuning learning-rate multiplier of the added "
                                "parts (coarse position embedding, feature-reuse MLP)")
    explore_alpha: list[float] | None = Field(None, min_length=1, description="alphas calibration explores with eta "
                                            "(each in (0, 1]); null: model.alpha only")


class CFViTLosses(Strict):
    distill: float = Field(1.0, ge=0, description="KL from the original model to the fine output")
    ce: float = Field(1.0, ge=0, description="cross-entropy of the fine output (when labels exist)")
    coarse_kl: float = Field(1.0, ge=0, description="KL from the detached fine output to the coarse output")
    coarse_ce: float = Field(0.0, ge=0, description="cross-entropy of the coarse output (labels; not in the paper)")


@register_method
class CFViT(ConvertedModel, SimulatesPoints):
    """Coarse-to-fine ViT with batched early exit (see the module docstring)."""

    method = "cfvit"
    families = ("vit", "eva", "beit", "pvt_v2", "swin", "swinv2")
    description = ("CF-ViT coarse-to-fine inference with early exit (ViT/DeiT with a class token or attention pooling, "
                   "EVA/RoPE ViT, BEiT, PVT-v2, Swin, SwinV2)")
    Settings = CFViTSettings
    Losses = CFViTLosses

    def __init__(self, base: nn.Module, spec: BaseSpec, recipe: Recipe, anatomy: Anatomy) -> None:
        super().__init__(base, spec, recipe, anatomy)
        s: CFViTSettings = self.settings
        family = family_of(anatomy)
        # A model that is one chain of blocks over one token sequence runs the paper's token path (class-token
        # attention); a hierarchical one the region path (see the module docstring), by whole windows where its
        # blocks attend inside windows (Swin). One stage of global attention whose blocks also take a shared input
        # (EVA's rotary embedding) is a chain too: the split passes it along.
        self.hierarchical = not (family.splits_at_blocks or (family.global_attention and len(anatomy.stages) == 1))
        if self.hierarchical:
            self._init_regions(base, spec, anatomy, family)
            return
        arch = spec.architecture
        # What scores the coarse regions: the attention-pooling head's latent queries when the classifier reads the
        # tokens through one (SigLIP, MAP), else the class token's attention rows (GCA, as in the paper).
        self.scorer = "pool" if anatomy.attn_pool else "class" if anatomy.extras.get("class_token") else None
        if self.scorer is None:
            raise UserError(f"cfvit scores regions by the class token's attention or an attention-pooling head's; "
                            f"{arch} has neither: it pools with {anatomy.pool!r} and has no class token")
        if self.scorer == "pool" and getattr(base.get_submodule(anatomy.attn_pool), "pos_embed", None) is not None:
            raise UserError(f"cfvit runs the pooling head on a coarse grid; {arch}'s pooling head adds a position "
                            "embedding of the full grid")
        if self.scorer == "class" and s.gca_start_block >= len(anatomy.blocks):
            raise UserError(f"recipe: model.gca_start_block must be < the depth ({len(anatomy.blocks)}), "
                            f"got {s.gca_start_block}")
        shared = list(anatomy.blocks[0].shared_inputs)
        if any(b.shared_inputs != shared for b in anatomy.blocks) or any(n.startswith("arg") for n in shared):
            raise UserError(f"cfvit calls the blocks with the inputs they share by keyword; {arch}'s blocks take "
                            f"{', '.join(sorted({n for b in anatomy.blocks for n in b.shared_inputs}))}")
        gh, gw = anatomy.grid
        ph, pw = anatomy.patch_size
        if anatomy.img_size != (gh * ph, gw * pw):
            # Both stages feed the one patch embedding images it must accept at any size, which timm allows only
            # for whole patches.
            raise UserError(f"cfvit needs an image size that is a whole number of patches; {spec.architecture} runs "
                            f"at {anatomy.img_size[0]}x{anatomy.img_size[1]} px with {ph}x{pw}-px patches: rebuild "
                            f"it with img_size={gh * ph} (or {(gh + 1) * ph})")
        ch, cw = round(gh * s.coarse_grid_ratio), round(gw * s.coarse_grid_ratio)
        if (2 * ch, 2 * cw) != (gh, gw):
            raise UserError(
                f"cfvit re-splits each coarse patch 2x2, so the native grid {gh}x{gw} must be twice the coarse grid; "
                f"coarse_grid_ratio={s.coarse_grid_ratio} gives {ch}x{cw}: use 0.5 with an even grid"
            )
        self.coarse_grid = (ch, cw)
        self.num_prefix = anatomy.num_prefix_tokens
        patch = (anatomy.img_size[0] // gh, anatomy.img_size[1] // gw)
        self.coarse_img_size = (ch * patch[0], cw * patch[1])

        patch_embed = base.get_submodule(anatomy.patch_embed)
        if hasattr(patch_embed, "strict_img_size"):
            patch_embed.strict_img_size = False  # the coarse image goes through the same patch embedding

        self.pos_embed_coarse: nn.Parameter | None = None
        if anatomy.pos_embed is not None:
            pos = base.get_parameter(anatomy.pos_embed)
            self.pos_embed_coarse = nn.Parameter(resample_abs_pos_embed(
                pos.detach(), new_size=list(self.coarse_grid), old_size=list(anatomy.grid),
                num_prefix_tokens=int(pos.shape[1]) - gh * gw, interpolation="bicubic", antialias=True,
            ))
        dim = anatomy.embed_dim
        hidden = int(dim * s.reuse_mlp_ratio)
        self.reuse = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        nn.init.zeros_(self.reuse[-1].weight)
        nn.init.zeros_(self.reuse[-1].bias)

        # fx graphs share the base model's modules; they are kept out of the module tree so the state dict
        # holds every weight exactly once, under its timm name.
        pool = [anatomy.attn_pool] if self.scorer == "pool" else []
        embed, head = vfx.split_at_blocks(base, anatomy.block_paths, leaves=pool, shared=shared or None)
        self.shared_buffers = self._read_shared(base, embed, shared, family, arch)
        if anatomy.pos_embed is not None:
            embed = vfx.lift_parameter(embed, anatomy.pos_embed, "pos_embed")
        head_tapped = None
        if self.scorer == "pool":
            # The pooling head's latent queries attend to the last tokens once: their attention (mean over the
            # latents) is the whole score, read in the coarse pass's head; no block reports anything.
            head_tapped = fx.GraphModule(head, copy.deepcopy(head.graph), class_name="HeadTapped")
            head_tapped = vfx.tap_leaf(head_tapped, anatomy.attn_pool, vfx.tap_class_attention(
                base.get_submodule(anatomy.attn_pool), all_queries=True))
        blocks, biases = self._biased_blocks(base, family, arch)
        graphs = {
            "embed": embed,
            "head": head,
            "head_tapped": head_tapped,
            "base_blocks": [base.get_submodule(p) for p in anatomy.block_paths],
            # Blocks whose attention takes a position bias as an input (BEiT), else the base's blocks; with the
            # bias graphs computing each block's own bias from its table.
            "blocks": blocks,
            "biases": biases,
            "tapped": [vfx.tap_class_attention(blk, keep=shared)
                       if self.scorer == "class" and i >= s.gca_start_block else None
                       for i, blk in enumerate(blocks)],
            "final_norm": base.get_submodule(anatomy.final_norm) if anatomy.final_norm else nn.Identity(),
        }
        # Not modules: the stages call the graphs above, whose parameters are registered once under base.
        attach(self, _graphs=graphs, cascade=Cascade([Stage("coarse", self._coarse_stage, 0.0),
                                                      Stage("fine", self._fine_stage, 0.0)], s.exit_score))
        self.eta = s.eta
        self._alpha = s.alpha
        self.dense = 0.0
        self._count_costs()

    def _read_shared(self, base: nn.Module, embed: fx.GraphModule, names: list[str], family: Family,
                     arch: str) -> dict[str, str]:
        """The inputs every block shares (EVA's rotary embedding): each must be a buffer of the base model, computed
        for its grid; the coarse pass gets the same buffer of the model resized to the coarse grid (timm's own
        ``set_input_size``: exactly the model at that size), kept here as ``coarse_<name>``. The embed graph is cut
        back to return the tokens only (the fine pass reads the base's buffer each call, so ``.to()`` follows it).
        Returns name -> buffer path."""
        if not names:
            return {}
        out = next(n for n in embed.graph.nodes if n.op == "output")
        tokens, *values = out.args[0]
        buffers = dict(base.named_buffers())
        targets: dict[str, str] = {}
        for name, v in zip(names, values, strict=True):
            if v.op != "get_attr" or v.target not in buffers:
                raise UserError(f"cfvit gives the coarse pass its own {name!r}, read from the model's buffers; "
                                f"{arch} computes {name!r} in its forward")
            targets[name] = str(v.target)
        out.args = (tokens,)
        embed.graph.eliminate_dead_code()
        embed.graph.lint()
        embed.recompile()
        resized = copy.deepcopy(base)
        family.set_input_size(resized, self.coarse_img_size, self.anatomy)
        (gh, gw), (ch, cw) = self.anatomy.grid, self.coarse_grid
        for name, target in targets.items():
            fine, coarse = base.get_buffer(target), resized.get_buffer(target)
            if fine.dim() > 3 or fine.shape[-2] != gh * gw or coarse.shape[-2] != ch * cw:
                raise UserError(f"cfvit gives each patch token its own row of {name!r}; {arch}'s has shape "
                                f"{tuple(fine.shape)} on the {gh}x{gw} grid (expected (..., {gh * gw}, E))")
            self.register_buffer(f"coarse_{name}", coarse.detach().clone(), persistent=False)
        return targets

    def _biased_blocks(self, base: nn.Module, family: Family, arch: str) -> tuple[list[nn.Module],
                                                                                list[nn.Module] | None]:
        """Blocks whose attention adds a bias over position pairs of the grid (BEiT's relative position bias) run a
        coarse or mixed sequence with a bias of their own: each is rewritten to take its bias as an input, and a
        second graph computes the block's own bias from its table (the table stays the one parameter). Returns the
        blocks the passes call (the base's when there is no such bias) and the bias graphs (None then)."""
        anatomy = self.anatomy
        tables = [family.position_bias(base, info.attn) for info in anatomy.blocks]
        if not any(tables):
            return [base.get_submodule(p) for p in anatomy.block_paths], None
        if not all(tables):
            raise UserError(f"cfvit gives every block a position bias for its token sequence; only some of {arch}'s "
                            "blocks have one")
        blocks, biases = [], []
        size = self.num_prefix + anatomy.grid[0] * anatomy.grid[1]
        for info, table in zip(anatomy.blocks, tables, strict=True):
            assert table is not None and table.startswith(info.path + ".")
            # Traced as the family exports its attention (BEiT: explicit softmax; the ONNX exporter cannot
            # decompose fused attention with a per-image bias of unknown batch), since these graphs are what both
            # eager and exported passes run.
            with family.export_context(base):
                block, bias = vfx.lift_attention_bias(base.get_submodule(info.path), table[len(info.path) + 1:])
            with torch.no_grad():
                shape = tuple(bias().shape)
            if len(shape) != 4 or shape[0] != 1 or shape[-2:] != (size, size):
                raise UserError(f"cfvit averages {arch}'s position bias over coarse positions; block {info.path} "
                                f"gives one of shape {shape}, expected (1, heads, {size}, {size})")
            blocks.append(block)
            biases.append(bias)
        return blocks, biases

    def _pair_bias(self, bias: torch.Tensor, positions: torch.Tensor, batch: int) -> torch.Tensor:
        """A block's (1, heads, S, S) position bias over prefix tokens + the full grid -> the bias of a sequence
        whose tokens sit at ``positions`` ((1 or B, T) indices: prefix tokens ``0..p-1``, fine patch ``j`` at
        ``p + j``, coarse patch ``r`` at ``S + r``), (B, heads, T, T). With M the (T, S) matrix averaging each token's
        grid positions (a coarse patch: its 2x2), the bias is M B M^T: between two coarse patches the mean over the
        4x4 position pairs, the same averaging as the coarse token's embedding. The coarse pass is the all-coarse
        case; the full sequence in order is B itself."""
        p = self.num_prefix
        (gh, gw), (ch, cw) = self.anatomy.grid, self.coarse_grid
        n = gh * gw

        def region_mean(t: torch.Tensor, dim: int) -> torch.Tensor:
            grid = t.narrow(dim, p, n).unflatten(dim, (ch, 2, cw, 2))
            return grid.mean(dim=(dim + 1, dim + 3)).flatten(dim, dim + 1)

        rows = torch.cat([bias, region_mean(bias, 2)], dim=2)
        ext = torch.cat([rows, region_mean(rows, 3)], dim=3)  # (1, heads, S + Nc, S + Nc)
        m, t = positions.shape
        h, e = ext.shape[1], ext.shape[-1]
        out = ext.expand(m, -1, -1, -1).gather(2, positions[:, None, :, None].expand(m, h, t, e))
        out = out.gather(3, positions[:, None, None, :].expand(m, h, t, t))
        return out.expand(batch, -1, -1, -1)

    def _run_blocks(self, tokens: torch.Tensor, shared: Mapping[str, torch.Tensor], positions: torch.Tensor | None,
                    tap: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The blocks over ``tokens`` (``positions``: see :meth:`_pair_bias`; None for the full sequence in order,
        which runs the base's own blocks). ``tap``: also accumulate the class token's attention (GCA)."""
        g = self._g
        gca = None
        if tap and self.scorer == "class":
            # Global class attention accumulates in fp32 whatever the model's dtype or autocast: in bf16 the
            # EMA's small steps round away and ties reorder which patches are refined.
            gca = torch.zeros(tokens.shape[0], tokens.shape[1] - self.num_prefix, device=tokens.device,
                              dtype=torch.float32)
        beta = self.settings.gca_beta
        biases = g["biases"] if positions is not None else None
        blocks = g["blocks"] if biases is not None else g["base_blocks"]
        for i, (block, tapped) in enumerate(zip(blocks, g["tapped"], strict=True)):
            args = (tokens,) if biases is None else (tokens, self._pair_bias(biases[i](), positions,
                                                                             tokens.shape[0]).to(tokens.dtype))
            if tapped is None or gca is None:
                tokens = block(*args, **shared)
            else:
                tokens, attn = tapped(*args, **shared)
                gca = beta * gca + (1 - beta) * attn[:, :, self.num_prefix:].float().mean(dim=1)
        return tokens, gca

    def _shared(self, stage: str) -> dict[str, torch.Tensor]:
        """The blocks' shared inputs of a full-grid (``fine``) or coarse-grid (``coarse``) sequence."""
        if stage == "coarse":
            return {n: getattr(self, f"coarse_{n}") for n in self.shared_buffers}
        return {n: self.base.get_buffer(t) for n, t in self.shared_buffers.items()}

    def _embed(self, x: torch.Tensor, pos: torch.Tensor | None) -> torch.Tensor:
        return self._g["embed"](x) if pos is None else self._g["embed"](x, pos)

    # --- hierarchical backbones: regions ----------------------------------------------------------------

    def _init_regions(self, base: nn.Module, spec: BaseSpec, anatomy: Anatomy, family: Family) -> None:
        """The region path (see the module docstring): every block becomes a two-level query block (2x2 regions,
        fine or coarse queries) whose levels come from the coarse pass; the coarse pass is the base model itself.
        A block whose attention runs inside windows (Swin) is refined by whole windows."""
        s: CFViTSettings = self.settings
        arch = spec.architecture
        if s.coarse_grid_ratio != 0.5:
            raise UserError(f"cfvit on {family.description} refines each coarse region 2x2: coarse_grid_ratio must "
                            f"be 0.5, got {s.coarse_grid_ratio}")
        if anatomy.pool != "avg" or len(anatomy.head) != 1 or not isinstance(base.get_submodule(anatomy.head[0]),
                                                                             nn.Linear):
            raise UserError(f"cfvit without a class token scores regions by their share of the predicted logit, which "
                            f"needs average pooling and one linear head; {arch} pools with {anatomy.pool!r}")
        last_norm = anatomy.stages[-1].norm or anatomy.final_norm
        if not last_norm:
            raise UserError(f"cfvit without a class token reads the last stage's normalised tokens; {arch} has no "
                            "norm after its last stage")
        step = family.size_step(anatomy)
        h, w = anatomy.img_size
        if h % (2 * step) or w % (2 * step):
            raise UserError(f"cfvit runs the coarse pass at half the input size, which must keep whole maps: "
                            f"{arch} at {h}x{w} px needs sides that are multiples of {2 * step}")
        self.coarse_img_size = (h // 2, w // 2)
        self.num_prefix = 0
        patch_embed = base.get_submodule(anatomy.patch_embed) if anatomy.patch_embed else None
        if hasattr(patch_embed, "strict_img_size"):
            patch_embed.strict_img_size = False  # the coarse image goes through the same patch embedding
        ctx = Context(2, [2, 1], "packed", "auto", 1.0)
        ctx.gate_override = self._override
        stand_in = _NoRouter(2)
        self._block_stage: dict[int, int] = {}
        # Blocks refined by whole windows: block index -> (its map, its windows read by the family); and the blocks
        # with windows that always run at full resolution (their windows' masked parts would split a 2x2 region).
        self._window_blocks: dict[int, tuple[tuple[int, int], WindowView]] = {}
        self._full_blocks: list[int] = []
        try:
            for info in anatomy.blocks:
                block = base.get_submodule(info.path)
                where = f"cfvit: block {info.path}"
                parts = read_block(block, where, family)
                grid = anatomy.stages[info.stage].grid
                view, tokens, frame, cap = parts.windows, info.tokens, grid, None
                if view is not None:
                    # Windows (Swin): every window of a block has the same size, so the fine pass's cost depends
                    # only on how many windows it refines, not which; regions are cut inside each window.
                    view.check(grid, where)
                    frame = view.window(grid)
                    tokens = frame[0] * frame[1]
                elif grid[0] % 2 or grid[1] % 2:
                    # 2x2 regions do not tile the map: its border regions would be short, so the fine pass's cost
                    # would depend on which regions it refines, while a cascade charges one cost per stage. Such a
                    # stage (PVT-v2's last at 224 px: 7x7) runs at full resolution, its base blocks unchanged.
                    continue
                lay = make_layout(frame, 2, ctx.sizes, torch.device("cpu"))
                if view is not None:
                    cap = window_tables(view, lay, grid)[1]
                costs: dict[str, Any] = block_costs(
                    block.get_submodule(parts.norm1), block.get_submodule(parts.norm2), parts.attention,
                    block.get_submodule(parts.mlp), parts.conv, tokens, frame)
                costs["router"] = 0.0
                costs["level_nq"] = [float(v) for v in lay.nq.sum(0).tolist()]
                costs["level_conv"] = [0.0, 0.0]
                if parts.conv is not None:
                    gates = torch.arange(2).view(2, 1).expand(2, lay.num_regions)
                    costs["level_conv"] = dwconv_macs(parts.conv.dwconv, gates, lay).tolist()
                base.set_submodule(info.path, DGEBlock(block, parts, info.index, 0, frame, stand_in, ctx, costs,
                                                       family))
                if view is None:
                    self._block_stage[info.index] = info.stage
                elif cap is not None and bool((cap < 1).any()):
                    # A shifted window whose masked parts split a 2x2 region could not take the coarse level there,
                    # so an unrefined window's cost would depend on which window it is: the block runs at full
                    # resolution (its DGE block still runs the coarse pass's other map).
                    self._full_blocks.append(info.index)
                else:
                    self._window_blocks[info.index] = (grid, view)
        except AnatomyError as e:
            raise UserError(str(e).replace("dge", "cfvit")) from None
        first = anatomy.blocks[0]
        last_stage = anatomy.stages[-1]
        self.reuse = FeatureReuse(last_stage.dim, first.dim, hidden=int(first.dim * s.reuse_mlp_ratio))
        # Taps (not registered as modules): the last stage's normalised tokens of the coarse pass, and the reuse
        # update added to the fine pass's first block input.
        attach(self, _ctx=ctx, _tap=None, _pending=None, _fine_gates={})
        base.get_submodule(last_norm).register_forward_hook(self._tap_hook)
        base.get_submodule(first.path).register_forward_pre_hook(self._reuse_hook)
        self.stage_grids = [st.grid for st in anatomy.stages]
        # 2x2 regions per stage (blocks over tokens); None for a stage that runs at full resolution (a map they do
        # not tile) or whose blocks are refined by windows
        staged = set(self._block_stage.values())
        self.region_grids: list[tuple[int, int] | None] = [
            (g[0] // 2, g[1] // 2) if i in staged else None for i, g in enumerate(self.stage_grids)]
        if not self._block_stage and not self._window_blocks:
            raise UserError(f"cfvit refines 2x2 regions, but no stage map of {arch} at {h}x{w} px has even sides")
        # The coarse pass's last map: read once from a probe (the family knows how a block call gives its grid).
        grids: list[tuple[int, int]] = []
        last_block = base.get_submodule(anatomy.blocks[-1].path)
        probe = last_block.register_forward_pre_hook(
            lambda mod, args, kwargs: grids.append(family.block_grid(args[0], args[1:], kwargs, None)),
            with_kwargs=True)
        was = base.training
        base.eval()
        try:
            with torch.no_grad():
                p = next(base.parameters())
                base(torch.zeros(1, 3, *self.coarse_img_size, device=p.device, dtype=p.dtype))
        finally:
            probe.remove()
            base.train(was)
        self.coarse_final_grid = grids[-1]
        attach(self, cascade=Cascade([Stage("coarse", self._coarse_stage, 0.0), Stage("fine", self._fine_stage, 0.0)],
                                     s.exit_score))
        self.eta = s.eta
        self._alpha = s.alpha
        self.dense = 0.0
        self._count_costs()

    _ctx: Context

    def _tap_hook(self, module: nn.Module, args: Any, output: torch.Tensor) -> None:
        if self._tap is not None:
            self._tap["tokens"] = output

    def _reuse_hook(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        if self._pending is None:
            return None
        # (B, N, C) tokens or a (B, H, W, C) map (Swin): the update is in raster order either way
        x = args[0] + self._pending.to(args[0].dtype).reshape(args[0].shape)
        attach(self, _pending=None)
        return (x, *args[1:])

    def _override(self, index: int, batch: int, regions: int, device: torch.device) -> torch.Tensor:
        """The levels of block ``index``'s regions: its stage's (blocks over tokens), its windows' repeated over each
        window's regions (a block with windows asks for every region of every window of an image, window after
        window), or none coarse (a block that runs at full resolution)."""
        gates = self._fine_gates.get(index)
        if gates is None:
            return torch.zeros(batch, regions, dtype=torch.long, device=device)
        if index in self._window_blocks:
            # repeat_interleave, spelled so that a batch of no images reshapes too (exporters write it with a -1)
            gates = gates.unsqueeze(2).expand(-1, -1, regions // gates.shape[1]).reshape(batch, regions)
        assert gates.shape == (batch, regions), (gates.shape, batch, regions)
        return gates

    def window_gates(self, scores: torch.Tensor) -> dict[int, torch.Tensor]:
        """(B, h, w) informativeness of the coarse pass's last map -> per block refined by windows, the (B, windows)
        level of each of its windows (0: every token a query, 1: one query per 2x2 region of the window): the
        ``alpha`` share of the windows whose score is highest (ties: the first in the block's window order). A
        window's score is the score map, resized to the block's map, averaged over the window's tokens: per block,
        since a shifted block's windows are other groups of tokens."""
        out: dict[int, torch.Tensor] = {}
        b = scores.shape[0]
        resized: dict[tuple[int, int], torch.Tensor] = {}
        for index, (grid, view) in self._window_blocks.items():
            gh, gw = view.windows(grid)
            r = gh * gw
            k = math.ceil(self.alpha * r)
            if k >= r:
                out[index] = torch.zeros(b, r, dtype=torch.long, device=scores.device)
                continue
            if grid not in resized:
                resized[grid] = resize_grid(scores.unsqueeze(1).float(), grid).reshape(b, *grid, 1)  # a map
            sc = view.partition(resized[grid]).mean(dim=(1, 2)).view(b, r)
            order = sc.argsort(dim=1, descending=True, stable=True)
            gates = torch.ones(b, r, dtype=torch.long, device=scores.device)
            out[index] = gates.scatter(1, order[:, :k], 0)
        return out

    def region_gates(self, scores: torch.Tensor) -> list[torch.Tensor]:
        """(B, h, w) informativeness of the coarse pass's last map -> per stage, the (B, regions) level of each 2x2
        region of the fine pass (0: refined at full resolution, 1: one coarse query): the ``alpha`` share of the
        regions whose resized score is highest (ties: the first in row order); an empty (B, 0) tensor for a stage that
        runs at full resolution."""
        out = []
        b = scores.shape[0]
        for grid in self.region_grids:
            if grid is None:
                out.append(scores.new_zeros(b, 0, dtype=torch.long))
                continue
            rh, rw = grid
            r = rh * rw
            k = math.ceil(self.alpha * r)
            if k >= r:
                out.append(torch.zeros(b, r, dtype=torch.long, device=scores.device))
                continue
            sc = resize_grid(scores.unsqueeze(1).float(), (rh, rw)).reshape(b, r)
            order = sc.argsort(dim=1, descending=True, stable=True)
            gates = torch.ones(b, r, dtype=torch.long, device=scores.device)
            out.append(gates.scatter(1, order[:, :k], 0))
        return out

    def _coarse_regions(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The base model on the half-size image: logits, its last normalised tokens and their scores."""
        xc = resize_images(x, self.coarse_img_size, self.settings.resize)
        attach(self, _tap={})
        try:
            logits = self.base(xc)
            tokens = self._tap["tokens"]
        finally:
            attach(self, _tap=None)
        # Informativeness: each token's share of the predicted class's logit. The head is linear over the mean of
        # these tokens, so the logit is exactly the mean of the per-token contributions w_pred . t_i (plus bias).
        tokens = tokens.reshape(x.shape[0], -1, tokens.shape[-1])  # a (B, h, w, C) map (Swin) as tokens
        head = self.base.get_submodule(self.anatomy.head[0])
        w = head.weight.index_select(0, logits.argmax(dim=-1))  # (B, C)
        scores = (tokens.float() * w.float().unsqueeze(1)).sum(-1).reshape(x.shape[0], *self.coarse_final_grid)
        return {"logits": logits, "tokens": tokens, "scores": scores}

    def _fine_regions(self, x: torch.Tensor, coarse: Mapping[str, torch.Tensor], mode: str) -> torch.Tensor:
        """The fine pass: each block's queries at full resolution in the chosen regions and one per 2x2 region
        elsewhere (the coarse pass's final features added to the first block's input through the reuse layer)."""
        stage_gates = self.region_gates(coarse["scores"])
        gates = {i: stage_gates[stage] for i, stage in self._block_stage.items()}
        gates.update(self.window_gates(coarse["scores"]))
        reuse = self.reuse(coarse["tokens"], 0, self.coarse_final_grid, self.stage_grids[0])
        attach(self, _fine_gates=gates, _pending=reuse)
        if self.alpha >= 1:
            # Every region and window refined: the base blocks themselves (what the sparse path chooses at run time
            # then), decided here from the setting, so exported and compiled graphs carry no region machinery either
            mode = "dense"
        try:
            with self._ctx.run(mode):
                return self.base(x)
        finally:
            attach(self, _fine_gates={}, _pending=None)

    @contextlib.contextmanager
    def counted_execution(self) -> Iterator[None]:
        """The region path's blocks may run their queries densely when that is faster; ``gmacs`` counts the
        sparse computation (as DGE's)."""
        if not self.hierarchical:
            yield
            return
        saved = self._ctx.execution
        self._ctx.execution = "sparse"
        try:
            yield
        finally:
            self._ctx.execution = saved

    # --- operating point ------------------------------------------------------------------------------

    def operating_space(self) -> OperatingSpace:
        s: CFViTSettings = self.settings
        return OperatingSpace((
            Knob("eta", 0.0, 1.0, full=1.0, sweep=tuple(round(i / 100, 2) for i in range(101)), simulated=True,
                 description="exit after the coarse stage when its confidence exceeds eta"),
            Knob("alpha", 0.0, 1.0, full=1.0, sweep=tuple(s.explore_alpha or [s.alpha]),
                 description="share of coarse patches re-split in the fine stage"),
            Knob("dense", 0.0, 1.0, full=0.0, sweep=(0.0, 1.0), integer=True, implied=0.0,
                 description="1: the fine stage alone at full resolution on every image, without the coarse stage "
                             "(the base model's computation and cost; eta and alpha do not apply)"),
        ))

    def dense_point(self) -> OperatingPoint:
        return {"dense": 1.0}  # the other knobs do not apply there

    @property
    def alpha(self) -> float:
        return self._alpha

    @alpha.setter
    def alpha(self, value: float) -> None:
        if not 0.0 < value <= 1.0:
            raise UserError(f"alpha must lie in (0, 1], got {value}")
        if value != self._alpha:
            self._alpha = float(value)
            self._count_costs()

    @property
    def costs(self) -> dict[str, float]:
        """GMACs per image of each stage at the current alpha (the fine stage's excludes the coarse one)."""
        return {stage.name: stage.gmacs for stage in self.cascade.stages}

    def method_state(self) -> dict[str, Any]:
        return {"costs": self.costs}

    def lr_scales(self) -> dict[str, float]:
        """The added parts start from a resize (coarse position embedding) or from zero (the reuse MLP's
        output layer) and may learn faster than the pretrained weights they feed."""
        if self.hierarchical:
            return {"reuse": self.settings.new_lr_scale}
        scales = {"reuse": self.settings.new_lr_scale}
        if self.pos_embed_coarse is not None:
            scales["pos_embed_coarse"] = self.settings.new_lr_scale
        return scales

    def load_method_state(self, state: dict[str, Any]) -> None:
        state = dict(state)
        state.pop("costs", None)  # recounted from the structure, never trusted from a file
        super().load_method_state(state)

    # --- stages ---------------------------------------------------------------------------------------

    @property
    def _g(self) -> dict[str, Any]:
        return self._graphs

    def forward_coarse(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Coarse stage on the whole batch: logits, final tokens, GCA scores, input embeddings."""
        g = self._g
        xc = resize_images(x, self.coarse_img_size, self.settings.resize)
        tokens = self._embed(xc, self.pos_embed_coarse)
        embedded = tokens
        p, nc = self.num_prefix, self.coarse_grid[0] * self.coarse_grid[1]
        size = p + self.anatomy.grid[0] * self.anatomy.grid[1]
        positions = torch.cat([torch.arange(p, device=x.device), size + torch.arange(nc, device=x.device)])[None]
        tokens, gca = self._run_blocks(tokens, self._shared("coarse"), positions, tap=True)
        if self.scorer == "pool":
            logits, attn = g["head_tapped"](tokens)
            gca = attn[:, :, self.num_prefix:].float().mean(dim=1)
        else:
            logits = g["head"](tokens)
        return {"logits": logits, "tokens": tokens, "gca": gca, "embedded": embedded}

    def forward_fine(self, x: torch.Tensor, coarse: dict[str, torch.Tensor] | None) -> torch.Tensor:
        """Fine stage for the images in ``x`` given their coarse-stage results (None: without a coarse stage, every
        patch fine and nothing reused); returns logits."""
        g = self._g
        p = self.num_prefix
        pos = self.base.get_parameter(self.anatomy.pos_embed) if self.anatomy.pos_embed is not None else None
        fine = self._embed(x, pos)
        if coarse is None:
            seq, _ = self._run_blocks(fine, self._shared("fine"), None, tap=False)
            return g["head"](seq)
        b, _, c = fine.shape
        ch, cw = self.coarse_grid
        reuse = self.reuse(g["final_norm"](coarse["tokens"])[:, p:])  # (B, Nc, C)
        reuse = reuse.transpose(1, 2).reshape(b, c, ch, cw)
        reuse = F.interpolate(reuse, scale_factor=2, mode="nearest").flatten(2).transpose(1, 2)
        patches = fine[:, p:] + reuse
        n_coarse = ch * cw
        k = math.ceil(self.alpha * n_coarse)
        shared = self._shared("fine")
        positions = None
        if k >= n_coarse:
            seq = torch.cat([fine[:, :p], patches], dim=1)
        else:
            order = coarse["gca"].argsort(dim=1, descending=True)
            chosen = order[:, :k].sort(dim=1).values
            kept = order[:, k:].sort(dim=1).values
            fine_idx = self.fine_indices(chosen)
            seq = torch.cat([
                fine[:, :p],
                _gather(patches, fine_idx),
                _gather(coarse["embedded"][:, p:], kept),
            ], dim=1)
            shared = {n: self._mixed_rows(v, fine_idx, kept) for n, v in shared.items()}
            size = p + 4 * n_coarse
            positions = torch.cat([torch.arange(p, device=x.device).expand(b, p), p + fine_idx, size + kept], dim=1)
        seq, _ = self._run_blocks(seq, shared, positions, tap=False)
        return g["head"](seq)

    def _mixed_rows(self, value: torch.Tensor, fine_idx: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
        """Per image, the rows of a per-position table (EVA's rotary embedding, (..., N, E) on the full grid) for a
        mixed sequence: a fine patch its own row, a coarse patch the mean of its 2x2 positions' rows. The rotation
        is linear in its cos/sin entries, so a query rotated by the mean row scores a key as the mean over the four
        positions would (and a coarse key is scored as the mean over its four positions): the same averaging as a
        coarse token's embedding. Returns (B, heads or 1, T, E), which the attention broadcasts against its
        (B, heads, T, D) queries and keys."""
        gh, gw = self.anatomy.grid
        v = value.reshape((1,) * (4 - value.dim()) + tuple(value.shape))  # (1, h, N, E)
        means = v.unflatten(2, (gh // 2, 2, gw // 2, 2)).mean(dim=(3, 5)).flatten(2, 3)  # (1, h, Nc, E)
        b, h, e = fine_idx.shape[0], v.shape[1], v.shape[-1]

        def rows(table: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
            return table.expand(b, -1, -1, -1).gather(2, idx[:, None, :, None].expand(b, h, -1, e))

        return torch.cat([rows(v, fine_idx), rows(means, kept)], dim=2)

    def fine_indices(self, coarse_idx: torch.Tensor) -> torch.Tensor:
        """(B, k) coarse patch indices -> (B, 4k) indices of the fine patches they split into."""
        cw = self.coarse_grid[1]
        gw = 2 * cw
        r, c = coarse_idx // cw, coarse_idx % cw
        top = 2 * r * gw + 2 * c
        return torch.stack([top, top + 1, top + gw, top + gw + 1], dim=-1).flatten(1)

    # --- inference ------------------------------------------------------------------------------------

    def _coarse_stage(self, x: torch.Tensor, carry: Carry) -> tuple[torch.Tensor, Carry]:
        coarse = self._coarse_regions(x) if self.hierarchical else self.forward_coarse(x)
        return coarse.pop("logits"), coarse

    def _fine_stage(self, x: torch.Tensor, carry: Carry) -> tuple[torch.Tensor, Carry]:
        if not carry:  # alone (the dense point): every region fine, nothing reused
            return (self.base(x) if self.hierarchical else self.forward_fine(x, None)), {}
        if self.hierarchical:
            # exported or compiled: the region blocks' traceable twin (DGE's; no Python decision on the data)
            mode = "traced" if graph_tracing() else "sparse"
            return self._fine_regions(x, carry, mode), {}
        return self.forward_fine(x, carry), {}

    def forward_at_point(self, x: torch.Tensor) -> DynamicOutput:
        """Batched early exit: the fine stage runs only on images whose coarse confidence is <= eta (at the dense
        point, the fine stage alone)."""
        self.check_input(x)
        out = self.cascade.run_last(x) if self.dense else self.cascade.run(x, [self.eta])
        return DynamicOutput(logits=out.logits, gmacs=out.gmacs, stage=out.exit,
                             extras={"confidence": out.confidence[0]})

    def forward_traceable(self, x: torch.Tensor, point: Mapping[str, torch.Tensor]) -> DynamicOutput:
        """The batched early exit with ``eta`` as a tensor (an exported graph's input); alpha is baked in (at the
        dense point eta is an input that changes nothing)."""
        self.check_input(x)
        out = self.cascade.run_last(x) if self.dense else self.cascade.run_traceable(x, point["eta"].reshape(1))
        return DynamicOutput(logits=out.logits, gmacs=out.gmacs, stage=out.exit)

    def simulated_points(self, collected: dict[str, torch.Tensor]) -> list[OperatingPoint]:
        """The eta sweep; at the dense point, where nothing exits, eta 1 alone."""
        return [{"eta": 1.0}] if self.dense else super().simulated_points(collected)

    def collect(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Both stages on every image, for simulating any eta afterwards (calibration); at the dense point the
        fine stage alone."""
        self.check_input(x)
        if self.dense:
            return {"fine": self.cascade.run_last(x).logits.float()}
        coarse, fine = self.cascade.run_all(x)
        return {"coarse": coarse.float(), "fine": fine.float()}

    def simulate(self, collected: dict[str, torch.Tensor], point: Mapping[str, float]) -> DynamicOutput:
        """What :meth:`forward_dynamic` returns at ``eta = point["eta"]`` (at the alpha collected with)."""
        out = (self.cascade.simulate_last(collected["fine"]) if point.get("dense", self.dense) else
               self.cascade.simulate([collected["coarse"], collected["fine"]], [point.get("eta", self.eta)]))
        return DynamicOutput(logits=out.logits, gmacs=out.gmacs, stage=out.exit,
                             extras={"confidence": out.confidence[0]})

    # --- training -------------------------------------------------------------------------------------

    def forward_train(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        self.check_input(x)
        if self.hierarchical:
            coarse = self._coarse_regions(x)
            coarse["scores"] = coarse["scores"].detach()
            return {"logits": self._fine_regions(x, coarse, "train"), "coarse_logits": coarse["logits"]}
        coarse = self.forward_coarse(x)
        coarse["gca"] = coarse["gca"].detach()
        return {"logits": self.forward_fine(x, coarse), "coarse_logits": coarse["logits"]}

    def method_losses(self, outputs: dict[str, torch.Tensor], labels: torch.Tensor | None,
                      teacher_logits: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        # The coarse output is not an exit the pipeline distils from the original model: as in the paper,
        # it learns from the fine output (coarse_kl), which is what decides the exits.
        target = outputs["logits"].detach().float().softmax(dim=-1)
        log_coarse = outputs["coarse_logits"].float().log_softmax(dim=-1)
        terms = {"coarse_kl": F.kl_div(log_coarse, target, reduction="batchmean")}
        if labels is not None and self.recipe.losses.coarse_ce > 0:
            # labels: class indices, or (B, classes) probabilities when the fine-tune mixes images
            terms["coarse_ce"] = (F.nll_loss(log_coarse, labels) if labels.dim() == 1
                                  else -(labels.float() * log_coarse).sum(-1).mean())
        return terms

    # --- accounting -----------------------------------------------------------------------------------

    def _count_costs(self) -> None:
        """GMACs of the coarse stage and of the fine stage at the current alpha (batch of one image)."""
        with self.counted_execution():
            self._count_cascade_costs(self.cascade)


def _gather(tokens: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return tokens.gather(1, idx.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


class _NoRouter(nn.Module):
    """The router slot of the region path's query blocks: CF-ViT's levels come from the coarse pass (a gate
    override), so the blocks' router call returns zeros at no cost and holds no parameter."""

    def __init__(self, levels: int) -> None:
        super().__init__()
        self.levels = levels

    def forward(self, regions: torch.Tensor) -> torch.Tensor:
        return regions.new_zeros(*regions.shape[:-1], self.levels)
