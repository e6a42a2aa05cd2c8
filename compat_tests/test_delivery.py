"""The two deliveries are one behaviour: on an mlx-lm built from patches/, no monkeypatch
is needed any more (feature detection finds every fix in place), and the rest of the suite
passes with the monkeypatches disabled exactly as with them applied."""

from __future__ import annotations

import pytest
from conftest import DELIVERY

from mlx_lm_ext.cli import kv_flags
from mlx_lm_ext.fixes import FIXES
from mlx_lm_ext.fixes.server_kv_flags import upstream_server_flags

# mlx-lm-ext's own option, not proposed upstream (patches/README.md).
NOT_UPSTREAMED = ["--keep-sliding-kv"]


@pytest.mark.skipif(DELIVERY != "patches", reason="checks an mlx-lm built from patches/")
def test_patched_mlx_lm_needs_no_monkeypatch():
    needed = sorted(f.name for f in FIXES if f.needed())
    assert needed in ([], ["server-kv-flags"]), needed
    upstream = upstream_server_flags()
    assert [flag for flag, _ in kv_flags() if flag not in upstream] == NOT_UPSTREAMED


@pytest.mark.skipif(DELIVERY != "upstream", reason="checks unpatched mlx-lm")
def test_unpatched_mlx_lm_needs_the_fixes():
    needed = {f.name for f in FIXES if f.needed()}
    assert {"quantized-rotating-kv-cache", "hybrid-quantize", "max-kv-size"} <= needed
