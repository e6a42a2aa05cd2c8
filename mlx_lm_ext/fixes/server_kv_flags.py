"""The server takes --kv-bits, --kv-group-size, --quantized-kv-start and --max-kv-size.

Upstream: the server gained the three kv flags only in 0.32.0 (mlx-lm #1043, PR #1353)
and has no --max-kv-size at all (#615); no release checks the values before loading
weights. Here upstream's own parser gets whichever flags it lacks (so `--help` lists them
beside upstream's), the values are validated before any weights load, and they become the
process settings that the cache factory and, on releases without the flags, generation
read. Patch file: patches/0005-server-kv-flags.patch (all but --keep-sliding-kv, an
mlx-lm-ext option the series does not propose: the default quantizes sliding layers).
"""

from __future__ import annotations

import argparse
import inspect
import logging
import sys
import types
from typing import Any

from ..settings import (
    KVSettings,
    SettingsError,
    configure,
    current,
    default_quantized_kv_start,
    validate,
)
from .base import Fix, Patcher

log = logging.getLogger("mlx_lm_ext")
PROG = "mlx_lm_ext.server"


def _flags() -> list[tuple[str, dict[str, Any]]]:
    start = default_quantized_kv_start()
    return [
        (
            "--kv-bits",
            {
                "type": int,
                "default": None,
                "help": "Bits for KV cache quantization: 2, 3, 4, 5, 6 or 8 (default: 16-bit).",
            },
        ),
        (
            "--kv-group-size",
            {
                "type": int,
                "default": 64,
                "help": "Group size for KV cache quantization: 32, 64 or 128 (default: 64).",
            },
        ),
        (
            "--quantized-kv-start",
            {
                "type": int,
                "default": start,
                "help": f"Quantize the KV cache once it holds this many tokens (default: {start}).",
            },
        ),
        (
            "--max-kv-size",
            {
                "type": int,
                "default": None,
                "help": "Bound every layer's KV cache to this many tokens (the oldest are dropped).",
            },
        ),
        (
            "--keep-sliding-kv",
            {"action": "store_true", "help": "With --kv-bits, keep sliding-window layers at full precision."},
        ),
    ]


def add_missing_flags(parser: argparse.ArgumentParser) -> list[str]:
    """Add the kv flags the parser lacks; returns those added."""
    added = []
    for flag, kwargs in _flags():
        if flag not in parser._option_string_actions:
            parser.add_argument(flag, **kwargs)
            added.append(flag)
    return added


def settings_from_args(ns: argparse.Namespace) -> KVSettings:
    return KVSettings(
        kv_bits=ns.kv_bits,
        kv_group_size=ns.kv_group_size,
        quantized_kv_start=ns.quantized_kv_start,
        max_kv_size=ns.max_kv_size,
        quantize_sliding=not ns.keep_sliding_kv,
    )


def apply_parsed(ns: argparse.Namespace, prog: str = PROG) -> argparse.Namespace:
    """Validate the kv flags (exit 2 with one line on error) and make them the process's."""
    settings = settings_from_args(ns)
    try:
        validate(settings, model=getattr(ns, "model", None))
    except SettingsError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        sys.exit(2)
    configure(settings)
    if settings.kv_bits is not None or settings.max_kv_size is not None:
        log.info(
            "kv cache: bits=%s group=%d start=%d max_kv_size=%s sliding=%s",
            settings.kv_bits,
            settings.kv_group_size,
            settings.start,
            settings.max_kv_size,
            "quantized" if settings.quantize_sliding else "full precision",
        )
    return ns


class ServerArgumentParser(argparse.ArgumentParser):
    """Upstream's parser plus the kv flags it lacks, validated after parsing."""

    def parse_args(self, args=None, namespace=None):  # noqa: D102 - argparse API
        add_missing_flags(self)
        return apply_parsed(super().parse_args(args, namespace))


def _argparse_shim() -> types.ModuleType:
    shim = types.ModuleType("argparse")
    shim.__dict__.update(vars(argparse))
    shim.ArgumentParser = ServerArgumentParser
    return shim


_original_stream_generate = None


def stream_generate(*args, **kwargs):
    """Upstream stream_generate with the process's kv settings where the server passes none."""
    settings = current()
    if settings.kv_bits is not None:
        kwargs.setdefault("kv_bits", settings.kv_bits)
        kwargs.setdefault("kv_group_size", settings.kv_group_size)
        kwargs.setdefault("quantized_kv_start", settings.start)
    return _original_stream_generate(*args, **kwargs)


def server_has_native_kv_flags() -> bool:
    from mlx_lm import server

    return '"--kv-bits"' in inspect.getsource(server.main)


class ServerKvFlags(Fix):
    name = "server-kv-flags"
    summary = "server flags --kv-bits/--kv-group-size/--quantized-kv-start/--max-kv-size, validated"

    def needed(self) -> bool:
        from mlx_lm import server

        source = inspect.getsource(server.main)
        return server.argparse is argparse and any(f'"{flag}"' not in source for flag, _ in _flags())

    def install(self, patcher: Patcher) -> None:
        global _original_stream_generate
        from mlx_lm import server

        patcher.set(server, "argparse", _argparse_shim(), expected=argparse)
        if not server_has_native_kv_flags():
            _original_stream_generate = server.stream_generate
            patcher.set(server, "stream_generate", stream_generate)
