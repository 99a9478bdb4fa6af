"""vitconvert: convert pretrained timm vision transformers into dynamic-token models.

Importing the package registers the ``vitconvert_<method>`` architectures with timm, so
``timm.create_model('hf-hub:OWNER/NAME', pretrained=True)`` rebuilds converted models.

Example:
    >>> import vitconvert
    >>> model = vitconvert.apply("deit_small", "cfvit")          # doctest: +SKIP
    >>> vitconvert.save(model, "deit_small-cfvit")              # doctest: +SKIP
    >>> model = vitconvert.load("deit_small-cfvit", budget="50%")  # doctest: +SKIP
"""

from __future__ import annotations

from vitconvert._version import __version__
from vitconvert.anatomy import Anatomy
from vitconvert.api import apply, inspect_model
from vitconvert.backbones import read_anatomy
from vitconvert.errors import UserError
from vitconvert.layers.costs import count_macs, model_gmacs
from vitconvert.methods import ConvertedModel, DynamicOutput
from vitconvert.operating import CurvePoint, Knob, OperatingSpace
from vitconvert.recipes import Recipe, list_recipes, load_recipe
from vitconvert.registry import METHODS
from vitconvert.saving import load, save

__all__ = [
    "METHODS",
    "Anatomy",
    "ConvertedModel",
    "CurvePoint",
    "DynamicOutput",
    "Knob",
    "OperatingSpace",
    "Recipe",
    "UserError",
    "__version__",
    "apply",
    "count_macs",
    "inspect_model",
    "list_recipes",
    "load",
    "load_recipe",
    "model_gmacs",
    "read_anatomy",
    "save",
]
