"""Upstream tests the series removes or renames, read from the series' own diffs.

An upstream PR that changes a behaviour changes the test that pinned it (0009 turns
`test_quantized_kv_disables_batching` into `test_quantized_kv_batches`). Such a test
passes unpatched and is gone patched, which is not a regression: the verdict lists it
as replaced, old -> new. A test that still exists patched and fails is still red.
"""

from __future__ import annotations

import re
from pathlib import Path

_FILE = re.compile(r"^diff --git a/(tests/\S+)\.py b/")
_HUNK = re.compile(r"^@@ [^@]* @@ ?(.*)$")
_CLASS = re.compile(r"^class (\w+)")
_DEF = re.compile(r"^([+-])(\s*)def (test\w*)\(")


def replaced_tests(patches: list[Path]) -> dict[str, str | None]:
    """{removed test: the test added in its place, or None}, as `module.Class::name`
    (`module::name` where the diff does not show the class)."""
    out: dict[str, str | None] = {}
    for patch in patches:
        out.update(_in_diff(patch.read_text()))
    return out


def _in_diff(text: str) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    module, cls, removed, added = None, None, [], []

    def close_hunk() -> None:
        for i, old in enumerate(removed):
            new = added[i] if i < len(added) else None
            if new != old:
                out[_test_id(module, cls, old)] = None if new is None else _test_id(module, cls, new)
        removed.clear()
        added.clear()

    for line in text.splitlines():
        if m := _FILE.match(line):
            close_hunk()
            module, cls = m.group(1).replace("/", "."), None
        elif module and (m := _HUNK.match(line)):
            close_hunk()
            cls = _enclosing_class(m.group(1)) or cls
        elif module and (m := _CLASS.match(line[1:]) if line[:1] in " +-" else None):
            cls = m.group(1)
        elif module and (m := _DEF.match(line)):
            (removed if m.group(1) == "-" else added).append(m.group(3))
    close_hunk()
    return out


def _enclosing_class(context: str) -> str | None:
    m = _CLASS.match(context)
    return m.group(1) if m else None


def _test_id(module: str, cls: str | None, name: str) -> str:
    return f"{module}.{cls}::{name}" if cls else f"{module}::{name}"


def split_regressions(lost: list[str], after_ids: set[str], replaced: dict[str, str | None]):
    """(regressions, {old: new}) of tests that passed unpatched and not patched: those
    the series removed (absent patched) are replaced, every other one is a regression."""
    regressions, moved = [], {}
    for test in lost:
        key = test if test in replaced else _by_name(test, replaced)
        if key is not None and test not in after_ids:
            moved[test] = replaced[key]
        else:
            regressions.append(test)
    return regressions, moved


def _by_name(test: str, replaced: dict[str, str | None]) -> str | None:
    """A diff whose hunk showed no class names its test `module::name`."""
    module, _, name = test.partition("::")
    short = f"{module.rsplit('.', 1)[0]}::{name}"
    return short if short in replaced else None
