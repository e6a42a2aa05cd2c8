"""prefill-reserve: a prompt batch's caches allocate the whole prompt's rows at once and
every token stays as it was; unpadded batches attend with "causal" (cuda-prefill).

Both are installed only on CUDA, so these CPU tests install them by hand; the memory
they save is a GPU figure (benchmarks/capacity.py --timeline).
"""

from __future__ import annotations

import mlx.core as mx
import pytest
from mlx_lm.generate import BatchGenerator
from mlx_lm.models.cache import BatchKVCache
from test_cuda_prefill import _greedy, _model, _prompts

import mlx_lm_ext
from mlx_lm_ext.caches.batch_quantized import BatchQuantizedKVCache
from mlx_lm_ext.fixes import cuda_prefill, prefill_reserve
from mlx_lm_ext.fixes.base import generate_module
from mlx_lm_ext.settings import KVSettings, configure

RAGGED = (700, 170, 65)


@pytest.fixture
def fix():
    """Every fix this machine takes (batched quantized KV among them), then this one."""
    mlx_lm_ext.apply()
    prefill_reserve.FIX.apply()
    yield prefill_reserve.FIX
    prefill_reserve.FIX.revert()
    mlx_lm_ext.revert()


def _run(model, prompts, bits=None, watch=None):
    """Greedy tokens of a BatchGenerator run at `bits` (quantized from the first chunk)."""
    configure(KVSettings(kv_bits=bits, quantized_kv_start=0))
    kw = {"kv_bits": bits, "quantized_kv_start": 0} if bits else {}
    try:
        return _greedy(model, prompts, watch=watch, **kw)
    finally:
        configure(KVSettings())


def _buffer_rows(gen) -> list[int]:
    rows = cuda_prefill._rows(gen._prompt_batch.prompt_cache[0]) if len(gen._prompt_batch) else 0
    return [rows] if rows else []


@pytest.mark.parametrize("bits", [None, 8], ids=["16-bit", "8-bit"])
def test_tokens_unchanged_and_one_allocation(fix, bits):
    """Ragged prompts in 128-token chunks: the 700-token prompt's rows are there after
    its first (16-bit) or second (8-bit: the first converts) chunk, never grown after;
    upstream grows the buffer chunk after chunk."""
    model = _model()
    prompts = _prompts(RAGGED)
    rows: list[int] = []
    after = _run(model, prompts, bits, watch=lambda g: rows.extend(_buffer_rows(g)))
    fix.revert()
    plain: list[int] = []
    before = _run(model, prompts, bits, watch=lambda g: plain.extend(_buffer_rows(g)))
    assert after == before and all(len(t) == 6 for t in after)
    first = 0 if bits is None else 1  # a batch that converts grows at 16 bits first
    assert len(set(plain[first:])) >= 3, plain
    assert rows[first] >= 700 and len(set(rows[first:])) == 1, rows


def test_a_converting_16_bit_batch_is_not_reserved():
    caches = [BatchKVCache([0, 0]), BatchQuantizedKVCache([0, 0], bits=8)]
    chosen = prefill_reserve.reserving(caches, 1000, converts=True)
    assert chosen == [caches[1]] and caches[1].step == 1024 and "step" not in vars(caches[0])
    assert prefill_reserve.reserving(caches[:1], 100, converts=False)[0].step == 256


def test_step_is_the_class_step_again_after_a_prompt(fix):
    seen: list[object] = []

    def watch(gen):
        for batch in (gen._prompt_batch, gen._generation_batch):
            seen.extend(vars(c).get("step") for c in batch.prompt_cache)

    _run(_model(), _prompts(RAGGED), watch=watch)
    assert seen and not any(seen)


def test_joiners_mid_prompt_keep_their_tokens(fix):
    """Two prompts at a time: the third joins the prompt batch after the first leaves."""
    model = _model()
    prompts = _prompts((300, 65, 250))
    configure(KVSettings())
    after = _run_pairs(model, prompts)
    fix.revert()
    assert after == _run_pairs(model, prompts)


def _run_pairs(model, prompts):
    gen = BatchGenerator(model, max_tokens=4, prefill_step_size=128, prefill_batch_size=2, stop_tokens=[])
    uids = gen.insert(prompts)
    out = {u: [] for u in uids}
    try:
        while gen._unprocessed_sequences or len(gen._prompt_batch) or len(gen._generation_batch):
            for r in gen.next()[1]:
                out[r.uid].append(r.token)
    finally:
        gen.close()
    return [out[u] for u in uids]


def test_revert_restores_prompt_and_step():
    generate = generate_module()
    prompt, step = generate.PromptProcessingBatch.prompt, generate.BatchGenerator._next
    prefill_reserve.FIX.apply()
    assert generate.PromptProcessingBatch.prompt is not prompt
    prefill_reserve.FIX.revert()
    assert generate.PromptProcessingBatch.prompt is prompt and generate.BatchGenerator._next is step


# --- "causal" for a batch without padding (cuda-prefill) ------------------------------


def test_unpadded_batches_mask_causal_padded_ones_keep_the_array():
    make = cuda_prefill.unpadded_causal(BatchKVCache.make_mask)
    even, ragged = BatchKVCache([0, 0]), BatchKVCache([0, 3])
    assert make(even, 5) == "causal"
    assert isinstance(make(ragged, 5), mx.array)
    assert isinstance(make(even, 5, return_array=True), mx.array)
    assert isinstance(make(even, 5, window_size=4), mx.array)
    assert make(even, 1) is None or isinstance(make(even, 1), mx.array)


@pytest.mark.parametrize(
    "lengths,together,arrays",
    [((300, 170, 65), 8, False), ((300, 65, 250), 2, True)],
    ids=["fresh", "joiner"],
)
def test_which_chunks_attend_causal(monkeypatch, lengths, together, arrays):
    """Prompts of different lengths prefilled together are right-padded and leave when
    done: every chunk "causal". One that joins mid-prefill is left-padded: an array."""
    seen = []
    cuda_prefill.FIX.apply()
    try:
        wrapped = BatchKVCache.make_mask
        monkeypatch.setattr(
            BatchKVCache, "make_mask", lambda self, n, **kw: seen.append(wrapped(self, n, **kw)) or seen[-1]
        )
        _greedy(_model(), _prompts(lengths), prefill_batch_size=together)
    finally:
        monkeypatch.undo()
        cuda_prefill.FIX.revert()
    chunks = [m for m in seen if m is not None and not (isinstance(m, mx.array) and m.shape[-2] == 1)]
    assert chunks[0] == "causal"
    assert any(isinstance(m, mx.array) for m in chunks) is arrays
