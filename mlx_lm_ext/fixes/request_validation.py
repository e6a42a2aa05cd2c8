"""Bad request input gets a 400 that names the field; no single request can stop the server.

Upstream (0.32.2) checks the sampling fields of a request but not its text, so input
that passes the HTTP handler fails later, in the generation thread:
`{"prompt": "", ...}` (no tokens) and `"stop": 5` kill that thread, after which every
request gets 404 "generation thread died" and /health answers 503; a `logit_bias` token
id past the vocabulary indexes past the logits (a segfault on the CPU backend);
`stream_options` without `include_usage` raises mid-stream. Invalid UTF-8 in the body
closes the connection without a response, a GET on a POST endpoint answers 404, and
GET /v1/models on a machine with no Hugging Face cache sends a 200 status line and then
nothing (`scan_cache_dir` raises CacheNotFound after the headers went out).

Here every field is checked where upstream checks its own (`validate_model_parameters`,
before the request is queued, answered with upstream's 400), logit_bias against the
loaded tokenizer; and where the generation thread tokenizes, a prompt of no tokens is an
error of that request (upstream hands such errors back to it) instead of the thread's.
Patch file: patches/0010-request-validation.patch.
"""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

from .base import Fix, Patcher

POST_PATHS = ("/v1/completions", "/v1/chat/completions", "/chat/completions")


class BadRequest(ValueError):
    """The request's own content is invalid: answered with 400, never a server error."""


class Answered(BaseException):  # noqa: N818 - a signal, not an error
    """The handler has sent its reply: unwinds past upstream's `except Exception` (which
    would write a second one) to the wrapper that catches it."""


def send_error(handler, status: int, message: str, allow: str | None = None) -> None:
    """An OpenAI-style error reply: {"error": {"message", "type", "code"}}."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    data = json.dumps({"error": {"message": message, "type": kind, "code": status}}).encode()
    handler._headers_buffer = []  # nothing of another reply goes out before this one
    handler._set_completion_headers(status)  # upstream's: the content type and CORS
    handler.send_header("Content-Length", str(len(data)))
    if allow:
        handler.send_header("Allow", allow)
    handler.end_headers()
    handler.wfile.write(data)
    handler.wfile.flush()


class RequestView:
    """The response generator as one request's handler sees it: a fix changes generate()
    for that request only (the generator itself is shared by every handler)."""

    def __init__(self, handler: Any, inner: Any) -> None:
        self._handler, self._inner = handler, inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def handle_through(view: type[RequestView], handle: Any, handler: Any, *args: Any) -> Any:
    """Run `handle` (a handle_completion) with the handler's generator seen through view."""
    inner = handler.response_generator
    handler.response_generator = view(handler, inner)
    try:
        return handle(handler, *args)
    finally:
        handler.response_generator = inner


def check_body(body: dict, path: str) -> None:
    """The fields upstream passes on unchecked; raises BadRequest naming the field."""
    stop = body.get("stop")
    if stop is not None and not isinstance(stop, str):
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise BadRequest(f"stop must be a string or a list of strings, got {json.dumps(stop)[:80]}")
    options = body.get("stream_options")
    if options is not None:
        if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
            raise BadRequest('stream_options must be an object like {"include_usage": true}')
    tools = body.get("tools")
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise BadRequest("tools must be a list of objects")
    if path == "/v1/completions":
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            raise BadRequest("prompt must be a non-empty string")
    else:
        _check_messages(body.get("messages"))


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty list of {role, content} objects")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise BadRequest(f"messages[{i}] must be an object with a string role")
        content = message.get("content")
        if content is not None and not isinstance(content, (str, list)):
            raise BadRequest(f"messages[{i}].content must be a string or a list of parts")


def check_logit_bias(logit_bias: dict | None, tokenizer: Any) -> None:
    """Biased token ids must exist: past the vocabulary they index past the logits."""
    if not logit_bias or tokenizer is None:
        return
    size = len(tokenizer.vocab)
    wrong = sorted(t for t in logit_bias if not 0 <= t < size)
    if wrong:
        raise BadRequest(f"logit_bias token ids {wrong[:5]} are outside the vocabulary (0..{size - 1})")


def validate_model_parameters(self) -> None:
    """Upstream's checks, then the body's text fields and logit_bias against the loaded
    tokenizer: before the request is queued, so a ValueError is upstream's own 400."""
    from mlx_lm import server

    try:
        FIX.original(server.APIHandler, "validate_model_parameters")(self)
        check_body(self.body, self.path)
        check_logit_bias(self.logit_bias, _loaded_tokenizer(self))
    except ValueError as exc:  # upstream would answer {"error": "<text>"}
        send_error(self, 400, str(exc))
        raise Answered from exc
    if isinstance(self.stream_options, dict):
        self.stream_options = {"include_usage": False, **self.stream_options}


def _loaded_tokenizer(handler) -> Any:
    provider = getattr(getattr(handler, "response_generator", None), "model_provider", None)
    return getattr(provider, "tokenizer", None)


def _tokenize(self, tokenizer, request, args):
    """Where upstream tokenizes, in the generation thread: an error here goes back to the
    request (upstream answers it), never up the thread; a prompt of no tokens would."""
    from mlx_lm import server

    out = FIX.original(server.ResponseGenerator, "_tokenize")(self, tokenizer, request, args)
    if not out[0]:
        raise BadRequest("the prompt has no tokens")
    check_logit_bias(args.logits.logit_bias, tokenizer)
    return out


def do_POST(self):  # noqa: N802 - BaseHTTPRequestHandler's name
    from mlx_lm import server

    try:
        return FIX.original(server.APIHandler, "do_POST")(self)
    except UnicodeDecodeError as exc:  # the body, decoded before any response was sent
        send_error(self, 400, f"the body is not UTF-8: {exc}")
    except Answered:
        return


def do_GET(self):  # noqa: N802 - BaseHTTPRequestHandler's name
    from mlx_lm import server

    if self.path in POST_PATHS:
        return send_error(self, 405, f"{self.path} takes POST", allow="POST")
    return FIX.original(server.APIHandler, "do_GET")(self)


def scan_cache_dir(*args, **kwargs):
    """No Hugging Face cache yet (a fresh machine serving a local folder): no cached repos."""
    from huggingface_hub import scan_cache_dir as scan
    from huggingface_hub.errors import CacheNotFound

    try:
        return scan(*args, **kwargs)
    except CacheNotFound:
        return SimpleNamespace(repos=frozenset())


class RequestValidation(Fix):
    name = "request-validation"
    summary = "bad request input gets a 400 naming the field; none stops the generation thread"

    def needed(self) -> bool:
        from mlx_lm import server

        try:
            server.APIHandler.validate_model_parameters(_Probe())
        except (ValueError, Answered):
            return False  # this release (or the series, or this fix) refuses a non-string stop
        except Exception:
            return True
        return True

    def install(self, patcher: Patcher) -> None:
        from mlx_lm import server

        patcher.set(server.APIHandler, "validate_model_parameters", validate_model_parameters)
        patcher.set(server.APIHandler, "do_POST", do_POST)
        patcher.set(server.APIHandler, "do_GET", do_GET)
        if hasattr(server, "ResponseGenerator"):  # the generation thread (0.31 on)
            patcher.set(server.ResponseGenerator, "_tokenize", _tokenize)
        if hasattr(server, "scan_cache_dir"):
            patcher.set(server, "scan_cache_dir", scan_cache_dir)


class _Probe:
    """A request handler as upstream's validate_model_parameters sees it: every field
    passes (`_validate` accepts anything, unknown fields are None) but `stop`, which only
    a release or a series that checks the body's text refuses."""

    body = {"prompt": "x", "stop": 5}
    path = "/v1/completions"

    def __getattr__(self, name: str) -> None:
        return None

    def _validate(self, *args: Any, **kwargs: Any) -> None:
        return None

    def send_response(self, *args: Any) -> None:  # where this fix answers the probe itself
        return None

    send_header = end_headers = _set_completion_headers = send_response
    wfile = SimpleNamespace(write=len, flush=lambda: None)


FIX = RequestValidation()
