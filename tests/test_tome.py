"""ToMe baseline (benchmarks/tome.py): exactness at r=0, the merge arithmetic, proportional attention,
and GMACs of DeiT-S against the published r=8 / r=13 figures."""

from __future__ import annotations

import pytest
import timm
import torch

from benchmarks.tome import ToMe, bipartite_merge, gmacs
from tests.utils import tiny_model
from vitconvert.errors import UserError


@pytest.mark.parametrize("key", ["deit", "deit_distilled", "deit3", "vit"])
def test_r0_reproduces_model(key: str) -> None:
    model, _, _ = tiny_model(key)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        out = ToMe(model, r=0)(x)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)


def test_merge_arithmetic() -> None:
    # Prefix token + 4 patches: A = patches 0, 2; B = patches 1, 3. Keys make A0 ~ B1 and A1 ~ B0.
    x = torch.tensor([[[9.0], [1.0], [2.0], [3.0], [4.0]]])
    keys = torch.tensor([[[0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [0.2, 1.0], [1.0, 0.1]]])
    size = torch.tensor([[[1.0], [3.0], [1.0], [1.0], [1.0]]])
    out, new_size = bipartite_merge(x, keys, size, r=1, num_prefix=1)
    # A0 (value 1, size 3) matches B1 (value 4) with cosine ~0.995, A1 (value 3) matches B0 (value 2) with
    # ~0.98: only the strongest link merges, into (3*1 + 1*4) / 4.
    assert out.tolist() == [[[9.0], [3.0], [2.0], [7 / 4]]]
    assert new_size.tolist() == [[[1.0], [1.0], [1.0], [4.0]]]
    # Sizes always add up to the number of patches, and r is clipped to half the patch tokens.
    out, new_size = bipartite_merge(x, keys, size, r=10, num_prefix=1)
    assert out.shape == (1, 3, 1) and new_size.sum().item() == 7.0


def test_proportional_attention_matches_duplicated_tokens() -> None:
    """Merging exact duplicates and attending with log(size) equals running on the duplicates."""
    model, _, _ = tiny_model("deit")
    tm = ToMe(model, r=[32, 0, 0, 0])
    g = tm.__dict__["_graphs"]
    with torch.no_grad():
        tokens = g["embed"](torch.randn(2, 3, 32, 32))
        patches = tokens[:, 1:].clone()
        patches[:, 1::2] = patches[:, 0::2]  # every B token is a copy of its A neighbour
        dup = torch.cat([tokens[:, :1], patches], dim=1)
        ref = model.head(model.norm(model.blocks(dup))[:, 0])

        t, size = g["blocks"][0](dup, None)
        assert t.shape[1] == 1 + 32 and size[:, 1:].eq(2).all()
        merged = t
        for block in g["blocks"][1:]:
            t, size = block(t, size)
        out = g["head"](t)
        t = merged
        for block in g["blocks"][1:]:
            t, _ = block(t, None)  # the same tokens without proportional attention
        plain = g["head"](t)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert (plain - ref).abs().max() > 1e-3


def test_unfused_attention_path_matches_fused() -> None:
    model, _, _ = tiny_model("deit")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        fused = ToMe(model, r=6)(x)
        for blk in model.blocks:
            blk.attn.fused_attn = False
        unfused_model = ToMe(model, r=6)
        unfused = unfused_model(x)
    torch.testing.assert_close(unfused, fused, atol=1e-5, rtol=1e-5)


def test_tokens_per_block_and_r_schedule() -> None:
    model, _, _ = tiny_model("deit")
    tm = ToMe(model, r=[5, 0, 7, 40])
    assert tm.r == [5, 0, 7, 40]
    g = tm.__dict__["_graphs"]
    with torch.no_grad():
        t, size = g["embed"](torch.randn(1, 3, 32, 32)), None
        counts = []
        for block in g["blocks"]:
            t, size = block(t, size)
            counts.append(t.shape[1])
    # 65 tokens; the last block can merge at most half of the 52 patch tokens left.
    assert counts == [60, 60, 53, 27]
    assert size is not None and size[:, 1:].sum().item() == 64.0
    tm.r = 3
    assert tm.r == [3, 3, 3, 3]


def test_rejects_other_families_and_bad_r() -> None:
    with pytest.raises(UserError, match="ViT/DeiT"):
        ToMe(tiny_model("swin")[0], r=2)
    with pytest.raises(UserError, match="r must be"):
        ToMe(tiny_model("deit")[0], r=[1, 2])
    with pytest.raises(UserError, match="r must be"):
        ToMe(tiny_model("deit")[0], r=-1)


def test_deit_small_gmacs_match_published() -> None:
    # ToMe paper / Papers-with-Code: 3.4 and 2.7 GFLOPs (fvcore MACs); fvcore on the reference patch
    # measured 3.43 and 2.71 (docs/ecosystem.md 1.1).
    torch.manual_seed(0)
    model = timm.create_model("deit_small_patch16_224", pretrained=False).eval()
    tm = ToMe(model, r=0)
    assert gmacs(tm, (224, 224)) == pytest.approx(4.61, abs=0.01)
    tm.r = 8
    assert gmacs(tm, (224, 224)) == pytest.approx(3.43, abs=0.02)
    tm.r = 13
    assert gmacs(tm, (224, 224)) == pytest.approx(2.71, abs=0.02)
