"""The family adapters: what each family is, tested once here for every method that asks it."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from utils import TINY_MODELS, tiny_model

from vitconvert.backbones import FAMILIES, family_of, read_anatomy
from vitconvert.errors import AnatomyError, UserError
from vitconvert.layers.costs import count_macs

pytestmark = pytest.mark.usefixtures("one_thread")

# Attention variants the seam must reproduce: plain timm ViT, DeiT-III (layer scale), ViT with q/k norms and a scale
# norm, PVT-v2 with strided spatial reduction (stages 1-3) and without (stage 4), PVT-v2 _li (average-pooled keys).
ATTENTIONS = {
    "vit": (*TINY_MODELS["vit"], "blocks.1.attn"),
    "deit3": (*TINY_MODELS["deit3"], "blocks.2.attn"),
    "vit_qk_norm": ("vit_tiny_patch16_224", dict(TINY_MODELS["vit"][1], qk_norm=True, scale_attn_norm=True),
                    "blocks.0.attn"),
    "pvt_v2_sr": (*TINY_MODELS["pvt_v2"], "stages.1.blocks.0.attn"),
    "pvt_v2_global": (*TINY_MODELS["pvt_v2"], "stages.3.blocks.0.attn"),
    "pvt_v2_li": ("pvt_v2_b2_li", dict(embed_dims=(16, 32, 48, 64), depths=(1, 1, 1, 1), num_heads=(1, 2, 3, 4),
                                       num_classes=10), "stages.0.blocks.0.attn"),
}


def _attention_case(key: str) -> tuple[torch.nn.Module, tuple[int, int], torch.Tensor]:
    arch, kwargs, path = ATTENTIONS[key]
    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False, **kwargs).eval()
    anatomy = read_anatomy(model, img_size=(64, 64) if "pvt" in arch else None)
    info = next(b for b in anatomy.blocks if b.attn == path)
    grid = anatomy.stages[info.stage].grid
    torch.manual_seed(1)
    xn = torch.randn(2, info.tokens, info.dim)
    return model, grid, xn


@pytest.mark.parametrize("key", list(ATTENTIONS))
def test_query_attention_is_the_module_and_counts_its_macs(key: str) -> None:
    model, grid, xn = _attention_case(key)
    path = ATTENTIONS[key][2]
    attn = model.get_submodule(path)
    family = family_of(read_anatomy(model, img_size=(64, 64) if "pvt" in ATTENTIONS[key][0] else None))
    qa = family.query_attention(attn, path)

    def seam(rows: torch.Tensor) -> torch.Tensor:  # every token a query row: the module's own computation
        k, v = qa.keys_values(rows, grid)
        q = qa.queries(rows)
        b, n, _ = q.shape
        o = F.scaled_dot_product_attention(q.view(b, n, qa.num_heads, -1).transpose(1, 2), k, v)
        return qa.output(o.transpose(1, 2).reshape(b, n, qa.dim), rows)

    args = (list(grid),) if "pvt" in ATTENTIONS[key][0] else ()
    with torch.no_grad():
        torch.testing.assert_close(seam(xn), attn(xn, *args), atol=1e-5, rtol=1e-5)
    n = xn.shape[1]
    keys = qa.key_tokens(n, grid)
    assert count_macs(lambda: seam(xn[:1])) == pytest.approx(n * qa.query_macs(keys) + qa.kv_macs(n, grid), rel=1e-9)
    assert count_macs(lambda: attn(xn[:1], *args)) == pytest.approx(n * qa.query_macs(keys) + qa.kv_macs(n, grid),
                                                                    rel=1e-9)
    assert qa.keys_are_queries == (keys == n and key not in ("pvt_v2_sr", "pvt_v2_li"))


def test_pvt_v2_key_counts_follow_the_reduction() -> None:
    # b0's sr_ratios (8, 4, 2, 1) at 64 px: stage 1's 8x8 map reduced 4x to 2x2; stage 3's 2x2 map kept whole;
    # the _li model pools every stage's keys to 7x7.
    for key, expected in (("pvt_v2_sr", 2 * 2), ("pvt_v2_global", 2 * 2), ("pvt_v2_li", 7 * 7)):
        model, grid, xn = _attention_case(key)
        qa = FAMILIES["pvt_v2"].query_attention(model.get_submodule(ATTENTIONS[key][2]), key)
        assert qa.key_tokens(xn.shape[1], grid) == expected, key


def test_pvt_v2_conv_mlp_is_the_module() -> None:
    model, _, _ = tiny_model("pvt_v2")
    mlp = model.get_submodule("stages.0.blocks.0.mlp")
    parts = FAMILIES["pvt_v2"].mlp_conv(mlp, "test")
    x = torch.randn(2, 16 * 16, mlp.fc1.in_features)
    with torch.no_grad():
        h = parts.relu(parts.fc1(x)).transpose(1, 2).reshape(2, -1, 16, 16)
        h = parts.act(parts.dwconv(h).flatten(2).transpose(1, 2))
        torch.testing.assert_close(parts.drop(parts.fc2(parts.drop(h))), mlp(x, [16, 16]))
    assert FAMILIES["vit"].mlp_conv(tiny_model("vit")[0].blocks[0].mlp, "test") is None


def test_families_that_have_no_query_seam_say_so() -> None:
    model, _, _ = tiny_model("swin")
    with pytest.raises(AnatomyError, match="fused qkv"):
        FAMILIES["vit"].query_attention(model.get_submodule("layers.0.blocks.0.attn"), "not a ViT attention")
    with pytest.raises(AnatomyError, match="needs Swin window attention"):
        FAMILIES["swin"].query_attention(model.get_submodule("layers.0.blocks.0.mlp"), "not a Swin attention")
    vit, _, _ = tiny_model("vit")
    assert FAMILIES["vit"].windows(vit.blocks[0]) is None


def test_swin_block_as_a_batch_of_windows_is_the_block() -> None:
    """Partition, the query seam with each position's own bias row and mask, reverse: timm's shifted block."""
    model, _, _ = tiny_model("swin")
    blk = model.layers[1].blocks[1]  # 8x8 map, 4x4 windows shifted by 2
    view = FAMILIES["swin"].windows(blk)
    seam = FAMILIES["swin"].query_attention(blk.attn, "swin block")
    x = torch.randn(2, 8, 8, blk.norm1.normalized_shape[0])
    w = view.partition(x)
    assert w.shape == (8, 16, x.shape[-1]) and torch.equal(view.reverse(w, (8, 8)), x)
    bias, whole = view.bias(torch.eye(16), (8, 8))
    assert bias.shape == (4, blk.attn.num_heads, 16, 16) and whole.all()
    xn = blk.norm1(w)
    k, v = seam.keys_values(xn, (4, 4))
    q = seam.queries(xn).view(8, 16, blk.attn.num_heads, -1).transpose(1, 2)
    o = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias.repeat(2, 1, 1, 1))
    a = view.reverse(seam.output(o.transpose(1, 2).reshape(8, 16, -1), xn), (8, 8))
    torch.testing.assert_close(a, blk._attn(blk.norm1(x)), atol=1e-5, rtol=0)
    # one row standing for a window's whole first row of positions: the mean of their bias rows, and it straddles
    # the masked regions of the windows the shift cuts (all but the first)
    members = torch.zeros(1, 16)
    members[0, :4] = 1
    bias, whole = view.bias(members, (8, 8))
    rel = blk.attn._get_rel_pos_bias()[0]
    torch.testing.assert_close(bias[0, :, 0], rel[:, :4].mean(1))
    assert whole.flatten().tolist() == [True, False, True, False]


def test_block_grids() -> None:
    x = torch.zeros(1, 5, 7, 8)
    assert FAMILIES["swin"].block_grid(x, (), {}, None) == (5, 7)
    assert FAMILIES["pvt_v2"].block_grid(x, ([3, 4],), {}, None) == (3, 4)
    assert FAMILIES["pvt_v2"].block_grid(x, (), {"feat_size": (6, 2)}, None) == (6, 2)
    assert FAMILIES["vit"].block_grid(x, (None,), {}, (8, 8)) == (8, 8)
    with pytest.raises(UserError, match="attention masks"):
        FAMILIES["vit"].block_grid(x, (torch.zeros(1),), {}, (8, 8))


def test_set_input_size() -> None:
    vit, _, _ = tiny_model("vit")
    anatomy = read_anatomy(vit)
    assert FAMILIES["vit"].set_input_size(vit, (48, 48), anatomy) == {"img_size": [48, 48]}
    assert vit.pos_embed.shape[1] == 12 * 12 + 1 and vit(torch.zeros(1, 3, 48, 48)).shape == (1, 10)

    pvt, _, _ = tiny_model("pvt_v2")
    assert FAMILIES["pvt_v2"].set_input_size(pvt, (96, 96), read_anatomy(pvt)) == {}

    kept, _, _ = tiny_model("swin")  # 32 px, patch 2, windows 4: maps 16/8/4/2
    anatomy = read_anatomy(kept)
    FAMILIES["swin"].set_input_size(kept, (24, 24), anatomy, keep_windows=True)  # maps 12/6/3/2
    assert [tuple(s.blocks[0].window_size) for s in kept.layers] == [(4, 4), (4, 4), (3, 3), (2, 2)]
    fitted, _, _ = tiny_model("swin")
    FAMILIES["swin"].set_input_size(fitted, (24, 24), anatomy, keep_windows=False)
    # 12: keeps 4 (divides); 6: 3 (largest divisor in 2..4); 3 and 2: smaller than the window, shrunk by timm
    assert [tuple(s.blocks[0].window_size) for s in fitted.layers] == [(4, 4), (3, 3), (3, 3), (2, 2)]
    assert fitted(torch.zeros(1, 3, 24, 24)).shape == (1, 10)


def test_swinv2_runs_at_other_sizes_through_timm() -> None:
    """SwinV2 windows are fitted as Swin's; its continuous position bias needs no table resampled: the same MLP
    weights give the bias of every window size."""
    model, _, _ = tiny_model("swinv2")  # 32 px, patch 2, windows 4: maps 16/8/4/2
    anatomy = read_anatomy(model)
    assert anatomy.family == "swinv2" and all(b.post_norm for b in anatomy.blocks)
    cpb = {k: v.clone() for k, v in model.state_dict().items() if "cpb_mlp" in k or "logit_scale" in k}
    FAMILIES["swinv2"].set_input_size(model, (24, 24), anatomy, keep_windows=False)
    assert [tuple(s.blocks[0].window_size) for s in model.layers] == [(4, 4), (3, 3), (3, 3), (2, 2)]
    assert all(torch.equal(model.state_dict()[k], v) for k, v in cpb.items())
    assert model(torch.zeros(1, 3, 24, 24)).shape == (1, 10)
    assert FAMILIES["swinv2"].size_step(anatomy) == 8


@pytest.mark.parametrize("key", ["eva02", "beit"])
def test_position_information_follows_the_input_size(key: str) -> None:
    """EVA's rotary embedding and BEiT's relative position bias tables are rebuilt for the new grid by timm."""
    model, _, _ = tiny_model(key)  # 32 px, patch 4: grid 8x8
    anatomy = read_anatomy(model)
    assert FAMILIES[anatomy.family].set_input_size(model, (48, 48), anatomy) == {"img_size": [48, 48]}
    assert model(torch.zeros(2, 3, 48, 48)).shape == (2, 10)
    assert FAMILIES[anatomy.family].size_step(anatomy) == 4
    # Queries apart from keys, with position rows of their own (DGE's pooled queries take their positions' mean).
    assert FAMILIES[anatomy.family].query_attention(model.blocks[0].attn, "block 0").holds_positions


def test_size_steps() -> None:
    assert FAMILIES["vit"].size_step(read_anatomy(tiny_model("vit")[0])) == 4  # the patch
    assert FAMILIES["swin"].size_step(read_anatomy(tiny_model("swin")[0])) == 8  # half the total stride of 16
