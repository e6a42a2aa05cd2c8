"""What each KV setting costs in answers, on real text: the quality sweep users pick bits by.

Every setting is judged on the same tokens, teacher-forced: the text goes through the
model once per setting, in lockstep (one chunk for every cache, then the next), and at
the scored positions each setting's next-token distribution is compared with the 16-bit
cache's: KL(16-bit || setting), its mean and 99th percentile, top-1 agreement, and the
perplexity of the text's own next tokens. Lockstep keeps one chunk of logits alive at a
time (Gemma's 262K vocabulary makes a whole run's logits gigabytes).

A chunk of queries attends to the cache exactly as a decode step does: the quantized
caches quantize the chunk's keys and values before attending, token by token (groups
run along the head dim), so scoring a chunk of 256 equals scoring 256 decode steps up to
float summation order, at a fraction of the cost. As generation does with
`quantized_kv_start=0`, the first chunk attends at 16 bits and the cache is converted
after it; the scored windows lie past it. Layers can be quantized selectively (only the
sliding ones, only the late half, ...) to find where the error comes from.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx

from .. import layout
from ..caches import kv_format

CHUNK = 256  # tokens per lockstep chunk; context points and scored windows are multiples
LAYER_SETS = ("all", "sliding", "global", "early", "late")


@dataclass(frozen=True)
class Choice:
    """One KV setting: bits and group, and which layers it quantizes.

    `bits` is the keys' width and the values' unless `value_bits` is set (the server's
    `--kv-key-bits/--kv-value-bits`); `rotate` is `--kv-rotate` (None, "keys", "all").
    `layers` picks the quantized layers for attribution: all of them (what `--kv-bits`
    does), only the sliding-window or only the full-attention ones, or only the first or
    second half of the stack. `keep_sliding` is the server's `--keep-sliding-kv`.
    """

    bits: int | None
    group: int = 64
    layers: str = "all"
    keep_sliding: bool = False
    value_bits: int | None = None
    rotate: str | None = None

    @property
    def widths(self) -> tuple[int, int] | None:
        """(key bits, value bits), or None at 16 bits."""
        return None if self.bits is None else (self.bits, self.value_bits or self.bits)

    @property
    def fmt(self) -> dict[str, Any]:
        """What `to_quantized` takes beyond group and bits (empty: uniform, unrotated)."""
        return kv_format.format_args(self.bits, self.value_bits, self.rotate)

    @property
    def label(self) -> str:
        if self.bits is None:
            return "16-bit"
        key, value = self.widths
        out = f"{key}-bit g{self.group}" if key == value else f"K{key}V{value} g{self.group}"
        out += {None: "", "keys": " rot", "all": " rot-kv"}[self.rotate]
        if self.keep_sliding:
            out += " keep-sliding"
        if self.layers != "all":
            out += f" only {self.layers}"
        return out

    def quantizes(self, index: int, n_layers: int, sliding: bool) -> bool:
        """Whether this setting quantizes layer `index` (of n_layers; `sliding`: its kind)."""
        if self.bits is None or (sliding and self.keep_sliding):
            return False
        return {
            "all": True,
            "sliding": sliding,
            "global": not sliding,
            "early": index < n_layers // 2,
            "late": index >= n_layers // 2,
        }[self.layers]


@dataclass(frozen=True)
class Scores:
    """A setting's figures over one scored window, against the 16-bit cache."""

    context: int
    positions: int
    kl_mean: float
    kl_p99: float
    top1: float
    ppl_16: float
    ppl: float

    @property
    def ppl_change(self) -> float:
        """Relative perplexity change against 16-bit (0.01: 1% worse)."""
        return self.ppl / self.ppl_16 - 1.0


def windows(points: Sequence[int], window: int) -> list[tuple[int, int]]:
    """The scored [start, end) spans: the last `window` positions before each point."""
    for p in points:
        if p % CHUNK or window % CHUNK or window > p - CHUNK:
            raise ValueError(
                f"context {p} and window {window} must be multiples of {CHUNK}, "
                f"the window past the first chunk (which attends at 16 bits)"
            )
    return [(p - window, p) for p in points]


def _sliding(cache: Any) -> bool:
    return layout.classify(cache) in (layout.SLIDING, layout.QUANTIZED_SLIDING)


def quantize(cache: list[Any], choice: Choice) -> None:
    """Convert the layers `choice` quantizes (each once), as maybe_quantize_kv_cache would."""
    from ..fixes.hybrid_quantize import quantize_layer

    for i, c in enumerate(cache):
        if choice.quantizes(i, len(cache), _sliding(c)):
            cache[i], _, _ = quantize_layer(c, 0, choice.group, choice.bits, sliding=True, fmt=choice.fmt)


def _forward(model: Any, ids: list[int], cache: list[Any], scored: bool) -> mx.array | None:
    """Log-probs of a chunk when scored; otherwise only the layers run (the head skipped:
    for Gemma's 262K vocabulary the head costs more than the layers)."""
    x = mx.array(ids)[None]
    inner = getattr(model, "model", None)
    if not scored and callable(inner):
        mx.eval(inner(x, cache=cache))
        return None
    logits = model(x, cache=cache)[0].astype(mx.float32)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def lockstep(
    model: Any,
    tokens: list[int],
    choices: Sequence[Choice],
    points: Sequence[int],
    window: int = CHUNK,
    progress: Callable[[int], Any] | None = None,
) -> dict[Choice, list[Scores]]:
    """Scores of every choice at every context point (see the module docstring).

    `tokens` holds at least max(points) + 1 tokens (the last scored position's target).
    `progress` is called with the tokens each setting's chunk fed (a progress bar).
    """
    from mlx_lm.models.cache import make_prompt_cache

    spans = windows(points, window)
    end = max(points)
    if len(tokens) < end + 1:
        raise ValueError(f"{len(tokens)} tokens: the text must hold {end + 1}")
    reference = Choice(None)
    runs = [reference, *[c for c in choices if c != reference]]
    caches = {c: make_prompt_cache(model) for c in runs}
    per_position: dict[Choice, list[mx.array]] = {c: [] for c in runs}
    for start in range(0, end, CHUNK):
        ids = tokens[start : start + CHUNK]
        scored = any(a <= start < b for a, b in spans)
        targets = mx.array(tokens[start + 1 : start + 1 + len(ids)])
        ref = None
        for c in runs:
            logprobs = _forward(model, ids, caches[c], scored)
            quantize(caches[c], c)
            if logprobs is not None:
                ref = logprobs if c is reference else ref
                per_position[c].append(_position_figures(ref, logprobs, targets))
            if progress is not None:
                progress(len(ids))
    return {c: _windows(per_position[reference], per_position[c], spans) for c in runs if c is not reference}


def _position_figures(ref: mx.array, cand: mx.array, targets: mx.array) -> mx.array:
    """Per position: KL(ref || cand), top-1 agreement, the reference's and cand's NLL."""
    kl = (mx.exp(ref) * (ref - cand)).sum(axis=-1)
    same = (ref.argmax(-1) == cand.argmax(-1)).astype(mx.float32)
    nll_ref = -mx.take_along_axis(ref, targets[:, None], axis=-1)[:, 0]
    nll = -mx.take_along_axis(cand, targets[:, None], axis=-1)[:, 0]
    out = mx.stack([kl, same, nll_ref, nll], axis=-1)
    mx.eval(out)
    return out


def _windows(ref_rows: list[mx.array], rows: list[mx.array], spans: list[tuple[int, int]]) -> list[Scores]:
    """Per scored span, the statistics of its positions (rows come chunk by chunk, in order)."""
    import numpy as np

    scored_starts = sorted({s for a, b in spans for s in range(a, b, CHUNK)})
    by_start = {s: np.array(r) for s, r in zip(scored_starts, rows, strict=True)}
    out = []
    for a, b in spans:
        m = np.concatenate([by_start[s] for s in range(a, b, CHUNK)])
        kl = np.maximum(m[:, 0], 0.0)  # float noise makes KL of identical rows -1e-9
        out.append(
            Scores(
                context=b,
                positions=len(m),
                kl_mean=float(kl.mean()),
                kl_p99=float(np.quantile(kl, 0.99)),
                top1=float(m[:, 1].mean()),
                ppl_16=float(np.exp(m[:, 2].mean())),
                ppl=float(np.exp(m[:, 3].mean())),
            )
        )
    return out


def choices_for(
    widths: Sequence[tuple[int, int]],
    groups: Sequence[int],
    attribution_bits: Sequence[int],
    has_sliding: bool,
    rotations: Sequence[str] = (),
):
    """The sweep's settings: every (key, value) width x group on all layers, and each
    rotated as `rotations` asks; Gemma's sliding layers kept too (which is also "only the
    global layers"); and per layer kind (only the sliding ones where the model has them,
    only the early or late half) at `attribution_bits`, group 64."""
    out = [
        Choice(k, g, value_bits=None if v == k else v, rotate=r)
        for k, v in widths
        for g in groups
        for r in (None, *rotations)
    ]
    if has_sliding:
        out += [Choice(k, g, keep_sliding=True) for k, v in widths if k == v for g in groups]
    kinds = ("sliding", "early", "late") if has_sliding else ("early", "late")
    out += [Choice(b, 64, layers=k) for b in attribution_bits for k in kinds]
    return out
