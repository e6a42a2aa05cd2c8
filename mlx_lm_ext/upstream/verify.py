"""Prove the series: upstream's own tests before and after, and the compat suite on both deliveries.

One fresh virtual environment holds mlx, upstream's test dependencies and this project.
The unpatched sdist is installed first: upstream's `tests/` run on it, and the compat suite
runs with the monkeypatches applied. Then the patched tree replaces it: upstream's tests
(now with the tests the series adds) run again, and the compat suite runs with the
monkeypatches DISABLED (MLX_LM_EXT_DELIVERY=patches). Hub models named by upstream's tests
come from zoo stand-ins under the same repo ids, with HF_HUB_OFFLINE=1.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

from ..releases import release_requirements
from .standins import ensure_standins

PROJECT = Path(__file__).resolve().parents[2]
# Upstream's test extra is datasets, lm-eval, Pillow; lm-eval pulls in torch (GBs), so
# tests/test_evaluate.py is reported as not collected on both trees instead.
# pytest and pytest-xdist come with release_requirements.
UPSTREAM_TEST_DEPS = ["requests", "Pillow", "datasets"]
# This project goes in with --no-deps (mlx-lm is swapped in and out): its own other
# dependency, for the zoo's real models converted from GGUF files (pyproject.toml).
PROJECT_DEPS = ["gguf>=0.10"]
RUNS = ("upstream-unpatched", "compat-monkeypatch", "upstream-patched", "compat-patches")


@dataclass
class Run:
    """Outcome per test id of one pytest run."""

    label: str
    outcomes: dict[str, str] = field(default_factory=dict)
    messages: dict[str, str] = field(default_factory=dict)
    # what each test recorded with record_property (KL, top-1, bytes), as numbers
    figures: dict[str, dict[str, float]] = field(default_factory=dict)

    def ids(self, outcome: str) -> set[str]:
        return {t for t, o in self.outcomes.items() if o == outcome}

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for o in self.outcomes.values():
            out[o] = out.get(o, 0) + 1
        return out


class Environment:
    """A fresh venv; mlx-lm is swapped in and out of it."""

    def __init__(self, root: Path, release: str):
        self.root = root
        self.python = root / "bin" / "python"
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(root)], check=True)
        self.pip("install", "-q", "--upgrade", "pip")
        requirements = release_requirements(release, platform.system())
        self.pip("install", "-q", *requirements, *UPSTREAM_TEST_DEPS, *PROJECT_DEPS)

    def pip(self, *args: str) -> None:
        subprocess.run([str(self.python), "-m", "pip", *args], check=True)

    def install_mlx_lm(self, tree: Path, first: bool) -> None:
        """Install a source tree of mlx-lm (with its dependencies the first time)."""
        if first:
            self.pip("install", "-q", str(tree))
            self.pip("install", "-q", "--no-deps", "-e", str(PROJECT))
        else:
            self.pip("install", "-q", "--no-deps", "--force-reinstall", str(tree))

    def pytest(self, label: str, cwd: Path, args: list[str], env: dict[str, str], report: Path) -> Run:
        cmd = [
            str(self.python),
            "-m",
            "pytest",
            "-p",
            "no:cacheprovider",
            "-q",
            "-n",
            "2",
            f"--junitxml={report}",
            "-o",
            "junit_family=legacy",  # keeps record_property's figures without a warning
            *args,
        ]
        print(f"[{label}] {' '.join(cmd)} (in {cwd})", flush=True)
        proc = subprocess.run(cmd, cwd=cwd, env={**os.environ, **env}, capture_output=True, text=True)
        (report.with_suffix(".log")).write_text(proc.stdout + proc.stderr)
        tail = (proc.stdout.strip().splitlines() or ["(no output)"])[-1]
        print(f"[{label}] {tail}", flush=True)
        return parse_junit(label, report)


def parse_junit(label: str, path: Path) -> Run:
    run = Run(label)
    if not path.exists():
        return run
    for case in ET.parse(path).getroot().iter("testcase"):
        test = f"{case.get('classname')}::{case.get('name')}"
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error"):
                outcome, message = "failed", child.get("message") or child.tag
            elif child.tag == "skipped" and outcome == "passed":
                outcome, message = "skipped", child.get("message") or ""
        if run.outcomes.get(test) != "failed":  # subtests report a case more than once
            run.outcomes[test], run.messages[test] = outcome, message
        figures = _figures(case)
        if figures:
            run.figures[test] = figures
    return run


def _figures(case: ET.Element) -> dict[str, float]:
    """The numeric <property> values of a <testcase> (record_property)."""
    out = {}
    for prop in case.iter("property"):
        try:
            out[prop.get("name")] = float(prop.get("value"))
        except (TypeError, ValueError):
            continue
    return out


def upstream_tests(env: Environment, tree: Path, work: Path, label: str, hf: Path) -> Run:
    """Upstream's tests/ from `tree`, run against the installed package, offline."""
    run_dir = work / f"tests-{label}"
    shutil.rmtree(run_dir, ignore_errors=True)
    shutil.copytree(tree / "tests", run_dir / "tests")
    offline = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hf), "TRANSFORMERS_OFFLINE": "1"}
    return env.pytest(label, run_dir, ["tests"], offline, work / f"{label}.xml")


def compat_suite(env: Environment, delivery: str, work: Path, args: list[str]) -> Run:
    label = f"compat-{delivery}"
    extra = {"MLX_LM_EXT_DELIVERY": delivery}
    return env.pytest(label, PROJECT, ["compat_tests", *args], extra, work / f"{label}.xml")


def verify(release: str, unpatched: Path, patched: Path, work: Path, compat_args: list[str]) -> dict:
    """Run everything; returns the report (see report.py)."""
    hf = ensure_standins(work / "hf")
    env = Environment(work / "venv", release)
    env.install_mlx_lm(unpatched, first=True)
    runs = {"upstream-unpatched": upstream_tests(env, unpatched, work, "upstream-unpatched", hf)}
    runs["compat-monkeypatch"] = compat_suite(env, "monkeypatch", work, compat_args)
    env.install_mlx_lm(patched, first=False)
    runs["upstream-patched"] = upstream_tests(env, patched, work, "upstream-patched", hf)
    runs["compat-patches"] = compat_suite(env, "patches", work, compat_args)
    return runs
