"""The fx reader finds the parts of every supported family, at their own and other image sizes."""

from __future__ import annotations

import pytest
import timm
import torch
from timm.layers import AttentionPoolLatent
from timm.models.vision_transformer import VisionTransformer
from utils import tiny_model

from vitconvert import fx as vfx
from vitconvert.backbones import read_anatomy
from vitconvert.errors import AnatomyError


@pytest.mark.parametrize(("key", "family", "grid", "prefix", "stages"), [
    ("vit", "vit", (8, 8), 1, 1),
    ("deit", "vit", (8, 8), 1, 1),
    ("deit_distilled", "vit", (8, 8), 2, 1),
    ("deit3", "vit", (8, 8), 1, 1),
    ("siglip", "vit", (8, 8), 0, 1),
    ("eva02", "eva", (8, 8), 1, 1),
    ("beit", "beit", (8, 8), 1, 1),
    ("pvt_v2", "pvt_v2", (16, 16), 0, 4),
    ("swin", "swin", (16, 16), 0, 4),
    ("swinv2", "swinv2", (16, 16), 0, 4),
])
def test_tiny_models(key: str, family: str, grid: tuple[int, int], prefix: int, stages: int) -> None:
    model, _, _ = tiny_model(key)
    a = read_anatomy(model)
    assert a.family == family
    assert a.grid == grid
    assert a.num_prefix_tokens == prefix
    assert len(a.stages) == stages
    assert a.num_classes == 10
    for b in a.blocks:
        assert model.get_submodule(b.attn) is model.get_submodule(b.path).attn
        assert model.get_submodule(b.mlp) is model.get_submodule(b.path).mlp
        assert [n.rsplit(".", 1)[-1] for n in b.norms] == ["norm1", "norm2"]


# Real architectures at their own sizes (random weights): the reader must not depend on names.
@pytest.mark.parametrize(("name", "family", "depth", "grids", "extra"), [
    ("vit_small_patch16_224", "vit", 12, [(14, 14)], {"pos_embed_prefix": 1}),
    ("deit_small_patch16_224", "vit", 12, [(14, 14)], {"class_token": True}),
    ("deit_tiny_distilled_patch16_224", "vit", 12, [(14, 14)], {"pos_embed_prefix": 2}),
    ("deit3_small_patch16_224", "vit", 12, [(14, 14)], {"pos_embed_prefix": 0}),
    ("vit_small_patch16_384", "vit", 12, [(24, 24)], {}),
    ("pvt_v2_b0", "pvt_v2", 8, [(56, 56), (28, 28), (14, 14), (7, 7)], {"sr_ratios": [8, 4, 2, 1]}),
    ("pvt_v2_b2_li", "pvt_v2", 16, [(56, 56), (28, 28), (14, 14), (7, 7)], {}),
    ("swin_tiny_patch4_window7_224", "swin", 12, [(56, 56), (28, 28), (14, 14), (7, 7)], {}),
    ("swin_base_patch4_window12_384", "swin", 24, [(96, 96), (48, 48), (24, 24), (12, 12)], {}),
    ("swinv2_tiny_window8_256", "swinv2", 12, [(64, 64), (32, 32), (16, 16), (8, 8)],
     {"window_size": [[8, 8]] * 4}),
])
def test_real_architectures(name: str, family: str, depth: int, grids: list, extra: dict) -> None:
    model = timm.create_model(name, pretrained=False)
    a = read_anatomy(model)
    assert a.family == family
    assert len(a.blocks) == depth
    assert [s.grid for s in a.stages] == grids
    for key, value in extra.items():
        assert a.extras[key] == value
    assert a.head and a.num_classes == 1000
    if family == "vit":
        assert a.pos_embed == "pos_embed" and a.final_norm == "norm" and a.pool == "token"
    else:
        assert all(s.downsample for s in a.stages[1:]) and a.pool == "avg"
    assert all(b.post_norm == (family == "swinv2") for b in a.blocks)


@pytest.mark.parametrize(("name", "prefix"), [("vit_base_patch16_siglip_224", 0),
                                             ("vit_so150m_patch16_reg4_map_256", 4)])
def test_attention_pooling_head_is_the_pooling_step(name: str, prefix: int) -> None:
    """SigLIP / MAP: attention after the last block, in no block, is the pooling; its linears are not the head."""
    model = timm.create_model(name, pretrained=False, depth=2, num_classes=7)
    a = read_anatomy(model)
    assert a.family == "vit" and len(a.blocks) == 2 and a.num_prefix_tokens == prefix
    assert a.pool == "attn" and a.attn_pool == "attn_pool" and a.final_norm == "norm"
    assert a.head == ["head"] and a.num_classes == 7 and a.num_features == model.embed_dim
    assert ("pooling", "attention pooling attn_pool") in a.rows()
    assert not a.extras["class_token"]


def test_attention_outside_blocks_before_them_is_refused() -> None:
    model = timm.create_model("vit_base_patch16_siglip_224", img_size=32, patch_size=4, embed_dim=48, depth=1,
                              num_heads=3, num_classes=7)
    model.norm_pre = _PoolBeforeBlocks(48, num_heads=3)
    with pytest.raises(AnatomyError, match="found attention outside of any block"):
        read_anatomy(model)


class _PoolBeforeBlocks(AttentionPoolLatent):
    """Attention pooling misplaced before the blocks (its output discarded, so shapes still fit)."""

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        return x + 0 * super().forward(x).mean()


@pytest.mark.parametrize(("name", "family", "shared", "pool"), [
    ("eva02_tiny_patch14_224", "eva", ["rope"], "avg"),  # absolute + rotary embeddings, SwiGLU MLP
    ("vit_small_patch16_rope_224", "eva", ["rope"], "token"),  # rotary embeddings only
    ("vit_small_patch16_rope_mixed_224", "eva", ["rope"], "token"),  # a learned rotary table per head
    ("beit_base_patch16_224", "beit", [], "avg"),  # relative position bias tables, layer-scale gammas
    ("deit_tiny_patch16_224", "vit", [], "token"),
])
def test_position_information_inside_the_blocks(name: str, family: str, shared: list, pool: str) -> None:
    """Blocks called with a tensor besides the tokens (the rotary embedding) are read from the graph: such a model
    is not a plain ViT (its blocks do not chain), and BEiT's biases make it a family of its own."""
    model = timm.create_model(name, pretrained=False, img_size=32, patch_size=4, embed_dim=48, depth=2,
                              num_heads=3, num_classes=7)
    a = read_anatomy(model)
    assert a.family == family and a.pool == pool and a.num_prefix_tokens == 1 and a.grid == (8, 8)
    assert a.stages[0].grid == (8, 8)  # not read from a per-head rotary table's (1, heads, N, E) shape
    assert all(b.shared_inputs == shared and not b.post_norm for b in a.blocks)
    assert any(part == "block parts" and text.endswith("also called with rope") == bool(shared)
               for part, text in a.rows())
    assert a.head == ["head"] and a.num_classes == 7


def test_other_image_sizes() -> None:
    swin = timm.create_model("swin_tiny_patch4_window7_224", img_size=448)
    assert [s.grid for s in read_anatomy(swin).stages] == [(112, 112), (56, 56), (28, 28), (14, 14)]
    pvt = timm.create_model("pvt_v2_b0")
    assert [s.grid for s in read_anatomy(pvt, img_size=(320, 320)).stages] == [(80, 80), (40, 40), (20, 20),
                                                                                (10, 10)]
    vit = timm.create_model("vit_tiny_patch16_224", img_size=96)
    assert read_anatomy(vit).grid == (6, 6)


def test_unsupported_models_name_what_is_missing() -> None:
    with pytest.raises(AnatomyError, match="no attention found"):
        read_anatomy(timm.create_model("resnet18"))
    with pytest.raises(AnatomyError, match=r"not a supported vision transformer.*Not found: ViT/DeiT: blocks"):
        read_anatomy(timm.create_model("cait_xxs24_224"))


def test_headless_backbone_says_how_to_add_a_head() -> None:
    headless = timm.create_model("vit_small_patch14_dinov2", img_size=28, depth=1, num_classes=0)
    with pytest.raises(AnatomyError, match=r"built headless \(num_classes=0\).*--model-kwargs num_classes=N "
                                           r"\(Python: model_kwargs=\{'num_classes': N\}\)"):
        read_anatomy(headless)
    headed = read_anatomy(timm.create_model("vit_small_patch14_dinov2", img_size=28, depth=1, num_classes=10))
    assert headed.head == ["head"] and headed.num_classes == 10


class _DataDependent(VisionTransformer):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.mean() > 0:  # control flow on values: torch.fx cannot follow it
            x = x * 2
        return super().forward(x)


def test_untraceable_model_is_a_clear_error() -> None:
    model = _DataDependent(img_size=32, patch_size=4, embed_dim=24, depth=1, num_heads=2)
    with pytest.raises(AnatomyError, match="cannot trace _DataDependent"):
        read_anatomy(model)


def test_dynamic_img_size_vit_is_read() -> None:
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, depth=1, dynamic_img_size=True)
    a = read_anatomy(model)
    assert a.family == "vit" and a.pos_embed == "pos_embed" and a.grid == (8, 8)


@pytest.mark.parametrize("key", ["vit", "deit_distilled", "deit3"])
def test_split_at_blocks_is_exact(key: str) -> None:
    model, _, _ = tiny_model(key)
    a = read_anatomy(model)
    embed, head = vfx.split_at_blocks(model, a.block_paths)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        t = embed(x)
        for p in a.block_paths:
            t = model.get_submodule(p)(t)
        assert torch.equal(head(t), model(x))
        lifted = vfx.lift_parameter(vfx.split_at_blocks(model, a.block_paths)[0], a.pos_embed, "pos")
        assert torch.equal(lifted(x, model.get_parameter(a.pos_embed)), embed(x))
        assert not torch.equal(lifted(x, torch.zeros_like(model.get_parameter(a.pos_embed))), embed(x))


@pytest.mark.parametrize("fused", [True, False])
def test_tap_class_attention(fused: bool) -> None:
    model, _, _ = tiny_model("deit")
    block = model.blocks[1]
    block.attn.fused_attn = fused
    tapped = vfx.tap_class_attention(block)
    x = torch.randn(2, 65, 48)
    with torch.no_grad():
        out, row = tapped(x)
        assert torch.equal(out, block(x))
        # Reference: explicit attention of query 0.
        attn = block.attn
        qkv = attn.qkv(block.norm1(x)).reshape(2, 65, 3, 3, 16).permute(2, 0, 3, 1, 4)
        q, k = qkv[0], qkv[1]
        ref = ((q[:, :, :1] * attn.scale) @ k.transpose(-2, -1)).softmax(-1).squeeze(2)
    assert row.shape == (2, 3, 65)
    torch.testing.assert_close(row, ref, atol=1e-6, rtol=1e-5)
