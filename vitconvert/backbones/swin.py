"""Swin Transformer v1 (timm ``swin_transformer``): stages of (shifted) window attention blocks with a
relative position bias, patch merging between stages."""

from __future__ import annotations

from torch import nn

from vitconvert.anatomy import Anatomy

FAMILY = "swin"
DESCRIPTION = "Swin"


def read(model: nn.Module, draft: Anatomy) -> list[str]:
    missing = []
    if len(draft.stages) < 2:
        missing.append("several stages")
    attns = [model.get_submodule(b.attn) for b in draft.blocks]
    if not all(hasattr(a, "window_size") and hasattr(a, "relative_position_bias_table") for a in attns):
        missing.append("window attention with a relative position bias")
    blocks = [model.get_submodule(b.path) for b in draft.blocks]
    if not all(hasattr(b, "shift_size") for b in blocks):
        missing.append("(shifted) window blocks")
    if missing:
        return missing
    for b in draft.blocks:
        b.attn_kind = "window"
    draft.extras["window_size"] = [list(_pair(model.get_submodule(draft.blocks[s.blocks[0]].path).window_size))
                                   for s in draft.stages]
    draft.extras["shift_size"] = [list(_pair(m.shift_size)) for m in blocks]
    return []


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))
