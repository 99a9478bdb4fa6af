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

Fine-tuning trains both stages at once (fine output: distillation + cross-entropy; coarse output: KL to the
detached fine output). The added parts (coarse position embedding, reuse MLP) may learn at ``new_lr_scale``
times the recipe's rate; in a short recipe on CIFAR-10 10x gave 0.3 points more top-1 at half the
GMACs (``recipes/cfvit.yaml`` records the measured steps).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from timm.layers import resample_abs_pos_embed
from torch import nn

from vitconvert import fx as vfx
from vitconvert.anatomy import Anatomy
from vitconvert.errors import UserError
from vitconvert.layers.cascade import Carry, Cascade, Stage
from vitconvert.layers.sharing import attach
from vitconvert.methods.base import ConvertedModel, DynamicOutput, SimulatesPoints
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
    families = ("vit",)
    not_supported: ClassVar[dict[str, str]] = {
        "eva": "the coarse pass runs the blocks as one chain at half the grid; EVA's blocks take a rotary embedding "
               "computed for the model's own grid",
        "beit": "the coarse pass would index the relative position bias tables on a grid they were not built for "
                "(resampling them is not implemented)",
        "pvt_v2": "no class token to score regions with",
        "swin": "no class token to score regions with",
        "swinv2": "no class token to score regions with",
    }
    description = "CF-ViT coarse-to-fine inference with early exit (ViT/DeiT with a class token)"
    Settings = CFViTSettings
    Losses = CFViTLosses

    def __init__(self, base: nn.Module, spec: BaseSpec, recipe: Recipe, anatomy: Anatomy) -> None:
        super().__init__(base, spec, recipe, anatomy)
        s: CFViTSettings = self.settings
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
        coarse = self.forward_coarse(x)
        return coarse.pop("logits"), coarse

    def _fine_stage(self, x: torch.Tensor, carry: Carry) -> tuple[torch.Tensor, Carry]:
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
        self._count_cascade_costs(self.cascade)


def _gather(tokens: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return tokens.gather(1, idx.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
