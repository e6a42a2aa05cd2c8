"""Offline stand-ins: tiny real architectures written as normal model folders.

The Hugging Face hub is not always reachable (CI, air-gapped machines), yet the suite
must exercise the real `mlx_lm.load` path, the real model classes and the real cache
layouts. So each models.yaml entry is built here: the real mlx-lm `Model` class with
seeded random weights, `config.json`, `model.safetensors` and a real tokenizer, written
into a local Hugging Face cache under a repo id of its own, so `snapshot_download(...,
local_files_only=True)` resolves it exactly as it resolves a downloaded model.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any

from .catalog import ModelEntry
from .tokenizer import write_tokenizer

log = logging.getLogger("mlx_lm_ext")

BUILDER_VERSION = 3
ORG = "mlx-lm-ext"
# Keys every offline config gets unless the entry says otherwise.
COMMON: dict[str, Any] = {"rms_norm_eps": 1e-6, "max_position_embeddings": 131072}


def cache_home() -> Path:
    """Root of the local Hugging Face cache that holds the offline models."""
    env = os.environ.get("MLX_LM_EXT_HOME")
    base = Path(env) if env else Path.home() / ".cache" / "mlx-lm-ext"
    return base / "hub"


def repo_id(entry: ModelEntry) -> str:
    return f"{ORG}/tiny-{entry.id}"


def offline_config(entry: ModelEntry, vocab_size: int) -> dict[str, Any]:
    """The entry's tiny config with the tokenizer's vocabulary and token ids filled in."""
    config = copy.deepcopy(entry.offline_config)
    config["model_type"] = entry.model_type
    inner = config["text_config"] if "text_config" in config else config
    for key, value in COMMON.items():
        inner.setdefault(key, value)
    inner["vocab_size"] = vocab_size
    config.update({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0})
    return config


def revision(entry: ModelEntry, seed: int) -> str:
    """A 40-hex id of everything the weights depend on: the snapshot's "commit"."""
    key = {
        "config": entry.offline_config,
        "dtype": entry.offline_dtype,
        "model_type": entry.model_type,
        "seed": seed,
        "builder": BUILDER_VERSION,
        "mlx_lm": version("mlx-lm"),
    }
    return hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()


def save_weights(folder: Path, weights: dict[str, Any]) -> None:
    """model.safetensors and its model.safetensors.index.json, as mlx_lm.convert writes
    them: `sharded_load --pipeline` reads the index to find each stage's weights."""
    import mlx.core as mx

    mx.save_safetensors(str(folder / "model.safetensors"), weights, metadata={"format": "mlx"})
    index = {
        "metadata": {"total_size": sum(v.nbytes for v in weights.values())},
        "weight_map": {k: "model.safetensors" for k in sorted(weights)},
    }
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=4))


def _write_weights(config: dict[str, Any], folder: Path, seed: int, dtype: str) -> None:
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.utils import _get_classes

    model_class, args_class = _get_classes(config)
    mx.random.seed(seed)
    model = model_class(args_class.from_dict(config))
    # Real checkpoints carry bf16 activations, so the KV cache is 16-bit as users see it.
    weights = {
        k: v.astype(getattr(mx, dtype)) if mx.issubdtype(v.dtype, mx.floating) else v
        for k, v in tree_flatten(model.parameters())
    }
    save_weights(folder, weights)


def _build(entry: ModelEntry, folder: Path, seed: int) -> None:
    folder.mkdir(parents=True)
    vocab_size = write_tokenizer(folder)
    config = offline_config(entry, vocab_size)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    _write_weights(config, folder, seed, entry.offline_dtype)
    (folder / "README.md").write_text(
        f"Offline stand-in for {entry.hub} ({entry.model_type}), built by mlx-lm-ext.\n"
        "Random weights: for cache, server and quantization tests, not for text quality.\n"
    )


def build_into(entry: ModelEntry, folder: Path, seed: int = 0) -> Path:
    """An entry's stand-in built into `folder` (a variant's: an entry with another
    offline config), outside the hub cache."""
    _build(entry, folder, seed)
    return folder


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def ensure_built(entry: ModelEntry, seed: int = 0, home: Path | None = None) -> str:
    """Build the entry's offline model into the local hub cache if missing.

    Returns the snapshot revision. Safe to call from parallel test workers.
    """
    return ensure_snapshot(
        repo_id(entry), revision(entry, seed), lambda folder: _build(entry, folder, seed), home
    )


def ensure_snapshot(repo: str, rev: str, build: Callable[[Path], Any], home: Path | None = None) -> str:
    """Run `build(folder)` into the local hub cache as `repo`@`rev` unless it is there."""
    home = home or cache_home()
    repo_dir = home / ("models--" + repo.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / rev
    with _locked(repo_dir / ".build.lock"):
        if not (snapshot / "model.safetensors").exists():
            log.info("building offline %s into %s", repo, snapshot)
            tmp = Path(tempfile.mkdtemp(dir=repo_dir, prefix=".tmp-"))
            try:
                build(tmp / "model")
                snapshot.parent.mkdir(parents=True, exist_ok=True)
                shutil.rmtree(snapshot, ignore_errors=True)
                (tmp / "model").rename(snapshot)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        (repo_dir / "refs").mkdir(exist_ok=True)
        (repo_dir / "refs" / "main").write_text(rev)
    return rev
