"""Ranks, sharding checks and each machine's share of the cache (mlx_lm_ext/distributed.py);
the runs under mlx.launch are compat_tests/test_distributed.py (nox -s distributed)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from mlx_lm_ext import distributed
from mlx_lm_ext.report.memory import LayerKV
from mlx_lm_ext.settings import SettingsError

LLAMA = {
    "model_type": "llama", "hidden_size": 576, "num_hidden_layers": 4, "intermediate_size": 64,
    "num_attention_heads": 9, "num_key_value_heads": 3, "rms_norm_eps": 1e-5, "vocab_size": 64,
}  # fmt: skip


def test_world_size_comes_from_what_the_launcher_set(monkeypatch, tmp_path):
    for var in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MLX_WORLD_SIZE", "MLX_HOSTFILE"):
        monkeypatch.delenv(var, raising=False)
    assert distributed.world_size() == 1
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(json.dumps([["127.0.0.1:5000"], ["127.0.0.1:5001"], ["127.0.0.1:5002"]]))
    monkeypatch.setenv("MLX_HOSTFILE", str(hostfile))
    assert distributed.world_size() == 3
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "4")
    assert distributed.world_size() == 4


@pytest.mark.parametrize(
    "config,ranks,pipeline,problem",
    [
        (LLAMA, 3, False, None),
        (LLAMA, 2, False, "num_attention_heads 9 does not divide by 2 ranks"),
        (LLAMA, 2, True, "has no pipeline stages"),
        ({**LLAMA, "num_hidden_layers": 1}, 1, False, None),
    ],
)
def test_shard_problem_says_why_a_model_cannot_run_that_way(config, ranks, pipeline, problem):
    got = distributed.shard_problem(config, ranks, pipeline)
    assert got is None if problem is None else problem in got


def test_a_pipeline_needs_the_weight_index_mlx_lm_convert_writes(tmp_path, monkeypatch):
    config = {**LLAMA, "model_type": "qwen3_next"}
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(distributed, "shard_problem", lambda *a: None)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(SettingsError, match="model.safetensors.index.json"):
        distributed.check(str(tmp_path), pipeline=True)
    (tmp_path / "model.safetensors.index.json").write_text("{}")
    distributed.check(str(tmp_path), pipeline=True)


def test_each_rank_holds_its_share():
    layers = [LayerKV(str(i), "kv", kv_heads=4, k_dim=64, v_dim=64) for i in range(5)]
    tensor = distributed.rank_layers(layers, 2, pipeline=False)
    assert [[x.kv_heads for x in share] for share in tensor] == [[2] * 5, [2] * 5]
    stages = distributed.rank_layers(layers, 2, pipeline=True)
    # as mlx-lm's PipelineMixin splits: rank 0 the last layers, the low ranks the extra one
    assert [[x.index for x in share] for share in stages] == [["2", "3", "4"], ["0", "1"]]


def test_the_report_refuses_ranks_the_model_cannot_shard_over():
    proc = subprocess.run(
        [sys.executable, "-m", "mlx_lm_ext.report", "--model", "llama-3.2", "--offline", "--ranks", "3"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2 and "does not divide by 3 ranks" in proc.stderr
