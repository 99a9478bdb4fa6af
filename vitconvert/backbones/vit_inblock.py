"""ViTs whose position information lives inside the blocks: one stage of global attention over prefix tokens + a
non-overlapping patch grid, like :mod:`vitconvert.backbones.vit`, but the blocks are not a plain chain of
``block(tokens)`` calls the fx split can cut between:

* **EVA / EVA-02 / RoPE ViT** (timm ``eva``): rotary position embeddings computed once from the grid and passed to
  every block (the anatomy reads it from the graph: every block takes the same extra tensor computed before the
  first one); an absolute position embedding too, or none; SwiGLU MLPs are read like any other MLP;
* **BEiT** (timm ``beit``): a relative position bias table in every block's attention, indexed by the token grid,
  layer-scale gammas as parameters, mean pooling with ``fc_norm``.

Methods that need the blocks as a chain of token-to-token calls (DGE's query subsets, clustered attention) do not
declare these families: a rotary embedding or a relative position bias is a function of each token's position that a
pooled query or a cluster has no single value of. CF-ViT does, giving its coarse tokens the mean over their positions:
the split passes EVA's rotary embedding to every block, and BEiT's bias becomes a block input
(:meth:`BEiT.position_bias`, :func:`vitconvert.fx.lift_attention_bias`). A method that runs the
whole model at other input sizes (DVT's members) does: timm's own ``set_input_size`` recomputes the rotary
embedding for the new grid, and resamples BEiT's relative position bias tables to it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn

from vitconvert.anatomy import Anatomy
from vitconvert.backbones.family import Family
from vitconvert.backbones.vit import patch_grid_stage_gaps, timm_set_input_size


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


class EVA(_InBlockPositions):
    name = "eva"
    description = "EVA/RoPE ViT"

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

