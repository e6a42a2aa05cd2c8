"""Quantized KV across ranks: mlx.launch, ring backend, 2 ranks on 127.0.0.1, CPU.

Run with `nox -s distributed` (or `pytest -m distributed compat_tests/test_distributed.py`).
The way mlx-lm's server shards: tensor parallel (`sharded_load` / `model.shard`: each
rank holds a share of every layer's KV heads) or `--pipeline` (each rank holds its
layers). Every test compares with the same model in one process.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import DELIVERY, SERVER_MODULE
from test_server import MAX_TOKENS, PROMPT, Server, _completion, _free_port, _request

from mlx_lm_ext import layout
from mlx_lm_ext.distributed import shard_problem
from mlx_lm_ext.settings import read_config
from mlx_lm_ext.zoo.build import build_into

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(shutil.which("mlx.launch") is None, reason="mlx.launch is not installed"),
    pytest.mark.skipif(DELIVERY == "upstream", reason="unpatched mlx-lm has no --kv-bits in its server"),
]
RANKS = 2
RANK_SCRIPT = str(Path(__file__).with_name("distributed_rank.py"))
LAUNCH = ["mlx.launch", "--backend", "ring", "-n", str(RANKS), "--"]
TIMEOUT_S = 300


def _ranks(model_path, *flags: str, ranks: int = RANKS) -> list[dict]:
    """Each rank's result line from distributed_rank.py (one process where ranks is 1)."""
    cmd = [sys.executable, RANK_SCRIPT, str(model_path), *flags]
    if ranks > 1:
        cmd = ["mlx.launch", "--backend", "ring", "-n", str(ranks), "--", *cmd]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S)
    lines = [json.loads(x[5:]) for x in proc.stdout.splitlines() if x.startswith("RANK ")]
    assert len(lines) == ranks, proc.stdout[-3000:] + proc.stderr[-3000:]
    return sorted(lines, key=lambda r: r["rank"])


@pytest.fixture(scope="module")
def tp_path(entry, model_path, tmp_path_factory):
    """The entry's model, or where one KV head is all that keeps a stand-in from tensor
    parallel (qwen3.5-moe, gpt-oss), the same stand-in with RANKS KV heads, built here:
    mlx-lm splits heads across ranks, so 1 head cannot run on 2."""
    problem = shard_problem(read_config(str(model_path)), RANKS, False)
    if not problem or "num_key_value_heads" not in problem or entry.real:
        return model_path
    config = copy.deepcopy(entry.offline_config)
    (config.get("text_config") or config)["num_key_value_heads"] = RANKS
    folder = tmp_path_factory.mktemp(entry.id.replace(".", "-")) / f"{entry.id}-kv{RANKS}"
    return build_into(replace(entry, offline_config=config), folder)


def _way(entry, model_path, pipeline: bool) -> None:
    """Skip where the model does not shard that way (the server refuses it: tested below)."""
    problem = shard_problem(read_config(str(model_path)), RANKS, pipeline)
    if problem:
        pytest.skip(f"{entry.id} on {RANKS} ranks: {problem}")


@pytest.mark.parametrize("pipeline", [False, True], ids=["tensor", "pipeline"])
@pytest.mark.parametrize("kv_bits", [None, 8], ids=["16bit", "kv8"])
def test_ranks_generate_what_one_process_does_with_their_share_of_the_cache(
    entry, model_path, tp_path, kv_bits, pipeline
):
    """Greedy tokens on every rank equal one process's at the same bits; every attention
    layer a rank holds is quantized (kv8); the ranks' cache bytes add up to one
    process's, each holding its share (tensor parallel: an equal share of the heads)."""
    model_path = model_path if pipeline else tp_path
    _way(entry, model_path, pipeline)
    flags = ([] if kv_bits is None else ["--kv-bits", str(kv_bits)]) + (["--pipeline"] if pipeline else [])
    (alone,) = _ranks(model_path, *flags, ranks=1)
    ranks = _ranks(model_path, *flags)
    assert all(r["tokens"] == alone["tokens"] for r in ranks), (alone["tokens"], [r["tokens"] for r in ranks])
    assert sum(r["cache_bytes"] for r in ranks) == alone["cache_bytes"]
    if not pipeline:
        assert all(r["cache_bytes"] * RANKS == alone["cache_bytes"] for r in ranks)
    if kv_bits is not None:  # a pipeline stage may hold recurrent layers only
        attention = [cls for r in ranks for kind, cls in r["layers"] if kind != layout.RECURRENT]
        assert attention and all(cls.startswith("Quantized") for cls in attention), ranks


def test_a_bounded_cache_stays_bounded_on_every_rank(entry, tp_path):
    model_path = tp_path
    _way(entry, model_path, False)
    flags = ["--kv-bits", "8", "--max-kv-size", "64", "--tokens", "4"]
    (alone,) = _ranks(model_path, *flags, ranks=1)
    ranks = _ranks(model_path, *flags)
    assert all(r["tokens"] == alone["tokens"] for r in ranks)
    assert all(r["cache_bytes"] * RANKS == alone["cache_bytes"] for r in ranks)


def _ranks_running(port: int) -> int:
    """Processes still serving on this port (the launcher and its ranks)."""
    found = subprocess.run(["pgrep", "-f", f"--port {port}"], capture_output=True, text=True)
    return len(found.stdout.split())


@pytest.mark.parametrize("pipeline", [False, True], ids=["tensor", "pipeline"])
def test_the_server_across_ranks_answers_batches_and_errors(entry, model_path, tp_path, pipeline, tmp_path):
    """`mlx.launch ... python -m <server> --kv-bits 8 [--pipeline]`: a completion equals
    the same ranks' generation (distributed_rank.py: sharded, not one process, whose sums
    run in another order); 4 concurrent requests (continuous batching) each get theirs;
    a request that fails gets an error and the next is served; stopping the launcher
    leaves no rank behind."""
    model_path = model_path if pipeline else tp_path
    _way(entry, model_path, pipeline)
    way = ["--pipeline"] if pipeline else []
    prompts = [PROMPT] + [f"{PROMPT} Request {i}." for i in range(4)]
    flags = ["--kv-bits", "8", "--tokens", str(MAX_TOKENS), *way]
    texts = _ranks(model_path, *flags, *(x for p in prompts for x in ("--prompt", p)))[0]["texts"]
    expected = dict(zip(prompts, texts, strict=True))
    flags = ["--kv-bits", "8", "--quantized-kv-start", "0", *way]
    server = Server(model_path, flags, tmp_path / "srv.log", launcher=LAUNCH)
    try:
        status, body = _completion(server, PROMPT)
        assert status == 200 and json.loads(body)["choices"][0]["text"] == expected[PROMPT], body
        replies: dict[str, str] = {}

        def ask(p):
            status, body = _completion(server, p)
            replies[p] = json.loads(body)["choices"][0]["text"] if status == 200 else body

        threads = [threading.Thread(target=ask, args=(p,)) for p in prompts[1:]]
        for t in threads:
            t.start()
        for t in threads:
            t.join(TIMEOUT_S)
        if pipeline:  # answered; 1 of 4 batched replies ended in another token than alone
            assert set(replies) == set(prompts[1:]) and all(replies.values()), replies
        else:
            assert replies == {p: expected[p] for p in prompts[1:]}
        status, body = _request(server.port, "/v1/completions", {"prompt": 123})
        assert 400 <= status < 500 and "error" in json.loads(body), body
        status, body = _completion(server, PROMPT)
        assert status == 200 and json.loads(body)["choices"][0]["text"] == expected[PROMPT]
        assert "exited with code" not in server.output()  # no rank died on the way
    finally:
        server.stop()
    assert _ranks_running(server.port) == 0, server.output()[-3000:]


def test_a_model_or_flag_some_ranks_cannot_honour_is_refused_on_every_rank(entry, model_path, tmp_path):
    """Before any weights load, each rank exits 2 with the same line: a model whose heads
    do not divide by the ranks (or that cannot shard at all), or a group size that does
    not divide the head dim. The launcher stops the other ranks once one exits (SIGTERM,
    -15) if they have not exited yet: none is left waiting for the others."""
    problem = shard_problem(read_config(str(model_path)), RANKS, False)
    dims = [d for d in layout_head_dims(model_path) if d % 128]
    if problem:
        flags, message = [], f"cannot run on {RANKS} ranks"
    elif dims:
        flags, message = ["--kv-bits", "8", "--kv-group-size", "128"], "--kv-group-size 128: does not divide"
    else:
        pytest.skip(f"{entry.id}: shards on {RANKS} ranks and every head dim takes group 128")
    port = str(_free_port())
    cmd = [*LAUNCH, sys.executable, "-m", SERVER_MODULE, "--model", str(model_path), "--port", port, *flags]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S)
    out = proc.stdout + proc.stderr
    codes = re.findall(r"exited with code (-?\d+)", out)
    assert message in out and len(codes) == RANKS and set(codes) <= {"2", "-15"} and "2" in codes, out[-3000:]
    assert " - INFO - " not in out, "a rank logged (loaded?) before refusing"


def layout_head_dims(model_path) -> list[int]:
    from mlx_lm_ext.settings import head_dims

    return sorted(head_dims(read_config(str(model_path))))


def test_real_smollm2_on_three_ranks():
    """The real SmolLM2-135M-Instruct (9 query / 3 KV heads: 3 ranks, not 2) at 8 bits:
    every rank generates what one process does, holding a third of the cache."""
    from mlx_lm_ext.zoo import get_entry, resolve

    path = resolve(get_entry("smollm2-135m-instruct"))
    (alone,) = _ranks(path, "--kv-bits", "8", ranks=1)
    ranks = _ranks(path, "--kv-bits", "8", ranks=3)
    assert all(r["tokens"] == alone["tokens"] for r in ranks), (alone["tokens"], [r["tokens"] for r in ranks])
    assert all(r["cache_bytes"] * 3 == alone["cache_bytes"] for r in ranks)
