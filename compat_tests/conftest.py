"""The compatibility suite: every test is parametrized by models.yaml entry id.

Options:
  --models gemma-4,qwen3-next   ids matching any substring (default: all)
  --tier offline|hub            offline stand-ins (default) or the real hub models
Environment:
  MLX_LM_EXT_DELIVERY=monkeypatch (default) applies mlx_lm_ext's fixes;
  MLX_LM_EXT_DELIVERY=upstream runs unpatched mlx-lm, where known upstream failures are
  strict xfails, so a release that fixes one flips the test.
"""

from __future__ import annotations

import os
from importlib.metadata import version

import pytest

import mlx_lm_ext
from mlx_lm_ext import layout
from mlx_lm_ext.zoo import HubUnavailable, load_catalog, resolve, select

DELIVERY = os.environ.get("MLX_LM_EXT_DELIVERY", "monkeypatch")
MLX_LM_VERSION = version("mlx-lm")
NYI = "RotatingKVCache Quantization NYI"


def pytest_addoption(parser):
    parser.addoption("--models", default=None, help="models.yaml ids to run (substrings, comma-separated)")
    parser.addoption("--tier", default="offline", choices=["offline", "hub"], help="model tier")


def pytest_configure(config):
    if DELIVERY not in ("monkeypatch", "upstream"):
        raise pytest.UsageError(f"MLX_LM_EXT_DELIVERY={DELIVERY!r}: use monkeypatch or upstream")


def pytest_generate_tests(metafunc):
    if "entry" in metafunc.fixturenames:
        entries = select(load_catalog(), metafunc.config.getoption("--models"))
        metafunc.parametrize("entry", entries, ids=[e.id for e in entries], scope="session")


@pytest.fixture(scope="session", autouse=True)
def delivery():
    """Apply the monkeypatches for the session (or not), and restore upstream after."""
    if DELIVERY == "monkeypatch":
        mlx_lm_ext.apply()
    yield DELIVERY
    mlx_lm_ext.revert()


@pytest.fixture(scope="session")
def tier(request):
    tier = request.config.getoption("--tier")
    if tier == "hub" and "hub" not in (request.config.getoption("-m") or ""):
        pytest.skip("the hub tier runs with -m hub")
    return tier


@pytest.fixture(scope="session")
def model_path(entry, tier):
    if not entry.supported_by(MLX_LM_VERSION):
        pytest.skip(f"{entry.model_type} needs mlx-lm >= {entry.min_mlx_lm}; installed {MLX_LM_VERSION}")
    try:
        return resolve(entry, tier)
    except HubUnavailable as exc:
        pytest.skip(str(exc))


_loaded: dict = {}


@pytest.fixture(scope="session")
def loaded(model_path):
    """(model, tokenizer) through the real mlx_lm.load, once per model per session."""
    from mlx_lm import load

    if model_path not in _loaded:
        _loaded[model_path] = load(str(model_path))
    return _loaded[model_path]


def upstream_failure(entry, kv_bits, quantizes: bool) -> str | None:
    """The error unpatched mlx-lm raises for this case, or None where it works.

    Measured on 0.32.2 (tests/README compatibility table): any quantization of a
    sliding-window layer raises NotImplementedError(NYI); KV-shared gemma-4 layers and
    attention sinks fail after it, but NYI comes first.
    """
    if kv_bits is None or not quantizes:
        return None
    if layout.SLIDING in entry.layout:
        return NYI
    return None


def expect_upstream(entry, kv_bits, quantizes: bool):
    """Mark the running test as a strict xfail where upstream is known to fail."""
    reason = upstream_failure(entry, kv_bits, quantizes)
    if DELIVERY == "upstream" and reason:
        return pytest.mark.xfail(strict=True, reason=f"upstream mlx-lm {MLX_LM_VERSION}: {reason}")
    return None
