"""The patch series: a release's sdist under git, and the series applied, checked, exported.

`patches/series` lists the patch files in order; a comment line names the release the
series was last exported against. Each patch file is `git format-patch` output whose
name carries the slug of the monkeypatch that delivers the same change
(`0001-quantized-rotating-kv-cache.patch` <-> mlx_lm_ext/fixes/quantized_rotating_kv_cache.py).
"""

from __future__ import annotations

import email.utils
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

PATCHES = Path(__file__).resolve().parents[2] / "patches"
AUTHOR = ("mlx-lm-ext", "mlx-lm-ext@users.noreply.github.com")
DATE = "2026-11-23T00:00:00Z"  # fixed so that a refresh only changes what changed
_GIT_ENV = {
    "GIT_AUTHOR_NAME": AUTHOR[0],
    "GIT_AUTHOR_EMAIL": AUTHOR[1],
    "GIT_COMMITTER_NAME": AUTHOR[0],
    "GIT_COMMITTER_EMAIL": AUTHOR[1],
    "GIT_AUTHOR_DATE": DATE,
    "GIT_COMMITTER_DATE": DATE,
}


class SeriesError(RuntimeError):
    """The series cannot be read, applied or exported; the message says where."""


@dataclass(frozen=True)
class Failure:
    """One patch that does not apply: each hunk that fails, against which file and line."""

    patch: str
    hunks: tuple[tuple[str, int | None, str], ...]  # (file, line, "@@ ... @@ context")

    def __str__(self) -> str:
        rows = [f"{self.patch} does not apply:"]
        rows += [f"    {file}:{line or '?'}: hunk `{hunk}`" for file, line, hunk in self.hunks]
        return "\n".join(rows)


def git(tree: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        ["git", *args], cwd=tree, capture_output=True, text=True, env={**os.environ, **_GIT_ENV}
    )
    if check and proc.returncode:
        raise SeriesError(f"git {' '.join(args)} failed in {tree}:\n{proc.stderr.strip()}")
    return proc


def read_series(patches: Path = PATCHES) -> tuple[list[str], str | None]:
    """(patch file names in order, the release named in the header comment)."""
    names, release = [], None
    for line in (patches / "series").read_text().splitlines():
        line = line.strip()
        if match := re.match(r"#\s*against mlx-lm (\S+)", line):
            release = match.group(1)
        elif line and not line.startswith("#"):
            names.append(line)
    return names, release


def slug(name: str) -> str:
    """0003-quantized-attention.patch -> quantized-attention."""
    return re.sub(r"^\d+-|\.patch$", "", name)


def fetch_sdist(release: str, dest: Path) -> Path:
    """Download mlx-lm==release's sdist from the package index and unpack it under dest."""
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "-q",
            "--no-deps",
            "--no-binary",
            ":all:",
            f"mlx-lm=={release}",
            "-d",
            str(dest),
        ],
        check=True,
    )
    archive = next(dest.glob(f"mlx_lm-{release}.tar.gz"))
    with tarfile.open(archive) as tar:
        tar.extractall(dest, filter="data")
    return dest / f"mlx_lm-{release}"


def base_tree(release: str, dest: Path) -> Path:
    """The release's sdist as a git repository with one commit, tagged `base`."""
    tree = fetch_sdist(release, dest)
    git(tree, "init", "-q")
    git(tree, "add", "-A")
    git(tree, "commit", "-q", "-m", f"mlx-lm {release}")
    git(tree, "tag", "base")
    return tree


def check(tree: Path, patches: Path = PATCHES) -> tuple[list[str], list[Failure]]:
    """`git apply --check` each patch in order on a scratch worktree of the tree's HEAD;
    returns (applied, failures) and leaves the tree itself untouched.

    A patch that fails is reported and skipped, so later independent patches are still
    tried (a report of which patches apply to another release).
    """
    names, _ = read_series(patches)
    applied, failures = [], []
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp) / "check"
        git(tree, "worktree", "add", "-q", "--detach", str(scratch), "HEAD")
        try:
            for name in names:
                patch = patches / name
                proc = git(scratch, "apply", "--check", "-v", str(patch), check=False)
                if proc.returncode:
                    failures.append(_failure(name, patch, proc.stderr))
                    continue
                git(scratch, "apply", str(patch))
                applied.append(name)
        finally:
            git(tree, "worktree", "remove", "--force", str(scratch))
    return applied, failures


def _failure(name: str, patch: Path, stderr: str) -> Failure:
    """Every hunk git reports as failing, with its header from the patch file."""
    failed = [(m.group(1), int(m.group(2))) for m in re.finditer(r"patch failed: (\S+):(\d+)", stderr)]
    failed += [(m.group(1), None) for m in re.finditer(r"error: (\S+): does not exist in index", stderr)]
    headers: dict[tuple[str, int], str] = {}
    current = None
    for text in patch.read_text().splitlines():
        if text.startswith("+++ b/"):
            current = text[6:]
        elif text.startswith("@@") and (start := re.match(r"@@ -(\d+)", text)):
            headers[(current, int(start.group(1)))] = text
    hunks = tuple((file, line, headers.get((file, line), "?")) for file, line in failed)
    return Failure(name, hunks or (("?", None, stderr.strip().splitlines()[-1] if stderr.strip() else "?"),))


def apply(tree: Path, patches: Path = PATCHES) -> list[str]:
    """`git am` the whole series onto the tree; raises SeriesError naming the patch."""
    names, _ = read_series(patches)
    for name in names:
        proc = git(tree, "am", "-q", "--3way", str(patches / name), check=False)
        if proc.returncode:
            git(tree, "am", "--abort", check=False)
            raise SeriesError(f"{name} does not apply:\n{proc.stderr.strip() or proc.stdout.strip()}")
    return names


def _fixed_header(text: str) -> str:
    """The patch with the series' author and date, whoever made the commit and when, so
    that a refresh only changes what changed (format-patch copies the commit's own)."""
    head, sep, rest = text.partition("\nSubject: ")
    first = head.split("\n", 1)[0]  # "From <zero commit> Mon Sep 17 00:00:00 2001"
    date = email.utils.format_datetime(datetime.fromisoformat(DATE.replace("Z", "+00:00")))
    return f"{first}\nFrom: {AUTHOR[0]} <{AUTHOR[1]}>\nDate: {date}{sep}{rest}"


def export(tree: Path, release: str, names: list[str], patches: Path = PATCHES) -> list[Path]:
    """Write the tree's commits since `base` as the series, named by `names` (slugs)."""
    commits = git(tree, "rev-list", "--reverse", "base..HEAD").stdout.split()
    if len(commits) != len(names):
        raise SeriesError(f"{len(commits)} commits since base but {len(names)} series names: {names}")
    with tempfile.TemporaryDirectory() as out:
        git(tree, "format-patch", "-q", "--no-signature", "--zero-commit", "-o", out, "base..HEAD")
        produced = sorted(Path(out).glob("*.patch"))
        for old in patches.glob("*.patch"):
            old.unlink()
        written = []
        for i, (src, name) in enumerate(zip(produced, names, strict=True), 1):
            target = patches / f"{i:04d}-{slug(name)}.patch"
            target.write_text(_fixed_header(src.read_text()))
            written.append(target)
    lines = [f"# against mlx-lm {release}", "# apply with: git am <file> (or quilt: patches/series)"]
    (patches / "series").write_text("\n".join(lines + [p.name for p in written]) + "\n")
    return written
