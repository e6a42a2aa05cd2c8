"""Key and value bits apart, and rotated keys: what each cache stores, what attention
returns from it, and what a saved cache says about itself (caches/kv_format.py)."""

from __future__ import annotations

import mlx.core as mx
import pytest
from mlx_lm.models.cache import (
    BatchKVCache,
    KVCache,
    QuantizedKVCache,
    RotatingKVCache,
    load_prompt_cache,
    save_prompt_cache,
)

import mlx_lm_ext
from mlx_lm_ext.caches import kv_format
from mlx_lm_ext.caches.batch_quantized import BatchQuantizedKVCache
from mlx_lm_ext.fixes import kv_format as fix
from mlx_lm_ext.fixes.quantized_attention import scaled_dot_product_attention as sdpa
from mlx_lm_ext.report.memory import LayerKV
from mlx_lm_ext.settings import KVSettings

FORMATS = [
    {"bits": 8, "value_bits": 4},
    {"bits": 4, "value_bits": 8},
    {"bits": 4, "rotate": "keys"},
    {"bits": 4, "rotate": "all"},
    {"bits": 8, "value_bits": 4, "rotate": "keys"},
]
IDS = ["K8V4", "K4V8", "4-rot", "4-rot-kv", "K8V4-rot"]


@pytest.fixture(autouse=True)
def patched():
    mlx_lm_ext.apply(KVSettings())
    yield
    mlx_lm_ext.revert()


def _kv(n: int, dim: int = 64, heads: int = 2, outlier: float = 0.0, seed: int = 0):
    """Keys and values; `outlier` adds a large constant to one key dim (as real keys have)."""
    k, v = mx.random.normal((2, 1, heads, n, dim), key=mx.random.key(seed))
    return k + outlier * (mx.arange(dim) == 5), v


def _filled(fmt: dict, k, v, prompt: int = 100):
    """A 16-bit prompt converted with `fmt`, then one token a step (generation's path)."""
    cache = KVCache()
    cache.update_and_fetch(k[..., :prompt, :], v[..., :prompt, :])
    cache = cache.to_quantized(group_size=64, **fmt)
    for t in range(prompt, k.shape[2]):
        keys, values = cache.update_and_fetch(k[..., t : t + 1, :], v[..., t : t + 1, :])
    return cache, keys, values


def _reference(q, cache, keys, values, scale):
    """Attention the slow way on the dequantized rows: queries rotated with the keys,
    the output rotated back where the values are rotated."""
    vbits = kv_format.value_bits(cache)
    dk = mx.dequantize(*keys, group_size=64, bits=cache.bits)
    dv = mx.dequantize(*values, group_size=64, bits=vbits)
    rotate = kv_format.rotation(cache)
    q = kv_format.hadamard(q) if rotate else q
    repeats = q.shape[1] // dk.shape[1]
    dk, dv = mx.repeat(dk, repeats, axis=1), mx.repeat(dv, repeats, axis=1)
    out = mx.softmax((q @ dk.swapaxes(-1, -2)) * scale, axis=-1) @ dv
    return kv_format.hadamard(out) if rotate == "all" else out


@pytest.mark.parametrize("fmt", FORMATS, ids=IDS)
def test_each_half_is_stored_at_its_width_and_attended_to_as_stored(fmt):
    k, v = _kv(300)
    cache, keys, values = _filled(fmt, k, v)
    vbits = fmt.get("value_bits", fmt["bits"])
    assert keys[0].shape[-1] == 64 * fmt["bits"] // 32 and values[0].shape[-1] == 64 * vbits // 32
    assert getattr(keys, "rotate", None) == fmt.get("rotate")  # for attention without the cache
    q = mx.random.normal((1, 4, 1, 64), key=mx.random.key(3))
    got = sdpa(q, keys, values, cache, 0.125, None)
    assert mx.abs(got - _reference(q, cache, keys, values, 0.125)).max().item() < 1e-4
    shared = sdpa(q, keys, values, None, 0.125, None)  # Gemma 4's KV-shared layers
    assert mx.abs(shared - got).max().item() < 1e-5


def test_rotation_is_exact_where_quantization_is_not_in_the_way():
    """Rotating queries with the keys leaves the scores as they were: at 8 bits, rotated
    and unrotated attention both sit within 8-bit error of 16-bit attention."""
    k, v = _kv(300)
    q = mx.random.normal((1, 4, 1, 64), key=mx.random.key(4))
    exact = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.125, mask=None)
    for rotate in (None, "keys", "all"):
        cache, keys, values = _filled({"bits": 8, "rotate": rotate}, k, v)
        assert mx.abs(sdpa(q, keys, values, cache, 0.125, None) - exact).max().item() < 0.02


def test_rotation_spreads_an_outlier_dim_so_4_bit_keys_lose_less():
    """Keys with one dim ~10x the rest (as RoPE'd keys of real models have): each group's
    scale is set by the outlier and the other dims lose their resolution; rotated, the
    outlier is spread over all 64 dims. Measured: rotated error 0.53x of unrotated (and
    1.05x on the same keys without the outlier: rotation buys nothing on Gaussian keys)."""
    k, v = _kv(300, outlier=12.0)
    q = mx.random.normal((1, 4, 8, 64), key=mx.random.key(5))
    exact = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.125, mask=None)
    errors = {}
    for rotate in (None, "keys"):
        cache, keys, values = _filled({"bits": 4, "value_bits": 8, "rotate": rotate}, k, v)
        errors[rotate] = mx.abs(sdpa(q, keys, values, cache, 0.125, None) - exact).mean().item()
    assert errors["keys"] < 0.7 * errors[None], errors


@pytest.mark.parametrize("fmt", FORMATS, ids=IDS)
def test_bytes_are_the_memory_reports_to_the_byte(fmt):
    """The cache's arrays at a whole number of growth steps against report/memory.py."""
    k, v = (x.astype(mx.bfloat16) for x in _kv(512, heads=3))
    cache = KVCache().to_quantized(group_size=64, **fmt)
    cache.update_and_fetch(k, v)
    layer = LayerKV("0", "full", kv_heads=3, k_dim=64, v_dim=64)
    widths = (fmt["bits"], fmt.get("value_bits", fmt["bits"]))
    assert cache.nbytes == 512 * layer.row_bytes(widths, 64) * 1  # batch 1


@pytest.mark.parametrize("fmt", FORMATS, ids=IDS)
def test_save_load_keeps_the_format(fmt, tmp_path):
    k, v = _kv(300)
    full, _, _ = _filled(fmt, k, v)
    ring = RotatingKVCache(max_size=128, keep=4)
    ring.update_and_fetch(k, v)
    ring = ring.to_quantized(group_size=64, **fmt)
    save_prompt_cache(str(tmp_path / "c.safetensors"), [full, ring])
    loaded = load_prompt_cache(str(tmp_path / "c.safetensors"))
    for before, after in zip([full, ring], loaded, strict=True):
        assert kv_format.fmt(after) == kv_format.fmt(before) and after.offset == before.offset
        assert all(mx.array_equal(a, b).item() for a, b in zip(after.keys, before.keys, strict=True))


def test_uniform_caches_save_as_upstream_does_and_split_ones_refuse_upstreams_loader():
    """A uniform cache's state is upstream's five entries (upstream loads it, and this
    loads upstream's); a split or rotated cache's has two more, which upstream's setter
    cannot unpack, so its keys are never read as unrotated."""
    k, v = _kv(50)
    uniform, _, _ = _filled({"bits": 8}, k, v, prompt=40)
    rotated, _, _ = _filled({"bits": 4, "rotate": "keys"}, k, v, prompt=40)
    upstream_setter = fix.FIX.original(QuantizedKVCache, "state").fset
    fresh = QuantizedKVCache.__new__(QuantizedKVCache)
    upstream_setter(fresh, uniform.state)
    assert (fresh.bits, fresh.offset) == (8, 50) and len(uniform.state) == 5
    with pytest.raises(ValueError):
        upstream_setter(QuantizedKVCache.__new__(QuantizedKVCache), rotated.state)
    mlx_lm_ext.revert()  # upstream's class saves; the patched one loads it as uniform
    plain = KVCache()
    plain.update_and_fetch(k, v)
    state = plain.to_quantized(group_size=64, bits=8).state
    mlx_lm_ext.apply(KVSettings())
    back = QuantizedKVCache.from_state(state)
    assert kv_format.fmt(back) == (64, 8, 8, None)


def test_batches_keep_the_format_through_merge_decode_and_extract():
    k, v = _kv(40, seed=7)
    members = []
    for n in (30, 12):
        c = KVCache()
        c.update_and_fetch(k[..., :n, :], v[..., :n, :])
        members.append(c.to_quantized(group_size=64, bits=8, value_bits=4, rotate="keys"))
    batch = BatchQuantizedKVCache.merge(members)
    assert kv_format.fmt(batch) == (64, 8, 4, "keys")
    row = mx.concatenate([k[..., 30:31, :]] * 2), mx.concatenate([v[..., 30:31, :]] * 2)
    keys, values = batch.update_and_fetch(*row)
    assert keys[0].shape[-1] == 16 and values[0].shape[-1] == 8 and keys.rotate == "keys"
    single = batch.extract(0)
    assert kv_format.fmt(single) == (64, 8, 4, "keys") and single.offset == 31
    fp = BatchKVCache([0, 18])
    fp.update_and_fetch(mx.concatenate([k[..., :30, :]] * 2), mx.concatenate([v[..., :30, :]] * 2))
    assert kv_format.fmt(fp.to_quantized(group_size=64, bits=8, value_bits=4, rotate="keys")) == (
        64,
        8,
        4,
        "keys",
    )
    with pytest.raises(ValueError, match="different settings"):
        BatchQuantizedKVCache.merge([members[0], KVCache().to_quantized(group_size=64, bits=8)])


def test_generation_reads_the_process_settings(caplog):
    """maybe_quantize_kv_cache takes kv_bits from the call and the rest from the flags,
    and says so in its one line."""
    from mlx_lm.generate import maybe_quantize_kv_cache

    mlx_lm_ext.apply(KVSettings(kv_bits=8, kv_value_bits=4, kv_rotate="keys"))
    k, v = _kv(10)
    caches = [KVCache(), KVCache()]
    for c in caches:
        c.update_and_fetch(k, v)
    with caplog.at_level("INFO", logger="mlx_lm_ext"):
        maybe_quantize_kv_cache(caches, quantized_kv_start=0, kv_group_size=64, kv_bits=8)
    assert [kv_format.fmt(c) for c in caches] == [(64, 8, 4, "keys")] * 2
    assert "kv_bits=8 value_bits=4 rotate=keys quantizes layers 0,1" in caplog.text


def test_revert_restores_upstreams_class():
    mlx_lm_ext.revert()
    assert not fix.installed()
    mlx_lm_ext.apply(KVSettings())
    assert fix.installed()


def test_generate_step_and_batch_generator_take_the_format_for_their_own_caches():
    """The patch series' arguments on the monkeypatch: generate_step's kv_value_bits and
    kv_rotate shape its caches only (a generation interleaved with it and the process
    settings keep theirs), BatchGenerator takes them too, and revert restores upstream's
    signatures."""
    import importlib
    import inspect

    from mlx_lm import load
    from mlx_lm.models.cache import make_prompt_cache

    from mlx_lm_ext.zoo import get_entry, resolve

    gen = importlib.import_module("mlx_lm.generate")
    mlx_lm_ext.apply(KVSettings())
    model, _ = load(str(resolve(get_entry("llama-3.2"))))
    prompt = mx.array([1, 2, 3, 4, 5])
    split, plain = make_prompt_cache(model), make_prompt_cache(model)
    a = gen.generate_step(prompt, model, max_tokens=3, prompt_cache=split, kv_bits=8, quantized_kv_start=0,
                          kv_value_bits=4, kv_rotate="all")  # fmt: skip
    b = gen.generate_step(prompt, model, max_tokens=3, prompt_cache=plain, kv_bits=8, quantized_kv_start=0)
    for _ in zip(a, b, strict=True):  # steps interleaved
        pass
    assert {kv_format.fmt(c) for c in split} == {(64, 8, 4, "all")}
    assert {kv_format.fmt(c) for c in plain} == {(64, 8, 8, None)}
    assert {"kv_value_bits", "kv_rotate"} <= set(inspect.signature(gen.generate_step).parameters)
    batch = gen.BatchGenerator(model, kv_bits=8, kv_value_bits=4, kv_rotate="keys")
    assert batch._quantize_cache_fn.keywords["kv_value_bits"] == 4
    mlx_lm_ext.revert()
    assert "kv_value_bits" not in inspect.signature(gen.generate_step).parameters
    mlx_lm_ext.apply(KVSettings())
