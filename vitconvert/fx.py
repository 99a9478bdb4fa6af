"""The torch.fx machinery, in one place.

Everything vitconvert does to a graph lives here:

* :func:`trace` traces a timm model (timm's own leaf modules and autowrapped functions, plus extra leaves
  by path) and keeps ``nn_module_stack`` so each node knows which modules it ran in;
* :func:`shape_prop` annotates a traced graph with tensor shapes for one input;
* :func:`split_at_blocks` cuts a single-stage model into an ``embed`` graph (image -> tokens entering the
  first block) and a ``head`` graph (tokens leaving the last block -> logits), exactly the original
  computation, so methods can orchestrate stages around the unchanged blocks;
* :func:`lift_parameter` turns a parameter read (e.g. ``pos_embed``) into a graph input, so one embed
  graph serves several token grids;
* :func:`tap_class_attention` rewrites a block so it also returns the class token's attention row,
  without giving up fused attention for the rest of the computation.

The readers in :mod:`vitconvert.anatomy` use these to find the parts of a model; the methods use the
rewritten graphs.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import itertools
import math
import operator
from collections.abc import Iterable
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from timm.layers import DropPath, get_notrace_functions, get_notrace_modules
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from vitconvert.errors import AnatomyError

# Modules whose forward branches on ``self.training``: kept as leaves so traced graphs stay correct in
# both train and eval mode (tracing through them would bake in the mode at trace time).
_STOCHASTIC_LEAVES: tuple[type[nn.Module], ...] = (DropPath,)

SOFTMAX_TARGETS = {torch.softmax, F.softmax, torch.Tensor.softmax}
ADD_TARGETS = {operator.add, operator.iadd, torch.add}


class Tracer(fx.Tracer):
    """A timm-aware tracer: timm's leaves and autowrapped functions, plus leaves given by module path."""

    def __init__(self, leaves: Iterable[str] = ()) -> None:
        super().__init__(autowrap_functions=tuple(get_notrace_functions()), param_shapes_constant=True)
        self.leaf_paths = set(leaves)
        self.timm_leaves = tuple(get_notrace_modules())

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.leaf_paths:
            return True
        if isinstance(m, self.timm_leaves + _STOCHASTIC_LEAVES):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def _concrete_args(module: nn.Module, live: Iterable[str] = ()) -> dict[str, Any]:
    """Bake every forward argument after the first to its default (attn_mask=None, is_causal=False, ...), except
    those named in ``live`` (by name, or ``arg<i>`` for the i-th positional argument, as the anatomy names them)."""
    params = list(inspect.signature(module.forward).parameters.values())
    keep = set(live)
    return {
        p.name: p.default
        for i, p in enumerate(params[1:], 1)
        if p.default is not inspect.Parameter.empty and p.name not in keep and f"arg{i}" not in keep
        and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    }


def trace(module: nn.Module, leaves: Iterable[str] = (), concrete: bool = True,
          live: Iterable[str] = ()) -> fx.GraphModule:
    """Trace ``module`` into a GraphModule that shares its parameters.

    Args:
        module: A timm model or one of its submodules.
        leaves: Module paths (relative to ``module``) to keep as single ``call_module`` nodes.
        concrete: Bake optional forward arguments to their defaults.
        live: Optional forward arguments to keep as inputs of the graph even with ``concrete`` (a tensor the
            caller passes, such as EVA's ``rope``: baked to its default ``None``, the graph would refuse it).

    Raises:
        AnatomyError: when torch.fx cannot trace the module (the message names the module and the reason).
    """
    tracer = Tracer(leaves)
    concrete_args = _concrete_args(module, live) if concrete else None
    try:
        graph = tracer.trace(module, concrete_args=concrete_args)
    except Exception as e:  # fx raises TraceError, TypeError, AssertionError... depending on the code
        raise AnatomyError(
            f"torch.fx cannot trace {type(module).__name__} ({type(e).__name__}: {str(e).splitlines()[0]}); "
            "models built with dynamic_img_size=True or strict_img_size=False are not traceable: "
            "rebuild without them"
        ) from None
    if concrete_args:
        _keep_argument_names(module, graph)
    return fx.GraphModule(module, graph, class_name=f"Traced{type(module).__name__}")


def _keep_argument_names(module: nn.Module, graph: fx.Graph) -> None:
    """Give the placeholders the forward's own argument names: fx names a baked argument's input ``<name>_1``, and
    a graph that replaces the module must accept the keywords its caller passes (EVA calls every block with
    ``attn_mask=`` and ``is_causal=``, baked or not)."""
    params = list(inspect.signature(module.forward).parameters.values())
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(params) or any(
            p.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD) for p in params):
        return
    for node, p in zip(placeholders, params, strict=True):
        node.target = p.name


def shape_prop(gm: fx.GraphModule, *example: torch.Tensor) -> None:
    """Record ``meta['tensor_meta']`` (shape, dtype) on every node for the given example input."""
    # ShapeProp prints the traceback of a failing node itself before re-raising; the caller reports the error
    # in one line, so that print is kept off the user's terminal.
    with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
        ShapeProp(gm).propagate(*example)


def scopes(node: fx.Node) -> list[str]:
    """Module paths the node ran inside, outermost first (a call_module node includes its own path)."""
    stack: list[str] = []
    for key in node.meta.get("nn_module_stack", {}):
        path = key.split("@")[0]  # fx suffixes repeated calls of one module with @N
        if not stack or stack[-1] != path:
            stack.append(path)
    if node.op == "call_module" and (not stack or stack[-1] != node.target):
        stack.append(str(node.target))
    return stack


def inner_scope(node: fx.Node) -> str:
    s = scopes(node)
    return s[-1] if s else ""


def node_shape(node: Any) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def is_attention_core(node: fx.Node, root: nn.Module) -> bool:
    """SDPA calls and softmaxes are where attention weights are formed."""
    if node.op == "call_function":
        return node.target is F.scaled_dot_product_attention or node.target in SOFTMAX_TARGETS
    if node.op == "call_method":
        return node.target == "softmax"
    if node.op == "call_module":
        return isinstance(root.get_submodule(str(node.target)), nn.Softmax)
    return False


def is_add(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in ADD_TARGETS) or (
        node.op == "call_method" and node.target in ("add", "add_")
    )


# --------------------------------------------------------------------------------------------------------
# Graph surgery
# --------------------------------------------------------------------------------------------------------


def _copy_nodes(
    src_nodes: list[fx.Node], graph: fx.Graph, env: dict[fx.Node, fx.Node], what: str
) -> None:
    def lookup(n: fx.Node) -> fx.Node:
        if n not in env:
            raise AnatomyError(f"cannot split the model graph: the {what} uses {n.name!r} computed elsewhere")
        return env[n]

    for n in src_nodes:
        env[n] = graph.node_copy(n, lookup)


def split_at_blocks(model: nn.Module, block_paths: list[str]) -> tuple[fx.GraphModule, fx.GraphModule]:
    """Cut a single-stage model into ``embed`` (image -> tokens) and ``head`` (tokens -> logits) graphs.

    The blocks are traced as leaves and must run as an unbroken chain (block i's output is block i+1's only
    input), which is what ViT/DeiT do. Running ``head(blocks(embed(x)))`` is then exactly ``model(x)``.
    """
    gm = trace(model, leaves=block_paths)
    nodes = list(gm.graph.nodes)
    block_nodes = [n for n in nodes if n.op == "call_module" and n.target in set(block_paths)]
    if [n.target for n in block_nodes] != block_paths:
        raise AnatomyError("cannot split the model graph: blocks are not called once each, in order")
    for prev, nxt in itertools.pairwise(block_nodes):
        if nxt.args[0] is not prev or len(prev.users) != 1:
            raise AnatomyError(f"cannot split the model graph: {nxt.target} does not take {prev.target}'s output")
    first, last = block_nodes[0], block_nodes[-1]
    if any(isinstance(a, fx.Node) for a in list(first.args[1:]) + list(first.kwargs.values())):
        raise AnatomyError("cannot split the model graph: blocks take extra tensor inputs")
    i_first, i_last = nodes.index(first), nodes.index(last)

    embed = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    pre = nodes[:i_first]
    _copy_nodes(pre, embed, env, "embedding")
    embed.output(env[first.args[0]])

    head = fx.Graph()
    env = {last: head.placeholder("tokens")}
    post = [n for n in nodes[i_last + 1:] if n.op != "output"]
    _copy_nodes(post, head, env, "head")
    out_node = nodes[-1]
    head.output(fx.node.map_arg(out_node.args[0], lambda n: env[n]))

    embed_gm = fx.GraphModule(gm, embed, class_name="Embed")
    head_gm = fx.GraphModule(gm, head, class_name="Head")
    for g in (embed_gm, head_gm):
        g.graph.eliminate_dead_code()
        g.graph.lint()
        g.recompile()
    return embed_gm, head_gm


def lift_parameter(gm: fx.GraphModule, target: str, name: str | None = None) -> fx.GraphModule:
    """Replace every read of parameter ``target`` with a new graph input (the second positional one)."""
    name = name or target.replace(".", "_")
    reads = [n for n in gm.graph.nodes if n.op == "get_attr" and n.target == target]
    if not reads:
        raise AnatomyError(f"the graph never reads {target!r}")
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    with gm.graph.inserting_after(placeholders[0]):  # before baked optional args (they have defaults)
        new = gm.graph.placeholder(name)
    for n in reads:
        n.replace_all_uses_with(new)
        gm.graph.erase_node(n)
    gm.graph.lint()
    gm.recompile()
    return gm


def class_attention_row(q: torch.Tensor, k: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Softmax attention of query 0 (the class token) over all keys: (B, H, N) from q, k of (B, H, N, D).

    Costs O(N * D) per head, so blocks can keep fused SDPA and still report class attention.
    """
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    logits = (q[:, :, :1] * scale) @ k.transpose(-2, -1)
    return logits.softmax(dim=-1).squeeze(2)



def tap_class_attention(block: nn.Module) -> fx.GraphModule:
    """Rewrite ``block`` to return ``(output, class_attention)`` with class_attention of shape (B, H, N).

    Works on the attention core the tracer finds: for fused ``scaled_dot_product_attention`` a
    :func:`class_attention_row` node is added on its q and k; for explicit softmax attention the row is
    sliced from the softmax output.
    """
    gm = trace(block)
    cores = [n for n in gm.graph.nodes if is_attention_core(n, gm)]
    if len(cores) != 1:
        raise AnatomyError(f"{type(block).__name__}: expected one attention core, found {len(cores)}")
    core = cores[0]
    with gm.graph.inserting_after(core):
        if core.op == "call_function" and core.target is F.scaled_dot_product_attention:
            q, k = core.args[0], core.args[1]
            if core.kwargs.get("attn_mask") is not None:
                raise AnatomyError(f"{type(block).__name__}: attention with a mask cannot be tapped")
            row = gm.graph.call_function(class_attention_row, (q, k, core.kwargs.get("scale")))
        else:
            row = gm.graph.call_function(operator.getitem, (core, (slice(None), slice(None), 0)))
    out = next(n for n in gm.graph.nodes if n.op == "output")
    out.args = ((out.args[0], row),)
    gm.graph.lint()
    gm.recompile()
    return gm
