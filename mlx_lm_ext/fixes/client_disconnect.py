"""A client that disconnects stops its request within one prefill chunk or decode step.

Upstream (0.32.2) notices a disconnect only when it writes to the socket: a streamed
reply at its next chunk, a non-streamed one never (it writes once, at the end), so
`max_tokens: 1000000000` or a long prompt runs on for a client that left while every
other request waits (measured: the next request served after 208 s). In the sequential
path (--max-kv-size, draft models, images) a prompt's prefill never looks at the stop
flag at all. And each disconnect logs a 20-line BrokenPipe traceback. Here the handler
looks at its socket whenever prefill progress or a token reaches it and stops the request
when the client has gone; the sequential prefill stops at its next chunk; a disconnect
is one log line. Patch file: patches/0012-client-disconnect.patch.
"""

from __future__ import annotations

import logging
import select
import socket
from collections.abc import Iterator
from typing import Any

from .base import Fix, Patcher
from .request_validation import RequestView, handle_through

log = logging.getLogger("mlx_lm_ext")


class ClientGone(ConnectionResetError):
    """The client closed its connection while its request was being generated."""


class RequestCancelled(RuntimeError):
    """Raised in the generation thread to end a stopped request's prefill."""


def client_gone(sock: socket.socket) -> bool:
    """True once the peer has closed: readable with nothing to read (a pipelined next
    request is readable too, but has bytes). Never blocks."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""
    except (OSError, ValueError):
        return True


def _client_gone(self) -> bool:
    """APIHandler._client_gone, the series' name: has this handler's client left?"""
    return client_gone(self.connection)


class _Watched(RequestView):
    """Progress and tokens reach the handler only while its client is connected; else
    the request is stopped."""

    def generate(self, request: Any, args: Any, progress_callback: Any = None) -> Any:
        box: list[Any] = []

        def check() -> None:
            if self._handler._client_gone():
                for ctx in box:
                    ctx.stop()
                raise ClientGone("the client disconnected")

        def progress(*done: Any) -> None:
            check()
            if progress_callback is not None:
                progress_callback(*done)

        ctx, responses = self._inner.generate(request, args, progress_callback=progress)
        box.append(ctx)
        return ctx, _checked(responses, check)


def _checked(responses: Iterator[Any], check: Any) -> Iterator[Any]:
    for response in responses:
        check()
        yield response


def handle_completion(self, request, stop_words):
    from mlx_lm import server

    return handle_through(
        _Watched, FIX.original(server.APIHandler, "handle_completion"), self, request, stop_words
    )


def handle(self):
    """One line for a client that went away, where upstream logs a traceback."""
    from mlx_lm import server

    try:
        FIX.original(server.APIHandler, "handle")(self)
    except (BrokenPipeError, ConnectionResetError) as exc:
        self.close_connection = True
        log.info("client %s disconnected (%s); its request is stopped", self.client_address[0], exc)


class _StoppingQueue:
    """A request's reply queue as the sequential path fills it: a progress report of a
    stopped request raises instead, ending its prefill at that chunk."""

    def __init__(self, queue: Any) -> None:
        self._queue, self._ctx = queue, None

    def put(self, item: Any, *args: Any, **kwargs: Any) -> None:
        if hasattr(item, "_should_stop"):
            self._ctx = item
        elif isinstance(item, tuple) and self._ctx is not None and self._ctx._should_stop:
            raise RequestCancelled("the request was stopped during its prefill")
        self._queue.put(item, *args, **kwargs)


def _serve_single(self, request, *args, **kwargs):
    """Upstream's, its reply queue stopping a stopped request's prefill (0.32 passes a
    stream too, 0.31 does not)."""
    from mlx_lm import server

    rqueue, *rest = request
    serve = FIX.original(server.ResponseGenerator, "_serve_single")
    return serve(self, (_StoppingQueue(rqueue), *rest), *args, **kwargs)


class ClientDisconnect(Fix):
    name = "client-disconnect"
    summary = "a disconnected client's request stops within a prefill chunk or decode step"

    def needed(self) -> bool:
        from mlx_lm import server

        return not hasattr(server.APIHandler, "_client_gone")  # the series' check

    def install(self, patcher: Patcher) -> None:
        from mlx_lm import server

        handle_completion.__wrapped__ = server.APIHandler.handle_completion  # for needed() probes
        patcher.set(server.APIHandler, "handle_completion", handle_completion)
        patcher.set(server.APIHandler, "handle", handle)
        patcher.set(server.APIHandler, "_client_gone", _client_gone)
        if hasattr(server, "ResponseGenerator") and hasattr(server.ResponseGenerator, "_serve_single"):
            patcher.set(server.ResponseGenerator, "_serve_single", _serve_single)


FIX = ClientDisconnect()
