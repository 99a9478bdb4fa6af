"""Swin Transformer V2 (timm ``swin_transformer_v2``): Swin's stages of (shifted) window attention over
``(B, H, W, C)`` maps, with three changes the methods meet:

* **cosine attention**: queries and keys are L2-normalised and their product scaled by a learned, clamped
  per-head logit scale (no ``1/sqrt(d)``);
* **continuous position bias**: a small MLP maps the log-spaced relative coordinates of a window to the bias of each
  head, so a window of another size gets its bias from the same weights (timm's ``set_window_size`` recomputes the
  coordinates): nothing is resampled;
* **post-norm residuals**: ``x + norm1(attn(x))`` then ``x + norm2(mlp(x))`` (the anatomy reads
  :attr:`~vitconvert.anatomy.BlockInfo.post_norm`).

Running at another input size is Swin's (:meth:`vitconvert.backbones.swin.Swin.set_input_size`: windows kept or fitted
to the new maps, through timm's own ``set_input_size``), so this adapter only reads the family differently.
"""

from __future__ import annotations

from vitconvert.backbones.swin import Swin


class SwinV2(Swin):
    name = "swinv2"
    description = "SwinV2"
    attention_parts = ("logit_scale", "cpb_mlp")
    attention_needed = "cosine window attention with a continuous position bias"
    post_norm = True
