"""Weights held once, used from several places: attributes outside the module tree, module views, tied members.

A converted model registers every weight once, under its timm name (``base.*``), so its state dict, ``.to()`` and
``parameters()`` see each tensor exactly once. Methods still need other handles on those weights: fx graphs that
call the base model's modules in a new order, the original block kept beside its replacement, the base model as
timm built it (a *view*: the same weights, other containers), per-forward state shared by a model and its layers.
Those must not be registered a second time. This module is how every method does it:

* :func:`attach` / :func:`detach`: plain attributes of a module, unknown to ``nn.Module``'s registries (a value that
  is itself a module is not a submodule); read them as ordinary attributes;
* :func:`module_view`: a root module with some submodules swapped, sharing everything else;
* :func:`tie_parameters`: make one model's parameters another's tensors where names and shapes match.

Deep copies follow: an attached object is copied along with the modules it refers to (one memo), so a copy's graphs
call the copy's weights.
"""

from __future__ import annotations

import copy
from typing import Any

from torch import nn


def attach(owner: nn.Module, **values: Any) -> None:
    """Set attributes on ``owner`` that ``nn.Module`` does not register (no state dict entry, no ``.to()``/``train()``
    traversal, not a submodule even when the value is a module)."""
    for name, value in values.items():
        object.__setattr__(owner, name, value)


def detach(owner: nn.Module, name: str) -> Any:
    """Remove an attribute set by :func:`attach` and return it (None if it was not set)."""
    return owner.__dict__.pop(name, None)


def module_view(root: nn.Module, replacements: dict[str, nn.Module]) -> tuple[nn.Module, list[nn.Module]]:
    """``root`` with the submodules at ``replacements``' paths swapped, sharing every parameter, buffer and other
    module with ``root``: the containers on those paths are shallow copies with their own child tables.

    Returns the view and the copied containers (their ``training`` flags must follow ``root``'s). Kept unregistered
    (:func:`attach`), the view is seen by no state dict and no ``.to()``; parameters are moved in place and buffer
    tables are shared, so it follows them.
    """
    copies: dict[int, nn.Module] = {}

    def copied(module: nn.Module) -> nn.Module:
        if id(module) not in copies:
            twin = copy.copy(module)
            object.__setattr__(twin, "_modules", dict(module._modules))
            copies[id(module)] = twin
        return copies[id(module)]

    view = copied(root)
    for path, replacement in replacements.items():
        *parents, leaf = path.split(".")
        node, original = view, root
        for name in parents:
            original = original._modules[name]
            node._modules[name] = copied(original)
            node = node._modules[name]
        node._modules[leaf] = replacement
    return view, list(copies.values())


def tie_parameters(model: nn.Module, params: dict[str, nn.Parameter]) -> None:
    """Make every parameter of ``model`` whose name and shape match one of ``params`` that very tensor (the state
    dict then lists it under both names; safetensors stores it once)."""
    for name, param in list(model.named_parameters()):
        shared = params.get(name)
        if shared is not None and shared.shape == param.shape:
            owner, _, attr = name.rpartition(".")
            setattr(model.get_submodule(owner) if owner else model, attr, shared)
