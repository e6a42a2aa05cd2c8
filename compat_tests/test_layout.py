"""The cache layout upstream builds is the one models.yaml records, per model."""

from __future__ import annotations

from mlx_lm_ext import layout


def test_cache_layout_matches_models_yaml(entry, loaded, tier):
    from mlx_lm.models.cache import make_prompt_cache

    model, _ = loaded
    got = layout.describe(make_prompt_cache(model), entry.model_type)
    if tier == "offline":
        assert tuple(got) == entry.layout, f"{entry.id}: upstream layout changed"
    else:  # a hub model has more layers; its kinds are the offline ones
        assert set(got) == set(entry.layout), f"{entry.id}: upstream layout changed"
