"""Concurrent requests with --kv-bits: batched quantized vs the sequential fallback vs fp16 batched.

    python benchmarks/batched_kv.py --model llama-3.2 --json benchmarks/results/batched_kv-cpu.json
    python benchmarks/batched_kv.py --config benchmarks/configs/llama-3.1-8b.json   # on a GPU

N requests (default 8) of `--prompt` tokens each, `--tokens` generated each, in one run:

- sequential: what the server did with --kv-bits before (upstream 0.32 and mlx-lm-ext
  until #7): one request after another through generate_step, quantized;
- batched fp16: upstream's BatchGenerator, 16-bit;
- batched kv-bits: BatchGenerator with the batched quantized cache (this project).

Aggregate tok/s is generated tokens over wall time from the first insert to the last
token (prefill included); peak is MLX's peak memory for that mode (reset before each
run, the highest of its rounds); cache bytes are the most the generation batch's arrays
held. Every mode runs once as a warm-up first (kernel compilation), then the modes take
turns for `--rounds` rounds (`measure.interleaved`): a mode's tok/s is the median of its
rounds, and each ratio is taken within a round and given as the median, its 95%
bootstrap interval and the range, so a host that drifts between modes shows as spread.
"""

from __future__ import annotations

import time
from statistics import median
from typing import Any

import mlx.core as mx
from kv_speed import load_model, model_parser, round_ratios, spread, vocab_size
from results_io import emit, header

import mlx_lm_ext
from mlx_lm_ext.report.measure import interleaved
from mlx_lm_ext.settings import KVSettings, configure

GROUP = 64


def _prompts(n: int, length: int, vocab: int) -> list[list[int]]:
    return [[(7919 * j + 104729 * i) % (vocab - 5) + 5 for j in range(length)] for i in range(n)]


def _sequential(model, prompts, tokens, bits) -> int:
    from mlx_lm.generate import generate_step
    from mlx_lm.models.cache import make_prompt_cache

    done = 0
    for p in prompts:
        steps = generate_step(
            mx.array(p),
            model,
            max_tokens=tokens,
            prompt_cache=make_prompt_cache(model),
            kv_bits=bits,
            kv_group_size=GROUP,
            quantized_kv_start=0,
        )
        for _, _ in zip(steps, range(tokens), strict=False):
            done += 1
    return done


def _batched(model, prompts, tokens, bits, sizes: dict[str, int]) -> int:
    from mlx_lm.generate import BatchGenerator

    # kv_bits=None means "the process settings" to the patched BatchGenerator: say 16-bit.
    configure(KVSettings(kv_bits=bits, kv_group_size=GROUP, quantized_kv_start=0))
    gen = BatchGenerator(
        model,
        max_tokens=tokens,
        completion_batch_size=len(prompts),
        prefill_batch_size=len(prompts),
        kv_bits=bits,
        kv_group_size=GROUP,
        quantized_kv_start=0,
        stop_tokens=[],
    )
    gen.insert(prompts)
    done = 0
    while True:
        _, responses = gen.next()
        held = sum(c.nbytes for c in gen._generation_batch.prompt_cache)
        sizes["cache_bytes"] = max(sizes.get("cache_bytes", 0), held)
        if not (
            responses or gen._unprocessed_sequences or len(gen._prompt_batch) or len(gen._generation_batch)
        ):
            break
        done += len(responses)
    gen.close()
    return done


MODES = {
    "sequential kv": lambda m, p, t, b, s: _sequential(m, p, t, b),
    "batched fp16": lambda m, p, t, b, s: _batched(m, p, t, None, s),
    "batched kv": lambda m, p, t, b, s: _batched(m, p, t, b, s),
}


def _timed(fn, model: Any, prompts: list[list[int]], tokens: int, bits: int) -> dict[str, Any]:
    """One run of a mode: tokens, seconds, peak memory (reset first) and cache bytes."""
    mx.clear_cache()
    mx.reset_peak_memory()
    sizes: dict[str, int] = {}
    tic = time.perf_counter()
    done = fn(model, prompts, tokens, bits, sizes)
    wall = time.perf_counter() - tic
    return {"tokens": done, "seconds": wall, "peak": mx.get_peak_memory(), "cache": sizes.get("cache_bytes")}


def run(
    model: Any, n: int, prompt: int, tokens: int, bits: int, vocab: int, rounds: int = 3
) -> list[dict[str, Any]]:
    mlx_lm_ext.apply(KVSettings(kv_bits=bits, kv_group_size=GROUP, quantized_kv_start=0))
    prompts = _prompts(n, prompt, vocab)
    for fn in MODES.values():
        fn(model, prompts[:2], 4, bits, {})  # warm-up: compile the kernels of this mode
    turns = {name: (lambda fn=fn: _timed(fn, model, prompts, tokens, bits)) for name, fn in MODES.items()}
    rows = [_row(name, runs) for name, runs in interleaved(turns, rounds).items()]
    by = {r["mode"]: r for r in rows}
    kv = by["batched kv"]
    kv.update(round_ratios("sequential", kv["tok_s_rounds"], by["sequential kv"]["tok_s_rounds"]))
    kv.update(round_ratios("fp16_batched", kv["tok_s_rounds"], by["batched fp16"]["tok_s_rounds"]))
    kv["peak_vs_fp16_batched"] = round(kv["peak_bytes"] / by["batched fp16"]["peak_bytes"], 3)
    if kv["cache_bytes"] and by["batched fp16"]["cache_bytes"]:
        kv["cache_vs_fp16_batched"] = round(kv["cache_bytes"] / by["batched fp16"]["cache_bytes"], 3)
    return rows


def _row(mode: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """A mode's rounds: tok/s each and their median, the highest peak and cache bytes."""
    rates = [r["tokens"] / r["seconds"] for r in runs]
    caches = [r["cache"] for r in runs if r["cache"] is not None]
    return {
        "mode": mode,
        "tokens": runs[0]["tokens"],
        "tok_s": round(median(rates), 2),
        "tok_s_rounds": [round(x, 2) for x in rates],
        "peak_bytes": max(r["peak"] for r in runs),
        "cache_bytes": max(caches) if caches else None,
    }


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"{result['model']} — {result['requests']} requests × {result['prompt']} prompt tokens, "
        f"{result['tokens']} generated each, kv_bits={result['bits']}; "
        f"{result['machine']}, mlx-lm {result['mlx_lm']}",
        "",
        "| mode | tok/s (all requests) | peak memory | cache bytes | vs sequential | vs fp16 batched |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        cache = f"{r['cache_bytes'] / 2**20:.1f} MiB" if r.get("cache_bytes") else "—"
        lines.append(
            f"| {r['mode']} | {r['tok_s']:.1f} | {r['peak_bytes'] / 2**30:.2f} GiB | {cache} | "
            f"{spread(r, 'sequential')} | {spread(r, 'fp16_batched')} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = model_parser(__doc__)
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=1024, help="prompt tokens per request")
    parser.add_argument("--tokens", type=int, default=128, help="tokens generated per request")
    parser.add_argument("--bits", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3, help="turns the modes take (medians, spread)")
    args = parser.parse_args(argv)
    name, model = load_model(args.model, args.config)
    vocab = vocab_size(model)
    rows = run(model, args.requests, args.prompt, args.tokens, args.bits, vocab, args.rounds)
    result = {
        **header(name),
        "requests": args.requests,
        "prompt": args.prompt,
        "tokens": args.tokens,
        "bits": args.bits,
        "rounds": args.rounds,
        "rows": rows,
    }
    emit(result, args.json, markdown)


if __name__ == "__main__":
    main()
