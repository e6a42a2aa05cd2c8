"""One capacity result from searches split over several device calls.

    python benchmarks/capacity_merge.py a.json b.json --json benchmarks/results/capacity-h200.json

The device runs a command for 10 minutes at most, so a capacity search at 32K tokens runs
one width (or one part of a width's search) a call. The tries of each width are pooled,
each keeping the command that ran it, the count is the most that fit in any call, and the
ratios are taken against the pooled 16-bit row (`capacity.merge`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from capacity import markdown, merge
from results_io import emit


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, nargs="+", help="capacity.py --json files")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--note", default=None, help="where and when the calls ran")
    args = parser.parse_args(argv)
    try:
        result = merge([json.loads(path.read_text()) for path in args.results])
    except ValueError as error:
        parser.error(str(error))
    emit({**result, **({"note": args.note} if args.note else {})}, args.json, markdown)


if __name__ == "__main__":
    main()
