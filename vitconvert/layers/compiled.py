"""Helpers for running dynamic models under ``torch.compile`` without a compile per batch size.

A dynamic model's batch is split at run time (a cascade's sub-batches, whose sizes depend on the images), so the
frames that run its computation see a different batch size at nearly every call. Left to dynamo's defaults, each
frame compiles once for the first size, again when the size changes (``automatic_dynamic_shapes``) and once more
for a size of 1 (sizes 0 and 1 are always specialised). Marking the batch dimension of a frame's inputs before the
frame is entered makes its first compile cover the other sizes:

* *unbacked* (:func:`torch._dynamo.decorators.mark_unbacked`): a size known only at run time, never specialised and
  never guarded on, so one compile serves every size, 1 included. Code that branches on the size in Python cannot
  be traced this way (it fails to compile), so only frames known to take it get it (a cascade's stages);
* *backed* (:func:`torch._dynamo.maybe_mark_dynamic`): a symbolic size from the first call on; a batch of 1 still
  gets a compile of its own, and Python decisions on the size become guards.

A method whose eager path decides in Python on the data (DGE's execution path per block and its ragged query
layout, FSLA's clustering with numpy sorts and reused buffers) already has a twin without such decisions: the
traceable path ``torch.export`` records. :func:`graph_tracing` tells such code that it is being recorded into a
graph, by ``torch.export`` or by ``torch.compile``, so both take that twin; :func:`compile_settings` lets dynamo
record its data-dependent sizes (a run-time query count) instead of breaking the graph there.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import ParamSpec, TypeVar

import torch

BATCH = "vitconvert_batch"

P = ParamSpec("P")
R = TypeVar("R")

# True while compile_settings() is active: compiled frames of a dynamic model are being run (and compiled).
_stages_compiling = False


@torch.compiler.disable
def mark_rows_dynamic(first: torch.Tensor, *others: torch.Tensor, unbacked: bool = True,
                      shape_id: str = BATCH) -> torch.Tensor:
    """An alias of ``first`` with dimension 0 marked as a dynamic size, and ``others`` marked in place.

    Args:
        first: The tensor whose alias (``detach``, or a ``view`` when it requires grad) carries the mark, so a tensor
            the user passed in is not changed.
        others: The model's own intermediates with the same rows (marked in place).
        unbacked: Mark as a run-time size (one compile for every size; see the module docstring), else as a backed
            symbolic size.
        shape_id: Unbacked marks with the same id share one size symbol: they are rows of the same images.

    Marks only matter to a frame dynamo compiles next; in eager code they do nothing. Not traced itself
    (``torch.compiler.disable``): it is called between compiled frames.
    """
    from torch._dynamo.decorators import mark_unbacked, maybe_mark_dynamic

    # detach(): an alias that is not a view (a view's base would be guarded on, unmarked); under autograd a view.
    alias = first.view(first.shape) if first.requires_grad else first.detach()
    for t in (alias, *others):
        if unbacked:
            mark_unbacked(t, 0, shape_id=shape_id, min=1)
        else:
            maybe_mark_dynamic(t, 0)
    return alias


def graph_tracing() -> bool:
    """Whether the code running is being recorded into a graph: by ``torch.export`` (ONNX export included) or by
    ``torch.compile`` (dynamo). Code with a traceable twin takes it then: Python decisions on the data would be
    guards that recompile for every new batch or gate pattern (or graph breaks), and reused buffers or numpy calls
    cannot be recorded at all."""
    return torch.compiler.is_exporting() or torch.compiler.is_compiling()


@contextlib.contextmanager
def compile_settings() -> Iterator[None]:
    """The settings the frames of a dynamic model compile under, for the calls inside this context only.

    * dynamo's ``capture_scalar_outputs`` and ``capture_dynamic_output_shape_ops``: a traceable path's sizes known
      only at run time (``nonzero``, a query count read with ``.item()`` and bounded with ``torch._check``) become
      unbacked sizes in the graph, as ``torch.export`` records them, instead of graph breaks whose next graph
      recompiles for every new size;
    * dynamo's ``specialize_float``: a float the frames read (CF-ViT's ``alpha``, how many regions are refined) is a
      constant of the graph, and a new value compiles a new graph. Left symbolic (dynamo's default makes a float that
      changed between calls symbolic), inductor (torch 2.14) writes code that names a symbol it never defines
      (``NameError: name 'zf82' is not defined``) for the sizes computed from it;
    * inductor's ``layout_optimization`` off: with a run-time batch size, inductor mispredicts the strides of a
      convolution it moved to channels-last and fails a stride assertion on the first call (torch 2.14).

    Called from a frame dynamo does not trace (:func:`torch.compiler.disable` with ``recursive=False``): the frames
    called inside compile under these settings; nothing else in the caller's configuration changes.
    """
    global _stages_compiling
    from torch._dynamo import config as dynamo_config
    from torch._inductor import config as inductor_config

    was, _stages_compiling = _stages_compiling, True
    try:
        with dynamo_config.patch(capture_scalar_outputs=True, capture_dynamic_output_shape_ops=True,
                                 specialize_float=True), \
                inductor_config.patch(layout_optimization=False):
            yield
    finally:
        _stages_compiling = was


@torch.compiler.disable
def rows_marked(t: torch.Tensor, *dynamic_dims: int) -> torch.Tensor:
    """``t``, or while compiled stages run (inside :func:`compile_settings`) an alias of it with its rows marked as a
    run-time size (:func:`mark_rows_dynamic`) and ``dynamic_dims`` as symbolic sizes (one compiled frame for the
    sizes they take, e.g. a token count that differs between the members of a cascade).

    For a stage that runs its own loop between compiled graphs (DVT's members: one compiled frame per block, so
    that identical blocks compile once): every tensor it passes to a frame is a fresh output of another graph,
    which dynamo would otherwise see at a fixed batch size and compile again for the next one. Eager (and under
    ``torch.export``), ``t`` itself.
    """
    if not _stages_compiling:
        return t
    marked = mark_rows_dynamic(t)
    for dim in dynamic_dims:
        torch._dynamo.maybe_mark_dynamic(marked, dim)
    return marked


def compile_region(fn: Callable[P, R]) -> Callable[P, R]:
    """``fn``, which under ``torch.compile`` runs as a nested compile region (``torch.compiler.nested_compile_region``):
    dynamo traces it once and every later call with matching code, shapes and guards reuses that subgraph, so a model
    that calls it once per block compiles one block, not a graph that grows with its depth ("hierarchical
    compilation"). Eager and under ``torch.export`` (which records every call in full) it is ``fn`` itself.

    A region has no side effects, returns no input as it is (``clone`` it), takes no two inputs that alias each
    other (views of one tensor, such as q, k and v unbound from one projection) and reads no tensor that is not one
    of its arguments (a tensor computed earlier in the same graph and reached through a Python object fails with
    ``Freevar has no source``): pass such tensors in and put the objects back together inside.
    """
    region = torch.compiler.nested_compile_region(fn)

    @functools.wraps(fn)
    def call(*args: P.args, **kwargs: P.kwargs) -> R:
        if torch.compiler.is_dynamo_compiling() and not torch.compiler.is_exporting():
            return region(*args, **kwargs)
        return fn(*args, **kwargs)

    return call
