"""What one request may cost the server: prompt tokens, generated tokens, body bytes.

Upstream bounds none of them: a 2 MB prompt (~1.1M tokens) is accepted and prefilled for
an hour on CPU while every other request waits, and `max_tokens: 1000000000` is taken as
asked. The limits default to what the model can use (its context; with --max-kv-size,
the bound, since a longer prompt would silently lose its start), and a flag raises,
lowers or (0) lifts each one. Past a limit the request gets 400 naming it (413 for the
body), before it reaches the generation thread where that is known, else before its
prefill starts.
"""

from __future__ import annotations

import argparse
import os
import re
from functools import lru_cache
from typing import Any

from .settings import SettingsError, read_config

DEFAULT_MAX_BODY_BYTES = 32 * 10**6
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([mg]b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "m": 10**6, "g": 10**9}
# A Hugging Face repo id (`org/name` or a legacy bare name); anything else is a path.
_REPO_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")


def parse_size(text: str) -> int:
    """Bytes from `32000000`, `32M`, `32MB` or `1.5G`: decimal units, as upstream's
    --prompt-cache-bytes reads them."""
    match = _SIZE.match(str(text))
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 32M, 1G, 1000000)")
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "")[:1].lower()])


def limit_flags() -> list[tuple[str, dict[str, Any]]]:
    """(flag, argparse keywords) of the per-request limits the server takes."""
    return [
        (
            "--max-prompt-tokens",
            {
                "type": int,
                "default": None,
                "help": "Refuse (400) prompts longer than this many tokens (default: the model's "
                "context, or --max-kv-size where smaller; 0: no limit, a bounded cache then "
                "drops the oldest tokens).",
            },
        ),
        (
            "--max-tokens-limit",
            {
                "type": int,
                "default": None,
                "help": "Refuse (400) requests asking for more new tokens than this (default: the "
                "model's context; 0: no limit).",
            },
        ),
        (
            "--max-body-bytes",
            {
                "type": parse_size,
                "default": DEFAULT_MAX_BODY_BYTES,
                "help": "Refuse (413) request bodies larger than this, e.g. 64M (default: 32M).",
            },
        ),
    ]


def check_limit_flags(ns: argparse.Namespace) -> None:
    """Raise SettingsError for a negative limit (0 lifts one)."""
    for flag, _ in limit_flags():
        value = getattr(ns, flag[2:].replace("-", "_"), None)
        if value is not None and value < 0:
            raise SettingsError(f"{flag} {value}: must be 0 (no limit) or more")


def check_model_path(model: str | None) -> None:
    """A --model that is neither a folder with config.json nor a hub repo id is a typo:
    say so before serving (upstream listens and answers 503/404 to every request)."""
    if model is None:
        return
    path = os.path.expanduser(model)
    if os.path.isdir(path):
        if not os.path.exists(os.path.join(path, "config.json")):
            raise SettingsError(f"--model {model}: the folder has no config.json")
        return
    if os.path.exists(path):
        raise SettingsError(f"--model {model}: is a file; give the model's folder")
    if not _REPO_ID.match(model) or model.startswith("."):
        raise SettingsError(f"--model {model}: no such folder, and not a Hugging Face repo id")


def context_length(config: dict[str, Any] | None) -> int | None:
    """The model's context in tokens, where its config states one."""
    if not config:
        return None
    for section in (config.get("text_config") or {}, config):
        for key in ("max_position_embeddings", "max_sequence_length", "n_positions", "seq_length"):
            if isinstance(section.get(key), int) and section[key] > 0:
                return section[key]
    return None


@lru_cache(maxsize=8)
def model_context(model: str | None) -> int | None:
    return context_length(read_config(model)) if model else None


def _resolved(flag: int | None, default: int | None) -> int | None:
    """A flag's limit: explicit (0 lifts it) or the default; None is no limit."""
    if flag is None:
        return default
    return flag or None


def max_prompt_tokens(cli_args: Any, model: str | None) -> int | None:
    """The prompt limit in force: the flag, else min(context, --max-kv-size)."""
    bounds = [b for b in (model_context(model), getattr(cli_args, "max_kv_size", None)) if b]
    return _resolved(getattr(cli_args, "max_prompt_tokens", None), min(bounds) if bounds else None)


def max_new_tokens(cli_args: Any, model: str | None) -> int | None:
    """The max_tokens limit in force: the flag, else the model's context."""
    return _resolved(getattr(cli_args, "max_tokens_limit", None), model_context(model))
