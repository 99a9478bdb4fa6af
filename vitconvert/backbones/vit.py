"""ViT / DeiT / DeiT-III (timm ``vision_transformer`` and ``deit``): one stage of global attention blocks
over a non-overlapping patch grid plus prefix tokens (class, distillation, registers)."""

from __future__ import annotations

from torch import nn

from vitconvert.anatomy import Anatomy

FAMILY = "vit"
DESCRIPTION = "ViT/DeiT"


def read(model: nn.Module, draft: Anatomy) -> list[str]:
    missing = []
    if len(draft.stages) != 1:
        missing.append(f"a single stage of blocks (found {len(draft.stages)})")
    conv = _patch_conv(model, draft)
    if conv is None or tuple(conv.kernel_size) != tuple(conv.stride):
        missing.append("a non-overlapping patch embedding")
    grid_tokens = draft.grid[0] * draft.grid[1]
    if any(b.tokens != grid_tokens + draft.num_prefix_tokens for b in draft.blocks):
        missing.append("blocks over prefix tokens + the patch grid")
    for b in draft.blocks:
        attn = model.get_submodule(b.attn)
        if hasattr(attn, "window_size") or hasattr(attn, "sr") or hasattr(attn, "relative_position_bias_table"):
            missing.append("global attention")
            break
    if draft.pos_embed is None:
        missing.append("an absolute position embedding")
    if missing:
        return missing
    pos = model.get_parameter(draft.pos_embed)
    draft.extras["pos_embed_prefix"] = int(pos.shape[1]) - grid_tokens  # 0 for no_embed_class models
    draft.extras["class_token"] = any(p.endswith("cls_token") for p in draft.prefix_tokens)
    for b in draft.blocks:
        b.attn_kind = "global"
    return []


def _patch_conv(model: nn.Module, draft: Anatomy) -> nn.Conv2d | None:
    mod = model.get_submodule(draft.patch_embed)
    return mod if isinstance(mod, nn.Conv2d) else next((m for m in mod.modules() if isinstance(m, nn.Conv2d)), None)
