"""User-facing errors.

A :class:`UserError` means the user asked for something impossible (bad path, unknown model,
corrupt image, contradictory flags). Scripts catch it, print its message as one line and exit
with status 2 before any long work starts; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations


class UserError(Exception):
    """An error caused by user input, reported as a single line without a traceback."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))  # always one line
