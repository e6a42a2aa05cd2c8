"""python -m mlx_lm_ext.report: the memory table from config.json, checked by hand."""

from __future__ import annotations

import json

import pytest

from mlx_lm_ext.report import cli

LLAMA = {
    "model_type": "llama",
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "rms_norm_eps": 1e-6,
    "vocab_size": 1000,
}
GEMMA3 = {
    "model_type": "gemma3_text",
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 6,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 64,
    "sliding_window": 512,
    "sliding_window_pattern": 6,
    "vocab_size": 1000,
    "query_pre_attn_scalar": 64,
}


def _run(capsys, config, tmp_path, *args):
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert cli.main(["--model", str(tmp_path), "--json", *args]) == 0
    return json.loads(capsys.readouterr().out)


def test_full_attention_bytes_by_hand(capsys, tmp_path):
    out = _run(capsys, LLAMA, tmp_path, "--context", "1000")
    fp16, q8, q4 = (r["kv_bytes"] for r in out["rows"])
    # 2 layers x 1000 tokens x (K + V) x 2 KV heads x 64 dims
    assert fp16 == 2 * 1000 * 2 * 2 * 64 * 2  # 2 bytes per element
    assert q8 == 2 * 1000 * 2 * 2 * (64 + 1 * 4)  # 1 byte each + 16-bit scale and bias per group
    assert q4 == 2 * 1000 * 2 * 2 * (32 + 1 * 4)
    assert out["rows"][1]["ratio"] == pytest.approx(68 / 128)


def test_sliding_windows_and_max_kv_size_cap_tokens(capsys, tmp_path):
    out = _run(capsys, GEMMA3, tmp_path, "--context", "10000")
    kinds = [lay["kind"] for lay in out["layers"]]
    assert kinds == ["sliding"] * 5 + ["kv"]
    row = 2 * 1 * 64 * 2  # K + V, one KV head, 64 dims, 2 bytes
    assert out["rows"][0]["kv_bytes"] == (5 * 512 + 10000) * row
    out = _run(capsys, GEMMA3, tmp_path, "--context", "10000", "--max-kv-size", "256")
    assert out["rows"][0]["kv_bytes"] == 6 * 256 * row


def test_group_size_that_does_not_divide_is_reported_not_guessed(capsys, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA))
    cli.main(["--model", str(tmp_path), "--kv-group-size", "128"])
    text = capsys.readouterr().out
    assert "n/a: group size does not divide a head dim" in text
    assert "2 caches: 2 full attention (2 KV heads x 64/64)" in text


def test_bad_bits_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--model", "x", "--bits", "7"])
    assert exc.value.code == 2 and "--bits 7: must be one of" in capsys.readouterr().err


def test_keys_and_values_at_their_own_widths_by_hand(capsys, tmp_path):
    """--bits K8V4: 8-bit keys and 4-bit values, each with its 16-bit scale and bias."""
    out = _run(capsys, LLAMA, tmp_path, "--context", "1000", "--bits", "8,K8V4,K4V4")
    fp16, q8, k8v4, q4 = (r["kv_bytes"] for r in out["rows"])
    assert k8v4 == 2 * 1000 * 2 * ((64 + 4) + (32 + 4))  # layers x tokens x heads x (K + V)
    assert q4 == 2 * 1000 * 2 * 2 * (32 + 4)  # K4V4 is 4 bits
    assert [r["precision"] for r in out["rows"]][1:] == [
        "8-bit (group 64)",
        "K8V4 (group 64)",
        "4-bit (group 64)",
    ]


@pytest.mark.parametrize("bits", ["K9V4", "K8", "8,x"])
def test_bad_widths_exit_2(capsys, bits):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--model", "x", "--bits", bits])
    assert exc.value.code == 2 and "--bits" in capsys.readouterr().err
