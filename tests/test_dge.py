"""DGE: exactness at the finest granularity, real sparse inference, GMACs, training, knob, save/load."""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Callable

import pytest
import timm
import torch
from utils import TINY_MODELS, fake_timings, tiny_model

import vitconvert
from benchmarks.common import force_ratio, forced_rho
from vitconvert import calibration
from vitconvert.errors import AnatomyError, UserError
from vitconvert.layers.costs import GIGA, count_macs
from vitconvert.layers.scale_conv import conv_at
from vitconvert.methods.base import DynamicOutput, SmallBatchRule
from vitconvert.methods.dge import DGE, DGEBlock, GateOverride, path_costs, plot_granularity
from vitconvert.timing import Timing

# Grids the region size does not divide: DeiT with a 10x10 grid (like 14x14 at 224 px) and PVT-v2 at 56 px
# (stage grids 14, 7, 4, 2; the last one smaller than a region).
EXTRA_MODELS = {
    "deit_10x10": ("deit_tiny_patch16_224", dict(img_size=40, patch_size=4, embed_dim=48, depth=3, num_heads=3,
                                                 num_classes=10)),
    "pvt_v2_56": ("pvt_v2_b0", dict(embed_dims=(16, 32, 48, 64), depths=(1, 1, 2, 1), num_heads=(1, 2, 3, 4),
                                    num_classes=10, pretrained_cfg_overlay=dict(input_size=(3, 56, 56)))),
    "pvt_v2_li": ("pvt_v2_b2_li", dict(embed_dims=(16, 32, 48, 64), depths=(1, 1, 1, 1), num_heads=(1, 2, 3, 4),
                                       num_classes=10, pretrained_cfg_overlay=dict(input_size=(3, 64, 64)))),
    # EVA blocks with a learned rotary table per head (mixed RoPE): the blocks get a (heads, N, E) table; layer
    # scales at 1 (timm's 1e-5 would hide every difference the tests look for)
    "rope_mixed": ("vit_small_patch16_rope_mixed_224", dict(img_size=32, patch_size=4, embed_dim=48, depth=4,
                                                            num_heads=3, num_classes=10, init_values=1.0)),
}
MODELS = {**TINY_MODELS, **EXTRA_MODELS}
DGE_KEYS = ["vit", "deit", "deit_distilled", "deit3", "pvt_v2", "deit_10x10", "pvt_v2_56", "pvt_v2_li", "swin", "eva02",
            "beit", "swinv2"]


def convert(key: str, overrides: list[str] | None = None, seed: int = 0, recipe: str = "dge",
            execution: str = "sparse") -> DGE:
    """A DGE model of a test architecture; the sparse path always runs unless ``execution`` says otherwise (auto
    would run these tiny blocks densely, and ``count_macs`` counts what runs)."""
    arch, kwargs = MODELS[key]
    torch.manual_seed(seed)
    return vitconvert.apply(arch, recipe, model_kwargs=kwargs, pretrained=False,
                            overrides=[f"model.execution={execution}", *(overrides or [])])


def images(model: DGE, n: int, seed: int = 1) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randn(n, 3, *model.anatomy.img_size)


def randomize_routers(model: DGE, std: float = 2.0, seed: int = 3) -> None:
    """Trained-like routers: the choice differs between images and regions."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for r in model.routers.values():
            r.fc.weight.normal_(0, std / math.sqrt(r.fc.in_features))
            r.fc.bias.normal_(0, 0.5)


# --- structure and exactness ------------------------------------------------------------------------------


def test_recipes_validate() -> None:
    r = vitconvert.load_recipe("dge")
    assert r.settings.granularities == [4, 2, 1] and r.settings.budget_target == 0.5
    assert r.losses.budget == 2.0 and r.losses.distill == 1.0 and r.losses.ce == 1.0
    assert vitconvert.load_recipe("dge_s2").settings.region_size == 2
    assert vitconvert.load_recipe("dge_light").settings.gumbel_tau_final == 0.5
    with pytest.raises(UserError, match=r"model\.granularities.*divide"):
        vitconvert.load_recipe("dge", ["model.granularities=[4,3,1]"])
    with pytest.raises(UserError, match=r"model\.granularities.*finest"):
        vitconvert.load_recipe("dge", ["model.granularities=[2,1]"])
    with pytest.raises(UserError, match=r"unknown key 'model\.region'"):
        vitconvert.load_recipe("dge", ["model.region=4"])


@pytest.mark.parametrize("key", DGE_KEYS)
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_finest_reproduces_base(key: str, layout: str) -> None:
    model = convert(key, [f"model.inference_layout={layout}"])
    wake_post_norms(model)  # SwinV2: blocks that are not the identity
    base = model.build_base()
    x = images(model, 3)
    with torch.no_grad():
        ref = base(x)
        out = model.forward_dynamic(x)  # router argmax at init: the finest granularity everywhere
        assert (out.logits - ref).abs().max().item() <= 1e-4
        assert all((g == 0).all() for k, g in out.extras.items() if k.startswith("granularity."))
        # the dense training path with all-finest gates is the base model too
        force_ratio(model, 1.0)
        train = model.forward_train(x)["logits"]
        force_ratio(model, None)
        assert (train - ref).abs().max().item() <= 1e-4
        # the full-compute knob runs the base blocks themselves
        model.full_compute()
        assert model.knob == 0.0
        full = model.forward_dynamic(x)
        assert torch.equal(full.logits, ref)
        assert torch.allclose(full.gmacs, torch.full((3,), model.base_gmacs))
    # base weights unchanged, under their timm names
    orig = timm.create_model(MODELS[key][0], pretrained=False, **MODELS[key][1])
    assert set(model.base_state_dict()) == set(orig.state_dict())


def test_state_dict_layout() -> None:
    model = convert("deit3")
    keys = list(model.state_dict())
    assert "base.blocks.3.attn.qkv.weight" in keys and "base.blocks.3.ls1.gamma" in keys
    assert "routers.3.fc.weight" in keys and "routers.3.fc.bias" in keys
    assert len(keys) == len(set(keys))
    assert not any(k.startswith("base.") and "router" in k for k in keys)
    assert isinstance(model.base.blocks[3], DGEBlock)
    assert model.base.blocks[3].parts.post_attn == ["ls1", "drop_path1"]
    # every parameter once: routers are registered only at the top level
    params = list(model.parameters())
    assert len(params) == len({id(p) for p in params}) == len(keys)


def test_router_initialisation() -> None:
    model = convert("deit")
    for r in model.routers.values():
        p = r.fc.bias.softmax(-1)
        assert p[0].item() == pytest.approx(0.95, abs=1e-6)
        assert r.fc.bias[0].item() == pytest.approx(0.5 * math.log(38), abs=1e-6)
        assert torch.count_nonzero(r.fc.weight) == 0
    m2 = convert("deit", ["model.router_init_std=0.01"])
    w = m2.routers["0"].fc.weight
    assert 0.005 < w.std().item() < 0.015


def test_pvt_partial_stages() -> None:
    model = convert("pvt_v2", ["model.stages=[0,2]"])
    assert model.dynamic_blocks == [0, 2, 3]
    assert sorted(model.routers) == ["0", "2", "3"]
    assert not isinstance(model.base.stages[1].blocks[0], DGEBlock)
    randomize_routers(model)
    x = images(model, 2)
    with torch.no_grad():
        out = model.forward_dynamic(x)
    assert out.extras["queries"].shape == (2, 3)
    with pytest.raises(UserError, match=r"model\.stages"):
        convert("pvt_v2", ["model.stages=[5]"])


def test_pvt_depthwise_conv_must_be_3x3() -> None:
    """The per-scale convolution folds a 3x3 kernel: any other depthwise convolution is refused clearly."""
    from vitconvert.methods.base import convert as convert_module
    from vitconvert.sources import load_base

    arch, kwargs = MODELS["pvt_v2"]
    base, spec = load_base(arch, None, kwargs, False)
    mlp = base.stages[0].blocks[0].mlp
    d = mlp.dwconv.in_channels
    mlp.dwconv = torch.nn.Conv2d(d, d, 5, padding=2, groups=d)
    with pytest.raises(AnatomyError, match="3x3 depthwise"):
        convert_module(base, spec, vitconvert.load_recipe("dge"))


def _level_on(block: int, level: int) -> GateOverride:
    """Gates: ``level`` in every region of dynamic block ``block``, the finest elsewhere."""
    return lambda i, b, r, dev: torch.full((b, r), level if i == block else 0, dtype=torch.long, device=dev)


def _swin_block_reference(blk: torch.nn.Module, x: torch.Tensor, size: int) -> torch.Tensor:
    """Swin's (shifted) window block with one query per ``size`` x ``size`` cell of every window, written out from
    timm's parts: the query is the cell's mean token, its bias row the mean of the cell's rows of the relative
    position bias plus the cell's row of the shift mask; the query's update is added to every token of its cell."""
    b, h, w, c = x.shape
    ws, (sh, sw) = blk.window_size[0], blk.shift_size
    attn = blk.attn
    xr = torch.roll(x, (-sh, -sw), (1, 2))
    win = xr.view(b, h // ws, ws, w // ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, ws, ws, c)
    n, m = ws * ws, (ws // size) ** 2
    cells = win.view(-1, ws // size, size, ws // size, size, c).mean((2, 4)).reshape(-1, m, c)
    d = attn.qkv.out_features // 3
    q = torch.nn.functional.linear(blk.norm1(cells), attn.qkv.weight[:d], attn.qkv.bias[:d])
    kv = torch.nn.functional.linear(blk.norm1(win.reshape(-1, n, c)), attn.qkv.weight[d:], attn.qkv.bias[d:])
    heads = attn.num_heads
    k, v = kv.view(-1, n, 2, heads, d // heads).permute(2, 0, 3, 1, 4)
    q = q.view(-1, m, heads, d // heads).transpose(1, 2)
    # cell of each window position, in the window's raster order
    pos = torch.arange(n)
    cell = (pos // ws // size) * (ws // size) + (pos % ws) // size
    member = torch.nn.functional.one_hot(cell, m).t().float()  # (m, n)
    rel = attn._get_rel_pos_bias()[0]  # (heads, n, n)
    bias = (member / member.sum(1, keepdim=True)) @ rel  # (heads, m, n)
    logits = (q * attn.scale) @ k.transpose(-2, -1) + bias
    if blk.attn_mask is not None:
        first = member.argmax(1)
        logits = (logits.view(b, -1, heads, m, n) + blk.attn_mask[:, first].unsqueeze(1)).view(-1, heads, m, n)
    o = (logits.softmax(-1) @ v).transpose(1, 2).reshape(-1, m, d)
    a = attn.proj(o)
    upd = a + blk.mlp(blk.norm2(cells + a))  # (windows, m, c)
    upd = upd[:, cell].view(-1, ws, ws, c)
    upd = upd.view(b, h // ws, w // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)
    return x + torch.roll(upd, (sh, sw), (1, 2))


@pytest.mark.parametrize("path", ["layers.1.blocks.0", "layers.1.blocks.1"])  # plain and shifted windows
@pytest.mark.parametrize("execution", ["sparse", "dense", "auto"])
def test_swin_coarse_queries_are_windows_cells_with_mean_bias_rows(path: str, execution: str) -> None:
    """Every path of a Swin block at one coarser level = the block written out from timm's parts."""
    model = convert("swin", execution=execution)
    blk = model.base.get_submodule(path)
    assert isinstance(blk, DGEBlock) and blk._orig.window_size == (4, 4)
    assert blk._orig.shift_size == ((2, 2) if path.endswith("1") else (0, 0))
    seen = {}
    handle = blk.register_forward_hook(lambda mod, args, out: seen.update(x=args[0], out=out))
    model.override_gates(_level_on(blk.index, 1))  # 2x2 cells: aligned with the shifted windows' masked regions
    with torch.no_grad():
        model.forward_dynamic(images(model, 3))
        ref = _swin_block_reference(blk._orig, seen["x"], 2)
    handle.remove()
    assert (seen["out"] - ref).abs().max().item() <= 1e-5
    assert (seen["out"] - blk._orig(seen["x"])).abs().max().item() > 1e-3  # really coarser


def _cells(g: int, size: int) -> torch.Tensor:
    """(g * g,) the ``size`` x ``size`` cell of each position of a g x g grid (raster order)."""
    pos = torch.arange(g * g)
    return (pos // g // size) * (g // size) + (pos % g) // size


def _mean_logits(q: torch.Tensor, k: torch.Tensor, cell: torch.Tensor, rotate: Callable) -> torch.Tensor:
    """(B, h, m, N) logits of one query per cell, each the mean over the cell's positions p of the logits of the
    query placed at p (``rotate(q, p)``): what a pooled query should score, computed position by position."""
    m = int(cell.max()) + 1
    per_pos = torch.stack([rotate(q[:, :, int(cell[p])], p) for p in range(cell.numel())], 2) @ k.transpose(-2, -1)
    member = torch.nn.functional.one_hot(cell, m).t().float()
    return torch.einsum("mp,bhpn->bhmn", member / member.sum(1, keepdim=True), per_pos)


@pytest.mark.parametrize(("key", "execution"), [("eva02", "sparse"), ("eva02", "dense"), ("rope_mixed", "sparse")])
def test_eva_coarse_queries_score_keys_as_the_mean_of_their_rotated_positions(key: str, execution: str) -> None:
    """EVA (rotary embeddings): a 2x2-cell query's logits against every key are the mean of the logits the query
    would have at each of the cell's positions, each rotated by its own sin/cos row (keys by theirs; the class token
    is not rotated); its update goes to the cell's tokens. Mixed RoPE: each head by its own table's rows."""
    from timm.layers.pos_embed_sincos import apply_rot_embed_cat

    model = convert(key, execution=execution)
    blk = model.base.blocks[1]
    seen = {}
    handle = blk.register_forward_hook(lambda mod, args, kw, out: seen.update(x=args[0], rope=kw["rope"], out=out),
                                       with_kwargs=True)
    model.override_gates(_level_on(blk.index, 1))
    with torch.no_grad():
        model.forward_dynamic(images(model, 2))
        handle.remove()
        x, rope, orig = seen["x"], seen["rope"], blk._orig
        attn, b, c, g = orig.attn, x.shape[0], x.shape[2], 8
        cell = _cells(g, 2)
        grid = x[:, 1:].reshape(b, g // 2, 2, g // 2, 2, c).mean((2, 4)).reshape(b, -1, c)
        q_in = torch.cat([x[:, :1], grid], 1)
        # EVA keeps its q/v biases apart (no k bias); the RoPE ViTs' AttentionRope has one qkv bias
        qkv_bias = (torch.cat((attn.q_bias, attn.k_bias, attn.v_bias)) if getattr(attn, "q_bias", None) is not None
                    else attn.qkv.bias)
        w, bias, d, h = attn.qkv.weight, qkv_bias, 48, 3
        q = torch.nn.functional.linear(orig.norm1(q_in), w[:d], bias[:d]).view(b, -1, h, d // h).transpose(1, 2)
        k, v = torch.nn.functional.linear(orig.norm1(x), w[d:], bias[d:]).view(b, -1, 2, h, d // h).permute(
            2, 0, 3, 1, 4)
        k = torch.cat([k[:, :, :1], apply_rot_embed_cat(k[:, :, 1:], rope)], 2)
        cls_logits = q[:, :, :1] @ k.transpose(-2, -1)
        row = (lambda p: rope[p]) if rope.dim() == 2 else (lambda p: rope[:, p])  # (E,) or per head (heads, E)
        cell_logits = _mean_logits(q[:, :, 1:], k, cell, lambda t, p: apply_rot_embed_cat(t, row(p)))
        logits = torch.cat([cls_logits, cell_logits], 2) * attn.scale
        o = (logits.softmax(-1) @ v).transpose(1, 2).reshape(b, -1, d)
        g1, g2 = (orig.gamma_1, orig.gamma_2) if getattr(orig, "gamma_1", None) is not None else (1.0, 1.0)
        a = g1 * attn.proj(attn.norm(o))
        upd = a + g2 * orig.mlp(orig.norm2(q_in + a))
        ref = x + torch.cat([upd[:, :1], upd[:, 1 + cell]], 1)
    assert (seen["out"] - ref).abs().max().item() <= 1e-5
    assert (seen["out"] - orig(x, rope=rope)).abs().max().item() > 1e-3  # really coarser


def test_beit_coarse_queries_take_the_mean_of_their_positions_bias_rows() -> None:
    """BEiT (a relative position bias table per block, the class token's row and column extra entries, layer-scale
    gammas): a 2x2-cell query's bias against every key (class token included) is the mean of its positions' rows;
    the class token keeps its own row; the gammas scale both updates."""
    model = convert("beit")
    blk = model.base.blocks[1]
    seen = {}
    handle = blk.register_forward_hook(lambda mod, args, kw, out: seen.update(x=args[0], out=out), with_kwargs=True)
    model.override_gates(_level_on(blk.index, 1))
    with torch.no_grad():
        model.forward_dynamic(images(model, 2))
        handle.remove()
        x, orig = seen["x"], blk._orig
        attn, b, c, g = orig.attn, x.shape[0], x.shape[2], 8
        cell = _cells(g, 2)
        grid = x[:, 1:].reshape(b, g // 2, 2, g // 2, 2, c).mean((2, 4)).reshape(b, -1, c)
        q_in = torch.cat([x[:, :1], grid], 1)
        # EVA keeps its q/v biases apart (no k bias); the RoPE ViTs' AttentionRope has one qkv bias
        qkv_bias = (torch.cat((attn.q_bias, attn.k_bias, attn.v_bias)) if getattr(attn, "q_bias", None) is not None
                    else attn.qkv.bias)
        w, bias, d, h = attn.qkv.weight, qkv_bias, 48, 3
        q = torch.nn.functional.linear(orig.norm1(q_in), w[:d], bias[:d]).view(b, -1, h, d // h).transpose(1, 2)
        k, v = torch.nn.functional.linear(orig.norm1(x), w[d:], bias[d:]).view(b, -1, 2, h, d // h).permute(
            2, 0, 3, 1, 4)
        rel = attn._get_rel_pos_bias()[0]  # (heads, 1 + N, 1 + N)
        cls_logits = (q[:, :, :1] * attn.scale) @ k.transpose(-2, -1) + rel[:, :1]
        member = torch.nn.functional.one_hot(cell, 16).t().float()  # (cells, positions)
        cell_logits = (q[:, :, 1:] * attn.scale) @ k.transpose(-2, -1) + (member / 4) @ rel[:, 1:]
        o = (torch.cat([cls_logits, cell_logits], 2).softmax(-1) @ v).transpose(1, 2).reshape(b, -1, d)
        a = orig.gamma_1 * attn.proj(o)
        upd = a + orig.gamma_2 * orig.mlp(orig.norm2(q_in + a))
        ref = x + torch.cat([upd[:, :1], upd[:, 1 + cell]], 1)
    assert (seen["out"] - ref).abs().max().item() <= 1e-5
    assert (seen["out"] - orig(x)).abs().max().item() > 1e-3  # really coarser


def wake_post_norms(model: DGE) -> None:
    """SwinV2 starts its residual post-norms at zero (every block the identity): give them weights around 1."""
    torch.manual_seed(4)
    with torch.no_grad():
        for m in model.base.modules():
            if isinstance(m, torch.nn.LayerNorm) and not m.weight.any():
                m.weight.normal_(1.0, 0.2)


@pytest.mark.parametrize("path", ["layers.1.blocks.0", "layers.1.blocks.1"])  # plain and shifted windows
def test_swinv2_coarse_queries_are_normalised_pooled_tokens_with_mean_bias_rows(path: str) -> None:
    """SwinV2 (post-norm, cosine attention, continuous position bias): a 2x2-cell query is the cell's mean token,
    projected and L2-normalised like any query, its logits the cosine times the logit scale plus the mean of its
    positions' rows of ``16 * sigmoid(cpb)`` and the cell's shift-mask row; norm1 and norm2 follow attention and
    MLP."""
    model = convert("swinv2")
    wake_post_norms(model)
    blk = model.base.get_submodule(path)
    seen = {}
    handle = blk.register_forward_hook(lambda mod, args, out: seen.update(x=args[0], out=out))
    model.override_gates(_level_on(blk.index, 1))
    with torch.no_grad():
        model.forward_dynamic(images(model, 2))
        handle.remove()
        x, orig = seen["x"], blk._orig
        attn, (b, hh, ww, c), ws, (sh, sw) = orig.attn, x.shape, 4, orig.shift_size
        win = torch.roll(x, (-sh, -sw), (1, 2)).view(b, hh // ws, ws, ww // ws, ws, c).permute(0, 1, 3, 2, 4, 5)
        win = win.reshape(-1, ws * ws, c)
        cell = _cells(ws, 2)
        cells = win.view(-1, 2, 2, 2, 2, c).mean((2, 4)).reshape(-1, 4, c)
        d, h = c, attn.num_heads
        bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
        q = torch.nn.functional.linear(cells, attn.qkv.weight[:d], bias[:d]).view(-1, 4, h, d // h).transpose(1, 2)
        k, v = torch.nn.functional.linear(win, attn.qkv.weight[d:], bias[d:]).view(-1, ws * ws, 2, h, d // h).permute(
            2, 0, 3, 1, 4)
        q, k = torch.nn.functional.normalize(q, dim=-1), torch.nn.functional.normalize(k, dim=-1)
        table = attn.cpb_mlp(attn.relative_coords_table).view(-1, h)
        rel = 16 * torch.sigmoid(table[attn.relative_position_index.view(-1)].view(16, 16, h).permute(2, 0, 1))
        member = torch.nn.functional.one_hot(cell, 4).t().float()
        logits = q @ k.transpose(-2, -1) * torch.clamp(attn.logit_scale, max=math.log(100.0)).exp()
        logits = logits + (member / 4) @ rel
        if orig.attn_mask is not None:
            first = member.argmax(1)
            logits = (logits.view(b, -1, h, 4, 16) + orig.attn_mask[:, first].unsqueeze(1)).view(-1, h, 4, 16)
        o = (logits.softmax(-1) @ v).transpose(1, 2).reshape(-1, 4, d)
        a = orig.norm1(attn.proj(o))
        upd = (a + orig.norm2(orig.mlp(cells + a)))[:, cell].view(b, hh // ws, ww // ws, ws, ws, c)
        upd = upd.permute(0, 1, 3, 2, 4, 5).reshape(b, hh, ww, c)
        ref = x + torch.roll(upd, (sh, sw), (1, 2))
    assert (seen["out"] - ref).abs().max().item() <= 1e-5
    assert (seen["out"] - orig(x)).abs().max().item() > 1e-3  # really coarser


def test_swin_levels_that_straddle_a_shift_mask_are_never_taken() -> None:
    """4x4 windows shifted by 2: one query per window would mix masked regions in every window of the last window
    row and column (in the shifted frame), so those stay at 2x2 cells; the plain block takes it everywhere."""
    model = convert("swin")
    randomize_routers(model)
    shifted, plain = (model.base.get_submodule(f"layers.1.blocks.{i}").index for i in (1, 0))
    model.override_gates(lambda i, b, r, dev: torch.full((b, r), 2, dtype=torch.long, device=dev))
    x = images(model, 2)
    with torch.no_grad():
        out = model.forward_dynamic(x)
    assert out.extras[f"granularity.{shifted}"][0].tolist() == [[2, 1], [1, 1]]
    assert out.extras[f"granularity.{plain}"].unique().tolist() == [2]
    model.override_gates(None)
    for coarsening in (0.9, 1.0):  # the routers and the knob's all-coarsest level obey the same bound
        model.coarsening = coarsening
        with torch.no_grad():
            out = model.forward_dynamic(x)
        assert (out.extras[f"granularity.{shifted}"][:, 1].max() <= 1) and (
            out.extras[f"granularity.{shifted}"][:, :, 1].max() <= 1)
    model.train()
    for _ in range(3):  # training draws only allowed levels: rho counts what inference runs
        model.forward_train(x)["rho"].backward()


def test_swin_maps_not_cut_into_whole_windows_are_refused() -> None:
    arch, kwargs = TINY_MODELS["swin"]
    with pytest.raises(UserError, match="10x10 map is not cut into whole 4x4 windows"):
        vitconvert.apply(arch, "dge", model_kwargs={**kwargs, "img_size": 40}, pretrained=False)


@pytest.mark.slow
def test_swin_tiny_at_224_is_exact_and_round_trips(tmp_path) -> None:
    """timm's Swin-T: 7x7 windows, each cut into 4x4, 4x3, 3x4 and 3x3 regions (region_size 4) whose 2x2 and 4x4
    sub-patches align with the shifted windows' masked regions (7 - 3 = 4)."""
    torch.manual_seed(0)
    model = vitconvert.apply("swin_tiny_patch4_window7_224", "dge", pretrained=False)
    base = model.build_base()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        ref = base(x)
        assert (model.forward_dynamic(x).logits - ref).abs().max() <= 1e-4  # coarsening 0.5, fresh routers: finest
        model.override_gates(lambda i, b, r, dev: torch.zeros(b, r, dtype=torch.long, device=dev))
        assert (model.forward_at_point(x).logits - ref).abs().max() <= 1e-4  # the DGE blocks at the finest
        model.override_gates(None)
        model.coarsening = 1.0
        coarse = model.forward_dynamic(x)
        assert (coarse.extras["granularity.1"] == 2).all()  # 7 - 3 = 4: no straddling level on Swin-T
        assert float(coarse.gmacs[0]) < 0.5 * model.base_gmacs
        path = vitconvert.save(model, tmp_path / "m")
        loaded = vitconvert.load(path)
        assert torch.equal(loaded.forward_dynamic(x).logits, coarse.logits)
        via_timm = timm.create_model(f"local-dir:{path}", pretrained=True).eval()
        assert torch.equal(via_timm(x), coarse.logits)


# --- sparse inference --------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["deit_distilled", "deit_10x10", "pvt_v2", "pvt_v2_56", "swin"])
def test_sparse_inference_equals_dense_training_path(key: str) -> None:
    """Real sparse computation (both layouts) = the paper's dense path combined with the same one-hot gates."""
    outs = {}
    for layout in ("padded", "packed"):
        model = convert(key, [f"model.inference_layout={layout}"])
        x = images(model, 4)
        with torch.no_grad():
            force_ratio(model, 0.6, "random", seed=5)
            sparse = model.forward_dynamic(x)
            force_ratio(model, 0.6, "random", seed=5)
            dense = model.forward_train(x)
        assert (sparse.logits - dense["logits"]).abs().max().item() <= 1e-4
        assert dense["rho"].item() == pytest.approx(sparse.gmacs.double().mean().item() / model.base_gmacs, rel=1e-6)
        # images really took different paths
        assert sparse.gmacs.unique().numel() > 1
        outs[layout] = sparse
    assert (outs["padded"].logits - outs["packed"].logits).abs().max().item() <= 1e-5
    assert torch.equal(outs["padded"].gmacs, outs["packed"].gmacs)


@pytest.mark.parametrize("p", [2, 4])
def test_folded_depthwise_kernel_is_exact_on_a_uniform_level(p: int) -> None:
    """PVT-v2's convolution at scale p on cell averages = the full-resolution convolution of the broadcast
    map averaged over each p x p cell, when every cell is at level p (zero padding included)."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(6, 6, 3, padding=1, groups=6)
    cells = torch.randn(2, 12 // p, 8 // p, 6)
    full = cells.repeat_interleave(p, 1).repeat_interleave(p, 2)  # (2, 12, 8, 6) constant on p x p cells
    with torch.no_grad():
        ref = torch.nn.functional.avg_pool2d(conv(full.permute(0, 3, 1, 2)), p).permute(0, 2, 3, 1)
        assert (conv_at(conv, cells, p, (12, 8)) - ref).abs().max().item() <= 1e-5
        # a map that is not constant on the cells is not what the folded kernel assumes
        noisy = full + 0.5 * torch.randn_like(full)
        pooled = torch.nn.functional.avg_pool2d(noisy.permute(0, 3, 1, 2), p).permute(0, 2, 3, 1)
        ref = torch.nn.functional.avg_pool2d(conv(noisy.permute(0, 3, 1, 2)), p).permute(0, 2, 3, 1)
        assert (conv_at(conv, pooled, p, (12, 8)) - ref).abs().max().item() > 1e-3


def cell_mean_of_full_conv(conv: torch.nn.Conv2d, cells: torch.Tensor, p: int, hw: tuple[int, int]) -> torch.Tensor:
    """Reference: (B, ch, cw, D) cell values broadcast to the (h, w) grid (the last cells cut short at the
    border), convolved at full resolution, averaged over each cell's real tokens."""
    h, w = hw
    full = cells.repeat_interleave(p, 1).repeat_interleave(p, 2)[:, :h, :w]
    sums = torch.nn.functional.avg_pool2d(conv(full.permute(0, 3, 1, 2)), p, ceil_mode=True, divisor_override=1)
    real = torch.nn.functional.avg_pool2d(torch.ones(1, 1, h, w), p, ceil_mode=True, divisor_override=1)
    return (sums / real).permute(0, 2, 3, 1)


@pytest.mark.parametrize(("hw", "p"), [((7, 7), 2), ((7, 7), 4), ((14, 14), 4), ((5, 9), 2), ((9, 6), 4),
                                       ((2, 3), 4)])
def test_folded_depthwise_kernel_is_exact_on_grids_p_does_not_divide(hw: tuple[int, int], p: int) -> None:
    """The last cell row / column of a grid p does not divide holds fewer than p tokens: its cells are folded
    with their real size, so the convolution at scale p still equals the full-resolution one averaged over
    each cell's real tokens, values and gradients."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(6, 6, 3, padding=1, groups=6)
    cells = torch.randn(2, -(-hw[0] // p), -(-hw[1] // p), 6, requires_grad=True)
    got = conv_at(conv, cells, p, hw)
    ref = cell_mean_of_full_conv(conv, cells, p, hw)
    assert (got - ref).abs().max().item() <= 1e-5
    weight = torch.randn_like(ref)
    grads = torch.autograd.grad((got * weight).sum(), [cells, conv.weight, conv.bias])
    ref_grads = torch.autograd.grad((ref * weight).sum(), [cells, conv.weight, conv.bias])
    for g, r in zip(grads, ref_grads, strict=True):
        assert (g - r).abs().max().item() <= 1e-4


@pytest.mark.parametrize("level", [1, 2])
def test_pvt_v2_b0_at_224_uniform_level_convolves_like_full_resolution(level: int) -> None:
    """timm's pvt_v2_b0 at 224 px (stage grids 56, 28, 14, 7; 14 and 7 not divisible by 4, 7 not by 2), every
    region at one granularity: in every block, sparse inference and the training path, each query's
    convolution output = the full-resolution convolution of the broadcast hidden map averaged over its cell, and
    the reported GMACs are what count_macs measures."""
    torch.manual_seed(0)
    model = vitconvert.apply("pvt_v2_b0", "dge", pretrained=False, overrides=["model.execution=sparse"])
    p = model._c.sizes[level]
    blocks = [blk for stage in model.base.stages for blk in stage.blocks]
    grid_of: dict[int, tuple[int, int]] = {}  # block index -> its token grid (PVT-v2 passes it to each call)
    seen: dict[str, list[tuple[torch.Tensor, torch.Tensor, int]]] = {"sparse": [], "train": []}
    mode = ["sparse"]
    hooks = []
    for blk in blocks:
        # the convolution's input rows (written by the identity after fc1; copied: inference writes the
        # convolution's outputs over them)
        hidden: list[torch.Tensor] = []
        hooks.append(blk.register_forward_pre_hook(lambda m, a: grid_of.__setitem__(m.index, tuple(a[1]))))
        hooks.append(blk.mlp.relu.register_forward_hook(lambda m, a, out, hidden=hidden: hidden.append(out.clone())))
        hooks.append(blk.mlp.act.register_forward_pre_hook(
            lambda m, a, hidden=hidden, i=blk.index: seen[mode[0]].append((hidden.pop(), a[0], i))))
    model.override_gates(lambda i, b, r, dev: torch.full((b, r), level, dtype=torch.long, device=dev))
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        reported = model.forward_dynamic(x).gmacs.item()
        mode[0] = "train"
        model.forward_train(x)
    for h in hooks:
        h.remove()
    # the short border cells convolved again are counted
    assert reported == pytest.approx(count_macs(lambda: model.forward_dynamic(x)) / 1e9, rel=1e-6)
    grids = set()
    for path in ("sparse", "train"):
        assert [i for _, _, i in seen[path]] == [blk.index for blk in blocks]
        for (table, conv_out, i), blk in zip(seen[path], blocks, strict=True):
            hw = grid_of[i]
            ch, cw = -(-hw[0] // p), -(-hw[1] // p)
            if path == "sparse":  # packed rows: the level's cells in raster order, then the zero row
                cells, got = table[:-1], conv_out
            else:  # every candidate: the level's cells follow the finer levels' candidates
                start = sum(-(-hw[0] // q) * -(-hw[1] // q) for q in model._c.sizes[:level])
                cells, got = table[0, start:start + ch * cw], conv_out[0, start:start + ch * cw]
            with torch.no_grad():
                ref = cell_mean_of_full_conv(blk.mlp.dwconv, cells.reshape(1, ch, cw, -1), p, hw)
            assert (got.reshape(ref.shape) - ref).abs().max().item() <= 1e-4, (path, hw)
            grids.add(hw)
    assert grids == {(56, 56), (28, 28), (14, 14), (7, 7)}


@pytest.mark.parametrize("key", ["pvt_v2", "pvt_v2_56"])
@pytest.mark.parametrize("level0_share", [0.1, 0.85])  # halo patches / the whole token map for level 0
def test_pvt_sparse_equals_training_path_with_all_levels_mixed(key: str, level0_share: float) -> None:
    """Every granularity next to every other (finer queries averaged into coarser cells), both ways of
    convolving level 0; per-image GMACs = count_macs of that image alone with the same gates."""
    drawn: dict[int, torch.Tensor] = {}
    rows = slice(None)

    def three_levels(block: int, batch: int, regions: int, device: torch.device) -> torch.Tensor:
        if regions not in drawn:
            g = torch.Generator().manual_seed(regions)
            probs = torch.tensor([level0_share, (1 - level0_share) / 2, (1 - level0_share) / 2])
            drawn[regions] = torch.multinomial(probs, 3 * regions, replacement=True, generator=g).view(3, regions)
        return drawn[regions][rows]

    for layout in ("packed", "padded"):
        model = convert(key, [f"model.inference_layout={layout}"])
        x = images(model, 3)
        with torch.no_grad():
            model.override_gates(three_levels)
            sparse = model.forward_dynamic(x)
            dense = model.forward_train(x)
        levels = torch.cat([g.flatten() for k, g in sparse.extras.items() if k.startswith("granularity.")])
        assert set(levels.tolist()) == {0, 1, 2}
        assert (sparse.logits - dense["logits"]).abs().max().item() <= 1e-4
        assert dense["rho"].item() == pytest.approx(sparse.gmacs.double().mean().item() / model.base_gmacs, rel=1e-6)
        for i in range(3):
            rows = slice(i, i + 1)
            counted = count_macs(lambda i=i, m=model, xs=x: m.forward_dynamic(xs[i:i + 1])) / 1e9
            assert sparse.gmacs[i].item() == pytest.approx(counted, rel=1e-6)
            with torch.no_grad():
                alone = model.forward_dynamic(x[i:i + 1]).logits
            assert (alone - sparse.logits[i:i + 1]).abs().max().item() <= 1e-4
        rows = slice(None)


def test_sparse_path_changes_output_with_coarse_gates() -> None:
    model = convert("deit")
    base = model.build_base()
    x = images(model, 2)
    with torch.no_grad():
        model.knob = 1.0  # every region at its coarsest granularity
        out = model.forward_dynamic(x)
        ref = base(x)
    assert all((g == 2).all() for k, g in out.extras.items() if k.startswith("granularity."))
    assert (out.logits - ref).abs().max().item() > 1e-3
    # 8x8 grid, 4x4 regions: 4 queries + the class token per block
    assert torch.equal(out.extras["queries"], torch.full((2, 4), 5.0))


@pytest.mark.parametrize("key", ["deit", "deit3", "deit_10x10", "pvt_v2", "pvt_v2_56", "pvt_v2_li", "swin"])
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_gmacs_match_counted_macs(key: str, layout: str) -> None:
    """Reported per-image GMACs = count_macs of a forward on that image alone (trained-like routers)."""
    model = convert(key, [f"model.inference_layout={layout}"])
    randomize_routers(model)
    x = images(model, 4)
    with torch.no_grad():
        out = model.forward_dynamic(x)
    assert out.gmacs.unique().numel() > 1  # the routers chose differently per image
    levels = torch.cat([g.flatten() for k, g in out.extras.items() if k.startswith("granularity.")])
    assert set(levels.tolist()) == {0, 1, 2}
    for i in range(4):
        counted = count_macs(lambda i=i: model.forward_dynamic(x[i:i + 1])) / 1e9
        assert out.gmacs[i].item() == pytest.approx(counted, rel=1e-6)
    assert (out.gmacs < model.base_gmacs * 1.02).all()


def test_gmacs_at_full_compute_and_levels() -> None:
    model = convert("deit")
    x = images(model, 1)
    levels = model.level_ratios()
    assert levels[0] > 1.0 and levels[0] < 1.02 and levels[0] > levels[1] > levels[2]
    with torch.no_grad():
        model.knob = 1.0
        coarse = model.forward_dynamic(x).gmacs.item()
    router = sum(c["router"] for c in model.costs.values()) / 1e9
    assert coarse == pytest.approx(levels[-1] * model.base_gmacs - router, rel=1e-6)
    assert count_macs(lambda: model.forward_dynamic(x)) / 1e9 == pytest.approx(coarse, rel=1e-6)


def test_real_deit_small_at_224_is_exact() -> None:
    """timm's DeiT-S: 14x14 grid with 4x4 regions (short border regions), exact at the finest."""
    torch.manual_seed(0)
    model = vitconvert.apply("deit_small", "dge", pretrained=False)
    base = model.build_base()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert (model.forward_dynamic(x).logits - base(x)).abs().max() <= 1e-4
    assert model.level_ratios()[-1] == pytest.approx(0.237, abs=0.01)  # floor: kv projections stay dense


# --- knob and forcing --------------------------------------------------------------------------------------


def test_knob_sweep_is_monotone() -> None:
    model = convert("deit_10x10")
    randomize_routers(model, std=1.0)
    x = images(model, 8)
    knob = model.operating_space().knob("coarsening")
    values = list(knob.sweep)
    assert values[0] == knob.full == 0.0 and values[-1] == 1.0 and 0.5 in values
    assert values == sorted(values)
    costs = []
    with torch.no_grad():
        for v in values:
            model.knob = v
            costs.append(model.forward_dynamic(x).gmacs.mean().item())
    assert costs[0] == pytest.approx(model.base_gmacs)
    assert all(b <= a + 1e-9 for a, b in itertools.pairwise(costs[1:]))
    assert costs[-1] < 0.5 * costs[0]
    with pytest.raises(UserError, match=r"\[0, 1\]"):
        model.knob = 1.5


def test_knob_half_is_router_argmax() -> None:
    model = convert("deit")
    randomize_routers(model)
    x = images(model, 2)
    with torch.no_grad():
        out = model.forward_dynamic(x)
        tokens = model.base.patch_embed(x)
        tokens = model.base._pos_embed(tokens)
        region = tokens[:, 1:].reshape(2, 2, 4, 2, 4, -1).mean((2, 4)).reshape(2, 4, -1)
        expected = model.routers["0"](region).argmax(-1).view(2, 2, 2)
    assert torch.equal(out.extras["granularity.0"], expected)


def test_force_ratio() -> None:
    model = convert("deit_10x10")
    x = images(model, 32)
    with torch.no_grad():
        expected = force_ratio(model, 0.5, "random")
        got = model.forward_dynamic(x).gmacs.mean().item() / model.base_gmacs
    assert expected == pytest.approx(0.5)
    assert got == pytest.approx(0.5, abs=0.05)
    force_ratio(model, 0.7, "pattern")
    with torch.no_grad():
        g = model.forward_dynamic(x).gmacs
    assert g.unique().numel() == 1 and g[0].item() / model.base_gmacs == pytest.approx(0.7, abs=0.08)
    with pytest.raises(UserError, match="below the cheapest"):
        force_ratio(model, 0.1)
    force_ratio(model, None)
    with torch.no_grad():
        assert (model.forward_dynamic(x).extras["granularity.0"] == 0).all()


# --- training ------------------------------------------------------------------------------------------------


def test_training_rho_budget_loss_and_gradients() -> None:
    model = convert("deit")
    model.train()
    x = images(model, 4)
    out = model.forward_train(x)
    assert set(out) == {"logits", "rho"} and out["rho"].requires_grad
    assert 0.2 < out["rho"].item() < 1.02
    losses = model.method_losses(out, None)
    assert set(losses) == {"budget"}
    assert losses["budget"].item() == pytest.approx((out["rho"].item() - 0.5) ** 2, rel=1e-5)
    (out["logits"].logsumexp(-1).mean() + losses["budget"]).backward()
    for r in model.routers.values():
        assert r.fc.bias.grad is not None and r.fc.bias.grad.abs().sum() > 0
    # the budget pulls toward coarser granularities: the finest logit's gradient is positive (descent lowers it)
    model.zero_grad()
    out = model.forward_train(x)
    model.method_losses(out, None)["budget"].backward()
    assert all(r.fc.bias.grad[0] > 0 for r in model.routers.values())


def test_training_with_drop_path_runs() -> None:
    arch, kwargs = MODELS["pvt_v2"]
    torch.manual_seed(0)
    model = vitconvert.apply(arch, "dge", model_kwargs={**kwargs, "drop_path_rate": 0.2}, pretrained=False)
    model.train()
    out = model.forward_train(images(model, 2))
    out["logits"].sum().backward()
    assert model.base.stages[0].blocks[0].mlp.dwconv.weight.grad is not None


def test_temperature_anneals() -> None:
    model = convert("deit", recipe="dge_light")
    model.set_train_progress(0.0)
    assert model.tau == pytest.approx(1.0)
    model.set_train_progress(0.5)
    assert model.tau == pytest.approx(math.sqrt(0.5))
    model.set_train_progress(1.0)
    assert model.tau == pytest.approx(0.5)


def test_routers_learn_at_their_own_rate() -> None:
    from timm.optim import create_optimizer_v2
    from timm.scheduler import CosineLRScheduler

    from vitconvert.train import _param_groups

    model = convert("deit", ["model.router_lr_scale=50"])
    groups = _param_groups(model, 0.05)
    router_ids = {id(p) for p in model.routers.parameters()}
    assert router_ids
    for g in groups:
        ids = {id(p) for p in g["params"]}
        assert ids <= router_ids or not ids & router_ids  # a group is all routers or none
        assert g["lr_scale"] == (50.0 if ids <= router_ids else 1.0)
        assert all(p.ndim > 1 for p in g["params"]) if g["weight_decay"] else True  # biases, norms: no decay
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    optimizer = create_optimizer_v2(groups, opt="adamw", lr=1e-3, weight_decay=0.05)
    CosineLRScheduler(optimizer, t_initial=10, t_in_epochs=False).step_update(0)
    rates = {g["lr_scale"]: g["lr"] for g in optimizer.param_groups}
    assert rates[50.0] == pytest.approx(50 * rates[1.0]) and rates[1.0] == pytest.approx(1e-3)


# --- saving ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["deit_distilled", "pvt_v2", "swin"])
def test_save_load_round_trip(key: str, tmp_path) -> None:
    model = convert(key)
    randomize_routers(model)
    model.knob = 0.3
    model.tau = 0.7
    path = vitconvert.save(model, tmp_path / "m")
    x = images(model, 3)
    with torch.no_grad():
        ref = model.forward_dynamic(x)
        loaded = vitconvert.load(path)
        got = loaded.forward_dynamic(x)
        via_timm = timm.create_model(f"local-dir:{path}", pretrained=True).eval()
        timm_out = via_timm(x)
    assert isinstance(loaded, DGE) and isinstance(via_timm, DGE)
    assert loaded.knob == 0.3 and loaded.tau == 0.7
    assert torch.equal(got.logits, ref.logits) and torch.equal(got.gmacs, ref.gmacs)
    assert torch.equal(timm_out, ref.logits)


def test_bad_state_is_refused() -> None:
    model = convert("deit")
    with pytest.raises(UserError, match="gumbel_tau"):
        model.load_state({"coarsening": 0.5, "gumbel_tau": -1})
    with pytest.raises(UserError, match="unexpected method state"):
        model.load_state({"coarsening": 0.5, "bogus": 1})


# --- small batches ----------------------------------------------------------------------------------------------


def test_small_batches_run_at_full_compute_under_the_rule(tmp_path) -> None:
    model = convert("deit", execution="auto")
    randomize_routers(model)
    model.knob = 0.7
    x = images(model, 6)
    with torch.no_grad():
        sparse = [model.forward_dynamic(x[:n]) for n in (3, 4)]
        model.full_compute()
        full = model.forward_dynamic(x[:3])
        base = model.build_base()(x[:3])
        model.knob = 0.7
        model.small_batch = SmallBatchRule(4, "cpu")
        small, large = model.forward_dynamic(x[:3]), model.forward_dynamic(x[:4])
    assert model.knob == 0.7  # the point is restored after a small batch
    assert torch.equal(small.logits, full.logits) and (small.logits - base).abs().max() <= 1e-4
    assert torch.equal(small.gmacs, torch.full((3,), model.base_gmacs)) and "queries" not in small.extras
    assert (sparse[0].gmacs < model.base_gmacs).all()  # without the rule, the same 3 images ran sparse
    assert torch.equal(large.logits, sparse[1].logits) and torch.equal(large.gmacs, sparse[1].gmacs)
    model.override_gates(lambda i, b, r, dev: torch.ones(b, r, dtype=torch.long, device=dev))
    with torch.no_grad():  # forced gates (benchmarks) are a point too: the rule runs the base blocks all the same
        assert torch.equal(model.forward_dynamic(x[:3]).logits, full.logits)
        assert (model.forward_dynamic(x[:4]).gmacs < model.base_gmacs).all()
    model.override_gates(None)
    # full compute runs the base model as timm built it, sharing the converted model's weights, mode and dtype
    twin = copy.deepcopy(model).double()
    with torch.no_grad():
        twin.base.blocks[0].mlp.fc2.bias.add_(1.0)
        assert torch.allclose(twin.forward_full_compute(x.double()).logits, twin.build_base().double()(x.double()))
        assert torch.equal(model.forward_full_compute(x[:3]).logits, full.logits)
    assert all(not c.training for c in model.__dict__["_plain_containers"])
    assert all(c.training for c in model.train().__dict__["_plain_containers"])
    model.eval()
    # the rule is part of the saved state and the card says it; a bad one is one line
    model.calibration = {"small_batch": {"ratios": {"1": 0.6, "2": 0.8, "4": 1.1}, "threads": 1, "below": 4}}
    loaded = vitconvert.load(vitconvert.save(model, tmp_path / "m"))
    assert loaded.small_batch == model.small_batch
    card = " ".join((tmp_path / "m" / "README.md").read_text().split())
    assert "(1 thread), the chosen point ran at 0.60× at batch 1, 0.80× at batch 2 and 1.10× at batch 4 its" in card
    assert "so batches of fewer than 4 images on cpu run at the dense point" in card
    with pytest.raises(UserError, match=r"state\.small_batch\.below"):
        model.load_state({"coarsening": 0.5, "small_batch": {"below": 0}})
    with pytest.raises(UserError, match="unexpected keys"):
        model.load_state({"coarsening": 0.5, "small_batch": {"below": 4, "ratios": {}}})
    # a cascade's dense point is its last stage alone: it takes the rule too
    cascade = vitconvert.apply(*TINY_MODELS["vit"][:1], "cfvit", model_kwargs=TINY_MODELS["vit"][1], pretrained=False)
    cascade.load_state({**cascade.get_state(), "small_batch": {"below": 4}})
    assert cascade.small_batch == SmallBatchRule(4, "cpu")


def test_small_batch_rule_is_the_smallest_batch_not_slower(monkeypatch: pytest.MonkeyPatch) -> None:
    """Faked timings: the point 'runs' at 0.5x its base below 8 images and 1.2x from 8 on."""
    timed: list[int] = []

    def fake_compare(models: dict, x: torch.Tensor, **kwargs: object) -> dict[str, Timing]:
        timed.append(x.shape[0])
        return fake_timings(x, {"converted": 60.0 if x.shape[0] >= 8 else 25.0, "base": 50.0})

    monkeypatch.setattr(calibration, "compare", fake_compare)
    model = convert("deit", execution="auto")
    base = model.build_base()
    x = images(model, 32)
    rule, record = calibration.find_small_batch_rule(model, base, x, progress=False)
    assert timed == [1, 2, 4, 8] and rule == SmallBatchRule(8, "cpu")
    assert record == {"ratios": {"1": 0.5, "2": 0.5, "4": 0.5, "8": 1.2}, "threads": torch.get_num_threads(),
                      "below": 8}
    timed.clear()  # slower at every size below the calibration batch: the rule covers them all
    rule, _ = calibration.find_small_batch_rule(model, base, x[:8], progress=False)
    assert timed == [1, 2, 4] and rule is not None and rule.below == 8
    timed.clear()  # a cascade falls back to its dense point (the last stage alone) the same way
    cascade = vitconvert.apply(*TINY_MODELS["vit"][:1], "cfvit", model_kwargs=TINY_MODELS["vit"][1], pretrained=False)
    rule, record = calibration.find_small_batch_rule(cascade, base, x, progress=False)
    assert timed == [1, 2, 4, 8] and rule == SmallBatchRule(8, "cpu") and record["below"] == 8


# --- picture ---------------------------------------------------------------------------------------------------


def test_plot_granularity_writes_png(tmp_path) -> None:
    import matplotlib.image

    model = convert("deit_10x10")
    randomize_routers(model)
    path = plot_granularity(model, images(model, 3), tmp_path / "g.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = matplotlib.image.imread(path)
    assert img.shape[0] > 100 and img.shape[1] > 200
    with pytest.raises(UserError, match="not dynamic"):
        plot_granularity(model, images(model, 1), tmp_path / "x.png", block=99)


def test_swin_granularity_map_is_in_the_map_frame_and_plots(tmp_path) -> None:
    model = convert("swin")
    blk = model.base.get_submodule("layers.1.blocks.1")  # 8x8 map, 4x4 windows shifted by 2
    model.override_gates(lambda i, b, r, dev: torch.full((b, r), 2, dtype=torch.long, device=dev))
    with torch.no_grad():
        out = model.forward_dynamic(images(model, 2))
    sides = blk.token_sizes(out.extras[f"granularity.{blk.index}"], (8, 8))
    shifted = torch.full((8, 8), 2)
    shifted[:4, :4] = 4  # in the shifted frame only the first window takes one query for all its tokens
    assert torch.equal(sides[0], torch.roll(shifted, (2, 2), (0, 1)))
    path = plot_granularity(model, images(model, 2), tmp_path / "g.png", block=blk.index)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tiny_model_helper_matches() -> None:
    # guard: the test models above are the shared tiny ones
    m, arch, _ = tiny_model("deit")
    assert arch == MODELS["deit"][0] and isinstance(m, torch.nn.Module)


def test_benchmark_gmacs_check_on_a_tiny_model() -> None:
    from benchmarks.bench_dge import build, gmacs_check

    arch, kwargs = MODELS["deit_10x10"]
    model = build(arch, 0.5, **kwargs)
    assert forced_rho(model) == 0.5
    x = images(model, 6)
    check = gmacs_check(model, x, count_images=2)
    assert check["expected_ratio"] == pytest.approx(0.5)
    assert check["max_rel_error_single"] <= 0.01
    # batched, the packed layout pads only the attention core (a third of this tiny model's block MACs,
    # ~6% of DeiT-S's): above the per-image mean, by less than the padding
    assert check["reported_mean"] <= check["batch_counted_per_image"] <= 1.25 * check["reported_mean"]


# --- dense execution: the same results as the sparse path, chosen per block and batch -----------------------


def mixed_levels(block: int, batch: int, regions: int, device: torch.device) -> torch.Tensor:
    """Every granularity in every block, different per image."""
    g = torch.Generator().manual_seed(block * 100 + regions)
    return torch.randint(0, 3, (8, regions), generator=g)[:batch].to(device)  # image i: row i, whatever the batch


def paths_agree(model: DGE, x: torch.Tensor, gates: GateOverride, execution: str) -> tuple[DynamicOutput, ...]:
    """The sparse path's and ``execution``'s outputs on ``x`` under forced ``gates``, after checking that their logits
    and input gradients agree (<= 1e-5)."""
    outs, grads = [], []
    model.override_gates(gates)
    for path in ("sparse", execution):
        model.execution = path
        with torch.no_grad():
            outs.append(model.forward_dynamic(x))
        xg = x.clone().requires_grad_()
        grads.append(torch.autograd.grad(model.forward_dynamic(xg).logits[:, 0].sum(), xg)[0])
    assert (outs[1].logits - outs[0].logits).abs().max().item() <= 1e-5
    assert (grads[1] - grads[0]).abs().max().item() <= 1e-5
    return tuple(outs)


@pytest.mark.parametrize("key", ["deit_distilled", "deit_10x10", "pvt_v2_56", "pvt_v2_li", "swin"])
def test_dense_execution_equals_sparse(key: str) -> None:
    """Every token a query row (coarse queries repeated over their sub-patch; PVT-v2's convolution at each
    level's scale from the token map) gives the sparse path's logits and GMACs, with and without autograd."""
    model = convert(key).eval()
    x = images(model, 3)
    sparse, dense = paths_agree(model, x, mixed_levels, "dense")
    levels = torch.cat([g.flatten() for k, g in sparse.extras.items() if k.startswith("granularity.")])
    assert set(levels.tolist()) == {0, 1, 2}
    assert torch.equal(dense.gmacs, sparse.gmacs) and torch.equal(dense.extras["queries"], sparse.extras["queries"])
    blocks = len(model.dynamic_blocks)
    assert dense.extras["dense_blocks"].tolist() == [float(blocks)] * 3
    assert sparse.extras["dense_blocks"].tolist() == [0.0] * 3
    # one image alone, densely: the same as in the batch
    with torch.no_grad():
        alone = model.forward_dynamic(x[:1])
    assert (alone.logits - dense.logits[:1]).abs().max().item() <= 1e-5


def test_all_finest_batches_run_the_base_block_and_auto_follows_the_cost_model() -> None:
    model = convert("deit_10x10", execution="auto").eval()
    base = model.build_base()
    x = images(model, 4)
    finest = lambda i, b, r, dev: torch.zeros(b, r, dtype=torch.long, device=dev)  # noqa: E731
    model.override_gates(finest)
    with torch.no_grad():
        out = model.forward_dynamic(x)
        assert torch.equal(out.logits, base(x))  # the base blocks themselves, bit for bit
    assert out.extras["dense_blocks"].tolist() == [3.0] * 4
    # auto takes, block by block, the path path_costs estimates cheaper; the estimate follows the work
    model.override_gates(mixed_levels)
    with torch.no_grad():
        auto = model.forward_dynamic(x)
        model.execution = "sparse"
        sparse = model.forward_dynamic(x)
    assert (auto.logits - sparse.logits).abs().max().item() <= 1e-5
    blk = next(b for b in model.base.modules() if isinstance(b, DGEBlock))
    costs = blk._costs
    lay = model._c.layout((10, 10), torch.device("cpu"))
    r = lay.num_regions

    def estimate(gates: torch.Tensor, threads: int = 1) -> dict[str, float]:
        sel = gates[:, lay.cand_region] == lay.cand_gran
        qsel = torch.cat([sel.new_ones(gates.shape[0], 1), sel], dim=1)
        return path_costs(costs, gates, qsel, lay, None, threads)

    coarse = torch.full((256, r), 2)
    # a large batch of coarse regions: the sparse path saves most of the block (the dense one runs the MLP once
    # per query too, but attention on every token); a single small image: the operators cost more than it saves
    assert estimate(coarse)["sparse"] < 0.7 * estimate(coarse)["dense"]
    assert estimate(coarse[:1])["sparse"] > estimate(coarse[:1])["dense"]
    # more threads: each operator's fixed cost weighs more against the matrix products
    assert estimate(coarse[:8], 2)["sparse"] - estimate(coarse[:8], 1)["sparse"] > 0
    with pytest.raises(UserError, match="execution must be"):
        model.execution = "fast"


def one_level_per_image(block: int, batch: int, regions: int, device: torch.device) -> torch.Tensor:
    """Each image's regions all at one level (as on grids of one region), every level among the images."""
    levels = torch.tensor([1, 0, 2, 1, 2, 0, 1, 2])[(torch.arange(8) + block) % 8]
    return levels[:batch].view(-1, 1).expand(batch, regions).to(device)


@pytest.mark.parametrize("key", ["deit_distilled", "pvt_v2_56", "swin"])
def test_auto_splits_batches_whose_images_take_one_level_each(key: str) -> None:
    """Where each image's regions share one level, auto runs the block as one dense batch per level (the finest
    images through the base block, the others with their level's whole cell map as queries): the sparse path's
    logits, gradients and GMACs, recorded as not sparse."""
    model = convert(key).eval()
    x = images(model, 5)
    sparse, auto = paths_agree(model, x, one_level_per_image, "auto")
    assert (sparse.logits - model.build_base()(x)).abs().max().item() > 1e-3  # coarse levels changed the output
    assert torch.equal(auto.gmacs, sparse.gmacs)
    assert auto.extras["dense_blocks"].tolist() == [float(len(model.dynamic_blocks))] * 5
    # the first image alone (its gates do not depend on the batch): the same as in the batch
    with torch.no_grad():
        alone = model.forward_dynamic(x[:1])
    assert (alone.logits - auto.logits[:1]).abs().max().item() <= 1e-5


# --- the traceable path (export) ---------------------------------------------------------------------------


def traced(model: DGE, x: torch.Tensor) -> DynamicOutput:
    """What an exported graph runs (:meth:`DGE.forward_traceable`), also under forced gates (which it refuses)."""
    with torch.no_grad(), model._c.run("traced") as records:
        logits = model.base(x)
        recs = list(records)
    return DynamicOutput(logits=logits, gmacs=(model._gmacs(recs, x.shape[0], x.device) / GIGA).float(),
                         extras={"granularity": model._granularity(recs, x.shape[0], x.device)})


def all_finest(block: int, batch: int, regions: int, device: torch.device) -> torch.Tensor:
    return torch.zeros(batch, regions, dtype=torch.long, device=device)


def no_middle_level(block: int, batch: int, regions: int, device: torch.device) -> torch.Tensor:
    """The finest and the coarsest level mixed, the middle one in no region: a level with no queries at all."""
    return mixed_levels(block, batch, regions, device).clamp(max=1) * 2


@pytest.mark.parametrize("key", ["deit_distilled", "deit_10x10", "pvt_v2_56", "pvt_v2_li", "swin"])
def test_traceable_path_equals_every_eager_path(key: str) -> None:
    """The exported graph's one structure (every image's queries padded to the batch's largest count) gives what
    each eager path gives, for any mix of levels: mixed, one level per image (eager: split), all finest (eager: the
    base block), a level no region takes; logits within 1e-5, GMACs equal."""
    model = convert(key, execution="auto").eval()
    x = images(model, 3)
    for gates in (mixed_levels, one_level_per_image, all_finest, no_middle_level):
        model.override_gates(gates)
        for execution in ("auto", "sparse", "dense"):
            model.execution = execution
            with torch.no_grad():
                eager = model.forward_dynamic(x)
            got = traced(model, x)
            assert (got.logits - eager.logits).abs().max().item() <= 1e-5, (gates.__name__, execution)
            assert torch.equal(got.gmacs, eager.gmacs)
            assert torch.equal(got.extras["granularity"], eager.extras["granularity"])
    model.override_gates(None)
    with pytest.raises(UserError, match="override_gates"):
        model.override_gates(all_finest)
        model.forward_traceable(x, {})


@pytest.mark.parametrize("key", ["deit_distilled", "pvt_v2"])
def test_torch_export_keeps_the_routers_choice_and_leaves_no_tracer_tensors_behind(key: str) -> None:
    """torch.export traces the routed sparse path with a dynamic batch (the query count is data-dependent) on a
    fresh model: the program reproduces the eager model at batch sizes it did not see while tracing, and the layouts
    built while tracing are not cached for the eager forwards."""
    from vitconvert.deploy import Traceable

    model = convert(key, execution="auto").eval()
    randomize_routers(model)
    model.coarsening = 0.6
    batch = torch.export.Dim("batch", min=1, max=64)
    with torch.no_grad():
        program = torch.export.export(Traceable(model, []).eval(), (images(model, 2),),
                                      dynamic_shapes=({0: batch},), strict=False)
    assert model._c._layouts == {}  # nothing of the tracer's was kept
    module = program.module()
    for n in (1, 5):
        x = images(model, n, seed=n)
        with torch.no_grad():
            eager = model.forward_dynamic(x)
            logits, gmacs, granularity = module(x)
        assert (logits - eager.logits).abs().max().item() <= 1e-5
        assert torch.equal(gmacs, eager.gmacs) and torch.equal(granularity, eager.extras["granularity"])
    assert len(set(eager.gmacs.tolist())) > 1  # the images took different paths through the graph
    assert len(set(granularity.tolist())) > 1 and bool((granularity < 1).all())


@pytest.mark.parametrize("key", ["deit_distilled", "deit_10x10", "pvt_v2"])
def test_granularity_is_the_share_of_full_resolution_queries_kept(key: str) -> None:
    """``extras["granularity"]`` (an exported graph's ``granularity`` output): 1 at full compute and with every
    region at the finest level, the regions' count over the tokens' (prefix tokens kept) with every region at the
    coarsest, and the queries the blocks ran over their token counts for a mix."""
    model = convert(key).eval()
    x = images(model, 3)
    p = model.num_prefix
    grids = [model.anatomy.stages[info.stage].grid for info in model.anatomy.blocks
             if info.index in model.dynamic_blocks]
    tokens = sum(p + h * w for h, w in grids)
    with torch.no_grad():
        assert torch.equal(model.forward_dynamic(x).extras["granularity"], torch.ones(3))  # fresh: all finest
        model.coarsening = 0.0
        assert torch.equal(model.forward_dynamic(x).extras["granularity"], torch.ones(3))  # the base blocks
        model.coarsening = 1.0
        coarsest = model.forward_dynamic(x).extras["granularity"]
        regions = sum(p + -(-h // 4) * -(-w // 4) for h, w in grids)
        assert coarsest.dtype == torch.float32
        torch.testing.assert_close(coarsest, torch.full((3,), regions / tokens), rtol=1e-6, atol=0)
        randomize_routers(model)
        model.coarsening = 0.5
        mixed = model.forward_dynamic(x)
    kept = mixed.extras["queries"].sum(1) / tokens
    torch.testing.assert_close(mixed.extras["granularity"], kept, rtol=1e-6, atol=0)
    assert bool((mixed.extras["granularity"] < 1).all()) and bool((mixed.extras["granularity"] > coarsest).all())
