"""The server's prompt cache at --prompt-cache-bits: prefixes kept, store and fetch cost, TTFT.

    python benchmarks/prompt_cache.py --model smollm2-135m-instruct --prefix 8192 32768
    python benchmarks/prompt_cache.py --config benchmarks/configs/llama-3.1-8b.json --ttft   # on a GPU

- kept: distinct prefixes of `--prefix` tokens that upstream's `LRUPromptCache` holds
  under a byte bound sized for `--budget` of them as generation leaves them (16-bit,
  with the buffers' step padding), the way the server inserts them: unpatched mlx-lm,
  then patched with entries cut to their tokens (16-bit) and stored at each `--bits`.
  Bytes depend on shapes only, so the caches hold the model's own keys and values for
  the first 512 tokens and random ones after (`measure.filled_cache`).
- store / fetch: what one entry costs to store (cut and quantize) and to fetch (the
  LRU's deep copy, and for a quantized entry the dequantization back to 16 bits), per
  1K tokens, the median of `--rounds`.
- ttft (`--ttft`): time to the first token of a request whose prefix is held, against
  one that prefills it: the model's real prefill of `--prefix` tokens, then 16 more.
"""

from __future__ import annotations

import copy
import time
from statistics import median
from typing import Any

import mlx.core as mx
from kv_speed import load_model, model_parser
from results_io import emit, header, title

import mlx_lm_ext
from mlx_lm_ext.caches import prompt_store
from mlx_lm_ext.report.measure import filled_cache
from mlx_lm_ext.settings import KVSettings

QUESTION = 16  # tokens after the prefix in the TTFT requests


def entry_bytes(cache: list[Any]) -> int:
    return sum(c.nbytes for c in cache)


def kept(cache: list[Any], budget: int, setting: str, entries: int) -> dict[str, Any]:
    """How many of `entries` distinct prefixes the LRU keeps within `budget` bytes."""
    from mlx_lm.models.cache import LRUPromptCache

    lru = LRUPromptCache(max_size=entries, max_bytes=budget)
    for i in range(entries):
        lru.insert_cache("model", [i] * cache[0].offset, copy.copy(cache))
    return {"setting": setting, "kept": len(lru), "entry_bytes": lru.nbytes // max(len(lru), 1)}


def _timed(fn, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        out = fn()
        mx.eval([c.state for c in out if c is not None])
        times.append(time.perf_counter() - start)
    return median(times)


def costs(cache: list[Any], bits: int | None, rounds: int) -> dict[str, float]:
    """Seconds to store one entry and to fetch it (deep copy, then back to 16 bits)."""
    store = _timed(lambda: prompt_store.for_storage(cache, bits, 64), rounds)
    stored = prompt_store.for_storage(cache, bits, 64)
    mx.eval([c.state for c in stored])
    fetch = _timed(lambda: prompt_store.for_live(copy.deepcopy(stored)), rounds)
    return {"store_s": store, "fetch_s": fetch}


def ttft(model: Any, prefix: int, bits: int | None, rounds: int) -> dict[str, float]:
    """First-token seconds: a miss prefills prefix + QUESTION tokens; a hit fetches the
    stored prefix (at `bits`) and prefills QUESTION."""
    from mlx_lm.generate import generate_step
    from mlx_lm.models.cache import make_prompt_cache

    ids = [(i * 7919) % 500 + 5 for i in range(prefix + QUESTION)]

    def first(cache, prompt):
        step = generate_step(mx.array(prompt), model, prompt_cache=cache, max_tokens=1)
        token, _ = next(step)
        return int(token)

    held = make_prompt_cache(model)
    for s in range(0, prefix, 2048):  # generate_step's prefill chunks
        model(mx.array(ids[s : min(s + 2048, prefix)])[None], cache=held)
        mx.eval([c.state for c in held])
    stored = prompt_store.for_storage(held, bits, 64)
    mx.eval([c.state for c in stored])

    def miss():
        start = time.perf_counter()
        first(make_prompt_cache(model), ids)
        return time.perf_counter() - start

    def hit():
        start = time.perf_counter()
        cache = prompt_store.for_live(copy.deepcopy(stored))
        first(cache, ids[prefix:])
        return time.perf_counter() - start

    return {"miss_s": median(miss() for _ in range(rounds)), "hit_s": median(hit() for _ in range(rounds))}


def run(model: Any, prefixes: list[int], bits: list[int], budget: int, rounds: int, with_ttft: bool) -> list:
    rows, entries = [], 4 * budget  # enough for 4-bit's 3.6x
    for n in prefixes:
        cache = filled_cache(model, n, KVSettings())
        bound = budget * entry_bytes(cache)
        mlx_lm_ext.revert()
        rows.append({"prefix": n, "budget_bytes": bound, **kept(cache, bound, "unpatched 16-bit", entries)})
        for b in [None, *bits]:
            mlx_lm_ext.apply(KVSettings(prompt_cache_bits=b, prompt_cache_min_quantize_tokens=0))
            label = "16-bit cut" if b is None else f"{b}-bit"
            row = {"prefix": n, "budget_bytes": bound, **kept(cache, bound, label, entries)}
            row.update(costs(cache, b, rounds))
            if with_ttft:
                row.update(ttft(model, n, b, rounds))
            rows.append(row)
    return rows


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"{title(result)}, group 64",
        "",
        "| prefix | stored as | prefixes kept | x unpatched | MiB each | store ms/1K tok | fetch ms/1K tok "
        "| TTFT hit / miss |",
        "|---|---|---|---|---|---|---|---|",
    ]
    base = {r["prefix"]: r["kept"] for r in result["rows"] if r["setting"] == "unpatched 16-bit"}
    for r in result["rows"]:
        per_k = 1000 / r["prefix"]
        store = f"{r['store_s'] * 1e3 * per_k:.2f}" if "store_s" in r else ""
        fetch = f"{r['fetch_s'] * 1e3 * per_k:.2f}" if "fetch_s" in r else ""
        ttft_cell = f"{r['hit_s']:.3f} / {r['miss_s']:.3f} s" if "hit_s" in r else ""
        lines.append(
            f"| {r['prefix']:,} | {r['setting']} | {r['kept']} | {r['kept'] / base[r['prefix']]:.2f} | "
            f"{r['entry_bytes'] / 2**20:.1f} | {store} | {fetch} | {ttft_cell} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = model_parser(__doc__)
    parser.add_argument("--prefix", type=int, nargs="+", default=[8192], help="prefix tokens per entry")
    parser.add_argument("--bits", type=int, nargs="+", default=[8, 4], help="--prompt-cache-bits to store at")
    parser.add_argument("--budget", type=int, default=10, help="the byte bound, in unpatched entries")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--ttft", action="store_true", help="also time first tokens, hit and miss")
    args = parser.parse_args(argv)
    name, model = load_model(args.model, args.config)
    rows = run(model, args.prefix, args.bits, args.budget, args.rounds, args.ttft)
    result = {
        **header(name),
        "budget": args.budget,
        "rows": rows,
    }
    emit(result, args.json, markdown)


if __name__ == "__main__":
    main()
