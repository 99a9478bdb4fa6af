"""A griffe extension for the API reference: Sphinx roles in docstrings become links, ``Example:`` an example.

vitconvert's docstrings are Google style but cross-reference with Sphinx roles (``:func:`load```,
``:class:`~vitconvert.operating.Knob```), which Markdown would print as they are. Before a docstring is
parsed, each role becomes an *optional* mkdocs-autorefs reference: a link when the target is documented on
some page of the site, plain code when it is not (so a reference to a private helper never fails the strict
build). A ``~`` prefix shows only the last part of the name, as in Sphinx.

Google-style parsing in griffe reads an ``Examples:`` section as code (``>>>`` lines) but ``Example:`` as a
plain admonition, where ``>>>`` would turn into nested quotes; the docstrings say ``Example:``, so it is read
as ``Examples:``.

Loaded by ``mkdocs.yml`` (``plugins: mkdocstrings: handlers: python: options: extensions``).
"""

from __future__ import annotations

import html
import re
from typing import Any

import griffe

EXAMPLE_HEADING = re.compile(r"^(\s*)Example:[ \t]*$", re.MULTILINE)
ROLE = re.compile(r":(?:py:)?(?:func|class|meth|mod|data|attr|exc|obj|const):`(?P<target>[^`]+)`")


def resolve(obj: griffe.Object, name: str) -> str:
    """The full path of ``name`` as seen from ``obj``'s scope (``name`` itself when it cannot be resolved)."""
    if name.startswith("vitconvert.") or name == "vitconvert":
        return name
    head, _, tail = name.partition(".")
    scope: griffe.Object | None = obj if obj.is_class or obj.is_module else obj.parent
    while scope is not None:
        try:
            path = scope.resolve(head)
        except (griffe.NameResolutionError, AttributeError):
            scope = scope.parent
            continue
        return f"{path}.{tail}" if tail else path
    return name


def rewrite(obj: griffe.Object, text: str) -> str:
    def replace(match: re.Match[str]) -> str:
        target = match["target"].strip()
        short = target.startswith("~")
        target = target.lstrip("~").rstrip("()")
        title = target.rsplit(".", 1)[-1] if short else target
        identifier = html.escape(resolve(obj, target), quote=True)
        return f'<autoref identifier="{identifier}" optional><code>{html.escape(title)}</code></autoref>'

    return EXAMPLE_HEADING.sub(r"\1Examples:", ROLE.sub(replace, text))


class SphinxRoles(griffe.Extension):
    """Rewrite Sphinx cross-reference roles in the docstrings of every object of a loaded package."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        todo: list[griffe.Object] = [pkg]
        while todo:
            obj = todo.pop()
            if obj.docstring is not None:
                obj.docstring.value = rewrite(obj, obj.docstring.value)
            todo.extend(member for member in obj.members.values() if not member.is_alias)
