"""The MAC counter matches the field's published numbers and counts the path actually taken."""

from __future__ import annotations

import pytest
import timm
import torch

from vitconvert.layers.costs import count_macs, model_gmacs


@pytest.mark.parametrize(("name", "published"), [
    ("deit_small_patch16_224", 4.61),
    ("swin_tiny_patch4_window7_224", 4.51),
    ("pvt_v2_b2", 4.05),
])
def test_published_gmacs(name: str, published: float) -> None:
    model = timm.create_model(name, pretrained=False)
    gmacs = model_gmacs(model, (224, 224))
    assert abs(gmacs - published) / published < 0.01, gmacs


def test_fused_and_explicit_attention_count_the_same() -> None:
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False).eval()
    fused = model_gmacs(model, (224, 224))
    for blk in model.blocks:
        blk.attn.fused_attn = False
    explicit = model_gmacs(model, (224, 224))
    assert abs(fused - explicit) / explicit < 0.002


def test_counts_scale_with_batch_and_path() -> None:
    lin = torch.nn.Linear(8, 4)
    x = torch.randn(5, 8)
    assert count_macs(lambda: lin(x)) == 5 * 8 * 4
    assert count_macs(lambda: lin(x[:2])) == 2 * 8 * 4
