"""Deterministic prompts for the compat tests (token ids, so no tokenizer drift)."""

from __future__ import annotations


def token_prompt(n: int, vocab: int = 512, offset: int = 5) -> list[int]:
    """n token ids spread over the vocabulary, skipping the special tokens."""
    return [(i * 7919) % (vocab - offset) + offset for i in range(n)]
