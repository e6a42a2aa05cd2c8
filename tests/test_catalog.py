"""models.yaml is validated, and errors name the entry and the key."""

from __future__ import annotations

import pytest
import yaml

from mlx_lm_ext.zoo.catalog import CatalogError, load_catalog, parse_layout, select


def test_repository_catalog_is_valid_and_covers_the_required_families():
    ids = {e.id for e in load_catalog()}
    for family in ("llama-3.2", "qwen3", "gemma-3", "gemma-4", "qwen3-next", "qwen3.5-moe", "gpt-oss"):
        assert any(family in i for i in ids), family


def _write(tmp_path, entry: dict):
    base = {
        "id": "x",
        "hub": "org/x",
        "model_type": "llama",
        "min_mlx_lm": "0.1.0",
        "layout": "kv*2",
        "offline": {"config": {}},
    }
    base.update(entry)
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump({"models": [base]}))
    return path


@pytest.mark.parametrize(
    "change,message",
    [
        ({"hub": None}, "entry 'x': key 'hub' must be a str"),
        ({"layuot": "kv"}, "entry 'x': unknown key 'layuot'"),
        ({"layout": "kv full"}, "entry 'x': layout token 'full'"),
        ({"min_mlx_lm": "0.30"}, "entry 'x': min_mlx_lm '0.30' is not X.Y.Z"),
        ({"offline": {"config": {}, "dtype": "int8"}}, "entry 'x': offline.dtype"),
    ],
)
def test_schema_errors_name_entry_and_key(tmp_path, change, message):
    with pytest.raises(CatalogError, match=message.replace("(", r"\(")):
        load_catalog(_write(tmp_path, change))


def test_layout_repeats_and_select_by_substring():
    assert parse_layout("sliding*2 kv", "t") == ("sliding", "sliding", "kv")
    entries = load_catalog()
    assert {e.id for e in select(entries, "gemma-4")} == {"gemma-4-26b-a4b", "gemma-4-e2b"}
    assert len(select(entries, None)) == len(entries)
