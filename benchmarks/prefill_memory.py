"""Prefill's memory peak and speed with the cuda-prefill fix (chunks paced a layer at a time,
batch masks additive) against without.

    python benchmarks/prefill_memory.py --config benchmarks/configs/llama-3.1-8b.json \
        --shapes 8x1024 1x8192 4x8192 1x32768 --json benchmarks/results/prefill_memory-h200.json
    python benchmarks/prefill_memory.py --model llama-3.2 --shapes 2x512 --bits 16 8   # CPU

Each shape `NxT` is N prompts of T tokens through the server's path (mlx-lm's
BatchGenerator, all N prefilled together in chunks of `--prefill-step-size`, one token
generated), once with the `cuda-prefill` fix reverted (what upstream does) and once
applied, taking turns over `--rounds`. Reported: the peak above the weights (MLX's
peak memory over the prefill), the cache's own bytes at the end, and prefill tok/s as
the ratio patched/upstream within each round, median (min-max). On CUDA the upstream
peak grows with the layer count; on the CPU backend it does not, and the ratio there
shows the method's noise.
"""

from __future__ import annotations

import argparse
from statistics import median
from typing import Any

import mlx.core as mx
from capacity import GIB, bits_arg, serve
from kv_speed import load_model, model_parser, vocab_size
from results_io import emit, header, kv_label, title

import mlx_lm_ext
from mlx_lm_ext.fixes import cuda_prefill
from mlx_lm_ext.report.memory import kv_bytes, model_layout
from mlx_lm_ext.settings import KVSettings

SETTINGS = ("upstream", "patched")


def _shape(text: str) -> tuple[int, int]:
    n, _, t = text.partition("x")
    if not (n.isdigit() and t.isdigit()):
        raise argparse.ArgumentTypeError(f"{text!r}: expected NxT, e.g. 8x1024")
    return int(n), int(t)


def _set(setting: str) -> None:
    fix = cuda_prefill.FIX
    if setting == "patched" and not fix.applied:
        fix.apply()
    elif setting == "upstream" and fix.applied:
        fix.revert()


def prefill(model: Any, n: int, length: int, bits: int | None, setting: str, args: Any, vocab: int) -> dict:
    """One prefill of n prompts: peak above the weights and tok/s."""
    _set(setting)
    weights = mx.get_active_memory()
    run = argparse.Namespace(prompt_concurrency=n, prefill_step_size=args.prefill_step_size, tokens=1)
    row = serve(model, n, length, bits, run, vocab)
    return {"peak": row["prefill_peak_bytes"] - weights, "tok_s": n * length / row["prefill_s"]}


def measure(model: Any, shape: tuple[int, int], bits: int | None, args: Any, vocab: int) -> dict:
    n, length = shape
    runs: dict[str, list[dict]] = {s: [] for s in SETTINGS}
    for _ in range(args.rounds):
        for setting in SETTINGS:
            runs[setting].append(prefill(model, n, length, bits, setting, args, vocab))
    ratios = [pat["tok_s"] / up["tok_s"] for up, pat in zip(runs["upstream"], runs["patched"], strict=True)]
    row = {
        "prompts": n,
        "tokens": length,
        "bits": bits,
        "cache_bytes": n * kv_bytes(model_layout(model), length, bits, 64),
        "x_tok_s": [median(ratios), min(ratios), max(ratios)],
    }
    for setting, rs in runs.items():
        row[f"{setting}_peak_bytes"] = max(r["peak"] for r in rs)
        row[f"{setting}_tok_s"] = median(r["tok_s"] for r in rs)
    return row


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"{title(result)}; prefill step {result['prefill_step_size']}, {result['rounds']} rounds",
        "",
        "| prompts x tokens | KV | cache GiB | peak above weights GiB, upstream | patched "
        "| prefill tok/s, upstream | patched | x (min-max) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        kv = kv_label(r["bits"])
        x, lo, hi = r["x_tok_s"]
        lines.append(
            f"| {r['prompts']}x{r['tokens']} | {kv} | {r['cache_bytes'] / GIB:.2f} | "
            f"{r['upstream_peak_bytes'] / GIB:.2f} | {r['patched_peak_bytes'] / GIB:.2f} | "
            f"{r['upstream_tok_s']:.0f} | {r['patched_tok_s']:.0f} | {x:.2f} ({lo:.2f}-{hi:.2f}) |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = model_parser(__doc__)
    parser.add_argument("--shapes", type=_shape, nargs="+", default=[(8, 1024), (1, 8192)])
    parser.add_argument("--bits", type=bits_arg, nargs="+", default=[None])
    parser.add_argument("--prefill-step-size", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    name, model = load_model(args.model, args.config)
    vocab = vocab_size(model)
    mlx_lm_ext.apply(KVSettings(kv_group_size=64, quantized_kv_start=0))
    prefill(model, 2, 2 * args.prefill_step_size, 8, "patched", args, vocab)  # warm-up: kernels
    rows = [measure(model, s, b, args, vocab) for s in args.shapes for b in args.bits]
    result = {
        **header(name),
        "prefill_step_size": args.prefill_step_size,
        "rounds": args.rounds,
        "rows": rows,
    }
    emit(result, args.json, markdown)


if __name__ == "__main__":
    main()
