"""KV-cache settings: what the flags mean, checked before any weights load.

A bad `--kv-bits` or group size otherwise surfaces minutes later, deep in a generation
thread, as a kernel error or a hung request; checking here turns it into one line that
names the flag, the value, what is allowed and the model.
"""

from __future__ import annotations

import importlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("mlx_lm_ext")

ALLOWED_BITS = (2, 3, 4, 5, 6, 8)
ALLOWED_GROUP_SIZES = (32, 64, 128)
DEFAULT_GROUP_SIZE = 64


def default_quantized_kv_start() -> int:
    """Upstream's default, read from the installed mlx-lm (5000 in every release so far)."""
    generate = importlib.import_module("mlx_lm.generate")

    return int(getattr(generate, "DEFAULT_QUANTIZED_KV_START", 5000))


class SettingsError(ValueError):
    """A flag value that cannot work; the message is the one line the user sees."""


@dataclass(frozen=True)
class KVSettings:
    """The KV-cache knobs shared by the server, generate and embedding programs."""

    kv_bits: int | None = None
    kv_group_size: int = DEFAULT_GROUP_SIZE
    quantized_kv_start: int | None = None
    max_kv_size: int | None = None
    quantize_sliding: bool = True
    kv_key_bits: int | None = None  # each of these two defaults to kv_bits
    kv_value_bits: int | None = None
    kv_rotate: str | None = None  # None, "keys" or "all" (caches/kv_format.py)
    prompt_cache_bits: int | None = None  # the server's stored entries (caches/prompt_store.py)
    prompt_cache_min_quantize_tokens: int = 256

    def __post_init__(self) -> None:
        # Key bits alone switch quantization on, as kv_bits does: everything that asks
        # "is the cache quantized?" reads kv_bits.
        if self.kv_bits is None and self.kv_key_bits is not None:
            object.__setattr__(self, "kv_bits", self.kv_key_bits)

    @property
    def start(self) -> int:
        if self.quantized_kv_start is None:
            return default_quantized_kv_start()
        return self.quantized_kv_start

    @property
    def key_bits(self) -> int | None:
        return self.kv_key_bits or self.kv_bits

    @property
    def value_bits(self) -> int | None:
        return self.kv_value_bits or self.kv_bits

    def describe(self) -> str:
        """`8`, `8 value_bits=4 rotate=keys`: the keys' width, then what differs."""
        text = str(self.key_bits)
        if self.value_bits != self.key_bits:
            text += f" value_bits={self.value_bits}"
        return text + (f" rotate={self.kv_rotate}" if self.kv_rotate else "")


def validate(settings: KVSettings, model: str | None = None) -> None:
    """Raise SettingsError for values that cannot work; reads only config.json."""
    for flag, bits in (  # key bits first: given alone, they are kv_bits too
        ("--kv-key-bits", settings.kv_key_bits),
        ("--kv-value-bits", settings.kv_value_bits),
        ("--kv-bits", settings.kv_bits),
    ):
        if bits is not None and bits not in ALLOWED_BITS:
            raise SettingsError(f"{flag} {bits}: must be one of {', '.join(map(str, ALLOWED_BITS))}")
    if settings.prompt_cache_bits is not None and settings.prompt_cache_bits not in ALLOWED_BITS:
        allowed = ", ".join(map(str, ALLOWED_BITS))
        raise SettingsError(f"--prompt-cache-bits {settings.prompt_cache_bits}: must be one of {allowed}")
    if (n := settings.prompt_cache_min_quantize_tokens) < 0:
        raise SettingsError(f"--prompt-cache-min-quantize-tokens {n}: must be 0 or more")
    if settings.kv_value_bits is not None and settings.kv_bits is None:
        raise SettingsError(
            f"--kv-value-bits {settings.kv_value_bits}: "
            "also give --kv-key-bits or --kv-bits (the keys' width)"
        )
    if settings.kv_rotate not in (None, "keys", "all"):
        raise SettingsError(f"--kv-rotate {settings.kv_rotate}: must be keys or all")
    if settings.kv_rotate is not None and settings.kv_bits is None:
        raise SettingsError(
            f"--kv-rotate {settings.kv_rotate}: rotates a quantized cache; also give --kv-bits"
        )
    if settings.kv_group_size not in ALLOWED_GROUP_SIZES:
        raise SettingsError(
            f"--kv-group-size {settings.kv_group_size}: must be one of "
            f"{', '.join(map(str, ALLOWED_GROUP_SIZES))}"
        )
    if settings.quantized_kv_start is not None and settings.quantized_kv_start < 0:
        raise SettingsError(f"--quantized-kv-start {settings.quantized_kv_start}: must be 0 or more tokens")
    if settings.max_kv_size is not None and settings.max_kv_size <= 0:
        raise SettingsError(f"--max-kv-size {settings.max_kv_size}: must be a positive token count")
    if (settings.kv_bits is not None or settings.prompt_cache_bits is not None) and model is not None:
        _check_head_dims(settings, model)


def _check_head_dims(settings: KVSettings, model: str) -> None:
    config = read_config(model)
    if config is None:
        log.warning("could not read config.json of %s before loading; head-dim check skipped", model)
        return
    for dim in sorted(head_dims(config)):
        if settings.kv_rotate is not None and dim & (dim - 1):
            raise SettingsError(
                f"--kv-rotate {settings.kv_rotate}: the Hadamard rotation needs a power-of-two head dim; "
                f"{model} (model_type {config.get('model_type')}) has {dim}"
            )
        if dim % settings.kv_group_size:
            raise SettingsError(
                f"--kv-group-size {settings.kv_group_size}: does not divide the head dim {dim} "
                f"of {model} (model_type {config.get('model_type')}); use one of "
                f"{', '.join(str(g) for g in ALLOWED_GROUP_SIZES if dim % g == 0) or 'none'}"
            )


def read_config(model: str) -> dict[str, Any] | None:
    """config.json of a local folder or a hub repo (the first file a load fetches anyway)."""
    path = Path(model)
    if path.is_dir():
        file = path / "config.json"
        return json.loads(file.read_text()) if file.exists() else None
    try:
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(model, "config.json")).read_text())
    except Exception as exc:  # offline, gated or missing: the load will say why
        log.debug("config.json of %s unavailable: %s", model, exc)
        return None


def head_dims(config: dict[str, Any]) -> set[int]:
    """Every attention head dim the model's KV cache stores (GQA, global and MLA aware)."""
    text = config.get("text_config") or config
    dims: set[int] = set()
    heads = text.get("num_attention_heads")
    if text.get("head_dim"):
        dims.add(int(text["head_dim"]))
    elif heads and text.get("hidden_size"):
        dims.add(int(text["hidden_size"]) // int(heads))
    for key in ("global_head_dim", "v_head_dim", "kv_lora_rank"):
        if text.get(key):
            dims.add(int(text[key]))
    return dims


# The process's settings: what the server's flags (or `apply(settings)`) asked for. The
# patched cache factory and quantizer read them where upstream passes nothing.
_active = KVSettings()


def current() -> KVSettings:
    return _active


def configure(settings: KVSettings) -> KVSettings:
    """Make `settings` the process default; returns the previous one."""
    global _active
    previous, _active = _active, settings
    return previous
