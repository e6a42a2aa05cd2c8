"""The kv flags, their validation, and logging setup: shared by server, generate and report.

A bad `--kv-bits` or group size otherwise surfaces minutes later, deep in a generation
thread; here it is one line and exit status 2 before any weights load. Logging is set
up before upstream parses its own flags, so the lines the fixes log at apply time
(`--log-level` included) are not lost, and every line this package logs carries one
prefix, `mlx_lm_ext:`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from . import distributed
from .limits import check_limit_flags, check_model_path, limit_flags
from .settings import KVSettings, SettingsError, configure, default_quantized_kv_start, validate

LOGGER = "mlx_lm_ext"
LOG_FORMAT = "%(asctime)s - %(levelname)s - %(message)s"  # upstream's server format
PREFIX = "mlx_lm_ext: "
log = logging.getLogger(LOGGER)


class PrefixFormatter(logging.Formatter):
    """Upstream's line format; the lines this package logs start with PREFIX."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging API
        if record.name == LOGGER:
            record = logging.makeLogRecord({**record.__dict__, "message": PREFIX + record.message})
        return super().formatMessage(record)


def configure_logging(argv: list[str], default: str = "INFO") -> None:
    """Honour --log-level before upstream parses it (its own basicConfig then does
    nothing), in upstream's format with this package's lines prefixed. A process whose
    logging is already set up (an embedding program, pytest) is left as it is."""
    root = logging.getLogger()
    if root.handlers:
        return
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--log-level", default=default)
    level = getattr(logging, pre.parse_known_args(argv)[0].log_level.upper(), logging.INFO)
    logging.basicConfig(level=level, format=LOG_FORMAT)
    for handler in root.handlers:
        handler.setFormatter(PrefixFormatter(LOG_FORMAT))


def kv_flags() -> list[tuple[str, dict[str, Any]]]:
    """(flag, argparse keywords) for every kv flag, as upstream names them."""
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
            "--kv-key-bits",
            {
                "type": int,
                "default": None,
                "help": "Bits for the keys of the quantized KV cache (default: --kv-bits).",
            },
        ),
        (
            "--kv-value-bits",
            {
                "type": int,
                "default": None,
                "help": "Bits for the values of the quantized KV cache (default: --kv-bits).",
            },
        ),
        (
            "--kv-rotate",
            {
                "nargs": "?",
                "const": "keys",
                "default": None,
                "choices": ["keys", "all"],
                "help": "Hadamard-rotate the keys (or 'all': keys and values) before quantizing.",
            },
        ),
        (
            "--keep-sliding-kv",
            {"action": "store_true", "help": "With --kv-bits, keep sliding-window layers at full precision."},
        ),
    ]


def prompt_cache_flags() -> list[tuple[str, dict[str, Any]]]:
    """The server's prompt-cache storage flags (caches/prompt_store.py)."""
    return [
        (
            "--prompt-cache-bits",
            {
                "type": int,
                "default": None,
                "help": "Store prompt-cache entries quantized at these bits: 2, 3, 4, 5, 6 or 8 "
                "(group: --kv-group-size; default: as generated).",
            },
        ),
        (
            "--prompt-cache-min-quantize-tokens",
            {
                "type": int,
                "default": 256,
                "help": "With --prompt-cache-bits, entries shorter than this stay 16-bit (default: 256).",
            },
        ),
    ]


def add_missing_flags(
    parser: argparse.ArgumentParser, flags: list[tuple[str, dict[str, Any]]] | None = None
) -> list[str]:
    """Add the flags (default: the kv flags) the parser lacks; returns those added."""
    added = []
    for flag, kwargs in kv_flags() if flags is None else flags:
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
        kv_key_bits=getattr(ns, "kv_key_bits", None),
        kv_value_bits=getattr(ns, "kv_value_bits", None),
        kv_rotate=getattr(ns, "kv_rotate", None),
        prompt_cache_bits=getattr(ns, "prompt_cache_bits", None),
        prompt_cache_min_quantize_tokens=getattr(ns, "prompt_cache_min_quantize_tokens", 256),
    )


def check_server_args(ns: argparse.Namespace, prog: str) -> KVSettings:
    """The server's flags, checked before anything loads: the model path, the limits and
    the kv flags. A bad one exits 2 with one line naming it."""
    settings = settings_from_args(ns)
    try:
        check_model_path(getattr(ns, "model", None))
        check_limit_flags(ns)
        validate(settings, model=getattr(ns, "model", None))
        distributed.check(getattr(ns, "model", None), bool(getattr(ns, "pipeline", False)))
    except SettingsError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        sys.exit(2)
    return settings


def apply_parsed(ns: argparse.Namespace, prog: str) -> argparse.Namespace:
    """Validate the flags (exit 2 with one line on error) and make them the process's."""
    settings = check_server_args(ns, prog)
    configure(settings)
    ns.kv_bits = settings.kv_bits  # --kv-key-bits alone quantizes, in upstream's code too
    if settings.kv_bits is not None or settings.max_kv_size is not None:
        log.info(
            "kv cache: bits=%s group=%d start=%d max_kv_size=%s sliding=%s",
            settings.describe() if settings.kv_bits is not None else None,
            settings.kv_group_size,
            settings.start,
            settings.max_kv_size,
            "quantized" if settings.quantize_sliding else "full precision",
        )
    if settings.prompt_cache_bits is not None:
        log.info(
            "prompt cache: entries of %d tokens or more stored at %d bits (group %d)",
            settings.prompt_cache_min_quantize_tokens,
            settings.prompt_cache_bits,
            settings.kv_group_size,
        )
    return ns


class ServerArgumentParser(argparse.ArgumentParser):
    """Upstream's server parser plus the kv and limit flags it lacks, validated after parsing."""

    prog_name = "mlx_lm_ext.server"

    def parse_args(self, args=None, namespace=None):  # noqa: D102 - argparse API
        add_missing_flags(self)
        add_missing_flags(self, limit_flags())
        add_missing_flags(self, prompt_cache_flags())
        parsed = apply_parsed(super().parse_args(args, namespace), prog=self.prog_name)
        from .fixes import applied_fixes  # here: the fixes import this module

        log.info("applied %d fixes: %s", len(applied_fixes()), ", ".join(applied_fixes()))
        return parsed
