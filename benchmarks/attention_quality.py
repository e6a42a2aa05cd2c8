"""Which attention over a quantized KV cache keeps a real model closest to 16-bit?

python benchmarks/attention_quality.py --model smollm2-135m-instruct --windows 12 --bits 8 4

On a real model from the zoo (converted from PyPI's GGUF files), for windows of English
prose (the standard library's pydoc_data topics, each window starting `--stride` tokens
after the last): a `--prefill`-token prompt in `--chunk`-token chunks, the cache
quantized after each chunk with upstream's `maybe_quantize_kv_cache(cache, 0, 64,
bits)`, then `--decode` teacher-forced steps, quantized after each; KL and top-1 of the
next-token distributions against the same run with a 16-bit cache. Every path reads the
same cache bytes; only the attention over them differs:

- `upstream`: mlx-lm's quantized SDPA (no fixes applied; scores and sums in bf16);
- `mlx-lm-ext`: this project's (`quantized-attention` applied; float32 scores and sums);
- `exact-fp32`: the fused kernel in float32 on the dequantized cache (what these bytes
  can give at best);
- `dequantized-bf16`: the fused kernel in the model's dtype on the dequantized cache (the
  path CUDA prompt chunks take).

KL is heavy-tailed and varies from window to window as much as between paths, so the
paths are compared pairwise, position by position (every path sees the same tokens), with
a 95% interval from a bootstrap over windows.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import sys
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx
from results_io import emit, machine

import mlx_lm_ext
from mlx_lm_ext.fixes.base import Patcher
from mlx_lm_ext.report.measure import bootstrap_interval
from mlx_lm_ext.report.quality import prose
from mlx_lm_ext.zoo import get_entry, resolve

PATHS = ("upstream", "mlx-lm-ext", "exact-fp32", "dequantized-bf16")
PAIRS = (("mlx-lm-ext", "upstream"), ("mlx-lm-ext", "exact-fp32"), ("upstream", "exact-fp32"))


def _fused_over_dequantized(dtype):
    """An SDPA that dequantizes a quantized cache and runs the fused kernel in `dtype`."""
    from mlx_lm.models import base

    original = base.scaled_dot_product_attention

    def sdpa(queries, keys, values, cache, scale, mask, sinks=None):
        if not hasattr(cache, "bits"):
            return original(queries, keys, values, cache, scale=scale, mask=mask, sinks=sinks)
        want = queries.dtype if dtype is None else dtype
        k, v = (_dequantize(t, cache.group_size, cache.bits, want) for t in (keys, values))
        out = mx.fast.scaled_dot_product_attention(
            queries.astype(want), k, v, scale=scale, mask=mask, sinks=sinks
        )
        return out.astype(queries.dtype)

    return original, sdpa


def _dequantize(triple, group_size: int, bits: int, dtype) -> mx.array:
    """The cache's values in `dtype`, from scales and biases in `dtype` (dequantizing with
    the stored bf16 scales rounds every value to bf16 first)."""
    w, scales, biases = triple
    return mx.dequantize(w, scales.astype(dtype), biases.astype(dtype), group_size=group_size, bits=bits)


@contextmanager
def attention(path: str):
    """Run the block with `path`'s attention over quantized caches."""
    mlx_lm_ext.revert()
    patcher = Patcher("attention_quality")
    if path == "mlx-lm-ext":
        mlx_lm_ext.apply(only=["quantized-attention"])
    elif path in ("exact-fp32", "dequantized-bf16"):
        patcher.rebind(*_fused_over_dequantized(mx.float32 if path == "exact-fp32" else None))
    try:
        yield
    finally:
        patcher.undo()
        mlx_lm_ext.revert()


def first_chunk(model, ids: list[int], chunk: int) -> list:
    """The cache after the first chunk: 16-bit in every run (quantization comes after it)."""
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    model.model(mx.array([ids[:chunk]]), cache=cache)
    mx.eval([c.state for c in cache])
    return cache


def logprobs(model, ids: list[int], cache: list, bits: int | None, args) -> mx.array:
    """Continue the prefill from the first chunk, then teacher-force the decode tokens."""
    quantize = importlib.import_module("mlx_lm.generate").maybe_quantize_kv_cache
    if bits:
        quantize(cache, 0, 64, bits)
    for start in range(args.chunk, args.prefill, args.chunk):
        model.model(mx.array([ids[start : min(start + args.chunk, args.prefill)]]), cache=cache)
        if bits:
            quantize(cache, 0, 64, bits)
        mx.eval([c.state for c in cache])
    out = []
    for token in ids[args.prefill : args.prefill + args.decode]:
        logits = model(mx.array([[token]]), cache=cache)[0, -1].astype(mx.float32)
        if bits:
            quantize(cache, 0, 64, bits)
        out.append(logits - mx.logsumexp(logits))
        mx.eval(out[-1])
    return mx.stack(out)


def run(args) -> list[dict]:
    """One row per window, path and bits, with the KL at every decode position."""
    from mlx_lm import load

    model, tokenizer = load(str(resolve(get_entry(args.model), "offline")))
    text = tokenizer.encode(prose(400))
    rows = []
    for w in range(args.windows):
        ids = text[w * args.stride : w * args.stride + args.prefill + args.decode]
        start = first_chunk(model, ids, args.chunk)
        reference = logprobs(model, ids, copy.deepcopy(start), None, args)
        for path in args.paths:
            with attention(path):
                for bits in args.bits:
                    got = logprobs(model, ids, copy.deepcopy(start), bits, args)
                    kl = (mx.exp(reference) * (reference - got)).sum(axis=-1)
                    top1 = reference.argmax(-1) == got.argmax(-1)
                    rows.append(
                        {"window": w, "path": path, "bits": bits, "kl": kl.tolist(), "top1": top1.tolist()}
                    )
                    print(json.dumps(_summary(rows[-1])), file=sys.stderr, flush=True)
    return rows


def _summary(row: dict) -> dict:
    n = len(row["kl"])
    return {k: row[k] for k in ("window", "path", "bits")} | {
        "kl_mean": sum(row["kl"]) / n,
        "top1": sum(row["top1"]) / n,
    }


def paired(rows: list[dict], bits: int, a: str, b: str, draws: int = 2000) -> tuple[float, float, float]:
    """Mean per-position KL difference a - b, with a 95% interval from resampling windows."""
    by = {(r["path"], r["window"]): r["kl"] for r in rows if r["bits"] == bits}
    windows = sorted({w for p, w in by if p == a and (b, w) in by})
    diffs = {w: [x - y for x, y in zip(by[(a, w)], by[(b, w)], strict=True)] for w in windows}

    def mean(ws):
        values = [d for w in ws for d in diffs[w]]
        return sum(values) / len(values)

    return mean(windows), *bootstrap_interval(windows, mean, draws)


def markdown(result: dict) -> str:
    rows, bits_list = result["rows"], result["bits"]
    paths = [p for p in PATHS if any(r["path"] == p for r in rows)]
    lines = ["| bits | attention | mean KL | p99 KL | top-1 | windows |", "|---|---|---|---|---|---|"]
    for bits in bits_list:
        for path in paths:
            sel = [r for r in rows if r["bits"] == bits and r["path"] == path]
            kl = sorted(x for r in sel for x in r["kl"])
            top1 = [x for r in sel for x in r["top1"]]
            p99 = kl[min(len(kl) - 1, int(0.99 * len(kl)))]
            mean = sum(kl) / len(kl)
            lines.append(
                f"| {bits} | {path} | {mean:.4g} | {p99:.3g} | {sum(top1) / len(top1):.3f} | {len(sel)} |"
            )
    lines += ["", "| bits | KL difference | mean | 95% interval |", "|---|---|---|---|"]
    for bits in bits_list:
        for a, b in PAIRS:
            if a in paths and b in paths:
                mean, lo, hi = paired(rows, bits, a, b)
                lines.append(f"| {bits} | {a} - {b} | {mean:+.4f} | {lo:+.4f} .. {hi:+.4f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct", help="a real models.yaml entry")
    p.add_argument("--windows", type=int, default=12)
    p.add_argument("--stride", type=int, default=1500)
    p.add_argument("--prefill", type=int, default=600)
    p.add_argument("--chunk", type=int, default=256)
    p.add_argument("--decode", type=int, default=64)
    p.add_argument("--bits", type=int, nargs="+", default=[8, 4])
    p.add_argument("--paths", nargs="+", default=list(PATHS), choices=PATHS)
    p.add_argument("--json", type=Path, help="write the rows here")
    p.add_argument("--markdown-only", type=Path, help="print the tables of a JSON written before")
    args = p.parse_args()
    if args.markdown_only:
        print(markdown(json.loads(args.markdown_only.read_text())))
        return
    rows = run(args)
    settings = {k: getattr(args, k) for k in ("prefill", "chunk", "decode", "stride", "bits")}
    emit({"model": args.model, "machine": machine(), **settings, "rows": rows}, args.json, markdown)


if __name__ == "__main__":
    main()
