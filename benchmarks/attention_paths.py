"""Which quantized attention path, per backend: one decode step of one layer, timed in one run.

    python benchmarks/attention_paths.py --tokens 4097 32769 \
        --json benchmarks/results/attention_paths-cpu.json
    python benchmarks/attention_paths.py --tokens 32769 4097 257 --layers 32 --iters 10

A growing quantized cache hands attention `buffer[..., :offset, :]`, a strided view. The
paths compared, each on the same keys and values at `tokens` (offset one past a 256-row
growth step, as in decode):
  fp16 fused        mx.fast.scaled_dot_product_attention on the 16-bit cache's view
                    (what unpatched mlx-lm does without --kv-bits): the reference speed
  strided views     quantized attention on the views (upstream's layout; MLX's CUDA
                    quantized_matmul has no kernel for it, so it is skipped where it fails)
  contiguous copy   the views copied to contiguous arrays every step
  whole buffer      the whole buffer, unused rows' scores dropped (mlx_lm_ext's choice
                    where strided operands are rejected)
  dequantize+fused  the views dequantized to 16 bits, then the fused kernel
  custom CUDA       mlx_lm_ext/kernels/'s CUDA kernels on the whole buffer (fails
                    where MLX has no CUDA backend)
plus the one-off costs: quantizing the whole 16-bit cache (crossing --quantized-kv-start)
and dequantizing it. Times are the mean of `--iters` evaluated steps after a warm-up (the
first use of a kernel is JIT-compiled on CUDA). With `--layers N`, a step is N layers,
each on its own cache and fed the previous layer's output, evaluated once, as a model's
decode step is: on CUDA one layer alone is a few kernels, so its time is mostly the cost
of issuing them and varies ~2x between runs; a chain shows what a step pays (the time at
a few hundred tokens is that issuing cost alone).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx
from results_io import emit, machine

from mlx_lm_ext.fixes.quantized_attention import QuantizedOperands, quantized_attention

Q_HEADS, KV_HEADS, HEAD_DIM, STEP, GROUP = 32, 8, 128, 256, 64


def timed(fn: Callable[[], mx.array], iters: int, warmup: int = 3) -> float:
    """Mean milliseconds of one evaluated call; raises what the kernel raises."""
    for _ in range(warmup):
        mx.eval(fn())
    tic = time.perf_counter()
    for _ in range(iters):
        mx.eval(fn())
    return (time.perf_counter() - tic) / iters * 1e3


def paths(tokens: int, bits: int, layers: int = 1) -> dict[str, Callable[[], mx.array]]:
    rows = (tokens + STEP - 1) // STEP * STEP
    shape = (1, KV_HEADS, rows, HEAD_DIM)
    ks = [mx.random.normal(shape).astype(mx.bfloat16) for _ in range(layers)]
    vs = [mx.random.normal(shape).astype(mx.bfloat16) for _ in range(layers)]
    q0 = mx.random.normal((1, Q_HEADS, 1, HEAD_DIM)).astype(mx.bfloat16)
    qks = [mx.quantize(k, GROUP, bits) for k in ks]
    qvs = [mx.quantize(v, GROUP, bits) for v in vs]
    mx.eval(ks, vs, q0, qks, qvs)
    scale = HEAD_DIM**-0.5

    def view(t):
        return tuple(x[..., :tokens, :] for x in t)

    def contiguous(t):
        return tuple(map(mx.contiguous, view(t)))

    def chain(layer: Callable[[mx.array, int], mx.array]) -> Callable[[], mx.array]:
        """All layers, each taking the previous one's output as its queries."""

        def step() -> mx.array:
            q = q0
            for i in range(layers):
                q = layer(q, i)
            return q

        return step

    def dequantized(q, i):
        dk, dv = (mx.dequantize(*view(t), group_size=GROUP, bits=bits) for t in (qks[i], qvs[i]))
        return mx.fast.scaled_dot_product_attention(q, dk, dv, scale=scale)

    def quantized(q, keys, values, length=None, kernels=False):
        ops = QuantizedOperands(keys, values, GROUP, bits, length)
        return quantized_attention(q, ops, scale, None, kernels_on=kernels)

    return {
        "fp16 fused": chain(
            lambda q, i: mx.fast.scaled_dot_product_attention(
                q, ks[i][..., :tokens, :], vs[i][..., :tokens, :], scale=scale
            )
        ),
        "strided views": chain(lambda q, i: quantized(q, view(qks[i]), view(qvs[i]), kernels=False)),
        "contiguous copy": chain(
            lambda q, i: quantized(q, contiguous(qks[i]), contiguous(qvs[i]), kernels=False)
        ),
        "whole buffer": chain(lambda q, i: quantized(q, qks[i], qvs[i], length=tokens, kernels=False)),
        "dequantize+fused": chain(dequantized),
        "custom CUDA kernels": chain(lambda q, i: quantized(q, qks[i], qvs[i], length=tokens, kernels=True)),
        "one-off: quantize the 16-bit cache": lambda: [
            mx.quantize(k[..., :tokens, :], GROUP, bits)[0] for k in ks
        ],
        "one-off: dequantize the cache": lambda: [
            mx.dequantize(*view(t), group_size=GROUP, bits=bits) for t in qks
        ],
    }


def run(tokens: list[int], bits: list[int], iters: int, layers: int = 1) -> dict:
    rows = []
    for n in tokens:
        for b in bits:
            base = None
            for name, fn in paths(n, b, layers).items():
                row = {"tokens": n, "bits": b, "path": name}
                try:
                    row["ms"] = timed(fn, iters)
                except (RuntimeError, ValueError) as e:
                    row["error"] = str(e).splitlines()[0][:160]
                base = base or row.get("ms")
                if "ms" in row and not name.startswith("one-off"):
                    row["x_fp16_time"] = row["ms"] / base
                rows.append(row)
                print(json.dumps(row), flush=True)
    return {
        "machine": machine(),
        "shape": f"{Q_HEADS} query heads on {KV_HEADS} KV heads x {HEAD_DIM}, bf16, group {GROUP}",
        "iters": iters,
        "layers": layers,
        "rows": rows,
    }


def markdown(result: dict) -> str:
    lines = [
        f"{result['machine']}; decode attention of {result.get('layers', 1)} layer(s), {result['shape']}",
        "",
        "| tokens | bits | path | ms | x fp16 fused time |",
        "|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        ms = f"{r['ms']:.3f}" if "ms" in r else f"fails: {r['error']}"
        ratio = f"{r['x_fp16_time']:.2f}" if "x_fp16_time" in r else ""
        lines.append(f"| {r['tokens']} | {r['bits']} | {r['path']} | {ms} | {ratio} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[4097, 32769])
    parser.add_argument("--bits", type=int, nargs="+", default=[8, 4])
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--layers", type=int, default=1, help="layers chained into one timed step")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    result = run(args.tokens, args.bits, args.iters, args.layers)
    emit(result, args.json, markdown)


if __name__ == "__main__":
    main()
