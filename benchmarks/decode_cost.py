"""Where a decode step's time goes: building its graph, evaluating it, the attention kernel.

    python benchmarks/decode_cost.py --config benchmarks/configs/llama-3.1-8b.json \
        --contexts 4096 32768 --bits 8 4 --json benchmarks/results/decode_cost-h200.json
    python benchmarks/decode_cost.py --model llama-3.2 --contexts 1024 --bits 8   # CPU

A decode step is paid twice on the host before the device finishes it: Python runs the
model's forward pass, which only records ops (build), then `mx.eval` hands each op to
the backend (on MLX's CUDA backend ~7-10 us an op) while the kernels run (eval). The
two parts, per setting, on a cache filled to the context as kv_speed.py fills it:

- step: build and eval milliseconds (medians over `--rounds` turns of `--steps` steps,
  the settings taking turns, the garbage collector off while timed, each cache cut back
  to the context after its turn) and the primitives in
  one step's graph by kind (mx.export_to_dot), for unpatched 16-bit and patched
  quantized (`--bits` as kv_speed.py's: `8+launch-each-step` makes the flash launch every
  step, not once a tail's block); per layer, each against 16-bit;
- kernel (where the flash kernel runs): one layer's decode attention launched
  `--launches` times in one evaluation, so issuing overlaps the kernels and the time per
  launch is the device's, for the fused 16-bit kernel and the flash kernel under each
  launch plan of `--plans` (blocks a step aims for, rows a lane loads before computing,
  warps a block, scores on tensor cores or not), as cache bytes read per second.
  `--kernel-batch` requests a launch (default 1) make its device time exceed the ~55 us
  it takes to issue one, which a single request's 16-bit kernel does not;
- tail (where the flash kernel runs): the shipped launch over a decode tail, its rows
  read from the buffers, against the same launch handed the step's row to write there
  as a decode step hands it (`kernels.TailRows.incoming`): build and eval us a launch,
  `--launches` launches built then evaluated, the median of 7 rounds.
"""

from __future__ import annotations

import io
import itertools
import json
import time
from collections import Counter
from statistics import median
from typing import Any

import mlx.core as mx
from kv_speed import _delivery, _settings, load_model, model_parser, precision, undo_delivery
from results_io import emit, header, title

from mlx_lm_ext import kernels
from mlx_lm_ext.kernels import launch, plan
from mlx_lm_ext.report.measure import attention_layers, cut_back, filled_cache, no_gc, offsets

GROUP = 64


def primitives(out: mx.array) -> Counter:
    """The ops in an unevaluated array's graph, by kind."""
    dot = io.StringIO()
    mx.export_to_dot(dot, out)
    return Counter(
        line.split('label ="')[1].split('"')[0] for line in dot.getvalue().splitlines() if 'label ="' in line
    )


def step_ops(model: Any, cache: list[Any], warmup: int = 4) -> Counter:
    """One step's ops, after `warmup` evaluated steps (kernels compiled, tails made)."""
    token = mx.array([[7]])
    for _ in range(warmup):
        mx.eval(model(token, cache=cache))
    return primitives(model(token, cache=cache))


def step_times(model: Any, cache: list[Any], steps: int) -> tuple[list[float], list[float]]:
    """Build and eval milliseconds of `steps` one-token steps; then the cache is cut back
    to its length before them (`measure.cut_back`: every round at one context)."""
    token = mx.array([[7]])
    build, run = [], []
    marks = offsets(cache)
    with no_gc():
        for _ in range(steps):
            tic = time.perf_counter()
            out = model(token, cache=cache)
            mid = time.perf_counter()
            mx.eval(out)
            build.append((mid - tic) * 1e3)
            run.append((time.perf_counter() - mid) * 1e3)
    cut_back(cache, marks)
    return build, run


def _with(bits, fn):
    """fn() under the setting's delivery: unpatched 16-bit, patched quantized."""
    _delivery(bits is not None, _settings(bits), bits)
    try:
        return fn()
    finally:
        undo_delivery()


def step_rows(model: Any, context: int, precisions: list, steps: int, rounds: int) -> list[dict[str, Any]]:
    """Each setting's step times, the settings taking turns for `rounds` blocks of
    `steps` steps (a host whose speed drifts slows them alike), medians over all steps."""
    settings = (None, *precisions)
    caches = {b: _with(b, lambda b=b: filled_cache(model, context, _settings(b))) for b in settings}
    ops = {b: _with(b, lambda b=b: step_ops(model, caches[b])) for b in settings}
    times = {b: ([], []) for b in settings}
    for _ in range(rounds):
        for b in settings:
            build, run = _with(b, lambda b=b: step_times(model, caches[b], steps))
            times[b][0].extend(build)
            times[b][1].extend(run)
    rows = []
    for b in settings:
        build, run = times[b]
        row = {
            "kind": "step",
            "context": context,
            "bits": b,
            "build_ms": median(build),
            "eval_ms": median(run),
            "build_range": [min(build), max(build)],
            "eval_range": [min(run), max(run)],
            "ops": sum(ops[b].values()),
            "op_kinds": dict(ops[b].most_common()),
            "layers": len(attention_layers(caches[b])),
        }
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "op_kinds"}), flush=True)
    base = rows[0]
    for r in rows[1:]:
        n = r["layers"]
        r["extra_build_us_per_layer"] = (r["build_ms"] - base["build_ms"]) * 1e3 / n
        r["extra_eval_us_per_layer"] = (r["eval_ms"] - base["eval_ms"]) * 1e3 / n
        r["extra_ops_per_layer"] = (r["ops"] - base["ops"]) / n
    return rows


def _launch_ms(fn, launches: int, rounds: int = 5) -> float:
    """Milliseconds a launch: `launches` chained calls evaluated at once, best of rounds."""
    mx.eval(fn(fn(None)))  # compile, allocate
    best = float("inf")
    for _ in range(rounds):
        tic = time.perf_counter()
        out = None
        for _ in range(launches):
            out = fn(out)
        mx.eval(out)
        best = min(best, time.perf_counter() - tic)
    return best / launches * 1e3


def _layer(context: int, bits: int, shape: tuple[int, int, int, int]) -> dict[str, Any]:
    q_heads, kv_heads, dim, batch = shape
    k = mx.random.normal((batch, kv_heads, context, dim)).astype(mx.bfloat16)
    v = mx.random.normal((batch, kv_heads, context, dim)).astype(mx.bfloat16)
    q = mx.random.normal((batch, q_heads, 1, dim)).astype(mx.bfloat16)
    qk, qv = mx.quantize(k, GROUP, bits), mx.quantize(v, GROUP, bits)
    mx.eval(k, v, q, qk, qv)
    return {"k": k, "v": v, "q": q, "qk": qk, "qv": qv}


def _nbytes(arrays) -> int:
    return sum(a.nbytes for a in arrays)


def _set_plan(blocks: int, unroll: int, warps: int, mma: int = 1) -> None:
    plan.FLASH_BLOCKS, plan.FLASH_UNROLL, plan.FLASH_BLOCK_WARPS = blocks, unroll, warps
    plan.FLASH_MMA = bool(mma)
    launch.forget_plans()


def kernel_rows(context: int, precisions: list[int], plans: list[tuple], launches: int, shape) -> list[dict]:
    """Device time a launch: the fused 16-bit kernel, then the flash kernel per plan."""
    scale = shape[2] ** -0.5
    rows = []
    default = (plan.FLASH_BLOCKS, plan.FLASH_UNROLL, plan.FLASH_BLOCK_WARPS, int(plan.FLASH_MMA))
    for bits in precisions:
        t = _layer(context, bits, shape)
        fused = _launch_ms(
            lambda o, t=t: mx.fast.scaled_dot_product_attention(
                t["q"] if o is None else o, t["k"], t["v"], scale=scale
            ),
            launches,
        )
        nbytes = _nbytes([t["k"], t["v"]])
        rows.append(
            {
                "kind": "kernel",
                "context": context,
                "bits": 16,
                "plan": "fused",
                "ms": fused,
                "GB_s": nbytes / fused / 1e6,
            }
        )
        qbytes = _nbytes([*t["qk"], *t["qv"]])
        for flash_plan in plans:
            _set_plan(*flash_plan)

            def flash(o, t=t, bits=bits):
                queries = t["q"] if o is None else o
                return launch.flash_decode(queries, t["qk"], t["qv"], scale, GROUP, bits, context)

            try:
                ms = _launch_ms(flash, launches)
            except (RuntimeError, ValueError) as e:
                rows.append(
                    {
                        "kind": "kernel",
                        "context": context,
                        "bits": bits,
                        "plan": list(flash_plan),
                        "error": str(e)[:160],
                    }
                )
                continue
            rows.append(
                {
                    "kind": "kernel",
                    "context": context,
                    "bits": bits,
                    "plan": list(flash_plan),
                    "ms": ms,
                    "GB_s": qbytes / ms / 1e6,
                    "x_fused_time": ms / fused,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    _set_plan(*default)
    return rows


TAIL_KINDS = ("tail read", "tail + step row")


def tail_rows(context: int, bits: int, shape, launches: int, rounds: int = 7) -> list[dict]:
    """Build and eval us a launch of the flash kernel over `context` quantized rows and a
    31-row decode tail, without and with the step's row to write (TAIL_KINDS), the two
    taking turns round by round."""
    q_heads, kv_heads, dim, batch = shape
    t = _layer(context, bits, shape)
    buffers = [mx.random.normal((batch, kv_heads, 64, dim)).astype(mx.bfloat16) for _ in range(2)]
    row = tuple(mx.random.normal((batch, kv_heads, 1, dim)).astype(mx.bfloat16) for _ in range(2))
    mx.eval(buffers, row)
    times: dict[str, list[tuple[float, float]]] = {kind: [] for kind in TAIL_KINDS}
    for _ in range(rounds):
        for kind in TAIL_KINDS:
            writes = kernels.TailWrites()
            tic = time.perf_counter()
            outs = []
            for _ in range(launches):
                tail = kernels.TailRows(*buffers, 31, *((row, writes) if kind != TAIL_KINDS[0] else ()))
                outs.append(
                    launch.flash_decode(t["q"], t["qk"], t["qv"], dim**-0.5, GROUP, bits, context, tail=tail)
                )
            mid = time.perf_counter()
            mx.eval(outs)
            times[kind].append(((mid - tic) / launches * 1e6, (time.perf_counter() - mid) / launches * 1e6))
    return [
        {
            "kind": "tail",
            "context": context,
            "bits": bits,
            "launch": kind,
            "build_us": median(b for b, _ in times[kind]),
            "eval_us": median(e for _, e in times[kind]),
        }
        for kind in TAIL_KINDS
    ]


def _plan_arg(text: str) -> tuple[int, ...]:
    """'blocks,unroll,warps[,mma]': mma 1 (the default) scores on tensor cores, 0 on CUDA cores."""
    values = tuple(int(x) for x in text.split(","))
    if len(values) not in (3, 4):
        raise ValueError(f"a plan is blocks,unroll,warps[,mma], not {text!r}")
    return values if len(values) == 4 else (*values, 1)


def markdown(result: dict[str, Any]) -> str:
    lines = [
        title(result),
        "",
        "| context | KV | build ms | eval ms | ops | build us/layer vs 16-bit | eval us/layer vs 16-bit "
        "| ops/layer vs 16-bit |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in (r for r in result["rows"] if r["kind"] == "step"):
        extra = (
            f"{r['extra_build_us_per_layer']:+.1f} | {r['extra_eval_us_per_layer']:+.1f} | "
            f"{r['extra_ops_per_layer']:+.2f}"
            if "extra_ops_per_layer" in r
            else " | | "
        )
        kv = "16-bit" if r["bits"] is None else f"{r['bits']}"
        lines.append(
            f"| {r['context']} | {kv} | {r['build_ms']:.2f} | {r['eval_ms']:.2f} | {r['ops']} | {extra} |"
        )
    kernel = [r for r in result["rows"] if r["kind"] == "kernel"]
    if kernel:
        lines += [
            "",
            "| context | bits | plan (blocks, unroll, warps, mma) | us a launch | GB/s | x fused time |",
            "|---|---|---|---|---|---|",
        ]
        for r in kernel:
            if "error" in r:
                lines.append(f"| {r['context']} | {r['bits']} | {r['plan']} | fails: {r['error']} | | |")
                continue
            ratio = f"{r['x_fused_time']:.2f}" if "x_fused_time" in r else ""
            lines.append(
                f"| {r['context']} | {r['bits']} | {r['plan']} | {r['ms'] * 1e3:.1f} | "
                f"{r['GB_s']:.0f} | {ratio} |"
            )
    tails = [r for r in result["rows"] if r["kind"] == "tail"]
    if tails:
        lines += ["", "| context | bits | launch | build us | eval us |", "|---|---|---|---|---|"]
        lines += [
            f"| {r['context']} | {r['bits']} | {r['launch']} | {r['build_us']:.1f} | {r['eval_us']:.1f} |"
            for r in tails
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = model_parser(__doc__)
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096, 32768])
    parser.add_argument("--bits", type=precision, nargs="+", default=[8, 4], help="as kv_speed.py's")
    parser.add_argument("--steps", type=int, default=16, help="decode steps a setting times per round")
    parser.add_argument("--rounds", type=int, default=4, help="turns the settings take")
    parser.add_argument("--launches", type=int, default=64, help="kernel launches evaluated at once")
    parser.add_argument(
        "--plans",
        type=_plan_arg,
        nargs="*",
        default=None,
        help="flash launch plans 'blocks,unroll,warps[,mma]' (default: the shipped one, CUDA-core "
        "scores, and a grid around it)",
    )
    parser.add_argument("--kernel-batch", type=int, default=1, help="requests a kernel launch serves")
    args = parser.parse_args(argv)
    name, model = load_model(args.model, args.config)
    rows = []
    for context in args.contexts:
        rows += step_rows(model, context, args.bits, args.steps, args.rounds)
        mx.clear_cache()
    if kernels.available():
        shipped = (plan.FLASH_BLOCKS, plan.FLASH_UNROLL, plan.FLASH_BLOCK_WARPS, 1)
        grid = [(*p, mma) for p in itertools.product((264, 528, 1056), (2, 4, 8), (4, 8)) for mma in (1, 0)]
        plans = args.plans if args.plans is not None else [shipped, *(p for p in grid if p != shipped)]
        args_ = model.args
        shape = (
            args_.num_attention_heads,
            args_.num_key_value_heads,
            getattr(args_, "head_dim", None) or args_.hidden_size // args_.num_attention_heads,
            args.kernel_batch,
        )
        widths = [b for b in args.bits if isinstance(b, int)]  # the kernel alone: plain widths
        for context in args.contexts:
            rows += kernel_rows(context, widths, plans, args.launches, shape)
            for bits in widths:
                rows += tail_rows(context, bits, shape, args.launches)
    result = {**header(name), "steps": args.steps, "launches": args.launches}
    emit({**result, "kernel_batch": args.kernel_batch, "rows": rows}, args.json, markdown)


if __name__ == "__main__":
    main()
