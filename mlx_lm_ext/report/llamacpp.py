"""The same measurement in llama.cpp, on the same GGUF file: its KV cache types side by side.

Users coming from llama.cpp know `-ctk/-ctv q8_0`; the question is whether our 8-bit
keeps as much for its bytes. llama-cpp-python (an optional dependency) loads the very
GGUF file the zoo converted, evaluates the same token ids with its KV cache at f16 and at
each quantized type, and the same windows are scored against its own f16 run: KL, top-1,
perplexity, as kv_quality scores ours against our 16-bit run.

llama.cpp rotates quantized keys and values with a Hadamard transform by default (its
PR #21038); `rotate=False` sets LLAMA_ATTN_ROT_DISABLE=1, the form comparable with an
unrotated cache. It also quantizes from the first token (its first batch attends to
quantized keys), and its f16 cache is float16 where ours is bfloat16.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .kv_quality import CHUNK, Scores, windows

# ggml type id, bytes per value (blocks of 32 values with a float16 scale, q5_0 with 4 bytes of high bits)
CACHE_TYPES = {"f16": (1, 2.0), "q8_0": (8, 34 / 32), "q5_0": (6, 22 / 32), "q4_0": (2, 18 / 32)}


@dataclass(frozen=True)
class Setting:
    cache_type: str
    rotate: bool = True

    @property
    def label(self) -> str:
        if self.cache_type == "f16":
            return "llama.cpp f16"
        return f"llama.cpp {self.cache_type}" + ("" if self.rotate else " unrotated")

    @property
    def bytes_per_value(self) -> float:
        return CACHE_TYPES[self.cache_type][1]


def available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def _scored_logprobs(gguf: Path, tokens: list[int], spans: list[tuple[int, int]], setting: Setting):
    """Log-probs (float64) of every scored span, llama.cpp with the setting's KV cache."""
    from llama_cpp import Llama

    end = max(b for _, b in spans)
    os.environ["LLAMA_ATTN_ROT_DISABLE"] = "0" if setting.rotate else "1"
    type_id = CACHE_TYPES[setting.cache_type][0]
    llm = Llama(
        model_path=str(gguf),
        n_ctx=end + CHUNK,
        n_batch=CHUNK,
        n_ubatch=CHUNK,
        logits_all=True,
        type_k=type_id,
        type_v=type_id,
        flash_attn=True,  # llama.cpp quantizes V only with flash attention
        n_threads=os.cpu_count(),
        verbose=False,
    )
    try:
        llm.eval(tokens[:end])
        out = []
        for a, b in spans:
            logits = np.asarray(llm.scores[a:b], dtype=np.float64)
            top = logits.max(axis=-1, keepdims=True)
            out.append(logits - top - np.log(np.exp(logits - top).sum(axis=-1, keepdims=True)))
        return out
    finally:
        llm.close()


def lockstep(
    gguf: Path, tokens: list[int], settings: Sequence[Setting], points: Sequence[int], window: int = CHUNK
) -> dict[Setting, list[Scores]]:
    """Scores of every llama.cpp setting against llama.cpp f16, at the same windows as ours."""
    spans = windows(points, window)
    reference = _scored_logprobs(gguf, tokens, spans, Setting("f16"))
    out = {}
    for s in settings:
        if s.cache_type == "f16":
            continue
        got = _scored_logprobs(gguf, tokens, spans, s)
        out[s] = [
            _scores(ref, cand, tokens, a, b) for ref, cand, (a, b) in zip(reference, got, spans, strict=True)
        ]
    return out


def _scores(ref: np.ndarray, cand: np.ndarray, tokens: list[int], a: int, b: int) -> Scores:
    targets = np.array(tokens[a + 1 : b + 1])
    kl = np.maximum((np.exp(ref) * (ref - cand)).sum(axis=-1), 0.0)
    rows = np.arange(len(targets))
    return Scores(
        context=b,
        positions=b - a,
        kl_mean=float(kl.mean()),
        kl_p99=float(np.quantile(kl, 0.99)),
        top1=float((ref.argmax(-1) == cand.argmax(-1)).mean()),
        ppl_16=float(np.exp(-ref[rows, targets].mean())),
        ppl=float(np.exp(-cand[rows, targets].mean())),
    )
