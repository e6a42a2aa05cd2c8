"""benchmarks/kv_speed.py's comparison settings (also decode_cost.py's --bits): each names
what it takes away, and taking turns with plain settings puts it back."""

from __future__ import annotations

import pytest
from benchmark_scripts import BENCHMARKS, load

from mlx_lm_ext.fixes import quantized_attention
from mlx_lm_ext.kernels import plan


@pytest.fixture
def kv_speed(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    module = load("kv_speed")
    reused = quantized_attention._block_decoder
    yield module
    quantized_attention._block_decoder = reused
    plan.FLASH_MMA = True


def test_launch_each_step_is_8_bit_without_the_reused_launch(kv_speed):
    """`8+launch-each-step`: the same cache and kernel as 8, every step making its flash
    launch (the decode path before a tail's block reused it); a plain setting after it
    reuses again."""
    reused = quantized_attention._block_decoder
    bits = kv_speed.precision("8+launch-each-step")
    settings = kv_speed._settings(bits)
    assert (settings.kv_bits, settings.kv_value_bits, settings.kv_rotate) == (8, 8, None)
    try:
        kv_speed._delivery(False, settings, bits)
        each_step = quantized_attention._block_decoder
        assert each_step is not reused and each_step(None, None, 1.0, None, None) is None
        kv_speed._delivery(False, kv_speed._settings(8), 8)
        assert quantized_attention._block_decoder is reused
    finally:
        kv_speed.mlx_lm_ext.revert()


def test_a_run_ending_on_a_comparison_leaves_nothing_behind(kv_speed):
    """Each measurement ends with `undo_delivery`: after an each-step or CUDA-core setting,
    whatever runs next in the process reuses launches and scores on tensor cores."""
    reused = quantized_attention._block_decoder
    for text in ("8+launch-each-step", "4+cuda-cores"):
        bits = kv_speed.precision(text)
        kv_speed._delivery(True, kv_speed._settings(bits), bits)
        kv_speed.undo_delivery()
        assert quantized_attention._block_decoder is reused and plan.FLASH_MMA is True
        assert not kv_speed.mlx_lm_ext.applied()


def test_cuda_cores_and_an_unknown_option(kv_speed):
    bits = kv_speed.precision("4+cuda-cores")
    try:
        kv_speed._delivery(False, kv_speed._settings(bits), bits)
        assert plan.FLASH_MMA is False
        kv_speed._delivery(False, kv_speed._settings(4), 4)
        assert plan.FLASH_MMA is True
    finally:
        kv_speed.mlx_lm_ext.revert()
    with pytest.raises(Exception, match="launch-each-step"):
        kv_speed.precision("8+each-step")


def test_decode_costs_tail_launches_pass_what_a_decode_step_passes(monkeypatch):
    """decode_cost.py's tail rows time the flash launch over a decode tail as a step
    makes it: the rows read from the buffers, then the same launch handed the step's row
    to write and the record of the last launch that wrote one."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    module = load("decode_cost")
    tails = []

    def flash_decode(q, qk, qv, scale, group, bits, length, tail=None):
        tails.append(tail)
        return q

    monkeypatch.setattr(module.launch, "flash_decode", flash_decode)
    rows = module.tail_rows(256, 8, (8, 2, 64, 1), launches=2, rounds=1)
    assert [r["launch"] for r in rows] == list(module.TAIL_KINDS)
    assert all(r["build_us"] > 0 and r["eval_us"] > 0 for r in rows)
    read, written = tails[:2], tails[2:]
    assert all(t.rows == 31 and t.incoming is None for t in read)
    assert all(t.incoming is not None and t.writes is written[0].writes for t in written)
    assert written[0].incoming[0].shape == (1, 2, 1, 64) and written[0].key_buffer.shape == (1, 2, 64, 64)
