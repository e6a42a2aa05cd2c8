"""python -m mlx_lm_ext.generate: upstream's mlx_lm.generate with the kv fixes applied.

Upstream's generate already has --kv-bits, --kv-group-size, --quantized-kv-start and
--max-kv-size; here they work on every cache layout, are validated before the model
loads, and --keep-sliding-kv keeps sliding-window layers at full precision.
"""

from __future__ import annotations

import importlib
import sys

from . import apply
from .cli import add_missing_flags, apply_parsed, configure_logging
from .fixes import Patcher

PROG = "mlx_lm_ext.generate"


class _Parsed:
    """Hands upstream's main the arguments already parsed and validated here."""

    def __init__(self, args):
        self.args = args

    def parse_args(self, *_a, **_k):
        return self.args


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    configure_logging(argv)
    apply()
    generate = importlib.import_module("mlx_lm.generate")

    parser = generate.setup_arg_parser()
    add_missing_flags(parser)
    parsed = _Parsed(apply_parsed(parser.parse_args(argv), prog=PROG))
    patcher = Patcher("generate-cli")
    patcher.set(generate, "setup_arg_parser", lambda: parsed)
    try:
        generate.main()
    finally:
        patcher.undo()


if __name__ == "__main__":
    main()
