"""How far a quantized KV cache moves the model: teacher-forced KL and top-1 agreement.

Greedy text diverges after the first flipped token and then says nothing more, so
quality is measured teacher-forced: the same tokens go through a 16-bit and a quantized
cache, and the next-token distributions are compared position by position, on the
decode path (one token at a time) that generation uses after the prompt.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten

from ..settings import KVSettings


@dataclass(frozen=True)
class Agreement:
    kl_mean: float
    kl_max: float
    top1: float
    positions: int


def decode_logprobs(model: Any, tokens: list[int], prefill: int, settings: KVSettings) -> mx.array:
    """Log-probs after each of tokens[prefill:], fed one at a time after a prefill.

    The cache is built and quantized exactly as generate_step does it: the patched
    factory (max_kv_size) and maybe_quantize_kv_cache after the prefill and each step.
    """
    from .measure import prefill as run_prefill

    cache = run_prefill(model, tokens[:prefill], settings, step=prefill)
    return step_logprobs(model, cache, tokens[prefill:], settings)


def step_logprobs(model: Any, cache: list[Any], tokens: list[int], settings: KVSettings) -> mx.array:
    """Log-probs after each token, fed one at a time and quantized after each step."""
    from .measure import quantize

    out = []
    for t in tokens:
        logits = model(mx.array([[t]]), cache=cache)[0, -1].astype(mx.float32)
        quantize(cache, settings)
        out.append(logits - mx.logsumexp(logits))
        mx.eval(out[-1])
    return mx.stack(out)


def prose(entries: int = 40) -> str:
    """English prose every Python has: the first `entries` topics of the standard
    library's pydoc_data (about 800 KB in all), for perplexity and KL on real text."""
    from pydoc_data.topics import topics

    return "\n".join(list(topics.values())[:entries])


def perplexity(model: Any, tokens: list[int], chunk: int = 512) -> float:
    """exp(mean NLL) of tokens[1:] given the ones before, with a 16-bit cache."""
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    nll, count = 0.0, 0
    for start in range(0, len(tokens) - 1, chunk):
        ids = tokens[start : min(start + chunk, len(tokens) - 1)]
        logits = model(mx.array([ids]), cache=cache)[0].astype(mx.float32)
        targets = mx.array(tokens[start + 1 : start + 1 + len(ids)])
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        nll += -mx.take_along_axis(logprobs, targets[:, None], axis=-1).sum().item()
        count += len(ids)
    return float(mx.exp(mx.array(nll / count)).item())


def agreement(reference: mx.array, candidate: mx.array) -> Agreement:
    """KL(reference || candidate) per position and top-1 agreement."""
    kl = (mx.exp(reference) * (reference - candidate)).sum(axis=-1)
    top1 = (reference.argmax(-1) == candidate.argmax(-1)).astype(mx.float32).mean()
    return Agreement(kl.mean().item(), kl.max().item(), top1.item(), reference.shape[0])


def layer_nbytes(cache: Any) -> int:
    """Bytes of one layer's buffers; releases before 0.31 have no `nbytes` on caches."""
    try:
        return cache.nbytes
    except (AttributeError, NotImplementedError):
        pass
    if hasattr(cache, "caches"):
        return sum(layer_nbytes(c) for c in cache.caches)
    held = cache.cache if hasattr(cache, "cache") else (cache.keys, cache.values)
    return sum(x.nbytes for _, x in tree_flatten(held) if isinstance(x, mx.array))


def cache_nbytes(cache: list[Any]) -> int:
    """Bytes held by a prompt cache's arrays (CacheList and quantized triples included)."""
    return sum(layer_nbytes(c) for c in cache)
