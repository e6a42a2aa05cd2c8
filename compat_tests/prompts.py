"""Deterministic prompts for the compat tests (token ids, so no tokenizer drift)."""

from __future__ import annotations


def entry_prompt(entry, tokenizer, n: int, real: bool = False) -> list[int]:
    """n prompt tokens: English prose for a real model (its low ids are special or unused
    tokens, not text; `real`: the hub tier's model), spread-out ids for a stand-in."""
    if entry.real or real:
        from mlx_lm_ext.report.quality import prose

        return tokenizer.encode(prose())[:n]
    return token_prompt(n)


def entry_prompts(entry, tokenizer, lengths: list[int]) -> list[list[int]]:
    """Distinct prompts of these lengths: consecutive stretches of prose for a real model,
    token ids at distinct offsets for a stand-in."""
    if not entry.real:
        return [token_prompt(n, offset=5 + 11 * i) for i, n in enumerate(lengths)]
    text = entry_prompt(entry, tokenizer, sum(lengths) + 64 * len(lengths))
    out, start = [], 0
    for n in lengths:
        out.append(text[start : start + n])
        start += n + 64
    return out


def token_prompt(n: int, vocab: int = 512, offset: int = 5) -> list[int]:
    """n token ids spread over the vocabulary, skipping the special tokens."""
    return [(i * 7919) % (vocab - offset) + offset for i in range(n)]
