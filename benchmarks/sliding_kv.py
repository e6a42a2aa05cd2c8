"""Quantize sliding-window layers or keep them? KV bytes, decode speed and quality, in one run.

    python benchmarks/sliding_kv.py --model gemma-3 --contexts 8192 32768 \
        --json benchmarks/results/sliding_kv-cpu.json

For each context: unpatched mlx-lm at 16 bits (fixes reverted), then the patched cache at
8 and 4 bits with sliding layers quantized and kept. Bytes are the cache's arrays after
filling it to the context (`measure.filled_cache`: a real 512-token prefill, then keys
and values of the real shapes); decode tok/s is the real model stepping on that cache;
quality (KL(fp16||quantized) mean and top-1 agreement, teacher-forced on real tokens) is
measured once per setting at `--quality-tokens`, since random-weight stand-ins cannot be
prefilled at 32K on a CPU in useful time. Ratios are against the unpatched run.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import mlx.core as mx
from results_io import emit, header

import mlx_lm_ext
from mlx_lm_ext.report.measure import decode_rate, filled_cache
from mlx_lm_ext.report.quality import agreement, cache_nbytes, decode_logprobs
from mlx_lm_ext.settings import KVSettings, configure

SETTINGS = {
    "fp16 (unpatched)": None,
    "8-bit, sliding quantized": KVSettings(kv_bits=8, quantized_kv_start=0),
    "8-bit, sliding kept": KVSettings(kv_bits=8, quantized_kv_start=0, quantize_sliding=False),
    "4-bit, sliding quantized": KVSettings(kv_bits=4, quantized_kv_start=0),
    "4-bit, sliding kept": KVSettings(kv_bits=4, quantized_kv_start=0, quantize_sliding=False),
}


def _run(model: Any, context: int, settings: KVSettings | None, steps: int) -> dict[str, float]:
    """Bytes, peak memory and decode rate of one setting; unpatched when settings is None."""
    if settings is None:
        mlx_lm_ext.revert()
    else:
        mlx_lm_ext.apply(settings)
    try:
        mx.clear_cache()
        mx.reset_peak_memory()
        cache = filled_cache(model, context, settings or KVSettings())
        row = {"kv_bytes": cache_nbytes(cache), "tok_s": decode_rate(model, cache, steps)}
        row["peak_bytes"] = mx.get_peak_memory()
        return row
    finally:
        mlx_lm_ext.revert()


def _quality(model: Any, settings: KVSettings, tokens: list[int], prefill: int, ref: mx.array) -> dict:
    mlx_lm_ext.apply(settings)
    try:
        got = agreement(ref, decode_logprobs(model, tokens, prefill, settings))
    finally:
        mlx_lm_ext.revert()
    return {"kl_mean": got.kl_mean, "top1": got.top1}


def run(model_id: str, contexts: list[int], steps: int, quality_tokens: int) -> dict[str, Any]:
    from mlx_lm import load

    from mlx_lm_ext.zoo import get_entry, resolve

    model, _ = load(str(resolve(get_entry(model_id), "offline")))
    tokens = [(i * 7919) % 507 + 5 for i in range(quality_tokens + 32)]
    ref = decode_logprobs(model, tokens, quality_tokens, KVSettings())
    quality = {name: _quality(model, s, tokens, quality_tokens, ref) for name, s in SETTINGS.items() if s}
    rows = []
    for context in contexts:
        base = None
        for name, settings in SETTINGS.items():
            row = {"context": context, "setting": name, **_run(model, context, settings, steps)}
            base = base or row
            row["bytes_ratio"] = row["kv_bytes"] / base["kv_bytes"]
            row["speed_ratio"] = row["tok_s"] / base["tok_s"]
            row.update(quality.get(name, {"kl_mean": 0.0, "top1": 1.0}))
            rows.append(row)
            print(json.dumps(row), flush=True)
    configure(KVSettings())
    return {
        **header(model_id),
        "decode_steps": steps,
        "quality_tokens": quality_tokens,
        "rows": rows,
    }


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"{result['model']} offline stand-in, {result['machine']}, mlx-lm {result['mlx_lm']}; "
        f"quality teacher-forced at {result['quality_tokens']} tokens",
        "",
        "| context | setting | KV MiB | x fp16 | peak MiB | decode tok/s | x fp16 | KL mean | top-1 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['context']} | {r['setting']} | {r['kv_bytes'] / 2**20:.2f} | {r['bytes_ratio']:.3f} | "
            f"{r['peak_bytes'] / 2**20:.1f} | {r['tok_s']:.1f} | {r['speed_ratio']:.2f} | "
            f"{r['kl_mean']:.2e} | {r['top1']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma-3", help="models.yaml id (offline stand-in)")
    parser.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768])
    parser.add_argument("--steps", type=int, default=32, help="decode steps timed per setting")
    parser.add_argument("--quality-tokens", type=int, default=2048)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    result = run(args.model, args.contexts, args.steps, args.quality_tokens)
    emit(result, args.json, markdown)


if __name__ == "__main__":
    main()
