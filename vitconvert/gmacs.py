"""Count multiply-accumulates the way the field does.

The papers' "FLOPs" and timm's published GMACs are fvcore-style MACs with the attention matmuls
included: DeiT-S 4.61, Swin-T 4.51, PVT-v2-b2 4.05 at 224 px. We count by running the model under
torch's ``FlopCounterMode`` (which sees the aten ops actually executed, so a dynamic model is counted
along the path it really took) with

* matmuls, linear layers and convolutions from torch's own formulas;
* fused attention (every SDPA kernel, including the CPU one) as QK^T plus AV;
* layer/group norms as 5 MACs per element, as fvcore does;

and report MACs = FLOPs / 2.
"""

from __future__ import annotations

from collections.abc import Callable
from math import prod
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

aten = torch.ops.aten


def _sdpa_flops(q: Any, k: Any, v: Any, *args: Any, **kwargs: Any) -> int:
    # Shapes (B, H, Lq, D), (B, H, Lk, D), (B, H, Lk, Dv): QK^T and AV, 2 FLOPs per MAC.
    b, h, lq, d = q
    lk, dv = k[-2], v[-1]
    return 2 * b * h * lq * lk * (d + dv)


def _norm_flops(x: Any, *args: Any, **kwargs: Any) -> int:
    return 2 * 5 * prod(x)


_CUSTOM: dict[Any, Callable[..., int]] = {
    aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_flops,
    aten.native_layer_norm: _norm_flops,
    aten.native_group_norm: _norm_flops,
}


def count_macs(fn: Callable[[], Any]) -> int:
    """Run ``fn()`` and return the multiply-accumulates it executed (whole batch).

    Example:
        >>> import timm
        >>> m = timm.create_model("deit_small_patch16_224").eval()
        >>> round(count_macs(lambda: m(torch.zeros(1, 3, 224, 224))) / 1e9, 2)
        4.61
    """
    mode = FlopCounterMode(display=False, custom_mapping=_CUSTOM)
    with mode, torch.no_grad():
        fn()
    return int(mode.get_total_flops()) // 2


def model_gmacs(model: nn.Module, img_size: tuple[int, int], in_chans: int = 3) -> float:
    """GMACs of one forward pass of one image of ``img_size`` through ``model`` (in eval mode)."""
    was_training = model.training
    model.eval()
    try:
        p = next(model.parameters())
        x = torch.zeros(1, in_chans, *img_size, device=p.device, dtype=p.dtype)
        return count_macs(lambda: model(x)) / 1e9
    finally:
        model.train(was_training)
