"""The request limits' defaults and flag checks, and the disconnect detection they rely on."""

from __future__ import annotations

import argparse
import json
import socket
from queue import Queue
from types import SimpleNamespace

import pytest

from mlx_lm_ext import limits
from mlx_lm_ext.fixes.client_disconnect import RequestCancelled, _StoppingQueue, client_gone
from mlx_lm_ext.settings import SettingsError


@pytest.mark.parametrize(
    "text,size",
    [("1048576", 2**20), ("32M", 32 * 10**6), ("32MB", 32 * 10**6), ("1g", 10**9), ("1.5G", 15 * 10**8)],
)
def test_sizes_read_in_upstreams_decimal_units(text, size):
    assert limits.parse_size(text) == size


@pytest.mark.parametrize("text", ["12x", "", "-1", "32MiB", "512k"])
def test_a_bad_size_is_an_argument_error(text):
    with pytest.raises(argparse.ArgumentTypeError, match="not a size"):
        limits.parse_size(text)


def _model(tmp_path, config: dict | None):
    if config is not None:
        (tmp_path / "config.json").write_text(json.dumps(config))
    return str(tmp_path)


def test_the_prompt_limit_is_the_context_or_the_cache_bound(tmp_path):
    model = _model(tmp_path, {"max_position_embeddings": 4096})
    limits.model_context.cache_clear()
    args = SimpleNamespace(max_prompt_tokens=None, max_tokens_limit=None, max_kv_size=None)
    assert limits.max_prompt_tokens(args, model) == 4096
    assert limits.max_new_tokens(args, model) == 4096
    args.max_kv_size = 256
    assert limits.max_prompt_tokens(args, model) == 256
    assert limits.max_new_tokens(args, model) == 4096  # rotation bounds memory, not length
    args.max_prompt_tokens, args.max_tokens_limit = 0, 0  # 0 lifts a limit
    assert limits.max_prompt_tokens(args, model) is None and limits.max_new_tokens(args, model) is None
    args.max_prompt_tokens = 1024
    assert limits.max_prompt_tokens(args, model) == 1024


def test_a_model_without_a_stated_context_has_no_default_limit(tmp_path):
    model = _model(tmp_path, {"model_type": "x"})
    limits.model_context.cache_clear()
    args = SimpleNamespace(max_prompt_tokens=None, max_tokens_limit=None, max_kv_size=None)
    assert limits.max_prompt_tokens(args, model) is None and limits.max_new_tokens(args, model) is None


def test_the_context_is_read_from_the_text_config_first():
    assert (
        limits.context_length({"text_config": {"max_position_embeddings": 32768}, "n_positions": 2}) == 32768
    )
    assert limits.context_length({"max_sequence_length": 8192}) == 8192
    assert limits.context_length(None) is None


@pytest.mark.parametrize(
    "model,message",
    [
        ("/does/not/exist", "no such folder, and not a Hugging Face repo id"),
        ("./relative/missing", "no such folder"),
        ("{tmp}", "has no config.json"),
        ("{tmp}/file", "is a file"),
    ],
)
def test_a_model_path_that_cannot_serve_is_refused(tmp_path, model, message):
    (tmp_path / "file").write_text("x")
    with pytest.raises(SettingsError, match=message):
        limits.check_model_path(model.format(tmp=tmp_path))


@pytest.mark.parametrize("model", ["mlx-community/Qwen3-0.6B-4bit", "gpt2", None])
def test_hub_repo_ids_pass_the_path_check(model):
    limits.check_model_path(model)


def test_a_negative_limit_is_refused():
    ns = argparse.Namespace(max_prompt_tokens=-1, max_tokens_limit=None, max_body_bytes=10)
    with pytest.raises(SettingsError, match="--max-prompt-tokens -1"):
        limits.check_limit_flags(ns)


def test_a_closed_peer_is_gone_and_a_pipelined_request_is_not():
    ours, theirs = socket.socketpair()
    assert not client_gone(ours)
    theirs.sendall(b"GET /health HTTP/1.1\r\n\r\n")  # readable, with bytes: still there
    assert not client_gone(ours)
    ours.recv(1024)
    theirs.close()
    assert client_gone(ours)
    ours.close()
    assert client_gone(ours)  # a closed socket of ours: nothing more to send to


def test_a_stopped_requests_next_progress_report_ends_its_prefill():
    queue = Queue()
    stopping = _StoppingQueue(queue)
    ctx = SimpleNamespace(_should_stop=False)
    stopping.put(ctx)
    stopping.put((64, 512))
    ctx._should_stop = True
    with pytest.raises(RequestCancelled):
        stopping.put((128, 512))
    stopping.put(None)  # the end of the request still reaches the handler
    assert [queue.get_nowait() for _ in range(3)] == [ctx, (64, 512), None]
