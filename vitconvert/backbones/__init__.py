"""Backbone families: what each family of models is, said once (:class:`~vitconvert.backbones.family.Family`).

:func:`read_anatomy` is the entry point: :func:`vitconvert.anatomy.read_parts` finds the parts of a traced model,
then each family's reader accepts or rejects them. Methods then ask the model's family (:func:`family_of`) what
they need to know (token layout, attention as queries/keys/values and its MACs, the MLP's convolution, how to run
at another input size) instead of branching on family names. Adding a family means a module here with a
:class:`~vitconvert.backbones.family.Family` subclass, listed in :data:`FAMILIES`.
"""

from __future__ import annotations

from torch import nn

from vitconvert.anatomy import Anatomy, read_parts
from vitconvert.backbones.family import ConvMlp, Family, QueryAttention
from vitconvert.backbones.pvt_v2 import PVTv2
from vitconvert.backbones.swin import Swin
from vitconvert.backbones.swinv2 import SwinV2
from vitconvert.backbones.vit import ViT
from vitconvert.backbones.vit_inblock import EVA, BEiT
from vitconvert.errors import AnatomyError

FAMILIES: dict[str, Family] = {f.name: f for f in (ViT(), EVA(), BEiT(), PVTv2(), Swin(), SwinV2())}


def describe_family(name: str) -> str:
    return FAMILIES[name].description if name in FAMILIES else name


def family_of(anatomy: Anatomy) -> Family:
    """The family adapter of a model read by :func:`read_anatomy`."""
    return FAMILIES[anatomy.family]


def classify(model: nn.Module, draft: Anatomy) -> Anatomy:
    """Set ``draft.family`` to the one family whose reader accepts the model, else raise naming the gaps."""
    gaps: dict[str, list[str]] = {}
    for name, family in FAMILIES.items():
        missing = family.read(model, draft)
        if not missing:
            draft.family = name
            return draft
        gaps[name] = missing
    detail = "; ".join(f"{FAMILIES[k].description}: {', '.join(v)}" for k, v in gaps.items())
    raise AnatomyError(
        f"{type(model).__name__} is not a supported vision transformer "
        f"({', '.join(f.description for f in FAMILIES.values())}). Not found: {detail}"
    )


def read_anatomy(model: nn.Module, img_size: tuple[int, int] | None = None) -> Anatomy:
    """Trace ``model``, describe its parts and decide its family.

    Args:
        model: A timm ViT/DeiT, PVT-v2, Swin or SwinV2 model (any weights).
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


__all__ = ["FAMILIES", "ConvMlp", "Family", "QueryAttention", "classify", "describe_family", "family_of",
           "read_anatomy"]
