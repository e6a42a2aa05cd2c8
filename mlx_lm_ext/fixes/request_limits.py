"""No single request may cost the server without bound: prompt, max_tokens and body are limited.

Upstream (0.32.2) accepts any body size, any `max_tokens` and any prompt length: a 2 MB
prompt (~1.1M tokens) was prefilled for about 74 minutes on CPU with --max-kv-size 256,
other requests timing out meanwhile. Here the server takes --max-prompt-tokens,
--max-tokens-limit and --max-body-bytes (defaults in mlx_lm_ext/limits.py: the model's
context, or --max-kv-size where smaller; 32 MB), and a request past one gets 400 naming
the limit, 413 for the body, before it is read or queued; the prompt's length, known once
the generation thread has tokenized it, is checked there, before its prefill. An error of
the request found in the generation thread (a ValueError) is answered 400, not 404.
`max_tokens` below 1 is refused on every release (0.31 let a prompt-cache hit answer it).
Patch file: patches/0011-request-limits.patch.
"""

from __future__ import annotations

import argparse
import inspect
from typing import Any

from .. import limits
from ..cli import ServerArgumentParser
from .base import Fix, Patcher
from .request_validation import POST_PATHS, Answered, BadRequest, RequestView, handle_through, send_error
from .server_kv_flags import _argparse_with


def _served_model(provider: Any) -> str | None:
    key = getattr(provider, "model_key", None)
    return key[0] if key else getattr(provider.cli_args, "model", None)


def do_POST(self):  # noqa: N802 - BaseHTTPRequestHandler's name
    """The body's size, from its Content-Length, before a byte of it is read."""
    from mlx_lm import server

    size = self.headers.get("Content-Length") if self.path in POST_PATHS else None
    limit = getattr(self.response_generator.cli_args, "max_body_bytes", None)
    if size is not None and size.strip().lstrip("-").isdigit():
        if int(size) < 0:
            return send_error(self, 400, f"Content-Length {size} is negative")
        if limit and int(size) > limit:
            self.close_connection = True  # the unread body must not be taken for a request
            message = f"the body is {size} bytes; this server takes at most {limit} (--max-body-bytes)"
            return send_error(self, 413, message)
    try:
        return FIX.original(server.APIHandler, "do_POST")(self)
    except Answered:
        return


def validate_model_parameters(self) -> None:
    """max_tokens between 1 and the limit, with upstream's checks."""
    from mlx_lm import server

    FIX.original(server.APIHandler, "validate_model_parameters")(self)
    provider = self.response_generator.model_provider
    limit = limits.max_new_tokens(provider.cli_args, _served_model(provider))
    asked = self.max_tokens
    if not isinstance(asked, int) or isinstance(asked, bool) or asked < 1:
        _refuse(self, f"max_tokens must be a positive integer, got {asked!r}")
    if limit and asked > limit:
        _refuse(self, f"max_tokens {asked} is more than this server's limit of {limit} (--max-tokens-limit)")


def _refuse(handler, message: str) -> None:
    send_error(handler, 400, message)
    raise Answered


def _tokenize(self, tokenizer, request, args):
    """The prompt's length, once known, against the limit: before any prefill."""
    from mlx_lm import server

    out = FIX.original(server.ResponseGenerator, "_tokenize")(self, tokenizer, request, args)
    limit = limits.max_prompt_tokens(self.cli_args, _served_model(self.model_provider))
    if limit and len(out[0]) > limit:
        raise BadRequest(
            f"the prompt has {len(out[0])} tokens; this server takes at most {limit} (--max-prompt-tokens)"
        )
    return out


class _Answering(RequestView):
    """An error of the request raised by the generation thread (a ValueError) is
    answered 400 here, not 404 by upstream."""

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return self._inner.generate(*args, **kwargs)
        except ValueError as exc:
            send_error(self._handler, 400, str(exc))
            raise Answered from exc


def handle_completion(self, request, stop_words):
    from mlx_lm import server

    try:
        return handle_through(
            _Answering, FIX.original(server.APIHandler, "handle_completion"), self, request, stop_words
        )
    except Answered:
        return


class RequestLimits(Fix):
    name = "request-limits"
    summary = "--max-prompt-tokens, --max-tokens-limit, --max-body-bytes: 400/413 past a limit"

    def needed(self) -> bool:
        """Whether the handler reads a body limit (the series', or this fix's, do_POST);
        the flags alone say nothing: our parser adds them to every release."""
        from mlx_lm import server

        return "max_body_bytes" not in inspect.getsource(server.APIHandler.do_POST)

    def install(self, patcher: Patcher) -> None:
        from mlx_lm import server

        if server.argparse is argparse:  # server-kv-flags not in force: the flags come here
            patcher.set(server, "argparse", _argparse_with(ServerArgumentParser), expected=argparse)
        patcher.set(server.APIHandler, "do_POST", do_POST)
        patcher.set(server.APIHandler, "validate_model_parameters", validate_model_parameters)
        handle_completion.__wrapped__ = server.APIHandler.handle_completion  # for needed() probes
        patcher.set(server.APIHandler, "handle_completion", handle_completion)
        if hasattr(server, "ResponseGenerator"):
            patcher.set(server.ResponseGenerator, "_tokenize", _tokenize)


FIX = RequestLimits()
