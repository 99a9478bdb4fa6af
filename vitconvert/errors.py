"""The one exception type that means "the user asked for something wrong".

The CLI turns a :class:`UserError` into a single line on stderr and exit code 2; everything else is a bug
and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the user's input: the message says what is wrong and how to fix it."""


class AnatomyError(UserError):
    """The fx reader could not find a part a method needs in the given model."""
