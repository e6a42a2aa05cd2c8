"""The registry of fixes, applied in order, each only where the installed mlx-lm lacks it.

Each module here is named for its fix's slug, the same slug as its patch file in
patches/ (where the series carries it).
"""

from __future__ import annotations

import logging

from . import (
    batch_handoff,
    batch_keep_ring,
    batch_quantized_cache,
    batch_quantized_rotating_cache,
    batchable_fallback,
    batched_quantized_kv,
    client_disconnect,
    cuda_prefill,
    hybrid_quantize,
    kv_format,
    max_kv_size,
    prefill_reserve,
    prompt_cache_bits,
    prompt_cache_full_hit,
    quantized_attention,
    quantized_decode_tail,
    quantized_rotating_kv_cache,
    request_errors,
    request_limits,
    request_validation,
    server_kv_flags,
    server_lifecycle,
)
from .base import Fix, PatchConflict, Patcher

log = logging.getLogger("mlx_lm_ext")

FIXES: list[Fix] = [
    quantized_rotating_kv_cache.FIX,
    kv_format.FIX,
    hybrid_quantize.FIX,
    quantized_attention.FIX,
    quantized_decode_tail.FIX,
    max_kv_size.FIX,
    server_kv_flags.FIX,
    batchable_fallback.FIX,
    batch_quantized_cache.FIX,
    batch_quantized_rotating_cache.FIX,
    batched_quantized_kv.FIX,
    batch_keep_ring.FIX,
    batch_handoff.FIX,
    request_errors.FIX,
    request_validation.FIX,
    request_limits.FIX,
    client_disconnect.FIX,
    server_lifecycle.FIX,
    prompt_cache_full_hit.FIX,
    prompt_cache_bits.FIX,
    cuda_prefill.FIX,
    prefill_reserve.FIX,
]
BY_NAME = {f.name: f for f in FIXES}
_order: list[str] = []  # names in the order applied, for a newest-first revert


def apply_fixes(only: list[str] | None = None) -> list[str]:
    """Apply the fixes the installed mlx-lm needs; idempotent. Returns names applied now."""
    unknown = set(only or []) - set(BY_NAME)
    if unknown:
        raise ValueError(f"unknown fixes {sorted(unknown)}; known: {sorted(BY_NAME)}")
    done = []
    for fix in FIXES:
        if (only and fix.name not in only) or fix.applied:
            continue
        if not fix.needed():
            log.debug("%s not needed on this mlx-lm", fix.name)
            continue
        fix.apply()
        _order.append(fix.name)
        done.append(fix.name)
        log.info("applied %s: %s", fix.name, fix.summary)
    return done


def revert_fixes() -> list[str]:
    """Undo every applied fix, newest first. Returns the names reverted."""
    names = list(_order)
    for name in reversed(names):
        BY_NAME[name].revert()
        log.info("reverted %s", name)
    _order.clear()
    return names


def applied_fixes() -> list[str]:
    return list(_order)


__all__ = [
    "BY_NAME",
    "FIXES",
    "Fix",
    "PatchConflict",
    "Patcher",
    "apply_fixes",
    "applied_fixes",
    "revert_fixes",
]
