"""The mechanics every fix shares: replace, remember, restore.

mlx-lm modules import functions by name (`from .cache import make_prompt_cache`), so
replacing a function means replacing every binding of it. A Patcher records each
replacement with the object it displaced (`original` hands it back to the replacement
that wraps it), refuses to displace an object it did not expect (someone else patched
first), and restores everything in reverse order. A Fix owns its Patcher and any state
its replacements keep while applied; `revert` undoes the one and clears the other.
"""

from __future__ import annotations

import importlib
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
        self._originals: dict[tuple[int, str], tuple[Any, Any]] = {}

    def set(self, owner: Any, attr: str, new: Any, expected: Any = _MISSING) -> Any:
        """Replace owner.attr with new, checking it currently is `expected` when given.

        Returns what owner.attr gave before (None where it had none): the object a
        replacement wraps. `original(owner, attr)` returns the same later.
        """
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
        replaced = None if current is _MISSING else current
        self._originals.setdefault((id(owner), attr), (owner, replaced))
        setattr(owner, attr, new)
        return replaced

    def original(self, owner: Any, attr: str) -> Any:
        """What owner.attr was before this Patcher first replaced it."""
        try:
            return self._originals[(id(owner), attr)][1]
        except KeyError:
            name = getattr(owner, "__name__", type(owner).__name__)
            raise LookupError(f"{self.fix_name} did not replace {name}.{attr}") from None

    def rebind(self, original: Any, new: Any, prefix: str = "mlx_lm") -> int:
        """Replace every module-level binding of `original` under `prefix`; returns count.

        A module imported while the fix is applied (mlx_lm.load imports a model's module
        on first use) copies `new` by name; undo hands those copies the original too.
        """
        bound = _bindings(original, prefix)
        for module, attr in bound:
            self.set(module, attr, new, expected=original)
        self.defer(lambda: _replace_everywhere(new, original, prefix))
        return len(bound)

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
        self._originals.clear()


def _bindings(obj: Any, prefix: str) -> list[tuple[Any, str]]:
    """(module, name) of every module-level binding of `obj` in modules under `prefix`."""
    return [
        (module, attr)
        for name, module in list(sys.modules.items())
        if module is not None and (name == prefix or name.startswith(prefix + "."))
        for attr, value in list(vars(module).items())
        if value is obj
    ]


def _replace_everywhere(new: Any, original: Any, prefix: str) -> None:
    """Every module-level binding of `new` under `prefix` becomes `original` again."""
    for module, attr in _bindings(new, prefix):
        setattr(module, attr, original)


def generate_module() -> Any:
    """The module mlx_lm.generate (`from mlx_lm import generate` gives the function)."""
    return importlib.import_module("mlx_lm.generate")


class Fix:
    """One upstream gap: detect it, patch it, undo it.

    Subclasses set `name` (the slug shared with patches/NNNN-<name>.patch and the module's
    name; `patches` lists the slugs instead where the series carries one fix as several
    patches, one upstream PR each) and `summary`, implement `needed()` by probing
    behaviour, never version strings, and `install(patcher)`. Replacements reach what
    they wrap with `original(owner, attr)` and keep per-process memory (log-once sets,
    caches) in `state`; both go with `revert`.
    """

    name = ""
    summary = ""
    patches: tuple[str, ...] = ()

    @property
    def patch_slugs(self) -> tuple[str, ...]:
        """The slugs of the patch files that carry this fix in the series."""
        return self.patches or (self.name,)

    def __init__(self) -> None:
        self.patcher: Patcher | None = None
        self.state: dict[str, Any] = {}

    def needed(self) -> bool:
        raise NotImplementedError

    def install(self, patcher: Patcher) -> None:
        raise NotImplementedError

    @property
    def applied(self) -> bool:
        return self.patcher is not None

    def apply(self) -> None:
        """Install through a new Patcher; a failed install leaves nothing behind."""
        if self.patcher is not None:
            return
        patcher, self.state = Patcher(self.name), {}
        self.patcher = patcher  # replacements called during install see their originals
        try:
            self.install(patcher)
        except Exception:
            self.revert()
            raise

    def revert(self) -> None:
        """Undo every replacement and forget the state kept while applied."""
        if self.patcher is not None:
            self.patcher.undo()  # deferred calls may still need `original` and `state`
        self.patcher, self.state = None, {}

    def original(self, owner: Any, attr: str) -> Any:
        """The object this fix replaced at owner.attr (while applied)."""
        if self.patcher is None:
            raise RuntimeError(f"{self.name} is not applied")
        return self.patcher.original(owner, attr)
