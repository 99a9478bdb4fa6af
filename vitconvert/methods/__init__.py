"""The methods: one module per method, each defining a :class:`~vitconvert.methods.base.ConvertedModel`
subclass and registering it in :mod:`vitconvert.registry`.

Importing this package imports every method module, so the registry is complete; :mod:`vitconvert.saving`
then registers a timm entrypoint ``vitconvert_<method>`` for each. Adding a method means adding its module
here and to this import list.
"""

from __future__ import annotations

from vitconvert.methods import cfvit, dge, dvt, fsla
from vitconvert.methods.base import ConvertedModel, DynamicOutput, SimulatesPoints, can_simulate, convert
from vitconvert.registry import METHODS, get_method

__all__ = ["METHODS", "ConvertedModel", "DynamicOutput", "SimulatesPoints", "can_simulate", "cfvit", "convert",
           "dge", "dvt", "fsla", "get_method"]
