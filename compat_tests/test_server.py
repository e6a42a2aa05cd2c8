"""The patched server, as a real process on 127.0.0.1, on every models.yaml family.

`python -m mlx_lm_ext.server` with the monkeypatches, or `python -m mlx_lm.server` of an mlx-lm
built from patches/ (MLX_LM_EXT_DELIVERY=patches): the same requests, the same answers.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from conftest import DELIVERY, SERVER_MODULE, SERVES_KV_FLAGS

from mlx_lm_ext import layout
from mlx_lm_ext.cli import add_missing_flags, settings_from_args
from mlx_lm_ext.limits import model_context
from mlx_lm_ext.settings import head_dims

pytestmark = pytest.mark.skipif(not SERVES_KV_FLAGS, reason="unpatched mlx-lm has no --max-kv-size")


def _no_prompt_cache() -> list[str]:
    """Flags that turn the prompt cache off, where the release has them (0.31 on).

    A prompt-cache hit resumes a quantized cache at another chunk boundary than a fresh
    prefill, so its reply may differ from the request sent alone (measured: 1 of 8 on
    gpt-oss at 4 bits bounded); the bounded server runs without it so that sequential
    serving is compared exactly, and kv8 keeps it on."""
    import inspect

    from mlx_lm import server

    return ["--prompt-cache-size", "0"] if "--prompt-cache-size" in inspect.getsource(server) else []


ROTATED_PROMPT_LIMIT = 1024
CONFIGS = {
    "kv8": ["--kv-bits", "8", "--quantized-kv-start", "0"],
    "kv4-bounded": [
        "--kv-bits",
        "4",
        "--quantized-kv-start",
        "0",
        "--max-kv-size",
        "256",
        "--max-prompt-tokens",  # opts into rotation: by default prompts stop at 256
        str(ROTATED_PROMPT_LIMIT),
        *_no_prompt_cache(),
    ],
}
MAX_TOKENS = 8
STARTUP_S = 120


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _request(port: int, path: str, body: dict | None = None, timeout: float = 120):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", data=data, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


class Server:
    """The server as a process (under `launcher`, e.g. mlx.launch, in a session of its
    own so that stopping it stops every rank)."""

    def __init__(self, model_path, args: list[str], log_path, env: dict | None = None, launcher=()):
        self.port = _free_port()
        self.log_path = log_path
        self.log = open(log_path, "w")
        self.launched = bool(launcher)
        cmd = [
            *launcher,
            sys.executable,
            "-m",
            SERVER_MODULE,
            "--model",
            str(model_path),
            "--port",
            str(self.port),
            "--max-tokens",
            str(MAX_TOKENS),
            *args,
        ]
        env = {**os.environ, **(env or {})}
        self.proc = subprocess.Popen(
            cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env, start_new_session=self.launched
        )
        deadline = time.time() + STARTUP_S * (2 if launcher else 1)
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited {self.proc.returncode}: {self.output()}")
            try:
                if _request(self.port, "/v1/models", timeout=2)[0] == 200:
                    return
            except OSError:
                time.sleep(0.3)
        raise RuntimeError(f"server did not start in {STARTUP_S}s: {self.output()}")

    def output(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return open(self.log_path).read()

    def stop(self):
        signal_all = (lambda sig: os.killpg(self.proc.pid, sig)) if self.launched else self.proc.send_signal
        signal_all(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30 if self.launched else 10)
        except subprocess.TimeoutExpired:
            signal_all(signal.SIGKILL)
            self.proc.wait()
        self.log.close()


@pytest.fixture(scope="module", params=list(CONFIGS))
def server(request, entry, model_path, tmp_path_factory):
    log = tmp_path_factory.mktemp("server") / f"{entry.id}-{request.param}.log"
    srv = Server(model_path, CONFIGS[request.param], log)
    srv.config = request.param
    yield srv
    srv.stop()


def _completion(server, prompt: str, stream: bool = False):
    body = {"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0.0, "stream": stream}
    return _request(server.port, "/v1/completions", body)


def _chat(server, text: str, stream: bool = False):
    body = {
        "messages": [{"role": "user", "content": text}],
        "max_tokens": MAX_TOKENS,
        "temperature": 0.0,
        "stream": stream,
    }
    return _request(server.port, "/v1/chat/completions", body)


def _stream_text(raw: str, key: str) -> str:
    out = []
    for line in raw.splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            choice = json.loads(line[6:])["choices"][0]
            out.append(choice["text"] if key == "text" else choice["delta"].get("content") or "")
    return "".join(out)


PROMPT = "The cache keeps the keys and the values of every token the model has seen. " * 24


def test_text_completion_matches_in_process_generation(server, entry, loaded):
    from mlx_lm import stream_generate
    from mlx_lm.models.cache import make_prompt_cache

    status, body = _completion(server, PROMPT)
    assert status == 200, body
    reply = json.loads(body)
    assert reply["object"] == "text_completion" and reply["choices"][0]["finish_reason"] in ("stop", "length")
    assert reply["usage"]["completion_tokens"] >= 1

    parser = argparse.ArgumentParser(add_help=False)
    add_missing_flags(parser)
    settings = settings_from_args(parser.parse_known_args(CONFIGS[server.config])[0])
    model, tok = loaded
    # The bound goes in explicitly: with the patches delivery no process default exists.
    cache = make_prompt_cache(model, max_kv_size=settings.max_kv_size)
    expected = "".join(
        r.text
        for r in stream_generate(
            model,
            tok,
            PROMPT,
            max_tokens=MAX_TOKENS,
            prompt_cache=cache,
            kv_bits=settings.kv_bits,
            kv_group_size=settings.kv_group_size,
            quantized_kv_start=settings.start,
        )
    )
    assert reply["choices"][0]["text"] == expected


def test_streaming_and_chat_are_well_formed(server):
    status, raw = _completion(server, PROMPT, stream=True)
    assert status == 200 and raw.rstrip().endswith("data: [DONE]")
    status, non_stream = _completion(server, PROMPT)
    assert _stream_text(raw, "text") == json.loads(non_stream)["choices"][0]["text"]

    status, body = _chat(server, "Hello! How are you today?")
    assert status == 200, body
    message = json.loads(body)["choices"][0]["message"]
    assert message["role"] == "assistant" and isinstance(message["content"], str)
    status, raw = _chat(server, "Hello! How are you today?", stream=True)
    assert status == 200 and _stream_text(raw, "chat") == message["content"]


def test_server_quantizes_the_expected_layers(server, entry):
    _completion(server, PROMPT)
    quantizable = [i for i, k in enumerate(entry.layout) if k in (layout.FULL, layout.SLIDING)]
    log = server.output()
    match = re.search(QUANTIZES, log)
    assert match, log[-2000:]
    assert match.group(2) == ",".join(map(str, quantizable))
    if server.config == "kv4-bounded":
        assert "max_kv_size=256" in log


QUANTIZES = r"kv_bits=(\d)(?: value_bits=\d)?(?: rotate=\w+)? quantizes layers ([\d,]+|none)"
SPLIT_ROTATED = ["--kv-key-bits", "8", "--kv-value-bits", "4", "--kv-rotate", "--quantized-kv-start", "0"]


@pytest.mark.xfail(DELIVERY == "upstream", reason="upstream has no --kv-key-bits/--kv-rotate", strict=True)
def test_split_and_rotated_cache_serves_as_generated_in_process(entry, model_path, loaded, tmp_path):
    """--kv-key-bits 8 --kv-value-bits 4 --kv-rotate on every layout: the server says so
    in its quantization line and answers what generation in this process gives with the
    same cache format (generate_step's kv_value_bits and kv_rotate in both deliveries;
    the monkeypatches' server reads the process settings the flags make)."""
    from mlx_lm import stream_generate
    from mlx_lm.models.cache import make_prompt_cache

    from mlx_lm_ext.settings import configure

    server = Server(model_path, SPLIT_ROTATED, tmp_path / "server.log")
    try:
        status, body = _completion(server, PROMPT)
        log = server.output()
    finally:
        server.stop()
    assert status == 200, body
    quantizable = [i for i, k in enumerate(entry.layout) if k in (layout.FULL, layout.SLIDING)]
    assert f"kv_bits=8 value_bits=4 rotate=keys quantizes layers {','.join(map(str, quantizable))}" in log
    parser = argparse.ArgumentParser(add_help=False)
    add_missing_flags(parser)
    settings = settings_from_args(parser.parse_known_args(SPLIT_ROTATED)[0])
    previous = configure(settings)
    try:
        model, tok = loaded
        expected = "".join(
            r.text
            for r in stream_generate(
                model, tok, PROMPT, max_tokens=MAX_TOKENS, prompt_cache=make_prompt_cache(model),
                kv_bits=8, kv_group_size=64, quantized_kv_start=0, kv_value_bits=4, kv_rotate="keys",
            )
        )  # fmt: skip
    finally:
        configure(previous)
    assert json.loads(body)["choices"][0]["text"] == expected


def _requantized_by_hand(cache, bits: int = 8) -> None:
    """Each 16-bit attention layer's rows quantized and dequantized in place (the
    reference a hit on a quantized prompt-cache entry must give)."""
    import mlx.core as mx

    for kind, c in layout.leaves(cache):
        if kind in (layout.FULL, layout.SLIDING) and c.keys is not None:
            n = min(c.offset, c.keys.shape[2])
            c.keys, c.values = (
                mx.dequantize(*mx.quantize(x[..., :n, :], group_size=64, bits=bits), group_size=64, bits=bits)
                for x in (c.keys, c.values)
            )


SHORT_PROMPT = PROMPT[: len(PROMPT) // 2]  # with its reply, inside the stand-ins' 512-token windows


def test_a_hit_on_a_quantized_prompt_cache_entry_answers_as_the_prefix_quantized(
    entry, model_path, loaded, tmp_path
):
    """--prompt-cache-bits 8, live decoding at 16 bits: the same prompt twice. The second
    resumes the first's entry (trimmed to all but the prompt's last token, as upstream's
    LRU does) and must answer what generation does from that prefix quantized and
    dequantized by hand; where the entry cannot be trimmed (a wrapped sliding window,
    recurrent state) it is a miss and the answer is 16-bit generation's. The prompt is
    short enough that no window wraps within a token of the reply's end (the batched and
    sequential paths feed the last reply token or not)."""
    from mlx_lm import stream_generate
    from mlx_lm.models.cache import can_trim_prompt_cache, make_prompt_cache, trim_prompt_cache

    flags = ["--prompt-cache-bits", "8", "--prompt-cache-min-quantize-tokens", "16"]
    server = Server(model_path, flags, tmp_path / "server.log")
    try:
        replies = [_completion(server, SHORT_PROMPT) for _ in range(2)]
    finally:
        server.stop()
    assert all(status == 200 for status, _ in replies), replies
    model, tok = loaded
    special = tok.bos_token is None or not SHORT_PROMPT.startswith(tok.bos_token)
    tokens = tok.encode(SHORT_PROMPT, add_special_tokens=special)

    def generated(prompt, cache) -> str:
        steps = stream_generate(model, tok, prompt, max_tokens=MAX_TOKENS, prompt_cache=cache)
        return "".join(r.text for r in steps)

    cache = make_prompt_cache(model)
    assert json.loads(replies[0][1])["choices"][0]["text"] == generated(tokens, cache)
    if can_trim_prompt_cache(cache):
        trim_prompt_cache(cache, max(c.offset for c in cache if hasattr(c, "offset")) - (len(tokens) - 1))
        _requantized_by_hand(cache)
        rest = tokens[-1:]
    else:
        cache, rest = make_prompt_cache(model), tokens
    assert json.loads(replies[1][1])["choices"][0]["text"] == generated(rest, cache)


def test_failed_request_gets_error_and_next_is_served(server):
    status, body = _request(server.port, "/v1/completions", {"prompt": PROMPT, "max_tokens": 0})
    assert status >= 400 and "error" in json.loads(body), body
    status, body = _completion(server, PROMPT)
    assert status == 200, body


# Request bodies that upstream 0.32.2 lets through to the generation thread (where the
# first two kill it: every later request gets 404 "generation thread died"), or crashes on
# (a logit_bias id past the vocabulary: a segfault on the CPU backend).
BAD_REQUESTS = {
    "empty-prompt": ("/v1/completions", {"prompt": "", "max_tokens": 4}, "prompt must be a non-empty string"),
    "stop-int": ("/v1/completions", {"prompt": "hi", "stop": 5}, "stop must be a string or a list"),
    "stop-list-int": ("/v1/completions", {"prompt": "hi", "stop": [5]}, "stop must be a string or a list"),
    "prompt-null": ("/v1/completions", {"prompt": None}, "prompt must be a non-empty string"),
    "prompt-int": ("/v1/completions", {"prompt": 123}, "prompt must be a non-empty string"),
    "logit-bias-id": (
        "/v1/completions",
        {"prompt": "hi", "logit_bias": {"9999999": 5}},
        "outside the vocabulary",
    ),
    "stream-options": ("/v1/completions", {"prompt": "hi", "stream_options": "x"}, "stream_options must be"),
    "messages-empty-object": ("/v1/chat/completions", {"messages": [{}]}, "messages[0] must be an object"),
    "messages-missing": ("/v1/chat/completions", {"max_tokens": 4}, "messages must be a non-empty list"),
    "tools-string": (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "tools": "x"},
        "tools must be",
    ),
}


@pytest.mark.parametrize("path,body,message", list(BAD_REQUESTS.values()), ids=list(BAD_REQUESTS))
def test_bad_request_gets_400_and_the_server_keeps_serving(server, path, body, message):
    status, raw = _request(server.port, path, body)
    assert status == 400 and message in raw, (status, raw)
    assert _request(server.port, "/health")[0] == 200
    status, raw = _completion(server, PROMPT)
    assert status == 200 and json.loads(raw)["choices"][0]["text"], raw


def _raw_http(port: int, head: bytes, wait_s: float = 60) -> bytes:
    """Send raw bytes and read the reply until the server closes the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait_s) as sock:
        sock.sendall(head)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_requests_past_a_limit_get_400_naming_it(server, model_path):
    """Defaults: prompts up to the model's context (--max-kv-size where smaller),
    max_tokens up to the context, bodies up to 32 MB (upstream: no limit at all)."""
    context = model_context(str(model_path))
    bound = ROTATED_PROMPT_LIMIT if server.config == "kv4-bounded" else context
    status, raw = _request(server.port, "/v1/completions", {"prompt": " x" * (bound + 8), "max_tokens": 1})
    assert status == 400 and "--max-prompt-tokens" in raw and f"at most {bound}" in raw, raw[:300]
    status, raw = _request(server.port, "/v1/completions", {"prompt": "hi", "max_tokens": context + 1})
    assert status == 400 and f"limit of {context} (--max-tokens-limit)" in raw, raw
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"
    reply = _raw_http(server.port, head % (64 * 2**20))
    assert reply.startswith(b"HTTP/1.0 413") and b"--max-body-bytes" in reply, reply[:300]
    reply = _raw_http(server.port, b"POST /v1/completions HTTP/1.1\r\nContent-Length: -1\r\n\r\n")
    assert reply.startswith(b"HTTP/1.0 400"), reply[:300]
    status, raw = _completion(server, PROMPT)
    assert status == 200 and json.loads(raw)["choices"][0]["text"], raw


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_a_disconnected_clients_request_stops(server, model_path, loaded, stream):
    """A client asks for the most tokens allowed, its end-of-sequence tokens barred, and
    leaves after a second: its request stops (upstream generates on: the next request
    waited 208 s on llama-3.2) and the server logs one line, not a traceback."""
    never_end = {str(i): -100.0 for i in loaded[1].eos_token_ids}
    body = {
        "prompt": PROMPT,
        "max_tokens": model_context(str(model_path)),
        "stream": stream,
        "logit_bias": never_end,
    }
    body = json.dumps(body)
    head = f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n{body}"
    tracebacks = server.output().count("Traceback")
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(head.encode())
        time.sleep(1.5)
    start = time.perf_counter()
    status, raw = _request(server.port, "/v1/completions", {"prompt": "hi", "max_tokens": 2}, timeout=60)
    assert status == 200, raw
    assert time.perf_counter() - start < 30
    time.sleep(0.5)
    assert "disconnected" in server.output()
    assert server.output().count("Traceback") == tracebacks


def test_malformed_http_gets_an_answer(server):
    """A body that is not UTF-8: 400 (upstream closes the connection); a GET on a POST
    endpoint: 405 naming POST (upstream: 404)."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request(
        "POST",
        "/v1/completions",
        body=b'{"prompt": "\xff\xfe"}',
        headers={"Content-Type": "application/json"},
    )
    reply = conn.getresponse()
    assert reply.status == 400 and b"not UTF-8" in reply.read()
    conn.request("GET", "/v1/chat/completions")
    reply = conn.getresponse()
    assert reply.status == 405 and reply.getheader("Allow") == "POST", reply.read()
    reply.read()
    conn.close()
    assert _completion(server, PROMPT)[0] == 200


def test_models_list_needs_no_hugging_face_cache(tmp_path):
    """A fresh machine serving a local folder has no hub cache: /v1/models still lists the
    served model (upstream: a 200 status line, then a CacheNotFound traceback, no body).
    One family shows it: the path is the same for every model."""
    from mlx_lm_ext.zoo import get_entry, resolve

    model_path = resolve(get_entry("llama-3.2"))
    empty = tmp_path / "no-hf-cache"
    env = {"HF_HOME": str(empty), "HF_HUB_CACHE": str(empty / "hub")}
    server = Server(model_path, [], tmp_path / "server.log", env=env)
    try:
        status, raw = _request(server.port, "/v1/models")
    finally:
        server.stop()
    assert status == 200, raw
    assert str(model_path.resolve()) in [m["id"] for m in json.loads(raw)["data"]]


CONCURRENT = 8
LONG_REPLY = 32


def _timed_stream(port: int, prompt: str) -> tuple[str, float, float]:
    """A streamed completion's text and the times its first and last chunks arrived."""
    body = {"prompt": prompt, "max_tokens": LONG_REPLY, "temperature": 0.0, "stream": True}
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    lines, times = [], []
    with urllib.request.urlopen(req, timeout=300) as r:
        for raw in r:
            line = raw.decode().strip()
            if line.startswith("data: ") and line != "data: [DONE]":
                lines.append(line)
                times.append(time.perf_counter())
    return _stream_text("\n".join(lines), "text"), times[0], times[-1]


def _most_in_flight(spans: list[tuple[float, float]]) -> int:
    """The most streams open at one moment."""
    events = sorted([(a, 1) for a, _ in spans] + [(b, -1) for _, b in spans])
    open_now = most = 0
    for _, step in events:
        open_now += step
        most = max(most, open_now)
    return most


def test_concurrent_quantized_requests_are_batched(server):
    """8 concurrent requests under --kv-bits are decoded together (several in flight at
    once; served one at a time, at most two would be, the next stream opening as the last
    one's final chunk is read) and answer as when sent alone. How many overlap depends on
    the host's load: usually all 8, once 3 in a CI run while the other test worker ran.
    Batched, the second round reuses the first round's caches from the prompt cache
    (quantized, trimmed) where the first prefilled, so at least half must be identical
    (measured: 8 of 8 in most runs). Caches bounded by --max-kv-size batch too, prompts
    past the ring included (batch rings keep each request's `keep` tokens and trim as its
    ring alone; compat_tests/test_batching.py compares them exactly)."""
    from concurrent.futures import ThreadPoolExecutor

    prompts = [PROMPT[: 160 + 41 * i] for i in range(CONCURRENT)]
    alone = [_timed_stream(server.port, p)[0] for p in prompts]
    with ThreadPoolExecutor(CONCURRENT) as pool:
        together = list(pool.map(lambda p: _timed_stream(server.port, p), prompts))
    same = sum(t == a for (t, _, _), a in zip(together, alone, strict=True))
    in_flight = _most_in_flight([(a, b) for _, a, b in together])
    assert same >= CONCURRENT // 2, f"{same} of {CONCURRENT} replies as when sent alone"
    assert in_flight > 2, in_flight
    assert "served one at a time" not in server.output()


BAD_FLAGS = {
    "kv-bits-7": (["--kv-bits", "7"], "--kv-bits 7: must be one of 2, 3, 4, 5, 6, 8"),
    "group-48": (["--kv-bits", "8", "--kv-group-size", "48"], "--kv-group-size 48: must be one of"),
    "negative-start": (["--kv-bits", "8", "--quantized-kv-start", "-1"], "--quantized-kv-start -1"),
    "zero-max": (["--max-kv-size", "0"], "--max-kv-size 0: must be a positive"),
    "key-bits-7": (["--kv-key-bits", "7"], "--kv-key-bits 7: must be one of 2, 3, 4, 5, 6, 8"),
    "value-bits-alone": (["--kv-value-bits", "4"], "--kv-value-bits 4: also give --kv-key-bits or --kv-bits"),
    "rotate-alone": (["--kv-rotate"], "--kv-rotate keys: rotates a quantized cache; also give --kv-bits"),
    "prompt-cache-bits-7": (
        ["--prompt-cache-bits", "7"],
        "--prompt-cache-bits 7: must be one of 2, 3, 4, 5, 6, 8",
    ),
    "negative-min-quantize": (
        ["--prompt-cache-bits", "8", "--prompt-cache-min-quantize-tokens", "-1"],
        "--prompt-cache-min-quantize-tokens -1: must be 0 or more",
    ),
    "negative-prompt-limit": (["--max-prompt-tokens", "-1"], "--max-prompt-tokens -1: must be 0"),
    "body-size": (["--max-body-bytes", "12x"], "not a size: '12x'"),
}


@pytest.mark.parametrize("flags,message", list(BAD_FLAGS.values()), ids=list(BAD_FLAGS))
def test_bad_flag_exits_2_before_loading(flags, message, tmp_path):
    missing = tmp_path / "no-weights-here"
    missing.mkdir()
    (missing / "config.json").write_text(json.dumps({"head_dim": 128, "num_attention_heads": 4}))
    proc = subprocess.run(
        [sys.executable, "-m", SERVER_MODULE, "--model", str(missing), *flags],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    before = proc.stderr[: proc.stderr.index(message)]
    assert " - INFO - " not in before, "the error comes after log lines"


MISSING_MODELS = {
    "no-such-path": ("/does/not/exist", "no such folder, and not a Hugging Face repo id"),
    "no-config": ("{tmp}", "has no config.json"),
}


@pytest.mark.parametrize("model,message", list(MISSING_MODELS.values()), ids=list(MISSING_MODELS))
def test_missing_model_exits_2_before_serving(model, message, tmp_path):
    """Upstream listens anyway, answering 503 and 404 to every request."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            SERVER_MODULE,
            "--model",
            model.format(tmp=tmp_path),
            "--port",
            str(_free_port()),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]


def test_group_size_not_dividing_head_dim_names_the_model(entry, model_path):
    dims = head_dims(json.loads((model_path / "config.json").read_text()))
    group = next((g for g in (32, 64, 128) if any(d % g for d in dims)), None)
    if group is None:
        pytest.skip(f"every allowed group size divides {entry.id}'s head dims {sorted(dims)}")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            SERVER_MODULE,
            "--model",
            str(model_path),
            "--kv-bits",
            "8",
            "--kv-group-size",
            str(group),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "does not divide the head dim" in proc.stderr, proc.stderr
