"""On releases whose BatchGenerator this project cannot hook, --kv-bits serves one at a time.

Upstream: the server's batched path (BatchGenerator) never quantizes its caches; releases
before 0.32.0 have no kv_bits check in `_is_batchable`, so with kv flags added they would
batch and silently serve at 16 bits. On 0.31+ batched_quantized_kv.py makes batching
carry the quantized cache; on older releases (a different BatchGenerator) such requests
go through the sequential path, which quantizes, and the reason is logged once.
No patch file: the series (against 0.32.2) carries the batched path itself
(patches/0007-0009).
"""

from __future__ import annotations

import logging
import types

from ..settings import current
from . import batched_quantized_kv
from .base import Fix, Patcher

log = logging.getLogger("mlx_lm_ext")


def _is_batchable(self, args) -> bool:
    from mlx_lm import server

    if current().kv_bits is not None:
        if not FIX.state.get("logged"):
            FIX.state["logged"] = True
            log.info(
                "kv_bits is set: this mlx-lm's batched path cannot carry a quantized cache "
                "(mlx-lm-ext batches quantized requests on mlx-lm 0.31+); requests are served one at a time"
            )
        return False
    return FIX.original(server.ResponseGenerator, "_is_batchable")(self, args)


class _Anything(types.SimpleNamespace):
    """A stand-in whose attributes not given are None."""

    def __getattr__(self, name):
        return None


def refuses_quantized(method) -> bool:
    """Probe: does `_is_batchable` batch a request that it refuses once the server has
    kv_bits (upstream 0.32 reads `cli_args.kv_bits`)?"""

    def batchable(kv_bits) -> bool:
        server = _Anything(model_provider=_Anything(is_batchable=True), cli_args=_Anything(kv_bits=kv_bits))
        try:
            return bool(method(server, _Anything(seed=None)))
        except Exception:
            return False

    return batchable(None) and not batchable(8)


class BatchableFallback(Fix):
    name = "batchable-fallback"
    summary = "quantized KV requests take the sequential server path"

    def needed(self) -> bool:
        from mlx_lm import server

        method = getattr(getattr(server, "ResponseGenerator", None), "_is_batchable", None)
        return (
            method is not None
            and not batched_quantized_kv.supported()
            and method is not _is_batchable
            and not refuses_quantized(method)
        )

    def install(self, patcher: Patcher) -> None:
        from mlx_lm import server

        patcher.set(server.ResponseGenerator, "_is_batchable", _is_batchable)


FIX = BatchableFallback()
