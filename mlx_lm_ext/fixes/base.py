"""The mechanics every fix shares: replace, remember, restore.

mlx-lm modules import functions by name (`from .cache import make_prompt_cache`), so
replacing a function means replacing every binding of it. A Patcher records each
replacement with the object it displaced, refuses to displace an object it did not
expect (someone else patched first), and restores everything in reverse order.
"""

from __future__ import annotations

import sys
from typing import Any

_MISSING = object()


class PatchConflict(RuntimeError):
    """The attribute to patch is not the object the fix was written against."""


class Patcher:
    """One fix's replacements, undoable as a unit."""

    def __init__(self, fix_name: str):
        self.fix_name = fix_name
        self._undo: list[tuple[Any, str, Any]] = []

    def set(self, owner: Any, attr: str, new: Any, expected: Any = _MISSING) -> None:
        """Replace owner.attr with new, checking it currently is `expected` when given."""
        current = getattr(owner, attr, _MISSING)
        if expected is not _MISSING and current is not expected:
            raise PatchConflict(
                f"{self.fix_name}: {getattr(owner, '__name__', owner)}.{attr} is not the "
                "object this fix expects (patched by something else?); not applying"
            )
        # On a class, restore the raw attribute (a classmethod stays a classmethod, an
        # inherited one is deleted again) rather than what getattr bound.
        previous = vars(owner).get(attr, _MISSING) if isinstance(owner, type) else current
        self._undo.append((owner, attr, previous))
        setattr(owner, attr, new)

    def rebind(self, original: Any, new: Any, prefix: str = "mlx_lm") -> int:
        """Replace every module-level binding of `original` under `prefix`; returns count."""
        count = 0
        for name, module in list(sys.modules.items()):
            if module is None or not (name == prefix or name.startswith(prefix + ".")):
                continue
            for attr, value in list(vars(module).items()):
                if value is original:
                    self.set(module, attr, new, expected=original)
                    count += 1
        return count

    def defer(self, fn: Any) -> None:
        """Call fn() on undo, after the replacements made after this call are undone."""
        self._undo.append((None, fn, None))

    def undo(self) -> None:
        while self._undo:
            owner, attr, previous = self._undo.pop()
            if owner is None:
                attr()
            elif previous is _MISSING:
                delattr(owner, attr)
            else:
                setattr(owner, attr, previous)


class Fix:
    """One upstream gap: detect it, patch it, undo it.

    Subclasses set `name` (the slug shared with patches/NNNN-<name>.patch) and
    `summary`, and implement `needed()` by probing behaviour, never version strings.
    """

    name = ""
    summary = ""

    def needed(self) -> bool:
        raise NotImplementedError

    def install(self, patcher: Patcher) -> None:
        raise NotImplementedError
