"""ToMe token merging for timm ViT/DeiT: the training-free baseline vitconvert is compared with.

**Baseline, not a vitconvert method.** Token Merging (Bolya et al., "Token Merging: Your ViT But Faster",
ICLR 2023, arXiv 2210.09461) is what users would pick instead of a converted model: one call, no
training. This is an independent implementation written from the paper's description (no code from
facebookresearch/ToMe, which is CC-BY-NC), built on vitconvert's fx anatomy rather than class swapping:

* In every block, between the attention and the MLP branch, ``r`` tokens are merged away.
* **Bipartite soft matching**: the patch tokens are split alternately into sets A and B; each A token
  is linked to its most similar B token (cosine similarity of the attention keys, averaged over heads);
  the ``r`` most similar links are merged (A token into its B partner). Prefix tokens (class,
  distillation, registers) never take part, so token pooling and the head are unchanged.
* **Weighted average with size tracking**: a merged token is the size-weighted mean of its parts and
  its size (how many patches it stands for) is the sum.
* **Proportional attention**: attention logits get ``+ log(size)`` of each key, so a token standing for
  s patches weighs as much as s copies of it. With fused SDPA this is an additive float mask.

``r = 0`` runs the original blocks' computation exactly (no mask, no merge). The paper's r=8 / r=13 on
DeiT-S give 3.4 / 2.7 GMACs; see ``tests/test_tome.py``.

Example:
    >>> import timm
    >>> from benchmarks.tome import tome
    >>> m = tome(timm.create_model("deit_small_patch16_224"), r=13)   # doctest: +SKIP
    >>> m(torch.randn(2, 3, 224, 224)).shape                           # doctest: +SKIP
    torch.Size([2, 1000])
"""

from __future__ import annotations

import json
import operator
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from vitconvert import fx as vfx
from vitconvert.anatomy import Anatomy
from vitconvert.backbones import read_anatomy
from vitconvert.errors import AnatomyError, UserError
from vitconvert.layers.costs import count_macs, to_gmacs

__all__ = ["ToMe", "bipartite_merge", "run", "tome"]


# --- merging ------------------------------------------------------------------------------------------


def bipartite_merge(x: torch.Tensor, keys: torch.Tensor, size: torch.Tensor | None, r: int,
                    num_prefix: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Merge ``r`` patch tokens of ``x`` by bipartite soft matching on ``keys``.

    Args:
        x: (B, N, C) tokens, prefix tokens first.
        keys: (B, H, N, D) attention keys of the same tokens, or (B, N, D).
        size: (B, N, 1) patches each token stands for; ``None`` means all ones.
        r: Tokens to remove (clipped to half the patch tokens).
        num_prefix: Leading tokens that are never merged.

    Returns:
        ``(x, size)`` with ``N - r`` tokens: prefix, then unmerged A tokens (in their order), then B tokens.

    Example:
        >>> x = torch.randn(1, 9, 4)
        >>> y, s = bipartite_merge(x, x, None, r=2, num_prefix=1)
        >>> y.shape, int(s.sum())
        (torch.Size([1, 7, 4]), 9)
    """
    p = num_prefix
    b, n, c = x.shape
    r = min(r, (n - p) // 2)
    if r <= 0:
        return x, size
    if size is None:
        size = x.new_ones(b, n, 1)
    metric = keys.mean(dim=1) if keys.dim() == 4 else keys
    metric = metric[:, p:].float()
    metric = metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    sim = metric[:, 0::2] @ metric[:, 1::2].transpose(1, 2)  # (B, |A|, |B|)
    best, partner = sim.max(dim=-1)  # each A token's most similar B token
    order = best.argsort(dim=-1, descending=True)
    merged_a = order[:, :r]  # the r strongest links
    kept_a = order[:, r:].sort(dim=-1).values  # keep the survivors' spatial order
    dst = partner.gather(1, merged_a)

    xp, sp = x[:, p:], size[:, p:]
    xa, xb, sa, sb = xp[:, 0::2], xp[:, 1::2], sp[:, 0::2], sp[:, 1::2]
    # Size-weighted sums into the destination B tokens, then divide by the new sizes.
    src_x = (xa * sa).gather(1, merged_a[..., None].expand(-1, -1, c))
    src_s = sa.gather(1, merged_a[..., None])
    new_sb = sb.scatter_add(1, dst[..., None], src_s)
    new_xb = (xb * sb).scatter_add(1, dst[..., None].expand(-1, -1, c), src_x) / new_sb
    kept_x = xa.gather(1, kept_a[..., None].expand(-1, -1, c))
    out_x = torch.cat([x[:, :p], kept_x, new_xb.to(x.dtype)], dim=1)
    out_s = torch.cat([size[:, :p], sa.gather(1, kept_a[..., None]), new_sb], dim=1)
    return out_x, out_s


class TokenMerge(nn.Module):
    """Graph node that merges ``r`` tokens (``r`` is changed in place by :attr:`ToMe.r`)."""

    def __init__(self, num_prefix: int) -> None:
        super().__init__()
        self.r = 0
        self.num_prefix = num_prefix

    def forward(self, x: torch.Tensor, keys: torch.Tensor, size: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return bipartite_merge(x, keys, size, self.r, self.num_prefix)

    def extra_repr(self) -> str:
        return f"r={self.r}, num_prefix={self.num_prefix}"


def _sdpa_size_bias(size: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    """Proportional attention as an SDPA float mask (B, 1, 1, N); ``None`` while no token is merged."""
    if size is None:
        return None
    return size[..., 0].log().to(like.dtype)[:, None, None, :]


def _add_size_bias(logits: torch.Tensor, size: torch.Tensor | None) -> torch.Tensor:
    """Proportional attention on explicit attention logits (B, H, N, N)."""
    if size is None:
        return logits
    return logits + size[..., 0].log().to(logits.dtype)[:, None, None, :]


def _keys_of_softmax(core: fx.Node) -> fx.Node:
    """The key tensor behind an explicit ``softmax(q @ k.transpose(-2, -1))``."""
    node = core.args[0]
    for _ in range(6):  # look through scaling, mask adds and dtype casts
        if not isinstance(node, fx.Node):
            break
        if node.op == "call_function" and node.target in (operator.matmul, torch.matmul):
            kt = node.args[1]
            if isinstance(kt, fx.Node) and kt.op == "call_method" and kt.target in ("transpose", "mT"):
                return kt.args[0]
            break
        node = node.args[0] if node.args else None
    raise AnatomyError("ToMe: cannot find the attention keys behind the softmax (expected q @ k.transpose)")


def merging_block(block: nn.Module, attn_path: str, num_prefix: int) -> tuple[fx.GraphModule, TokenMerge]:
    """Rewrite a pre-norm block into ``(x, size) -> (x', size')`` with proportional attention and a merge
    between the attention residual and the MLP.

    Args:
        block: A ViT/DeiT block (one attention core, residual adds on the block input).
        attn_path: The attention module's path relative to ``block``.
        num_prefix: Prefix tokens to protect.
    """
    gm = vfx.trace(block)
    graph = gm.graph
    nodes = list(graph.nodes)
    placeholders = [n for n in nodes if n.op == "placeholder"]
    x_in = placeholders[0]
    with graph.inserting_after(x_in):
        size = graph.placeholder("size")
    cores = [n for n in nodes if vfx.is_attention_core(n, gm)]
    if len(cores) != 1:
        raise AnatomyError(f"ToMe: {type(block).__name__} has {len(cores)} attention cores, expected 1")
    core = cores[0]
    if core.op == "call_function" and core.target is F.scaled_dot_product_attention:
        if core.kwargs.get("attn_mask") is not None or len(core.args) > 3:
            raise AnatomyError(f"ToMe: {type(block).__name__} already passes an attention mask")
        keys = core.args[1]
        with graph.inserting_before(core):
            bias = graph.call_function(_sdpa_size_bias, (size, core.args[0]))
        core.kwargs = {**core.kwargs, "attn_mask": bias}
    else:
        keys = _keys_of_softmax(core)
        with graph.inserting_before(core):
            biased = graph.call_function(_add_size_bias, (core.args[0], size))
        core.args = (biased, *core.args[1:])

    def in_attention(n: fx.Node) -> bool:
        return any(s == attn_path or s.startswith(attn_path + ".") for s in vfx.scopes(n))

    after = nodes[nodes.index(core) + 1:]
    residual = next((n for n in after if vfx.is_add(n) and not in_attention(n) and x_in in n.args), None)
    if residual is None:
        raise AnatomyError(f"ToMe: no residual add around the attention of {type(block).__name__}")
    merge = TokenMerge(num_prefix)
    gm.add_submodule("tome_merge", merge)
    with graph.inserting_after(residual):
        merged = graph.call_module("tome_merge", (residual, keys, size))
    with graph.inserting_after(merged):
        new_x = graph.call_function(operator.getitem, (merged, 0))
    with graph.inserting_after(new_x):
        new_size = graph.call_function(operator.getitem, (merged, 1))
    residual.replace_all_uses_with(new_x, delete_user_cb=lambda u: u is not merged)
    out = next(n for n in graph.nodes if n.op == "output")
    out.args = ((out.args[0], new_size),)
    graph.lint()
    gm.recompile()
    return gm, merge


# --- model --------------------------------------------------------------------------------------------


class ToMe(nn.Module):
    """A timm ViT/DeiT running with token merging (training-free baseline).

    The base model is kept as ``self.base`` (its state dict keys are unchanged under ``base.``); the
    rewritten graphs share its modules.

    Args:
        model: A timm ViT/DeiT (class-token pooling) in any weights.
        r: Tokens merged per block: an int for every block, or one value per block.
        anatomy: The model's anatomy, if already read.
    """

    def __init__(self, model: nn.Module, r: int | list[int] = 0, anatomy: Anatomy | None = None) -> None:
        super().__init__()
        anatomy = anatomy or read_anatomy(model)
        if anatomy.family != "vit":
            raise UserError(f"ToMe (baseline) supports ViT/DeiT models; {type(model).__name__} is a "
                            f"{anatomy.family} model (merging inside shifted/reduced windows is not defined)")
        if anatomy.pool != "token":
            raise UserError(f"ToMe (baseline) needs class-token pooling; the model pools with "
                            f"{anatomy.pool!r}")
        self.base = model.eval()
        self.anatomy = anatomy
        embed, head = vfx.split_at_blocks(model, anatomy.block_paths)
        blocks, merges = [], []
        for b in anatomy.blocks:
            rel_attn = b.attn[len(b.path) + 1:]
            gm, merge = merging_block(model.get_submodule(b.path), rel_attn, anatomy.num_prefix_tokens)
            blocks.append(gm)
            merges.append(merge)
        # Graphs share the base modules; kept outside the module tree so weights appear once.
        graphs = {"embed": embed, "head": head, "blocks": blocks, "merges": merges}
        object.__setattr__(self, "_graphs", graphs)
        self.r = r

    @property
    def r(self) -> list[int]:
        """Tokens merged in each block."""
        return [m.r for m in self.__dict__["_graphs"]["merges"]]

    @r.setter
    def r(self, value: int | list[int]) -> None:
        merges = self.__dict__["_graphs"]["merges"]
        values = [value] * len(merges) if isinstance(value, int) else list(value)
        if len(values) != len(merges) or any(not isinstance(v, int) or v < 0 for v in values):
            raise UserError(f"r must be a non-negative int or {len(merges)} of them, got {value!r}")
        for m, v in zip(merges, values, strict=True):
            m.r = v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.__dict__["_graphs"]
        tokens = g["embed"](x)
        size = None
        for block in g["blocks"]:
            tokens, size = block(tokens, size)
        return g["head"](tokens)

    def extra_repr(self) -> str:
        r = self.r
        return f"r={r[0] if len(set(r)) == 1 else r}, baseline=ToMe (training-free)"


def tome(model: nn.Module, r: int | list[int] = 8) -> ToMe:
    """Wrap a timm ViT/DeiT with ToMe token merging (``r`` tokens merged per block).

    Example:
        >>> import timm
        >>> m = tome(timm.create_model("deit_tiny_patch16_224"), r=8)
        >>> m.r[:3]
        [8, 8, 8]
    """
    return ToMe(model, r)


def gmacs(model: nn.Module, img_size: tuple[int, int]) -> float:
    """GMACs of one image through ``model`` (vitconvert's counter: attention included, fvcore-style)."""
    x = torch.zeros(1, 3, *img_size)
    return to_gmacs(count_macs(lambda: model.eval()(x)))


# --- benchmark ----------------------------------------------------------------------------------------


BACKBONES = ("deit_small_patch16_224",)
R_VALUES = (8, 13, 16)
PUBLISHED_GMACS = {8: 3.4, 13: 2.7, 16: 2.3}  # DeiT-S, ToMe paper / Papers-with-Code


def run(quick: bool, out_dir: Path) -> dict[str, Any]:
    """Measure ToMe r in {8, 13, 16} against timm on DeiT-S, side by side; write ``tome_speed.json``.

    CPU: batch 64 (quick: 16) throughput in fp32 and batch-1 latency. CUDA (when present): batch 256,
    bf16 autocast.
    """
    import timm

    from benchmarks import protocol
    from benchmarks.common import machine_block

    results: dict[str, Any] = {"name": "tome", "quick": quick, "rows": [], "models": {}}
    for arch in BACKBONES:
        torch.manual_seed(0)
        base = timm.create_model(arch, pretrained=False).eval()
        img = read_anatomy(base).img_size
        base_g = gmacs(base, img)
        models: dict[str, nn.Module] = {"timm": base}
        info: dict[str, Any] = {"timm": {"gmacs": base_g}}
        for r in R_VALUES:
            m = ToMe(base, r)
            models[f"tome_r{r}"] = m
            info[f"tome_r{r}"] = {"gmacs": gmacs(m, img), "published_gmacs": PUBLISHED_GMACS.get(r), "r": r}
        measured = protocol.measure_models(models, img, quick=quick)
        results["models"][arch] = {"gmacs": info, "speed": measured}
        for name, meta in info.items():
            if name == "timm":
                continue
            results["rows"].extend(protocol.result_row(
                measured, name, method="tome", backbone=arch, setting=f"r={meta['r']}",
                gmacs=meta["gmacs"], base_gmacs=base_g,
                notes="training-free baseline (ToMe, Bolya et al. 2023)"))
    results["machine"] = machine_block()
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tome_speed.json").write_text(json.dumps(results, indent=1) + "\n")
    return results
