"""The method registry: a leaf that every layer may import and that imports nothing of vitconvert's but errors.

A method module registers its :class:`~vitconvert.methods.base.ConvertedModel` subclass with
:func:`register_method` when it is imported; importing :mod:`vitconvert` imports every method module
(``vitconvert.methods``), so the registry is complete before any command runs. The timm entrypoints
``vitconvert_<method>`` are registered from this table by :mod:`vitconvert.saving`.
"""

from __future__ import annotations

from typing import Any, TypeVar

from vitconvert.errors import UserError

# name -> ConvertedModel subclass. Typed loosely here so the registry stays a leaf (no import of the contract).
METHODS: dict[str, Any] = {}

T = TypeVar("T")


def register_method(cls: T) -> T:
    """Class decorator: make a converted-model class available under its ``method`` name."""
    name = cls.method  # type: ignore[attr-defined]
    if name in METHODS and METHODS[name] is not cls:
        raise RuntimeError(f"method {name!r} is registered twice ({METHODS[name].__qualname__} and {cls!r})")
    METHODS[name] = cls
    return cls


def get_method(name: str) -> Any:
    """The converted-model class registered as ``name``.

    Raises:
        UserError: when no method of that name is registered (the message lists the known ones).
    """
    if name not in METHODS:
        raise UserError(f"method {name!r} is not known; available: {', '.join(sorted(METHODS))}")
    return METHODS[name]
