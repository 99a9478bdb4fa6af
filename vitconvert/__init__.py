"""vitconvert: convert pretrained timm vision transformers into dynamic-token models.

The pipeline is one call per step, each taking a converted model or a model folder: :func:`apply`,
:func:`finetune`, :func:`calibrate`, :func:`evaluate`, :func:`save` / :func:`load`, :func:`push` and
:func:`export` (the CLI is a thin layer over them). The modules behind them are ``vitconvert.train``,
``vitconvert.calibration``, ``vitconvert.evaluation``, ``vitconvert.publish`` and ``vitconvert.deploy``, named so
that these functions and the modules do not shadow each other as attributes of the package.

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
from vitconvert.calibration import calibrate
from vitconvert.deploy import export
from vitconvert.errors import UserError
from vitconvert.evaluation import evaluate
from vitconvert.layers.costs import count_macs, model_gmacs
from vitconvert.methods import ConvertedModel, DynamicOutput
from vitconvert.operating import CurvePoint, Knob, OperatingSpace
from vitconvert.publish import push
from vitconvert.recipes import Recipe, list_recipes, load_recipe
from vitconvert.registry import METHODS
from vitconvert.saving import load, save
from vitconvert.train import finetune

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
    "calibrate",
    "count_macs",
    "evaluate",
    "export",
    "finetune",
    "inspect_model",
    "list_recipes",
    "load",
    "load_recipe",
    "model_gmacs",
    "push",
    "read_anatomy",
    "save",
]
