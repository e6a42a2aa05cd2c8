"""The registry of fixes, applied in order, each only where the installed mlx-lm lacks it."""

from __future__ import annotations

import logging

from .base import Fix, PatchConflict, Patcher
from .batch_quantized_cache import BatchQuantizedCache
from .batch_quantized_rotating import BatchQuantizedRotating
from .batchable_fallback import BatchableFallback
from .batched_quantize import BatchedQuantize
from .decode_tail import DecodeTail
from .hybrid_quantize import HybridQuantize
from .max_kv_size import MaxKvSize
from .quantized_attention import QuantizedAttention
from .quantized_rotating import QuantizedRotating
from .request_errors import RequestErrors
from .server_kv_flags import ServerKvFlags

log = logging.getLogger("mlx_lm_ext")

FIXES: list[Fix] = [
    QuantizedRotating(),
    HybridQuantize(),
    QuantizedAttention(),
    DecodeTail(),
    MaxKvSize(),
    ServerKvFlags(),
    BatchableFallback(),
    BatchQuantizedCache(),
    BatchQuantizedRotating(),
    BatchedQuantize(),
    RequestErrors(),
]
BY_NAME = {f.name: f for f in FIXES}
_applied: dict[str, Patcher] = {}


def apply_fixes(only: list[str] | None = None) -> list[str]:
    """Apply the fixes the installed mlx-lm needs; idempotent. Returns names applied now."""
    unknown = set(only or []) - set(BY_NAME)
    if unknown:
        raise ValueError(f"unknown fixes {sorted(unknown)}; known: {sorted(BY_NAME)}")
    done = []
    for fix in FIXES:
        if (only and fix.name not in only) or fix.name in _applied:
            continue
        if not fix.needed():
            log.debug("mlx-lm-ext: %s not needed on this mlx-lm", fix.name)
            continue
        patcher = Patcher(fix.name)
        try:
            fix.install(patcher)
        except Exception:
            patcher.undo()
            raise
        _applied[fix.name] = patcher
        done.append(fix.name)
        log.info("mlx-lm-ext: applied %s: %s", fix.name, fix.summary)
    return done


def revert_fixes() -> list[str]:
    """Undo every applied fix, newest first. Returns the names reverted."""
    names = list(_applied)
    for name in reversed(names):
        _applied.pop(name).undo()
        log.info("mlx-lm-ext: reverted %s", name)
    return names


def applied_fixes() -> list[str]:
    return list(_applied)


__all__ = ["FIXES", "Fix", "PatchConflict", "apply_fixes", "applied_fixes", "revert_fixes"]
