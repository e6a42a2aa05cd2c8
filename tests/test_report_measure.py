"""python -m mlx_lm_ext.report --measure on a real (stand-in) model, loaded through mlx_lm.load."""

from __future__ import annotations

import json

import pytest

from mlx_lm_ext.report import cli, memory, sweep


def _measure(capsys, *args):
    argv = ["--model", "llama-3.2", "--offline", "--measure", "--json", "--points", "2"]
    assert cli.main(argv + ["--context", "512", "--decode-tokens", "8", *args]) == 0
    return json.loads(capsys.readouterr().out)


def test_measured_cache_bytes_equal_the_prediction(capsys):
    """At 256 and 512 tokens (whole growth steps) the held cache is what the table predicts."""
    out = _measure(capsys)
    layers = [memory.LayerKV(**x) for x in out["layers"]]
    got = {(p["bits"], p["context"]): p for p in out["measured"]}
    assert sorted({c for _, c in got}) == [256, 512]
    for (bits, context), point in got.items():
        assert point["cache_bytes"] == memory.kv_bytes(layers, context, bits, 64)
        assert point["tok_s"] > 0 and point["peak_bytes"] >= point["cache_bytes"]


def test_quantized_precisions_are_compared_against_16_bits(capsys):
    got = {(p["bits"], p["context"]): p for p in _measure(capsys)["measured"]}
    assert got[(None, 512)]["kl_mean"] == 0.0
    for context in (256, 512):
        eight, four = got[(8, context)], got[(4, context)]
        # measured 1.5e-5 (8-bit) and 6e-4 (4-bit) on 0.32.2, llama-3.2 stand-in
        assert 0 < eight["kl_mean"] < 2e-4 < four["kl_mean"] < 5e-3
        assert 0.5 <= four["top1"] <= 1.0 and eight["top1"] >= 0.75


def test_plot_is_a_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    png = tmp_path / "kv.png"
    _measure(capsys, "--plot", str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "args,message",
    [(["--points", "0"], "--points"), (["--plot", "x.png"], "add --measure")],
)
def test_bad_measure_flags_fail_before_loading(capsys, args, message):
    with pytest.raises(SystemExit):
        cli.main(["--model", "llama-3.2", "--offline", *args])
    assert message in capsys.readouterr().err


def test_context_points_double_up_to_the_context():
    assert sweep.context_points(32768, 4) == [4096, 8192, 16384, 32768]
    with pytest.raises(ValueError, match="apart"):
        sweep.measure(None, [], [100, 110], [8], 64, decode_tokens=32)
