"""Swin Transformer V2 (timm ``swin_transformer_v2``): Swin's stages of (shifted) window attention over
``(B, H, W, C)`` maps, with three changes the methods meet:

* **cosine attention**: queries and keys are L2-normalised and their product scaled by a learned, clamped
  per-head logit scale (no ``1/sqrt(d)``);
* **continuous position bias**: a small MLP maps the log-spaced relative coordinates of a window to the bias of each
  head, so a window of another size gets its bias from the same weights (timm's ``set_window_size`` recomputes the
  coordinates): nothing is resampled;
* **post-norm residuals**: ``x + norm1(attn(x))`` then ``x + norm2(mlp(x))`` (the anatomy reads
  :attr:`~vitconvert.anatomy.BlockInfo.post_norm`).

DGE reads it as Swin (a block as a batch of windows, :class:`SwinV2Windows`) with the two differences said here:
cosine attention normalises each query row, a pooled query included (it is pooled before the projection, like any
query), and its learned scale is folded into the query (:class:`CosineWindowQueryAttention`); the continuous bias is,
once the MLP has run and ``16 * sigmoid`` applied, a (heads, N, N) table like Swin's, so a pooled query's row is the
mean of its positions' rows. Post-norm blocks are the DGE block's own concern (norms after attention and MLP).

Running at another input size is Swin's (:meth:`vitconvert.backbones.swin.Swin.set_input_size`: windows kept or fitted
to the new maps, through timm's own ``set_input_size``), so this adapter only reads the family differently.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vitconvert.backbones.family import QueryAttention, WindowView
from vitconvert.backbones.swin import Swin, SwinWindows, WindowQueryAttention, as_pair, relative_position_index
from vitconvert.errors import AnatomyError


class CosineWindowQueryAttention(WindowQueryAttention):
    """timm's SwinV2 ``WindowAttention``: q, k and v from the ``qkv`` weight with the separate q/v biases, queries and
    keys L2-normalised per head; the clamped, exponentiated per-head logit scale (times sqrt(head dim), which the
    attention core divides by) is folded into the normalised queries, so the core's logits are timm's
    ``cos(q, k) * scale``. The continuous position bias and the shift mask are :class:`SwinV2Windows`'."""

    def queries(self, qn: torch.Tensor) -> torch.Tensor:
        attn, d = self.attn, self.dim
        q = F.normalize(self.project(qn, slice(0, d)).unflatten(-1, (attn.num_heads, -1)), dim=-1)
        scale = torch.clamp(attn.logit_scale, max=math.log(1.0 / 0.01)).exp().view(-1, 1)  # (heads, 1)
        return (q * (scale * math.sqrt(d // attn.num_heads)).to(q.dtype)).flatten(-2)

    def keys_values(self, xn: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        attn, d = self.attn, self.dim
        b, n, _ = xn.shape
        kv = self.project(xn, slice(d, 3 * d))
        k, v = kv.view(b, n, 2, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        return F.normalize(k, dim=-1), v


class SwinV2Windows(SwinWindows):
    """A ``SwinTransformerV2Block`` as a batch of windows: Swin's, with the continuous position bias as the table.

    A window other than the block's own (CF-ViT's coarse pass: a map smaller than the window is one window of its
    size) gets the bias timm computes for a block built with that window (``WindowAttention.set_window_size``): the
    MLP over the window's log-spaced relative coordinates, normalised by the attention's ``pretrained_window_size``
    when it has one and else by the window itself. So for a model trained at its own window (``pretrained_window_size``
    0) a smaller window's coordinates span the same [-8, 8] as the trained window's, and an offset does not keep the
    bias it had there (unlike Swin's table read at the offsets, :meth:`SwinWindows.relative_bias`); a model fine-tuned
    from a smaller pretraining window keeps its coordinates. This is the base model at that size as timm builds it."""

    tables_keep = False  # the continuous bias runs its MLP on every forward, as timm's block does (and counts)

    def own_relative_bias(self) -> torch.Tensor:
        attn = self.block.attn
        return self._continuous_bias(attn.relative_coords_table, attn.relative_position_index)

    def relative_bias(self, window: tuple[int, int]) -> torch.Tensor:
        """(heads, N, N) the continuous position bias of a ``window``: the block's own (its buffers), or computed
        the way timm computes it for a block built with that window (see the class docstring)."""
        attn = self.block.attn
        if window == as_pair(attn.window_size):
            return self.own_relative_bias()
        buffer = attn.relative_coords_table
        coords = relative_coords(window, as_pair(attn.pretrained_window_size), buffer.device).to(buffer.dtype)
        return self._continuous_bias(coords, relative_position_index(window, window, buffer.device))

    def _continuous_bias(self, coords: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """(1, 2h-1, 2w-1, 2) coordinates and (N, N) index -> (heads, N, N) bias, timm's forward: the MLP, the
        pairs' rows, ``16 * sigmoid``."""
        attn = self.block.attn
        table = attn.cpb_mlp(coords).view(-1, attn.num_heads)
        n = index.shape[0]
        rel = table[index.view(-1)].view(n, n, -1).permute(2, 0, 1)
        return 16 * torch.sigmoid(rel)


def relative_coords(window: tuple[int, int], pretrained: tuple[int, int], device: torch.device) -> torch.Tensor:
    """(1, 2h-1, 2w-1, 2) float32 the log-spaced relative coordinates of a ``window``, as timm's SwinV2
    ``WindowAttention`` makes them (``_make_pair_wise_relative_positions``): each offset divided by ``pretrained - 1``
    when ``pretrained`` is set (its first side > 0) and else by ``window - 1`` (at least 1), times 8, then
    ``sign(t) * log2(|t| + 1) / 3``."""
    axes = [torch.arange(-(w - 1), w, device=device, dtype=torch.float32) for w in window]
    table = torch.stack(torch.meshgrid(*axes, indexing="ij")).permute(1, 2, 0).contiguous().unsqueeze(0)
    norm = pretrained if pretrained[0] > 0 else window
    table[:, :, :, 0] /= max(norm[0] - 1, 1)
    table[:, :, :, 1] /= max(norm[1] - 1, 1)
    table *= 8
    return torch.sign(table) * torch.log2(torch.abs(table) + 1.0) / math.log2(8)


class SwinV2(Swin):
    name = "swinv2"
    description = "SwinV2"
    attention_parts = ("logit_scale", "cpb_mlp")
    attention_needed = "cosine window attention with a continuous position bias"
    post_norm = True

    def query_attention(self, attn: nn.Module, where: str) -> QueryAttention:
        if not (isinstance(getattr(attn, "qkv", None), nn.Linear) and isinstance(getattr(attn, "proj", None), nn.Linear)
                and all(hasattr(attn, n) for n in ("logit_scale", "cpb_mlp", "q_bias", "relative_coords_table"))):
            raise AnatomyError(f"{where}: needs SwinV2 cosine window attention with qkv and proj Linear layers and a "
                               f"continuous position bias (found {type(attn).__name__})")
        return CosineWindowQueryAttention(attn)

    def windows(self, block: nn.Module) -> WindowView | None:
        return SwinV2Windows(block) if hasattr(block, "window_size") and hasattr(block, "shift_size") else None
