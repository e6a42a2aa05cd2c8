"""Long caches without long prefills: what the memory tests, benchmarks and report share.

Bytes and decode speed depend on the shapes a cache holds, not on the values: a real
prefill of the first tokens fixes each layer's key/value shapes, then random keys and
values of those shapes go straight into each layer's own `update_and_fetch`, which is
all a cache ever sees of a model. A 32K-token cache of a stand-in takes a second this
way, against minutes of bf16 attention on a CPU. Quality is never measured on such a
cache: `quality.decode_logprobs` runs real tokens.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import random
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import replace
from typing import Any

import mlx.core as mx

from .. import layout
from ..settings import KVSettings


def attention_layers(cache: list[Any]) -> list[Any]:
    """Every cache object that holds keys and values, CacheList contents included."""
    out = []
    for layer in cache:
        if hasattr(layer, "caches"):
            out += attention_layers(layer.caches)
        elif layout.classify(layer) != layout.RECURRENT:
            out.append(layer)
    return out


def _random(like: mx.array, n: int) -> mx.array:
    b, h, _, d = like.shape
    return mx.random.normal((b, h, n, d)).astype(like.dtype)


def quantize(cache: list[Any], settings: KVSettings) -> None:
    """Quantize the cache as generate_step does after each chunk and step."""
    generate = importlib.import_module("mlx_lm.generate")
    generate.maybe_quantize_kv_cache(cache, settings.start, settings.kv_group_size, settings.kv_bits)


def prefill(model: Any, ids: list[int], settings: KVSettings, step: int = 512) -> list[Any]:
    """The model's prompt cache after `ids`, in chunks of `step`, quantized after each.

    Chunks of 512 rather than generate_step's 2048: sliding layers then attend over at
    most window + 512 keys per chunk, which is what keeps a CPU prefill short.
    """
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model, max_kv_size=settings.max_kv_size)
    extend(model, cache, ids, settings, step)
    return cache


def extend(
    model: Any,
    cache: list[Any],
    ids: list[int],
    settings: KVSettings,
    step: int,
    progress: Callable[[int], Any] | None = None,
) -> None:
    """Feed `ids` into an existing cache in chunks of `step`, quantizing after each.

    `progress` is called with each chunk's token count (a progress bar's update).
    """
    for i in range(0, len(ids), step):
        chunk = ids[i : i + step]
        model(mx.array(chunk)[None], cache=cache)
        quantize(cache, settings)
        mx.eval([c.state for c in cache])
        if progress is not None:
            progress(len(chunk))


def filled_cache(model: Any, n_tokens: int, settings: KVSettings, prefill_tokens: int = 512) -> list[Any]:
    """The model's prompt cache under `settings`, holding n_tokens (see module docstring).

    The first `prefill_tokens` run through the model (and the cache is quantized as
    generation does it, from `settings.start`); the rest arrive as random keys and values
    in chunks of that size, the last token alone so that a ring trims there.
    """
    tokens = [(i * 7919) % 500 + 5 for i in range(min(prefill_tokens, n_tokens))]
    cache = prefill(model, tokens, replace(settings, kv_bits=None), step=len(tokens))
    shapes = [(c.keys[..., :1, :], c.values[..., :1, :]) for c in attention_layers(cache)]
    quantize(cache, settings)  # after reading the unquantized shapes
    done = len(tokens)
    while done < n_tokens:
        n = min(prefill_tokens, n_tokens - done - 1) or 1
        for c, (k, v) in zip(attention_layers(cache), shapes, strict=True):
            c.update_and_fetch(_random(k, n), _random(v, n))
        mx.eval([c.state for c in cache])
        done += n
        quantize(cache, settings)
    return cache


def generation_rate(model: Any, cache: list[Any], steps: int = 32, warmup: int = 2) -> float:
    """Tokens per second as mlx-lm's own `generate_step` yields them on this cache.

    It builds each step's graph while the device still runs the one before (async_eval),
    as `mlx_lm.generate` and the server do, so the cost of dispatching ops overlaps the
    kernels instead of adding to them as in `decode_rate`.
    """
    return steps / sum(generation_times(model, cache, steps, warmup))


def generation_times(model: Any, cache: list[Any], steps: int = 32, warmup: int = 2) -> list[float]:
    """Seconds from each token `generate_step` yields to the next, `steps` of them after
    `warmup` tokens (what `settled_rate` reads)."""
    from mlx_lm.generate import generate_step

    tokens = generate_step(mx.array([7]), model, max_tokens=steps + warmup, prompt_cache=cache)
    return _intervals(tokens, skip=warmup)


def decode_rate(model: Any, cache: list[Any], steps: int = 32, warmup: int = 2) -> float:
    """Tokens per second of one-token decode steps through the model on this cache, each
    evaluated before the next is built (dispatch and kernels add up)."""
    return steps / sum(decode_times(model, cache, steps, warmup))


def decode_times(model: Any, cache: list[Any], steps: int = 32, warmup: int = 2) -> list[float]:
    """Seconds of each of `steps` decode steps as `decode_rate` runs them (for `settled_rate`)."""
    token = mx.array([[7]])
    for _ in range(warmup):
        mx.eval(model(token, cache=cache))
    return _intervals(mx.eval(model(token, cache=cache)) for _ in range(steps))


def _intervals(events: Iterable[Any], skip: int = 0) -> list[float]:
    """Seconds from each item `events` yields to the next (the first from the start),
    the first `skip` left out, with the cyclic collector off."""
    times = []
    with no_gc():
        tic = time.perf_counter()
        for n, _ in enumerate(events):
            toc = time.perf_counter()
            if n >= skip:
                times.append(toc - tic)
            tic = toc
    return times


@contextlib.contextmanager
def no_gc() -> Iterator[None]:
    """Timed decode without Python's cyclic collector, whose passes over the objects a
    step makes land in some timed blocks and not others."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def offsets(cache: list[Any]) -> list[int]:
    """Each attention layer's offset: what `cut_back` returns the layers to."""
    return [c.offset for c in attention_layers(cache)]


def cut_back(cache: list[Any], marks: list[int]) -> bool:
    """Trim each attention layer back to its offset in `marks` (`offsets` taken before a
    block), so that every round of a benchmark decodes at the context it names: uncut, 8
    rounds of two 256-token blocks took a 2K cache past 6K, and on this CPU the same
    16-bit decode slowed 2.2x from the first round to the last.

    Layers that cannot trim but do not grow are left as they are: a ring that has wrapped
    holds its window at any offset, recurrent state has one size. Gemma's global layers
    are trimmed beside its wrapped sliding rings (before, one wrapped ring left the whole
    cache uncut: 11 rounds took a "4K" row's global layers near 10K). False where a layer
    grew and cannot trim."""
    held = True
    for layer, mark in zip(attention_layers(cache), marks, strict=True):
        if layer.offset == mark:
            continue
        if layer.is_trimmable():
            layer.trim(layer.offset - mark)
        else:
            held = held and _full_ring(layer)
    return held


def _full_ring(layer: Any) -> bool:
    """A ring holding its whole window: decoding on does not grow it."""
    size = getattr(layer, "max_size", None)
    return size is not None and layer.offset >= size


def bootstrap_interval(
    items: Sequence[Any], statistic: Callable[[list[Any]], float], draws: int = 2000
) -> tuple[float, float]:
    """95% interval of `statistic` over `items` resampled with replacement (seeded: the
    same data give the same interval). A median of a few noisy rounds reads as a figure;
    its interval says whether two settings can be told apart at all."""
    rng = random.Random(0)
    boot = sorted(statistic([rng.choice(items) for _ in items]) for _ in range(draws))
    return boot[int(0.025 * draws)], boot[int(0.975 * draws) - 1]


def interleaved(measures: dict[Any, Callable[[], Any]], rounds: int) -> dict[Any, list[Any]]:
    """Every measurement `rounds` times, taking turns (all once, then all again in the
    reverse order, ...).

    On a shared host the same 16-bit decode ranged 69-122 tok/s within one process (H100
    machine, 32K tokens); measuring settings one after another lets that drift pass for a
    difference between them, while turns spread it over all of them alike (take medians).
    Reversing every other round gives each setting the same mean place in a round, so a
    drift within rounds favours none.
    """
    results: dict[Any, list[Any]] = {key: [] for key in measures}
    for r in range(rounds):
        for key in list(measures)[:: -1 if r % 2 else 1]:
            results[key].append(measures[key]())
    return results


def settled_rate(blocks: Sequence[Sequence[float]], quantile: float = 0.25) -> float:
    """Tokens per second of a decode as a quiet host runs it, from blocks of per-token
    seconds that each start from the same cache (kv_speed cuts it back after a block).

    A host that other work slows (a shared machine's neighbours, 2 busy processes on this
    2-core CPU) slows stretches of tokens, and a block's mean carries whatever happened
    meanwhile. A low quantile of all tokens would drop the slow ones a setting causes
    itself (a decode tail's flush every 64 tokens, a buffer grown every 256). So the
    quantile is taken per token position over the blocks, and the rate is the block's
    length over the sum of those: every position's own cost counts once, at the time a
    quarter of the rounds reached.
    """
    times = [quantile_of(position, quantile) for position in zip(*blocks, strict=True)]
    return len(times) / sum(times)


def quantile_of(values: Sequence[float], q: float) -> float:
    """The value at fraction `q` of the sorted values (no interpolation: one of them)."""
    ordered = sorted(values)
    return ordered[int(q * (len(ordered) - 1))]
