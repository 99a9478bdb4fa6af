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

from torch import nn

from vitconvert.anatomy import Anatomy
from vitconvert.backbones.swin import Swin, _pair


class SwinV2(Swin):
    name = "swinv2"
    description = "SwinV2"

    def read(self, model: nn.Module, draft: Anatomy) -> list[str]:
        missing = []
        if len(draft.stages) < 2:
            missing.append("several stages")
        attns = [model.get_submodule(b.attn) for b in draft.blocks]
        if not all(hasattr(a, "window_size") and hasattr(a, "logit_scale") and hasattr(a, "cpb_mlp") for a in attns):
            missing.append("cosine window attention with a continuous position bias")
        blocks = [model.get_submodule(b.path) for b in draft.blocks]
        if not all(hasattr(b, "shift_size") for b in blocks):
            missing.append("(shifted) window blocks")
        if not all(b.post_norm for b in draft.blocks):
            missing.append("post-norm blocks")
        if missing:
            return missing
        for b in draft.blocks:
            b.attn_kind = "window"
        draft.extras["window_size"] = [list(_pair(model.get_submodule(draft.blocks[s.blocks[0]].path).window_size))
                                       for s in draft.stages]
        draft.extras["shift_size"] = [list(_pair(m.shift_size)) for m in blocks]
        return []
