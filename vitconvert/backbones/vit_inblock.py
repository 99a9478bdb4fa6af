"""ViTs whose position information lives inside the blocks: one stage of global attention over prefix tokens + a
non-overlapping patch grid, like :mod:`vitconvert.backbones.vit`, but the blocks are not a plain chain of
``block(tokens)`` calls the fx split can cut between:

* **EVA / EVA-02 / RoPE ViT** (timm ``eva``): rotary position embeddings computed once from the grid and passed to
  every block (the anatomy reads it from the graph: every block takes the same extra tensor computed before the
  first one); an absolute position embedding too, or none; SwiGLU MLPs are read like any other MLP;
* **BEiT** (timm ``beit``): a relative position bias table in every block's attention, indexed by the token grid,
  layer-scale gammas as parameters, mean pooling with ``fc_norm``.

A rotary embedding and a relative position bias are functions of each token's position, and both enter the attention
logits linearly, so a token that stands for several positions takes the mean over them. DGE's pooled queries
(:class:`RotaryQueryAttention`: the query rotated by the mean of its positions' sin/cos rows, which scores keys as the
mean of what it scores at each position; keys keep their own rows; :class:`BiasQueryAttention`: the mean of its
positions' bias rows). CF-ViT's coarse tokens: the split passes EVA's rotary embedding to every block with a coarse
token's rows the mean of its positions', and BEiT's bias becomes a block input, M B M^T for a sequence whose tokens
average positions by M (:meth:`BEiT.position_bias`, :func:`vitconvert.fx.lift_attention_bias`). A method that runs
the whole model at other input sizes (DVT's members) uses timm's own ``set_input_size``, which recomputes the rotary
embedding for the new grid and resamples BEiT's relative position bias tables to it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers.pos_embed_sincos import apply_rot_embed_cat
from torch import nn

from vitconvert.anatomy import Anatomy
from vitconvert.backbones.family import Family, PlainQKVAttention, QueryAttention, QueryPositions
from vitconvert.backbones.vit import FusedQKVAttention, patch_grid_stage_gaps, timm_set_input_size
from vitconvert.errors import AnatomyError, UserError


def group_means(rows: torch.Tensor, members: torch.Tensor, dim: int) -> torch.Tensor:
    """The mean of ``rows`` (indexed by grid position along ``dim``) over each group of ``members`` (T, N): sums by
    ``index_add`` (bookkeeping, not a matrix product the MAC count would see)."""
    row, pos = members.nonzero().unbind(1)
    shape = list(rows.shape)
    shape[dim] = members.shape[0]
    sums = rows.new_zeros(shape).index_add(dim, row, rows.index_select(dim, pos))
    count = members.sum(1).to(rows.dtype).view([-1 if d == dim % rows.dim() else 1 for d in range(rows.dim())])
    return sums / count


class RotaryQueryAttention(FusedQKVAttention):
    """timm's ``EvaAttention`` or ``AttentionRope`` (fused ``qkv``, with separate q/v biases in EVA, or
    ``q_proj``/``k_proj``/``v_proj``; q/k norms, scale norm, gate) with the rotary embedding the block is called
    with. Queries are rotated after their norm, by the mean row of the positions they stand for (:meth:`positions`),
    keys by their own; prefix tokens are not rotated (identity rows)."""

    holds_positions = True

    @property
    def width(self) -> int:
        attn = self.attn
        return int((attn.qkv if attn.qkv is not None else attn.q_proj).in_features)

    def _project(self, t: torch.Tensor, parts: slice) -> torch.Tensor:
        """Rows ``parts`` (0: q, 1: k, 2: v, in units of ``dim``) of the q/k/v projection of ``t``."""
        attn, d = self.attn, self.dim
        if attn.qkv is None:
            return torch.cat([lin(t) for lin in (attn.q_proj, attn.k_proj, attn.v_proj)[parts]], dim=-1)
        bias = attn.qkv.bias  # timm's AttentionRope; EvaAttention keeps its q/v biases apart (no k bias)
        if getattr(attn, "q_bias", None) is not None:
            bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
        rows = slice(parts.start * d, parts.stop * d)
        return F.linear(t, attn.qkv.weight[rows], bias[rows] if bias is not None else None)

    def queries(self, qn: torch.Tensor) -> torch.Tensor:
        q = self._project(qn, slice(0, 1))
        if not isinstance(self.attn.q_norm, nn.Identity):
            q = self.attn.q_norm(q.unflatten(-1, (self.attn.num_heads, -1))).flatten(-2)
        return q

    def keys_values(self, xn: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        b, n, _ = xn.shape
        kv = self._project(xn, slice(1, 3))
        k, v = kv.view(b, n, 2, self.attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        return self.attn.k_norm(k), v

    def positions(self, members: torch.Tensor, prefix: int, args: tuple[Any, ...], kwargs: dict[str, Any]
                  ) -> QueryPositions | None:
        rope = kwargs.get("rope", args[0] if args else None)
        if kwargs.get("attn_mask") is not None or kwargs.get("is_causal") or len(args) > 1:
            raise UserError("attention masks are not supported by converted EVA blocks")
        if rope is None:
            return None
        n = members.shape[1]
        if rope.dim() not in (2, 3) or rope.shape[-2] != n:
            raise UserError(f"dge: EVA blocks need one rotary row per grid position ({n}), got a "
                            f"{tuple(rope.shape)} rotary embedding (patch-dropped embeddings are not supported)")
        if int(self.attn.num_prefix_tokens) != prefix:
            raise AnatomyError(f"dge: the attention leaves {self.attn.num_prefix_tokens} tokens unrotated, the model "
                               f"has {prefix} prefix tokens")
        rope = rope if rope.dim() == 3 else rope.unsqueeze(0)  # (heads or 1, N, E): mixed RoPE has a table per head
        half = rope.shape[-1] // 2
        ident = torch.cat([rope.new_zeros(rope.shape[0], prefix, half), rope.new_ones(rope.shape[0], prefix, half)],
                          dim=-1)  # sin 0, cos 1
        return QueryPositions(query_rope=torch.cat([ident, group_means(rope, members, 1)], dim=1),
                              key_rope=torch.cat([ident, rope], dim=1))

    def rotate(self, t: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        return apply_rot_embed_cat(t, rope, half=bool(getattr(self.attn, "rotate_half", False)))


class _InBlockPositions(Family):
    """What EVA and BEiT share: one stage of global attention, resized through timm's ``set_input_size``."""

    block_layout = "tokens"
    splits_at_blocks = False
    global_attention = True

    def _common(self, model: nn.Module, draft: Anatomy) -> list[str]:
        missing = patch_grid_stage_gaps(model, draft)
        if any(hasattr(model.get_submodule(b.attn), "window_size") and not hasattr(
                model.get_submodule(b.attn), "relative_position_bias_table") for b in draft.blocks):
            missing.append("global attention")
        return missing

    def _finish(self, model: nn.Module, draft: Anatomy) -> None:
        draft.extras["class_token"] = any(p.endswith("cls_token") for p in draft.prefix_tokens)
        for b in draft.blocks:
            b.attn_kind = "global"

    def set_input_size(self, model: nn.Module, size: tuple[int, int], anatomy: Anatomy,
                       keep_windows: bool = True) -> dict[str, Any]:
        """timm's ``set_input_size``: position embeddings resampled, rotary embeddings and relative position
        biases recomputed for the new grid."""
        return timm_set_input_size(model, size)


class BiasQueryAttention(PlainQKVAttention):
    """timm's BEiT ``Attention``: a fused ``qkv`` weight with separate q/v biases (no k bias), the relative position
    bias of its table, output projection. A query row's bias is the mean of its positions' rows of the table (the class
    token's row and column are the table's extra entries); keys are every token."""

    holds_positions = True

    def positions(self, members: torch.Tensor, prefix: int, args: tuple[Any, ...], kwargs: dict[str, Any]
                  ) -> QueryPositions | None:
        if args or kwargs.get("shared_rel_pos_bias") is not None:
            raise UserError("dge: BEiT blocks with a shared relative position bias are not supported")
        if prefix != 1:
            raise AnatomyError(f"dge: BEiT's relative position bias has rows for one class token, the model has "
                               f"{prefix} prefix tokens")
        rel = self.attn._get_rel_pos_bias()[0]  # (heads, 1 + N, 1 + N)
        if rel.shape[-1] != members.shape[1] + 1:
            raise UserError(f"dge: the relative position bias covers {rel.shape[-1] - 1} positions, the grid has "
                            f"{members.shape[1]}")
        rows = torch.cat([rel[:, :1], group_means(rel[:, 1:], members, 1)], dim=1)
        return QueryPositions(bias=rows.unsqueeze(0))


class EVA(_InBlockPositions):
    name = "eva"
    description = "EVA/RoPE ViT"

    def query_attention(self, attn: nn.Module, where: str) -> QueryAttention:
        fused = isinstance(getattr(attn, "qkv", None), nn.Linear)
        split = all(isinstance(getattr(attn, n, None), nn.Linear) for n in ("q_proj", "k_proj", "v_proj"))
        if not (fused or split) or not all(hasattr(attn, n) for n in ("num_prefix_tokens", "q_norm", "k_norm",
                                                                        "norm", "proj", "head_dim")) \
                or getattr(attn, "num_kv_heads", attn.num_heads) != attn.num_heads:
            raise AnatomyError(f"{where}: needs timm's EvaAttention or AttentionRope (qkv or q/k/v projections, one "
                               f"key per query head; found {type(attn).__name__})")
        return RotaryQueryAttention(attn)

    def read(self, model: nn.Module, draft: Anatomy) -> list[str]:
        missing = self._common(model, draft)
        if not all(b.shared_inputs for b in draft.blocks):
            missing.append("a tensor computed once and passed to every block (rotary position embedding)")
        if missing:
            return missing
        self._finish(model, draft)
        return []


class BEiT(_InBlockPositions):
    name = "beit"
    description = "BEiT"

    def query_attention(self, attn: nn.Module, where: str) -> QueryAttention:
        if not (isinstance(getattr(attn, "qkv", None), nn.Linear) and isinstance(getattr(attn, "proj", None), nn.Linear)
                and isinstance(getattr(attn, "relative_position_bias_table", None), nn.Parameter)
                and hasattr(attn, "q_bias")):
            raise AnatomyError(f"{where}: needs BEiT attention with qkv and proj Linear layers and a relative position "
                               f"bias table (found {type(attn).__name__})")
        return BiasQueryAttention(attn)

    @contextmanager
    def export_context(self, model: nn.Module) -> Iterator[None]:
        """BEiT's attention spelled out (timm's ``fused_attn = False``) while exporting: the fused call passes the
        relative position bias as an SDPA mask of batch 1, and tracing that against a sub-batch of unknown size
        stops on a guard (``Eq(1, u)``); the explicit softmax broadcasts the bias instead. Same values to float
        rounding."""
        fused = [m for m in model.modules() if getattr(m, "fused_attn", False)
                 and isinstance(getattr(m, "relative_position_bias_table", None), nn.Parameter)]
        for m in fused:
            m.fused_attn = False
        try:
            yield
        finally:
            for m in fused:
                m.fused_attn = True

    def position_bias(self, model: nn.Module, attn: str) -> str | None:
        """The relative position bias table each block's attention indexes by the token grid."""
        return f"{attn}.relative_position_bias_table"

    def read(self, model: nn.Module, draft: Anatomy) -> list[str]:
        missing = self._common(model, draft)
        attns = [model.get_submodule(b.attn) for b in draft.blocks]
        if not all(isinstance(getattr(a, "relative_position_bias_table", None), nn.Parameter) for a in attns):
            missing.append("a relative position bias table in every block's global attention")
        if any(b.shared_inputs for b in draft.blocks):
            missing.append("blocks called on the tokens alone")
        if missing:
            return missing
        self._finish(model, draft)
        return []

