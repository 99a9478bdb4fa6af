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
from collections.abc import Iterable, Sequence
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


def _concrete_args(module: nn.Module, keep: Iterable[str] = ()) -> dict[str, Any]:
    """Bake every forward argument after the first to its default (attn_mask=None, is_causal=False, ...), except
    those named in ``keep`` (by name, or ``arg<i>`` for the i-th positional argument, as the anatomy names them)."""
    params = list(inspect.signature(module.forward).parameters.values())
    kept = set(keep)
    return {
        p.name: p.default
        for i, p in enumerate(params[1:], 1)
        if p.default is not inspect.Parameter.empty and p.name not in kept and f"arg{i}" not in kept
        and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    }


def trace(module: nn.Module, leaves: Iterable[str] = (), concrete: bool = True,
          keep: Iterable[str] = ()) -> fx.GraphModule:
    """Trace ``module`` into a GraphModule that shares its parameters.

    Args:
        module: A timm model or one of its submodules.
        leaves: Module paths (relative to ``module``) to keep as single ``call_module`` nodes.
        concrete: Bake optional forward arguments to their defaults.
        keep: Optional forward arguments to keep as inputs of the graph even with ``concrete`` (a tensor the
            caller passes, such as EVA's ``rope``: baked to its default ``None``, the graph would refuse it).

    Raises:
        AnatomyError: when torch.fx cannot trace the module (the message names the module and the reason).
    """
    tracer = Tracer(leaves)
    concrete_args = _concrete_args(module, keep) if concrete else None
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


def split_at_blocks(model: nn.Module, block_paths: list[str], leaves: Iterable[str] = (),
                    shared: Sequence[str] | None = None) -> tuple[fx.GraphModule, fx.GraphModule]:
    """Cut a single-stage model into ``embed`` (image -> tokens) and ``head`` (tokens -> logits) graphs.

    The blocks are traced as leaves and must run as an unbroken chain (block i's output is block i+1's only
    input), which is what ViT/DeiT do. Running ``head(blocks(embed(x)))`` is then exactly ``model(x)``.

    Args:
        model: The model.
        block_paths: Its blocks, in call order.
        leaves: Further module paths kept as single ``call_module`` nodes (in the head: an attention-pooling head a
            method rewrites).
        shared: Keyword inputs every block is called with besides the tokens, computed once before the first block
            (EVA's ``rope``): the embed graph then returns ``(tokens, *shared)`` and ``head(blocks(tokens,
            **shared))`` is the model. Without it a block taking an extra tensor is refused.
    """
    gm = trace(model, leaves=[*block_paths, *leaves])
    nodes = list(gm.graph.nodes)
    block_nodes = [n for n in nodes if n.op == "call_module" and n.target in set(block_paths)]
    if [n.target for n in block_nodes] != block_paths:
        raise AnatomyError("cannot split the model graph: blocks are not called once each, in order")
    for prev, nxt in itertools.pairwise(block_nodes):
        if nxt.args[0] is not prev or len(prev.users) != 1:
            raise AnatomyError(f"cannot split the model graph: {nxt.target} does not take {prev.target}'s output")
    first, last = block_nodes[0], block_nodes[-1]
    names = list(shared or [])
    for n in block_nodes:
        extra = [a for a in n.args[1:] if isinstance(a, fx.Node)]
        extra += [v for k, v in n.kwargs.items() if isinstance(v, fx.Node) and k not in names]
        if extra:
            raise AnatomyError("cannot split the model graph: blocks take extra tensor inputs")
        for k in names:
            v, v0 = n.kwargs.get(k), first.kwargs.get(k)
            # One value for every block: the same node, or (a constant tensor each call reads again) the same
            # buffer.
            same = v is v0 or (isinstance(v, fx.Node) and isinstance(v0, fx.Node) and v.op == v0.op == "get_attr"
                               and v.target == v0.target)
            if not isinstance(v0, fx.Node) or not same:
                raise AnatomyError(f"cannot split the model graph: the blocks do not all take one {k!r} computed "
                                   "before the first block")
    i_first, i_last = nodes.index(first), nodes.index(last)

    embed = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    pre = nodes[:i_first]
    _copy_nodes(pre, embed, env, "embedding")
    if names:
        embed.output((env[first.args[0]], *(env[first.kwargs[k]] for k in names)))
    else:
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


def class_attention_row(q: torch.Tensor, k: torch.Tensor, scale: float | None = None,
                        all_queries: bool = False, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax attention of query 0 (the class token) over all keys: (B, H, N) from q, k of (B, H, N, D); with
    ``all_queries``, the mean of every query's row (an attention-pooling head's latent queries). ``mask``: the
    additive float mask the attention adds to its logits (a position bias), broadcastable to (B, H, Nq, N).

    Costs O(N * D) per head and query, so blocks can keep fused SDPA and still report class attention.
    """
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    # In fp32 whatever the model's dtype: the rows rank patches, and fp16/bf16 rounding reorders near-ties.
    logits = ((q if all_queries else q[:, :, :1]).float() * scale) @ k.float().transpose(-2, -1)
    if mask is not None:
        logits = logits + (mask if all_queries else mask[..., :1, :]).float()
    return logits.softmax(dim=-1).mean(dim=2)


def _share_modules(gm: fx.GraphModule, root: nn.Module) -> fx.GraphModule:
    """Make ``gm``'s top-level submodules ``root``'s own (a GraphModule copies the buffers it reads into fresh
    containers, which a later ``root.to(dtype)`` would leave behind: timm's EVA and BEiT attention read a ``k_bias``
    buffer). Parameters are shared either way; with the containers shared, buffers are read live."""
    for name in list(gm._modules):
        if name in root._modules:
            gm._modules[name] = root._modules[name]
    return gm



def tap_class_attention(block: nn.Module, keep: Iterable[str] = (), all_queries: bool = False) -> fx.GraphModule:
    """Rewrite ``block`` to return ``(output, class_attention)`` with class_attention of shape (B, H, N).

    Works on the attention core the tracer finds: for fused ``scaled_dot_product_attention`` a
    :func:`class_attention_row` node is added on its q and k; for explicit softmax attention the row is
    sliced from the softmax output. ``keep``: optional forward inputs that stay inputs of the rewritten graph
    (EVA's ``rope``; the others are baked to their defaults). ``all_queries``: report the mean row of every query
    (an attention-pooling head's latent queries) instead of query 0's.
    """
    gm = _share_modules(trace(block, keep=keep), block)
    cores = [n for n in gm.graph.nodes if is_attention_core(n, gm)]
    if len(cores) != 1:
        raise AnatomyError(f"{type(block).__name__}: expected one attention core, found {len(cores)}")
    core = cores[0]
    with gm.graph.inserting_after(core):
        if core.op == "call_function" and core.target is F.scaled_dot_product_attention:
            q, k = core.args[0], core.args[1]
            mask = core.kwargs.get("attn_mask")
            if mask is not None and not isinstance(mask, fx.Node):
                raise AnatomyError(f"{type(block).__name__}: attention with a mask cannot be tapped")
            row = gm.graph.call_function(class_attention_row, (q, k, core.kwargs.get("scale"), all_queries, mask))
        elif all_queries:
            row = gm.graph.call_method("mean", (core, 2))
        else:
            row = gm.graph.call_function(operator.getitem, (core, (slice(None), slice(None), 0)))
    out = next(n for n in gm.graph.nodes if n.op == "output")
    out.args = ((out.args[0], row),)
    gm.graph.lint()
    gm.recompile()
    return gm


def tap_leaf(gm: fx.GraphModule, path: str, tapped: nn.Module) -> fx.GraphModule:
    """Make ``gm`` (which calls the leaf module ``path`` once) also return what ``tapped`` adds: ``tapped`` is the
    leaf rewritten to return ``(output, extra)`` (:func:`tap_class_attention`); the graph returns
    ``(output, extra)``."""
    calls = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == path]
    if len(calls) != 1:
        raise AnatomyError(f"the graph calls {path!r} {len(calls)} times, expected once")
    name = path.replace(".", "_") + "_tapped"
    gm.add_submodule(name, tapped)
    call = calls[0]
    with gm.graph.inserting_after(call):
        both = gm.graph.call_module(name, call.args, call.kwargs)
    with gm.graph.inserting_after(both):
        value = gm.graph.call_function(operator.getitem, (both, 0))
        extra = gm.graph.call_function(operator.getitem, (both, 1))
    call.replace_all_uses_with(value)
    gm.graph.erase_node(call)
    out = next(n for n in gm.graph.nodes if n.op == "output")
    out.args = ((out.args[0], extra),)
    gm.graph.lint()
    gm.recompile()
    return gm


def lift_attention_bias(block: nn.Module, param: str, name: str = "attn_bias") -> tuple[fx.GraphModule,
                                                                                       fx.GraphModule]:
    """Turn the additive attention bias a block computes from parameter ``param`` (a path inside ``block``: BEiT's
    relative position bias table) into an input, so a caller can give the block a bias for another token sequence.

    The bias is the value computed from ``param`` and constants alone that the attention reads (an SDPA mask or a
    term added to the logits). Returns ``(block_graph, bias_graph)``: ``block_graph(x, bias)`` is the block with
    that bias given (``block_graph(x, bias_graph())`` is the block), ``bias_graph()`` computes the block's own bias
    from the live parameter.
    """
    gm = _share_modules(trace(block), block)
    nodes = list(gm.graph.nodes)
    reads = [n for n in nodes if n.op == "get_attr" and n.target == param]
    if len(reads) != 1:
        raise AnatomyError(f"{type(block).__name__}: expected one read of {param!r}, found {len(reads)}")
    derived: set[fx.Node] = set()
    for n in nodes:
        inputs = n.all_input_nodes
        if n is reads[0] or (inputs and any(a in derived for a in inputs)
                             and all(a in derived or a.op == "get_attr" for a in inputs)):
            derived.add(n)
    frontier = [n for n in nodes if n in derived and any(u not in derived for u in n.users)]
    if len(frontier) != 1:
        raise AnatomyError(f"{type(block).__name__}: the bias computed from {param!r} is not one tensor the "
                           f"attention reads (found {len(frontier)})")
    bias = frontier[0]

    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for n in nodes:
        if n in derived or (n.op == "get_attr" and any(u in derived for u in n.users)):
            env[n] = graph.node_copy(n, lambda a: env[a])
    graph.output(env[bias])
    bias_gm = _share_modules(fx.GraphModule(gm, graph, class_name="AttentionBias"), block)

    placeholders = [n for n in nodes if n.op == "placeholder"]
    with gm.graph.inserting_after(placeholders[0]):  # before baked optional args (they have defaults)
        given = gm.graph.placeholder(name)
    bias.replace_all_uses_with(given)
    for g in (gm, bias_gm):
        g.graph.eliminate_dead_code()
        g.graph.lint()
        g.recompile()
    return gm, bias_gm


def _deepcopy_keeping_class(self: fx.GraphModule, memo: dict[int, Any]) -> fx.GraphModule:
    """``GraphModule.__deepcopy__``, then back into the class the original shares (see :func:`share_code`)."""
    copied = fx.GraphModule.__deepcopy__(self, memo)
    copied.__class__ = type(self)
    return copied


def share_code(modules: Iterable[nn.Module]) -> None:
    """Give the GraphModules among ``modules`` whose generated code is the same one class between them.

    Why: every ``GraphModule`` is an instance of a class of its own, whose ``forward`` is compiled from its own
    copy of the code. ``torch.compile`` caches compiled code per code object and guards on the module's type, so
    twelve rewritten blocks of one model, identical but for their weights, compile twelve times; sharing a class
    (and so one ``forward``), the first block's compiled code serves the others (their weights are inputs of the
    graph). A copy (``copy.deepcopy``, e.g. an EMA) keeps the shared class.

    Modules with the same code but different globals (the functions the code calls) are kept apart. Do not edit the
    graph of one of them afterwards: its ``recompile()`` would change the code of all.
    """
    first_of: dict[tuple[str, tuple[tuple[str, int], ...]], fx.GraphModule] = {}
    for module in modules:
        if not isinstance(module, fx.GraphModule):
            continue
        scope = module.forward.__globals__
        key = (module.code, tuple(sorted((name, id(value)) for name, value in scope.items())))
        first = first_of.setdefault(key, module)
        if first is not module:
            module.__class__ = type(first)
    for first in first_of.values():
        type(first).__deepcopy__ = _deepcopy_keeping_class  # type: ignore[method-assign]
