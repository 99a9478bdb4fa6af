"""What a backbone family is, said once: the adapter every method asks instead of branching on family names.

A :class:`Family` reads whether a traced model belongs to it (:meth:`Family.read`) and then answers what the
methods need to know about its models:

* **token layout**: blocks over a token sequence with prefix tokens, ``(B, N, C)``, or over a map, ``(B, H, W, C)``
  (:attr:`Family.block_layout`), and the grid one block call runs on (:meth:`Family.block_grid`);
* **structure**: whether the model is an embedding, one chain of blocks over one token sequence and a head
  (:attr:`Family.splits_at_blocks`: the fx split applies), and whether every block attends over the whole grid, so
  attention logits of one resolution describe token pairs of another (:attr:`Family.global_attention`);
* **attention as a seam**: :meth:`Family.query_attention` reads a block's attention module as queries from some
  rows and keys and values from all tokens (a fused qkv projection; PVT-v2's spatial-reduction keys and values),
  with the MACs of each part (:class:`QueryAttention`), and the position information the attention holds itself
  for query rows that stand for groups of positions (:meth:`QueryAttention.positions`: EVA's rotary embedding);
* **windows**: a block whose attention runs inside windows of its map, read as a batch of windows with the keys of
  each window and an additive bias per (query, key) pair (:meth:`Family.windows`, :class:`WindowView`: Swin);
* **the MLP**: its depthwise convolution, if it has one (:meth:`Family.mlp_conv`, PVT-v2);
* **resolution**: running a model at another input size (:meth:`Family.set_input_size`: position embeddings
  resampled, Swin's windows kept or fitted to the new maps) and the input sizes that keep whole maps
  (:meth:`Family.size_step`).

Adding a family means subclassing :class:`Family` in a module of this package and listing it in
:data:`vitconvert.backbones.FAMILIES`; methods then work on it as far as its answers allow.
"""

from __future__ import annotations

import abc
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from vitconvert.anatomy import Anatomy
from vitconvert.errors import AnatomyError, UserError
from vitconvert.layers.costs import attention_macs, linear_macs, norm_macs


class QueryAttention(abc.ABC):
    """A block's attention module read as three steps a method can run on different rows: project queries (some
    rows), keys and values (every token; they may be pooled first), then the output after the attention core.

    ``output(core(queries(norm1(q_rows)), *keys_values(norm1(x), grid)))`` is the module's own forward when the
    query rows are all tokens. Not a module: it holds references to the module's layers (``.to()`` and deepcopy
    follow the module it belongs to).
    """

    # Whether :meth:`positions` gives anything (a method skips building what it reads otherwise).
    holds_positions: ClassVar[bool] = False

    def __init__(self, attn: nn.Module) -> None:
        self.attn = attn

    @property
    def num_heads(self) -> int:
        return int(self.attn.num_heads)

    @property
    @abc.abstractmethod
    def width(self) -> int:
        """Channels of the tokens (the block's width)."""

    @property
    @abc.abstractmethod
    def dim(self) -> int:
        """Heads x head dim of queries, keys and values."""

    @property
    def keys_are_queries(self) -> bool:
        """Whether the keys and values are the same tokens as the queries (no pooling), in the same order."""
        return True

    @abc.abstractmethod
    def queries(self, qn: torch.Tensor) -> torch.Tensor:
        """(B, Nq, width) normalised query rows -> (B, Nq, dim) projected queries (query norms applied)."""

    @abc.abstractmethod
    def keys_values(self, xn: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, N, width) normalised tokens on ``grid`` -> keys and values, each (B, heads, Nk, dim / heads)."""

    @abc.abstractmethod
    def output(self, o: torch.Tensor, qn: torch.Tensor) -> torch.Tensor:
        """(B, Nq, dim) attention result (heads merged) -> (B, Nq, width): what follows the core (output norm, gate,
        projection, dropout); ``qn`` are the normalised query rows (a gate reads them)."""

    def dropout(self) -> float:
        """The attention-dropout probability to apply now (0 in eval mode)."""
        drop = getattr(self.attn, "attn_drop", None)
        return float(drop.p) if isinstance(drop, nn.Dropout) and self.attn.training else 0.0

    def positions(self, members: torch.Tensor, prefix: int, args: tuple[Any, ...], kwargs: dict[str, Any]
                  ) -> QueryPositions | None:
        """The position information the attention applies itself, for query rows that stand for groups of grid
        positions, in one block call ``block(x, *args, **kwargs)``; None when it has none (position embeddings added
        to the tokens before the blocks: ViT, PVT-v2).

        Args:
            members: (T, N) float, row t marking the grid positions (not prefix tokens) candidate t stands for.
            prefix: Prefix tokens before the grid (their own single position each).
        """
        return None

    def rotate(self, t: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        """``t`` (..., head dim) rotated by the rotary table rows ``rope`` (broadcast against ``t``), as the
        attention rotates its queries and keys (only for an attention whose :meth:`positions` gives rotary rows)."""
        raise NotImplementedError(f"{type(self.attn).__name__} has no rotary embedding")

    @abc.abstractmethod
    def key_tokens(self, tokens: int, grid: tuple[int, int]) -> int:
        """How many keys ``tokens`` tokens on ``grid`` give."""

    @abc.abstractmethod
    def query_macs(self, keys: int) -> float:
        """MACs per query row: its projection and norms, QK^T and AV against ``keys`` keys, and the output steps."""

    @abc.abstractmethod
    def kv_macs(self, tokens: int, grid: tuple[int, int]) -> float:
        """MACs of the keys and values of ``tokens`` tokens on ``grid`` (pooling and its norm included)."""


@dataclass(frozen=True)
class QueryPositions:
    """What an attention with positions of its own (:meth:`QueryAttention.positions`) gives the rows of one block
    call. Candidates are the prefix tokens then the groups of ``members``; a group's row is the mean of its positions'
    rows, because a query pooled over positions P then scores each key as the mean of what it scores at each p: a
    rotation is linear (``mean_p R(p) q = C q + S rot(q)``, C and S the mean cos and sin rows), and a per-position
    additive bias enters the logits linearly. Exact for a single position."""

    bias: torch.Tensor | None = None  # (1, heads, P + T, P + N) additive bias of each candidate against each key
    # (heads or 1, P + T, E) rotary row of each candidate (prefix rows: identity), per head or shared by the heads
    query_rope: torch.Tensor | None = None
    key_rope: torch.Tensor | None = None  # (heads or 1, P + N, E) rotary row of each key (prefix rows: identity)


class PlainQKVAttention(QueryAttention):
    """An attention module with a fused ``qkv`` weight, no q/k norms, and an output projection (timm's Swin, SwinV2 and
    BEiT attention): the query rows of the weight project the queries, the rest the keys and values of every token.
    Its bias is ``qkv.bias``, or the separate ``q_bias``/``k_bias``/``v_bias`` where the module keeps them (BEiT,
    SwinV2: no learned k bias). What a family adds (position biases, cosine attention) its subclass adds."""

    @property
    def width(self) -> int:
        return int(self.attn.qkv.in_features)

    @property
    def dim(self) -> int:
        return int(self.attn.qkv.out_features // 3)

    def project(self, t: torch.Tensor, rows: slice) -> torch.Tensor:
        """Rows ``rows`` of the fused projection of ``t`` (0:dim queries, dim:3dim keys and values)."""
        attn = self.attn
        q_bias = getattr(attn, "q_bias", None)
        bias = torch.cat((q_bias, attn.k_bias, attn.v_bias)) if q_bias is not None else attn.qkv.bias
        return F.linear(t, attn.qkv.weight[rows], bias[rows] if bias is not None else None)

    def queries(self, qn: torch.Tensor) -> torch.Tensor:
        return self.project(qn, slice(0, self.dim))

    def keys_values(self, xn: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        b, n, _ = xn.shape
        kv = self.project(xn, slice(self.dim, 3 * self.dim))
        k, v = kv.view(b, n, 2, self.attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        return k, v

    def output(self, o: torch.Tensor, qn: torch.Tensor) -> torch.Tensor:
        return self.attn.proj_drop(self.attn.proj(o))

    def key_tokens(self, tokens: int, grid: tuple[int, int]) -> int:
        return tokens

    def query_macs(self, keys: int) -> float:
        c, d = self.width, self.dim
        return linear_macs(1, c, d) + attention_macs(1, keys, d, d) + linear_macs(1, d, c)

    def kv_macs(self, tokens: int, grid: tuple[int, int]) -> float:
        return linear_macs(tokens, self.width, 2 * self.dim)


class WindowView(abc.ABC):
    """A block whose attention runs inside windows of its ``(B, H, W, C)`` map, seen as a batch of windows: every
    window a short token sequence whose queries attend only to that window's keys, plus an additive bias per
    (query position, key position) (Swin's relative position bias and its shifted windows' mask).

    Everything else in such a block (norms, MLP, residual adds) works per token, so the block is the same computation
    on :meth:`partition`'s windows as on the map, and a method that selects or pools query rows can work on the
    windows as on short images. Not a module: it holds a reference to the block.
    """

    # Whether a block may keep its window tables (bias, caps) between inference forwards while its tensors are
    # unchanged. False where the bias is computed by layers the model's GMACs count on every forward (SwinV2's
    # continuous position bias MLP): kept tables would skip MACs the cost model charges.
    tables_keep: ClassVar[bool] = True

    def __init__(self, block: nn.Module) -> None:
        self.block = block

    @abc.abstractmethod
    def window(self, hw: tuple[int, int]) -> tuple[int, int]:
        """The window (rows, columns of tokens) the block uses on an ``hw`` map."""

    def native(self, hw: tuple[int, int]) -> bool:
        """Whether the base block itself runs on an ``hw`` map as this view reads it (its windows and mask built for
        that map). On another map (CF-ViT's coarse pass runs the model at half size) only the view's reading holds:
        a method runs the block's computation on :meth:`partition`'s windows with :meth:`bias`."""
        return True

    def windows(self, hw: tuple[int, int]) -> tuple[int, int]:
        """Windows per image along each axis on an ``hw`` map (whole windows: see :meth:`check`)."""
        w = self.window(hw)
        return hw[0] // w[0], hw[1] // w[1]

    def check(self, hw: tuple[int, int], where: str) -> None:
        """Raise a UserError unless ``hw`` is cut into whole windows (a padded window's keys hold padding)."""
        w = self.window(hw)
        if hw[0] % w[0] or hw[1] % w[1]:
            raise UserError(f"{where}: the {hw[0]}x{hw[1]} map is not cut into whole {w[0]}x{w[1]} windows (timm pads "
                            "it, and padded keys are not tokens); choose an input size whose maps the windows divide")

    @abc.abstractmethod
    def partition(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) map -> (B * windows, window tokens, C), image after image, windows in raster order."""

    @abc.abstractmethod
    def reverse(self, t: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        """:meth:`partition` undone: (B * windows, window tokens, C) -> (B, H, W, C)."""

    @abc.abstractmethod
    def bias(self, members: torch.Tensor, hw: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Additive attention biases of query rows that stand for groups of a window's positions.

        Args:
            members: (T, N) float, row t marking the window positions query row t stands for (one position: a
                token's own query; several: a pooled query).
            hw: The map.

        Returns:
            ``bias`` (windows or 1, heads, T, N): each row's bias against each key, the mean of its positions' rows
            (exact for a single position), plus the mask of the window, and ``whole`` (windows or 1, T) bool: the
            rows whose positions lie in one masked region of the window, the only ones a method may create (the
            mask of a row that straddles regions is no single row of the mask).
        """


@dataclass(frozen=True)
class ConvMlp:
    """An MLP with a depthwise convolution over the token map between its two linear layers (PVT-v2):
    ``fc2(drop(act(dwconv(relu(fc1(x))))))``, then ``drop``; ``relu`` is timm's ``linear`` variant (else Identity)."""

    fc1: nn.Linear
    relu: nn.Module
    dwconv: nn.Conv2d
    act: nn.Module
    drop: nn.Module
    fc2: nn.Linear


class Family(abc.ABC):
    """One backbone family (see the module docstring); subclasses set the class attributes and the readers."""

    name: ClassVar[str]
    description: ClassVar[str]
    block_layout: ClassVar[Literal["tokens", "map"]]
    splits_at_blocks: ClassVar[bool] = False
    global_attention: ClassVar[bool] = False

    @abc.abstractmethod
    def read(self, model: nn.Module, draft: Anatomy) -> list[str]:
        """What the model lacks to belong to this family (empty: it belongs; ``draft`` then gets the family's facts:
        ``attn_kind`` per block, ``extras``)."""

    def block_grid(self, x: torch.Tensor, args: tuple[Any, ...], kwargs: dict[str, Any],
                   default: tuple[int, int] | None) -> tuple[int, int]:
        """The token grid a block call ``block(x, *args, **kwargs)`` runs on (``default``: the stage's grid)."""
        if default is None:
            raise AnatomyError(f"{self.description}: the grid of a block call is not known")
        return default

    def query_attention(self, attn: nn.Module, where: str) -> QueryAttention:
        """``attn`` read as a :class:`QueryAttention`; an AnatomyError when this family's attention has no such seam."""
        raise AnatomyError(f"{where}: {self.description} attention cannot run queries apart from keys "
                           f"(found {type(attn).__name__})")

    def windows(self, block: nn.Module) -> WindowView | None:
        """The block read as a batch of windows (:class:`WindowView`) when its attention runs inside windows of its
        map; None for attention over the whole grid."""
        return None

    def mlp_conv(self, mlp: nn.Module, where: str) -> ConvMlp | None:
        """The MLP's parts when it holds a depthwise convolution over the token map; None for a per-token MLP."""
        return None

    def set_input_size(self, model: nn.Module, size: tuple[int, int], anatomy: Anatomy,
                       keep_windows: bool = True) -> dict[str, Any]:
        """Make ``model`` run at ``size`` (what depends on it rebuilt); returns the constructor arguments that now
        differ (to record in the base spec). ``keep_windows``: Swin keeps its windows (and so its relative-position
        tables) instead of fitting them to the new maps."""
        raise AnatomyError(f"{self.description} models cannot change their input size")

    def size_step(self, anatomy: Anatomy) -> int:
        """Input sides that are multiples of this keep whole token maps (ViT: the patch)."""
        return anatomy.patch_size[0]

    def position_bias(self, model: nn.Module, attn: str) -> str | None:
        """The parameter (its path in ``model``) from which the attention module at ``attn`` computes an additive
        bias over (query, key) position pairs of the token grid, or None when its attention has none. A method
        that runs the block on another token sequence gives it a bias of its own (:func:`vitconvert.fx.
        lift_attention_bias`)."""
        return None

    def export_context(self, model: nn.Module) -> AbstractContextManager[None]:
        """A context in which ``model`` (a converted model holding this family's modules) traces for torch.export
        with a batch size known only at run time; nothing to change by default."""
        return nullcontext()


def norm_cost(norm: nn.Module | None, width: int) -> float:
    """MACs per token of a norm layer by the cost layer's rule (0 for Identity or none)."""
    return norm_macs(1, width, norm) if norm is not None else 0.0


def total_stride(anatomy: Anatomy) -> int:
    """A hierarchical model's input side / its last stage's map side."""
    return max(1, anatomy.img_size[0] // anatomy.stages[-1].grid[0])
