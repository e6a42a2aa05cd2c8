"""mlx-lm-ext: a quantized KV cache that works on every mlx-lm cache layout.

The whole public surface::

    import mlx_lm_ext
    mlx_lm_ext.apply()                      # patch what the installed mlx-lm lacks
    mlx_lm_ext.apply(KVSettings(kv_bits=8, max_kv_size=32768))  # ...and set defaults
    mlx_lm_ext.applied()                    # names of the fixes in force
    mlx_lm_ext.revert()                     # restore upstream exactly
"""

from __future__ import annotations

from .fixes import applied_fixes, apply_fixes, revert_fixes
from .settings import KVSettings, SettingsError, configure, current, validate

__version__ = "0.1.0"


def apply(settings: KVSettings | None = None, only: list[str] | None = None) -> list[str]:
    """Patch the installed mlx-lm where it lacks a fix; idempotent.

    `settings` become the process defaults: a bound for every `make_prompt_cache` call
    that passes none, and the kv flags of the server. `only` restricts to named fixes.
    Returns the names of the fixes applied by this call.
    """
    if settings is not None:
        validate(settings)
        configure(settings)
    return apply_fixes(only)


def revert() -> list[str]:
    """Undo every fix and reset the process settings; returns the names reverted."""
    configure(KVSettings())
    return revert_fixes()


def applied() -> list[str]:
    """Names of the fixes currently applied."""
    return applied_fixes()


__all__ = ["KVSettings", "SettingsError", "apply", "applied", "configure", "current", "revert", "validate"]
