"""python -m mlx_lm_ext.upstream check|apply|refresh (see the package docstring)."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

from . import series
from .replaced import replaced_tests
from .report import compare, markdown
from .verify import PROJECT, RUNS, parse_junit, verify

RESULTS = PROJECT / "benchmarks" / "results" / "patches"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m mlx_lm_ext.upstream", description=__doc__)
    parser.add_argument("command", choices=["check", "apply", "refresh", "report"])
    parser.add_argument("--release", help="mlx-lm release (default: the one patches/series names)")
    parser.add_argument("--work", type=Path, help="working folder to keep (default: a temporary one)")
    parser.add_argument("--tree", type=Path, help="apply: also leave the patched git tree here")
    parser.add_argument("--from", dest="source", type=Path, help="refresh: export this tree's commits")
    parser.add_argument("--check-only", action="store_true", help="apply: stop after applying")
    parser.add_argument("compat_args", nargs="*", help="apply: arguments for the compat suite's pytest")
    return parser


def _check(tree: Path, release: str) -> list[str]:
    applied, failures = series.check(tree)
    names, _ = series.read_series()
    for name in names:
        print(f"  {'applies' if name in applied else 'FAILS  '}  {name}")
    for failure in failures:
        print(failure, file=sys.stderr)
    print(f"mlx-lm {release}: {len(applied)} of {len(names)} patches apply")
    return [f.patch for f in failures]


def _apply(args, tree: Path, work: Path, release: str) -> int:
    if _check(tree, release):
        return 1
    unpatched = work / "unpatched"
    shutil.copytree(tree, unpatched, ignore=shutil.ignore_patterns(".git"))
    applied = series.apply(tree)
    if args.tree:
        shutil.copytree(tree, args.tree, dirs_exist_ok=True)
        print(f"patched tree (git, tag `base` = the release): {args.tree}")
    if args.check_only:
        return 0
    # Installed from copies without .git: setuptools-scm would version a git tree 0.1.devN.
    patched = work / "patched"
    shutil.copytree(tree, patched, ignore=shutil.ignore_patterns(".git"))
    return _report(release, applied, verify(release, unpatched, patched, work, args.compat_args))


def _report(release: str, applied: list[str], runs: dict) -> int:
    """Write benchmarks/results/patches/<release>.{json,md}; 0 when the series is proven."""
    result = compare(runs, replaced_tests([series.PATCHES / name for name in applied]))
    RESULTS.mkdir(parents=True, exist_ok=True)
    full = {**result, "applied": applied, "outcomes": {label: run.outcomes for label, run in runs.items()}}
    (RESULTS / f"{release}.json").write_text(json.dumps(full, indent=1, sort_keys=True) + "\n")
    text = markdown(release, applied, result)
    (RESULTS / f"{release}.md").write_text(text)
    print(text)
    return 0 if result["ok"] else 1


def _refresh(tree: Path, release: str) -> int:
    """Export the commits of `tree` since its `base` tag as patches/, named as the series."""
    names, _ = series.read_series()
    written = series.export(tree, release, names)
    print("\n".join(str(p) for p in written))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "report" and args.work is None:
        parser.error("report needs --work DIR, the folder of an earlier `apply --work DIR`")
    names, series_release = series.read_series()
    release = args.release or series_release
    work = args.work or Path(tempfile.mkdtemp(prefix="mlx-lm-ext-patches-"))
    if args.command == "report":  # re-render an `apply --work DIR` run from its junit files
        return _report(release, names, {label: parse_junit(label, work / f"{label}.xml") for label in RUNS})
    if args.command == "refresh" and args.source is not None:
        return _refresh(args.source, release)
    tree = series.base_tree(release, work / "sdist")
    if args.command == "check":
        return 1 if _check(tree, release) else 0
    if args.command == "apply":
        return _apply(args, tree, work, release)
    series.apply(tree)  # refresh onto a release: rebase the series with git am -3
    return _refresh(tree, release)


if __name__ == "__main__":
    sys.exit(main())
