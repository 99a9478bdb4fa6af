"""Read a model's anatomy from its fx graph and module tree.

:func:`read_parts` traces the model once, propagates shapes for one input at the model's own image
size, and finds, without looking at the model's name:

* attention cores (SDPA calls or softmaxes) and the modules around them: attention, block, stage;
* per block: the norms, the MLP, the residual adds, the token count and width;
* the patch embedding (first convolution on the image), the position embedding (a parameter added to the
  token stream before the first block) and prefix tokens (parameters concatenated to it);
* per stage: downsampling layers before its first block and a norm after its last;
* after the last block: the final norm, the pooling (token, average, or an attention-pooling head: attention after
  the last block that is in no block) and the head linear layers.

The family (ViT/DeiT, PVT-v2, Swin, SwinV2) is then decided by the readers in :mod:`vitconvert.backbones` from
these parts (:func:`vitconvert.backbones.read_anatomy` is the entry point), and a model that fits none
gets an :class:`~vitconvert.errors.AnatomyError` naming what was not found. This module knows no family.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from timm.layers import get_notrace_functions
from torch import nn

from vitconvert import fx as vfx
from vitconvert.errors import AnatomyError

# timm's position-embedding resamplers (autowrapped by the tracer, so they appear as single calls).
_RESAMPLERS = set(get_notrace_functions())
_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm2d, nn.BatchNorm1d)


@dataclass
class BlockInfo:
    """One transformer block: where its parts are and what it sees."""

    path: str
    index: int
    stage: int
    attn: str
    mlp: str
    norms: list[str]
    num_heads: int
    dim: int
    tokens: int
    attn_kind: str = "global"  # global | window | spatial_reduction
    # Post-norm (SwinV2): x + norm1(attn(x)), x + norm2(mlp(x)); pre-norm: x + attn(norm1(x)), x + mlp(norm2(x)).
    post_norm: bool = False
    # Tensors the block is called with besides the token stream (EVA: ``rope``, the rotary embedding computed once
    # before the first block): keyword names, or ``arg<i>``.
    shared_inputs: list[str] = field(default_factory=list)

    @property
    def norm1(self) -> str:
        return self.norms[0]

    @property
    def norm2(self) -> str:
        return self.norms[1]


@dataclass
class StageInfo:
    """A run of blocks at one resolution, with what comes before (downsample) and after (norm) them."""

    index: int
    path: str
    blocks: list[int]
    dim: int
    grid: tuple[int, int]
    downsample: str | None = None
    norm: str | None = None


@dataclass
class Anatomy:
    """The parts of a ViT/DeiT, PVT-v2, Swin or SwinV2 model that the methods rewrite."""

    family: str
    img_size: tuple[int, int]
    patch_embed: str
    patch_size: tuple[int, int]
    grid: tuple[int, int]
    embed_dim: int
    pos_embed: str | None
    prefix_tokens: list[str]
    num_prefix_tokens: int
    blocks: list[BlockInfo]
    stages: list[StageInfo]
    final_norm: str | None
    pool: str
    head: list[str]
    num_classes: int
    num_features: int
    extras: dict[str, Any] = field(default_factory=dict)
    attn_pool: str | None = None  # the attention-pooling head (pool == "attn"): latent queries attend to the tokens

    @property
    def block_paths(self) -> list[str]:
        return [b.path for b in self.blocks]

    def rows(self) -> list[tuple[str, str]]:
        """(part, description) pairs for printing."""
        rows = [
            ("family", self.family),
            ("input", f"3x{self.img_size[0]}x{self.img_size[1]}"),
            ("patch embedding", f"{self.patch_embed} (stride {self.patch_size[0]}, grid "
                                f"{self.grid[0]}x{self.grid[1]}, dim {self.embed_dim})"),
            ("position embedding", self.pos_embed or "none"),
            ("prefix tokens", ", ".join(self.prefix_tokens) + f" ({self.num_prefix_tokens})"
             if self.prefix_tokens else "none"),
        ]
        for s in self.stages:
            b0, b1 = self.blocks[s.blocks[0]], self.blocks[s.blocks[-1]]
            desc = (f"blocks {b0.path} .. {b1.path} ({len(s.blocks)}), grid {s.grid[0]}x{s.grid[1]}, "
                    f"dim {s.dim}, heads {b0.num_heads}, {b0.attn_kind} attention")
            if s.downsample:
                desc = f"downsample {s.downsample}; " + desc
            if s.norm:
                desc += f"; norm {s.norm}"
            rows.append((f"stage {s.index}" + (f" ({s.path})" if s.path else ""), desc))
        b = self.blocks[0]
        rows.append(("block parts", f"norms {', '.join(n.rsplit('.', 1)[-1] for n in b.norms)}; "
                                    f"attention {b.attn.rsplit('.', 1)[-1]}; mlp {b.mlp.rsplit('.', 1)[-1]}; "
                                    f"{'post' if b.post_norm else 'pre'}-norm residual"
                                    + (f"; also called with {', '.join(b.shared_inputs)}" if b.shared_inputs else "")))
        rows.append(("final norm", self.final_norm or "none"))
        rows.append(("pooling", f"attention pooling {self.attn_pool}" if self.attn_pool else self.pool))
        rows.append(("head", f"{', '.join(self.head)} ({self.num_features} -> {self.num_classes})"))
        return rows


def model_img_size(model: nn.Module) -> tuple[int, int]:
    """The image size the model was built for: a module's ``img_size`` attribute, else its pretrained cfg."""
    for _, m in model.named_modules():
        size = getattr(m, "img_size", None)
        if isinstance(size, int):
            return (size, size)
        if isinstance(size, tuple | list) and len(size) == 2 and all(isinstance(v, int) for v in size):
            return (int(size[0]), int(size[1]))
    cfg = getattr(model, "pretrained_cfg", None) or {}
    input_size = cfg.get("input_size") or (3, 224, 224)
    return (int(input_size[1]), int(input_size[2]))


def read_parts(model: nn.Module, img_size: tuple[int, int] | None = None) -> Anatomy:
    """Trace ``model`` and describe its parts, without deciding its family (``family = "unknown"``).

    :func:`vitconvert.backbones.read_anatomy` calls this and lets the family readers decide.

    Args:
        model: A timm ViT/DeiT, PVT-v2, Swin or SwinV2 model (any weights).
        img_size: Input size to propagate shapes with; defaults to the model's own.

    Raises:
        AnatomyError: if the model cannot be traced or a part is missing; the message names it.
    """
    img_size = img_size or model_img_size(model)
    gm = vfx.trace(model)
    was_training = model.training
    model.eval()
    try:
        vfx.shape_prop(gm, torch.zeros(1, 3, *img_size))
    except Exception as e:
        raise AnatomyError(
            f"{type(model).__name__} does not run on a 3x{img_size[0]}x{img_size[1]} image "
            f"({type(e).__name__}: {str(e).splitlines()[0]})"
        ) from None
    finally:
        model.train(was_training)
    return _read_parts(model, gm, list(gm.graph.nodes), img_size)


def _read_parts(model: nn.Module, gm: fx.GraphModule, nodes: list[fx.Node], img_size: tuple[int, int]) -> Anatomy:
    name = type(model).__name__

    # Attention cores -> attention modules -> blocks.
    # An attention core directly in a child of the root (not in a block's attention module) is an attention-pooling
    # head (SigLIP's and MAP's AttentionPoolLatent: latent queries attend to the tokens) when it comes after the
    # blocks; anywhere else it is a part no family knows.
    attn_paths: list[str] = []
    block_of: dict[str, str] = {}
    outside: list[tuple[int, fx.Node, list[str]]] = []
    for i, n in enumerate(nodes):
        if not vfx.is_attention_core(n, model):
            continue
        stack = vfx.scopes(n)
        if n.op == "call_module":
            stack = stack[:-1]
        if len(stack) < 2:
            outside.append((i, n, stack))
            continue
        attn, block = stack[-1], stack[-2]
        if attn not in block_of:
            attn_paths.append(attn)
            block_of[attn] = block
    if not attn_paths and outside:
        raise AnatomyError(f"{name}: found attention outside of any block ({outside[0][1].name})")
    if not attn_paths:
        raise AnatomyError(f"{name}: no attention found (no scaled_dot_product_attention or softmax in the graph); "
                           "not a vision transformer")

    first_block_node = {}
    last_block_node = {}
    for i, n in enumerate(nodes):
        for s in vfx.scopes(n):
            if s in block_of.values():
                first_block_node.setdefault(s, i)
                last_block_node[s] = i
    block_paths = sorted(set(block_of.values()), key=lambda b: first_block_node[b])
    attn_for = {b: a for a, b in block_of.items()}
    attn_pool = None
    for i, n, stack in outside:
        if not stack or i < last_block_node[block_paths[-1]] or (attn_pool and stack[0] != attn_pool):
            raise AnatomyError(f"{name}: found attention outside of any block ({n.name})")
        attn_pool = stack[0]

    # Patch embedding: the first convolution, reported as its outermost module below the root.
    conv_idx = next((i for i, n in enumerate(nodes) if n.op == "call_module"
                     and isinstance(model.get_submodule(str(n.target)), nn.Conv2d)), None)
    if conv_idx is None or conv_idx > first_block_node[block_paths[0]]:
        raise AnatomyError(f"{name}: no patch embedding (a convolution on the image before the first block)")
    conv_node = nodes[conv_idx]
    conv: nn.Conv2d = model.get_submodule(str(conv_node.target))
    patch_embed = vfx.scopes(conv_node)[0]
    conv_out = vfx.node_shape(conv_node)
    if conv_out is None or len(conv_out) != 4:
        raise AnatomyError(f"{name}: patch embedding output shape unknown")
    grid = (int(conv_out[2]), int(conv_out[3]))
    stride = conv.stride if isinstance(conv.stride, tuple) else (conv.stride, conv.stride)

    # Position embedding and prefix tokens: parameters joined to the token stream before the first block.
    pre_nodes = nodes[: first_block_node[block_paths[0]]]
    pos_embed = None
    prefix: list[str] = []
    for n in pre_nodes:
        if n.op != "get_attr" or vfx.scopes(n):
            continue
        users = _follow_views(n)
        if any(vfx.is_add(u) for u in users) and pos_embed is None:
            pos_embed = str(n.target)
        elif any(u.op == "call_function" and u.target is torch.cat for u in users):
            prefix.append(str(n.target))
    num_prefix = sum(int(model.get_parameter(p).shape[1]) for p in prefix)

    # Blocks: parts, widths, token counts.
    blocks: list[BlockInfo] = []
    for bi, bpath in enumerate(block_paths):
        bnodes = nodes[first_block_node[bpath]: last_block_node[bpath] + 1]
        children = _direct_children(bnodes, bpath)
        norms = [c for c in children if _is_norm(model, c)]
        attn = attn_for[bpath]
        mlp = next((c for c in children if c != attn and _count_linear(model.get_submodule(c)) >= 2), None)
        if mlp is None:
            raise AnatomyError(f"{name}: block {bpath} has no MLP (a submodule with two linear layers)")
        if len(norms) < 2:
            raise AnatomyError(f"{name}: block {bpath} has {len(norms)} norm layers, expected 2 (pre- or post-norm "
                               "block)")
        residuals = [n for n in bnodes if vfx.is_add(n) and vfx.inner_scope(n) == bpath]
        if len(residuals) < 2:
            raise AnatomyError(f"{name}: block {bpath} has no residual connections around attention and MLP")
        x_in = _first_tensor_input(bnodes)
        shape = vfx.node_shape(x_in) if x_in is not None else None
        if shape is None:
            raise AnatomyError(f"{name}: could not read the input shape of block {bpath}")
        dim = int(shape[-1])
        tokens = int(shape[1]) if len(shape) == 3 else int(shape[1] * shape[2])
        attn_mod = model.get_submodule(attn)
        blocks.append(BlockInfo(
            path=bpath, index=bi, stage=0, attn=attn, mlp=mlp, norms=norms[:2],
            num_heads=int(getattr(attn_mod, "num_heads", 1)), dim=dim, tokens=tokens,
            post_norm=children.index(norms[0]) > children.index(attn),  # the first norm runs after attention
        ))

    for b, extra in zip(blocks, _block_call_inputs(model, block_paths), strict=True):
        b.shared_inputs = extra

    # Stages: blocks grouped by the parent of their container (ViT: one stage at the root).
    stage_paths: list[str] = []
    for b in blocks:
        sp = b.path.rsplit(".", 2)[0] if b.path.count(".") >= 2 else ""
        if not stage_paths or stage_paths[-1] != sp:
            if sp in stage_paths:
                raise AnatomyError(f"{name}: blocks of stage {sp!r} are not contiguous")
            stage_paths.append(sp)
        b.stage = len(stage_paths) - 1
    stages: list[StageInfo] = []
    for si, sp in enumerate(stage_paths):
        members = [b.index for b in blocks if b.stage == si]
        first, last = blocks[members[0]], blocks[members[-1]]
        start = first_block_node[first.path]
        end = last_block_node[last.path]
        prev_end = last_block_node[blocks[members[0] - 1].path] if members[0] > 0 else 0
        downsample = _stage_part(model, nodes[prev_end:start], sp) if sp else None
        nxt = first_block_node[blocks[members[-1] + 1].path] if members[-1] + 1 < len(blocks) else len(nodes)
        norm = _stage_part(model, nodes[end + 1: nxt], sp) if sp else None
        sgrid = _grid_of(model, nodes[prev_end:end + 1], nodes[start:end + 1], grid)
        stages.append(StageInfo(index=si, path=sp, blocks=members, dim=first.dim, grid=sgrid,
                                downsample=downsample, norm=norm))

    # After the last block: final norm, pooling, head.
    tail = nodes[last_block_node[blocks[-1].path] + 1:]
    stage_paths_set = {s.path for s in stages if s.path}
    tail = [n for n in tail if not stage_paths_set.intersection(vfx.scopes(n))]
    pool_nodes = [n for n in tail if attn_pool is not None and attn_pool in vfx.scopes(n)]
    before_pool = tail[: tail.index(pool_nodes[0])] if pool_nodes else tail
    final_norm = next((vfx.scopes(n)[0] for n in before_pool if vfx.scopes(n) and _is_norm_node(model, n)), None)
    head = []
    for n in tail:
        if n.op == "call_module" and isinstance(model.get_submodule(str(n.target)), nn.Linear) \
                and n not in pool_nodes:
            head.append(str(n.target))
    if not head:
        classes = getattr(model, "num_classes", None)
        raise AnatomyError(
            f"{name}: no classifier head (a linear layer after the last block)"
            + (" - it was built headless (num_classes=0)" if classes == 0 else "")
            + "; converting needs one: pass --model-kwargs num_classes=N (Python: model_kwargs={'num_classes': N}) "
            "to build it with an N-class head, then fine-tune"
        )
    averaged = any(n.op in ("call_method", "call_function") and getattr(n.target, "__name__", n.target)
                   in ("mean", "adaptive_avg_pool2d") for n in tail) or any(
        n.op == "call_module" and isinstance(model.get_submodule(str(n.target)), nn.AdaptiveAvgPool2d | nn.AvgPool2d)
        for n in tail)
    pool = "attn" if attn_pool else "avg" if averaged else "token"
    head_mod = model.get_submodule(head[0])
    return Anatomy(
        family="unknown", img_size=img_size, patch_embed=patch_embed, patch_size=(int(stride[0]), int(stride[1])),
        grid=grid, embed_dim=int(conv.out_channels), pos_embed=pos_embed, prefix_tokens=prefix,
        num_prefix_tokens=num_prefix, blocks=blocks, stages=stages, final_norm=final_norm, pool=pool,
        head=head, num_classes=int(head_mod.out_features), num_features=int(head_mod.in_features),
        attn_pool=attn_pool,
    )


def _block_call_inputs(model: nn.Module, block_paths: list[str]) -> list[list[str]]:
    """Per block, the tensors it is called with besides the tokens (keyword names, or ``arg<i>``), read from a trace
    with the blocks as leaves: EVA's ``rope``, computed once from the grid before the first block."""
    gm = vfx.trace(model, leaves=block_paths)
    calls = {str(n.target): n for n in gm.graph.nodes if n.op == "call_module" and str(n.target) in set(block_paths)}
    out = []
    for path in block_paths:
        n = calls.get(path)
        if n is None:
            out.append([])
            continue
        out.append([f"arg{i}" for i, a in enumerate(n.args[1:], 1) if isinstance(a, fx.Node)]
                   + [k for k, v in n.kwargs.items() if isinstance(v, fx.Node)])
    return out


def _follow_views(node: fx.Node) -> list[fx.Node]:
    """Users of ``node``, looking through expand/reshape/to-dtype style calls."""
    out: list[fx.Node] = []
    todo = list(node.users)
    while todo:
        u = todo.pop()
        if u.op == "call_method" and u.target in ("expand", "reshape", "view", "to", "type_as", "flatten"):
            todo.extend(u.users)
        elif u.op == "call_function" and u.target in _RESAMPLERS and u.args and u.args[0] is node:
            todo.extend(u.users)  # dynamic_img_size models resample the position embedding first
        else:
            out.append(u)
    return out


def _direct_children(bnodes: list[fx.Node], bpath: str) -> list[str]:
    """Direct child modules of the block, in the order the graph first enters them."""
    seen: list[str] = []
    for n in bnodes:
        for s in vfx.scopes(n):
            if s.startswith(bpath + ".") and "." not in s[len(bpath) + 1:] and s not in seen:
                seen.append(s)
    return seen


def _is_norm(model: nn.Module, path: str) -> bool:
    mod = model.get_submodule(path)
    return isinstance(mod, _NORMS) and not isinstance(mod, nn.BatchNorm2d)


def _is_norm_node(model: nn.Module, n: fx.Node) -> bool:
    if n.op == "call_module":
        return isinstance(model.get_submodule(str(n.target)), _NORMS)
    if n.op == "call_function":
        return getattr(n.target, "__name__", "") in ("layer_norm", "group_norm", "rms_norm")
    return False


def _count_linear(mod: nn.Module) -> int:
    return sum(1 for m in mod.modules() if isinstance(m, nn.Linear) or (
        isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)))


def _first_tensor_input(bnodes: list[fx.Node]) -> fx.Node | None:
    for n in bnodes:
        for a in n.all_input_nodes:
            if a not in bnodes and vfx.node_shape(a) is not None and len(vfx.node_shape(a) or ()) >= 3:
                return a
    return None


def _stage_part(model: nn.Module, span: list[fx.Node], stage_path: str) -> str | None:
    """The outermost submodule of ``stage_path`` that does real work in ``span`` (not Identity)."""
    for n in span:
        for s in vfx.scopes(n):
            if s.startswith(stage_path + ".") and s.count(".") == stage_path.count(".") + 1:
                mod = model.get_submodule(s)
                if not isinstance(mod, nn.Identity) and not s.endswith(".blocks"):
                    return s
    return None


def _grid_of(model: nn.Module, span: list[fx.Node], bnodes: list[fx.Node], patch_grid: tuple[int, int]
             ) -> tuple[int, int]:
    """Token grid of a stage: a 4-D (B, H, W, C) token stream into a block (Swin), else the last convolution before
    the stage's blocks (PVT-v2 downsampling), else the patch grid (ViT, first stages). The stream is what the blocks'
    first operation reads from outside them: a shared input may be 4-D too (mixed RoPE's per-head rotary table)."""
    for n in bnodes:
        outside = [a for a in n.all_input_nodes if a not in bnodes and a.op != "get_attr"]
        if n.op == "get_attr" or not outside:
            continue
        shape = vfx.node_shape(outside[0])  # the first op reading from outside the blocks reads the stream
        if shape is not None and len(shape) == 4:
            return (int(shape[1]), int(shape[2]))
        break
    convs = [n for n in span if n not in bnodes and n.op == "call_module"
             and isinstance(model.get_submodule(str(n.target)), nn.Conv2d)]
    if convs and (shape := vfx.node_shape(convs[-1])) is not None:
        return (int(shape[2]), int(shape[3]))
    return patch_grid
