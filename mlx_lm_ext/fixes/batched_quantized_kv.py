"""Continuous batching carries a quantized KV cache: --kv-bits no longer serializes requests.

Upstream: BatchGenerator never quantizes (nor could its batch caches, before
batch_quantized_cache.py and batch_quantized_rotating_cache.py), so mlx-lm 0.32 turns batching off when
the server has `--kv-bits` (`_is_batchable`) and N concurrent requests are served one
after another (mlx-lm #1353 and the seed PR). Here the batch caches quantize into
caches/batch_quantized.py's classes; BatchGenerator takes `kv_bits`, `kv_group_size` and
`quantized_kv_start` (default: the process settings, i.e. the server's flags) and after
each step converts every batch whose longest request has crossed `quantized_kv_start`;
caches of one layer that meet at a merge or a join are brought to one precision; a
waiting request joins the prompt batch only if its cache is at the batch's precision
(else it waits for a prompt batch of its own, so its chunks attend as they would alone);
and the server batches quantized requests wherever this path covers the model's layout, falling
back to one-at-a-time serving (logged once) where it does not.
Needs batch_quantized_cache.py and batch_quantized_rotating_cache.py (the classes).
Patch file: patches/0009-batched-quantized-kv.patch.
"""

from __future__ import annotations

import functools
import inspect
import logging
from typing import Any

from .. import layout
from ..caches import batch_quantized as bq
from ..settings import current
from .base import Fix, Patcher
from .base import generate_module as _generate
from .hybrid_quantize import maybe_quantize_kv_cache

log = logging.getLogger("mlx_lm_ext")
COVERED = {layout.FULL, layout.SLIDING, layout.RECURRENT}


def supported() -> bool:
    """Does the installed BatchGenerator have the structure this fix hooks (0.31+)?"""
    gen = _generate()
    batch = getattr(gen, "BatchGenerator", None)
    return all(hasattr(gen, f) for f in ("_merge_caches", "_extend_cache")) and hasattr(batch, "_next")


def _keeps_batched() -> bool:
    from .batch_keep_ring import keeps_batched

    return keeps_batched()


def uncovered(model: Any) -> str | None:
    """Why batching cannot serve this model's layout as the sequential path does, or None.

    Upstream's batch rings drop a RotatingKVCache's `keep` tokens (BatchRotatingKVCache
    has no `keep`), so without batch-keep-ring caches bounded by --max-kv-size (keep=4)
    are served one at a time whatever the precision; a layout with no batched quantized
    form is, with --kv-bits.
    """
    from mlx_lm.models.cache import make_prompt_cache

    name = layout.model_name(model)
    try:
        for kind, c in layout.leaves(make_prompt_cache(model), name):
            if kind == layout.SLIDING and c.keep > 0 and not _keeps_batched():
                return f"{name}: RotatingKVCache layers keep {c.keep} tokens, which batch caches drop"
            if kind not in COVERED and current().kv_bits is not None:
                return f"{name}: {type(c).__name__} layers ({kind}) have no batched quantized form"
    except layout.UnknownCacheLayout as exc:
        return str(exc)
    return None


def _extend_cache(cache_a, cache_b):
    """mlx_lm.generate._extend_cache, first bringing each layer's pair to one precision."""
    if not cache_a:
        return cache_b
    if not cache_b:
        return cache_a
    for i, (ca, cb) in enumerate(zip(cache_a, cache_b, strict=True)):
        ca, cb = bq.align_precision(ca, cb)
        ca.extend(cb)
        cache_a[i] = ca
    return cache_a


# --- BatchGenerator: kv arguments and the conversion after each step ------------------


def _init(
    self,
    model,
    *args,
    kv_bits=None,
    kv_group_size=None,
    quantized_kv_start=None,
    kv_value_bits=None,
    kv_rotate=None,
    **kwargs,
):
    """BatchGenerator.__init__ with upstream generate_step's three kv arguments and the
    patch series' kv_value_bits and kv_rotate."""
    FIX.original(_generate().BatchGenerator, "__init__")(self, model, *args, **kwargs)
    settings = current()
    bits = kv_bits if kv_bits is not None else settings.kv_bits
    self._quantize_cache_fn = None
    if bits is not None:
        self._quantize_cache_fn = functools.partial(
            maybe_quantize_kv_cache,
            quantized_kv_start=settings.start if quantized_kv_start is None else quantized_kv_start,
            kv_group_size=kv_group_size or settings.kv_group_size,
            kv_bits=bits,
            kv_value_bits=kv_value_bits,
            kv_rotate=kv_rotate,
        )


def _next(self):
    """One BatchGenerator step (a decode step and a prompt chunk), then the conversion.

    Upstream's step moves waiting requests into the prompt batch; here only those whose
    caches are at the batch's precision join it (`_admitted`), the rest wait, in order,
    for a prompt batch of their own.
    """
    step = FIX.original(_generate().BatchGenerator, "_next")
    waiting = self._unprocessed_sequences
    n = _admitted(self, waiting)
    if n == len(waiting):
        return _quantize_after(self, step(self))
    held = list(waiting)[n:]
    self._unprocessed_sequences = type(waiting)(list(waiting)[:n])
    try:
        responses = step(self)
    finally:
        self._unprocessed_sequences.extend(held)
    return _quantize_after(self, responses)


def _admitted(self, waiting) -> int:
    """How many of the waiting requests may join the prompt batch now: the leading run
    whose caches are at its precision (the first one's, if it is empty).

    Alone, a request with a 16-bit cache attends to its first chunk at 16 bits; in a
    quantized batch it would attend to it quantized, which on real Gemma 3 270M moved
    its first token 7x what 8-bit quantization does. And one quantized request makes a
    16-bit batch convert (`_extend_cache`), quantizing the others' chunks early.
    """
    batch = self._prompt_batch
    want = _holds_quantized(batch.prompt_cache) if len(batch) else None
    n = 0
    for sequence in waiting:
        quantized = _holds_quantized(sequence[3])
        want = quantized if want is None else want
        if quantized != want:
            break
        n += 1
    return n


def _holds_quantized(caches) -> bool:
    """Is any cache in this list (CacheLists looked into) quantized?"""
    return any(
        _holds_quantized(c.caches) if hasattr(c, "caches") else bq.is_quantized(c) for c in caches or []
    )


def _quantize_after(self, responses):
    """Convert every batch whose longest request has crossed quantized_kv_start."""
    quantize = getattr(self, "_quantize_cache_fn", None)
    if quantize is not None:
        for batch in (self._prompt_batch, self._generation_batch):
            if batch.prompt_cache:
                layout.remember_origin(self.model, batch.prompt_cache[:1])  # the log line reads [0]
                quantize(batch.prompt_cache)
    return responses


# --- server: batch quantized requests where the layout is covered ---------------------


def _is_batchable(self, args) -> bool:
    """Batch quantized requests too, except for layouts batching cannot serve (logged once)."""
    model = self.model_provider.model
    reason = _coverage(model) if model is not None else None  # None: upstream's own check
    if reason is not None:
        logged = FIX.state.setdefault("logged", set())
        if reason not in logged:
            logged.add(reason)
            log.info("%s: requests are served one at a time", reason)
        return False
    if current().kv_bits is None:
        from mlx_lm import server

        return FIX.original(server.ResponseGenerator, "_is_batchable")(self, args)
    return self.model_provider.is_batchable and args.seed is None


def _coverage(model: Any) -> str | None:
    key = (id(model), current().kv_bits is not None, current().max_kv_size)
    coverage = FIX.state.setdefault("coverage", {})  # cleared by revert, with the models it names
    if key not in coverage:
        coverage[key] = uncovered(model)
    return coverage[key]


class BatchedQuantizedKV(Fix):
    name = "batched-quantized-kv"
    summary = "continuous batching with a quantized KV cache (batch caches quantize; --kv-bits batches)"

    def needed(self) -> bool:
        gen = _generate()
        return supported() and "kv_bits" not in inspect.signature(gen.BatchGenerator.__init__).parameters

    def install(self, patcher: Patcher) -> None:
        from mlx_lm import server

        gen = _generate()
        patcher.rebind(gen._extend_cache, _extend_cache)
        patcher.set(gen.BatchGenerator, "__init__", _init)
        patcher.set(gen.BatchGenerator, "_next", _next)
        patcher.set(server.ResponseGenerator, "_is_batchable", _is_batchable)


FIX = BatchedQuantizedKV()
