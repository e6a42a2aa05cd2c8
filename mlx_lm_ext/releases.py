"""The mlx-lm releases this project supports, and what each needs beside it.

Read by noxfile.py (by path: nox's own environment has no mlx) and by the patch-series
tool, so the matrix is written down once.
"""

# mlx-lm release -> the mlx release it is tested with (the newest of the mlx series the
# release was built against; on Linux mlx-lm does not depend on mlx, so we pin it).
RELEASES = {
    "0.32.2": "0.32.4",  # newest; server has --kv-bits (0.32.0+)
    "0.31.3": "0.31.2",  # last release without server kv flags; has gemma4_text (0.31.2+)
    "0.30.7": "0.30.6",  # first with qwen3_5_moe
    "0.29.1": "0.29.4",  # newest release that installs with transformers 4.x
}
NEWEST = next(iter(RELEASES))
# Releases before 0.30 require transformers>=4.39 but were never run against 5.x.
TRANSFORMERS = {"0.29.1": "transformers>=4.39,<5"}
PROJECT_DEPS = ["pyyaml>=6", "huggingface-hub>=0.24", "tokenizers>=0.19", "pytest>=8", "pytest-xdist>=3"]


def mlx_requirement(mlx_lm: str, system: str) -> str:
    """The mlx pin for an mlx-lm release: the CPU build on Linux, Metal on macOS."""
    mlx = RELEASES.get(mlx_lm, RELEASES[NEWEST])
    return f"mlx[cpu]=={mlx}" if system == "Linux" else f"mlx=={mlx}"


def release_requirements(mlx_lm: str, system: str) -> list[str]:
    """Everything an environment for `mlx_lm` needs besides mlx-lm itself and this project."""
    extra = [TRANSFORMERS[mlx_lm]] if mlx_lm in TRANSFORMERS else []
    return [mlx_requirement(mlx_lm, system), *extra, *PROJECT_DEPS]
