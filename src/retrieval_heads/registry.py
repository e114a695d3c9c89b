"""A small name -> object registry: errors on collisions, suggests close names on typos.

>>> r = Registry("colour")
>>> r.register("red", 1)
>>> r.get("red")
1
>>> r.get("rde")
Traceback (most recent call last):
...
retrieval_heads.errors.UserError: unknown colour 'rde' (did you mean 'red'?); choose from: red
>>> r.get("RED")
Traceback (most recent call last):
...
retrieval_heads.errors.UserError: unknown colour 'RED' (did you mean 'red'?); choose from: red
"""

from __future__ import annotations

import difflib
from typing import Generic, Iterator, TypeVar

from .errors import UserError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str, item: T) -> None:
        if name in self._items:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._items[name] = item

    def unregister(self, name: str) -> T:
        """Remove ``name`` (KeyError if it is not registered) and return what it held."""
        return self._items.pop(name)

    def get(self, name: str) -> T:
        if name in self._items:
            return self._items[name]
        hint = self.closest(name)
        hint = f" (did you mean {hint!r}?)" if hint else ""
        raise UserError(f"unknown {self.kind} {name!r}{hint}; choose from: {', '.join(self._items)}")

    def closest(self, name: object) -> str | None:
        """The registered name closest to ``name``: the same name in another case first ("SmolLM2" for
        "smollm2"), else the closest spelling, case ignored; None when nothing is close."""
        if not isinstance(name, str):
            return None
        folded = {n.casefold(): n for n in self._items}
        if name.casefold() in folded:
            return folded[name.casefold()]
        close = difflib.get_close_matches(name.casefold(), list(folded), n=1)
        return folded[close[0]] if close else None

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def names(self) -> list[str]:
        return list(self._items)
