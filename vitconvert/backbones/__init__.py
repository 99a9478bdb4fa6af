"""Backbone families: each module says, from an :class:`~vitconvert.anatomy.Anatomy` draft and the module
tree, whether a model belongs to its family and what family-specific facts the methods need.

Adding a family means adding a module with ``FAMILY``, ``DESCRIPTION`` and ``read(model, draft)`` that
returns a list of what is missing (empty when it matches) and fills ``draft.extras``.
"""

from __future__ import annotations

from types import ModuleType

from torch import nn

from vitconvert.anatomy import Anatomy
from vitconvert.backbones import pvt_v2, swin, vit
from vitconvert.errors import AnatomyError

FAMILIES: dict[str, ModuleType] = {m.FAMILY: m for m in (vit, pvt_v2, swin)}


def describe_family(name: str) -> str:
    return FAMILIES[name].DESCRIPTION if name in FAMILIES else name


def classify(model: nn.Module, draft: Anatomy) -> Anatomy:
    """Set ``draft.family`` to the one family whose reader accepts the model, else raise naming the gaps."""
    gaps: dict[str, list[str]] = {}
    for name, family in FAMILIES.items():
        missing = family.read(model, draft)
        if not missing:
            draft.family = name
            return draft
        gaps[name] = missing
    detail = "; ".join(f"{FAMILIES[k].DESCRIPTION}: {', '.join(v)}" for k, v in gaps.items())
    raise AnatomyError(
        f"{type(model).__name__} is not a supported vision transformer (ViT/DeiT, PVT-v2 or Swin). Not found: {detail}"
    )
