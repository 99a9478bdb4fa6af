"""Backbone families: each module says, from an :class:`~vitconvert.anatomy.Anatomy` draft and the module
tree, whether a model belongs to its family and what family-specific facts the methods need.

:func:`read_anatomy` is the entry point: :func:`vitconvert.anatomy.read_parts` finds the parts, then each
family's ``read`` accepts or rejects them. Adding a family means adding a module with ``FAMILY``,
``DESCRIPTION`` and ``read(model, draft)`` that returns a list of what is missing (empty when it matches)
and fills ``draft.extras``.
"""

from __future__ import annotations

from types import ModuleType

from torch import nn

from vitconvert.anatomy import Anatomy, read_parts
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


def read_anatomy(model: nn.Module, img_size: tuple[int, int] | None = None) -> Anatomy:
    """Trace ``model``, describe its parts and decide its family.

    Args:
        model: A timm ViT/DeiT, PVT-v2 or Swin model (any weights).
        img_size: Input size to propagate shapes with; defaults to the model's own.

    Raises:
        AnatomyError: if the model cannot be traced, a part is missing or no family matches; the message
            names what was not found.

    Example:
        >>> import timm
        >>> a = read_anatomy(timm.create_model("deit_tiny_patch16_224"))
        >>> a.family, len(a.blocks), a.grid
        ('vit', 12, (14, 14))
    """
    return classify(model, read_parts(model, img_size))
