"""The server stops cleanly on SIGINT and SIGTERM, and stops when its model cannot load.

Upstream (0.32.2): SIGTERM kills the process wherever it is (no handler). SIGINT stops
the HTTP server, then joins the generation thread, which first finishes the request it
is in (with --max-kv-size and a stream in flight: still running after 15 s); and the
process often ends in "terminate called without an active exception" (exit 134, 4 of 6
SIGINTs with two streams in flight), torn down while MLX still runs. A model that fails
to load leaves the server listening, answering 503 and 404 to every request.
Here both signals stop the server one way: every in-flight request is stopped (a stream
gets its last event), the generation thread is joined for at most JOIN_S, the handlers
get GRACE_S to send their last bytes, and the process exits 0 without the interpreter's
teardown; 1 when the default model failed to load. A --model path that does not exist
exits 2 before serving (mlx_lm_ext/limits.py `check_model_path`, in the flag checks).
Patch file: patches/0013-server-lifecycle.patch.
"""

from __future__ import annotations

import _thread
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

from .base import Fix, Patcher

log = logging.getLogger("mlx_lm_ext")

JOIN_S = 3.0
GRACE_S = 1.5


def _in_flight() -> dict[int, Any]:
    return FIX.state.setdefault("in_flight", {})


def generate(self, request, args, progress_callback=None):
    """Upstream's generate, its request known until its last token is taken."""
    from mlx_lm import server

    ctx, responses = FIX.original(server.ResponseGenerator, "generate")(
        self, request, args, progress_callback=progress_callback
    )
    _in_flight()[id(ctx)] = ctx
    return ctx, _tracked(ctx, responses)


def _tracked(ctx: Any, responses: Iterator[Any]) -> Iterator[Any]:
    try:
        yield from responses
    finally:
        _in_flight().pop(id(ctx), None)


def stop_requests(self) -> int:
    """Stop every request in flight (ResponseGenerator.stop_requests, as in the series);
    returns how many."""
    stopping = list(_in_flight().values())
    for ctx in stopping:
        ctx.stop()
    return len(stopping)


def stop_and_join(self):
    """Stop every request, then the generation thread, then give the handlers GRACE_S
    to send their last bytes: bounded, never a request's length."""
    self.stop_requests()
    self._stop = True
    self._generation_thread.join(timeout=JOIN_S)
    if self._generation_thread.is_alive():
        log.warning("the generation thread did not stop within %.0f s; exiting anyway", JOIN_S)
    deadline = time.monotonic() + GRACE_S
    while _in_flight() and time.monotonic() < deadline:
        time.sleep(0.05)


def load_default(self):
    """Upstream's load of the served model; if it fails, the server stops (exit 1)."""
    from mlx_lm import server

    try:
        return FIX.original(server.ModelProvider, "load_default")(self)
    except Exception as exc:
        log.error("the model %s could not be loaded (%s); stopping the server", self.cli_args.model, exc)
        FIX.state["exit_code"] = 1
        _thread.interrupt_main()
        raise


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(*args: Any, **kwargs: Any) -> None:
    """Upstream's main with SIGTERM stopping it as SIGINT does; once it returns, the
    process exits at once, without tearing MLX down under a running thread."""
    from mlx_lm import server

    previous = signal.signal(signal.SIGTERM, _interrupt) if _main_thread() else None
    try:
        FIX.original(server, "main")(*args, **kwargs)
    except KeyboardInterrupt:  # before upstream's own handler was reached
        pass
    except OSError as exc:  # the port: upstream's generation thread would keep it alive
        log.error("the server could not start: %s", exc)
        FIX.state["exit_code"] = 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    code = FIX.state.get("exit_code", 0)
    log.info("server stopped (exit %d)", code)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


class ServerLifecycle(Fix):
    name = "server-lifecycle"
    summary = "SIGINT/SIGTERM stop the server within seconds (exit 0); a model that fails to load stops it"

    def needed(self) -> bool:
        from mlx_lm import server

        return hasattr(server, "ResponseGenerator") and not hasattr(server.ResponseGenerator, "stop_requests")

    def install(self, patcher: Patcher) -> None:
        from mlx_lm import server

        patcher.set(server, "main", main)
        patcher.set(server.ResponseGenerator, "stop_requests", stop_requests)
        patcher.set(server.ResponseGenerator, "generate", generate)
        patcher.set(server.ResponseGenerator, "stop_and_join", stop_and_join)
        patcher.set(server.ModelProvider, "load_default", load_default)


FIX = ServerLifecycle()
