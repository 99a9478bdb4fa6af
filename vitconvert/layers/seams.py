"""Seams: where a method plugs into an unchanged timm block, found and rewritten with torch.fx.

This module owns the block-level surgery that methods share, none of it tied to a method:

* :func:`read_residual_block` reads a pre-norm residual block (ViT/DeiT, PVT-v2, Swin or any block of the
  same shape), or a post-norm one (SwinV2: ``x + norm1(attn(x))``), from its fx graph: its norms, attention, MLP,
  the per-token modules on each residual branch (layer scale, drop path), its layout and extra inputs;
* :func:`drop_path_modules` finds the block's stochastic-depth slots from that reading, not by name;
* :func:`mlp_input_layers` finds the linear layers that read the MLP's input (where channels concatenated to
  that input would enter);
* :func:`rewrite_attention` returns a drop-in replacement of a block whose attention takes an additive
  ``attn_bias`` and/or also returns the pre-softmax logits;
* :func:`insert_residual_branch` returns a drop-in replacement of a block with one more residual branch
  between its attention and its MLP;
* :func:`rewrite_block` applies both of the above to one block from a single trace (they do not compose
  by re-tracing a rewritten block).

The replacements are :class:`torch.fx.GraphModule` objects that hold the block's own children, parameters
and buffers (same names, same tensors, same persistence), so ``model.set_submodule(path, replacement)``
leaves ``model.state_dict()`` unchanged (plus the inserted branch's keys).

Why one module of this size (about 720 lines): every seam is a rewrite of the same reading of a block
(:class:`_Traced`: its graph, its residual adds, its cores), and the rewrites share its helpers; apart, each would
re-read the block.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.fx as fx
import torch.nn.functional as F
from timm.layers import DropPath, maybe_add_mask
from torch import Tensor, nn

from vitconvert import fx as vfx
from vitconvert.errors import AnatomyError

__all__ = [
    "ResidualBlock",
    "apply_post_chain",
    "attention_with_logits",
    "drop_path_modules",
    "insert_residual_branch",
    "is_tensor_scale",
    "mlp_input_layers",
    "read_residual_block",
    "rewrite_attention",
    "rewrite_block",
    "sdpa_with_bias",
]


# --------------------------------------------------------------------------------------------------------
# Reading a pre-norm (or post-norm) residual block
# --------------------------------------------------------------------------------------------------------

_NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)


@dataclass
class ResidualBlock:
    """What :func:`read_residual_block` found in one block; module names are relative to the block.

    The block computes ``x = x + post_attn(attention_part(norm1(x)))`` then
    ``x = x + post_mlp(mlp(norm2(x)))``, where ``attention_part`` is the ``attn`` module, plus (Swin only,
    ``window_ops``) the cyclic shift, padding, window partition and reverse the block does in its own
    methods around it. With ``post_norm`` (SwinV2) the norms come after their parts instead:
    ``x = x + post_attn(norm1(attention_part(x)))`` then ``x = x + post_mlp(norm2(mlp(x)))``.
    """

    norm1: str
    attn: str
    # Per-token modules between the attention part and its add, in call order; an entry that names a tensor the
    # block holds itself (BEiT's and RoPE ViT's ``gamma_1``: layer scale as a parameter) multiplies (see
    # :func:`apply_post_chain`).
    post_attn: list[str]
    norm2: str
    mlp: str
    post_mlp: list[str]
    layout: Literal["tokens", "nhwc"]  # tokens: (B, N, C) throughout; nhwc: (B, H, W, C) in and out (Swin)
    extra_inputs: list[str] = field(default_factory=list)  # required forward inputs after x (PVT-v2: feat_size)
    window_size: tuple[int, int] | None = None  # Swin: from the block's attributes
    shift_size: tuple[int, int] | None = None
    window_ops: bool = False  # the attention branch holds block-level ops (shift / partition / reverse)
    post_norm: bool = False  # norm1 / norm2 normalise the attention / MLP outputs, not their inputs


@dataclass
class _Traced:
    """The traced block and the nodes the rewrites attach to."""

    gm: fx.GraphModule
    x: fx.Node  # the block input
    attn_add: fx.Node  # x + post_attn(...), in the block's input layout
    mlp_add: fx.Node  # stream + post_mlp(...)
    core: fx.Node  # the attention core: an SDPA call or a softmax
    extra: list[fx.Node]  # placeholders of the required inputs after x


def read_residual_block(block: nn.Module, where: str = "") -> ResidualBlock:
    """Trace ``block`` and check it is a pre-norm (or post-norm) residual block; say where its parts are.

    Args:
        block: A transformer block: timm's ViT ``Block``, PVT-v2 ``Block``, ``SwinTransformerBlock`` or any
            module computing ``x + post_attn(attn(norm1(x)))`` then ``+ post_mlp(mlp(norm2(.)))``.
        where: How to name the block in error messages (e.g. its path in the model); defaults to its type.

    Returns:
        The part names (relative to the block), layout, extra inputs and, for Swin, window and shift sizes.

    Raises:
        AnatomyError: one line naming the block and what does not match.

    Example:
        >>> import timm
        >>> m = timm.create_model("vit_tiny_patch16_224")
        >>> r = read_residual_block(m.blocks[0])
        >>> r.norm1, r.attn, r.post_attn, r.mlp, r.post_mlp, r.layout
        ('norm1', 'attn', ['ls1', 'drop_path1'], 'mlp', ['ls2', 'drop_path2'], 'tokens')
    """
    return _read(block, where)[0]


def _read(block: nn.Module, where: str = "", inputs: tuple[str, ...] = ()) -> tuple[ResidualBlock, _Traced]:
    where = where or type(block).__name__
    try:
        gm = vfx.trace(block, keep=inputs)
    except AnatomyError as e:
        raise AnatomyError(f"{where}: {e}") from None
    nodes = list(gm.graph.nodes)
    placeholders = [n for n in nodes if n.op == "placeholder"]
    if not placeholders:
        raise AnatomyError(f"{where} takes no input")
    x = placeholders[0]
    # Inputs without a default (PVT-v2's feat_size); optional ones were baked to their defaults by the trace.
    extra = [p for p in placeholders[1:] if not p.args]

    # The residual stream: x -> attn_add [-> reshape] -> mlp_add [-> reshape] -> output.
    out = next(n for n in nodes if n.op == "output")
    mlp_add, out_reshaped = _peel_reshape(out.args[0])
    if not _is_block_add(mlp_add):
        raise AnatomyError(f"{where} is not a residual block: its output is not a residual add")
    stream = next((a for a in mlp_add.args if isinstance(a, fx.Node) and _is_attn_add(_peel_reshape(a)[0], x)), None)
    if stream is None:
        raise AnatomyError(f"{where} is not a pre-norm residual block (x + attention branch, then + MLP branch)")
    attn_add, stream_reshaped = _peel_reshape(stream)
    if stream_reshaped != out_reshaped:
        raise AnatomyError(f"{where}: the residual stream is reshaped between the residuals but not back")
    layout: Literal["tokens", "nhwc"] = "nhwc" if stream_reshaped else "tokens"

    cores = [n for n in nodes if vfx.is_attention_core(n, gm)]
    if len(cores) != 1:
        raise AnatomyError(f"{where}: expected one attention core (SDPA or softmax), found {len(cores)}")
    core = cores[0]
    attn = _top(core)
    if not attn:
        raise AnatomyError(f"{where}: the attention core is not inside a submodule")

    window_ops_allowed = hasattr(block, "window_size") and hasattr(block, "shift_size")
    attn_branch = _other_arg(attn_add, x, where)
    # Post-norm (SwinV2): the attention branch ends in a norm right after the attention part.
    after_attn, _ = _post_chain(attn_branch, attn, window_ops_allowed, set(), where)
    post_norm = bool(after_attn) and not is_tensor_scale(block, after_attn[0]) and isinstance(
        block.get_submodule(after_attn[0]), _NORM_TYPES)
    if post_norm:
        mlp, _ = _norm_of(stream, mlp_add, where, "the attention residual")  # what the stream feeds: the MLP
        norm1, post_attn = after_attn[0], after_attn[1:]
        after_mlp, mlp_end = _post_chain(_other_arg(mlp_add, stream, where), mlp, False, {norm1, attn}, where)
        if not after_mlp or is_tensor_scale(block, after_mlp[0]) or not isinstance(
                block.get_submodule(after_mlp[0]), _NORM_TYPES):
            raise AnatomyError(f"{where}: post-norm attention but no norm right after the MLP ({mlp})")
        norm2, post_mlp = after_mlp[0], after_mlp[1:]
        _, attn_end = _post_chain(attn_branch, attn, window_ops_allowed, {norm2, mlp}, where)
        norm1_out, norm2_out = x, stream  # what the parts read: the stream itself
    else:
        norm1, norm1_out = _norm_of(x, attn_add, where, "the block input")
        norm2, norm2_out = _norm_of(stream, mlp_add, where, "the attention residual")
        mlp = _single_scope([u for u in norm2_out.users if not _is_shape_read(u)], where, f"the output of {norm2}")
    if len({norm1, attn, norm2, mlp}) != 4:
        raise AnatomyError(f"{where}: norm1 ({norm1}), attention ({attn}), norm2 ({norm2}) and MLP ({mlp}) "
                           "are not four different submodules")
    if not post_norm:
        post_attn, attn_end = _post_chain(attn_branch, attn, window_ops_allowed, {norm1, norm2, mlp}, where)
        post_mlp, mlp_end = _post_chain(_other_arg(mlp_add, stream, where), mlp, False, {norm1, norm2, attn}, where)
    window_ops = _check_part(attn_end, attn, norm1_out, x, core, window_ops_allowed, where)
    _check_part(mlp_end, mlp, norm2_out, x, None, False, where)

    parts = ResidualBlock(
        norm1=norm1, attn=attn, post_attn=post_attn, norm2=norm2, mlp=mlp, post_mlp=post_mlp, layout=layout,
        extra_inputs=[str(p.target) for p in extra],
        window_size=_pair(block.window_size) if window_ops_allowed else None,
        shift_size=_pair(block.shift_size) if window_ops_allowed else None,
        window_ops=window_ops, post_norm=post_norm,
    )
    return parts, _Traced(gm=gm, x=x, attn_add=attn_add, mlp_add=mlp_add, core=core, extra=extra)


def mlp_input_layers(block: nn.Module, where: str = "") -> list[str]:
    """The linear layers of the block's MLP that read the MLP's input, in call order (names relative to the block).

    Channels ``r`` concatenated to the MLP's input reach the MLP only through these layers, as ``W_r r`` added to
    each one's output: timm's ``Mlp`` and PVT-v2's MLP have one (``fc1``), SwiGLU two (``fc1_g``, ``fc1_x``).
    Zero-initialised ``W_r`` leaves the block unchanged. DVT's feature reuse enters its blocks this way.

    Raises:
        AnatomyError: when something other than a linear layer reads the MLP's input (one line).

    Example:
        >>> import timm
        >>> mlp_input_layers(timm.create_model("vit_tiny_patch16_224").blocks[0])
        ['mlp.fc1']
    """
    where = where or type(block).__name__
    parts, t = _read(block, where)
    inside = parts.mlp + "."
    # The token stream: what the block input flows into (not the extra inputs, e.g. PVT-v2's feat_size).
    stream: set[fx.Node] = {t.x}
    for n in t.gm.graph.nodes:
        if any(a in stream for a in n.all_input_nodes):
            stream.add(n)

    def in_mlp(n: fx.Node) -> bool:
        return any(s == parts.mlp or s.startswith(inside) for s in vfx.scopes(n))

    layers: list[str] = []
    for n in t.gm.graph.nodes:
        if not in_mlp(n):
            continue
        reads_input = any(a in stream and not in_mlp(a) for a in n.all_input_nodes)
        if not reads_input or _is_shape_read(n):
            continue
        target = str(n.target) if n.op == "call_module" else ""
        if not target or not isinstance(block.get_submodule(target), nn.Linear):
            raise AnatomyError(f"{where}: the MLP's input is read by {n.name} ({n.op} {n.target}), not by a "
                               "linear layer")
        layers.append(target)
    if not layers:
        raise AnatomyError(f"{where}: no linear layer reads the input of the MLP {parts.mlp}")
    return layers


def _top(n: fx.Node) -> str:
    """The block's direct child the node ran in ("" for the block's own forward and methods)."""
    s = vfx.scopes(n)
    return s[0] if s else ""


def _is_shape_read(n: fx.Node) -> bool:
    """``t.shape`` / ``t.size()`` / ``t.dim()`` and items of them: metadata, not data flow."""
    if n.op == "call_function" and n.target is getattr:
        return n.args[1] in ("shape", "ndim", "dtype", "device")
    if n.op == "call_method":
        return n.target in ("size", "dim")
    if n.op == "call_function" and n.target is operator.getitem and isinstance(n.args[0], fx.Node):
        return _is_shape_read(n.args[0])
    return False


def _peel_reshape(n: Any) -> tuple[Any, bool]:
    """The value under a block-level reshape/view of the stream (Swin's (B, H, W, C) <-> (B, N, C))."""
    if isinstance(n, fx.Node) and n.op == "call_method" and n.target in ("reshape", "view") and not _top(n):
        return n.args[0], True
    return n, False


def _is_block_add(n: Any) -> bool:
    return isinstance(n, fx.Node) and vfx.is_add(n) and not _top(n)


def _is_attn_add(n: Any, x: fx.Node) -> bool:
    return _is_block_add(n) and x in n.args


def _other_arg(add: fx.Node, residual: fx.Node, where: str) -> fx.Node:
    """The branch of a residual add: the argument that is not the residual."""
    others = [a for a in add.args if a is not residual]
    if len(others) != 1 or not isinstance(others[0], fx.Node):
        raise AnatomyError(f"{where}: the residual add {add.name!r} does not add one branch to the stream")
    return others[0]


def _single_scope(users: list[fx.Node], where: str, what: str) -> str:
    tops = {_top(u) for u in users}
    if len(tops) != 1 or "" in tops:
        raise AnatomyError(f"{where}: {what} must feed exactly one submodule (found {sorted(tops)})")
    return tops.pop()


def _norm_of(value: fx.Node, add: fx.Node, where: str, what: str) -> tuple[str, fx.Node]:
    """The submodule normalising ``value`` (the residual stream) and the node leaving it.

    Pre-norm: apart from shape reads, the stream feeds only its residual add and one submodule.
    """
    users = [u for u in value.users if u is not add and not _is_shape_read(u)]
    norm = _single_scope(users, where, f"{what} (besides its residual add)")
    leaving = [n for n in value.graph.nodes if _top(n) == norm and any(_top(u) != norm for u in n.users)]
    if len(leaving) != 1:
        raise AnatomyError(f"{where}: {norm} is called more than once or has several outputs")
    return norm, leaving[0]


def _post_chain(branch: fx.Node, core_scope: str, block_ops: bool, forbidden: set[str],
                where: str) -> tuple[list[str], fx.Node]:
    """Walk back from a residual add's branch through single-input modules (layer scale, drop path) to the
    part that computes it; return the modules in call order and the node where the part ends.

    With ``block_ops`` (Swin) the walk also ends at an op of the block's own methods (the window reverse).
    """
    chain: list[str] = []
    node = branch
    while True:
        top = _top(node)
        scale = _tensor_scale(node)
        if scale is not None:  # layer scale held by the block itself: ``gamma * branch``
            chain.append(scale[0])
            node = scale[1]
            continue
        if top == core_scope or (block_ops and not top and node.op != "placeholder"):
            return list(reversed(chain)), node
        if not top or top in forbidden:
            raise AnatomyError(f"{where}: the residual branch of {core_scope} computes {node.name!r} outside a "
                               "per-token module (only layer scale / drop path / identity are supported)")
        if not chain or chain[-1] != top:
            chain.append(top)
        ins = [a for a in node.all_input_nodes if a.op != "get_attr"]
        if len(ins) != 1:
            raise AnatomyError(f"{where}: {top} on the residual branch of {core_scope} takes several inputs")
        node = ins[0]


def _tensor_scale(node: fx.Node) -> tuple[str, fx.Node] | None:
    """``(name, other)`` when ``node`` multiplies a tensor the block holds directly (``self.gamma_1 * t`` in the
    block's own forward: a get_attr without a dot) by one other node; else None."""
    if _top(node) or node.op != "call_function" or node.target not in (operator.mul, torch.mul) or len(node.args) != 2:
        return None
    a, b = node.args
    for scale, other in ((a, b), (b, a)):
        if isinstance(scale, fx.Node) and scale.op == "get_attr" and "." not in str(scale.target) \
                and isinstance(other, fx.Node):
            return str(scale.target), other
    return None


def is_tensor_scale(block: nn.Module, name: str) -> bool:
    """Whether a post-chain entry of :class:`ResidualBlock` names a tensor the block holds (a multiplying layer scale)
    rather than a module."""
    return isinstance(getattr(block, name, None), Tensor)


def apply_post_chain(block: nn.Module, names: list[str], t: Tensor) -> Tensor:
    """Apply a :class:`ResidualBlock` post chain to ``t``: modules called, held tensors multiplied."""
    for n in names:
        t = t * getattr(block, n) if is_tensor_scale(block, n) else block.get_submodule(n)(t)
    return t


def _check_part(end: fx.Node, scope: str, norm_out: fx.Node, x: fx.Node, core: fx.Node | None,
                block_ops: bool, where: str) -> bool:
    """Check that everything ``end`` depends on, back to ``norm_out``, is inside ``scope`` (or, for Swin,
    the block's own window ops), and that it reads ``norm_out``. Return whether block ops were found."""
    seen: set[fx.Node] = set()
    todo = [end]
    found_block_ops = reads_norm = False
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if n is norm_out:
            reads_norm = True
            continue
        if n.op == "get_attr" or (n.op == "placeholder" and n is not x) or _is_shape_read(n):
            continue
        top = _top(n)
        if n is x:
            raise AnatomyError(f"{where}: {scope} reads the block input other than through the norm (not pre-norm)")
        if top != scope:
            if top or not block_ops:
                raise AnatomyError(f"{where}: the {scope} branch computes {n.name!r} "
                                   f"{'in ' + top if top else 'outside any submodule'}; only window blocks "
                                   "(Swin) may do shift/partition ops in their own forward")
            found_block_ops = True
        todo.extend(n.all_input_nodes)
    if not reads_norm:
        raise AnatomyError(f"{where}: {scope} does not read its norm's output")
    if core is not None and core not in seen:
        raise AnatomyError(f"{where}: the attention core is not on the attention branch")
    return found_block_ops


def _pair(v: int | tuple[int, ...] | list[int]) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


# --------------------------------------------------------------------------------------------------------
# Drop path
# --------------------------------------------------------------------------------------------------------


def drop_path_modules(block: nn.Module) -> list[str]:
    """The block's stochastic-depth slots, found on its residual branches rather than by attribute name.

    On each branch (``post_attn``, ``post_mlp`` of :func:`read_residual_block`) the slots are the timm
    ``DropPath`` modules; a branch without one has its slot where timm builds ``nn.Identity`` for a zero
    rate: the last module before the add (timm applies drop path after layer scale), if it is exactly an
    ``nn.Identity``. Callers can then switch those module objects to ``DropPath`` in place.

    Args:
        block: A pre-norm residual block (see :func:`read_residual_block`).

    Returns:
        Module names relative to the block, attention branch first.

    Example:
        >>> import timm
        >>> drop_path_modules(timm.create_model("vit_tiny_patch16_224").blocks[0])
        ['drop_path1', 'drop_path2']
    """
    parts = read_residual_block(block)
    slots: list[str] = []
    for chain in (parts.post_attn, parts.post_mlp):
        chain = [n for n in chain if not is_tensor_scale(block, n)]
        found = [n for n in chain if isinstance(block.get_submodule(n), DropPath)]
        if not found and chain and type(block.get_submodule(chain[-1])) is nn.Identity:
            found = [chain[-1]]
        slots.extend(found)
    return slots


# --------------------------------------------------------------------------------------------------------
# Attention bias and logits
# --------------------------------------------------------------------------------------------------------

_SDPA_KWARGS = ("attn_mask", "dropout_p", "is_causal", "scale")  # positional order after q, k, v


def _additive_mask(mask: Tensor | None, is_causal: bool, q: Tensor, k: Tensor) -> Tensor | None:
    """An SDPA ``attn_mask`` / ``is_causal`` as one additive float mask (bool masks: True = attend)."""
    if mask is not None and mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(~mask, float("-inf"))
    if is_causal:
        keep = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
        causal = torch.zeros(keep.shape, dtype=q.dtype, device=q.device).masked_fill(~keep, float("-inf"))
        mask = maybe_add_mask(causal, mask)
    return mask


def _dropout_p(dropout: nn.Module | None, baked: float) -> float:
    # timm computes ``self.attn_drop.p if self.training else 0.`` at run time; the trace baked its mode's value.
    if isinstance(dropout, nn.Dropout):
        return dropout.p if dropout.training else 0.0
    return baked


@torch.fx.wrap
def sdpa_with_bias(q: Tensor, k: Tensor, v: Tensor, attn_bias: Tensor | None = None,
                   dropout: nn.Module | None = None, **sdpa_kwargs: Any) -> Tensor:
    """``F.scaled_dot_product_attention(q, k, v, **sdpa_kwargs)`` with an optional additive ``attn_bias``.

    Without a bias the call is exactly the original one (bit-identical output). A bias is added to the
    existing mask (timm's ``maybe_add_mask``: ``mask + bias``; bool and causal masks become additive
    float masks first) and passed as SDPA's float ``attn_mask``, so attention stays fused. ``dropout``
    (the attention module's ``attn_drop``) sets ``dropout_p`` at run time, as timm does.

    fx-wrapped: the ``attn_bias is None`` test runs at run time even inside a traced graph.

    Example:
        >>> q = k = v = torch.randn(1, 2, 5, 8)
        >>> torch.equal(sdpa_with_bias(q, k, v), F.scaled_dot_product_attention(q, k, v))
        True
    """
    sdpa_kwargs["dropout_p"] = _dropout_p(dropout, sdpa_kwargs.get("dropout_p", 0.0))
    if attn_bias is None:
        return F.scaled_dot_product_attention(q, k, v, **sdpa_kwargs)
    mask = _additive_mask(sdpa_kwargs.pop("attn_mask", None), sdpa_kwargs.pop("is_causal", False), q, k)
    sdpa_kwargs["attn_mask"] = maybe_add_mask(attn_bias.to(q.dtype), mask)
    out = F.scaled_dot_product_attention(q, k, v, **sdpa_kwargs)
    return _heads_last(out) if torch.compiler.is_exporting() else out


def _heads_last(out: Tensor) -> Tensor:
    """``out`` (B, heads, N, d) copied into a (B, N, heads, d) layout, so the caller's ``transpose(1, 2).reshape(B, N,
    C)`` is a view. Exported graphs need it where the sub-batch size is only known at run time: the exporter records
    that reshape as a view of the layout the fused kernel gives, then decomposes the kernel into one that gives the
    other layout, and the view no longer holds. (A clone, not ``contiguous()``: that is a no-op while tracing.)"""
    return out.transpose(1, 2).clone(memory_format=torch.contiguous_format).transpose(1, 2)


@torch.fx.wrap
def attention_with_logits(q: Tensor, k: Tensor, v: Tensor, attn_bias: Tensor | None = None,
                          dropout: nn.Module | None = None, attn_mask: Tensor | None = None,
                          dropout_p: float = 0.0, is_causal: bool = False,
                          scale: float | None = None) -> tuple[Tensor, Tensor]:
    """Materialised attention as timm's non-fused path computes it, also returning the logits.

    ``logits = (q * scale) @ k^T + mask + attn_bias``, ``out = dropout(softmax(logits)) @ v``; the mask
    is SDPA's ``attn_mask`` / ``is_causal`` made additive. Returns ``(out, logits)``, logits of shape
    (B, heads, Nq, Nk).

    Example:
        >>> q = k = v = torch.randn(1, 2, 5, 8)
        >>> out, logits = attention_with_logits(q, k, v)
        >>> logits.shape, torch.allclose(out, F.scaled_dot_product_attention(q, k, v), atol=1e-6)
        (torch.Size([1, 2, 5, 5]), True)
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = (q * scale) @ k.transpose(-2, -1)
    logits = maybe_add_mask(logits, _additive_mask(attn_mask, is_causal, q, k))
    logits = maybe_add_mask(logits, attn_bias)
    probs = logits.softmax(dim=-1)
    p = _dropout_p(dropout, dropout_p)
    if p > 0:
        probs = F.dropout(probs, p)
    # (B, heads, N, d) from the product: the caller's reshape copies it anyway, so the copy happens here instead.
    return _heads_last(probs @ v), logits


def rewrite_attention(block: nn.Module, *, bias: bool = False, logits: bool = False) -> fx.GraphModule:
    """A replacement for ``block`` whose attention takes an additive bias and/or reports its logits.

    The replacement keeps the block's parameter and buffer names and values (``model.set_submodule(path,
    new)`` leaves ``model.state_dict()`` identical) and takes the block's inputs, plus, with ``bias``, an
    optional keyword ``attn_bias`` added to the pre-softmax logits: broadcastable to (B, heads, Nq, Nk);
    for Swin per window, (B * windows, heads, Wa, Wa). With ``logits`` it returns ``(out, attn_logits)``,
    the logits actually used: ``(q * scale) @ k^T`` + the model's own bias/mask + ``attn_bias``.

    * A fused ``scaled_dot_product_attention`` core stays fused when only ``bias`` is asked
      (:func:`sdpa_with_bias`): bit-identical to the block without a bias, the bias passed as SDPA's
      additive float mask (with any existing mask). With ``logits`` the core is materialised
      (:func:`attention_with_logits`).
    * An explicit softmax core (timm with ``fused_attn=False``, Swin's default) gets the bias added to the
      softmax input (timm's ``maybe_add_mask``, a no-op for ``None``); the logits are that input.

    Attention dropout follows the attention module's ``attn_drop`` at run time (train/eval), as in timm.

    Args:
        block: A pre-norm residual block (see :func:`read_residual_block`) with one attention core.
        bias: Add the ``attn_bias`` keyword input.
        logits: Also return the attention logits.

    Raises:
        AnatomyError: the block is not a pre-norm residual block or its attention core is not understood.
        ValueError: neither ``bias`` nor ``logits`` is asked.

    Example:
        >>> import timm
        >>> m = timm.create_model("vit_tiny_patch16_224").eval()
        >>> new = rewrite_attention(m.blocks[0], bias=True, logits=True)
        >>> out, lg = new(torch.randn(2, 197, 192), attn_bias=torch.zeros(1, 1, 197, 197))
        >>> lg.shape
        torch.Size([2, 3, 197, 197])
    """
    if not (bias or logits):
        raise ValueError("rewrite_attention: ask for bias=True and/or logits=True")
    where = type(block).__name__
    parts, t = _read(block, where)
    _adopt(t.gm, block)
    _attention_seam(block, parts, t, bias, logits, where)
    return _finish(t.gm, f"{type(block).__name__}AttentionSeam")


def _attention_seam(block: nn.Module, parts: ResidualBlock, t: _Traced, bias: bool, logits: bool, where: str) -> None:
    """:func:`rewrite_attention`'s graph edit on a traced block (``t``), in place."""
    gm, graph, core = t.gm, t.gm.graph, t.core
    bias_node: fx.Node | None = None
    if bias:
        last_placeholder = [n for n in graph.nodes if n.op == "placeholder"][-1]
        with graph.inserting_after(last_placeholder):
            bias_node = graph.placeholder("attn_bias", default_value=None)

    logits_node: fx.Node
    if core.op == "call_function" and core.target is F.scaled_dot_product_attention:
        logits_node = _rewrite_sdpa(gm, core, block.get_submodule(parts.attn), parts.attn, bias_node, logits, where)
    else:
        logits_node = _rewrite_softmax(gm, core, bias_node, where)

    if logits:
        out = next(n for n in graph.nodes if n.op == "output")
        out.args = ((out.args[0], logits_node),)


def _rewrite_sdpa(gm: fx.GraphModule, core: fx.Node, attn: nn.Module, attn_path: str, bias_node: fx.Node | None,
                  logits: bool, where: str) -> fx.Node:
    """Replace an SDPA call by :func:`sdpa_with_bias` or :func:`attention_with_logits`; return the logits
    node (or the new call when logits are not asked)."""
    graph = gm.graph
    q, k, v, *rest = core.args
    kwargs = dict(zip(_SDPA_KWARGS, rest, strict=False)) | dict(core.kwargs)
    unknown = set(kwargs) - set(_SDPA_KWARGS)
    if unknown:
        raise AnatomyError(f"{where}: scaled_dot_product_attention with {sorted(unknown)} is not supported")
    with graph.inserting_before(core):
        dropout = graph.get_attr(f"{attn_path}.attn_drop") if isinstance(getattr(attn, "attn_drop", None),
                                                                          nn.Dropout) else None
        extra = {"attn_bias": bias_node, "dropout": dropout}
        if not logits:
            new = _wrapped_call(graph, core, sdpa_with_bias, (q, k, v), {**kwargs, **extra})
            core.replace_all_uses_with(new)
            graph.erase_node(core)
            return new
        pair = _wrapped_call(graph, core, attention_with_logits, (q, k, v), {**kwargs, **extra})
        out = graph.call_function(operator.getitem, (pair, 0))
        lg = graph.call_function(operator.getitem, (pair, 1))
    core.replace_all_uses_with(out)
    graph.erase_node(core)
    return lg


def _rewrite_softmax(gm: fx.GraphModule, core: fx.Node, bias_node: fx.Node | None, where: str) -> fx.Node:
    """Add the bias to the softmax input; return the (biased) logits node."""
    scores = core.args[0] if core.args else None
    if not isinstance(scores, fx.Node):
        raise AnatomyError(f"{where}: cannot read the input of the attention softmax")
    dim = core.kwargs.get("dim", core.args[1] if len(core.args) > 1 else None)
    if core.op == "call_module":
        dim = getattr(gm.get_submodule(str(core.target)), "dim", None)
    if dim not in (-1, 3):
        raise AnatomyError(f"{where}: the attention softmax is not over the last dimension (dim={dim})")
    if bias_node is None:
        return scores
    with gm.graph.inserting_before(core):
        biased = _wrapped_call(gm.graph, core, maybe_add_mask, (scores, bias_node), {})
    core.replace_input_with(scores, biased)
    return biased


def _wrapped_call(graph: fx.Graph, like: fx.Node, fn: Any, args: tuple, kwargs: dict) -> fx.Node:
    """A call of an fx-wrapped function, placed in ``like``'s module scope.

    ``is_wrapped`` makes the generated code re-register the function with ``torch.fx.wrap``, so tracing a
    model that holds the rewritten block keeps the call (and its run-time ``None`` test) as one node.
    """
    node = graph.call_function(fn, args, kwargs)
    node.meta["is_wrapped"] = True
    if "nn_module_stack" in like.meta:
        node.meta["nn_module_stack"] = dict(like.meta["nn_module_stack"])
    return node


# --------------------------------------------------------------------------------------------------------
# A residual branch after attention
# --------------------------------------------------------------------------------------------------------


def insert_residual_branch(block: nn.Module, branch: nn.Module, name: str = "branch") -> fx.GraphModule:
    """A replacement for ``block`` with one more residual branch between its attention and its MLP.

    It computes ``x = x + post_attn(attention_part(norm1(x)))``, then ``x = x + branch(x, *extra_inputs)``,
    then the MLP residual exactly as the block does. The branch sees ``x`` in the block's own layout at
    that point: (B, N, C) for ViT/PVT-v2 (PVT-v2's ``feat_size`` passed after it), (B, H, W, C) for Swin.
    It is registered as ``name`` inside the replacement, so its state-dict keys are
    ``<block path>.<name>.*``; the block's own keys and tensors are unchanged.

    A branch whose output is exactly zero (e.g. a zero-initialised last linear layer) leaves the block's
    output bit-identical.

    Args:
        block: A pre-norm residual block (see :func:`read_residual_block`).
        branch: Module called as ``branch(x, *extra_inputs)``, returning a tensor shaped like ``x``.
        name: Attribute name of the branch in the replacement; must not clash with the block's.

    Raises:
        AnatomyError: the block is not a pre-norm residual block.
        ValueError: ``name`` is not a plain identifier or already names an attribute of the block.

    Example:
        >>> import timm
        >>> m = timm.create_model("vit_tiny_patch16_224").eval()
        >>> new = insert_residual_branch(m.blocks[3], nn.Linear(192, 192), name="adapter")
        >>> m.set_submodule("blocks.3", new)
        >>> "blocks.3.adapter.weight" in m.state_dict()
        True
    """
    _check_branch_name(block, name, "insert_residual_branch")
    _, t = _read(block, type(block).__name__)
    _adopt(t.gm, block)
    _branch_seam(t, branch, name)
    return _finish(t.gm, f"{type(block).__name__}With{type(branch).__name__}")


def _check_branch_name(block: nn.Module, name: str, caller: str) -> None:
    if not name.isidentifier() or hasattr(block, name):
        raise ValueError(f"{caller}: {name!r} is not a free attribute name on {type(block).__name__}")


def _branch_seam(t: _Traced, branch: nn.Module, name: str) -> None:
    """:func:`insert_residual_branch`'s graph edit on a traced block (``t``), in place."""
    gm, graph = t.gm, t.gm.graph
    gm.add_module(name, branch)
    with graph.inserting_after(t.attn_add):
        update = graph.call_module(name, (t.attn_add, *t.extra))
    with graph.inserting_after(update):
        x = graph.call_function(operator.add, (t.attn_add, update))
    t.attn_add.replace_all_uses_with(x, delete_user_cb=lambda user: user not in (update, x))


def rewrite_block(block: nn.Module, *, bias: bool = False, logits: bool = False, branch: nn.Module | None = None,
                  name: str = "branch") -> fx.GraphModule:
    """:func:`rewrite_attention` and :func:`insert_residual_branch` on one block, from one trace.

    The two seams do not compose by calling one on the other's output: re-tracing a rewritten block loses
    the module scopes the reader needs (the replacement's nodes are no longer inside ``attn`` / ``mlp``).
    This applies both edits to a single trace of the original block: the replacement takes the block's
    inputs (plus ``attn_bias`` with ``bias``), runs the inserted ``branch`` after the attention residual and
    returns ``(out, attn_logits)`` with ``logits``, with the same state-dict keys as each seam alone.

    Args:
        block: A pre-norm residual block (see :func:`read_residual_block`).
        bias: As in :func:`rewrite_attention`.
        logits: As in :func:`rewrite_attention`.
        branch: As in :func:`insert_residual_branch` (None: no branch).
        name: As in :func:`insert_residual_branch`.

    Raises:
        AnatomyError: the block is not a pre-norm residual block.
        ValueError: nothing to do, or ``name`` is not free.

    Example:
        >>> import timm
        >>> m = timm.create_model("vit_tiny_patch16_224").eval()
        >>> new = rewrite_block(m.blocks[0], bias=True, logits=True, branch=nn.Identity(), name="adapter")
        >>> out, lg = new(torch.randn(1, 197, 192))
        >>> out.shape, lg.shape
        (torch.Size([1, 197, 192]), torch.Size([1, 3, 197, 197]))
    """
    if not (bias or logits or branch is not None):
        raise ValueError("rewrite_block: ask for bias=True, logits=True and/or a branch")
    if branch is not None:
        _check_branch_name(block, name, "rewrite_block")
    where = type(block).__name__
    parts, t = _read(block, where)
    _adopt(t.gm, block)
    if bias or logits:
        _attention_seam(block, parts, t, bias, logits, where)
    if branch is not None:
        _branch_seam(t, branch, name)
    return _finish(t.gm, f"{where}Seams")


# --------------------------------------------------------------------------------------------------------
# Replacement modules that keep the block's state
# --------------------------------------------------------------------------------------------------------


def _adopt(gm: fx.GraphModule, block: nn.Module) -> None:
    """Give ``gm`` the block's own children, parameters and buffers.

    fx copies only what the graph reads, into bare containers, and registers every tensor it copies as a
    persistent buffer: Swin's non-persistent ``attn_mask`` would enter the state dict and modules the
    graph does not call would vanish. Tensors the tracer stored as constants (e.g. Swin's flattened relative
    position index) are kept as non-persistent buffers: they follow ``.to(device)`` but are not state.
    """
    own = set(block._modules) | set(block._parameters) | set(block._buffers)
    constants = {
        root: getattr(gm, root)
        for n in gm.graph.nodes
        if n.op == "get_attr" and (root := str(n.target).split(".")[0]) not in own
    }
    for table in (gm._modules, gm._parameters, gm._buffers):
        table.clear()
    gm._non_persistent_buffers_set.clear()
    gm._modules.update(block._modules)
    gm._parameters.update(block._parameters)
    gm._buffers.update(block._buffers)
    gm._non_persistent_buffers_set.update(block._non_persistent_buffers_set)
    for root, value in constants.items():
        gm.register_buffer(root, value, persistent=False)
    gm.training = block.training


def _finish(gm: fx.GraphModule, class_name: str) -> fx.GraphModule:
    gm.graph.lint()
    gm.recompile()
    gm.__class__.__name__ = class_name
    return gm


# --------------------------------------------------------------------------------------------------------
# Swapping the attention core (q, k, v -> output)
# --------------------------------------------------------------------------------------------------------


def replace_attention_core(block: nn.Module, core: nn.Module, name: str = "attn_core",
                           inputs: Sequence[str] = ()) -> fx.GraphModule:
    """A replacement for ``block`` whose ``scaled_dot_product_attention`` call is ``core`` instead.

    Everything around the core (the block's own q/k/v projections, norms, output projection, residuals) is
    the block's, with its parameters and names; only the product ``softmax(q k^T) v`` changes. ``core`` is
    registered as ``name`` inside the replacement and called as
    ``core(q, k, v, attn_mask=..., dropout_p=..., is_causal=..., scale=..., dropout=attn_drop)``: the SDPA
    arguments the block passes (``dropout_p`` as baked by the trace) plus the attention module's ``attn_drop``
    (``None`` if it has none), so the core can follow train/eval at run time as timm does. A core without
    parameters leaves ``model.state_dict()`` unchanged.

    Whatever the block computes from its other inputs before the core stays the block's: EVA's rotary embedding
    (an optional block input, listed in ``inputs`` so the trace keeps it instead of baking it to ``None``) rotates q
    and k before they reach the core, and BEiT's relative position bias reaches it as SDPA's float ``attn_mask``.

    Only a fused SDPA core is understood: a block built with ``fused_attn=False`` computes its attention as
    several ops (scale, matmul, mask, softmax, matmul) that a swap would have to match one by one; set the
    attention module's ``fused_attn = True`` first (the same attention, up to float rounding).

    Args:
        block: A pre-norm residual block (see :func:`read_residual_block`) with an SDPA attention core.
        core: Module computing attention from ``(q, k, v)`` shaped (B, heads, N, d).
        name: Attribute name of the core in the replacement; must not clash with the block's.
        inputs: Optional forward arguments the model passes the block (the anatomy's
            :attr:`~vitconvert.anatomy.BlockInfo.shared_inputs`, e.g. ``rope``): inputs of the replacement too.

    Raises:
        AnatomyError: the block is not a pre-norm residual block, or its core is not an SDPA call.
        ValueError: ``name`` is not a plain identifier or already names an attribute of the block.

    Example:
        >>> import timm
        >>> class Plain(nn.Module):
        ...     def forward(self, q, k, v, dropout=None, **sdpa):
        ...         return F.scaled_dot_product_attention(q, k, v, **sdpa)
        >>> m = timm.create_model("vit_tiny_patch16_224").eval()
        >>> new = replace_attention_core(m.blocks[0], Plain())
        >>> x = torch.randn(1, 197, 192)
        >>> torch.equal(new(x), m.blocks[0](x))
        True
    """
    if not name.isidentifier() or hasattr(block, name):
        raise ValueError(f"replace_attention_core: {name!r} is not a free attribute name on {type(block).__name__}")
    where = type(block).__name__
    parts, t = _read(block, where, tuple(inputs))
    gm, graph, node = t.gm, t.gm.graph, t.core
    if not (node.op == "call_function" and node.target is F.scaled_dot_product_attention):
        raise AnatomyError(f"{where}: the attention core is not a scaled_dot_product_attention call (a block built "
                           "with fused_attn=False); set its attention's fused_attn = True first")
    q, k, v, *rest = node.args
    kwargs = dict(zip(_SDPA_KWARGS, rest, strict=False)) | dict(node.kwargs)
    unknown = set(kwargs) - set(_SDPA_KWARGS)
    if unknown:
        raise AnatomyError(f"{where}: scaled_dot_product_attention with {sorted(unknown)} is not supported")
    attn = block.get_submodule(parts.attn)
    _adopt(gm, block)
    gm.add_module(name, core)
    with graph.inserting_before(node):
        dropout = (graph.get_attr(f"{parts.attn}.attn_drop")
                   if isinstance(getattr(attn, "attn_drop", None), nn.Dropout) else None)
        new = graph.call_module(name, (q, k, v), {**kwargs, "dropout": dropout})
    node.replace_all_uses_with(new)
    graph.erase_node(node)
    return _finish(gm, f"{type(block).__name__}With{type(core).__name__}")
