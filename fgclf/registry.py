"""A tiny name -> factory registry with close-match suggestions for unknown names."""
from __future__ import annotations

import difflib
from typing import Callable, Generic, TypeVar

from fgclf.errors import UserError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to factories; ``get`` of an unknown name raises a UserError with suggestions."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, Callable[..., T]] = {}

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        def deco(fn: Callable[..., T]) -> Callable[..., T]:
            if name in self._items:
                raise ValueError(f"{self.kind} '{name}' registered twice")
            self._items[name] = fn
            return fn
        return deco

    def names(self) -> list[str]:
        return sorted(self._items)

    def get(self, name: str) -> Callable[..., T]:
        if name not in self._items:
            raise UserError(unknown_name_message(self.kind, name, self.names()))
        return self._items[name]

    def __contains__(self, name: str) -> bool:
        return name in self._items


def unknown_name_message(kind: str, name: str, known: list[str]) -> str:
    """``unknown loss 'focall'; did you mean: focal?`` (or the known list when nothing is close)."""
    close = difflib.get_close_matches(name, known, n=5, cutoff=0.5)
    if close:
        return f"unknown {kind} '{name}'; did you mean: {', '.join(close)}?"
    shown = ", ".join(known[:20]) + (", ..." if len(known) > 20 else "")
    return f"unknown {kind} '{name}'; known: {shown}"
