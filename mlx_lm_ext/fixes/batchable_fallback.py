"""On releases whose BatchGenerator this project cannot hook, --kv-bits serves one at a time.

Upstream: the server's batched path (BatchGenerator) never quantizes its caches; releases
before 0.32.0 have no kv_bits check in `_is_batchable`, so with kv flags added they would
batch and silently serve at 16 bits. On 0.31+ batched_quantize.py makes batching carry
the quantized cache; on older releases (a different BatchGenerator) such requests go
through the sequential path, which quantizes, and the reason is logged once.
No patch file: the series (against 0.32.2) carries the batched path itself
(patches/0007-0009).
"""

from __future__ import annotations

import inspect
import logging

from ..settings import current
from . import batched_quantize
from .base import Fix, Patcher

log = logging.getLogger("mlx_lm_ext")
_state = {"original": None, "logged": False}


def _is_batchable(self, args) -> bool:
    if current().kv_bits is not None:
        if not _state["logged"]:
            _state["logged"] = True
            log.info(
                "kv_bits is set: this mlx-lm's batched path cannot carry a quantized cache "
                "(mlx-lm-ext batches quantized requests on mlx-lm 0.31+); requests are served one at a time"
            )
        return False
    return _state["original"](self, args)


class BatchableFallback(Fix):
    name = "batchable-fallback"
    summary = "quantized KV requests take the sequential server path"

    def needed(self) -> bool:
        from mlx_lm import server

        method = getattr(getattr(server, "ResponseGenerator", None), "_is_batchable", None)
        return (
            method is not None
            and not batched_quantize.supported()
            and method is not _is_batchable
            and ("kv_bits" not in inspect.getsource(method))
        )

    def install(self, patcher: Patcher) -> None:
        from mlx_lm import server

        _state["original"] = server.ResponseGenerator._is_batchable
        patcher.set(server.ResponseGenerator, "_is_batchable", _is_batchable)
