"""How many concurrent long requests fit under a memory limit at 16, 8 and 4 bits, and their tok/s.

    python benchmarks/capacity.py --config benchmarks/configs/llama-3.1-8b.json \
        --context 32768 --limit-gib 48 --json benchmarks/results/capacity-h200.json
    python benchmarks/capacity.py --model llama-3.2 --context 2048 --limit-gib 0.1   # CPU

What users buy KV quantization for. Requests go through the server's own path: mlx-lm's
BatchGenerator (patched: the batch caches quantize from the first chunk,
`--quantized-kv-start 0`), `--prompt-concurrency` prompts prefilled together in chunks
of `--prefill-step-size` tokens, every request then decoding together. Each request has
`--context` prompt tokens; the first requests decode while the rest prefill, then all
decode `--tokens` steps together. The default, 256, is one growth step of the batch
caches: every run then includes the step where the whole batch's caches grow, one layer
held twice while it is copied into a larger buffer, which a long-running server meets
every 256 tokens. With 16 tokens that step was missed and the decode peak came out up
to 2.2 GiB low (Llama-3.1-8B shape, 28 requests at 8 bits on the H200).

For each precision the request count starts at `--start` (the last measured count:
two runs settle it when it held or moved by one) or at what the cache bytes predict
(`report.memory`'s exact per-token bytes: (limit - weights) / bytes of one request at
the context), an upper bound; each later count is predicted from the runs so far
(`next_count`), until the most requests whose peak memory over the whole run, prefill
included, stays under the limit is bracketed by one that fits and one more that does
not (`--tries` full runs at most; `bracketed` says whether it was). Reported per
precision: the requests that fit, the peak of the prefill phase and of the decode phase apart (the
peak must come from the caches, not from prefilling, or the savings never reach the
user), and aggregate decode tok/s with every request decoding (median of the steps).

Each result records the command that ran it; `capacity_merge.py` pools searches split
over several device calls (10 minutes each) into one result.

`--timeline N` instead runs N requests once per precision, waiting for the device after
every `BatchGenerator.next()`, and records each step's batch sizes, finished requests,
active memory and peak: which step sets the peak, and what it was doing.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from statistics import median
from typing import Any

import mlx.core as mx
from kv_speed import load_model, model_parser, vocab_size
from results_io import emit, header, kv_label, title

import mlx_lm_ext
from mlx_lm_ext.fixes import BY_NAME
from mlx_lm_ext.report.memory import kv_bytes, model_layout
from mlx_lm_ext.settings import KVSettings, configure

GROUP = 64
GIB = 2**30


def _prompts(n: int, length: int, vocab: int) -> list[list[int]]:
    return [[(7919 * j + 104729 * i) % (vocab - 5) + 5 for j in range(length)] for i in range(n)]


def _step_row(gen: Any, index: int, responses: list[Any], seconds: float) -> dict[str, Any]:
    """A timeline row: the step's batch sizes and memory, the device waited for."""
    mx.synchronize()
    active = mx.get_active_memory()
    return {
        "step": index,
        "prompt": len(gen._prompt_batch),
        "generation": len(gen._generation_batch),
        "finished": sum(r.finish_reason is not None for r in responses),
        "seconds": round(time.perf_counter() - seconds, 4),
        "active_gib": round(active / GIB, 3),
        "active_bytes": active,
        "peak_gib": round(mx.get_peak_memory() / GIB, 3),
    }


def serve(
    model: Any, n: int, context: int, bits: int | None, args: Any, vocab: int, timeline: list | None = None
) -> dict[str, Any]:
    """One run of n requests through BatchGenerator: peaks by phase, decode tok/s;
    with `timeline`, a row per step appended to it."""
    from mlx_lm.generate import BatchGenerator

    configure(KVSettings(kv_bits=bits, kv_group_size=GROUP, quantized_kv_start=0))
    mx.clear_cache()
    mx.reset_peak_memory()
    # The first requests decode while the last ones prefill (a chunk a step): they must
    # still be decoding when the last joins, then all decode `tokens` steps together.
    prefill_steps = -(-n // args.prompt_concurrency) * -(-context // args.prefill_step_size)
    gen = BatchGenerator(
        model,
        max_tokens=2 * prefill_steps + args.tokens,
        completion_batch_size=n,
        prefill_batch_size=min(n, args.prompt_concurrency),
        prefill_step_size=args.prefill_step_size,
        kv_bits=bits,
        kv_group_size=GROUP,
        quantized_kv_start=0,
        stop_tokens=[],
    )
    gen.insert(_prompts(n, context, vocab))
    peaks = {"prefill": 0, "decode": 0}  # the most MLX held in each phase
    prefill_s, steps, tic = None, [], time.perf_counter()
    try:
        while True:
            start = time.perf_counter()
            _, responses = gen.next()
            phase = "prefill" if prefill_s is None else "decode"
            if timeline is not None:  # a row per step, each with its own step's peak
                timeline.append({**_step_row(gen, len(timeline), responses, start), "phase": phase})
            elif phase == "decode" and len(responses) == n:
                steps.append(time.perf_counter() - start)
            if phase == "prefill" and len(gen._generation_batch) == n:
                mx.synchronize()  # the last chunk's buffers are freed as the GPU finishes it
                prefill_s = time.perf_counter() - tic  # every request prefilled: decode from here
            peaks[phase] = max(peaks[phase], mx.get_peak_memory())
            mx.reset_peak_memory()
            if not (
                responses
                or gen._unprocessed_sequences
                or len(gen._prompt_batch)
                or len(gen._generation_batch)
            ):
                break
    finally:
        gen.close()
    return {
        "requests": n,
        "peak_bytes": max(peaks.values()),
        "prefill_peak_bytes": peaks["prefill"],
        "decode_peak_bytes": peaks["decode"],
        "prefill_s": prefill_s,
        "decode_tok_s": n / median(steps) if steps else None,
    }


def next_count(tries: list[dict[str, Any]], limit: int, weights: int, per_request: int) -> int | None:
    """The request count to run next, or None once the most that fit is bracketed.

    Halving from the bytes-only prediction and bisecting took the device's 10-minute call
    before it found Gemma's counts (prefilling 8 prompts adds GiB to a 4-GiB limit that
    halving does not cross in 3 runs). Peaks are close to linear in the count instead:
    with no run under the limit yet, a run's excess over weights and caches is taken as
    an overhead every count pays (prefilling a group costs the same whatever follows);
    with one under and one over, the count is interpolated between the nearest two.
    """
    fits = [t for t in tries if t["peak_bytes"] <= limit]
    over = [t for t in tries if t["peak_bytes"] > limit]
    best = max(fits, key=lambda t: t["requests"], default=None)
    least_over = min(over, key=lambda t: t["requests"], default=None)
    low = best["requests"] + 1 if best else 1
    high = least_over["requests"] - 1 if least_over else max(1, (limit - weights) // per_request)
    if low > high:
        return None
    if best and least_over:
        n0, p0 = best["requests"], best["peak_bytes"]
        n1, p1 = least_over["requests"], least_over["peak_bytes"]
        guess = n0 + (limit - p0) * (n1 - n0) // (p1 - p0)
    elif least_over:
        overhead = max(t["peak_bytes"] - weights - t["requests"] * per_request for t in over)
        guess = (limit - weights - overhead) // per_request
    else:
        guess = high  # the bytes-only bound, untried
    return int(min(max(guess, low), high))


def fit(
    model: Any,
    bits: int | None,
    args: Any,
    weights: int,
    per_request: int,
    vocab: int,
    start: int | None = None,
) -> dict[str, Any]:
    """The most requests whose whole run peaks under the limit, searched by `next_count`;
    `start` is the first count tried instead of the bytes-only bound (a re-run begins at
    the last measured count and needs two runs, not a search, when it still holds)."""
    limit = int(args.limit_gib * GIB)
    runs: list[dict[str, Any]] = []
    n = start or next_count(runs, limit, weights, per_request)
    while n is not None and len(runs) < args.tries:
        runs.append(serve(model, n, args.context, bits, args, vocab))
        print(json.dumps({"bits": bits, **runs[-1]}), flush=True)
        n = next_count(runs, limit, weights, per_request)
    best = max((r for r in runs if r["peak_bytes"] <= limit), key=lambda r: r["requests"], default={})
    keys = ("requests", "peak_bytes", "prefill_peak_bytes", "decode_peak_bytes")
    tries = [{k: r[k] for k in keys} for r in runs]
    return {"requests": 0, **best, "tries": tries, "bracketed": n is None}


def run(model: Any, precisions: list[int | None], args: Any, vocab: int) -> list[dict[str, Any]]:
    mlx_lm_ext.apply(KVSettings(kv_group_size=GROUP, quantized_kv_start=0))
    weights = mx.get_active_memory()
    layers = model_layout(model)
    serve(model, 2, min(args.context, 2 * args.prefill_step_size), 8, args, vocab)  # warm-up: kernels
    rows = []
    for bits, start in zip(precisions, args.start or [None] * len(precisions), strict=True):
        per_request = kv_bytes(layers, args.context, bits, GROUP)
        row = {"bits": bits, "kv_bytes_per_request": per_request, "weights_bytes": weights}
        rows.append({**row, **fit(model, bits, args, weights, per_request, vocab, start)})
    return ratios(rows)


def ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Requests and decode tok/s of every row as multiples of the first (16-bit) row's."""
    base = rows[0]
    for r in rows:
        for key in ("x_requests", "x_decode_tok_s"):  # a merge's rows carry their call's
            r.pop(key, None)
        if base["requests"] and r["requests"]:
            r["x_requests"] = r["requests"] / base["requests"]
            if r.get("decode_tok_s") and base.get("decode_tok_s"):
                r["x_decode_tok_s"] = r["decode_tok_s"] / base["decode_tok_s"]
    return rows


SETTINGS = ("model", "machine", "mlx_lm", "context", "tokens", "prompt_concurrency", "prefill_step_size")


def merge(results: list[dict[str, Any]]) -> dict[str, Any]:
    """One result from searches split over several device calls (10 minutes each): a
    width's tries pooled, each keeping the command that ran it; its count the most that
    fit in any call, bracketed when some call found one more over the limit. Only runs of
    the same model, machine, release, settings and limit pool."""
    first = results[0]
    for other in results[1:]:
        differing = [k for k in (*SETTINGS, "limit_gib") if other.get(k) != first.get(k)]
        if differing:
            raise ValueError(f"results differ in {', '.join(differing)}: they cannot pool")
    widths: dict[int | None, list[dict[str, Any]]] = {}
    for result in results:
        for row in result["rows"]:
            tagged = [{**t, "command": t.get("command", result.get("command"))} for t in row["tries"]]
            widths.setdefault(row["bits"], []).append({**row, "tries": tagged})
    limit = int(first["limit_gib"] * GIB)
    rows = []
    for _, parts in sorted(widths.items(), key=lambda kv: -(kv[0] or 16)):
        tries = [t for part in parts for t in part["tries"]]
        best = max(parts, key=lambda p: p["requests"])
        bound = next_count(tries, limit, best["weights_bytes"], best["kv_bytes_per_request"])
        rows.append({**best, "tries": tries, "bracketed": bound is None})
    merged = {k: first[k] for k in (*SETTINGS, "limit_gib")}
    return {**merged, "rows": ratios(rows)}


def timelines(model: Any, precisions: list[int | None], args: Any, vocab: int) -> list[dict[str, Any]]:
    """`--timeline N`: N requests once per precision, a row per step; `--revert`'s
    fixes taken off after the others are applied (what the run would do without them)."""
    mlx_lm_ext.apply(KVSettings(kv_group_size=GROUP, quantized_kv_start=0))
    for name in args.revert:
        BY_NAME[name].revert()
    weights = mx.get_active_memory()
    layers = model_layout(model)
    serve(model, 2, min(args.context, 2 * args.prefill_step_size), 8, args, vocab)  # warm-up: kernels
    out = []
    for bits in precisions:
        rows: list[dict[str, Any]] = []
        run = serve(model, args.timeline, args.context, bits, args, vocab, rows)
        caches = args.timeline * kv_bytes(layers, args.context, bits, GROUP)
        out.append({"bits": bits, "weights_bytes": weights, "kv_bytes": caches, **run, "timeline": rows})
        print(json.dumps({k: v for k, v in out[-1].items() if k != "timeline"}), flush=True)
    return out


def timeline_markdown(result: dict[str, Any]) -> str:
    """Per precision: weights plus caches, and the five steps that peaked highest."""
    off = f"; without {', '.join(result['revert'])}" if result["revert"] else ""
    lines = [f"{title(result)}; {result['timeline']} requests of {result['context']} tokens{off}", ""]
    for t in result["timelines"]:
        base = (t["weights_bytes"] + t["kv_bytes"]) / GIB
        lines += [
            f"{kv_label(t['bits'])}: weights + caches {base:.2f} GiB",
            "",
            "| step | phase | prompt | generation | finished | active GiB | peak GiB "
            "| over weights + caches |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in sorted(t["timeline"], key=lambda r: -r["peak_gib"])[:5]:
            lines.append(
                f"| {r['step']} | {r['phase']} | {r['prompt']} | {r['generation']} | {r['finished']} "
                f"| {r['active_gib']:.2f} | {r['peak_gib']:.2f} | {r['peak_gib'] - base:+.2f} |"
            )
        lines.append("")
    return "\n".join(lines)


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"{title(result)}; "
        f"{result['context']}-token requests, limit {result['limit_gib']} GiB, "
        f"prompt concurrency {result['prompt_concurrency']}, "
        f"prefill step {result['prefill_step_size']}",
        "",
        "| KV | cache per request | requests | x 16-bit | prefill peak GiB | decode peak GiB "
        "| decode tok/s (all) | x 16-bit |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        kv = kv_label(r["bits"])
        count = _count(r)
        if not r["requests"]:
            lines.append(f"| {kv} | {r['kv_bytes_per_request'] / 2**20:.0f} MiB | {count} | | | | | |")
            continue
        lines.append(
            f"| {kv} | {r['kv_bytes_per_request'] / 2**20:.0f} MiB | {count} | "
            f"{r.get('x_requests', 0):.2f} | "
            f"{(r['prefill_peak_bytes'] or 0) / GIB:.2f} | {r['decode_peak_bytes'] / GIB:.2f} | "
            f"{r['decode_tok_s'] or 0:.1f} | {r.get('x_decode_tok_s', 0):.2f} |"
        )
    return "\n".join(lines)


def _count(row: dict[str, Any]) -> str:
    """`28 (29 over)`: the most that fit, the fewest tried over the limit, and whether
    `--tries` cut the search before the two were one apart."""
    over = [t["requests"] for t in row["tries"] if t["requests"] > row["requests"]]
    notes = [f"{min(over)} over"] if over else []
    if not row.get("bracketed", True):
        notes.append("search cut by --tries")
    return f"{row['requests']}" + (f" ({', '.join(notes)})" if notes else "")


def bits_arg(text: str) -> int | None:
    return None if text == "16" else int(text)


def command_line() -> argparse.ArgumentParser:
    """The command line: model, limit, widths, and the server's batching settings."""
    parser = model_parser(__doc__)
    parser.add_argument("--context", type=int, default=32768, help="prompt tokens a request")
    parser.add_argument("--limit-gib", type=float, default=None, help="memory limit, weights included")
    parser.add_argument("--bits", type=bits_arg, nargs="+", default=[None, 8, 4], help="16, 8, 4, ...")
    parser.add_argument(
        "--tokens", type=int, default=256, help="steps all requests decode together (one cache growth)"
    )
    parser.add_argument(
        "--prompt-concurrency", type=int, default=8, help="prompts prefilled together (server default 8)"
    )
    parser.add_argument("--prefill-step-size", type=int, default=2048)
    parser.add_argument("--tries", type=int, default=6, help="runs per precision at most")
    parser.add_argument(
        "--start", type=int, nargs="+", default=None, help="first count tried, one per --bits"
    )
    parser.add_argument("--timeline", type=int, default=None, help="N requests once, a row per step")
    parser.add_argument(
        "--revert", nargs="*", default=[], choices=sorted(BY_NAME), help="with --timeline: fixes taken off"
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = command_line()
    args = parser.parse_args(argv)
    if args.timeline is None and args.limit_gib is None:
        parser.error("--limit-gib is required (or --timeline N)")
    if args.start and (len(args.start) != len(args.bits) or min(args.start) < 1):
        parser.error("--start takes one count of at least 1 per --bits width")
    name, model = load_model(args.model, args.config)
    vocab = vocab_size(model)
    keys = ("context", "tokens", "prompt_concurrency", "prefill_step_size")
    if args.timeline is not None:
        result = {**header(name), **{k: getattr(args, k) for k in (*keys, "timeline", "revert")}}
        result["timelines"] = timelines(model, args.bits, args, vocab)
        emit(result, args.json, timeline_markdown)
        return
    rows = run(model, args.bits, args, vocab)
    settings = {k: getattr(args, k) for k in (*keys, "limit_gib")}
    ran = [sys.argv[0], *sys.argv[1:]] if argv is None else ["benchmarks/capacity.py", *argv]
    command = shlex.join(["python", *ran])
    emit({**header(name), **settings, "command": command, "rows": rows}, args.json, markdown)


if __name__ == "__main__":
    main()
