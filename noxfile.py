"""Sessions: compat (the release matrix), tests (unit), lint.

nox -s compat                    every release x every models.yaml family, offline tier
nox -s compat -- gemma-4         only ids matching gemma-4 (other args go to pytest)
nox -s "compat(mlx_lm='0.31.3')" -- gemma-3 -m "not slow"
MLX_LM_EXT_DELIVERY=upstream nox -s compat   the same tests on unpatched mlx-lm
"""

from __future__ import annotations

import platform

import nox

nox.options.default_venv_backend = "uv|virtualenv"
nox.options.sessions = ["lint", "tests", "compat"]  # baseline runs on demand

# mlx-lm release -> the mlx release it is tested with (the newest of the mlx series the
# release was built against; on Linux mlx-lm does not depend on mlx, so we pin it).
RELEASES = {
    "0.32.2": "0.32.4",  # newest; server has --kv-bits (0.32.0+)
    "0.31.3": "0.31.2",  # last release without server kv flags; has gemma4_text (0.31.2+)
    "0.30.7": "0.30.6",  # first with qwen3_5_moe
    "0.29.1": "0.29.4",  # newest release that installs with transformers 4.x
}
# Releases before 0.30 require transformers>=4.39 but were never run against 5.x.
TRANSFORMERS = {"0.29.1": "transformers>=4.39,<5"}
PROJECT_DEPS = ["pyyaml>=6", "huggingface-hub>=0.24", "tokenizers>=0.19", "pytest>=8", "pytest-xdist>=3"]


def _mlx(version: str) -> str:
    return f"mlx[cpu]=={version}" if platform.system() == "Linux" else f"mlx=={version}"


def _install_release(session: nox.Session, mlx_lm: str) -> None:
    """One mlx-lm release, its mlx, and this project without touching either."""
    extra = [TRANSFORMERS[mlx_lm]] if mlx_lm in TRANSFORMERS else []
    session.install(_mlx(RELEASES[mlx_lm]), f"mlx-lm=={mlx_lm}", *extra, *PROJECT_DEPS)
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
    session.install("ruff")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
@nox.parametrize("mlx_lm", list(RELEASES))
def baseline(session: nox.Session, mlx_lm: str) -> None:
    """Probe unpatched mlx-lm on every family; JSON for the README's baseline table."""
    _install_release(session, mlx_lm)
    out = f"benchmarks/results/baseline/{mlx_lm}.json"
    session.run("python", "benchmarks/baseline.py", "run", "--json", out, *session.posargs)
