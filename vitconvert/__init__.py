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

__version__ = "0.1.0"

from vitconvert.anatomy import Anatomy, read_anatomy
from vitconvert.api import apply, inspect_model
from vitconvert.errors import UserError
from vitconvert.gmacs import count_macs, model_gmacs
from vitconvert.methods import METHODS, ConvertedModel, DynamicOutput
from vitconvert.recipes import Recipe, list_recipes, load_recipe
from vitconvert.saving import load, save

__all__ = [
    "METHODS",
    "Anatomy",
    "ConvertedModel",
    "DynamicOutput",
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
