"""Shared helpers for tests: tiny random-init models of each family (32 px, a few blocks)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import timm
import torch

import vitconvert
from vitconvert.timing import Timing

# name -> (timm architecture, model kwargs): small enough that a forward pass takes milliseconds.
TINY_MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "vit": ("vit_tiny_patch16_224", dict(img_size=32, patch_size=4, embed_dim=48, depth=4, num_heads=3,
                                         num_classes=10)),
    "deit": ("deit_tiny_patch16_224", dict(img_size=32, patch_size=4, embed_dim=48, depth=4, num_heads=3,
                                           num_classes=10)),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", dict(img_size=32, patch_size=4, embed_dim=48, depth=4,
                                                               num_heads=3, num_classes=10)),
    "deit3": ("deit3_small_patch16_224", dict(img_size=32, patch_size=4, embed_dim=48, depth=4, num_heads=3,
                                              num_classes=10)),
    # No class token: latent queries attend to the tokens after the last block (AttentionPoolLatent).
    "siglip": ("vit_base_patch16_siglip_224", dict(img_size=32, patch_size=4, embed_dim=48, depth=4, num_heads=3,
                                                   num_classes=10)),
    # Rotary position embedding computed once and passed to every block, SwiGLU MLP, mean pooling + fc_norm; the
    # head at timm's usual scale, not EVA's 1e-3 (logits of 1e-4 would hide every difference the tests look for).
    "eva02": ("eva02_tiny_patch14_224", dict(img_size=32, patch_size=4, embed_dim=48, depth=4, num_heads=3,
                                             num_classes=10, head_init_scale=1.0)),
    # A relative position bias table in every block, layer-scale gammas, mean pooling + fc_norm; the head at timm's
    # usual scale (as EVA's).
    "beit": ("beit_base_patch16_224", dict(img_size=32, patch_size=4, embed_dim=48, depth=4, num_heads=3,
                                           num_classes=10, head_init_scale=1.0)),
    # PVT-v2 takes any input size; its data config says which one it runs at.
    "pvt_v2": ("pvt_v2_b0", dict(embed_dims=(16, 32, 48, 64), depths=(1, 1, 2, 1), num_heads=(1, 2, 3, 4),
                                 num_classes=10, pretrained_cfg_overlay=dict(input_size=(3, 64, 64)))),
    "swin": ("swin_tiny_patch4_window7_224", dict(img_size=32, patch_size=2, window_size=4, embed_dim=24,
                                                  depths=(1, 2, 2, 1), num_heads=(1, 2, 3, 4), num_classes=10)),
    # Cosine attention, continuous position bias, post-norm blocks.
    "swinv2": ("swinv2_tiny_window8_256", dict(img_size=32, patch_size=2, window_size=4, embed_dim=24,
                                               depths=(1, 2, 2, 1), num_heads=(1, 2, 3, 4), num_classes=10)),
}


def tiny_model(key: str, seed: int = 0) -> tuple[torch.nn.Module, str, dict[str, Any]]:
    """A random-init tiny model, with the architecture name and kwargs that build it."""
    arch, kwargs = TINY_MODELS[key]
    torch.manual_seed(seed)
    return timm.create_model(arch, pretrained=False, **kwargs).eval(), arch, dict(kwargs)


def model_kwargs_args(kwargs: dict[str, Any]) -> list[str]:
    """kwargs as CLI ``--model-kwargs`` strings."""
    out = []
    for k, v in kwargs.items():
        out.append(f"{k}={list(v) if isinstance(v, tuple) else v}".replace(" ", ""))
    return out


def fake_timings(x: torch.Tensor, images_per_s: dict[str, float], reference: str = "base") -> dict[str, Timing]:
    """What vitconvert.timing.compare returns for models running at these speeds (one round), for faked timing."""
    seconds = {name: x.shape[0] / ips for name, ips in images_per_s.items()}
    return {name: Timing(name, x.shape[0], reference, (s,), (seconds[reference] / s,)) for name, s in seconds.items()}


def exiting_cfvit(folder: Path, score: str = "max_softmax") -> tuple[vitconvert.ConvertedModel, Path, torch.Tensor]:
    """A tiny CF-ViT saved under ``folder``, at a point where 3 of its 7 images exit early (eta between the 4th and
    5th coarse confidences, of the kind ``score``: ``model.exit_score``): ``(model in eval mode, saved folder,
    images)``."""
    import vitconvert
    from vitconvert.layers.cascade import confidence

    base, _, _ = tiny_model("deit")
    model = vitconvert.apply(base, "cfvit", overrides=[f"model.exit_score={score}"])
    x = torch.randn(7, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        conf = confidence(model.forward_coarse(x)["logits"], score).sort().values  # type: ignore[arg-type]
    model.set_operating_point(eta=float((conf[3] + conf[4]) / 2))
    return model.eval(), vitconvert.save(model, folder / "cfvit"), x
