"""Bad values are refused with one line naming the flag, the value and what is allowed."""

from __future__ import annotations

import json

import pytest

from mlx_lm_ext.settings import KVSettings, SettingsError, head_dims, validate


@pytest.mark.parametrize(
    "settings,message",
    [
        (KVSettings(kv_bits=7), "--kv-bits 7: must be one of 2, 3, 4, 5, 6, 8"),
        (KVSettings(kv_bits=8, kv_group_size=48), "--kv-group-size 48: must be one of 32, 64, 128"),
        (KVSettings(kv_bits=8, quantized_kv_start=-5), "--quantized-kv-start -5"),
        (KVSettings(max_kv_size=-1), "--max-kv-size -1: must be a positive"),
        (KVSettings(kv_key_bits=7), "--kv-key-bits 7: must be one of 2, 3, 4, 5, 6, 8"),
        (KVSettings(kv_bits=8, kv_value_bits=1), "--kv-value-bits 1: must be one of"),
        (KVSettings(kv_value_bits=4), "--kv-value-bits 4: also give --kv-key-bits or --kv-bits"),
        (KVSettings(kv_rotate="keys"), "--kv-rotate keys: rotates a quantized cache; also give --kv-bits"),
        (KVSettings(kv_bits=4, kv_rotate="values"), "--kv-rotate values: must be keys or all"),
    ],
)
def test_bad_values_are_refused(settings, message):
    with pytest.raises(SettingsError, match=message):
        validate(settings)


def test_group_size_must_divide_every_head_dim(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps(
            {"model_type": "gemma4_text", "head_dim": 256, "global_head_dim": 512, "num_attention_heads": 4}
        )
    )
    validate(KVSettings(kv_bits=4, kv_group_size=128), model=str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "head_dim": 64}))
    with pytest.raises(SettingsError, match="does not divide the head dim 64 .* use one of 32, 64"):
        validate(KVSettings(kv_bits=4, kv_group_size=128), model=str(tmp_path))


def test_head_dims_read_nested_text_config_and_derived_dims():
    assert head_dims({"text_config": {"head_dim": 128}}) == {128}
    assert head_dims({"hidden_size": 2048, "num_attention_heads": 32}) == {64}
    assert head_dims({"head_dim": 256, "global_head_dim": 512}) == {256, 512}


def test_key_bits_alone_quantize_and_each_width_defaults_to_kv_bits():
    assert KVSettings(kv_key_bits=8).kv_bits == 8
    split = KVSettings(kv_bits=8, kv_value_bits=4)
    assert (split.key_bits, split.value_bits) == (8, 4)
    assert KVSettings(kv_key_bits=4, kv_value_bits=8).describe() == "4 value_bits=8"
    assert KVSettings(kv_bits=4, kv_rotate="all").describe() == "4 rotate=all"


def test_rotation_needs_a_power_of_two_head_dim(tmp_path):
    """The Sylvester-Hadamard rotation is its own inverse only at powers of two."""
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "phi", "head_dim": 80}))
    with pytest.raises(SettingsError, match="--kv-rotate keys: .* power-of-two head dim; .* has 80"):
        validate(KVSettings(kv_bits=4, kv_group_size=32, kv_rotate="keys"), model=str(tmp_path))
