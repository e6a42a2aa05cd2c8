"""The report command line: KV cache memory per precision, and with --measure what it costs.

The table comes from config.json alone (memory.py); --measure loads the weights and runs
16-bit against each quantized precision (sweep.py: bytes, peak memory, tok/s, KL);
--measure quality,recall runs the figures users choose bits by (choosing.py: KL per
bits x group on prose, llama.cpp beside them, pass key recall; JSON and two PNGs).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from ..cli import configure_logging
from ..distributed import shard_problem
from ..settings import ALLOWED_BITS, ALLOWED_GROUP_SIZES, head_dims
from . import memory, sweep


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mlx_lm_ext.report", description=memory.__doc__.split("\n")[0])
    p.add_argument("--model", help="models.yaml id, hub repo id or model folder")
    p.add_argument("--context", type=int, default=131072, help="tokens in the cache (default 131072)")
    p.add_argument(
        "--bits",
        default="8,4",
        help="quantized precisions to compare, K<k>V<v> for key and value bits apart (default 8,4)",
    )
    p.add_argument("--kv-group-size", type=int, default=64, choices=ALLOWED_GROUP_SIZES)
    p.add_argument("--max-kv-size", type=int, default=None, help="bound every layer as the server flag does")
    p.add_argument("--offline", action="store_true", help="a models.yaml id's offline stand-in")
    p.add_argument("--ranks", type=int, default=1, help="each machine's share on N ranks (mlx.launch)")
    p.add_argument("--pipeline", action="store_true", help="with --ranks: the layers split, not the heads")
    p.add_argument("--json", action="store_true", help="print JSON instead of markdown")
    m = p.add_argument_group("--measure: run the model (its weights load) at 16 bits and quantized")
    m.add_argument(
        "--measure",
        nargs="?",
        const="speed",
        type=_measures,
        help="speed (alone: cache bytes, peak memory, tok/s, KL over --points), or any of quality,recall "
        "(the tables to choose bits by, see --lengths; JSON and PNGs in --out)",
    )
    m.add_argument("--points", type=int, default=4, help="context lengths doubling up to --context")
    m.add_argument("--decode-tokens", type=int, default=32, help="decode steps timed and compared per point")
    m.add_argument("--prompt-file", type=Path, help="text to feed (default: the zoo's English corpus)")
    m.add_argument("--plot", type=Path, help="write a PNG of cache MiB and KL against context")
    q = p.add_argument_group("--measure quality,recall")
    q.add_argument(
        "--lengths", type=_ints, default=[512, 2048], help="quality: context lengths (default 512,2048)"
    )
    q.add_argument(
        "--groups", type=_ints, default=None, help="quality: group sizes (default --kv-group-size)"
    )
    q.add_argument(
        "--per-layer-bits", type=_ints, default=[4], help="quality: bits also run per layer kind (default 4)"
    )
    q.add_argument(
        "--rotate",
        type=_rotations,
        default=[],
        help="quality, recall: also run each width rotated: keys, all (keys and values), or keys,all",
    )
    q.add_argument("--window", type=int, default=256, help="quality: positions scored before each length")
    q.add_argument("--recall-lengths", type=_ints, default=[1024, 2048], help="recall: prompt lengths")
    q.add_argument("--depths", type=_ints, default=[0, 25, 50, 75, 100], help="recall: needle depths in %%")
    q.add_argument("--keys", type=int, default=20, help="recall: keys per length and depth (default 20)")
    q.add_argument(
        "--llamacpp-gguf", type=Path, help="GGUF file for llama.cpp's side (default: a zoo model's)"
    )
    q.add_argument("--no-llamacpp", action="store_true", help="leave llama.cpp's figures out")
    q.add_argument("--replot", type=Path, help="draw the PNGs of a report.json again (next to it)")
    q.add_argument("--out", type=Path, help="folder for report.json and the PNGs (default kv-report-MODEL)")
    return p


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers") from None


def _widths(parser: argparse.ArgumentParser, text: str) -> list:
    """--bits as widths (ints, or (key, value) pairs); exit 2 naming a bad one."""
    allowed = ", ".join(map(str, ALLOWED_BITS))
    try:
        widths = memory.parse_widths(text)
    except ValueError as exc:
        parser.error(f"--bits {exc}: expected bits ({allowed}) or K<bits>V<bits>, e.g. K8V4")
    for w in widths:
        if not set((w, w) if isinstance(w, int) else w) <= set(ALLOWED_BITS):
            label = str(w) if isinstance(w, int) else "K{}V{}".format(*w)
            parser.error(f"--bits {label}: must be one of {allowed}")
    return widths


def _rotations(text: str) -> list[str]:
    got = [x for x in text.split(",") if x]
    if bad := [x for x in got if x not in ("keys", "all")]:
        raise argparse.ArgumentTypeError(f"{bad[0]!r}: rotate keys or all")
    return got


def _measures(text: str) -> set[str]:
    got = {x for x in text.split(",") if x}
    if bad := got - {"speed", "quality", "recall"}:
        raise argparse.ArgumentTypeError(f"{sorted(bad)[0]!r}: measure speed, quality or recall")
    if "speed" in got and len(got) > 1:
        raise argparse.ArgumentTypeError("speed is measured alone (--points); quality,recall together")
    return got


def main(argv: list[str] | None = None) -> int:
    configure_logging(sys.argv[1:] if argv is None else argv, default="WARNING")
    parser = _parser()
    args = parser.parse_args(argv)
    if args.replot:
        from .choosing import draw

        draw(json.loads(args.replot.read_text()), args.replot.parent)
        return 0
    if not args.model:
        parser.error("the following arguments are required: --model")
    bits = _widths(parser, args.bits)
    if args.measure == {"speed"} and any(not isinstance(b, int) for b in bits):
        parser.error("--measure speed runs one width for keys and values; K<k>V<v> runs under quality,recall")
    if args.context <= 0 or (args.max_kv_size is not None and args.max_kv_size <= 0):
        parser.error("--context and --max-kv-size must be positive token counts")
    if args.points <= 0 or args.decode_tokens <= 0:
        parser.error("--points and --decode-tokens must be positive")
    if args.plot:
        if args.measure != {"speed"}:
            parser.error("--plot draws what --measure speed measures: add --measure")
        sweep.require_matplotlib()
    if args.measure and args.measure != {"speed"}:
        return _choosing(parser, args, bits)
    name, config = memory.resolve_config(args.model, args.offline)
    if args.ranks < 1:
        parser.error("--ranks must be 1 or more")
    if problem := shard_problem(config, args.ranks, args.pipeline):
        parser.error(f"--ranks {args.ranks}{' --pipeline' if args.pipeline else ''}: {name}: {problem}")
    layers = memory.trace_layout(config)
    rows = memory.table(layers, args.context, bits, args.kv_group_size, args.max_kv_size)
    points = _measure(args, bits) if args.measure else None
    if args.json:
        payload = {
            "model": name,
            "context": args.context,
            "layers": [asdict(x) for x in layers],
            "rows": rows,
        }
        if points is not None:
            payload["measured"] = [asdict(p) for p in points]
        print(json.dumps(payload, indent=1))
    else:
        print(memory.markdown(name, args.context, rows, layers, args.max_kv_size))
        if args.ranks > 1:
            ranked = memory.per_rank_markdown(
                layers, args.context, bits, args.kv_group_size, args.ranks, args.pipeline, args.max_kv_size
            )
            print("\n" + ranked)
        if points is not None:
            print("\n" + sweep.markdown(points, args.decode_tokens))
    if args.plot:
        sweep.plot(points, args.plot, f"{name}, KV group {args.kv_group_size}")
    return 0


def _choosing(parser: argparse.ArgumentParser, args: argparse.Namespace, bits: list[int]) -> int:
    """--measure quality,recall: checked before the weights load, then choosing.run."""
    from . import choosing

    args.bits_list = [(b, b) if isinstance(b, int) else b for b in bits]
    args.groups = args.groups or [args.kv_group_size]
    if bad := [g for g in args.groups if g not in ALLOWED_GROUP_SIZES]:
        parser.error(f"--groups {bad[0]}: must be one of {', '.join(map(str, ALLOWED_GROUP_SIZES))}")
    if args.window <= 0 or args.window % 256 or any(n % 256 or n < args.window + 256 for n in args.lengths):
        parser.error("--window and --lengths must be multiples of 256, each length at least --window + 256")
    if args.keys <= 0 or any(not 0 <= d <= 100 for d in args.depths) or min(args.recall_lengths) < 256:
        parser.error("--keys must be positive, --depths within 0-100, --recall-lengths at least 256")
    if args.llamacpp_gguf and not args.llamacpp_gguf.is_file():
        parser.error(f"--llamacpp-gguf {args.llamacpp_gguf}: no such file")
    args.depths = [d / 100 for d in args.depths]
    name, config = memory.resolve_config(args.model, args.offline)
    dims = head_dims(config)
    if bad := [g for g in args.groups if any(d % g for d in dims)]:
        parser.error(f"--groups {bad[0]}: does not divide the head dim(s) {sorted(dims)} of {name}")
    if args.rotate and any(d & (d - 1) for d in dims):
        parser.error(
            f"--rotate: the Hadamard rotation needs power-of-two head dims; {name} has {sorted(dims)}"
        )
    layers = memory.trace_layout(config)
    args.out = args.out or Path(f"kv-report-{Path(args.model).name}")
    choosing.run(args, name, memory.model_source(args.model, args.offline)[1], layers)
    return 0


def _measure(args: argparse.Namespace, bits: list[int]) -> list[sweep.Point]:
    """Load the model (where resolve_config read its config) and run sweep.measure on it."""
    from mlx_lm import load

    model, tokenizer = load(memory.model_source(args.model, args.offline)[1])
    contexts = sweep.context_points(args.context, args.points)
    text = args.prompt_file.read_text() if args.prompt_file else _corpus()
    tokens = sweep.prompt_tokens(tokenizer, text, contexts[-1] + args.decode_tokens)
    return sweep.measure(
        model, tokens, contexts, bits, args.kv_group_size, args.max_kv_size, args.decode_tokens
    )


def _corpus() -> str:
    return (Path(__file__).parent.parent / "zoo" / "corpus.txt").read_text()
