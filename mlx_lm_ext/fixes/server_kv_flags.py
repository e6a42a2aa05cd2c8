"""The server takes --kv-bits, --kv-group-size, --quantized-kv-start and --max-kv-size.

Upstream: the server gained the three kv flags only in 0.32.0 (mlx-lm #1043, PR #1353)
and has no --max-kv-size at all (#615); no release checks the values before loading
weights. Here upstream's own parser gets whichever flags it lacks (so `--help` lists them
beside upstream's), the values are validated before any weights load (cli.py), and they
become the process settings that the cache factory and, on releases without the flags,
generation read. Patch file: patches/0005-server-kv-flags.patch (all but
--keep-sliding-kv, an mlx-lm-ext option the series does not propose: the default
quantizes sliding layers).
"""

from __future__ import annotations

import argparse
import types

from ..cli import ServerArgumentParser, kv_flags
from ..settings import current
from .base import Fix, Patcher


def _argparse_with(parser_class: type) -> types.ModuleType:
    """A stand-in for the server's `argparse` module whose ArgumentParser is parser_class."""
    shim = types.ModuleType("argparse")
    shim.__dict__.update(vars(argparse))
    shim.ArgumentParser = parser_class
    return shim


class _Parsed(Exception):
    """Stops upstream's server.main at its parse_args: the probe has what it needs."""


def upstream_server_flags() -> set[str]:
    """The long flags upstream's server.main defines, found by running it up to its
    parse_args with a recording parser (nothing loads, nothing listens)."""
    from mlx_lm import server

    seen: set[str] = set()

    class Recording(argparse.ArgumentParser):
        def add_argument(self, *names, **kwargs):
            seen.update(n for n in names if n.startswith("--"))
            return super().add_argument(*names, **kwargs)

        def parse_args(self, *args, **kwargs):
            raise _Parsed

    probe = Patcher("server-kv-flags probe")
    probe.set(server, "argparse", _argparse_with(Recording))
    try:
        server.main()
    except _Parsed:
        pass
    finally:
        probe.undo()
    return seen


def stream_generate(*args, **kwargs):
    """Upstream stream_generate with the process's kv settings where the server passes none."""
    from mlx_lm import server

    settings = current()
    if settings.kv_bits is not None:
        kwargs.setdefault("kv_bits", settings.kv_bits)
        kwargs.setdefault("kv_group_size", settings.kv_group_size)
        kwargs.setdefault("quantized_kv_start", settings.start)
    return FIX.original(server, "stream_generate")(*args, **kwargs)


class ServerKvFlags(Fix):
    name = "server-kv-flags"
    summary = "server flags --kv-bits/--kv-group-size/--quantized-kv-start/--max-kv-size, validated"

    def needed(self) -> bool:
        from mlx_lm import server

        if server.argparse is not argparse:  # already given a parser (ours)
            return False
        return not {flag for flag, _ in kv_flags()} <= upstream_server_flags()

    def install(self, patcher: Patcher) -> None:
        from mlx_lm import server

        native = "--kv-bits" in upstream_server_flags()
        patcher.set(server, "argparse", _argparse_with(ServerArgumentParser), expected=argparse)
        if not native:  # generation must read the flags the server now takes
            patcher.set(server, "stream_generate", stream_generate)


FIX = ServerKvFlags()
