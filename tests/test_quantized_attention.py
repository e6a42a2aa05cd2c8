"""Quantized attention with sinks equals fp attention with sinks on dequantized data."""

from __future__ import annotations

import os
import subprocess
import sys

import mlx.core as mx
import pytest

from mlx_lm_ext import kernels
from mlx_lm_ext.fixes import quantized_attention as fix
from mlx_lm_ext.fixes.quantized_attention import QuantizedOperands as Ops
from mlx_lm_ext.fixes.quantized_attention import (
    dequantized_attention,
    packed_params,
    quantized_attention,
)


@pytest.mark.parametrize("n_q,n_kv,L", [(4, 4, 1), (8, 2, 1), (8, 2, 5)])
def test_sinks_match_reference(n_q, n_kv, L):
    mx.random.seed(0)
    q = mx.random.normal((1, n_q, L, 64))
    k, v = mx.random.normal((1, n_kv, 40, 64)), mx.random.normal((1, n_kv, 40, 64))
    sinks = mx.random.normal((n_q,))
    qk, qv = mx.quantize(k, 64, 8), mx.quantize(v, 64, 8)
    dk, dv = (mx.dequantize(*t, group_size=64, bits=8) for t in (qk, qv))
    mask = "causal" if L > 1 else None
    ref = mx.fast.scaled_dot_product_attention(q, dk, dv, scale=0.125, mask=mask, sinks=sinks)
    got = quantized_attention(q, Ops(qk, qv, 64, 8), 0.125, mask, sinks=sinks)
    assert mx.abs(got - ref).max().item() < 1e-4


def test_packed_params_read_group_and_bits():
    q = mx.zeros((1, 1, 1, 256))
    for group, bits in ((64, 8), (32, 4), (128, 6)):
        assert packed_params(q, mx.quantize(mx.zeros((1, 1, 2, 256)), group, bits)) == (group, bits, bits)


@pytest.mark.parametrize("kind", ["bool-window", "additive"])
def test_array_masks_match_reference(kind):
    mx.random.seed(1)
    q = mx.random.normal((1, 8, 6, 64))
    k, v = mx.random.normal((2, 2, 40, 64))[:1], mx.random.normal((1, 2, 40, 64))
    qk, qv = mx.quantize(k, 64, 4), mx.quantize(v, 64, 4)
    dk, dv = (mx.dequantize(*t, group_size=64, bits=4) for t in (qk, qv))
    pos_q, pos_k = mx.arange(34, 40)[:, None], mx.arange(40)[None]
    mask = (pos_q >= pos_k) & (pos_q - pos_k < 16)  # a sliding window of 16
    if kind == "additive":
        mask = mx.where(mask, 0.0, -1e9)
    ref = mx.fast.scaled_dot_product_attention(q, dk, dv, scale=0.125, mask=mask)
    got = quantized_attention(q, Ops(qk, qv, 64, 4), 0.125, mask)
    assert mx.abs(got - ref).max().item() < 1e-4


def test_grouped_query_heads_read_the_cache_without_copying_it():
    """8 query heads on 1 KV head: the step's extra memory stays far below one copy."""
    k = mx.random.normal((1, 1, 8192, 256)).astype(mx.bfloat16)
    qk, qv = mx.quantize(k, 64, 8), mx.quantize(k, 64, 8)
    q = mx.random.normal((1, 8, 1, 256)).astype(mx.bfloat16)
    mx.eval(qk, qv, q)
    packed = sum(x.nbytes for x in qk)
    mx.clear_cache()
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    mx.eval(quantized_attention(q, Ops(qk, qv, 64, 8), 0.0625, None))
    assert mx.get_peak_memory() - before < packed / 2  # measured 0 bytes folded; 4x packed broadcast


def _reference(q, qk, qv, scale, mask=None, sinks=None, group=64, bits=8):
    dk, dv = (mx.dequantize(*t, group_size=group, bits=bits) for t in (qk, qv))
    return mx.fast.scaled_dot_product_attention(q, dk, dv, scale=scale, mask=mask, sinks=sinks)


@pytest.mark.parametrize("L,mask", [(1, None), (6, "causal")])
def test_whole_buffer_with_length_equals_the_view(L, mask):
    """Attending over a 256-row buffer's first 70 rows equals attending over the view."""
    mx.random.seed(2)
    qk, qv = (tuple(mx.quantize(mx.random.normal((1, 2, 256, 64)), 64, 8)) for _ in range(2))
    view_k, view_v = (tuple(x[..., :70, :] for x in t) for t in (qk, qv))
    q, sinks = mx.random.normal((1, 8, L, 64)), mx.random.normal((8,))
    want = quantized_attention(q, Ops(view_k, view_v, 64, 8), 0.125, mask, sinks=sinks, kernels_on=False)
    got = quantized_attention(q, Ops(qk, qv, 64, 8, 70), 0.125, mask, sinks=sinks, kernels_on=False)
    assert mx.abs(got - want).max().item() < 1e-5


def test_dequantized_attention_matches_the_quantized_path():
    """The prompt-chunk path (fused kernel on dequantized KV) agrees with quantized matmuls."""
    mx.random.seed(3)
    q = mx.random.normal((1, 8, 12, 128))
    qk, qv = (mx.quantize(mx.random.normal((1, 2, 300, 128)), 64, 4) for _ in range(2))
    sinks = mx.random.normal((8,))
    want = quantized_attention(q, Ops(qk, qv, 64, 4, 260), 0.09, "causal", sinks=sinks, kernels_on=False)
    got = dequantized_attention(q, Ops(qk, qv, 64, 4, 260), 0.09, "causal", sinks=sinks)
    assert mx.abs(got - want).max().item() < 1e-4


@pytest.mark.parametrize(
    "rows,dim,bits,group,per_lane",
    [
        (4, 128, 8, 64, 16),  # Llama-3.1-8B: a 16-byte load a lane, 8 lanes a row
        (4, 128, 4, 64, 16),  # 8-byte loads
        (8, 128, 8, 64, 8),  # more query rows per KV head: fewer dims a lane
        (16, 128, 8, 64, 4),  # Qwen-style 16 query heads a KV head: a warp a row
        (16, 128, 4, 64, None),  # 4 dims of 4 bits are less than a word
        (8, 128, 2, 64, None),
        (4, 64, 8, 32, 16),
        (4, 256, 8, 128, 16),  # 16 lanes a row
        (4, 80, 8, 64, None),  # 80 dims split into no power of two lanes
        (4, 128, 6, 64, None),  # 6-bit values straddle words: the kernel reads whole words
    ],
)
def test_flash_split_keeps_lanes_whole_words_and_registers_bounded(rows, dim, bits, group, per_lane):
    """The flash kernel's split of a row over lanes (pure arithmetic: runs everywhere)."""
    assert kernels.flash_split(rows, dim, bits, group) == per_lane
    if per_lane:
        lanes = dim // per_lane
        assert 32 % lanes == 0 and per_lane * bits % 32 == 0 and group % per_lane == 0
        assert rows * per_lane <= kernels.plan.FLASH_REGISTERS


@pytest.mark.parametrize(
    "rows,dim,bits,group,tensor_cores",
    [
        (4, 128, 8, 64, True),  # Llama 3: 32 query heads on 8 KV heads x 128
        (4, 256, 8, 128, True),  # Gemma 3 270M's global layers
        (8, 128, 4, 32, True),  # a 4-word group: one 16-byte load a lane
        (1, 64, 2, 64, True),  # a lane's share of a row is one word
        (16, 128, 8, 64, False),  # 16 query rows: past one tile's 8 columns
        (4, 128, 2, 32, False),  # 2-word groups: 4 lanes' loads would straddle them
        (4, 128, 6, 64, False),
        (4, 72, 8, 8, False),  # 72 dims: not k-steps of 16
    ],
)
def test_tensor_cores_take_shapes_their_tiles_and_groups_fit(rows, dim, bits, group, tensor_cores):
    """Which shapes the flash kernel scores on tensor cores (pure arithmetic: runs everywhere)."""
    assert kernels.flash_tensor_cores(rows, dim, bits, group) is tensor_cores


@pytest.mark.parametrize(
    "dim,bits,group,tensor_cores",
    [
        (128, 8, 64, True),  # a lane's 8 dims of a group: 2 words
        (128, 4, 64, True),  # 1 word
        (256, 8, 128, True),  # 4 words (Gemma 3 270M's global layers)
        (128, 4, 32, False),  # half a word
        (128, 2, 64, False),
        (256, 8, 256, False),  # 8 words: past one 16-byte load
        (128, 6, 64, False),
    ],
)
def test_tensor_cores_take_values_whose_group_is_whole_words_a_lane(dim, bits, group, tensor_cores):
    """Which value formats the flash kernel sums on tensor cores (pure arithmetic)."""
    assert kernels.flash_tensor_core_values(dim, bits, group) is tensor_cores


@pytest.mark.parametrize(
    "rows,bits,value_bits,per_lane",
    [
        (4, 8, 4, 16),  # K8V4: both halves pack whole words at 16 dims a lane
        (8, 8, 4, 8),
        (16, 8, 4, None),  # 4 dims a lane: 8-bit keys fit a word, 4-bit values do not
        (4, 8, 6, None),
        (4, 4, 2, 16),
    ],
)
def test_flash_split_fits_both_widths(rows, bits, value_bits, per_lane):
    """Keys and values at different widths: the split must pack both into whole words."""
    assert kernels.flash_split(rows, 128, bits, 64, value_bits) == per_lane


@pytest.mark.parametrize("batch_heads", [1, 8, 24, 256])
@pytest.mark.parametrize("length", [1, 5, 700, 4096, 32768, 131072, 1_000_000])
@pytest.mark.parametrize("rows,step", [(4, 32), (8, 16), (16, 8), (1, 32)])
def test_flash_chunks_cover_the_rows_and_fit_shared_memory(batch_heads, length, rows, step):
    """The kernel cuts each KV head into the host's chunk count, ceil(length / C) rows
    each rounded up to a block's step: every chunk non-empty, all rows covered, a
    chunk's scores and all chunks' weights within the block's shared memory; past that
    (1M tokens at 16 query rows a KV head) no plan."""
    chunks = kernels.plan.flash_chunks(batch_heads, length, rows, step)
    if chunks is None:  # too long for the merge: the caller takes another path
        assert length > (kernels.FLASH_SMEM // rows) ** 2 // 2
        return
    per_block = ((length + chunks - 1) // chunks + step - 1) // step * step  # as the kernel has it
    assert (chunks - 1) * per_block < length <= chunks * per_block
    assert per_block * rows <= kernels.FLASH_SMEM and chunks * rows <= kernels.FLASH_SMEM


def test_operands_read_buffers_the_view_fills_without_copies(monkeypatch):
    """A cache whose buffer is exactly full returns the buffers themselves: attention
    reads them as stored, with no length and no copy (mx.contiguous is an op a layer)."""
    from mlx_lm.models.cache import QuantizedKVCache

    monkeypatch.setattr(fix, "strided_quantized_matmul", lambda: False)
    cache = QuantizedKVCache()
    x = mx.random.normal((1, 2, 256, 64))
    keys, values = cache.update_and_fetch(x, x)  # 256 rows: one whole growth step
    ops = fix.operands(keys, values, cache, 64, 8)
    got_k, got_v, length = ops.keys, ops.values, ops.length
    assert length is None
    assert all(a is b for a, b in zip(got_k, vars(cache)["keys"], strict=True))
    assert all(a is b for a, b in zip(got_v, vars(cache)["values"], strict=True))


_NAME_IN_ANOTHER_PROCESS = """
import mlx.core as mx
from mlx_lm_ext import kernels
plan = (("R", 4), ("D", 128), ("HAS_TAIL", True), ("OutT", mx.bfloat16))
print(kernels.kernel_name("flash", kernels.flash_source(plan)))
"""


def test_flash_kernels_are_named_for_their_source(monkeypatch):
    """MLX caches compiled kernels on disk by name alone: the same source must get the
    same name in every process (a name from hash() or id() would not), and any change,
    a constant or a shared device helper, a new name."""
    plan = (("R", 4), ("D", 128), ("HAS_TAIL", True), ("OutT", mx.bfloat16))
    source = kernels.flash_source(plan)
    assert "constexpr int R = 4;" in source and "constexpr bool HAS_TAIL = true;" in source
    assert "using OutT = __nv_bfloat16;" in source
    name = kernels.kernel_name("flash", source)
    assert name.isidentifier() and name.startswith("mlx_lm_ext_qattn_flash_")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    other_process = subprocess.run(
        [sys.executable, "-c", _NAME_IN_ANOTHER_PROCESS], env=env, capture_output=True, text=True, check=True
    )
    assert other_process.stdout.strip() == name
    assert kernels.kernel_name("flash", kernels.flash_source((("R", 8), *plan[1:]))) != name
    monkeypatch.setattr(kernels.plan, "header", lambda: "// a changed helper\n")
    assert kernels.kernel_name("flash", source) != name


def _outlier_kv(heads: int, tokens: int, dim: int, seed: int) -> mx.array:
    """bf16 keys or values shaped like a trained model's: non-zero channel means and a few
    outlier channels 20x the rest (random normal data has neither)."""
    key = mx.random.key(seed)
    x = mx.random.normal((1, heads, tokens, dim), key=key)
    means = mx.random.normal((dim,), key=mx.random.split(key)[0]) * 2
    scale = mx.where(mx.arange(dim) % 17 == 3, 20.0, 1.0)
    return (x * scale + means).astype(mx.bfloat16)


def _exact(q, qk, qv, group: int, bits: int, scale: float, causal: bool) -> mx.array:
    """float32 attention over the dequantized cache: what quantized attention approximates."""
    f32 = [(t[0], t[1].astype(mx.float32), t[2].astype(mx.float32)) for t in (qk, qv)]
    dk, dv = (mx.dequantize(*t, group_size=group, bits=bits) for t in f32)
    return _true_attention(q, dk, dv, scale, causal)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("L", [1, 7])
def test_attention_is_at_least_as_close_to_exact_as_upstreams(bits, L):
    """Against exact attention over the dequantized cache, on bf16 data with outlier
    channels and grouped query heads (SmolLM2's 9 on 3 x 64), our error is far below
    upstream's quantized SDPA at every accepted bit width: measured mean |error| ratio
    ours/upstream 0.01-0.03 (bound 0.1); with scores in bf16, as upstream computes them,
    the ratio is 1.0 and this fails."""
    from mlx_lm.models.base import quantized_scaled_dot_product_attention as upstream

    k, v = _outlier_kv(3, 300, 64, seed=bits), _outlier_kv(3, 300, 64, seed=bits + 100)
    qk, qv = tuple(mx.quantize(k, 64, bits)), tuple(mx.quantize(v, 64, bits))
    q = _outlier_kv(9, L, 64, seed=bits + 200)
    mask = "causal" if L > 1 else None
    want = _exact(q, qk, qv, 64, bits, 0.125, L > 1)
    ours = quantized_attention(q, Ops(qk, qv, 64, bits), 0.125, mask, kernels_on=False)
    theirs = upstream(mx.array(q), qk, qv, scale=0.125, mask=mask, group_size=64, bits=bits)
    err_ours = mx.abs(ours.astype(mx.float32) - want).mean().item()
    err_theirs = mx.abs(theirs.astype(mx.float32) - want).mean().item()
    assert ours.dtype == q.dtype and err_ours <= 0.1 * err_theirs, (err_ours, err_theirs)


def _true_attention(q, k, v, scale: float, causal: bool) -> mx.array:
    """float32 attention over these keys and values (unquantized: what a user's answer is)."""
    rep = q.shape[1] // k.shape[1]
    k, v = (mx.repeat(x.astype(mx.float32), rep, axis=1) for x in (k, v))
    s = (q.astype(mx.float32) * scale) @ k.swapaxes(-1, -2)
    L, T = s.shape[-2:]
    if causal:
        s = mx.where(mx.arange(T - L, T)[:, None] >= mx.arange(T)[None], s, -mx.inf)
    return mx.softmax(s, axis=-1) @ v


# Mean |error| against attention over the unquantized cache, ours / upstream's, summed
# over 16 draws (CPU, mlx 0.32.4): 2-5 bits 0.950-1.013 (the quantization error dominates
# and both arithmetics keep it), 6 bits 0.79-0.89, 8 bits 0.49-0.51. Bounds: the measured
# excess over 1 doubled (1.03) where they tie, about 1.1x measured where ours is better.
TRUE_ERROR_RATIO = {2: 1.03, 3: 1.03, 4: 1.03, 5: 1.03, 6: 0.95, 8: 0.56}


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("L", [1, 7])
def test_attention_error_to_the_unquantized_answer_is_at_most_upstreams(bits, L):
    """What users get: against float32 attention over the keys and values before
    quantization (bf16 data with outlier channels, 9 query heads on 3 KV heads, 1 and 7
    queries), our quantized attention errs no more than upstream's, and clearly less at
    6 and 8 bits, where upstream's bf16 scores are a visible share of the error. With our
    scores in bf16 the 8-bit ratio is 1.0 and this fails."""
    from mlx_lm.models.base import quantized_scaled_dot_product_attention as upstream

    mask = "causal" if L > 1 else None
    err_ours = err_theirs = 0.0
    for draw in range(16):
        seed = 1000 * draw + bits
        k, v = _outlier_kv(3, 300, 64, seed), _outlier_kv(3, 300, 64, seed + 100)
        q = _outlier_kv(9, L, 64, seed + 200)
        qk, qv = tuple(mx.quantize(k, 64, bits)), tuple(mx.quantize(v, 64, bits))
        truth = _true_attention(q, k, v, 0.125, L > 1)
        ours = quantized_attention(q, Ops(qk, qv, 64, bits), 0.125, mask, kernels_on=False)
        theirs = upstream(mx.array(q), qk, qv, scale=0.125, mask=mask, group_size=64, bits=bits)
        err_ours += mx.abs(ours.astype(mx.float32) - truth).mean().item()
        err_theirs += mx.abs(theirs.astype(mx.float32) - truth).mean().item()
    assert err_ours <= TRUE_ERROR_RATIO[bits] * err_theirs, (err_ours / err_theirs, err_ours, err_theirs)


def test_kernel_sources_include_the_shipped_files(monkeypatch, tmp_path):
    """MLX copies and hashes a custom kernel's source at every call: the source carries an
    #include of the shipped file (and the shape and stride names MLX looks for in it),
    the name's digest the text compiled; off a file system, or where the path holds a
    quote, the text itself."""
    plan = kernels.plan
    body = plan.source("flash.cu")
    assert len(body) < 400 and body.count("#include") == 1 and "mma_f16" not in body
    assert "kw_shape" in body and "mask_strides" in body and "q_strides" in body
    assert plan.included(body) == body.split("#")[0] + plan.text("flash.cu")  # what NVRTC reads
    source = kernels.flash_source((("R", 4),), ("mask", "sinks"))
    assert "const float* mask = nullptr;" in source and "tk = nullptr" not in source
    name = kernels.kernel_name("flash", source)
    shipped = plan.text
    monkeypatch.setattr(plan, "text", lambda f: shipped(f) + "// changed\n")
    assert kernels.kernel_name("flash", source) != name  # the file's text, not its path
    quoted = tmp_path / 'a "quoted" folder' / "flash.cu"
    monkeypatch.setattr(plan, "_file", lambda f: quoted)
    assert plan.source.__wrapped__("flash.cu") == plan.text("flash.cu")
    monkeypatch.setattr(plan, "_file", lambda f: type("Zipped", (), {"read_text": lambda s, **k: "x"})())
    assert plan.source.__wrapped__("flash.cu") == plan.text("flash.cu")
