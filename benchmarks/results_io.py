"""What every benchmark script prints and keeps: the machine line, the JSON, the markdown."""

from __future__ import annotations

import json
import platform
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlx.core as mx


def machine() -> str:
    """`x86_64 Linux, mlx 0.32.4 (Device(cpu, 0))`: where a result was measured."""
    return f"{platform.machine()} {platform.system()}, mlx {mx.__version__} ({mx.default_device()})"


def header(model: str) -> dict[str, str]:
    """What every result starts with: the model, the machine, the mlx-lm release."""
    from importlib.metadata import version

    return {"model": model, "machine": machine(), "mlx_lm": version("mlx-lm")}


def title(result: dict[str, Any]) -> str:
    """`model; machine; mlx-lm X`: where a table's figures come from, its first line."""
    return f"{result['model']}; {result['machine']}; mlx-lm {result['mlx_lm']}"


def kv_label(bits: int | None) -> str:
    """`16-bit` or `8-bit`: a table's KV column."""
    return "16-bit" if bits is None else f"{bits}-bit"


def emit(result: dict[str, Any], path: Path | None, markdown: Callable[[dict[str, Any]], str]) -> None:
    """Write the result as JSON to `path` (when given) and print its markdown table."""
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1) + "\n")
    print(markdown(result))
