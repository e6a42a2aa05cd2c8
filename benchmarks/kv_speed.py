"""KV cache bytes, decode and prefill speed at 16, 8 and 4 bits: unpatched vs patched, one run.

    python benchmarks/kv_speed.py --model llama-3.2 --contexts 4096 32768 \
        --json benchmarks/results/kv_speed-cpu.json          # a models.yaml stand-in
    python benchmarks/kv_speed.py --config benchmarks/configs/llama-3.1-8b.json   # on a GPU

Speed depends on shapes, not on weights, so `--config` builds the real mlx-lm model class
from a config.json with random weights (a Llama-3.1-8B shape, say); `--model`
loads a models.yaml entry's offline stand-in or a model folder. Each setting runs twice
in the same process, on unpatched mlx-lm (every fix reverted) and patched
(`mlx_lm_ext.apply`); a setting unpatched mlx-lm cannot run is recorded with its error.

- bytes: the cache's arrays at `context` tokens (`measure.filled_cache`), against 16-bit
  and against the affine limit (bits/8 + two 16-bit values per group, over 2 bytes);
- decode: tok/s on that cache against unpatched 16-bit over `--rounds` rounds, the
  settings taking turns block by block (all caches are filled first, so a host whose
  speed drifts slows every setting alike; every other round in reverse order), each
  layer that grew cut back to the context after its block (a sliding ring that has
  wrapped holds its window at any offset and stays; rows say `cut_back`: false only
  where a layer grew and could not trim), two ways of `--steps` tokens each:
  - generate: through mlx-lm's own `generate_step` (the next step's graph is built
    while the device runs the current one, as in `mlx_lm.generate` and the server:
    what users get);
  - step: each step evaluated before the next is built (dispatch and kernels add up,
    so it also shows what a path costs in ops).
  Each way's tokens are timed one by one, and its ratio to unpatched 16-bit is given
  settled (`measure.settled_rate`: per position in the block, the lower quartile over
  rounds; 95% interval from resampling rounds) and by block (each round's ratio: the
  median, its 95% bootstrap interval and the range). Settled ranks where block means
  cannot: on this 2-core CPU under `host_load.py` the same 16-bit path read 0.98
  [0.96-1.04] of itself settled and 1.00 [0.93-1.31] by block (benchmarks/README.md).
  Patched 16-bit, the same code path, shows what the method resolves. To rank
  settings, `--steps 256`: every block then holds four flushes of a quantized decode
  tail. Rows keep each block's token times at 10/50/90% and the slowest
  (`gen_token_ms`, `step_token_ms`): a drifting host moves the middle, a stall the top;
- prefill: `--prefill` real tokens in generate_step's 2048-token chunks, quantized from
  the first chunk (`--quantized-kv-start 0`), timed on a second pass after a warm-up one;
- quantize: the one-off conversion of the filled 16-bit cache when decode crosses
  `--quantized-kv-start`.
"""

from __future__ import annotations

import argparse
import json
import time
from functools import partial
from pathlib import Path
from statistics import median
from typing import Any

import mlx.core as mx
from results_io import emit, header, title

import mlx_lm_ext
from mlx_lm_ext.fixes import quantized_attention
from mlx_lm_ext.kernels import launch, plan
from mlx_lm_ext.report.measure import (
    bootstrap_interval,
    cut_back,
    decode_times,
    filled_cache,
    generation_rate,
    generation_times,
    interleaved,
    offsets,
    prefill,
    quantile_of,
    quantize,
    settled_rate,
)
from mlx_lm_ext.report.memory import parse_widths
from mlx_lm_ext.report.quality import cache_nbytes
from mlx_lm_ext.settings import KVSettings

GROUP = 64
WARMUP = 2  # generate tokens each block runs before its timed ones


def load_model(model: str | None, config: Path | None) -> tuple[str, Any]:
    if config is not None:
        from mlx_lm_ext.report.memory import model_from_config

        net = model_from_config(json.loads(config.read_text()))
        mx.eval(net.parameters())
        return f"{config.stem} shape, random weights", net
    from mlx_lm import load

    from mlx_lm_ext.report.memory import model_source

    name, source, _ = model_source(model, offline=True)
    return name, load(source)[0]


def vocab_size(model: Any) -> int:
    """Token ids a benchmark's prompts may use."""
    return model.model.embed_tokens.weight.shape[0] if hasattr(model, "model") else 512


ROTATE = {"rot": "keys", "rot-kv": "all"}
KEEP_SLIDING = "keep-sliding"  # sliding-window layers stay 16-bit (--keep-sliding-kv)
CUDA_CORES = "cuda-cores"  # the flash kernel scores on CUDA cores, not tensor cores: a comparison
EACH_STEP = "launch-each-step"  # the flash launch made every step, not once a tail's block: a comparison
COMPARISONS = (KEEP_SLIDING, CUDA_CORES, EACH_STEP)
_BLOCK_DECODER = quantized_attention._block_decoder


def precision(text: str) -> int | str:
    """A --bits item: `8` (int), or a format string: `K8V4` (key and value bits apart),
    `4+rot` (keys rotated), `4+rot-kv` (keys and values), `K8V4+rot`, `8+keep-sliding`,
    `8+cuda-cores` (the flash kernel's scores off tensor cores), `8+launch-each-step`
    (the flash launch made every decode step, as before it was reused for a tail's block)."""
    if text.isdigit():
        return int(text)
    try:
        _widths(text)
    except (ValueError, IndexError, KeyError):
        raise argparse.ArgumentTypeError(
            f"{text!r}: bits, K<k>V<v>, each with optional +rot or +rot-kv, +keep-sliding, +cuda-cores, "
            "+launch-each-step"
        ) from None
    return text


def _widths(bits: int | str) -> tuple[int, int, str | None, bool]:
    """(key bits, value bits, rotation, sliding layers kept) of a precision."""
    if isinstance(bits, int):
        return bits, bits, None, False
    widths, *options = bits.split("+")
    w = parse_widths(widths)[0]
    key, value = (w, w) if isinstance(w, int) else w
    rotate = [ROTATE[o] for o in options if o not in COMPARISONS]
    if len(rotate) > 1:
        raise ValueError(bits)
    return key, value, rotate[0] if rotate else None, KEEP_SLIDING in options


def affine_limit(bits: int | str | None, dtype_bytes: int = 2) -> float:
    """Bytes of a quantized row over a 16-bit row: packed bits plus a scale and bias per group."""
    if bits is None:
        return 1.0
    key, value, *_ = _widths(bits)
    return ((key + value) / 16 + 2 * dtype_bytes / GROUP) / dtype_bytes


def _settings(bits: int | str | None) -> KVSettings:
    if bits is None or isinstance(bits, int):
        return KVSettings(kv_bits=bits, kv_group_size=GROUP, quantized_kv_start=0)
    key, value, rotate, keep_sliding = _widths(bits)
    return KVSettings(
        kv_bits=key,
        kv_value_bits=value,
        kv_rotate=rotate,
        kv_group_size=GROUP,
        quantized_kv_start=0,
        quantize_sliding=not keep_sliding,
    )


def _deliveries(bits: int | str | None) -> tuple[bool, ...]:
    """Unpatched and patched; a format upstream has no words for (split, rotated): patched."""
    return (False, True) if bits is None or isinstance(bits, int) else (True,)


def _delivery(patched: bool, settings: KVSettings, bits: int | str | None = None) -> None:
    """Patched or not; `bits` with +cuda-cores: the flash kernel without tensor cores;
    with +launch-each-step: no step reuses the launch an earlier one made."""
    options = bits.split("+") if isinstance(bits, str) else ()
    tensor_cores = CUDA_CORES not in options
    if plan.FLASH_MMA != tensor_cores:  # kernels made for the other choice are dropped
        plan.FLASH_MMA = tensor_cores
        launch.forget_plans()
    each_step = EACH_STEP in options
    quantized_attention._block_decoder = (lambda *args: None) if each_step else _BLOCK_DECODER
    if patched:
        mlx_lm_ext.apply(settings)
    else:
        mlx_lm_ext.revert()


def undo_delivery() -> None:
    """Upstream mlx-lm and the shipped kernel choices again: a comparison setting
    (+cuda-cores, +launch-each-step) leaves nothing behind for what runs next."""
    _delivery(False, KVSettings())


def _guarded(fn) -> dict[str, Any]:
    """The measurement, or the error unpatched mlx-lm (or a backend) raises."""
    mx.clear_cache()
    mx.reset_peak_memory()
    try:
        return fn()
    except (RuntimeError, ValueError, TypeError, NotImplementedError) as e:
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"}
    finally:
        undo_delivery()


def _filled(model: Any, context: int, bits: int | None, patched: bool, others: int) -> dict[str, Any]:
    """One setting's cache, filled and decoded once (warm-up: kernels compiled, allocator
    primed). Its peak is the process peak less `others`, the bytes of the other settings'
    caches held meanwhile for the interleaved rounds."""

    def fill() -> dict[str, Any]:
        _delivery(patched, _settings(bits), bits)
        cache = filled_cache(model, context, _settings(bits))
        nbytes = cache_nbytes(cache)  # at `context` tokens, before decoding grows it
        generation_rate(model, cache, 4)
        return {"cache": cache, "kv_bytes": nbytes, "peak_bytes": mx.get_peak_memory() - others}

    return _guarded(fill)


WAYS = {"gen": "gen_tok_s", "step": "tok_s"}  # generate_step's tokens, evaluated steps: their rate keys


def _rates(model: Any, cache: list[Any], bits: int | None, patched: bool, steps: int) -> tuple[dict, bool]:
    """A block of each way (WAYS), each token's seconds; then each layer is cut back to
    its length before them where it grew (`measure.cut_back`)."""
    _delivery(patched, _settings(bits), bits)
    try:
        marks = offsets(cache)
        blocks = {
            "gen": generation_times(model, cache, steps, WARMUP),
            "step": decode_times(model, cache, steps),
        }
        return blocks, cut_back(cache, marks)
    finally:
        undo_delivery()


def decode_rows(model: Any, context: int, precisions: list, steps: int, rounds: int) -> list[dict[str, Any]]:
    """A row per (precision, delivery): bytes and peak from filling its cache, then decode
    rates as medians over `rounds` turns taken by all settings (`measure.interleaved`)."""
    rows, caches = [], {}
    for bits in precisions:
        for patched in _deliveries(bits):
            row = {"kind": "decode", "context": context, "bits": bits, "patched": patched}
            others = sum(cache_nbytes(c) for c in caches.values())
            row.update(_filled(model, context, bits, patched, others))
            if "cache" in row:
                caches[len(rows)] = row.pop("cache")
            rows.append({**row, "affine_limit": affine_limit(bits)})
    turns = {
        i: partial(_rates, model, c, rows[i]["bits"], rows[i]["patched"], steps) for i, c in caches.items()
    }
    for i, rates in interleaved(turns, rounds).items():
        blocks, cut = zip(*rates, strict=True)
        rows[i]["cut_back"] = all(cut)
        rows[i]["blocks"] = {way: [b[way] for b in blocks] for way in WAYS}  # for ratios; not written out
        for way, key in WAYS.items():
            rows[i].update(_way(way, key, rows[i]["blocks"][way]))
    return rows  # the caches go with this frame; the next _guarded clears MLX's buffer cache


def _way(way: str, key: str, blocks: list[list[float]]) -> dict[str, Any]:
    """One way's figures: each round's block rate and their median, the settled rate and
    each block's token times at 10/50/90% and the slowest (a drift moves the middle, a
    stall only the top)."""
    rates = [len(times) / sum(times) for times in blocks]
    return {
        key: median(rates),
        f"{way}_rounds": rates,
        f"{way}_settled_tok_s": settled_rate(blocks),
        f"{way}_token_ms": [
            [round(quantile_of(t, q) * 1e3, 3) for q in (0.1, 0.5, 0.9, 1.0)] for t in blocks
        ],
    }


def prefill_row(model: Any, tokens: int, bits: int | None, patched: bool) -> dict[str, Any]:
    ids = [(i * 7919) % 1000 + 5 for i in range(tokens)]

    def measure() -> dict[str, Any]:
        _delivery(patched, _settings(bits), bits)
        prefill(model, ids, _settings(bits), step=2048)  # warm-up: JIT-compiled kernels, allocator
        tic = time.perf_counter()
        prefill(model, ids, _settings(bits), step=2048)
        return {"prefill_tok_s": tokens / (time.perf_counter() - tic), "peak_bytes": mx.get_peak_memory()}

    return _guarded(measure)


def quantize_row(model: Any, context: int, bits: int) -> dict[str, Any]:
    def measure() -> dict[str, Any]:
        mlx_lm_ext.apply(_settings(bits))
        cache = filled_cache(model, context, _settings(None))
        tic = time.perf_counter()
        quantize(cache, _settings(bits))
        mx.eval([c.state for c in cache])
        return {"convert_ms": (time.perf_counter() - tic) * 1e3}

    return _guarded(measure)


def _settled_ratios(rows: list[dict[str, Any]]) -> None:
    """Each setting's settled rates over unpatched 16-bit's, each with a 95% interval from
    resampling rounds (the two settings' blocks of a round drawn together)."""
    blocks = {i: r.pop("blocks") for i, r in enumerate(rows) if "blocks" in r}
    base = blocks.get(0) if rows and rows[0]["bits"] is None and not rows[0]["patched"] else None
    for i, way in ((i, way) for i in blocks if base is not None for way in WAYS):
        pairs = list(zip(blocks[i][way], base[way], strict=True))
        rows[i][f"x_{way}_settled_tok_s"] = _settled_ratio(pairs)
        rows[i][f"x_{way}_settled_tok_s_ci"] = list(bootstrap_interval(pairs, _settled_ratio, draws=400))


def _settled_ratio(pairs: list[tuple[Any, Any]]) -> float:
    mine, theirs = zip(*pairs, strict=True)
    return settled_rate(mine) / settled_rate(theirs)


def _ratios(rows: list[dict[str, Any]], key: str) -> None:
    base = next((r for r in rows if r["bits"] is None and not r["patched"] and key in r), None)
    for r in rows:
        if base and key in r:
            r[f"x_{key}"] = r[key] / base[key]


def _round_ratios(rows: list[dict[str, Any]], key: str, rounds: str) -> None:
    """Each setting's rate over unpatched 16-bit's in the same round, median and range.

    Rounds run back to back (every setting once, then again), so a ratio within a round
    cancels the host's drift between rounds, which medians taken apart do not: on the
    H200 the same 16-bit generate ranged 98-166 tok/s over five rounds of one run."""
    base = next((r for r in rows if r["bits"] is None and not r["patched"] and rounds in r), None)
    for r in rows:
        if base and rounds in r:
            r.update(round_ratios(key, r[rounds], base[rounds]))


def round_ratios(key: str, values: list[float], base: list[float]) -> dict[str, Any]:
    """Each round's value over the base's in the same round: `x_{key}` is their median,
    `x_{key}_ci` its 95% bootstrap interval and `x_{key}_range` their range (what
    `spread(row, key)` shows)."""
    ratios = [a / b for a, b in zip(values, base, strict=True)]
    name = f"x_{key}"
    interval = list(bootstrap_interval(ratios, median))
    return {name: median(ratios), f"{name}_ci": interval, f"{name}_range": [min(ratios), max(ratios)]}


def run(
    model: Any, contexts: list[int], bits: list[int], steps: int, prefill_tokens: int, rounds: int = 3
) -> list[dict]:
    rows = []
    precisions = [None, *bits]
    for context in contexts:
        group = decode_rows(model, context, precisions, steps, rounds)
        _ratios(group, "kv_bytes")
        _round_ratios(group, "gen_tok_s", "gen_rounds")
        _round_ratios(group, "tok_s", "step_rounds")
        _settled_ratios(group)
        for row in group:
            print(json.dumps(row), flush=True)
        rows += group
        for b in bits:
            row = {"kind": "quantize", "context": context, "bits": b, "patched": True}
            rows.append({**row, **quantize_row(model, context, b)})
            print(json.dumps(rows[-1]), flush=True)
    if prefill_tokens:
        group = []
        for b in precisions:
            for patched in _deliveries(b):
                row = {"kind": "prefill", "context": prefill_tokens, "bits": b, "patched": patched}
                group.append({**row, **prefill_row(model, prefill_tokens, b, patched)})
                print(json.dumps(group[-1]), flush=True)
        _ratios(group, "prefill_tok_s")
        rows += group
    return rows


def _precision(r: dict) -> str:
    if r["bits"] is None:
        return "16-bit"
    return f"{r['bits']}-bit" if isinstance(r["bits"], int) else r["bits"]


def _cell(r: dict, key: str, fmt: str) -> str:
    return format(r[key], fmt) if key in r else "n/a"


def spread(r: dict, key: str) -> str:
    """`0.98 [0.96-1.00] (0.90-1.07)`: the median ratio over rounds, its 95% interval
    and its range (each where the row has it)."""
    if f"x_{key}" not in r:
        return "n/a"
    ci = " [{:.2f}-{:.2f}]".format(*r[f"x_{key}_ci"]) if f"x_{key}_ci" in r else ""
    spread = " ({:.2f}-{:.2f})".format(*r[f"x_{key}_range"]) if f"x_{key}_range" in r else ""
    return f"{r[f'x_{key}']:.2f}{ci}{spread}"


def _decode_cells(r: dict) -> str:
    return (
        f"{r['kv_bytes'] / 2**20:.1f} | {_cell(r, 'x_kv_bytes', '.3f')} ({r['affine_limit']:.3f}) | "
        f"{r['gen_tok_s']:.1f} | {spread(r, 'gen_settled_tok_s')} | {spread(r, 'gen_tok_s')} | "
        f"{r['tok_s']:.1f} | {spread(r, 'step_settled_tok_s')} | {spread(r, 'tok_s')} | "
        f"{r['peak_bytes'] / 2**20:.0f}"
    )


def _prefill_cells(r: dict) -> str:
    return f"{r['prefill_tok_s']:.1f} | {_cell(r, 'x_prefill_tok_s', '.2f')}"


def _section(rows: list[dict], kind: str, cells: int, render) -> list[str]:
    """Table lines of one kind of row: context, precision, delivery, then its own cells."""
    out = []
    for r in (r for r in rows if r["kind"] == kind):
        who = "patched" if r["patched"] else "unpatched"
        body = f"fails: {r['error']} " + "|" * cells if "error" in r else render(r) + " |"
        out.append(f"| {r['context']} | {_precision(r)} | {who} | {body}")
    return out


def markdown(result: dict[str, Any]) -> str:
    head = f"{title(result)}, group {GROUP}"
    lines = [
        head,
        "",
        "| context | KV | mlx-lm | KV MiB | x 16-bit (affine limit) | generate tok/s "
        "| x unpatched 16-bit, settled [95% interval] | by block: median [95% interval] (range) of rounds "
        "| step tok/s | x unpatched 16-bit, settled | by block | peak MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += _section(result["rows"], "decode", 9, _decode_cells)
    prefills = _section(result["rows"], "prefill", 2, _prefill_cells)
    if prefills:  # none with --prefill 0
        lines += [
            "",
            "| prefill tokens | KV | mlx-lm | prefill tok/s | x unpatched 16-bit |",
            "|---|---|---|---|---|",
        ]
        lines += prefills
    convert = [r for r in result["rows"] if r["kind"] == "quantize" and "convert_ms" in r]
    if convert:
        lines += ["", "One-off conversion of the 16-bit cache at --quantized-kv-start:"]
        lines += [f"- {r['context']} tokens to {_precision(r)}: {r['convert_ms']:.1f} ms" for r in convert]
    return "\n".join(lines)


def model_parser(doc: str) -> argparse.ArgumentParser:
    """A benchmark's parser with --model/--config (one of them) and --json."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", help="models.yaml id (offline stand-in) or model folder")
    which.add_argument("--config", type=Path, help="config.json: the real model class, random weights")
    parser.add_argument("--json", type=Path, default=None)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = model_parser(__doc__)
    parser.add_argument("--contexts", type=int, nargs="*", default=[4096, 32768], help="none: prefill only")
    parser.add_argument(
        "--bits", type=precision, nargs="+", default=[8, 4], help="8, 4, K8V4, 4+rot, 4+rot-kv, ..."
    )
    parser.add_argument("--steps", type=int, default=16, help="decode steps timed per setting and round")
    parser.add_argument("--rounds", type=int, default=3, help="turns all settings take (medians)")
    parser.add_argument("--prefill", type=int, default=4096, help="prefill tokens timed (0: skip)")
    args = parser.parse_args(argv)
    name, model = load_model(args.model, args.config)
    rows = run(model, args.contexts, args.bits, args.steps, args.prefill, args.rounds)
    result = {
        **header(name),
        "steps": args.steps,
        "rounds": args.rounds,
        "rows": rows,
    }
    emit(result, args.json, markdown)


if __name__ == "__main__":
    main()
