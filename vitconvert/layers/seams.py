"""fx seams in timm blocks (temporary: replaced by the full module)."""

from __future__ import annotations

from timm.layers import DropPath
from torch import nn

from vitconvert import fx as vfx


def drop_path_modules(block: nn.Module) -> list[str]:
    """Drop-path slots: DropPath/Identity modules whose output is a residual add of the block."""
    gm = vfx.trace(block)
    out = []
    for n in gm.graph.nodes:
        if n.op == "call_module" and isinstance(block.get_submodule(str(n.target)), DropPath | nn.Identity) \
                and any(vfx.is_add(u) for u in n.users):
            out.append(str(n.target))
    return out
