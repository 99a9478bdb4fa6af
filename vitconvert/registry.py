"""The method registry: a leaf that every layer may import and that imports nothing of vitconvert's but errors.

A method module registers its :class:`~vitconvert.methods.base.ConvertedModel` subclass with
:func:`register_method` when it is imported; importing :mod:`vitconvert` imports every method module
(``vitconvert.methods``), so the registry is complete before any command runs. A method defined elsewhere (a
plugin, a test) registers itself the same way, whenever it is imported.

Modules that need to know every method, now and later, subscribe with :func:`on_register` instead of importing
the methods: :mod:`vitconvert.saving` registers a timm entrypoint ``vitconvert_<method>`` for each, so
``timm.create_model('local-dir:...')`` rebuilds a plugin's models too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from vitconvert.errors import UserError

# name -> ConvertedModel subclass. Typed loosely here so the registry stays a leaf (no import of the contract).
METHODS: dict[str, Any] = {}
_LISTENERS: list[Callable[[str, Any], None]] = []

T = TypeVar("T")


def register_method(cls: T) -> T:
    """Class decorator: make a converted-model class available under its ``method`` name."""
    name = cls.method  # type: ignore[attr-defined]
    if name in METHODS and METHODS[name] is not cls:
        raise RuntimeError(f"method {name!r} is registered twice ({METHODS[name].__qualname__} and {cls!r})")
    METHODS[name] = cls
    for listener in _LISTENERS:
        listener(name, cls)
    return cls


def on_register(listener: Callable[[str, Any], None]) -> None:
    """Call ``listener(name, cls)`` for every method registered so far and for every one registered later."""
    _LISTENERS.append(listener)
    for name, cls in list(METHODS.items()):
        listener(name, cls)


def get_method(name: str) -> Any:
    """The converted-model class registered as ``name``.

    Raises:
        UserError: when no method of that name is registered (the message lists the known ones).
    """
    if name not in METHODS:
        raise UserError(f"method {name!r} is not known; available: {', '.join(sorted(METHODS))}")
    return METHODS[name]
