"""The compatibility suite: every test is parametrized by models.yaml entry id.

Options:
  --models gemma-4,qwen3-next   ids matching any substring (default: every stand-in; the
                                real models run test_real_models.py, and the whole suite
                                when named here)
  --tier offline|hub            offline stand-ins (default) or the real hub models
  --soak short|full             test_reliability's counts: short (default, CI) or full (nox -s soak)
  --soak-report PATH            write test_reliability's figures there as JSON
Environment:
  MLX_LM_EXT_DELIVERY=monkeypatch (default) applies mlx_lm_ext's fixes;
  MLX_LM_EXT_DELIVERY=upstream runs unpatched mlx-lm, where known upstream failures are
  strict xfails, so a release that fixes one flips the test.
  MLX_LM_EXT_DELIVERY=patches applies no monkeypatch and serves with `mlx_lm.server`:
  for an mlx-lm built from patches/ (python -m mlx_lm_ext.upstream apply), where every
  test must pass exactly as with the monkeypatches.
"""

from __future__ import annotations

import contextlib
import os
from importlib.metadata import version

import pytest

import mlx_lm_ext
from mlx_lm_ext import layout
from mlx_lm_ext.zoo import HubUnavailable, load_catalog, resolve, select

DELIVERIES = ("monkeypatch", "upstream", "patches")
DELIVERY = os.environ.get("MLX_LM_EXT_DELIVERY", "monkeypatch")
# The server a delivery runs: ours (monkeypatches applied) or the installed mlx-lm's own.
SERVER_MODULE = "mlx_lm.server" if DELIVERY == "patches" else "mlx_lm_ext.server"
SERVES_KV_FLAGS = DELIVERY != "upstream"
MLX_LM_VERSION = version("mlx-lm")
NYI = "RotatingKVCache Quantization NYI"


def pytest_addoption(parser):
    parser.addoption("--models", default=None, help="models.yaml ids to run (substrings, comma-separated)")
    parser.addoption("--tier", default="offline", choices=["offline", "hub"], help="model tier")
    parser.addoption("--recall-json", default=None, help="write the recall results to this JSON file")
    parser.addoption("--soak", default="short", choices=["short", "full"], help="test_reliability's counts")
    parser.addoption("--soak-report", default=None, help="write test_reliability's figures to this JSON file")


def pytest_configure(config):
    if DELIVERY not in DELIVERIES:
        raise pytest.UsageError(f"MLX_LM_EXT_DELIVERY={DELIVERY!r}: use one of {', '.join(DELIVERIES)}")


def pytest_generate_tests(metafunc):
    """`entry`: the stand-ins, or every entry --models names (real ones included);
    `real_entry`: the real models (converted from PyPI packages), or those --models names."""
    wanted = metafunc.config.getoption("--models")
    chosen = select(load_catalog(), wanted)
    if "entry" in metafunc.fixturenames:
        entries = chosen if wanted else [e for e in chosen if not e.real]
        metafunc.parametrize("entry", entries, ids=[e.id for e in entries], scope="session")
    if "real_entry" in metafunc.fixturenames:
        entries = [e for e in chosen if e.real]
        metafunc.parametrize("real_entry", entries, ids=[e.id for e in entries], scope="session")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Under --tier hub, every test that runs on a tier's model is a `hub` test, so that
    `-m hub --tier hub` selects them (before the -m filter runs)."""
    if config.getoption("--tier") != "hub":
        return
    for item in items:
        if "tier" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.hub)


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


def skip_unless_supported(entry) -> None:
    """Skip, with the reason, where the installed release lacks the entry's architecture."""
    if not entry.supported_by(MLX_LM_VERSION):
        pytest.skip(f"{entry.model_type} needs mlx-lm >= {entry.min_mlx_lm}; installed {MLX_LM_VERSION}")


@pytest.fixture(scope="session")
def model_path(entry, tier):
    skip_unless_supported(entry)
    try:
        return resolve(entry, tier)
    except HubUnavailable as exc:
        if explicitly_offline():
            pytest.skip(f"{exc} (HF_HUB_OFFLINE=1: only models already in the hub cache run)")
        pytest.fail(f"{exc}\nthe hub tier needs the hub; set HF_HUB_OFFLINE=1 to run only cached models")


def explicitly_offline() -> bool:
    """The user said the hub is out of reach (huggingface_hub's own switch): a hub-tier
    model missing from the cache skips. Otherwise a download that fails is a failure, so
    `-m hub` with no network is red, never green with everything skipped."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


@pytest.fixture(scope="session")
def real_path(real_entry):
    skip_unless_supported(real_entry)
    return resolve(real_entry, "offline")


@pytest.fixture(scope="session")
def real_model(real_path):
    return load_once(real_path)


_loaded: dict = {}


def load_once(path):
    """(model, tokenizer) through the real mlx_lm.load, once per folder per session."""
    from mlx_lm import load

    if path not in _loaded:
        _loaded[path] = load(str(path))
    return _loaded[path]


@pytest.fixture(scope="session")
def loaded(model_path):
    return load_once(model_path)


def upstream_failure(entry, kv_bits, quantizes: bool, bounded: bool = False) -> str | None:
    """The error unpatched mlx-lm raises for this case, or None where it works.

    Measured on 0.29.1-0.32.2 (`nox -s baseline`, compat_tests/README.md baseline table): any
    quantization of a sliding-window layer raises NotImplementedError(NYI); KV-shared
    gemma-4 layers and attention sinks fail after it, but NYI comes first. A bounded cache
    is a RotatingKVCache on every layer (where the bound is honoured at all), so
    quantizing it raises NYI on every family.
    """
    if kv_bits is None or not quantizes:
        return None
    if bounded:
        return f"{NYI} (or, for models defining make_cache, max_kv_size ignored)"
    if layout.SLIDING in entry.layout:
        return NYI
    return None


@contextlib.contextmanager
def unpatched():
    """The installed mlx-lm exactly as upstream ships it, for the block: the monkeypatch
    delivery's fixes are reverted, then applied again."""
    names = mlx_lm_ext.applied()
    mlx_lm_ext.revert()
    try:
        yield
    finally:
        if names:
            mlx_lm_ext.apply(only=names)


def expect_upstream(entry, kv_bits, quantizes: bool, bounded: bool = False):
    """Mark the running test as a strict xfail where upstream is known to fail."""
    reason = upstream_failure(entry, kv_bits, quantizes, bounded)
    if DELIVERY == "upstream" and reason:
        return pytest.mark.xfail(strict=True, reason=f"upstream mlx-lm {MLX_LM_VERSION}: {reason}")
    return None


def pytest_terminal_summary(terminalreporter, config):
    """The recall table (model x context x bits -> recall), and its JSON if asked."""
    rows = []
    for status in ("passed", "failed"):
        for rep in terminalreporter.stats.get(status, []):
            props = dict(getattr(rep, "user_properties", []))
            if "recall_rate" in props and rep.when == "call":
                rows.append(
                    {k.removeprefix("recall_"): v for k, v in props.items() if k.startswith("recall_")}
                )
    if not rows:
        return
    rows.sort(key=lambda r: (r["model"], r["context"], -r["bits"]))
    terminalreporter.section(f"recall (mlx-lm {MLX_LM_VERSION}, {DELIVERY})")
    terminalreporter.line("| model | tier | context | bits | recall |")
    terminalreporter.line("|---|---|---|---|---|")
    for r in rows:
        terminalreporter.line(
            f"| {r['model']} | {r['tier']} | {r['context']} | {r['bits']} | {r['rate']:.0%} |"
        )
    path = config.getoption("--recall-json")
    if path:
        import json

        payload = {"mlx_lm": MLX_LM_VERSION, "delivery": DELIVERY, "results": rows}
        with open(path, "w") as fh:
            json.dump(payload, fh, indent=1)
