"""ViT / DeiT / DeiT-III (timm ``vision_transformer`` and ``deit``): one stage of global attention blocks over a
non-overlapping patch grid plus prefix tokens (class, distillation, registers).

Its attention (timm's ``Attention``: one fused qkv projection, optional q/k norms, scale norm and gate) reads as a
:class:`~vitconvert.backbones.family.QueryAttention` by splitting the fused weight into its query and key/value rows.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vitconvert.anatomy import Anatomy
from vitconvert.backbones.family import Family, QueryAttention, norm_cost
from vitconvert.errors import AnatomyError, UserError
from vitconvert.layers.costs import attention_macs, linear_macs


class FusedQKVAttention(QueryAttention):
    """timm's ``Attention`` (fused ``qkv``): the query rows of the weight project the queries, the rest the keys and
    values of every token."""

    @property
    def width(self) -> int:
        return int(self.attn.qkv.in_features)

    @property
    def dim(self) -> int:
        return int(self.attn.num_heads * self.attn.head_dim)

    def queries(self, qn: torch.Tensor) -> torch.Tensor:
        attn, d = self.attn, self.dim
        w, b = attn.qkv.weight, attn.qkv.bias
        q = F.linear(qn, w[:d], b[:d] if b is not None else None)
        if not isinstance(attn.q_norm, nn.Identity):
            q = attn.q_norm(q.unflatten(-1, (attn.num_heads, -1))).flatten(-2)
        return q

    def keys_values(self, xn: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        attn, d = self.attn, self.dim
        b, n, _ = xn.shape
        w, bias = attn.qkv.weight, attn.qkv.bias
        kv = F.linear(xn, w[d:], bias[d:] if bias is not None else None)
        k, v = kv.view(b, n, 2, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        return attn.k_norm(k), v

    def output(self, o: torch.Tensor, qn: torch.Tensor) -> torch.Tensor:
        attn = self.attn
        o = attn.norm(o)
        if getattr(attn, "gate", None) is not None:
            o = o * attn.gate(qn).sigmoid()
        return attn.proj_drop(attn.proj(o))

    def key_tokens(self, tokens: int, grid: tuple[int, int]) -> int:
        return tokens

    def query_macs(self, keys: int) -> float:
        attn, c, d = self.attn, self.width, self.dim
        gate = linear_macs(1, c, d) if getattr(attn, "gate", None) is not None else 0.0
        return (linear_macs(1, c, d) + attn.num_heads * norm_cost(attn.q_norm, attn.head_dim)
                + attention_macs(1, keys, d, d) + norm_cost(attn.norm, d) + gate + linear_macs(1, d, c))

    def kv_macs(self, tokens: int, grid: tuple[int, int]) -> float:
        attn = self.attn
        return linear_macs(tokens, self.width, 2 * self.dim) + tokens * attn.num_heads * norm_cost(attn.k_norm,
                                                                                                    attn.head_dim)


class ViT(Family):
    name = "vit"
    description = "ViT/DeiT"
    block_layout = "tokens"
    splits_at_blocks = True
    global_attention = True

    def read(self, model: nn.Module, draft: Anatomy) -> list[str]:
        missing = patch_grid_stage_gaps(model, draft)
        grid_tokens = draft.grid[0] * draft.grid[1]
        for b in draft.blocks:
            attn = model.get_submodule(b.attn)
            if hasattr(attn, "window_size") or hasattr(attn, "sr") or hasattr(attn, "relative_position_bias_table"):
                missing.append("global attention")
                break
        if draft.pos_embed is None:
            missing.append("an absolute position embedding")
        if any(b.shared_inputs for b in draft.blocks):
            missing.append("blocks called on the tokens alone")
        if missing:
            return missing
        pos = model.get_parameter(draft.pos_embed)
        draft.extras["pos_embed_prefix"] = int(pos.shape[1]) - grid_tokens  # 0 for no_embed_class models
        draft.extras["class_token"] = any(p.endswith("cls_token") for p in draft.prefix_tokens)
        for b in draft.blocks:
            b.attn_kind = "global"
        return []

    def block_grid(self, x: torch.Tensor, args: tuple[Any, ...], kwargs: dict[str, Any],
                   default: tuple[int, int] | None) -> tuple[int, int]:
        """The stage's patch grid; a block called with an attention mask is refused (no method supports one)."""
        if (args and args[0] is not None) or kwargs.get("attn_mask") is not None:
            raise UserError("attention masks are not supported by converted ViT blocks")
        return super().block_grid(x, args, kwargs, default)

    def query_attention(self, attn: nn.Module, where: str) -> QueryAttention:
        if not isinstance(getattr(attn, "qkv", None), nn.Linear) or not hasattr(attn, "num_heads") \
                or not hasattr(attn, "head_dim"):
            raise AnatomyError(f"{where}: needs timm's Attention with a fused qkv Linear (found {type(attn).__name__})")
        return FusedQKVAttention(attn)

    def set_input_size(self, model: nn.Module, size: tuple[int, int], anatomy: Anatomy,
                       keep_windows: bool = True) -> dict[str, Any]:
        """timm's ``set_input_size``: the position embeddings are resampled to the new grid."""
        return timm_set_input_size(model, size)


def patch_grid_stage_gaps(model: nn.Module, draft: Anatomy) -> list[str]:
    """What a ViT-like model lacks of one stage of blocks over prefix tokens + a non-overlapping patch grid (the
    shape every token-sequence family here shares)."""
    missing = []
    if len(draft.stages) != 1:
        missing.append(f"a single stage of blocks (found {len(draft.stages)})")
    conv = _patch_conv(model, draft)
    if conv is None or tuple(conv.kernel_size) != tuple(conv.stride):
        missing.append("a non-overlapping patch embedding")
    grid_tokens = draft.grid[0] * draft.grid[1]
    if any(b.tokens != grid_tokens + draft.num_prefix_tokens for b in draft.blocks):
        missing.append("blocks over prefix tokens + the patch grid")
    return missing


def timm_set_input_size(model: nn.Module, size: tuple[int, int]) -> dict[str, Any]:
    """Run ``model`` at ``size`` through timm's own ``set_input_size`` (what depends on the grid rebuilt); returns the
    constructor argument that now differs."""
    if not hasattr(model, "set_input_size"):
        raise UserError(f"{type(model).__name__} cannot change its input size (no set_input_size in timm)")
    model.set_input_size(img_size=size)
    return {"img_size": list(size)}


def _patch_conv(model: nn.Module, draft: Anatomy) -> nn.Conv2d | None:
    mod = model.get_submodule(draft.patch_embed)
    return mod if isinstance(mod, nn.Conv2d) else next((m for m in mod.modules() if isinstance(m, nn.Conv2d)), None)
