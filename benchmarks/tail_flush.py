"""Host time of one decode-tail flush: the quantized cache's 16-bit tail written into its
buffers in place, against through upstream's update.

    python benchmarks/tail_flush.py --json benchmarks/results/tail_flush-cpu.json

Where the flash kernel runs (CUDA), a quantized cache keeps its newest 64 rows at 16 bits
and quantizes them together (fixes/quantized_decode_tail.py). Every layer flushes on the
same decode step, so a flush's host time is paid once a layer on that step, and a single
request's step is host-bound on the GPU (benchmarks/README.md). This times the flush
alone, on any backend (the tail is installed by hand where the flash kernel does not
run): `--layers` caches of `--heads` KV heads x `--dim` at `--context` tokens, each with a
full tail and room in its buffers (three flushes in four; the fourth grows the buffers,
upstream's way in both), flushed once a round, the two ways taking turns for `--rounds`
rounds. Reported per width: microseconds a flush, median (quartiles), and the ratio.
"""

from __future__ import annotations

import argparse
import gc
import time
from pathlib import Path
from statistics import median, quantiles
from typing import Any

import mlx.core as mx
from results_io import emit, header, title

import mlx_lm_ext
from mlx_lm_ext.fixes import quantized_decode_tail as decode_tail
from mlx_lm_ext.report.measure import interleaved
from mlx_lm_ext.settings import KVSettings

WAYS = ("upstream update", "in place")


def caches(args: Any, bits: int) -> list[Any]:
    """`--layers` quantized caches at `--context` rows whose tails are full, with room."""
    from mlx_lm.models.cache import KVCache

    rows = mx.random.normal((1, args.heads, args.context, args.dim)).astype(mx.bfloat16)
    token = rows[..., :1, :]
    out = []
    for _ in range(args.layers):
        cache = KVCache()
        cache.update_and_fetch(rows, rows)
        cache = cache.to_quantized(group_size=64, bits=bits)
        for _ in range(decode_tail.TAIL_ROWS + 1):  # a first flush grows the buffers
            cache.update_and_fetch(token, token)
        while vars(cache)["_pending"] < decode_tail.TAIL_ROWS:
            cache.update_and_fetch(token, token)
        mx.eval(vars(cache)["_tail"], vars(cache)["keys"], vars(cache)["values"])
        out.append(cache)
    return out


def flush_us(args: Any, bits: int, way: str) -> float:
    """Microseconds a flush, over `--layers` caches flushed one after another."""
    layers = caches(args, bits)
    in_place = decode_tail._store_in_place
    if way == "upstream update":
        decode_tail._store_in_place = lambda *rows: False
    gc.disable()
    try:
        tic = time.perf_counter()
        for cache in layers:
            decode_tail.flush(cache)
        seconds = time.perf_counter() - tic
    finally:
        gc.enable()
        decode_tail._store_in_place = in_place
    mx.eval([vars(c)["keys"] for c in layers])
    return seconds / len(layers) * 1e6


def run(args: Any) -> list[dict[str, Any]]:
    mlx_lm_ext.apply(KVSettings(kv_group_size=64, quantized_kv_start=0))
    decode_tail.FIX.apply()  # by hand: installed only where the flash kernel runs
    rows = []
    try:
        for bits in args.bits:
            measures = {way: lambda w=way, b=bits: flush_us(args, b, w) for way in WAYS}
            times = interleaved(measures, args.rounds)
            row: dict[str, Any] = {"bits": bits}
            for way in WAYS:
                q1, _, q3 = quantiles(times[way], n=4)
                row[way] = {"median_us": median(times[way]), "quartiles_us": [q1, q3], "rounds": times[way]}
            row["x_upstream"] = row["in place"]["median_us"] / row["upstream update"]["median_us"]
            rows.append(row)
    finally:  # the tail first: it restores what the other fixes installed before it
        decode_tail.FIX.revert()
        mlx_lm_ext.revert()
    return rows


TABLE = "| KV | through upstream's update, us | in place, us | x upstream |\n|---|---|---|---|"


def _cell(timing: dict[str, Any]) -> str:
    low, high = timing["quartiles_us"]
    return f"{timing['median_us']:.1f} ({low:.1f}-{high:.1f})"


def markdown(result: dict[str, Any]) -> str:
    """The median and quartiles of each way, per width."""
    run = f"{result['layers']} caches at {result['context']} tokens, {result['rounds']} rounds"
    rows = [
        f"| {r['bits']}-bit | {_cell(r[WAYS[0]])} | {_cell(r[WAYS[1]])} | {r['x_upstream']:.2f} |"
        for r in result["rows"]
    ]
    return "\n".join([f"{title(result)}; {run}", "", TABLE, *rows])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, nargs="+", default=[8, 4])
    parser.add_argument("--layers", type=int, default=32, help="caches flushed a round")
    parser.add_argument("--heads", type=int, default=8, help="KV heads")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--context", type=int, default=4096, help="rows a cache holds")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    settings = {k: getattr(args, k) for k in ("layers", "heads", "dim", "context", "rounds")}
    name = f"quantized cache, {args.heads} KV heads x {args.dim}"
    emit({**header(name), **settings, "rows": run(args)}, args.json, markdown)


if __name__ == "__main__":
    main()
