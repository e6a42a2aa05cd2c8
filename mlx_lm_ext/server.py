"""python -m mlx_lm_ext.server: upstream's mlx_lm.server with the kv fixes applied.

Same flags and HTTP API as `mlx_lm.server`, plus --kv-bits, --kv-group-size,
--quantized-kv-start, --max-kv-size and --keep-sliding-kv on every supported release.
The flags are validated before any weights load: a bad value exits with status 2.
"""

from __future__ import annotations

import sys

from . import apply
from .cli import configure_logging


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    configure_logging(argv)
    apply()
    from mlx_lm import server

    sys.argv = ["mlx_lm_ext.server", *argv]
    server.main()


if __name__ == "__main__":
    main()
