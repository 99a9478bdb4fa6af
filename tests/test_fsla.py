"""FSLA (BOAT feature-space local attention): the attention-core seam, Swin augment, ViT/PVT-v2 replace."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from utils import TINY_MODELS, tiny_model

import vitconvert
import vitconvert.methods.fsla as fsla_module
from vitconvert.calibration import calibrate
from vitconvert.errors import AnatomyError, UserError
from vitconvert.layers.costs import count_macs
from vitconvert.layers.seams import replace_attention_core
from vitconvert.train import finetune

pytestmark = pytest.mark.usefixtures("one_thread")


class _Plain(nn.Module):
    """An attention core that is plain SDPA (what the block computed), recording that it ran."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, q, k, v, dropout=None, **sdpa):
        self.calls += 1
        return F.scaled_dot_product_attention(q, k, v, **sdpa)


def _apply(key: str, recipe: str, *overrides: str) -> vitconvert.ConvertedModel:
    arch, kwargs = TINY_MODELS[key]
    torch.manual_seed(0)
    return vitconvert.apply(arch, recipe, model_kwargs=kwargs, pretrained=False, overrides=list(overrides))


def _perturb_projections(model: nn.Module) -> None:
    """Give the zero-initialised FSLA projections values, as fine-tuning would."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".fsla.proj." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


# --- the seam ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["vit", "pvt_v2"])
def test_replace_attention_core_keeps_block_and_state(key: str) -> None:
    model, _, _ = tiny_model(key)
    path = "blocks.1" if key == "vit" else "stages.3.blocks.0"
    block = model.get_submodule(path)
    x = torch.randn(3, 65, 48) if key == "vit" else torch.randn(3, 4, 64)
    extra = () if key == "vit" else ((2, 2),)
    ref = block(x, *extra)
    keys = {k: v.clone() for k, v in model.state_dict().items()}
    core = _Plain()
    new = replace_attention_core(block, core)
    model.set_submodule(path, new)
    assert torch.equal(new(x, *extra), ref) and core.calls == 1
    state = model.state_dict()
    assert state.keys() == keys.keys() and all(torch.equal(state[k], v) for k, v in keys.items())


@pytest.mark.parametrize("key", ["eva02", "beit"])
def test_replace_attention_core_keeps_position_terms(key: str) -> None:
    # EVA's rotary embedding is an optional block input: kept as an input of the replacement (baked to None, the
    # graph would refuse it), it rotates q and k before the core; BEiT's layer scale is a parameter multiplying the
    # attention branch in the block's own forward, and its relative position bias reaches the core as attn_mask.
    model, _, _ = tiny_model(key)
    block = model.blocks[1]
    x = torch.randn(3, 65, 48)
    kwargs = {"rope": model.rope.get_embed(), "attn_mask": None, "is_causal": False} if key == "eva02" else {}
    ref = block(x, **kwargs)
    seen = []

    class Spy(_Plain):
        def forward(self, q, k, v, dropout=None, **sdpa):
            seen.append(sdpa.get("attn_mask"))
            return super().forward(q, k, v, **sdpa)

    new = replace_attention_core(block, Spy(), inputs=["rope"] if key == "eva02" else [])
    assert torch.equal(new(x, **kwargs), ref)
    if key == "eva02":
        assert seen == [None] and not torch.equal(new(x, rope=kwargs["rope"].flip(0)), ref)  # the rope is used
    else:
        assert seen[0].shape == (1, 3, 65, 65) and torch.equal(seen[0], block.attn._get_rel_pos_bias())


def test_replace_attention_core_refusals() -> None:
    model, _, _ = tiny_model("vit")
    model.blocks[0].attn.fused_attn = False
    with pytest.raises(AnatomyError, match="fused_attn"):
        replace_attention_core(model.blocks[0], _Plain())
    with pytest.raises(ValueError, match="free attribute"):
        replace_attention_core(model.blocks[1], _Plain(), name="attn")


def test_replace_attention_core_follows_dropout_at_run_time() -> None:
    model, _, _ = tiny_model("vit")
    block = model.blocks[0]
    block.attn.attn_drop.p = 0.5
    seen = []

    class Spy(_Plain):
        def forward(self, q, k, v, dropout=None, **sdpa):
            seen.append((dropout.training, sdpa["dropout_p"]))
            return super().forward(q, k, v, **sdpa)

    new = replace_attention_core(block, Spy())
    new.train()
    new(torch.randn(1, 65, 48))
    new.eval()
    new(torch.randn(1, 65, 48))
    assert [s[0] for s in seen] == [True, False]


# --- augment (Swin) ---------------------------------------------------------------------------------------


def test_augment_picks_shifted_blocks_where_the_grid_exceeds_the_window() -> None:
    m = _apply("swin", "fsla")
    # Tiny Swin: 16x16, 8x8, 4x4, 2x2 grids with 4x4 windows and depths (1, 2, 2, 1): only stage 1's
    # second block (index 2) is shifted with a grid larger than the window.
    assert m.fsla_blocks == [2]
    assert m.cluster_size == 16 and m.operating_space().full() == {"cluster_size": 16.0}
    assert [k for k in m.state_dict() if ".fsla." in k] == [
        f"base.layers.1.blocks.1.fsla.{n}" for n in ("norm.weight", "norm.bias", "qkv.weight", "qkv.bias",
                                                     "pos.weight", "pos.bias", "proj.weight", "proj.bias")]
    block = m.base.layers[1].blocks[1]
    assert torch.equal(block.fsla.qkv.weight, block.attn.qkv.weight)  # init_from_window
    assert not block.fsla.proj.weight.any()
    assert m.lr_scales() == {"base.layers.1.blocks.1.fsla": 10.0}


@pytest.mark.parametrize("cluster_size", [0, 4, 16, 64])
def test_augment_is_exact_at_any_cluster_size_until_trained(cluster_size: int) -> None:
    m = _apply("swin", "fsla")
    base = m.build_base()
    x = torch.randn(3, 3, 32, 32)
    m.set_operating_point(cluster_size=cluster_size)
    with torch.no_grad():
        assert torch.equal(m(x), base(x))


@pytest.mark.parametrize("cluster_size", [0, 4, 16])
def test_augment_gmacs_match_counted_and_branch_changes_output(cluster_size: int) -> None:
    m = _apply("swin", "fsla", "model.stages=[0,1,2]")
    _perturb_projections(m)
    m.set_operating_point(cluster_size=cluster_size)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        out = m.forward_dynamic(x)
        ref = m.build_base()(x)
    counted = count_macs(lambda: m(x)) / 3 / 1e9
    assert out.gmacs.shape == (3,) and m.gmacs_at() == pytest.approx(counted, rel=1e-12)
    assert float(out.gmacs[0]) == pytest.approx(counted, rel=1e-6)
    if cluster_size:
        assert counted > m.base_gmacs and (out.logits - ref).abs().max() > 1e-3
    else:
        assert counted == pytest.approx(m.base_gmacs, abs=1e-12) and torch.equal(out.logits, ref)


NO_OVERHEAD = "model.clustering_overhead=0"  # tiny grids: let MACs alone decide, so clustering really runs


def test_augment_inference_in_batch_slices_equals_the_whole_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    # Inference runs each FSLA sub-layer on slices of the batch (5 images in slices of 2, 2, 1 here); with
    # gradients it runs whole. Both must give the logits of the whole batch at once, and the gradient path
    # must still train the sub-layer.
    m = _apply("swin", "fsla")
    _perturb_projections(m)
    m.set_operating_point(cluster_size=8)
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        whole = m(x)
    per_image = 3 * 8 * 8 * m.base.layers[1].blocks[1].fsla.proj.in_features * 4  # qkv bytes of one 8x8 image
    monkeypatch.setattr(fsla_module, "SLICE_BYTES", 2 * per_image)
    branch = m.base.layers[1].blocks[1].fsla
    slices = []
    update = branch._update
    monkeypatch.setattr(branch, "_update", lambda t, out=None: slices.append(t.shape[0]) or update(t, out))
    with torch.no_grad():
        sliced = m(x)
    assert slices == [2, 2, 1]
    calls = []
    handle = branch.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape[0]))
    torch.testing.assert_close(sliced, whole, atol=1e-5, rtol=1e-5)
    assert (sliced - m.build_base()(x)).abs().max() > 1e-3  # the sub-layer really contributes
    out = m(x)  # eval mode, gradients on: one call over the whole batch
    out.square().mean().backward()
    handle.remove()
    assert calls == [5]  # the hook sees the sub-layer's call, not its slices
    assert branch.proj.weight.grad is not None and branch.proj.weight.grad.abs().sum() > 0
    torch.testing.assert_close(out.detach(), whole, atol=1e-5, rtol=1e-5)


def test_augment_round_trip_after_training(tmp_path: Path) -> None:
    m = _apply("swin", "fsla")
    _perturb_projections(m)
    m.set_operating_point(cluster_size=8)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = m(x)
    path = vitconvert.save(m, tmp_path / "m")
    loaded = vitconvert.load(path)
    assert loaded.operating_point == {"cluster_size": 8.0}
    via_timm = timm.create_model(f"local-dir:{path}", pretrained=True).eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), out) and torch.equal(via_timm(x), out)


@pytest.mark.slow
def test_swin_tiny_at_224_is_exact_and_adds_boat_cost() -> None:
    torch.manual_seed(0)
    m = vitconvert.apply("swin_tiny_patch4_window7_224", "fsla", pretrained=False)
    assert m.fsla_blocks == [1, 3, 5, 7, 9]  # 1 + 1 + 3 shifted blocks (BOAT-Swin-T)
    added = sum(p.numel() for n, p in m.named_parameters() if ".fsla." in n)
    # The docs' analytic count: 4 C^2 + 16 C parameters per block (LN, qkv, proj, 3x3 depthwise conv).
    assert added == sum(4 * c * c + 16 * c for c in (96, 192, 384, 384, 384))
    assert m.gmacs_at() - m.base_gmacs == pytest.approx(0.71, abs=0.01)  # docs: about 0.70
    base = m.build_base()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert (m(x) - base(x)).abs().max().item() <= 1e-4


@pytest.mark.slow
def test_swin_tiny_runs_in_half_precision_and_under_autocast_with_clustering_active(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """fp16, bf16 and CPU bf16 autocast at the window-area cluster size, where all five sub-layers cluster (Swin-T's
    3136-token first stage once failed here: the clustering's sort read half-precision bits as float32's)."""
    from vitconvert.layers import clustering

    torch.manual_seed(0)
    m = vitconvert.apply("swin_tiny_patch4_window7_224", "fsla", pretrained=False)
    _perturb_projections(m)
    assert m.cluster_size == 49
    dtypes: list[torch.dtype] = []
    real = clustering._cluster
    monkeypatch.setattr(clustering, "_cluster", lambda q, *a, **k: dtypes.append(q.dtype) or real(q, *a, **k))
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        ref = m(x)
        runs = {dt: m.to(dt)(x.to(dt)).float() for dt in (torch.float16, torch.bfloat16)}
        m.float()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            runs["autocast"] = m(x).float()
    assert dtypes == [torch.float32] * 5 + [torch.float16] * 5 + [torch.bfloat16] * 10
    for name, out in runs.items():
        assert (out - ref).abs().max() < 0.05 * ref.abs().max(), name
    m.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the fine-tune's step on a GPU
        loss = m.forward_train(x)["logits"].float().square().mean()
    loss.backward()
    assert len(dtypes) == 25 and all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)


def test_augment_finetunes_and_calibrates(tmp_path: Path) -> None:
    data = tmp_path / "data"
    rng = np.random.default_rng(0)
    for c in range(10):
        d = data / f"class{c}"
        d.mkdir(parents=True)
        colour = np.array([c * 25, 255 - c * 25, 128], dtype=np.float64)
        for i in range(4):
            Image.fromarray(np.clip(colour + rng.normal(0, 40, (32, 32, 3)), 0, 255).astype(np.uint8)).save(
                d / f"{i:02d}.png")
    m = _apply("swin", "fsla", "finetune.batch_size=8", "finetune.epochs=1", "finetune.lr=1e-3",
               "calibrate.holdout=0.25")
    folder = finetune(m, data, tmp_path / "ft", device="cpu", progress=False)
    trained = vitconvert.load(folder)
    proj = trained.base.layers[1].blocks[1].fsla.proj.weight
    assert proj.abs().sum() > 0  # the zero projection learned
    result = calibrate(folder, data, "100%", tmp_path / "cal", device="cpu", progress=False, batch_size=8)
    model = vitconvert.load(result["out"])
    sizes = sorted(p.point["cluster_size"] for p in model.curve)
    assert sizes == [0.0, 8.0, 16.0, 32.0]
    gm = {p.point["cluster_size"]: p.gmacs for p in model.curve}
    assert gm[0.0] == pytest.approx(model.base_gmacs) and gm[0.0] < gm[8.0] <= gm[16.0] <= gm[32.0]


# --- replace (ViT/DeiT, PVT-v2) ---------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["deit_distilled", "vit"])
def test_replace_at_higher_resolution(key: str, tmp_path: Path) -> None:
    m = _apply(key, "fsla_replace", "model.img_size=64", "model.cluster_size=16", "model.clustering_overhead=0")
    assert m.anatomy.img_size == (64, 64) and m.pretrained_cfg["input_size"] == (3, 64, 64)
    assert m.base_spec.model_args["img_size"] == [64, 64] and m.fsla_blocks == [0, 1, 2, 3]
    x = torch.randn(2, 3, 64, 64)
    teacher = m.build_base()  # the dense model at the same resolution, resampled position embeddings
    assert teacher.pos_embed.shape[1] == 256 + m.anatomy.num_prefix_tokens
    with torch.no_grad():
        out = m.forward_dynamic(x)
        dense = teacher(x)
    counted = count_macs(lambda: m(x)) / 2 / 1e9
    assert m.gmacs_at() == pytest.approx(counted, rel=1e-12) and counted < 0.8 * m.base_gmacs
    assert float(out.gmacs[0]) == pytest.approx(counted, rel=1e-6)
    # Random weights attend almost uniformly, so clustering changes the logits little, but it does change them.
    assert (out.logits - dense).abs().max() > 1e-5 and torch.isfinite(out.logits).all()
    m.full_compute()
    with torch.no_grad():
        full = m(x)
        assert (full - dense).abs().max().item() <= 1e-4
        m.set_operating_point(cluster_size=256)  # one cluster holding all 256 patch tokens: the base attention
        assert torch.equal(m(x), full) and m.gmacs_at() == m.base_gmacs
    m.set_operating_point(cluster_size=16)
    path = vitconvert.save(m, tmp_path / "m")
    via_timm = timm.create_model(f"local-dir:{path}", pretrained=True).eval()
    assert tuple(via_timm.pretrained_cfg["input_size"]) == (3, 64, 64)
    with torch.no_grad():
        assert torch.equal(vitconvert.load(path)(x), out.logits) and torch.equal(via_timm(x), out.logits)


def test_replace_pvt_only_where_keys_are_the_queries() -> None:
    m = _apply("pvt_v2", "fsla_replace", "model.img_size=256", "model.cluster_size=8", "model.clustering_overhead=0")
    # sr_ratios (8, 4, 2, 1): only the last stage (block 4, 8x8 tokens at 256 px) has global attention.
    assert m.fsla_blocks == [4]
    x = torch.randn(2, 3, 256, 256)
    with torch.no_grad():
        out = m.forward_dynamic(x)
    counted = count_macs(lambda: m(x)) / 2 / 1e9
    assert m.gmacs_at() == pytest.approx(counted, rel=1e-12) and counted < m.base_gmacs
    assert float(out.gmacs[0]) == pytest.approx(counted, rel=1e-6)
    assert m.operating_space().knobs[0].sweep == (0.0, 32.0, 16.0, 8.0)


class _SDPAShim:
    """``torch.nn.functional`` with ``scaled_dot_product_attention`` replaced (for one timm module's namespace)."""

    def __init__(self, sdpa) -> None:
        self.scaled_dot_product_attention = sdpa

    def __getattr__(self, name: str):
        return getattr(F, name)


@pytest.mark.parametrize(("key", "module"), [("eva02", "eva"), ("beit", "beit")])
def test_replace_eva_and_beit_cluster_what_timm_would_attend(key: str, module: str,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    # Rotary embedding (EVA) and relative position bias (BEiT): the converted model clusters exactly the q, k, v and
    # bias timm's own attention computes. Reference: the unchanged timm model whose SDPA calls run clustered_attention
    # on what timm passes them (q and k rotated per token, the (1, heads, N, N) bias as attn_mask).
    import importlib

    from vitconvert.layers.clustering import clustered_attention

    m = _apply(key, "fsla_replace", "model.img_size=64", "model.cluster_size=16", NO_OVERHEAD)
    assert m.fsla_blocks == [0, 1, 2, 3]
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # trained-like attention: peaked logits and position terms that matter
        for blk in m.base.blocks:
            blk.attn.qkv.weight.mul_(4)
            table = getattr(blk.attn, "relative_position_bias_table", None)
            if table is not None:
                table.copy_(torch.randn(table.shape, generator=g))
    x = torch.randn(2, 3, 64, 64)
    teacher = m.build_base()
    with torch.no_grad():  # features: a random-init head gives logits of about 1e-4
        out = m.base.forward_features(x)
        dense = teacher.forward_features(x)

        def clustered(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None):
            return clustered_attention(q, k, v, 16, 20, 1, bias=attn_mask, scale=scale)

        monkeypatch.setattr(importlib.import_module(f"timm.models.{module}"), "F", _SDPAShim(clustered))
        ref = teacher.forward_features(x)
        monkeypatch.undo()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert (out - dense).abs().max() > 1e-3  # clustering really ran
    counted = count_macs(lambda: m(x)) / 2 / 1e9
    assert m.gmacs_at() == pytest.approx(counted, rel=1e-12) and counted < 0.8 * m.base_gmacs
    m.full_compute()
    with torch.no_grad():
        assert (m(x) - teacher(x)).abs().max().item() <= 1e-4
    if key == "beit":  # the relative position tables learn through the per-cluster gather
        m.set_operating_point(cluster_size=16)
        m.train()
        m.forward_train(x)["logits"].square().sum().backward()
        grad = m.base.blocks[0].attn.relative_position_bias_table.grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_bad_settings_are_one_line_errors() -> None:
    with pytest.raises(UserError, match="Swin"):
        _apply("vit", "fsla")
    with pytest.raises(UserError, match=r"model\.blocks"):
        _apply("vit", "fsla_replace", "model.blocks=[9]")
    with pytest.raises(UserError, match="img_size"):
        _apply("vit", "fsla_replace", "model.img_size=4")
    m = _apply("vit", "fsla_replace")
    with pytest.raises(UserError, match="whole number"):
        m.set_operating_point(cluster_size=2.5)


def test_clustering_overhead_keeps_small_grids_dense() -> None:
    # 256 patch tokens: clustering saves attention MACs, but not once its sorts and gathers are charged.
    cheap = _apply("vit", "fsla_replace", "model.img_size=64", "model.cluster_size=16", "model.clustering_overhead=0")
    costly = _apply("vit", "fsla_replace", "model.img_size=64", "model.cluster_size=16")  # the recipe's 500
    assert cheap.gmacs_at() < cheap.base_gmacs and costly.gmacs_at() == costly.base_gmacs
    assert costly.operating_space().knobs[0].sweep == (0.0,)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(costly(x), costly.build_base()(x))


def test_replace_trains_through_the_clustered_attention() -> None:
    m = _apply("deit", "fsla_replace", "model.img_size=64", "model.cluster_size=16", "model.clustering_overhead=0")
    m.train()
    m.forward_train(torch.randn(3, 3, 64, 64))["logits"].square().sum().backward()
    grad = m.base.blocks[0].attn.qkv.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_augment_at_another_resolution_keeps_the_windows(tmp_path: Path) -> None:
    m = _apply("swin", "fsla", "model.img_size=48")  # grids 24, 12, 6, 3 with 4x4 windows: 36 tokens per leaf
    assert m.fsla_blocks == [2, 4] and m.base_spec.model_args["window_size"] == 4
    assert m.pretrained_cfg["input_size"] == (3, 48, 48) and m.cluster_size == 16
    _perturb_projections(m)
    x = torch.randn(3, 3, 48, 48)
    with torch.no_grad():
        out = m(x)
        path = vitconvert.save(m, tmp_path / "m")
        assert torch.equal(vitconvert.load(path)(x), out)


def test_cluster_map_and_plot(tmp_path: Path) -> None:
    m = _apply("swin", "fsla")
    x = torch.randn(2, 3, 32, 32)
    maps = m.cluster_map(x)  # block 2: an 8x8 grid in 4 clusters of 16
    assert maps.shape == (2, 8, 8) and torch.equal(torch.bincount(maps[1].flatten()), torch.full((4,), 16))
    assert m.plot_decisions(x, tmp_path / "c.png").stat().st_size > 1000
    m.set_operating_point(cluster_size=0)
    assert m.cluster_map(x) is None and m.plot_decisions(x, tmp_path / "none.png") is None
    r = _apply("vit", "fsla_replace", "model.img_size=64", "model.cluster_size=16", NO_OVERHEAD)
    maps = r.cluster_map(torch.randn(1, 3, 64, 64))  # 256 patch tokens (the class token stays global)
    assert maps.shape == (1, 16, 16) and torch.equal(torch.bincount(maps.flatten()), torch.full((16,), 16))
