"""One code path, two tiers: a models.yaml entry -> a local model folder.

Both tiers end in `huggingface_hub.snapshot_download`: the `hub` tier downloads the real
repository; the `offline` tier builds the stand-in into a local cache and resolves it
with `local_files_only=True`. Callers then load the folder with the real `mlx_lm.load`.
"""

from __future__ import annotations

from pathlib import Path

from .build import cache_home, ensure_built, repo_id
from .catalog import ModelEntry

TIERS = ("offline", "hub")


class HubUnavailable(RuntimeError):
    """The hub could not be reached; hub-tier tests skip with this reason."""


def resolve(entry: ModelEntry, tier: str = "offline", seed: int = 0) -> Path:
    """Return the local folder of the entry's model for the tier."""
    from huggingface_hub import snapshot_download

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
