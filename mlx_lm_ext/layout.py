"""What kind of cache each layer holds, across every cache class mlx-lm builds.

Quantization, bounding and the layout tests all need the same answer to "what is this
layer's cache?", and an unknown class must stop with the model's name rather than be
skipped, so the classification lives in one place.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from typing import Any

# Kinds, in the vocabulary of models.yaml `layout`.
FULL = "kv"
SLIDING = "sliding"
RECURRENT = "recurrent"
QUANTIZED = "quantized"
QUANTIZED_SLIDING = "quantized-sliding"
CHUNKED = "chunked"
CONCAT = "concat"
LIST = "list"
BATCH = "batch"
BATCH_SLIDING = "batch-sliding"
BATCH_QUANTIZED = "batch-quantized"

# Checked in order: subclasses before their bases (ChunkedKVCache subclasses KVCache in
# some releases, MambaCache subclasses ArraysCache).
_CLASS_KINDS = (
    ("BatchKeepQuantizedRotatingKVCache", BATCH_QUANTIZED),
    ("BatchKeepRotatingKVCache", BATCH_SLIDING),
    ("BatchQuantizedRotatingKVCache", BATCH_QUANTIZED),
    ("BatchQuantizedKVCache", BATCH_QUANTIZED),
    ("QuantizedRotatingKVCache", QUANTIZED_SLIDING),
    ("QuantizedKVCache", QUANTIZED),
    ("ChunkedKVCache", CHUNKED),
    ("BatchRotatingKVCache", BATCH_SLIDING),
    ("BatchKVCache", BATCH),
    ("RotatingKVCache", SLIDING),
    ("KVCache", FULL),
    ("ConcatenateKVCache", CONCAT),
    ("ArraysCache", RECURRENT),
    ("CacheList", LIST),
)

# Which model built which cache object, so an error deep in generation can still name it.
_origin: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class UnknownCacheLayout(TypeError):
    """A cache class this project does not know how to quantize or bound."""


def _classes() -> list[tuple[type, str]]:
    from mlx_lm.models import cache as cache_mod

    from .caches import batch_keep_ring, batch_quantized, quantized_rotating

    # Ours and, where mlx-lm carries the patch series, upstream's class of the same name.
    found = []
    for name, kind in _CLASS_KINDS:
        for module in (batch_keep_ring, batch_quantized, quantized_rotating, cache_mod):
            cls = getattr(module, name, None)
            if cls is not None and (cls, kind) not in found:
                found.append((cls, kind))
    return found


def model_name(model: Any) -> str:
    """A model's type as config.json spells it, for messages."""
    for holder in (model, getattr(model, "args", None), getattr(model, "config", None)):
        name = getattr(holder, "model_type", None)
        if isinstance(name, str):
            return name
    return type(model).__module__.rsplit(".", 1)[-1]


def remember_origin(model: Any, caches: list[Any]) -> None:
    name = model_name(model)
    for c in caches:
        try:
            _origin[c] = name
        except TypeError:  # not weak-referenceable; the message will say "unknown model"
            pass


_BOUNDED = "_mlx_lm_ext_bounds_full_attention"


def mark_bounded(cache: Any) -> Any:
    """Record that a RotatingKVCache bounds a full-attention layer (max_kv_size), not a
    sliding window: `--keep-sliding-kv` keeps windows at full precision, never the bound.
    An attribute, not a weak map, so the mark survives the server's copies of the cache."""
    setattr(cache, _BOUNDED, True)
    return cache


def is_bounded(cache: Any) -> bool:
    return getattr(cache, _BOUNDED, False)


def origin(cache: Any) -> str:
    try:
        return _origin.get(cache, "unknown model")
    except TypeError:
        return "unknown model"


def classify(cache: Any, model: str | None = None) -> str:
    """The kind of one layer's cache; raises UnknownCacheLayout for a class we don't know."""
    for cls, kind in _classes():
        if isinstance(cache, cls):
            return kind
    raise UnknownCacheLayout(
        f"{model or origin(cache)}: cache class {type(cache).__module__}.{type(cache).__name__} "
        "is not a layout mlx-lm-ext knows how to quantize or bound; please report it"
    )


def children(cache: Any) -> list[Any]:
    """The caches inside a CacheList."""
    return list(cache.caches)


def leaves(caches: list[Any], model: str | None = None) -> Iterator[tuple[str, Any]]:
    """(kind, cache) of every cache, the members of CacheLists in their place."""
    for c in caches:
        kind = classify(c, model)
        yield from leaves(children(c), model) if kind == LIST else [(kind, c)]


def describe(caches: list[Any], model: str | None = None) -> list[str]:
    """Per-layer kinds; a CacheList reads `list(kv,recurrent)`."""
    out = []
    for c in caches:
        kind = classify(c, model)
        if kind == LIST:
            kind = f"list({','.join(describe(children(c), model))})"
        out.append(kind)
    return out
