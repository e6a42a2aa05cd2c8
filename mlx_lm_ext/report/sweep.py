"""python -m mlx_lm_ext.report --measure: the model run at 16 bits and quantized, side by side.

The memory table predicts bytes from shapes; users also want to see them held, and what
quantizing costs in speed and in answers. One pass per precision feeds the same tokens
through the real model with the patched cache (generate_step's 2048-token prefill
chunks, quantized from the first one): at each context point the cache's bytes and MLX's
peak memory are read, then `decode_tokens` further tokens go through one at a time (the
decode path generation takes), timed, their next-token log-probs kept. KL(16-bit ||
quantized) and top-1 agreement compare those log-probs position by position, so every
precision is judged on identical inputs (teacher-forced, see quality.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx

from ..settings import KVSettings
from .quality import agreement, cache_nbytes, step_logprobs

PREFILL_STEP = 2048  # generate_step's default prefill_step_size


@dataclass(frozen=True)
class Point:
    """One precision at one context length."""

    bits: int | None
    context: int
    cache_bytes: int
    peak_bytes: int
    tok_s: float
    kl_mean: float = 0.0
    kl_max: float = 0.0
    top1: float = 1.0


def context_points(context: int, points: int) -> list[int]:
    """`points` context lengths doubling up to `context` (32768, 4 -> 4096 ... 32768)."""
    return sorted({max(1, context >> i) for i in range(points)})


def prompt_tokens(tokenizer: Any, text: str, needed: int) -> list[int]:
    """The text's tokens, repeated until `needed` are there (a text shorter than the run)."""
    ids = tokenizer.encode(text)
    if not ids:
        raise SystemExit("report --measure: the prompt text has no tokens")
    return (ids * (needed // len(ids) + 1))[:needed]


def _one_precision(model, tokens, contexts, settings, decode_tokens, bar) -> list[tuple[Point, mx.array]]:
    from mlx_lm.models.cache import make_prompt_cache

    from .. import apply, revert
    from .measure import extend

    apply(settings)
    try:
        cache = make_prompt_cache(model, max_kv_size=settings.max_kv_size)
        mx.clear_cache()
        mx.reset_peak_memory()
        done, out = 0, []
        for context in contexts:
            extend(model, cache, tokens[done:context], settings, PREFILL_STEP, progress=bar.update)
            held, peak = cache_nbytes(cache), mx.get_peak_memory()
            tic = time.perf_counter()
            logprobs = step_logprobs(model, cache, tokens[context : context + decode_tokens], settings)
            seconds = time.perf_counter() - tic
            bar.update(decode_tokens)
            out.append((Point(settings.kv_bits, context, held, peak, decode_tokens / seconds), logprobs))
            done = context + decode_tokens
        return out
    finally:
        revert()


def measure(
    model: Any,
    tokens: list[int],
    contexts: list[int],
    bits: list[int],
    group_size: int,
    max_kv_size: int | None = None,
    decode_tokens: int = 32,
) -> list[Point]:
    """Points for 16 bits and each of `bits` at each context (see the module docstring).

    `tokens` holds at least contexts[-1] + decode_tokens tokens; the decode tokens after
    a point are also the next point's first prompt tokens, so contexts lie at least
    decode_tokens apart.
    """
    from tqdm import tqdm

    if any(b - a < decode_tokens for a, b in zip(contexts, contexts[1:], strict=False)):
        raise ValueError(f"context points {contexts} must lie at least {decode_tokens} tokens apart")
    total = (len(bits) + 1) * (contexts[-1] + decode_tokens)
    runs = {}
    with tqdm(total=total, unit="tok", desc="report --measure", disable=None) as bar:
        for b in [None, *bits]:
            settings = KVSettings(b, group_size, quantized_kv_start=0, max_kv_size=max_kv_size)
            runs[b] = _one_precision(model, tokens, contexts, settings, decode_tokens, bar)
    points = [p for p, _ in runs[None]]
    for b in bits:
        for (p, logprobs), (_, reference) in zip(runs[b], runs[None], strict=True):
            got = agreement(reference, logprobs)
            points.append(
                Point(b, p.context, p.cache_bytes, p.peak_bytes, p.tok_s, got.kl_mean, got.kl_max, got.top1)
            )
    return points


def markdown(points: list[Point], decode_tokens: int) -> str:
    lines = [
        f"Measured (decode tok/s and quality over {decode_tokens} teacher-forced tokens after each point):",
        "",
        "| context | KV | cache MiB | peak MiB | decode tok/s | KL vs 16-bit (mean / max) | top-1 |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in sorted(points, key=lambda p: (p.context, -(p.bits or 16))):
        kv = "16-bit" if p.bits is None else f"{p.bits}-bit"
        quality = "" if p.bits is None else f"{p.kl_mean:.2e} / {p.kl_max:.2e}"
        top1 = "" if p.bits is None else f"{p.top1:.3f}"
        lines.append(
            f"| {p.context:,} | {kv} | {p.cache_bytes / 2**20:.2f} | {p.peak_bytes / 2**20:.1f} | "
            f"{p.tok_s:.1f} | {quality} | {top1} |"
        )
    return "\n".join(lines)


def require_matplotlib() -> None:
    """Fail before the run, not after it, when --plot cannot be drawn."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise SystemExit("report: --plot needs matplotlib (pip install matplotlib)") from None


def plot(points: list[Point], path: Path, title: str) -> None:
    """Cache MiB and KL against context length, one line per precision."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (mem, kl) = plt.subplots(1, 2, figsize=(10, 4))
    for b in sorted({p.bits or 16 for p in points}, reverse=True):
        mine = sorted((p for p in points if (p.bits or 16) == b), key=lambda p: p.context)
        x = [p.context for p in mine]
        mem.plot(x, [p.cache_bytes / 2**20 for p in mine], marker="o", label=f"{b}-bit")
        if b != 16:
            kl.plot(x, [p.kl_mean for p in mine], marker="o", label=f"{b}-bit")
    mem.set(xlabel="context (tokens)", ylabel="KV cache (MiB)", title="cache held")
    kl.set(xlabel="context (tokens)", ylabel="KL(16-bit || quantized), mean", title="quality", yscale="log")
    for ax in (mem, kl):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
