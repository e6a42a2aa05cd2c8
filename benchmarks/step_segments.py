"""A decode step's host time by segment: this library, unpatched mlx-lm and an earlier revision.

    python benchmarks/step_segments.py --config benchmarks/configs/llama-3.1-8b.json \
        --contexts 4096 32768 --bits 8 4 --against 2172df5 --json results/step_segments-h200.json
    python benchmarks/step_segments.py --config tiny.json --contexts 256 --bits 8 --steps 4   # CPU

A decode step is host time first (decode_cost.py says how much); this says where in a
layer it goes. Each setting (unpatched 16-bit, patched 16-bit, each of `--bits` patched,
and with `--against REV` each of `--bits` patched by the library at that git revision)
decodes on its own cache, filled as kv_speed.py fills it, the settings taking turns
`--steps` steps at a time for `--rounds` rounds with the collector off (each cache cut
back to the context after its turn). Medians of:

- per layer, us to build: the cache's update (`update_and_fetch`), the attention call
  (the model module's `scaled_dot_product_attention`), the rest of the attention block
  (projections, rope, output projection) and the MLP;
- per step, ms: building the graph (the model's forward) and evaluating it; the step
  against unpatched 16-bit's.

Segments are timed through hooks on what the model calls (each cache object, the
module's attention function, the attention and MLP classes), not through a copy of its
code, and the hooks are off between blocks. `--against` exports the revision's
`mlx_lm_ext` with `git archive` into a temporary folder as the package
`mlx_lm_ext_at_<rev>` (it imports itself relatively), so both versions run in one
process: between processes the H200's host speed moves these figures by several percent.
"""

from __future__ import annotations

import importlib
import io
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from statistics import median
from typing import Any, NamedTuple

import mlx.core as mx
from decode_cost import step_times
from kv_speed import GROUP, _settings, load_model, model_parser
from results_io import emit, header, title

import mlx_lm_ext
from mlx_lm_ext.report.measure import filled_cache

ROOT = Path(__file__).resolve().parents[1]
SEGMENTS = ("update", "attention call", "attention rest", "mlp")


class Setting(NamedTuple):
    label: str
    library: Any  # the mlx_lm_ext package that patches, or None: unpatched
    bits: int | None


def library_at(rev: str) -> Any:
    """The package as it was at git revision `rev`, importable beside this one."""
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", rev, "mlx_lm_ext"], capture_output=True, check=True
    ).stdout
    folder = Path(tempfile.mkdtemp(prefix="step_segments_"))
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(folder, filter="data")
    name = f"mlx_lm_ext_at_{rev.replace('-', '_').replace('.', '_')}"
    (folder / "mlx_lm_ext").rename(folder / name)
    sys.path.insert(0, str(folder))
    return importlib.import_module(name)


def settings(bits: list[int], against: Any, rev: str | None) -> list[Setting]:
    rows = [Setting("16-bit, unpatched", None, None), Setting("16-bit, patched", mlx_lm_ext, None)]
    rows += [Setting(f"{b}-bit", mlx_lm_ext, b) for b in bits]
    if against is not None:
        rows += [Setting(f"{b}-bit at {rev}", against, b) for b in bits]
    return rows


def use(setting: Setting, libraries: list[Any]) -> None:
    """Every library reverted, then the setting's applied."""
    for library in libraries:
        library.revert()
    if setting.library is not None:
        kv = setting.library.KVSettings(kv_bits=setting.bits, kv_group_size=GROUP, quantized_kv_start=0)
        setting.library.apply(kv)


def _timed(call: Callable[..., Any], sink: list[float]) -> Callable[..., Any]:
    def timed(*args: Any, **kwargs: Any) -> Any:
        tic = time.perf_counter()
        out = call(*args, **kwargs)
        sink.append(time.perf_counter() - tic)
        return out

    return timed


@contextmanager
def hooks(model: Any, cache: list[Any]) -> Iterator[dict[str, list[float]]]:
    """Seconds of each call of the timed parts, per segment, while inside."""
    layer = model.layers[0]
    attention, mlp = type(layer.self_attn), type(layer.mlp)
    module = sys.modules[attention.__module__]
    times: dict[str, list[float]] = {"block": [], "update": [], "attention call": [], "mlp": []}
    saved = (attention.__call__, mlp.__call__, module.scaled_dot_product_attention)
    attention.__call__ = _timed(saved[0], times["block"])
    mlp.__call__ = _timed(saved[1], times["mlp"])
    module.scaled_dot_product_attention = _timed(saved[2], times["attention call"])
    for c in cache:  # looked up at each call: the class's method as the setting patched it
        vars(c)["update_and_fetch"] = _timed(lambda *a, c=c: type(c).update_and_fetch(c, *a), times["update"])
    try:
        yield times
    finally:
        attention.__call__, mlp.__call__, module.scaled_dot_product_attention = saved
        for c in cache:
            vars(c).pop("update_and_fetch", None)


def block(model: Any, cache: list[Any], steps: int) -> dict[str, list[float]]:
    """`steps` decode steps, timed: per-call seconds of each segment, build and eval ms."""
    with hooks(model, cache) as times:
        build, run = step_times(model, cache, steps)
    parts = zip(times.pop("block"), times["update"], times["attention call"], strict=True)
    return {**times, "attention rest": [b - u - a for b, u, a in parts], "build": build, "eval": run}


def measure(model: Any, context: int, rows: list[Setting], libraries: list, args: Any) -> list[dict]:
    """One row a setting at `context`: medians over every round's block (`args`: steps,
    rounds, warmup)."""
    caches, token = {}, mx.array([[7]])
    for setting in rows:
        use(setting, libraries)
        caches[setting.label] = cache = filled_cache(model, context, _settings(setting.bits))
        for _ in range(args.warmup):  # kernels compiled, decode tails made and flushed once
            mx.eval(model(token, cache=cache))
    samples: dict[str, dict[str, list[float]]] = {s.label: {} for s in rows}
    for _ in range(args.rounds):
        for setting in rows:
            use(setting, libraries)
            for name, values in block(model, caches[setting.label], args.steps).items():
                samples[setting.label].setdefault(name, []).extend(values)
    for library in libraries:
        library.revert()
    return [_row(context, s, samples[s.label]) for s in rows]


def _row(context: int, setting: Setting, samples: dict[str, list[float]]) -> dict[str, Any]:
    row = {"context": context, "setting": setting.label, "bits": setting.bits}
    row.update({f"{name}_us": median(samples[name]) * 1e6 for name in SEGMENTS})
    row.update(build_ms=median(samples["build"]), eval_ms=median(samples["eval"]))
    return row


def markdown(result: dict[str, Any]) -> str:
    columns = ["context", "KV", *(f"{s} us/layer" for s in SEGMENTS), "build ms", "eval ms", "step x 16-bit"]
    lines = [title(result), "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    base: dict[int, float] = {}
    for r in result["rows"]:
        step = r["build_ms"] + r["eval_ms"]
        base.setdefault(r["context"], step)
        cells = " | ".join(f"{r[f'{s}_us']:.1f}" for s in SEGMENTS)
        lines.append(
            f"| {r['context']} | {r['setting']} | {cells} | {r['build_ms']:.2f} | {r['eval_ms']:.2f} "
            f"| {base[r['context']] / step:.3f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = model_parser(__doc__)
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096, 32768])
    parser.add_argument("--bits", type=int, nargs="+", default=[8, 4])
    parser.add_argument("--against", default=None, help="a git revision whose library runs beside this one")
    parser.add_argument("--steps", type=int, default=128, help="decode steps a setting times per round")
    parser.add_argument("--rounds", type=int, default=5, help="turns the settings take")
    parser.add_argument("--warmup", type=int, default=70, help="untimed decode steps on each new cache")
    args = parser.parse_args(argv)
    against = library_at(args.against) if args.against else None
    libraries = [mlx_lm_ext, *([against] if against is not None else [])]
    rows = settings(args.bits, against, args.against)
    name, model = load_model(args.model, args.config)
    result = {**header(name), "steps": args.steps, "rounds": args.rounds, "against": args.against, "rows": []}
    for context in args.contexts:
        result["rows"] += measure(model, context, rows, libraries, args)
        mx.clear_cache()
    emit(result, args.json, markdown)


if __name__ == "__main__":
    main()
