"""PVT-v2 (timm ``pvt_v2``): four stages of spatial-reduction attention blocks, overlapping convolutional patch
embeddings between stages, and a depthwise convolution inside every MLP.

Said once here for every method: blocks take their map's size as ``feat_size``; attention reads queries from every
token but keys and values from the map reduced by a strided convolution (``sr_ratio`` > 1, then a LayerNorm) or, in
the ``_li`` models, average-pooled to 7x7 first (:class:`SpatialReductionAttention`); the MLP holds a 3x3 depthwise
convolution over the map (:class:`~vitconvert.backbones.family.ConvMlp`). The models take any input size.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from vitconvert.anatomy import Anatomy
from vitconvert.backbones.family import ConvMlp, Family, QueryAttention, norm_cost, total_stride
from vitconvert.errors import AnatomyError
from vitconvert.layers.costs import attention_macs, conv_macs, linear_macs


class SpatialReductionAttention(QueryAttention):
    """PVT-v2's attention: ``q`` on the query rows; ``kv`` on the token map after its spatial reduction."""

    @property
    def width(self) -> int:
        return int(self.attn.q.in_features)

    @property
    def dim(self) -> int:
        return int(self.attn.q.out_features)

    @property
    def keys_are_queries(self) -> bool:
        return getattr(self.attn, "sr", None) is None and getattr(self.attn, "pool", None) is None

    def queries(self, qn: torch.Tensor) -> torch.Tensor:
        return self.attn.q(qn)

    def keys_values(self, xn: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        attn = self.attn
        b, _, c = xn.shape
        if getattr(attn, "pool", None) is not None:
            m = xn.permute(0, 2, 1).reshape(b, c, grid[0], grid[1])
            r = attn.act(attn.norm(attn.sr(attn.pool(m)).reshape(b, c, -1).permute(0, 2, 1)))
        elif getattr(attn, "sr", None) is not None:
            m = xn.permute(0, 2, 1).reshape(b, c, grid[0], grid[1])
            r = attn.norm(attn.sr(m).reshape(b, c, -1).permute(0, 2, 1))
        else:
            r = xn
        kv = attn.kv(r).reshape(b, -1, 2, attn.num_heads, c // attn.num_heads).permute(2, 0, 3, 1, 4)
        k, v = kv.unbind(0)
        return k, v

    def output(self, o: torch.Tensor, qn: torch.Tensor) -> torch.Tensor:
        return self.attn.proj_drop(self.attn.proj(o))

    def key_tokens(self, tokens: int, grid: tuple[int, int]) -> int:
        attn = self.attn
        if getattr(attn, "pool", None) is not None:
            size = attn.pool.output_size
            return math.prod((size, size) if isinstance(size, int) else size)
        if getattr(attn, "sr", None) is not None:
            sr: nn.Conv2d = attn.sr
            return ((grid[0] - sr.kernel_size[0]) // sr.stride[0] + 1) * ((grid[1] - sr.kernel_size[1]) // sr.stride[1]
                                                                         + 1)
        return tokens

    def query_macs(self, keys: int) -> float:
        c, d = self.width, self.dim
        return linear_macs(1, c, d) + attention_macs(1, keys, d, d) + linear_macs(1, d, c)

    def kv_macs(self, tokens: int, grid: tuple[int, int]) -> float:
        attn, c = self.attn, self.width
        keys = self.key_tokens(tokens, grid)
        reduce = 0.0
        if getattr(attn, "sr", None) is not None:  # the reduction's convolution (1x1 after the pool) and its norm
            reduce = conv_macs(keys, attn.sr) + keys * norm_cost(attn.norm, c)
        return reduce + linear_macs(keys, c, 2 * self.dim)


class PVTv2(Family):
    name = "pvt_v2"
    description = "PVT-v2"
    block_layout = "tokens"

    def read(self, model: nn.Module, draft: Anatomy) -> list[str]:
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

    def block_grid(self, x: torch.Tensor, args: tuple[Any, ...], kwargs: dict[str, Any],
                   default: tuple[int, int] | None) -> tuple[int, int]:
        """The map size the block is given (``feat_size``): the same block runs on any input size."""
        feat = args[0] if args else kwargs["feat_size"]
        return int(feat[0]), int(feat[1])

    def query_attention(self, attn: nn.Module, where: str) -> QueryAttention:
        if not all(isinstance(getattr(attn, n, None), nn.Linear) for n in ("q", "kv", "proj")):
            raise AnatomyError(f"{where}: needs PVT-v2 attention with q, kv and proj Linear layers")
        return SpatialReductionAttention(attn)

    def mlp_conv(self, mlp: nn.Module, where: str) -> ConvMlp:
        if not all(hasattr(mlp, n) for n in ("fc1", "dwconv", "fc2", "act")):
            raise AnatomyError(f"{where}: needs PVT-v2's MLP (fc1, dwconv, act, fc2)")
        dw = mlp.dwconv
        if not (isinstance(dw, nn.Conv2d) and dw.kernel_size == (3, 3) and dw.stride == (1, 1)
                and dw.padding == (1, 1) and dw.dilation == (1, 1) and dw.groups == dw.in_channels == dw.out_channels):
            raise AnatomyError(f"{where}: needs PVT-v2's 3x3 depthwise convolution (stride 1, padding 1)")
        return ConvMlp(fc1=mlp.fc1, relu=getattr(mlp, "relu", nn.Identity()), dwconv=dw, act=mlp.act,
                       drop=getattr(mlp, "drop", nn.Identity()), fc2=mlp.fc2)

    def set_input_size(self, model: nn.Module, size: tuple[int, int], anatomy: Anatomy,
                       keep_windows: bool = True) -> dict[str, Any]:
        """Nothing to change: the overlapping strided convolutions take any size (no constructor argument differs)."""
        return {}

    def size_step(self, anatomy: Anatomy) -> int:
        """Half the total stride (16 px for four stages with patch 4): whole maps up to the third stage."""
        return max(anatomy.patch_size[0], total_stride(anatomy) // 2)


def _sr_ratio(attn: nn.Module) -> int:
    sr = getattr(attn, "sr", None)
    return int(sr.stride[0]) if isinstance(sr, nn.Conv2d) else 1
