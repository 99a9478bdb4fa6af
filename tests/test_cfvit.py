"""CF-ViT: exactness at full compute, real batched early exit, GMACs, training, save/load."""

from __future__ import annotations

import contextlib
import copy
import functools
import math
from collections.abc import Iterator

import pytest
import timm
import torch
import torch.nn.functional as F
from utils import TINY_MODELS, tiny_model

import vitconvert
from vitconvert.backbones.swinv2 import SwinV2Windows, relative_coords
from vitconvert.errors import UserError
from vitconvert.methods.cfvit import CFViT


def convert(key: str, overrides: list[str] | None = None, seed: int = 0) -> CFViT:
    arch, kwargs = TINY_MODELS[key]
    torch.manual_seed(seed)
    return vitconvert.apply(arch, "cfvit", model_kwargs=kwargs, pretrained=False,
                            overrides=["model.gca_start_block=1", *(overrides or [])])


def perturb(model: CFViT) -> None:
    """Fine-tuned-like weights: a non-zero reuse MLP, so the fine stage really differs from the base."""
    torch.manual_seed(7)
    with torch.no_grad():
        for p in model.reuse.parameters():
            p.add_(torch.randn_like(p) * 0.05)


@pytest.mark.parametrize("key", ["vit", "deit", "deit3", "deit_distilled", "siglip", "eva02"])
def test_full_compute_reproduces_base(key: str) -> None:
    model = convert(key)
    base = model.build_base()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        ref = base(x)
        out = model.full_compute()(x)
    assert (out - ref).abs().max() <= 1e-4
    # and the base weights inside the converted model are the original ones
    orig, _, _ = tiny_model(key)
    assert all(torch.equal(v, orig.state_dict()[k]) for k, v in model.base_state_dict().items())


def test_full_compute_on_real_deit_small() -> None:
    torch.manual_seed(0)
    model = vitconvert.apply("deit_small", "cfvit", pretrained=False)
    base = model.build_base()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert (model.full_compute()(x) - base(x)).abs().max() <= 1e-4


def _analytic_stage_gmacs(n: int, dim: int, depth: int, mlp_ratio: float = 4.0) -> float:
    """MACs of ViT blocks over n tokens: qkv, QK^T, AV, proj, MLP, two LayerNorms (fvcore's 5/elt)."""
    hidden = int(dim * mlp_ratio)
    per_block = n * dim * 3 * dim + 2 * n * n * dim + n * dim * dim + 2 * n * dim * hidden + 2 * 5 * n * dim
    return depth * per_block / 1e9


def test_stage_gmacs_match_analytic_count_deit_small() -> None:
    model = vitconvert.apply("deit_small", "cfvit", pretrained=False)
    dim, depth = 384, 12
    embed = 49 * 768 * dim + 5 * 50 * dim  # patch conv + final norm (head: 384*1000)
    head = dim * 1000
    coarse = _analytic_stage_gmacs(50, dim, depth) + (embed + head) / 1e9
    # fine stage: 1 + 4*25 + 24 = 125 tokens, patch conv on the full image, reuse MLP on 49 tokens
    fine = (_analytic_stage_gmacs(125, dim, depth) + (196 * 768 * dim + 5 * 125 * dim + head) / 1e9
            + (49 * (5 * dim + 2 * dim * 4 * dim) + 5 * 50 * dim) / 1e9)
    assert abs(model.costs["coarse"] - coarse) / coarse < 0.02
    assert abs(model.costs["coarse"] + model.costs["fine"] - (coarse + fine)) / (coarse + fine) < 0.02
    assert abs(model.costs["coarse"] - 1.10) < 0.03 and abs(model.costs["coarse"] + model.costs["fine"] - 4.0) < 0.08
    assert abs(model.base_gmacs - 4.61) < 0.02


@pytest.mark.parametrize("batch", [1, 7])
@pytest.mark.parametrize("eta", [0.0, 0.3, 0.6, 1.0])
def test_batched_early_exit_equals_choosing_afterwards(batch: int, eta: float) -> None:
    model = convert("deit")
    perturb(model)
    model.eta = eta
    x = torch.randn(batch, 3, 32, 32) * 2
    with torch.no_grad():
        dyn = model.forward_dynamic(x)
        both = model.collect(x)
        simulated = model.simulate(both, {"eta": eta})
        logits, gmacs = simulated.logits, simulated.gmacs
        # reference computed independently: each image alone through both stages
        for i in range(batch):
            coarse = model.forward_coarse(x[i:i + 1])
            conf = coarse["logits"].softmax(-1).max().item()
            fine = model.forward_fine(x[i:i + 1], coarse)
            expected = fine if (eta >= 1.0 or conf <= eta) else coarse["logits"]
            torch.testing.assert_close(dyn.logits[i:i + 1], expected, atol=1e-4, rtol=1e-4)
            assert dyn.stage[i].item() == int(eta >= 1.0 or conf <= eta)
    torch.testing.assert_close(dyn.logits, logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(dyn.gmacs, gmacs.float())


def test_fine_indices_split_each_coarse_patch_2x2() -> None:
    model = convert("deit")  # 8x8 fine grid, 4x4 coarse
    idx = model.fine_indices(torch.tensor([[0, 5, 15]]))
    assert idx.tolist() == [[0, 1, 8, 9, 18, 19, 26, 27, 54, 55, 62, 63]]


def test_selection_uses_global_class_attention() -> None:
    model = convert("deit", ["model.alpha=0.25"])
    perturb(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        coarse = model.forward_coarse(x)
        # Make GCA prefer the last 4 coarse patches: the fine stage must re-split exactly those.
        coarse["gca"] = torch.arange(16.0).repeat(2, 1)
        out_a = model.forward_fine(x, coarse)
        x2 = x.clone()
        x2[:, :, :16, :] += 5.0  # change only the top half of the image (coarse rows 0-1)
        coarse2 = model.forward_coarse(x2)
        coarse2["gca"] = coarse["gca"]
        coarse2["embedded"] = coarse["embedded"]
        coarse2["tokens"] = coarse["tokens"]
        out_b = model.forward_fine(x2, coarse2)
    # the top half is only visible through unselected coarse embeddings, which were held fixed
    torch.testing.assert_close(out_a, out_b, atol=1e-5, rtol=1e-5)


def test_training_step_and_losses() -> None:
    model = convert("deit")
    model.train()
    x = torch.randn(4, 3, 32, 32)
    out = model.forward_train(x)
    assert set(out) == {"logits", "coarse_logits"}
    losses = model.method_losses(out, None)
    assert set(losses) == {"coarse_kl"} and losses["coarse_kl"].item() >= 0
    (out["logits"].logsumexp(-1).mean() + losses["coarse_kl"]).backward()
    assert model.reuse[-1].weight.grad is not None and model.reuse[-1].weight.grad.abs().sum() > 0
    assert model.pos_embed_coarse.grad is not None


def test_coarse_cross_entropy_is_opt_in() -> None:
    labels = torch.tensor([0, 3, 9, 1])
    x = torch.randn(4, 3, 32, 32)
    assert set(convert("deit").train().method_losses(convert("deit").forward_train(x), labels)) == {"coarse_kl"}
    model = convert("deit", ["finetune.losses.coarse_ce=0.5"]).train()
    out = model.forward_train(x)
    losses = model.method_losses(out, labels)
    assert losses["coarse_ce"].item() == pytest.approx(F.cross_entropy(out["coarse_logits"], labels).item(), rel=1e-6)
    assert set(model.method_losses(out, None)) == {"coarse_kl"}  # no labels, no cross-entropy


def test_added_parts_learning_rate_scale() -> None:
    from vitconvert.train import _param_groups

    assert all(g["lr_scale"] == 1.0 for g in _param_groups(convert("deit", ["model.new_lr_scale=1"]), 0.05))
    model = convert("deit", ["model.new_lr_scale=10"])
    added = {id(model.pos_embed_coarse), *(id(p) for p in model.reuse.parameters())}
    groups = _param_groups(model, 0.05)
    for g in groups:
        ids = {id(p) for p in g["params"]}
        assert g["lr_scale"] == (10.0 if ids <= added else 1.0) and (ids <= added or not ids & added)
    assert {id(p) for g in groups if g["lr_scale"] == 10.0 for p in g["params"]} == added


def test_save_load_round_trip(tmp_path) -> None:
    model = convert("deit_distilled")
    perturb(model)
    model.eta = 0.4
    path = vitconvert.save(model, tmp_path / "m")
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        ref = model.forward_dynamic(x)
        loaded = vitconvert.load(path)
        got = loaded.forward_dynamic(x)
        via_timm = timm.create_model(f"local-dir:{path}", pretrained=True).eval()(x)
    assert loaded.eta == 0.4 and loaded.alpha == model.alpha
    assert torch.equal(got.logits, ref.logits) and torch.equal(got.stage, ref.stage)
    assert torch.equal(via_timm, ref.logits)


def test_set_budget_picks_from_curve() -> None:
    from vitconvert.operating import CurvePoint

    model = convert("deit")
    model.base_gmacs = 1.0
    model.calibration = {"base_top1": 80.0}
    model.curve = [CurvePoint({"eta": 0.2}, 0.3, 70.0), CurvePoint({"eta": 0.5}, 0.45, 78.0),
                   CurvePoint({"eta": 0.8}, 0.6, 79.8), CurvePoint({"eta": 1.0}, 1.0, 80.0)]
    assert model.set_budget("50%").knob == 0.5 and model.eta == 0.5
    assert model.set_budget(0.61).knob == 0.8
    assert model.set_budget("drop=0.5").knob == 0.8
    with pytest.raises(UserError, match="not understood"):
        model.set_budget("half")


def test_rejects_unsupported_bases() -> None:
    arch, kwargs = TINY_MODELS["vit"]
    with pytest.raises(UserError, match="has neither: it pools with 'avg' and has no class token"):
        vitconvert.apply(arch, "cfvit", model_kwargs={**kwargs, "class_token": False, "global_pool": "avg"},
                         pretrained=False, overrides=["model.gca_start_block=1"])
    with pytest.raises(UserError, match="grid 8x8 must be twice the coarse grid"):
        vitconvert.apply(arch, "cfvit", model_kwargs=kwargs, pretrained=False,
                         overrides=["model.gca_start_block=1", "model.coarse_grid_ratio=0.3"])


def test_wrong_image_size_is_a_clear_error() -> None:
    model = convert("deit")
    with pytest.raises(ValueError, match="expected 32x32 images"):
        model(torch.randn(1, 3, 64, 64))


# --- SigLIP (attention-pooling head) and EVA (rotary embedding) on the token path -------------------------------


def test_pool_scores_are_the_pooling_heads_attention() -> None:
    """Without a class token, the coarse pass scores each patch by the attention the pooling head's latent query
    pays it (mean over heads), computed here by hand from the head's weights."""
    model = convert("siglip")
    assert model.scorer == "pool" and all(t is None for t in model._graphs["tapped"])
    base = model.base
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        coarse = model.forward_coarse(x)
        pool = base.attn_pool
        xn = base.norm(coarse["tokens"])
        b, n, _ = xn.shape
        q = pool.q(pool.latent).reshape(1, -1, pool.num_heads, pool.head_dim).transpose(1, 2)
        k = pool.kv(xn).reshape(b, n, 2, pool.num_heads, pool.head_dim).permute(2, 0, 3, 1, 4)[0]
        attn = ((q * pool.scale) @ k.transpose(-2, -1)).softmax(-1)  # (B, heads, latents, N)
        assert coarse["gca"].shape == (3, 16)
        torch.testing.assert_close(coarse["gca"], attn.mean(dim=(1, 2)), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(coarse["logits"], base.forward_head(xn), atol=1e-6, rtol=1e-5)


def test_eva_coarse_pass_is_the_model_at_half_the_grid() -> None:
    """The coarse pass runs EVA at the coarse grid as timm does (rotary embedding recomputed for it): the timm model
    resized to 16 px, given the same coarse position embedding, returns the same logits."""
    model = convert("eva02")
    resized = model.build_base()
    resized.set_input_size(img_size=(16, 16))
    with torch.no_grad():
        resized.pos_embed.copy_(model.pos_embed_coarse)
    x = torch.randn(3, 3, 32, 32)
    xc = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False, antialias=True)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_coarse(x)["logits"], resized(xc), atol=1e-5, rtol=1e-5)
    assert not torch.equal(model.coarse_rope, model.base.rope.pos_embed[:16])


def test_eva_mixed_sequence_rotary_rows() -> None:
    """In the fine pass a fine patch keeps its own rotary row and a coarse patch gets the mean of its 2x2 positions'
    rows, so a query scores a coarse key as the mean of its scores against that key at the four positions."""
    from timm.layers import apply_rot_embed_cat

    model = convert("eva02", ["model.alpha=0.25"])
    table = model.base.rope.pos_embed  # (64, E) on the 8x8 grid
    fine_idx = model.fine_indices(torch.tensor([[5], [0]]))  # (2, 4)
    kept = torch.tensor([[0, 1, 15], [3, 5, 6]])
    rows = model._mixed_rows(table, fine_idx, kept)
    assert rows.shape == (2, 1, 7, table.shape[-1])
    torch.testing.assert_close(rows[0, 0, :4], table[[18, 19, 26, 27]])
    torch.testing.assert_close(rows[1, 0, 6], table[[20, 21, 28, 29]].mean(0))  # coarse patch 6: row 1, column 2
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, table.shape[-1] // 2), torch.randn(1, 1, 1, table.shape[-1] // 2)
    qr = apply_rot_embed_cat(q, table[40:41])
    coarse_score = qr @ apply_rot_embed_cat(k, rows[1, :, 6:7]).transpose(-2, -1)
    per_position = torch.stack([qr @ apply_rot_embed_cat(k, table[i:i + 1]).transpose(-2, -1)
                                for i in (20, 21, 28, 29)])
    torch.testing.assert_close(coarse_score, per_position.mean(0))
    # and the fine pass runs a mixed sequence whose images are independent of each other
    perturb(model)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        coarse = model.forward_coarse(x)
        both = model.forward_fine(x, coarse)
        alone = model.forward_fine(x[1:2], {k: v[1:2] for k, v in coarse.items()})
    torch.testing.assert_close(both[1:2], alone, atol=1e-5, rtol=1e-5)


def convert_beit(overrides: list[str] | None = None, fused: bool = True) -> CFViT:
    """The tiny BEiT with random relative position bias tables (timm starts them at zero, which would hide them)."""
    base, _, _ = tiny_model("beit")
    torch.manual_seed(5)
    with torch.no_grad():
        for blk in base.blocks:
            blk.attn.relative_position_bias_table.normal_(0, 0.5)
            blk.attn.fused_attn = fused
    return vitconvert.apply(base, "cfvit", overrides=["model.gca_start_block=1", *(overrides or [])])


def averaging_matrix(positions: torch.Tensor, prefix: int, grid: tuple[int, int]) -> torch.Tensor:
    """(T,) sequence positions (see CFViT._pair_bias) -> the dense (T, S) matrix averaging each token's positions."""
    gh, gw = grid
    size = prefix + gh * gw
    m = torch.zeros(len(positions), size)
    for i, pos in enumerate(positions.tolist()):
        if pos < size:
            m[i, pos] = 1.0
        else:
            r, c = divmod(pos - size, gw // 2)
            for dy in (0, 1):
                for dx in (0, 1):
                    m[i, prefix + (2 * r + dy) * gw + 2 * c + dx] = 0.25
    return m


def test_beit_position_bias_of_coarse_and_mixed_sequences() -> None:
    """The bias of a coarse or mixed sequence is M B M^T (M averages each token's grid positions); the full
    sequence in order gets B itself, so full compute is the base model."""
    model = convert_beit(["model.alpha=0.25"])
    base = model.build_base()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert (model.full_compute()(x) - base(x)).abs().max() <= 1e-4
        bias = model._graphs["biases"][2]()  # (1, heads, 65, 65)
        torch.testing.assert_close(bias, base.blocks[2].attn._get_rel_pos_bias())
        full = torch.arange(65)[None]
        torch.testing.assert_close(model._pair_bias(bias, full, 1), bias)
        fine_idx = model.fine_indices(torch.tensor([[9], [2]]))
        kept = torch.tensor([[0, 4, 15], [1, 3, 8]])
        mixed = torch.cat([torch.zeros(2, 1, dtype=torch.long), 1 + fine_idx, 65 + kept], dim=1)
        coarse = torch.cat([torch.zeros(1), 65 + torch.arange(16)]).long()[None]
        for positions in (mixed, coarse):
            got = model._pair_bias(bias, positions, positions.shape[0])
            for i, pos in enumerate(positions):
                m = averaging_matrix(pos, 1, (8, 8))
                torch.testing.assert_close(got[i], m @ bias[0] @ m.T, atol=1e-6, rtol=1e-5)


def test_beit_class_attention_includes_the_bias() -> None:
    """GCA reads the class row of the attention the block computes, bias included: the same with fused attention
    (the row recomputed from q, k and the SDPA mask) and with explicit softmax (the row sliced)."""
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        gca = convert_beit(fused=True).forward_coarse(x)["gca"]
        reference = convert_beit(fused=False).forward_coarse(x)["gca"]
    torch.testing.assert_close(gca, reference, atol=1e-6, rtol=1e-5)
    assert gca.std() > 0


# --- PVT-v2: the region path ---------------------------------------------------------------------------------


def convert_pvt(overrides: list[str] | None = None, arch: str | None = None, seed: int = 0) -> CFViT:
    tiny, kwargs = TINY_MODELS["pvt_v2"]
    torch.manual_seed(seed)
    return vitconvert.apply(arch or tiny, "cfvit", model_kwargs={} if arch else kwargs, pretrained=False,
                            overrides=overrides)


def test_pvt_full_compute_reproduces_base_and_round_trips(tmp_path) -> None:
    model = convert_pvt()
    assert model.hierarchical and model.coarse_img_size == (32, 32)
    base = model.build_base()
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        ref = base(x)
        assert (model.full_compute()(x) - ref).abs().max() <= 1e-4
    perturb(model)
    model.set_operating_point({"eta": 0.3, "alpha": 0.5})
    path = vitconvert.save(model, tmp_path / "m")
    loaded = vitconvert.load(path)
    with torch.no_grad():
        a, b = model.forward_dynamic(x), loaded.forward_dynamic(x)
    torch.testing.assert_close(a.logits, b.logits, atol=0, rtol=0)
    assert torch.equal(a.gmacs, b.gmacs) and loaded.alpha == 0.5
    via_timm = timm.create_model(f"local-dir:{path}", pretrained=True)
    with torch.no_grad():
        torch.testing.assert_close(via_timm.forward_dynamic(x).logits, a.logits, atol=0, rtol=0)


def test_pvt_full_compute_on_pvt_v2_b1_at_224() -> None:
    model = convert_pvt(arch="pvt_v2_b1")
    assert model.coarse_final_grid == (4, 4) and model.region_grids == [(28, 28), (14, 14), (7, 7), None]
    base = model.build_base()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert (model.full_compute()(x) - base(x)).abs().max() <= 1e-4


def test_pvt_scores_decompose_the_predicted_logit() -> None:
    """Region scores are each coarse token's share of the predicted logit: their mean plus the head's bias is that
    logit (average pooling and a linear head)."""
    model = convert_pvt(arch="pvt_v2_b0")
    model.eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        coarse = model._coarse_regions(x)
        pred = coarse["logits"].argmax(-1)
        bias = model.base.get_submodule(model.anatomy.head[0]).bias[pred]
        logit = coarse["logits"].gather(1, pred[:, None]).squeeze(1)
    assert coarse["scores"].shape == (2, 4, 4)
    torch.testing.assert_close(coarse["scores"].flatten(1).mean(1) + bias, logit, atol=1e-4, rtol=1e-4)


def test_pvt_region_gates_follow_the_scores() -> None:
    model = convert_pvt(arch="pvt_v2_b0")
    model.alpha = 0.25
    scores = torch.zeros(1, 4, 4)
    scores[0, 0, 3] = 5.0  # the top-right coarse cell is the informative one
    gates = model.region_gates(scores)
    assert [g.shape[1] for g in gates] == [28 * 28, 14 * 14, 7 * 7, 0]  # the 7x7 last map: no 2x2 regions
    for g, grid in zip(gates[:3], model.region_grids[:3], strict=True):
        assert grid is not None
        rh, rw = grid
        grid = g.view(rh, rw)
        assert int((grid == 0).sum()) == -(-rh * rw // 4)  # ceil(alpha * regions) refined
        assert int(grid[0, -1]) == 0 and int(grid[-1, 0]) == 1  # the top-right corner first, not the bottom-left


def test_pvt_fine_pass_computes_only_the_chosen_regions() -> None:
    """At alpha < 1 the fine stage's counted MACs (what the sparse path runs) fall with alpha, below the base
    model's; the cascade charges exactly those."""
    model = convert_pvt(arch="pvt_v2_b0")
    costs = {}
    for alpha in (1.0, 0.5, 0.25):
        model.alpha = alpha
        costs[alpha] = model.costs["fine"]
    assert costs[0.25] < costs[0.5] < costs[1.0] and costs[0.5] < 0.8 * model.base_gmacs
    assert model.costs["coarse"] < 0.3 * model.base_gmacs
    model.eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad(), model.counted_execution():
        counted = vitconvert.count_macs(lambda: model.forward_dynamic(x[:1])) / 1e9
        out = model.forward_dynamic(x)
    assert out.gmacs[0].item() == pytest.approx(counted, rel=1e-5)
    assert out.gmacs[0].item() == pytest.approx(model.costs["coarse"] + model.costs["fine"], rel=1e-6)


def test_pvt_recipe_refines_every_region_where_the_blocks_run_as_the_base() -> None:
    """The recipe's PVT-v2 section sets alpha 1: the fine stage is then the base blocks themselves (no region tables,
    in eager, exported and compiled graphs alike), charged the base model's MACs plus the reuse layer's."""
    model = convert_pvt()
    assert model.alpha == 1.0 and model.recipe.family == "pvt_v2"
    with torch.no_grad():
        coarse = model._coarse_regions(torch.zeros(1, 3, 64, 64))
        reuse = vitconvert.count_macs(lambda: model.reuse(coarse["tokens"], 0, model.coarse_final_grid,
                                                          model.stage_grids[0])) / 1e9
    assert model.costs["fine"] == pytest.approx(model.base_gmacs + reuse, rel=1e-6)
    assert convert_pvt(["model.alpha=0.5"]).alpha == 0.5  # --set wins over the family section


def test_pvt_region_path_exports_at_a_partial_alpha(tmp_path) -> None:
    """The conformance suite exports the recipe's point (alpha 1 on PVT-v2); the region machinery of alpha < 1 is
    exported here: onnxruntime reproduces the eager logits and exits with some images refined and some exited."""
    ort = pytest.importorskip("onnxruntime")
    model = convert_pvt(["model.alpha=0.5"])
    perturb(model)
    model.eval()
    x = torch.randn(5, 3, 64, 64)
    with torch.no_grad():
        conf = model.collect(x)["coarse"].softmax(-1).amax(-1)
    ordered = conf.sort(descending=True).values  # halfway between two images: no confidence on the threshold
    model.set_operating_point({"eta": float(ordered[1] + ordered[2]) / 2, "alpha": 0.5})
    with torch.no_grad():
        eager = model.forward_dynamic(x)
    assert 0 < int((eager.stage == 0).sum()) < 5
    path = vitconvert.export(model, tmp_path / "m.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits, exits = session.run(["logits", "exit"], {"pixel_values": x.numpy()})
    assert float(abs(logits - eager.logits.numpy()).max()) <= 1e-4
    assert (exits == eager.stage.numpy()).all()


def test_pvt_training_step_moves_the_reuse_layer() -> None:
    model = convert_pvt()
    model.train()
    x = torch.randn(2, 3, 64, 64)
    out = model.forward_train(x)
    assert out["logits"].shape == out["coarse_logits"].shape == (2, 10)
    loss = out["logits"].sum() + model.method_losses(out, None)["coarse_kl"]
    loss.backward()
    assert model.reuse.proj.weight.grad is not None and model.reuse.proj.weight.grad.abs().sum() > 0


def test_pvt_rejects_what_the_region_path_cannot_run() -> None:
    with pytest.raises(UserError, match=r"coarse_grid_ratio must be 0\.5"):
        convert_pvt(["model.coarse_grid_ratio=0.25"])
    tiny, kwargs = TINY_MODELS["pvt_v2"]
    with pytest.raises(UserError, match="at half the input size, which must keep whole maps"):
        vitconvert.apply(tiny, "cfvit", model_kwargs={**kwargs, "pretrained_cfg_overlay": {"input_size": (3, 80, 80)}},
                         pretrained=False)


# --- Swin: the region path by whole windows ------------------------------------------------------------------


def convert_swin(overrides: list[str] | None = None, arch: str | None = None, key: str = "swin",
                 **kwargs: object) -> CFViT:
    tiny, tiny_kwargs = TINY_MODELS[key]
    torch.manual_seed(0)
    model = vitconvert.apply(arch or tiny, "cfvit", model_kwargs={} if arch else {**tiny_kwargs, **kwargs},
                             pretrained=False, overrides=overrides)
    wake_post_norms(model)
    return model


def wake_post_norms(model: CFViT) -> None:
    """SwinV2 starts its residual post-norms at zero (a random-init block is the identity): weights around 1, so
    every block computes something (base weights: ``build_base`` holds them too). Nothing to do on Swin."""
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for m in model.base.modules():
            if isinstance(m, torch.nn.LayerNorm) and not m.weight.any():
                m.weight.copy_(1.0 + 0.2 * torch.randn(m.weight.shape, generator=g))


def timm_at_half_size(model: CFViT, arch: str, kwargs: dict) -> torch.nn.Module:
    """timm's model built for the half-size image with ``model``'s base weights, the relative position bias table of
    each block whose window shrank (a map smaller than the window) cut from the block's own at the offsets it has."""
    size = model.coarse_img_size
    ref = timm.create_model(arch, pretrained=False, **{**kwargs, "img_size": size}).eval()
    target = ref.state_dict()
    state = {}
    for k, v in model.build_base().state_dict().items():
        if v.shape != target[k].shape:  # a relative position bias table of a smaller window: its centre
            big, small = math.isqrt(v.shape[0]), math.isqrt(target[k].shape[0])
            off = (big - small) // 2
            v = v.view(big, big, -1)[off:off + small, off:off + small].reshape(small * small, -1)
        state[k] = v
    ref.load_state_dict(state)
    return ref


def coarse_matches_timm(model: CFViT, ref: torch.nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        coarse = model._coarse_regions(x)
        expected = ref(F.interpolate(x, size=model.coarse_img_size, mode="bilinear", align_corners=False,
                                     antialias=True))
    torch.testing.assert_close(coarse["logits"], expected, atol=1e-5, rtol=1e-5)


def test_swin_coarse_pass_is_timm_built_for_the_half_size_image() -> None:
    """The coarse pass is timm's Swin built for the half-size image (each block's windows by timm's rule: a map no
    larger than the window is one unshifted window) with the same weights, a shrunk window's relative position bias
    table cut from the block's own at the offsets it has."""
    model = convert_swin().eval()
    arch, kwargs = TINY_MODELS["swin"]
    ref = timm_at_half_size(model, arch, kwargs)
    shrunk = [k for k, v in ref.state_dict().items() if k.endswith("relative_position_bias_table")
              and v.shape != model.base.state_dict()[k].shape]
    assert len(shrunk) == 3  # stages 3 (2x2 map) and 4 (1x1) of the 16-px image
    x = torch.randn(3, 3, 32, 32)
    coarse_matches_timm(model, ref, x)
    assert model.coarse_final_grid == (1, 1)


@functools.cache
def _swin_tiny() -> CFViT:
    return convert_swin(arch="swin_tiny_patch4_window7_224").eval()


def test_swin_full_compute_on_swin_tiny_at_224() -> None:
    model = copy.deepcopy(_swin_tiny())
    # every block refined by windows (7-token windows shifted by 3 split no 2x2 region)
    assert len(model._window_blocks) == 12 and model._full_blocks == [] and model.coarse_final_grid == (4, 4)
    base = model.build_base()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert (model.full_compute()(x) - base(x)).abs().max() <= 1e-4
    # the coarse pass at 112 px: shifted 7x7 windows on the 28 and 14 maps (masks made for them), one window on the
    # 7x7 map (unshifted), a 4x4 window on the last map
    coarse_matches_timm(model, timm_at_half_size(model, "swin_tiny_patch4_window7_224", {}), x)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("pretrained", [(0, 0), (6, 6)])
def test_swinv2_bias_of_a_smaller_window_is_timms_for_that_window(pretrained: tuple[int, int]) -> None:
    """A SwinV2 window other than the block's own gets the continuous bias timm computes once the attention is set to
    that window (``set_window_size``): coordinates normalised by the pretraining window when there is one, else by
    the window itself, then the MLP and ``16 * sigmoid``."""
    arch, kwargs = TINY_MODELS["swinv2"]
    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False, **kwargs, pretrained_window_sizes=[pretrained[0]] * 4)
    block = model.layers[1].blocks[1]  # 4x4 windows, shifted
    view = SwinV2Windows(block)
    for window in ((2, 2), (1, 1), (4, 2)):
        ref = copy.deepcopy(block.attn)
        ref.set_window_size(window)
        assert torch.equal(relative_coords(window, pretrained, torch.device("cpu")), ref.relative_coords_table)
        n, h = window[0] * window[1], ref.num_heads
        table = ref.cpb_mlp(ref.relative_coords_table).view(-1, h)
        expected = 16 * torch.sigmoid(table[ref.relative_position_index.view(-1)].view(n, n, h).permute(2, 0, 1))
        assert torch.equal(view.relative_bias(window), expected)
    # the coordinates of an offset move with the window unless a pretraining window fixes them
    small, own = relative_coords((2, 2), pretrained, torch.device("cpu")), block.attn.relative_coords_table
    assert torch.equal(small[0, 2, 2], own[0, 4, 4]) == (pretrained != (0, 0))


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("pretrained", [0, 6])
def test_swinv2_coarse_pass_is_timm_built_for_the_half_size_image(pretrained: int) -> None:
    """The coarse pass is timm's SwinV2 built for the half-size image with the same weights: windows by timm's rule
    (a map no larger than the window is one unshifted window), the continuous bias of each shrunk window as timm
    derives it (normalised by ``pretrained_window_size`` when set), post-norm blocks."""
    sizes = [pretrained] * 4
    model = convert_swin(key="swinv2", pretrained_window_sizes=sizes).eval()
    arch, kwargs = TINY_MODELS["swinv2"]
    ref = timm.create_model(arch, pretrained=False, **{**kwargs, "pretrained_window_sizes": sizes,
                                                       "img_size": model.coarse_img_size}).eval()
    ref.load_state_dict(model.build_base().state_dict())
    windows = [tuple(b.window_size) for stage in ref.layers for b in stage.blocks]
    assert windows == [(4, 4)] * 3 + [(2, 2)] * 2 + [(1, 1)]  # stages 3 (2x2 map) and 4 (1x1) shrink
    x = torch.randn(3, 3, 32, 32)
    coarse_matches_timm(model, ref, x)
    # the bias of the shrunk windows matters: another normalisation differs (for pretrained 0 that is Swin's rule,
    # each offset the value it has in the block's own 4x4 window)
    with torch.no_grad():
        for stage in ref.layers[2:]:
            for blk in stage.blocks:
                blk.attn.pretrained_window_size = (4, 4) if pretrained == 0 else (3, 3)
                blk.attn.init_non_persistent_buffers()
        xc = F.interpolate(x, size=model.coarse_img_size, mode="bilinear", align_corners=False, antialias=True)
        assert (model._coarse_regions(x)["logits"] - ref(xc)).abs().max() > 1e-4


@pytest.mark.usefixtures("one_thread")
def test_swinv2_full_compute_and_round_trip_on_swinv2_tiny_at_256(tmp_path) -> None:
    """swinv2_tiny_window8_256 (random init, post-norms woken): exact at full compute, the coarse pass at 128 px is
    timm's model built for it (shifted 8x8 windows on the 32 and 16 maps, one on the 8x8 map, 4x4 on the last), and
    a point that refines half the windows saves and loads through vitconvert and timm."""
    model = convert_swin(arch="swinv2_tiny_window8_256").eval()
    assert len(model._window_blocks) == 12 and model._full_blocks == [] and model.coarse_final_grid == (4, 4)
    base = model.build_base()
    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        assert (model.full_compute()(x) - base(x)).abs().max() <= 1e-4
    ref = timm.create_model("swinv2_tiny_window8_256", pretrained=False, img_size=128).eval()
    ref.load_state_dict(base.state_dict())
    coarse_matches_timm(model, ref, x)
    model.set_operating_point({"eta": 1.0, "alpha": 0.5})
    path = vitconvert.save(model, tmp_path / "m")
    with torch.no_grad():
        expected = model(x)
        assert (expected - base(x)).abs().max() > 1e-2  # half the windows coarse
        assert torch.equal(vitconvert.load(path)(x), expected)
        assert torch.equal(timm.create_model(f"local-dir:{path}", pretrained=True).eval()(x), expected)


def test_swin_window_gates_follow_the_scores() -> None:
    model = copy.deepcopy(_swin_tiny())
    model.alpha = 0.25
    scores = torch.zeros(1, 4, 4)
    scores[0, 0, 3] = 5.0  # the top-right coarse cell is the informative one
    gates = model.window_gates(scores)
    counts = {i: g.shape[1] for i, g in gates.items()}
    assert counts == {0: 64, 1: 64, 2: 16, 3: 16, **{i: 4 for i in range(4, 10)}, 10: 1, 11: 1}
    for g in gates.values():
        assert int((g == 0).sum()) == -(-g.shape[1] // 4)  # ceil(alpha * windows) refined
    first = gates[0].view(8, 8)  # unshifted 7x7 windows of the 56x56 map
    assert int(first[0, -1]) == 0 and int(first[-1, 0]) == 1  # the top-right window first, not the bottom-left
    assert int(gates[10].sum()) == 0  # one window per image: always refined


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("key", ["swin", "swinv2"])
def test_swin_fine_pass_refines_whole_windows(key: str) -> None:
    """At alpha < 1 the fine stage's counted MACs fall with alpha; an image's GMACs are what its path counts, and
    in each refined block every window runs at one level (the split path: no per-query gathers). SwinV2's blocks
    are post-norm with cosine attention: its unrefined windows run DGE's coarse level through the same block."""
    model = convert_swin(key=key)
    costs = {}
    for alpha in (1.0, 0.5, 0.25):
        model.alpha = alpha
        costs[alpha] = model.costs["fine"]
    assert costs[0.25] < costs[0.5] < costs[1.0] and costs[0.5] < model.base_gmacs
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        with model.counted_execution():
            counted = vitconvert.count_macs(lambda: model.forward_dynamic(x[:1])) / 1e9
            out = model.forward_dynamic(x)
        assert out.gmacs[0].item() == pytest.approx(counted, rel=1e-5)
        records = []
        run = model._ctx.run

        @contextlib.contextmanager
        def keep(mode: str) -> Iterator[list]:
            with run(mode) as rec:
                yield rec
                records.extend(rec)

        model._ctx.run = keep
        model._fine_regions(x, model._coarse_regions(x), "sparse")
    paths = {r.block: r.path for r in records}
    assert paths == {0: "split", 1: "split", 2: "split", 3: "base", 4: "base", 5: "base"}


def test_swin_shift_that_splits_regions_runs_that_block_at_full_resolution() -> None:
    """6-token windows shifted by 3: the masked parts of a shifted window split its 2x2 regions, so an unrefined
    window could not be coarse everywhere; those blocks run at full resolution, the others by windows."""
    model = convert_swin(img_size=48, window_size=6)
    assert model._full_blocks == [2] and 2 not in model._window_blocks and 0 in model._window_blocks
    base = model.build_base()
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        assert (model.full_compute()(x) - base(x)).abs().max() <= 1e-4
        model.set_operating_point({"eta": 1.0, "alpha": 0.25})
        with model.counted_execution():
            counted = vitconvert.count_macs(lambda: model.forward_dynamic(x[:1])) / 1e9
            out = model.forward_dynamic(x)
    assert out.gmacs[0].item() == pytest.approx(counted, rel=1e-5) and out.gmacs[0] == out.gmacs[1]


def test_swin_kept_window_tables_follow_the_weights() -> None:
    """The window blocks keep their bias tables between inference forwards only while the weights they were made
    from are unchanged: an in-place change of the relative position bias is seen at the next forward."""
    model = convert_swin().eval()
    model.set_operating_point({"eta": 1.0, "alpha": 0.5})
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model.forward_dynamic(x).logits
        for name, p in model.named_parameters():
            if name.endswith("relative_position_bias_table"):
                p.mul_(5.0)
        after = model.forward_dynamic(x).logits
        fresh = copy.deepcopy(model).forward_dynamic(x).logits  # a copy starts with no kept tables
    assert not torch.allclose(before, after, atol=1e-4)
    assert torch.equal(after, fresh)
