"""Long-context recall on real text: a pass key hidden in prose, asked for at the end.

A random 5-digit key ("The pass key is 48213. Remember it. 48213 is the pass key.") goes
at a depth of 0-100% into a haystack of English prose, at a sentence boundary; the
prompt ends with the question, as a continuation for base models ("... The pass key
is") and as a chat turn where the tokenizer has a chat template. The answer is read
greedily; it counts when it contains the key. Both tokenizers here spell digits one
token each, so every key gives a prompt of the same length, and all keys at one depth
share the tokens before the needle: that prefix is prefilled once and copied.

The cache is built and quantized as in kv_quality (the same `Choice`), from token 0.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import numpy as np

from ..zoo.recall import common_prefix
from .kv_quality import Choice, quantize

NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key. "
ASK_CHAT = "\n\nWhat is the pass key? Answer with the number only."
ASK_BASE = "\n\nWhat is the pass key? The pass key is"
ANSWER_TOKENS = 16  # "The pass key is 48213." in a chat reply; reading stops at the number
PREFILL_STEP = 2048  # generate_step's: the first chunk attends at 16 bits, as served


@dataclass(frozen=True)
class Prompt:
    """One question: `ids[:split]` is shared by every key at this length and depth."""

    ids: list[int]
    split: int
    key: str


@dataclass
class Cell:
    """Recall of one setting at one length and depth."""

    length: int
    depth: float
    correct: int = 0
    total: int = 0
    misses: list[tuple[str, str]] = field(default_factory=list)  # (key, answer)

    @property
    def interval(self) -> tuple[float, float]:
        return wilson(self.correct, self.total)


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion k/n (sound at 0 and n, unlike k/n +- 2 se)."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


class Haystack:
    """Prompts of a tokenizer: prose, a needle at a depth, the question in its form."""

    def __init__(self, tokenizer: Any, text: str, longest: int):
        self.tokenizer = tokenizer
        self.prose = tokenizer.encode(text, add_special_tokens=False)[:longest]
        pieces = [tokenizer.decode([t]) for t in self.prose]
        self.boundaries = [i + 1 for i, p in enumerate(pieces) if p.endswith((".", "\n"))]
        self.head, self.tail = self._frame()

    def _frame(self) -> tuple[list[int], list[int]]:
        """Token ids around the haystack: the chat template's, or BOS ... ASK_BASE."""
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            marker = "\x00HAYSTACK\x00"
            text = tok.apply_chat_template(
                [{"role": "user", "content": marker + ASK_CHAT}], add_generation_prompt=True, tokenize=False
            )
            before, after = text.split(marker)
            return tok.encode(before, add_special_tokens=False), tok.encode(after, add_special_tokens=False)
        bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
        return bos, tok.encode(ASK_BASE, add_special_tokens=False)

    def prompt(self, length: int, depth: float, key: str) -> Prompt:
        """`length` tokens in all, the needle at `depth` (0..1) of the prose."""
        needle = self.tokenizer.encode(NEEDLE.format(key=key), add_special_tokens=False)
        room = length - len(self.head) - len(needle) - len(self.tail)
        if room <= 0 or room > len(self.prose):
            raise ValueError(f"length {length}: the prose holds {len(self.prose)} tokens")
        # the cut depends on the length alone, so that every key shares the prose before it
        cut = max(
            (b for b in self.boundaries if b <= depth * (length - len(self.head) - len(self.tail))), default=0
        )
        cut = min(cut, room)
        ids = self.head + self.prose[:cut] + needle + self.prose[cut:room] + self.tail
        return Prompt(ids, len(self.head) + cut, key)


def keys(n: int, seed: int) -> list[str]:
    """n distinct random 5-digit keys; fewer keys of a seed are the first of more (a test
    asking 4 asks the first 4 of the 20 a report asked, so the report's answers hold)."""
    rng = np.random.default_rng(seed)
    return [str(k) for k in rng.choice(np.arange(10_000, 100_000), size=max(n, 20), replace=False)[:n]]


def _extend(model: Any, cache: list[Any], ids: list[int], choice: Choice) -> None:
    for i in range(0, len(ids), PREFILL_STEP):
        model(mx.array(ids[i : i + PREFILL_STEP])[None], cache=cache)
        quantize(cache, choice)
        mx.eval([c.state for c in cache])


_NUMBER_DONE = re.compile(r"\d{5}(\D|\d)")


def answer(model: Any, tokenizer: Any, cache: list[Any], last: int, choice: Choice) -> str:
    """Greedy continuation after `last` (the prompt's final token): up to ANSWER_TOKENS,
    ending once a number of five or more digits is complete (what is read of it)."""
    out, token = [], last
    for _ in range(ANSWER_TOKENS):
        logits = model(mx.array([[token]]), cache=cache)[0, -1]
        quantize(cache, choice)
        token = int(mx.argmax(logits).item())
        if token in tokenizer.eos_token_ids:
            break
        out.append(token)
        if _NUMBER_DONE.search(tokenizer.decode(out)):
            break
    return tokenizer.decode(out)


def run_cell(
    model: Any,
    tokenizer: Any,
    haystack: Haystack,
    choice: Choice,
    length: int,
    depth: float,
    keyset: Sequence[str],
    progress: Callable[[int], Any] | None = None,
) -> Cell:
    """Every key at one length and depth: the shared prefix prefilled once."""
    from mlx_lm.models.cache import make_prompt_cache

    prompts = [haystack.prompt(length, depth, k) for k in keyset]
    # the tokens before the first key digit (a key's first digit may merge into the word before)
    split = min(min(common_prefix(prompts[0].ids, p.ids), len(p.ids) - 1) for p in prompts)
    shared = make_prompt_cache(model)
    _extend(model, shared, prompts[0].ids[:split], choice)
    cell = Cell(length, depth)
    for p in prompts:
        cache = copy.deepcopy(shared)
        _extend(model, cache, p.ids[split:-1], choice)
        got = answer(model, tokenizer, cache, p.ids[-1], choice)
        cell.total += 1
        if p.key in got:
            cell.correct += 1
        else:
            cell.misses.append((p.key, got))
        if progress is not None:
            progress(1)
    return cell


def sweep(
    model: Any,
    tokenizer: Any,
    text: str,
    choices: Sequence[Choice],
    lengths: Sequence[int],
    depths: Sequence[float],
    n_keys: int,
    progress: Callable[[int], Any] | None = None,
    seed: int = 0,
) -> dict[Choice, list[Cell]]:
    """Cells of every choice x length x depth, the same keys for every choice."""
    haystack = Haystack(tokenizer, text, max(lengths))
    out: dict[Choice, list[Cell]] = {c: [] for c in choices}
    for li, length in enumerate(lengths):
        for di, depth in enumerate(depths):
            keyset = keys(n_keys, seed + 1000 * li + di)
            for c in choices:
                out[c].append(run_cell(model, tokenizer, haystack, c, length, depth, keyset, progress))
    return out
