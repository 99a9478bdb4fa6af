"""PVT-v2 (timm ``pvt_v2``): four stages of spatial-reduction attention blocks, overlapping convolutional
patch embeddings between stages, and a depthwise convolution inside every MLP."""

from __future__ import annotations

from torch import nn

from vitconvert.anatomy import Anatomy

FAMILY = "pvt_v2"
DESCRIPTION = "PVT-v2"


def read(model: nn.Module, draft: Anatomy) -> list[str]:
    missing = []
    if len(draft.stages) < 2:
        missing.append("several stages")
    if any(s.index > 0 and s.downsample is None for s in draft.stages):
        missing.append("a convolutional downsampling layer at each later stage")
    attn_ok = all(hasattr(model.get_submodule(b.attn), "sr") or hasattr(model.get_submodule(b.attn), "pool")
                  for b in draft.blocks)
    if not attn_ok:
        missing.append("spatial-reduction attention")
    dw = all(any(isinstance(m, nn.Conv2d) and m.groups > 1 for m in model.get_submodule(b.mlp).modules())
             for b in draft.blocks)
    if not dw:
        missing.append("a depthwise convolution in each MLP")
    if missing:
        return missing
    for b in draft.blocks:
        b.attn_kind = "spatial_reduction"
    draft.extras["sr_ratios"] = [_sr_ratio(model.get_submodule(draft.blocks[s.blocks[0]].attn))
                                 for s in draft.stages]
    return []


def _sr_ratio(attn: nn.Module) -> int:
    sr = getattr(attn, "sr", None)
    return int(sr.stride[0]) if isinstance(sr, nn.Conv2d) else 1
