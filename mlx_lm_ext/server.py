"""python -m mlx_lm_ext.server: upstream's mlx_lm.server with the kv fixes applied.

Same flags and HTTP API as `mlx_lm.server`, plus --kv-bits, --kv-group-size,
--quantized-kv-start, --max-kv-size and --keep-sliding-kv on every supported release,
the request limits --max-prompt-tokens, --max-tokens-limit and --max-body-bytes, and
--prompt-cache-bits for the prompt cache. The flags, the model path and (under
mlx.launch) whether the model shards over the ranks are checked first, before the fixes
log a line or any weights load: a bad value exits with status 2 and one line.
"""

from __future__ import annotations

import argparse
import sys

from . import apply
from .cli import add_missing_flags, check_server_args, configure_logging, prompt_cache_flags
from .limits import limit_flags

PROG = "mlx_lm_ext.server"


class _OneLineParser(argparse.ArgumentParser):
    """Errors as one line: this parser knows only the flags it checks, so its usage
    would mislead; upstream's parser prints the full one afterwards."""

    def error(self, message: str):  # noqa: D102 - argparse API
        print(f"{PROG}: error: {message}", file=sys.stderr)
        sys.exit(2)


def precheck(argv: list[str]) -> None:
    """Exit 2 on a bad flag or model path before anything else prints."""
    parser = _OneLineParser(prog=PROG, add_help=False, allow_abbrev=False)
    parser.add_argument("--model")
    parser.add_argument("--pipeline", action="store_true")
    add_missing_flags(parser)
    add_missing_flags(parser, limit_flags())
    add_missing_flags(parser, prompt_cache_flags())
    ns, _ = parser.parse_known_args(argv)
    check_server_args(ns, PROG)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not {"-h", "--help"} & set(argv):
        precheck(argv)
    apply()  # before logging is set up: the parser logs one line for all, once parsed
    configure_logging(argv)
    from mlx_lm import server

    sys.argv = [PROG, *argv]
    server.main()


if __name__ == "__main__":
    main()
