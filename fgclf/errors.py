"""User-facing errors.

A :class:`UserError` means the user asked for something impossible (bad path, unknown model,
corrupt image, contradictory flags). Scripts catch it, print its message as one line and exit
with status 2 before any long work starts; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import re

ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)")  # CSI (colours) and OSC codes


class UserError(Exception):
    """An error caused by user input, reported as a single line without a traceback."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))  # always one line


def message_line(err: object, limit: int = 200, last: bool = False) -> str:
    """One line of an error's message for a one-line report: the first (or ``last``) non-empty line,
    without terminal codes (torch.onnx colours its own), at most ``limit`` characters; the error's type
    name when its message is empty."""
    lines = [line.strip() for line in ANSI.sub("", str(err)).splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    return (lines[-1] if last else lines[0])[:limit]


def error_line(err: BaseException, limit: int = 200) -> str:
    """``Type: first line of the message`` (just ``Type`` when the message is empty)."""
    line = message_line(err, limit)
    return type(err).__name__ if line == type(err).__name__ else f"{type(err).__name__}: {line}"
