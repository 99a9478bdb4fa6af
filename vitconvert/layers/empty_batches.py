"""Running timm's blocks on a batch that may hold no image: a cascade's later stages in an exported graph.

A cascade's exported graph gives a later stage the images still undecided, a sub-batch whose size is known only at
run time and is 0 when every image has left. Two kinds of call in timm's PVT-v2, Swin(V2), BEiT and EVA stop that:

* reshapes spelled with the batch size and a ``-1`` beside it (``qkv.reshape(B, N, 3, heads, -1)``): on a batch of 0
  the ``-1`` could be any size, so PyTorch refuses it, and ``torch.export`` cannot prove the batch is not 0. Such a
  reshape keeps the input's leading size, so it reshapes each row alone, and the ``-1`` is the row's size divided by
  the other sizes, a number that does not depend on the batch: :func:`rowwise_shape` spells it out.
* ``torch.roll`` (Swin's shifted windows): ``torch.export`` asks whether the tensor is empty (PyTorch returns an empty
  tensor's copy early), a question on the run-time size it cannot answer. The same roll as two slices and a
  concatenation asks nothing (an exporter writes a roll that way anyway).

:func:`empty_batch_safe` rewrites both while its context is active, in eager code and while ``torch.export`` traces
(a Python ``TorchFunctionMode``: the exported graph records the rewritten calls); every other call goes through
unchanged, and the results are the same tensors.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true
from torch.overrides import TorchFunctionMode

_RESHAPES = frozenset({torch.Tensor.reshape, torch.Tensor.view, torch.reshape})
_ROLLS = frozenset({torch.Tensor.roll, torch.roll})


def rowwise_shape(x: torch.Tensor, shape: Sequence[Any]) -> list[Any] | None:
    """``shape`` with its ``-1`` spelled out when the reshape of ``x`` to it keeps ``x``'s leading size (a reshape of
    each row), else None (nothing to do, or not a reshape of rows). Exact for every batch size: the rows of ``x`` and
    of the result are the same elements in the same order."""
    holes = [i for i, d in enumerate(shape) if isinstance(d, int) and d == -1]
    if len(holes) != 1 or holes[0] == 0 or x.dim() == 0:
        return None
    if not statically_known_true(shape[0] == x.shape[0]):
        return None
    hole = holes[0]
    row = math.prod(x.shape[1:])
    known = math.prod(d for i, d in enumerate(shape) if i not in (0, hole))
    if not statically_known_true(known > 0) or not statically_known_true(row % known == 0):
        return None  # not a valid reshape of a row: leave PyTorch's own message to the call
    out = list(shape)
    out[hole] = row // known
    return out


def roll_by_slices(x: torch.Tensor, shifts: int | Sequence[int], dims: int | Sequence[int] | None = None
                   ) -> torch.Tensor | None:
    """``torch.roll(x, shifts, dims)`` as slices and concatenations, or None where it is not a roll along given
    dimensions of plain sizes by plain shifts (a roll of the flattened tensor, symbolic sizes)."""
    if dims is None:
        return None
    shifts = [shifts] if isinstance(shifts, int) else list(shifts)
    dims = [dims] if isinstance(dims, int) else list(dims)
    if not dims or len(shifts) != len(dims) or not all(isinstance(s, int) for s in shifts):
        return None
    if not all(isinstance(x.shape[d], int) and x.shape[d] > 0 for d in dims):
        return None
    out = x
    for shift, dim in zip(shifts, dims, strict=True):
        n = x.shape[dim]
        shift %= n
        if shift:
            out = torch.cat([out.narrow(dim, n - shift, shift), out.narrow(dim, 0, n - shift)], dim=dim)
    return out if out is not x else x.clone()  # roll returns a new tensor, never its input


class _EmptyBatchSafe(TorchFunctionMode):
    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        if func in _ROLLS and args and isinstance(args[0], torch.Tensor):
            rolled = roll_by_slices(*args, **kwargs)
            if rolled is not None:
                return rolled
        if func in _RESHAPES and args and isinstance(args[0], torch.Tensor):
            x, rest = args[0], args[1:]
            if "shape" in kwargs:
                new = rowwise_shape(x, list(kwargs["shape"]))
                if new is not None:
                    kwargs = {**kwargs, "shape": new}
            elif len(rest) == 1 and isinstance(rest[0], (tuple, list)):  # x.reshape((a, b)), torch.reshape(x, s)
                new = rowwise_shape(x, list(rest[0]))
                if new is not None:
                    args = (x, new)
            elif rest and all(isinstance(d, (int, torch.SymInt)) for d in rest):  # x.view(a, b); not view(dtype)
                new = rowwise_shape(x, list(rest))
                if new is not None:
                    args = (x, *new)
        return func(*args, **kwargs)


def empty_batch_safe() -> TorchFunctionMode:
    """A context in which every ``reshape``/``view`` that keeps its input's leading size gets its ``-1`` spelled out
    and every roll is sliced (see the module docstring): ``with empty_batch_safe(): block(x[:0])`` runs where timm's
    own code refuses the empty batch, and gives what timm's code gives on any other batch."""
    return _EmptyBatchSafe()
