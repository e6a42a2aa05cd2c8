"""The report command line: KV cache memory per precision, and with --measure what it costs.

The table comes from config.json alone (memory.py); --measure loads the weights and runs
16-bit against each quantized precision (sweep.py: bytes, peak memory, tok/s, KL).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from ..cli import configure_logging
from ..settings import ALLOWED_BITS, ALLOWED_GROUP_SIZES
from . import memory, sweep


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mlx_lm_ext.report", description=memory.__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="models.yaml id, hub repo id or model folder")
    p.add_argument("--context", type=int, default=131072, help="tokens in the cache (default 131072)")
    p.add_argument("--bits", default="8,4", help="quantized precisions to compare (default 8,4)")
    p.add_argument("--kv-group-size", type=int, default=64, choices=ALLOWED_GROUP_SIZES)
    p.add_argument("--max-kv-size", type=int, default=None, help="bound every layer as the server flag does")
    p.add_argument("--offline", action="store_true", help="a models.yaml id's offline stand-in")
    p.add_argument("--json", action="store_true", help="print JSON instead of markdown")
    m = p.add_argument_group("--measure: run the model (its weights load) at 16 bits and quantized")
    m.add_argument("--measure", action="store_true", help="measure cache bytes, peak memory, tok/s, KL")
    m.add_argument("--points", type=int, default=4, help="context lengths doubling up to --context")
    m.add_argument("--decode-tokens", type=int, default=32, help="decode steps timed and compared per point")
    m.add_argument("--prompt-file", type=Path, help="text to feed (default: the zoo's English corpus)")
    m.add_argument("--plot", type=Path, help="write a PNG of cache MiB and KL against context")
    return p


def main(argv: list[str] | None = None) -> int:
    configure_logging(sys.argv[1:] if argv is None else argv, default="WARNING")
    parser = _parser()
    args = parser.parse_args(argv)
    bits = [int(b) for b in args.bits.split(",") if b]
    if bad := [b for b in bits if b not in ALLOWED_BITS]:
        parser.error(f"--bits {bad[0]}: must be one of {', '.join(map(str, ALLOWED_BITS))}")
    if args.context <= 0 or (args.max_kv_size is not None and args.max_kv_size <= 0):
        parser.error("--context and --max-kv-size must be positive token counts")
    if args.points <= 0 or args.decode_tokens <= 0:
        parser.error("--points and --decode-tokens must be positive")
    if args.plot:
        if not args.measure:
            parser.error("--plot draws what --measure measures: add --measure")
        sweep.require_matplotlib()
    name, config = memory.resolve_config(args.model, args.offline)
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
        if points is not None:
            print("\n" + sweep.markdown(points, args.decode_tokens))
    if args.plot:
        sweep.plot(points, args.plot, f"{name}, KV group {args.kv_group_size}")
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
