"""Running across machines: how many ranks, and whether a model shards across them.

mlx-lm's server runs under `mlx.launch` (ring over TCP, JACCL over Thunderbolt, MPI) and
shards the model with `sharded_load`: tensor parallel (`model.shard`: every layer's
heads split across the ranks) or pipeline parallel (`--pipeline`: the layers split).
A model that cannot shard that way fails on every rank while loading, minutes in, or
computes garbage (attention heads that do not divide by the ranks). The server checks it
first, from config.json, on every rank alike, so every rank exits 2 with the same line.
The report's `--ranks` gives each machine's share of the KV cache.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def world_size() -> int:
    """Ranks this process runs among, read from what the launcher set (no handshake)."""
    for var in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MLX_WORLD_SIZE"):
        if os.environ.get(var):
            return int(os.environ[var])
    hostfile = os.environ.get("MLX_HOSTFILE")
    if hostfile and os.path.exists(hostfile):
        with open(hostfile) as f:
            hosts = json.load(f)
        return len(hosts) if isinstance(hosts, list) else 1
    return 1


def _ways(config: dict[str, Any]) -> tuple[bool, bool]:
    """(tensor parallel, pipeline) as `sharded_load` asks the model: `Model.shard`, and
    `model.model.pipeline` (the model is built lazily: no weights are allocated)."""
    from .report.memory import model_from_config

    model = model_from_config(config)
    return hasattr(model, "shard"), hasattr(getattr(model, "model", None), "pipeline")


def shard_problem(config: dict[str, Any], ranks: int, pipeline: bool) -> str | None:
    """Why this model cannot run on `ranks` ranks the way the server would shard it, or None."""
    if ranks <= 1:
        return None
    try:
        tensor, stages = _ways(config)
    except (ImportError, ValueError, KeyError, TypeError) as exc:
        return f"model_type {config.get('model_type')} cannot be built by this mlx-lm ({exc})"
    text = config.get("text_config") or config
    if pipeline:
        if not stages:
            return f"model_type {config.get('model_type')} has no pipeline stages in mlx-lm"
        layers = int(text.get("num_hidden_layers", 0))
        if layers < ranks:
            return f"{layers} layers cannot split into {ranks} pipeline stages"
        return None
    if not tensor:
        return (
            f"model_type {config.get('model_type')} cannot be tensor-parallel in mlx-lm "
            "(no Model.shard); try --pipeline"
        )
    for key in ("num_attention_heads", "num_key_value_heads"):
        heads = text.get(key)
        if heads and int(heads) % ranks:
            return f"{key} {heads} does not divide by {ranks} ranks (each rank takes a share of the heads)"
    return None


def check(model: str | None, pipeline: bool) -> None:
    """Raise SettingsError where this process is one of several ranks and the model
    cannot shard across them (config.json only: before any weights load)."""
    from .settings import SettingsError, read_config

    ranks = world_size()
    config = read_config(model) if model and ranks > 1 else None
    problem = shard_problem(config, ranks, pipeline) if config else None
    index = Path(model or "") / "model.safetensors.index.json"
    if config and pipeline and not problem and Path(model).is_dir() and not index.exists():
        problem = f"--pipeline reads {index.name} to place each stage's weights; {model} has none"
    if problem:
        how = "--pipeline" if pipeline else "tensor parallel"
        raise SettingsError(f"--model {model}: cannot run on {ranks} ranks ({how}): {problem}")


def rank_layers(layers: list[Any], ranks: int, pipeline: bool) -> list[list[Any]]:
    """Each rank's caches (report.memory.LayerKV): under --pipeline the model layers its
    stage runs; tensor parallel, every layer with a 1/ranks share of its KV heads and of
    its recurrent state (sharded by heads too)."""
    from dataclasses import replace

    if pipeline:
        stages = pipeline_layers(1 + max(lay.layer for lay in layers), ranks)
        return [[lay for lay in layers if lay.layer in stage] for stage in stages]
    return [
        [replace(lay, kv_heads=lay.kv_heads // ranks, state_bytes=lay.state_bytes // ranks) for lay in layers]
    ] * ranks


def pipeline_layers(n_layers: int, ranks: int) -> list[range]:
    """The model layers each rank runs under --pipeline, as mlx-lm's PipelineMixin splits
    them: evenly, the low ranks taking the extra layers, rank 0 the last layers."""
    base, extra = divmod(n_layers, ranks)
    split = [base + (1 if r < extra else 0) for r in range(ranks)]
    starts = [sum(split[r + 1 :]) for r in range(ranks)]
    return [range(s, s + n) for s, n in zip(starts, split, strict=True)]
