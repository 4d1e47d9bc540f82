"""Errors that reach the user.

A :class:`UserError` is a problem with what the user gave us (a config, a path, an
element): the CLI prints its message on one line and exits 2, never a traceback.
Anything else is a bug or a failed computation and is handled (and recorded) elsewhere.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user; ``str(err)`` is one line per problem."""

    def __init__(self, problems: str | list[str]):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


class StoreError(UserError):
    """The campaign store is missing, locked by another writer, or not a matdisc store."""
