"""The exceptions that mean "the user asked for something wrong" or "the user stopped it".

The CLI turns a :class:`UserError` into a single line on stderr and exit code 2, and an :class:`Interrupted`
(or any Ctrl-C) into a single line and exit code 130; everything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the user's input: the message says what is wrong and how to fix it."""


class AnatomyError(UserError):
    """The fx reader could not find a part a method needs in the given model."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a long run; the message says what was kept and how to continue.

    A KeyboardInterrupt, so callers that stop on Ctrl-C still stop.
    """


def one_line(message: object) -> str:
    """A message on one line (third-party errors often span several)."""
    return " ".join(str(message).split())
