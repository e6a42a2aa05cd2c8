"""A prompt batch's KV buffers are allocated for the whole prompt, not grown by copies.

Upstream's BatchKVCache, and the quantized batch cache that keeps its growth, make room
for a prompt chunk by concatenating the rows so far with a new block: while a layer
writes its chunk, its old buffer and the new one are both alive, and on MLX's CUDA
backend two layers are in flight at once (`cuda-prefill` paces them). The copy grows
with the prompt: at the last chunk of 8 prompts of 32K tokens a Llama-3.1-8B layer's
old buffer is 1 GiB at 16 bits, held beside the new one. On the H200 that chunk peaked
5.62 GiB over what was active, 3.62 with this fix, as at the first chunk
(`benchmarks/capacity.py --timeline 12 --bits 16 8`); at 8 bits the last chunk peaked
the same with and without it.

BatchGenerator knows how many tokens each prompt in its prompt batch has left (its
segments). Here, for each prompt chunk, the batch caches are told the rows the longest
prompt still adds; the write that runs out of room allocates all of them at once, so
every later chunk writes in place. A 16-bit batch that BatchGenerator will convert to a
quantized one (`--kv-bits` with `--quantized-kv-start`) is left to grow as before:
reserving it at 16 bits would allocate the bytes quantization saves. The rows reserved
are the rows the prompt fills, so the peak can only fall; rotating caches are bounded by
their window and left alone.

Installed where MLX runs on CUDA, with `cuda-prefill`, where it is measured; on a CPU
the saving is small (one layer in flight). Upstream PR: patches/0023-prefill-reserve.patch,
the same reservation in BatchGenerator on every backend (`PromptProcessingBatch.prompt`
takes `reserve`, which this fix's detection looks for).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterator
from typing import Any

from . import cuda_prefill
from .base import Fix, Patcher
from .base import generate_module as _generate

_RUNNING: list[Any] = []  # the BatchGenerator whose step is running (its prompt batch's owner)


def rows_left(generator: Any, batch: Any, tokens: list[list[int]]) -> int | None:
    """The rows the batch's caches gain from this chunk to the end of its prompts: the
    largest chunk plus tokens still to come (BatchGenerator's `[segments, done, total]`
    per prompt, `done` counting this chunk); None where the generator does not say."""
    processing = getattr(generator, "_currently_processing", None)
    if getattr(generator, "_prompt_batch", None) is not batch or processing is None:
        return None
    if len(processing) != len(tokens) or not tokens:
        return None
    try:
        left = [total - done for _, done, total in processing]
    except (TypeError, ValueError):
        return None  # another release's bookkeeping
    return max(len(t) for t in tokens) + max(left)


def batch_caches(caches: list[Any]) -> Iterator[Any]:
    """Every BatchKVCache among a prompt batch's caches (CacheLists looked into)."""
    from mlx_lm.models.cache import BatchKVCache

    for c in caches:
        if hasattr(c, "caches"):
            yield from batch_caches(c.caches)
        elif isinstance(c, BatchKVCache):
            yield c


def reserving(caches: list[Any], rows: int, converts: bool) -> list[Any]:
    """Set each cache's growth step to `rows` (in its own steps) for this chunk: a write
    that runs out of room then allocates what the prompt needs. A 16-bit cache the
    generator converts to a quantized one is skipped. Returns the caches set."""
    chosen = [c for c in batch_caches(caches) if getattr(c, "bits", None) is not None or not converts]
    for c in chosen:
        step = type(c).step
        c.step = max(step, -(-rows // step) * step)
    return chosen


def prompt(original: Callable[..., Any]) -> Callable[..., Any]:
    """PromptProcessingBatch.prompt with its caches reserving the prompt's rows."""

    @functools.wraps(original)
    def prompt(self, tokens, *args: Any, **kwargs: Any) -> Any:
        generator = _RUNNING[-1] if _RUNNING else None
        rows = rows_left(generator, self, tokens)
        if not rows:
            return original(self, tokens, *args, **kwargs)
        converts = getattr(generator, "_quantize_cache_fn", None) is not None
        chosen = reserving(self.prompt_cache, rows, converts)
        try:
            return original(self, tokens, *args, **kwargs)
        finally:
            for c in chosen:
                vars(c).pop("step", None)  # decode grows by the class's step again

    return prompt


def step(original: Callable[..., Any]) -> Callable[..., Any]:
    """BatchGenerator._next, known to the prompt batch it drives while it runs."""

    @functools.wraps(original)
    def _next(self, *args: Any, **kwargs: Any) -> Any:
        _RUNNING.append(self)
        try:
            return original(self, *args, **kwargs)
        finally:
            _RUNNING.pop()

    return _next


class PrefillReserve(Fix):
    name = "prefill-reserve"
    summary = "prompt batches allocate their KV rows for the whole prompt (no copy a chunk)"

    def needed(self) -> bool:
        gen = _generate()
        owner = getattr(gen, "PromptProcessingBatch", None)
        if owner is None or not hasattr(gen.BatchGenerator, "_next"):
            return False  # releases before the prompt/generation batch split
        if "reserve" in inspect.signature(owner.prompt).parameters:
            return False  # the patch series' BatchGenerator reserves the rows itself
        return cuda_prefill.on_cuda()

    def install(self, patcher: Patcher) -> None:
        gen = _generate()
        patcher.set(gen.PromptProcessingBatch, "prompt", prompt(gen.PromptProcessingBatch.prompt))
        patcher.set(gen.BatchGenerator, "_next", step(gen.BatchGenerator._next))
        patcher.defer(_RUNNING.clear)


FIX = PrefillReserve()
