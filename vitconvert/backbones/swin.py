"""Swin Transformer v1 (timm ``swin_transformer``): stages of (shifted) window attention blocks with a relative
position bias over ``(B, H, W, C)`` maps, patch merging between stages.

Said once here for every method: the windows and shifts of each stage (``extras``), and how a Swin model runs at
another input size, keeping its windows (and so its relative-position tables) or fitting them to the new maps
(:meth:`Swin.set_input_size`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from vitconvert.anatomy import Anatomy
from vitconvert.backbones.family import Family, total_stride
from vitconvert.errors import UserError


class Swin(Family):
    name = "swin"
    description = "Swin"
    block_layout = "map"

    def read(self, model: nn.Module, draft: Anatomy) -> list[str]:
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

    def block_grid(self, x: torch.Tensor, args: tuple[Any, ...], kwargs: dict[str, Any],
                   default: tuple[int, int] | None) -> tuple[int, int]:
        """The map the block runs on: its input is (B, H, W, C)."""
        return int(x.shape[1]), int(x.shape[2])

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


def _window_for(side: int, window: int) -> int:
    if side <= window or side % window == 0:
        return window
    return next((d for d in range(window, math.ceil(window / 2) - 1, -1) if side % d == 0), window)


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))
