"""The one cost layer: how vitconvert counts multiply-accumulates (MACs), and its units.

The papers' "FLOPs" and timm's published GMACs are fvcore-style MACs with the attention matmuls
included: DeiT-S 4.61, Swin-T 4.51, PVT-v2-b2 4.05 at 224 px. Two ways of counting share the rules below:

* **measured**: :func:`count_macs` runs code under torch's ``FlopCounterMode``, which sees the aten ops
  actually executed (a dynamic model is counted along the path it really took), with matmuls, linear
  layers and convolutions from torch's own formulas, fused attention (every SDPA kernel, including the CPU
  one) as :func:`attention_macs`, and layer/group norms as :func:`norm_macs`;
* **analytic**: per-image accounting inside the methods (a cascade's stage costs, DGE's per-query costs)
  is written with the same rule functions, so the two agree to the MAC (tests check it).

Every conversion between MACs and GMACs goes through :data:`GIGA` / :func:`to_gmacs`.
"""

from __future__ import annotations

from collections.abc import Callable
from math import prod
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from torch.utils.module_tracker import ModuleTracker

aten = torch.ops.aten

GIGA = 1e9
# fvcore counts a LayerNorm/GroupNorm as 5 MACs per element (mean, variance, normalise, scale, shift).
NORM_MACS_PER_ELEMENT = 5


def to_gmacs(macs: float) -> float:
    """MACs -> GMACs."""
    return macs / GIGA


# --- rules ------------------------------------------------------------------------------------------------


def linear_macs(tokens: float, in_features: int, out_features: int) -> float:
    """A linear layer on ``tokens`` rows."""
    return float(tokens) * in_features * out_features


def attention_macs(queries: float, keys: float, qk_dim: int, v_dim: int, batch: float = 1) -> float:
    """Scaled dot-product attention: QK^T and AV (softmax and scaling are not counted, as in fvcore).

    ``qk_dim`` and ``v_dim`` are the widths summed over heads (heads x head dim).
    """
    return float(batch) * queries * keys * (qk_dim + v_dim)


def norm_macs(tokens: float, width: int, norm: nn.Module | None = None) -> float:
    """A LayerNorm/GroupNorm over ``width`` channels of ``tokens`` rows; 0 for anything else (Identity, None)."""
    if norm is not None and not isinstance(norm, nn.LayerNorm | nn.GroupNorm):
        return 0.0
    return float(tokens) * width * NORM_MACS_PER_ELEMENT


def conv_macs(out_pixels: float, conv: nn.Conv2d) -> float:
    """A 2-D convolution producing ``out_pixels`` output positions (per image)."""
    per_pixel = conv.out_channels * (conv.in_channels // conv.groups) * conv.kernel_size[0] * conv.kernel_size[1]
    return float(out_pixels) * per_pixel


def token_macs(module: nn.Module) -> float:
    """MACs per token of a module's linear layers and norms: what a per-token MLP runs for one row (its convolutions,
    if any, are not per token and not counted here)."""
    return sum(linear_macs(1, m.in_features, m.out_features) if isinstance(m, nn.Linear) else norm_macs(
        1, int(prod(m.normalized_shape)) if isinstance(m, nn.LayerNorm) else m.num_channels, m)
        for m in module.modules() if isinstance(m, nn.Linear | nn.LayerNorm | nn.GroupNorm))


# --- measured counting ------------------------------------------------------------------------------------


def _sdpa_flops(q: Any, k: Any, v: Any, *args: Any, **kwargs: Any) -> int:
    # Shapes (B, H, Lq, D), (B, H, Lk, D), (B, H, Lk, Dv); FlopCounterMode wants FLOPs = 2 x MACs.
    b, h, lq, d = q
    lk, dv = k[-2], v[-1]
    return int(2 * attention_macs(lq, lk, h * d, h * dv, batch=b))


def _norm_flops(x: Any, *args: Any, **kwargs: Any) -> int:
    return 2 * NORM_MACS_PER_ELEMENT * prod(x)


_CUSTOM: dict[Any, Callable[..., int]] = {
    aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_flops,
    aten.native_layer_norm: _norm_flops,
    aten.native_group_norm: _norm_flops,
}


class _ForwardTracker(ModuleTracker):
    """The flop counter's module tracker without its backward hooks: counting runs under no_grad, yet a view of a
    parameter made there still reports ``requires_grad`` with no grad function (SigLIP's pooling latent,
    ``latent.expand(B, -1, -1)``), on which the stock tracker's grad hook fails."""

    def _fw_pre_hook(self, mod: nn.Module, input: Any) -> None:
        self._get_append_fn(self._get_mod_name(mod), False)()

    def _fw_post_hook(self, mod: nn.Module, input: Any, output: Any) -> None:
        self._get_pop_fn(self._get_mod_name(mod), False)()


def count_macs(fn: Callable[[], Any]) -> int:
    """Run ``fn()`` and return the multiply-accumulates it executed (whole batch).

    Example:
        >>> import timm
        >>> m = timm.create_model("deit_small_patch16_224").eval()
        >>> round(to_gmacs(count_macs(lambda: m(torch.zeros(1, 3, 224, 224)))), 2)
        4.61
    """
    mode = FlopCounterMode(display=False, custom_mapping=_CUSTOM)
    mode.mod_tracker = _ForwardTracker()
    with mode, torch.no_grad():
        fn()
    return int(mode.get_total_flops()) // 2


def model_gmacs(model: nn.Module, img_size: tuple[int, int] | list[int], in_chans: int = 3) -> float:
    """GMACs of one forward pass of one image of ``img_size`` through ``model`` (in eval mode).

    This is also every converted model's ``base_gmacs``: the base model's cost, counted the same way.
    """
    was_training = model.training
    model.eval()
    try:
        p = next(model.parameters())
        x = torch.zeros(1, in_chans, *img_size, device=p.device, dtype=p.dtype)
        return to_gmacs(count_macs(lambda: model(x)))
    finally:
        model.train(was_training)
