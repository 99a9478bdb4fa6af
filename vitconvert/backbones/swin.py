"""Swin Transformer v1 (timm ``swin_transformer``): stages of (shifted) window attention blocks with a relative
position bias over ``(B, H, W, C)`` maps, patch merging between stages.

Said once here for every method: the windows and shifts of each stage (``extras``), how a Swin model runs at
another input size, keeping its windows (and so its relative-position tables) or fitting them to the new maps
(:meth:`Swin.set_input_size`), and a block read as a batch of windows (:class:`SwinWindows`): the cyclic shift and
window partition, queries apart from keys inside each window (:class:`WindowQueryAttention`), and the relative
position bias and shift mask of query rows that stand for several positions.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import nn

from vitconvert.anatomy import Anatomy
from vitconvert.backbones.family import Family, PlainQKVAttention, QueryAttention, WindowView, total_stride
from vitconvert.errors import AnatomyError, UserError


class WindowQueryAttention(PlainQKVAttention):
    """timm's ``WindowAttention`` on the tokens of windows (a batch of windows, :class:`SwinWindows`): a plain fused
    ``qkv`` attention whose keys and values are every token of the window. The relative position bias and the shift
    mask are not here: they depend on which positions a query stands for (:meth:`SwinWindows.bias`)."""


class SwinWindows(WindowView):
    """A ``SwinTransformerBlock`` as a batch of windows: the map rolled by the block's shift, cut into its windows
    (timm's ``window_partition`` order), and back. The bias of a query row is the mean of its positions' rows of the
    relative position bias (the principled choice: exact for one position), plus the shift mask's row of its
    positions, which a row may only take when all its positions lie in one masked region (:meth:`bias` says which).

    On a map other than the one the block was built for (CF-ViT's coarse pass: the model on the half-size image) the
    block takes the windows timm's rule gives a block built for that map: a side no longer than the window is one
    window, not shifted. A smaller window reads the relative position bias of its offsets from the block's own table
    (they are a subset of the table's), not a resampled table: the bias of every pair of positions is the one the
    pretrained model learned for that offset."""

    def window(self, hw: tuple[int, int]) -> tuple[int, int]:
        w = as_pair(self.block.window_size)
        return min(w[0], hw[0]), min(w[1], hw[1])

    def native(self, hw: tuple[int, int]) -> bool:
        res = getattr(self.block, "input_resolution", None)
        return res is None or as_pair(res) == (int(hw[0]), int(hw[1]))

    def _shift(self, hw: tuple[int, int]) -> tuple[int, int]:
        w, s = self.window(hw), as_pair(self.block.shift_size)
        return (0 if hw[0] <= w[0] else s[0]), (0 if hw[1] <= w[1] else s[1])

    def partition(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        sh, sw = self._shift((h, w))
        if sh or sw:
            x = torch.roll(x, shifts=(-sh, -sw), dims=(1, 2))
        wh, ww = self.window((h, w))
        return x.view(b, h // wh, wh, w // ww, ww, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, wh * ww, c)

    def reverse(self, t: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        h, w = hw
        wh, ww = self.window(hw)
        c = t.shape[-1]
        x = t.view(-1, h // wh, w // ww, wh, ww, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, h, w, c)
        sh, sw = self._shift(hw)
        return torch.roll(x, shifts=(sh, sw), dims=(1, 2)) if sh or sw else x

    def own_relative_bias(self) -> torch.Tensor:
        """(heads, N, N) the relative position bias of the block's own window's positions."""
        return self.block.attn._get_rel_pos_bias()[0]

    def relative_bias(self, window: tuple[int, int]) -> torch.Tensor:
        """(heads, N, N) relative position bias of a ``window``: the block's own, or read from its table at the
        offsets a smaller window has."""
        attn = self.block.attn
        own = as_pair(attn.window_size)
        if window == own:
            return self.own_relative_bias()
        table = getattr(attn, "relative_position_bias_table", None)
        if table is None:
            raise UserError(f"{type(attn).__name__} gives its relative position bias for its own {own[0]}x{own[1]} "
                            f"windows only, not for {window[0]}x{window[1]} windows")
        index = relative_position_index(window, own, table.device)
        n = window[0] * window[1]
        return table.index_select(0, index.flatten()).view(n, n, -1).permute(2, 0, 1)

    def _mask(self, hw: tuple[int, int], device: torch.device, dtype: torch.dtype) -> torch.Tensor | None:
        """(windows, N, N) the shift mask on an ``hw`` map (0 inside a region, -100 across), None when unshifted:
        the block's own where it was built for the map, else made the way timm makes it."""
        sh, sw = self._shift(hw)
        if not (sh or sw):
            return None
        block = self.block
        if self.native(hw) and not getattr(block, "dynamic_mask", False) and block.attn_mask is not None:
            return block.attn_mask.to(device=device, dtype=dtype)
        wh, ww = self.window(hw)
        img = torch.zeros(1, hw[0], hw[1], device=device, dtype=dtype)
        cnt = 0
        for h in ((0, -wh), (-wh, -sh), (-sh, None)):
            for w in ((0, -ww), (-ww, -sw), (-sw, None)):
                img[:, h[0]:h[1], w[0]:w[1]] = cnt
                cnt += 1
        regions = img.view(hw[0] // wh, wh, hw[1] // ww, ww).permute(0, 2, 1, 3).reshape(-1, wh * ww)
        diff = regions.unsqueeze(1) - regions.unsqueeze(2)
        return diff.masked_fill(diff != 0, -100.0)

    def bias(self, members: torch.Tensor, hw: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        # Sums by index_add, not products with ``members``: bookkeeping, not matrix products the MAC count would see.
        rel = self.relative_bias(self.window(hw))  # (heads, N, N)
        row, pos = members.nonzero().unbind(1)  # every (query row, position) pair
        sums = rel.new_zeros(rel.shape[0], members.shape[0], rel.shape[2]).index_add(1, row, rel.index_select(1, pos))
        bias = (sums / members.sum(1).to(rel.dtype).view(1, -1, 1)).unsqueeze(0)  # (1, heads, T, N): the mean
        mask = self._mask(hw, rel.device, rel.dtype)
        if mask is None:
            return bias, torch.ones(1, members.shape[0], dtype=torch.bool, device=members.device)
        first = members.argmax(1)  # a position of each row (the first)
        # A position's mask row says which region it lies in: a row stands for one region when all its positions'
        # mask rows equal its first position's.
        differs = (mask.index_select(1, pos) != mask.index_select(1, first[row])).any(-1)  # (windows, pairs)
        straddles = differs.new_zeros(mask.shape[0], members.shape[0]).index_add(1, row, differs)
        return bias + mask.index_select(1, first).unsqueeze(1), straddles == 0


class Swin(Family):
    name = "swin"
    description = "Swin"
    block_layout = "map"
    # What the reader requires beyond (shifted) windows; SwinV2 overrides them (its subclass reads nothing else).
    attention_parts: ClassVar[tuple[str, ...]] = ("relative_position_bias_table",)
    attention_needed: ClassVar[str] = "window attention with a relative position bias"
    post_norm: ClassVar[bool] = False  # True: every block must be post-norm (False: not checked)

    def read(self, model: nn.Module, draft: Anatomy) -> list[str]:
        missing = []
        if len(draft.stages) < 2:
            missing.append("several stages")
        attns = [model.get_submodule(b.attn) for b in draft.blocks]
        if not all(hasattr(a, "window_size") and all(hasattr(a, n) for n in self.attention_parts) for a in attns):
            missing.append(self.attention_needed)
        blocks = [model.get_submodule(b.path) for b in draft.blocks]
        if not all(hasattr(b, "shift_size") for b in blocks):
            missing.append("(shifted) window blocks")
        if self.post_norm and not all(b.post_norm for b in draft.blocks):
            missing.append("post-norm blocks")
        if missing:
            return missing
        for b in draft.blocks:
            b.attn_kind = "window"
        draft.extras["window_size"] = [list(as_pair(model.get_submodule(draft.blocks[s.blocks[0]].path).window_size))
                                       for s in draft.stages]
        draft.extras["shift_size"] = [list(as_pair(m.shift_size)) for m in blocks]
        return []

    def block_grid(self, x: torch.Tensor, args: tuple[Any, ...], kwargs: dict[str, Any],
                   default: tuple[int, int] | None) -> tuple[int, int]:
        """The map the block runs on: its input is (B, H, W, C)."""
        return int(x.shape[1]), int(x.shape[2])

    def query_attention(self, attn: nn.Module, where: str) -> QueryAttention:
        if not (isinstance(getattr(attn, "qkv", None), nn.Linear) and isinstance(getattr(attn, "proj", None), nn.Linear)
                and hasattr(attn, "relative_position_bias_table")):
            raise AnatomyError(f"{where}: needs Swin window attention with qkv and proj Linear layers and a relative "
                               f"position bias (found {type(attn).__name__})")
        return WindowQueryAttention(attn)

    def windows(self, block: nn.Module) -> WindowView | None:
        return SwinWindows(block) if hasattr(block, "window_size") and hasattr(block, "shift_size") else None

    def set_input_size(self, model: nn.Module, size: tuple[int, int], anatomy: Anatomy,
                       keep_windows: bool = True) -> dict[str, Any]:
        """timm's ``set_input_size`` with the windows chosen here rather than derived by timm.

        ``keep_windows``: every stage keeps its window (and its relative-position table). Otherwise each stage keeps
        its window where it divides the stage's map and else takes the largest divisor of the map between half the
        window and the window (a 160 px Swin-T runs 5x5 windows on its 40/20/10/5 maps), because a window that does
        not divide the map is padded: 128 px with 7x7 windows pads stage 3's 8x8 map to 14x14 and costs 2.05 GMACs,
        160 px 2.69, against 1.18 at 112 px. Where no such divisor exists the window stays (and is padded); where
        the map is smaller than the window timm shrinks the window to the map. A changed window resamples the
        relative-position table.
        """
        if not hasattr(model, "set_input_size"):
            raise UserError(f"{type(model).__name__} cannot change its input size (no set_input_size in timm)")
        if keep_windows:
            block = model.get_submodule(anatomy.blocks[0].path)
            window = block.window_size
            model.set_input_size(img_size=size, window_size=window if isinstance(window, int) else tuple(window))
            return {"img_size": list(size)}
        windows = []
        side = (math.ceil(size[0] / anatomy.patch_size[0]), math.ceil(size[1] / anatomy.patch_size[1]))
        for i, stage in enumerate(anatomy.stages):
            block = model.get_submodule(anatomy.blocks[stage.blocks[0]].path)
            target = tuple(getattr(block, "target_window_size", block.window_size))
            if i > 0:  # every later Swin stage starts by merging 2x2 patches (odd maps padded)
                side = (math.ceil(side[0] / 2), math.ceil(side[1] / 2))
            windows.append(tuple(_window_for(m, w) for m, w in zip(side, target, strict=True)))
        model.set_input_size(img_size=size, window_size=windows)
        return {"img_size": list(size)}

    def size_step(self, anatomy: Anatomy) -> int:
        """Half the total stride (16 px for four stages with patch 4): whole maps up to the third stage."""
        return max(anatomy.patch_size[0], total_stride(anatomy) // 2)


def relative_position_index(window: tuple[int, int], span: tuple[int, int], device: torch.device) -> torch.Tensor:
    """(N, N) the row of each position pair of a ``window`` in a table of the relative offsets of a ``span`` window
    (``(2 * span_h - 1) * (2 * span_w - 1)`` rows, offset (dy, dx) at ``(dy + span_h - 1) * (2 * span_w - 1) + dx +
    span_w - 1``: timm's ``relative_position_index`` where ``span`` is the window itself)."""
    ys, xs = torch.meshgrid(torch.arange(window[0], device=device), torch.arange(window[1], device=device),
                            indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    return (ys.view(-1, 1) - ys.view(1, -1) + span[0] - 1) * (2 * span[1] - 1) + xs.view(-1, 1) - xs.view(1, -1) \
        + span[1] - 1


def _window_for(side: int, window: int) -> int:
    if side <= window or side % window == 0:
        return window
    return next((d for d in range(window, math.ceil(window / 2) - 1, -1) if side % d == 0), window)


def as_pair(v: int | tuple[int, int]) -> tuple[int, int]:
    """timm's window and shift sizes, an int or a pair, as an (h, w) pair of ints."""
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))
