"""A request that fails during generation gets an error response.

Upstream: an exception raised while tokens are produced (e.g. "RotatingKVCache
Quantization NYI" on the first quantization step) escapes the HTTP handler after the 200
status line was buffered, so the client waits for a reply that never comes (measured on
0.32.2: curl gave up after 30 s). Here the handler answers instead: a JSON error with
status 500, or, once a stream has started, an error event and `[DONE]`. The generation
thread already survives such errors, so the next request is served.
Patch file: patches/0006-request-errors.patch.
"""

from __future__ import annotations

import json
import logging

from .base import Fix, Patcher

log = logging.getLogger("mlx_lm_ext")


def error_body(exc: BaseException) -> dict:
    return {"error": {"message": f"{type(exc).__name__}: {exc}", "type": "server_error"}}


def send_error(handler, exc: BaseException) -> None:
    body = json.dumps(error_body(exc))
    if getattr(handler, "stream", False):
        handler.wfile.write(f"data: {body}\n\ndata: [DONE]\n\n".encode())
    else:
        handler._headers_buffer = []  # drop the buffered 200 status line
        handler.send_response(500)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body.encode())
    handler.wfile.flush()


def handle_completion(self, request, stop_words):
    try:
        from mlx_lm import server

        return FIX.original(server.APIHandler, "handle_completion")(self, request, stop_words)
    except (BrokenPipeError, ConnectionResetError):
        raise
    except Exception as exc:
        log.error("request failed during generation: %s: %s", type(exc).__name__, exc)
        send_error(self, exc)


class RequestErrors(Fix):
    name = "request-errors"
    summary = "a request failing mid-generation gets an error response"

    def needed(self) -> bool:
        from mlx_lm import server

        method = server.APIHandler.handle_completion
        while method is not None:  # through the wrappers of later fixes (their __wrapped__)
            names = method.__code__.co_names  # ours or the series' error path (0006-request-errors)
            if method is handle_completion or {"send_error", "_send_generation_error"} & set(names):
                return False
            method = getattr(method, "__wrapped__", None)
        return True

    def install(self, patcher: Patcher) -> None:
        from mlx_lm import server

        patcher.set(server.APIHandler, "handle_completion", handle_completion)


FIX = RequestErrors()
