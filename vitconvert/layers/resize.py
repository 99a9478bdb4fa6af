"""Image resizes of the multi-resolution cascades (CF-ViT's coarse pass, DVT's smaller members), and the same resize
spelled as two matrix products for exported graphs.

Eager, :func:`resize_images` is ``F.interpolate`` with ``antialias=True`` (bilinear or bicubic; ``area`` as it is).
Exported, an antialiased ``Resize`` is an ONNX opset-18 attribute that not every runtime implements: OpenVINO 2026.4
runs it as a plain bilinear resize (1.09 off on a 224 -> 112 image; ``benchmarks/studies/openvino_rows.py``), so a
cascade's coarse stage saw another image there. An antialiased resize is separable and linear, so each axis is a
fixed (out, in) matrix: while ``torch.export`` traces, the images are resized as ``A_h @ x @ A_w^T`` with those
matrices as constants of the graph, which every runtime runs as it is. The matrices follow PyTorch's antialiased
kernels (the PIL filters: triangle for bilinear, Keys' cubic with a = -0.5 for bicubic, support widened by the
downscale factor, weights normalised over the taps inside the image); tests check them against ``F.interpolate``.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["resize_images", "resize_matrix"]


def _filter(mode: str, t: np.ndarray) -> np.ndarray:
    t = np.abs(t).astype(np.float32)
    one = np.float32(1.0)
    if mode == "bilinear":
        return np.maximum(np.float32(0.0), one - t)
    a = np.float32(-0.5)  # PIL's (and PyTorch's antialiased) cubic
    return np.where(t < 1.0, ((a + 2) * t - (a + 3)) * t * t + one,
                    np.where(t < 2.0, (((t - 5) * t + 8) * t - 4) * a, np.float32(0.0))).astype(np.float32)


@functools.lru_cache(maxsize=64)
def resize_matrix(size_in: int, size_out: int, mode: str) -> np.ndarray:
    """(size_out, size_in) float32: the weights an antialiased ``mode`` resize (``align_corners=False``) gives each
    input position for each output position along one axis."""
    if mode not in ("bilinear", "bicubic"):
        raise ValueError(f"no antialiased {mode} resize")
    # In float32 and in PyTorch's order of operations, so the matrices give its weights to the last bit.
    f = np.float32
    scale = f(size_in) / f(size_out)
    support = f(1.0 if mode == "bilinear" else 2.0) * (scale if scale >= 1 else f(1.0))
    inv = f(1.0) / scale if scale >= 1 else f(1.0)
    out = np.zeros((size_out, size_in), dtype=np.float32)
    for i in range(size_out):
        center = scale * (f(i) + f(0.5))
        lo = max(int(center - support + f(0.5)), 0)
        hi = min(int(center + support + f(0.5)), size_in)
        taps = np.arange(lo, hi).astype(np.float32)
        w = _filter(mode, (taps - center + f(0.5)) * inv).astype(np.float32)
        total = np.float32(0.0)
        for v in w:  # summed in order, as the kernel does
            total = np.float32(total + v)
        out[i, lo:hi] = w / total if total != 0 else w
    return out


def resize_images(x: torch.Tensor, size: tuple[int, int] | list[int], mode: str) -> torch.Tensor:
    """(B, C, H, W) images resized to ``size`` with ``mode`` (bilinear or bicubic, antialiased; area), in fp32 on the
    CPU for half-precision inputs (the antialiased kernels have no fp16/bf16 CPU kernel), returned in ``x``'s dtype.
    While ``torch.export`` traces, as two matrix products with constant matrices (see the module docstring)."""
    size = (int(size[0]), int(size[1]))
    low = x.device.type == "cpu" and x.dtype in (torch.float16, torch.bfloat16)
    t = x.float() if low else x
    if mode != "area" and torch.compiler.is_exporting():
        h = torch.from_numpy(resize_matrix(int(x.shape[-2]), size[0], mode)).to(t.device, t.dtype)
        w = torch.from_numpy(resize_matrix(int(x.shape[-1]), size[1], mode)).to(t.device, t.dtype)
        out = torch.matmul(torch.matmul(h, t), w.t())
    else:
        out = F.interpolate(t, size=size, mode=mode, align_corners=False if mode != "area" else None,
                            antialias=mode != "area")
    return out.to(x.dtype)

