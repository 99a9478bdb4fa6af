"""CF-ViT: coarse-to-fine vision transformer (Chen et al., AAAI 2023, arXiv 2203.03821).

Converted from a pretrained ViT/DeiT with a class token. One set of transformer weights serves both
stages; only the position embeddings differ.

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

The operating point is ``eta`` (the knob a user turns; simulated from one pass) and ``alpha`` (changes the
fine stage; calibration explores the recipe's ``explore_alpha`` when given, else keeps ``model.alpha``). At
``eta = 1`` (never exit) and ``alpha = 1`` (re-split everything) the model is exactly the base model on
the full image: that is its full-compute point.

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

Fine-tuning trains both stages at once (fine output: distillation + cross-entropy; coarse output: KL to the
detached fine output). The added parts (coarse position embedding, reuse MLP) may learn at ``new_lr_scale``
times the recipe's rate; in a short recipe on CIFAR-10 10x gave 0.3 points more top-1 at half the
GMACs (``recipes/cfvit.yaml`` records the measured steps).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from timm.layers import resample_abs_pos_embed
from torch import nn

from vitconvert import fx as vfx
from vitconvert.anatomy import Anatomy
from vitconvert.backbones import family_of
from vitconvert.backbones.family import Family
from vitconvert.errors import AnatomyError, UserError
from vitconvert.layers.cascade import Carry, Cascade, Stage
from vitconvert.layers.compiled import graph_tracing
from vitconvert.layers.regions import make_layout
from vitconvert.layers.reuse import FeatureReuse, resize_grid
from vitconvert.layers.scale_conv import dwconv_macs
from vitconvert.layers.sharing import attach
from vitconvert.methods.base import ConvertedModel, DynamicOutput, SimulatesPoints
from vitconvert.methods.dge import Context, DGEBlock, block_costs
from vitconvert.methods.dge.block import read_block
from vitconvert.operating import Knob, OperatingSpace
from vitconvert.recipes import Recipe, Strict
from vitconvert.registry import register_method
from vitconvert.sources import BaseSpec


class CFViTSettings(Strict):
    coarse_grid_ratio: float = Field(0.5, gt=0, lt=1, description="coarse grid side / native grid side")
    alpha: float = Field(0.5, gt=0, le=1, description="fraction of coarse patches re-split in the fine stage")
    gca_beta: float = Field(0.99, ge=0, lt=1, description="EMA factor of global class attention")
    gca_start_block: int = Field(3, ge=0, description="first block (0-based) whose class attention counts")
    eta: float = Field(1.0, ge=0, le=1, description="initial exit threshold (1 = never exit)")
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
    families = ("vit", "pvt_v2")
    not_supported: ClassVar[dict[str, str]] = {
        "eva": "the coarse pass runs the blocks as one chain at half the grid; EVA's blocks take a rotary embedding "
               "computed for the model's own grid",
        "beit": "the coarse pass would index the relative position bias tables on a grid they were not built for "
                "(resampling them is not implemented)",
        "swin": "its blocks run over window maps, which the region path's query blocks do not take yet",
        "swinv2": "its blocks run over window maps, which the region path's query blocks do not take yet",
    }
    description = "CF-ViT coarse-to-fine inference with early exit (ViT/DeiT with a class token, PVT-v2)"
    Settings = CFViTSettings
    Losses = CFViTLosses

    def __init__(self, base: nn.Module, spec: BaseSpec, recipe: Recipe, anatomy: Anatomy) -> None:
        super().__init__(base, spec, recipe, anatomy)
        s: CFViTSettings = self.settings
        family = family_of(anatomy)
        # A model that is one chain of blocks over one token sequence runs the paper's token path (class-token
        # attention); a hierarchical one the region path (see the module docstring).
        self.hierarchical = not family.splits_at_blocks
        if self.hierarchical:
            self._init_regions(base, spec, anatomy, family)
            return
        if not anatomy.extras.get("class_token"):
            pooling = "an attention-pooling head" if anatomy.attn_pool else f"{anatomy.pool} pooling"
            raise UserError(f"cfvit needs a class token (its attention scores the regions); {spec.architecture} "
                            f"has no class token: it pools with {pooling}")
        if anatomy.pool != "token":
            raise UserError(f"cfvit needs class-token pooling; {spec.architecture} pools with {anatomy.pool!r}")
        if s.gca_start_block >= len(anatomy.blocks):
            raise UserError(f"recipe: model.gca_start_block must be < the depth ({len(anatomy.blocks)}), "
                            f"got {s.gca_start_block}")
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

        pos = base.get_parameter(anatomy.pos_embed)
        pos_prefix = anatomy.extras["pos_embed_prefix"]
        self.pos_embed_coarse = nn.Parameter(resample_abs_pos_embed(
            pos.detach(), new_size=list(self.coarse_grid), old_size=list(anatomy.grid),
            num_prefix_tokens=pos_prefix, interpolation="bicubic", antialias=True,
        ))
        dim = anatomy.embed_dim
        hidden = int(dim * s.reuse_mlp_ratio)
        self.reuse = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        nn.init.zeros_(self.reuse[-1].weight)
        nn.init.zeros_(self.reuse[-1].bias)

        # fx graphs share the base model's modules; they are kept out of the module tree so the state dict
        # holds every weight exactly once, under its timm name.
        embed, head = vfx.split_at_blocks(base, anatomy.block_paths)
        graphs = {
            "embed": vfx.lift_parameter(embed, anatomy.pos_embed, "pos_embed"),
            "head": head,
            "blocks": [base.get_submodule(p) for p in anatomy.block_paths],
            "tapped": [vfx.tap_class_attention(base.get_submodule(p)) if i >= s.gca_start_block else None
                       for i, p in enumerate(anatomy.block_paths)],
            "final_norm": base.get_submodule(anatomy.final_norm) if anatomy.final_norm else nn.Identity(),
        }
        # Not modules: the stages call the graphs above, whose parameters are registered once under base.
        attach(self, _graphs=graphs, cascade=Cascade([Stage("coarse", self._coarse_stage, 0.0),
                                                      Stage("fine", self._fine_stage, 0.0)]))
        self.eta = s.eta
        self._alpha = s.alpha
        self._count_costs()

    # --- hierarchical backbones: regions ----------------------------------------------------------------

    def _init_regions(self, base: nn.Module, spec: BaseSpec, anatomy: Anatomy, family: Family) -> None:
        """The region path (see the module docstring): every block becomes a two-level query block (2x2 regions,
        fine or coarse queries) whose levels come from the coarse pass; the coarse pass is the base model itself."""
        s: CFViTSettings = self.settings
        arch = spec.architecture
        if s.coarse_grid_ratio != 0.5:
            raise UserError(f"cfvit on {family.description} refines each coarse region 2x2: coarse_grid_ratio must "
                            f"be 0.5, got {s.coarse_grid_ratio}")
        if family.block_layout != "tokens":
            raise UserError(f"cfvit needs a class token or blocks over a token sequence; {arch} ({family.description})"
                            " runs its blocks over window maps")
        if anatomy.pool != "avg" or len(anatomy.head) != 1 or not isinstance(base.get_submodule(anatomy.head[0]),
                                                                             nn.Linear):
            raise UserError(f"cfvit without a class token scores regions by their share of the predicted logit, which "
                            f"needs average pooling and one linear head; {arch} pools with {anatomy.pool!r}")
        if not anatomy.stages[-1].norm:
            raise UserError(f"cfvit without a class token reads the last stage's normalised tokens; {arch} has no "
                            "norm after its last stage")
        step = family.size_step(anatomy)
        h, w = anatomy.img_size
        if h % (2 * step) or w % (2 * step):
            raise UserError(f"cfvit runs the coarse pass at half the input size, which must keep whole maps: "
                            f"{arch} at {h}x{w} px needs sides that are multiples of {2 * step}")
        self.coarse_img_size = (h // 2, w // 2)
        self.num_prefix = 0
        ctx = Context(2, [2, 1], "packed", "auto", 1.0)
        ctx.gate_override = self._override
        stand_in = _NoRouter(2)
        self._block_stage: dict[int, int] = {}
        try:
            for info in anatomy.blocks:
                block = base.get_submodule(info.path)
                parts = read_block(block, f"cfvit: block {info.path}", family)
                grid = anatomy.stages[info.stage].grid
                if grid[0] % 2 or grid[1] % 2:
                    # 2x2 regions do not tile the map: its border regions would be short, so the fine pass's cost
                    # would depend on which regions it refines, while a cascade charges one cost per stage. Such a
                    # stage (PVT-v2's last at 224 px: 7x7) runs at full resolution, its base blocks unchanged.
                    continue
                lay = make_layout(grid, 2, ctx.sizes, torch.device("cpu"))
                costs: dict[str, Any] = block_costs(
                    block.get_submodule(parts.norm1), block.get_submodule(parts.norm2), parts.attention,
                    block.get_submodule(parts.mlp), parts.conv, info.tokens, grid)
                costs["router"] = 0.0
                costs["level_nq"] = [float(v) for v in lay.nq.sum(0).tolist()]
                costs["level_conv"] = [0.0, 0.0]
                if parts.conv is not None:
                    gates = torch.arange(2).view(2, 1).expand(2, lay.num_regions)
                    costs["level_conv"] = dwconv_macs(parts.conv.dwconv, gates, lay).tolist()
                base.set_submodule(info.path, DGEBlock(block, parts, info.index, 0, grid, stand_in, ctx, costs,
                                                       family))
                self._block_stage[info.index] = info.stage
        except AnatomyError as e:
            raise UserError(str(e).replace("dge", "cfvit")) from None
        first = anatomy.blocks[0]
        last_stage = anatomy.stages[-1]
        self.reuse = FeatureReuse(last_stage.dim, first.dim, hidden=int(first.dim * s.reuse_mlp_ratio))
        # Taps (not registered as modules): the last stage's normalised tokens of the coarse pass, and the reuse
        # update added to the fine pass's first block input.
        attach(self, _ctx=ctx, _tap=None, _pending=None, _fine_gates={})
        base.get_submodule(last_stage.norm).register_forward_hook(self._tap_hook)
        base.get_submodule(first.path).register_forward_pre_hook(self._reuse_hook)
        self.stage_grids = [st.grid for st in anatomy.stages]
        # 2x2 regions per stage; None for a stage that runs at full resolution (a map they do not tile)
        self.region_grids: list[tuple[int, int] | None] = [
            None if g[0] % 2 or g[1] % 2 else (g[0] // 2, g[1] // 2) for g in self.stage_grids]
        if not self._block_stage:
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
        attach(self, cascade=Cascade([Stage("coarse", self._coarse_stage, 0.0), Stage("fine", self._fine_stage, 0.0)]))
        self.eta = s.eta
        self._alpha = s.alpha
        self._count_costs()

    _ctx: Context

    def _tap_hook(self, module: nn.Module, args: Any, output: torch.Tensor) -> None:
        if self._tap is not None:
            self._tap["tokens"] = output

    def _reuse_hook(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        if self._pending is None:
            return None
        x = args[0] + self._pending.to(args[0].dtype)
        attach(self, _pending=None)
        return (x, *args[1:])

    def _override(self, index: int, batch: int, regions: int, device: torch.device) -> torch.Tensor:
        gates = self._fine_gates[self._block_stage[index]]
        assert gates.shape == (batch, regions), (gates.shape, batch, regions)
        return gates

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
        low = x.device.type == "cpu" and x.dtype in (torch.float16, torch.bfloat16)
        xc = F.interpolate(x.float() if low else x, size=self.coarse_img_size, mode=self.settings.resize,
                           align_corners=False if self.settings.resize != "area" else None,
                           antialias=self.settings.resize != "area").to(x.dtype)
        attach(self, _tap={})
        try:
            logits = self.base(xc)
            tokens = self._tap["tokens"]
        finally:
            attach(self, _tap=None)
        # Informativeness: each token's share of the predicted class's logit. The head is linear over the mean of
        # these tokens, so the logit is exactly the mean of the per-token contributions w_pred . t_i (plus bias).
        head = self.base.get_submodule(self.anatomy.head[0])
        w = head.weight.index_select(0, logits.argmax(dim=-1))  # (B, C)
        scores = (tokens.float() * w.float().unsqueeze(1)).sum(-1).reshape(x.shape[0], *self.coarse_final_grid)
        return {"logits": logits, "tokens": tokens, "scores": scores}

    def _fine_regions(self, x: torch.Tensor, coarse: Mapping[str, torch.Tensor], mode: str) -> torch.Tensor:
        """The fine pass: each block's queries at full resolution in the chosen regions and one per 2x2 region
        elsewhere (the coarse pass's final features added to the first block's input through the reuse layer)."""
        gates = self.region_gates(coarse["scores"])
        reuse = self.reuse(coarse["tokens"], 0, self.coarse_final_grid, self.stage_grids[0])
        attach(self, _fine_gates=dict(enumerate(gates)), _pending=reuse)
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
        ))

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
        return {"pos_embed_coarse": self.settings.new_lr_scale, "reuse": self.settings.new_lr_scale}

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
        # The antialiased resize has no fp16/bf16 kernel on the CPU: resize in fp32, go on in the input's dtype.
        low = x.device.type == "cpu" and x.dtype in (torch.float16, torch.bfloat16)
        xc = F.interpolate(x.float() if low else x, size=self.coarse_img_size, mode=self.settings.resize,
                           align_corners=False if self.settings.resize != "area" else None,
                           antialias=self.settings.resize != "area").to(x.dtype)
        tokens = g["embed"](xc, self.pos_embed_coarse)
        embedded = tokens
        beta = self.settings.gca_beta
        # Global class attention accumulates in fp32 whatever the model's dtype or autocast: in bf16 the
        # EMA's small steps round away and ties reorder which patches are refined.
        gca = torch.zeros(x.shape[0], tokens.shape[1] - self.num_prefix, device=x.device, dtype=torch.float32)
        for block, tapped in zip(g["blocks"], g["tapped"], strict=True):
            if tapped is None:
                tokens = block(tokens)
            else:
                tokens, attn = tapped(tokens)
                gca = beta * gca + (1 - beta) * attn[:, :, self.num_prefix:].float().mean(dim=1)
        return {"logits": g["head"](tokens), "tokens": tokens, "gca": gca, "embedded": embedded}

    def forward_fine(self, x: torch.Tensor, coarse: dict[str, torch.Tensor]) -> torch.Tensor:
        """Fine stage for the images in ``x`` given their coarse-stage results; returns logits."""
        g = self._g
        p = self.num_prefix
        fine = g["embed"](x, self.base.get_parameter(self.anatomy.pos_embed))
        b, _, c = fine.shape
        ch, cw = self.coarse_grid
        reuse = self.reuse(g["final_norm"](coarse["tokens"])[:, p:])  # (B, Nc, C)
        reuse = reuse.transpose(1, 2).reshape(b, c, ch, cw)
        reuse = F.interpolate(reuse, scale_factor=2, mode="nearest").flatten(2).transpose(1, 2)
        patches = fine[:, p:] + reuse
        n_coarse = ch * cw
        k = math.ceil(self.alpha * n_coarse)
        if k >= n_coarse:
            seq = torch.cat([fine[:, :p], patches], dim=1)
        else:
            order = coarse["gca"].argsort(dim=1, descending=True)
            chosen = order[:, :k].sort(dim=1).values
            kept = order[:, k:].sort(dim=1).values
            seq = torch.cat([
                fine[:, :p],
                _gather(patches, self.fine_indices(chosen)),
                _gather(coarse["embedded"][:, p:], kept),
            ], dim=1)
        for block in g["blocks"]:
            seq = block(seq)
        return g["head"](seq)

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
        if self.hierarchical:
            # exported or compiled: the region blocks' traceable twin (DGE's; no Python decision on the data)
            mode = "traced" if graph_tracing() else "sparse"
            return self._fine_regions(x, carry, mode), {}
        return self.forward_fine(x, carry), {}

    def forward_at_point(self, x: torch.Tensor) -> DynamicOutput:
        """Batched early exit: the fine stage runs only on images whose coarse confidence is <= eta."""
        self.check_input(x)
        out = self.cascade.run(x, [self.eta])
        return DynamicOutput(logits=out.logits, gmacs=out.gmacs, stage=out.exit,
                             extras={"confidence": out.confidence[0]})

    def forward_traceable(self, x: torch.Tensor, point: Mapping[str, torch.Tensor]) -> DynamicOutput:
        """The batched early exit with ``eta`` as a tensor (an exported graph's input); alpha is baked in."""
        out = self.cascade.run_traceable(self.check_input(x), point["eta"].reshape(1))
        return DynamicOutput(logits=out.logits, gmacs=out.gmacs, stage=out.exit)

    def collect(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Both stages on every image, for simulating any eta afterwards (calibration)."""
        self.check_input(x)
        coarse, fine = self.cascade.run_all(x)
        return {"coarse": coarse.float(), "fine": fine.float()}

    def simulate(self, collected: dict[str, torch.Tensor], point: Mapping[str, float]) -> DynamicOutput:
        """What :meth:`forward_dynamic` returns at ``eta = point["eta"]`` (at the alpha collected with)."""
        out = self.cascade.simulate([collected["coarse"], collected["fine"]], [point.get("eta", self.eta)])
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
            terms["coarse_ce"] = F.nll_loss(log_coarse, labels)
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
