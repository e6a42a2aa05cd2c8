"""mlx-lm-ext's sessions. `nox -l` lists them; a plain `nox` runs lint, tests and compat.

nox -s compat                    every release x every models.yaml family, offline tier
nox -s compat -- gemma-4         only ids matching gemma-4 (other args go to pytest)
nox -s "compat(mlx_lm='0.31.3')" -- gemma-3 -m "not slow"
MLX_LM_EXT_DELIVERY=upstream nox -s compat   the same tests on unpatched mlx-lm
nox -s patches                   apply patches/ to the newest release's sdist and prove it
nox -s patches -- --release 0.31.3   which patches apply to another release (then prove it)
nox -s baseline                  what unpatched mlx-lm does on every family, per release
nox -s soak                      the server under load and faults, full counts (CI: short)
nox -s distributed               2 ranks under mlx.launch (ring, localhost): tensor and pipeline
"""

from __future__ import annotations

import importlib.util
import platform
from pathlib import Path

import nox

nox.options.default_venv_backend = "uv|virtualenv"


def _load_releases():
    """mlx_lm_ext/releases.py by path: nox's own environment has no mlx to import the package."""
    path = Path(__file__).parent / "mlx_lm_ext" / "releases.py"
    spec = importlib.util.spec_from_file_location("mlx_lm_ext_releases", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


releases = _load_releases()
RELEASES = releases.RELEASES


def _install_release(session: nox.Session, mlx_lm: str) -> None:
    """One mlx-lm release, its mlx, and this project without touching either."""
    session.install(f"mlx-lm=={mlx_lm}", *releases.release_requirements(mlx_lm, platform.system()))
    session.install("--no-deps", "-e", ".")


def _split(posargs: list[str]) -> list[str]:
    """A leading bare word selects models; everything else is passed to pytest."""
    if posargs and not posargs[0].startswith("-"):
        return ["--models", posargs[0], *posargs[1:]]
    return list(posargs)


@nox.session
@nox.parametrize("mlx_lm", list(RELEASES))
def compat(session: nox.Session, mlx_lm: str) -> None:
    """The compatibility suite on one mlx-lm release, in a clean environment."""
    _install_release(session, mlx_lm)
    session.run(
        "python",
        "-c",
        "import mlx_lm, mlx.core as mx; print('mlx-lm', mlx_lm.__version__, 'mlx', mx.__version__)",
    )
    session.run("pytest", "compat_tests", "-p", "no:cacheprovider", *_split(session.posargs))


@nox.session
def tests(session: nox.Session) -> None:
    """mlx_lm_ext's own unit tests on the newest release."""
    session.install("-e", ".[test]")
    session.run("pytest", "tests", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff check and ruff format --check over the whole tree."""
    session.install("ruff")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session(default=False)
@nox.parametrize("mlx_lm", list(RELEASES))
def baseline(session: nox.Session, mlx_lm: str) -> None:
    """Probe unpatched mlx-lm on every family; writes benchmarks/results/baseline/<release>.json."""
    _install_release(session, mlx_lm)
    out = f"benchmarks/results/baseline/{mlx_lm}.json"
    session.run("python", "benchmarks/baseline.py", "run", "--json", out, *session.posargs)


@nox.session(default=False)
def patches(session: nox.Session) -> None:
    """The patch series: check, apply, upstream's tests before/after, compat suite both ways;
    writes benchmarks/results/patches/<release>.{json,md}."""
    _install_release(session, releases.NEWEST)
    session.run("python", "-m", "mlx_lm_ext.upstream", "apply", *session.posargs)


@nox.session(default=False)
def distributed(session: nox.Session) -> None:
    """Quantized KV across ranks: mlx.launch with the ring backend, 2 ranks on localhost
    (3 for the real SmolLM2): sharded generation against one process, the server across
    ranks, refusals on every rank (compat_tests/test_distributed.py)."""
    _install_release(session, releases.NEWEST)
    session.run(
        "pytest", "-m", "distributed", "compat_tests/test_distributed.py", "-p", "no:cacheprovider",
        *_split(session.posargs),
    )  # fmt: skip


@nox.session(default=False)
def soak(session: nox.Session) -> None:
    """The server under load, faults and bad input at full counts (test_reliability.py,
    --soak full: 200 mixed requests, 20 cut streams, 500 for memory, per server row);
    figures to benchmarks/results/soak/<platform>.json. CI runs the short version."""
    session.install("-e", ".[test]")
    out = Path("benchmarks/results/soak")
    out.mkdir(parents=True, exist_ok=True)
    report = out / f"{platform.system().lower()}-{platform.machine()}.json"
    session.run(
        "pytest", "compat_tests/test_reliability.py", "--soak", "full", "--soak-report", str(report),
        "-p", "no:cacheprovider", *session.posargs,
    )  # fmt: skip
