"""patches/: one patch per fix, applying cleanly to the release it names, reproducible,
and failures reported by patch, file and hunk."""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

import pytest

from mlx_lm_ext.fixes import FIXES
from mlx_lm_ext.upstream import series

# mlx-lm 0.32.0 added the kv_bits check to _is_batchable itself: no patch carries it.
# The decode tail serves the CUDA kernels, which the series does not carry.
NO_PATCH = {"batchable-fallback", "quantized-decode-tail", "cuda-prefill"}


def test_every_fix_has_its_patch_and_names_it():
    names, release = series.read_series()
    assert release is not None
    slugs = [series.slug(n) for n in names]
    assert sorted(slugs) == sorted(s for f in FIXES if f.name not in NO_PATCH for s in f.patch_slugs)
    for fix in FIXES:
        doc = sys.modules[type(fix).__module__].__doc__
        if fix.name in NO_PATCH:
            assert "No patch file" in doc
            continue
        for patch in fix.patch_slugs:
            file = names[slugs.index(patch)]
            assert f"patches/{file}" in doc, f"{fix.name}'s docstring does not name {file}"
            assert (series.PATCHES / file).exists()


def test_patches_are_format_patch_with_tests_and_reviewable_size():
    names, _ = series.read_series()
    for name in names:
        text = (series.PATCHES / name).read_text()
        assert text.startswith("From 0000000000000000000000000000000000000000 ")
        assert re.search(r"^Subject: \[PATCH \d+/\d+\] ", text, re.M)
        # The series' fixed author and date, whoever committed (refresh changes only what changed).
        assert text.split("\n")[1:3] == [
            f"From: {series.AUTHOR[0]} <{series.AUTHOR[1]}>",
            "Date: Mon, 23 Nov 2026 00:00:00 +0000",
        ], name
        assert re.search(r"^diff --git a/tests/", text, re.M), f"{name} adds no upstream test"
        changed = sum(1 for line in text.splitlines() if line[:1] in "+-" and line[:3] not in ("+++", "---"))
        # A reviewable PR: 0007 (a new cache class, its helpers and test, in black's 88
        # columns) is the largest at ~320 lines; a patch past 350 should be split.
        assert changed <= 350, f"{name}: {changed} changed lines"


@pytest.fixture(scope="module")
def release_tree(tmp_path_factory):
    """The series' release sdist under git (downloaded from the package index)."""
    _, release = series.read_series()
    return series.base_tree(release, tmp_path_factory.mktemp("sdist"))


def test_series_applies_to_its_release_and_exports_identically(release_tree, tmp_path):
    names, release = series.read_series()
    applied, failures = series.check(release_tree)
    assert failures == [] and applied == names
    tree = tmp_path / "tree"
    shutil.copytree(release_tree, tree)
    series.apply(tree)
    out = tmp_path / "patches"
    out.mkdir()
    (out / "series").write_text((series.PATCHES / "series").read_text())
    series.export(tree, release, names, patches=out)
    for name in [*names, "series"]:
        assert (out / name).read_text() == (series.PATCHES / name).read_text(), name


def test_a_patch_that_does_not_apply_names_patch_file_and_hunk(release_tree, tmp_path):
    tree = tmp_path / "tree"
    shutil.copytree(release_tree, tree)
    server = tree / "mlx_lm" / "server.py"
    # Upstream rewords the line that 0005-server-kv-flags anchors its flag on.
    text = server.read_text().replace(
        'parser = argparse.ArgumentParser(description="MLX Http Server.")',
        'parser = argparse.ArgumentParser(description="MLX HTTP server")',
    )
    server.write_text(text)
    series.git(tree, "commit", "-qam", "upstream moves on")
    applied, failures = series.check(tree)
    # 0009 builds on 0005's server lines (BatchGenerator's max_kv_size), and 0011-0013,
    # 0015-0017 on its flag checks, so they fail too, and 0018-0023 on those files as
    # 0017 and 0009 leave them; the others still apply.
    assert [f.patch for f in failures] == [
        "0005-server-kv-flags.patch",
        "0009-batched-quantized-kv.patch",
        "0011-request-limits.patch",
        "0012-client-disconnect.patch",
        "0013-server-lifecycle.patch",
        "0015-kv-value-bits.patch",
        "0016-kv-rotate.patch",
        "0017-prompt-cache-bits.patch",
        "0018-batch-keep-ring.patch",
        "0019-batch-keep-ring-long-prompts.patch",
        "0020-batch-keep-ring-membership.patch",
        "0021-batch-keep-ring-quantized.patch",
        "0022-batch-handoff.patch",
        "0023-prefill-reserve.patch",
    ]
    assert "0006-request-errors.patch" in applied
    (file, line, hunk), *_ = failures[0].hunks
    assert file == "mlx_lm/server.py" and line and hunk.startswith("@@ ")
    assert "0005-server-kv-flags.patch does not apply" in str(failures[0])


def test_slug():
    assert series.slug("0003-quantized-attention.patch") == "quantized-attention"
    assert Path(series.PATCHES / "series").exists()


def _run(label, outcomes):
    from mlx_lm_ext.upstream.verify import Run

    return Run(label, dict(outcomes), {t: f"{o} because" for t, o in outcomes.items()})


def test_verdict_catches_regressions_failed_additions_and_delivery_mismatch():
    from mlx_lm_ext.upstream.report import compare, markdown

    good = {
        "upstream-unpatched": _run("u", {"a": "passed", "b": "failed"}),
        "upstream-patched": _run("p", {"a": "passed", "b": "failed", "new": "passed"}),
        "compat-monkeypatch": _run(
            "m", {"x": "passed", "y": "skipped", "compat_tests.test_delivery::t": "skipped"}
        ),
        "compat-patches": _run(
            "d", {"x": "passed", "y": "skipped", "compat_tests.test_delivery::t": "passed"}
        ),
    }
    result = compare(good)
    assert result["ok"] and result["upstream_failing_on_both"] == {"b": "failed because"}
    assert "Verdict: **green**" in markdown("0.32.2", ["0001-x.patch"], result)

    bad = dict(good, **{"upstream-patched": _run("p", {"a": "failed", "b": "failed", "new": "passed"})})
    assert compare(bad)["upstream_regressions"] == ["a"] and not compare(bad)["ok"]
    bad = dict(good, **{"upstream-patched": _run("p", {"a": "passed", "b": "failed", "new": "failed"})})
    assert not compare(bad)["ok"]
    bad = dict(
        good,
        **{
            "compat-patches": _run(
                "d", {"x": "passed", "y": "passed", "compat_tests.test_delivery::t": "passed"}
            )
        },
    )
    assert compare(bad)["compat_mismatch"] == {"y": ["skipped", "passed"]} and not compare(bad)["ok"]


def test_verdict_compares_the_figures_both_deliveries_record(tmp_path):
    """Passing is not enough: a patch that keeps every test green but answers worse
    (a KL or top-1 the monkeypatch does not give) turns the verdict red."""
    from mlx_lm_ext.upstream.report import compare, markdown
    from mlx_lm_ext.upstream.verify import parse_junit

    def junit(kl: str, top1: str):
        path = tmp_path / f"{kl}-{top1}.xml"
        path.write_text(
            '<testsuites><testsuite><testcase classname="compat_tests.test_correctness" name="t[8]">'
            f'<properties><property name="kl_mean" value="{kl}"/><property name="top1" value="{top1}"/>'
            '<property name="model" value="llama-3.2"/></properties></testcase></testsuite></testsuites>'
        )
        return parse_junit("run", path)

    upstream = {
        "upstream-unpatched": _run("u", {"a": "passed"}),
        "upstream-patched": _run("p", {"a": "passed"}),
    }
    mono, test = junit("1.4e-05", "0.96875"), "compat_tests.test_correctness::t[8]"
    assert mono.figures == {test: {"kl_mean": 1.4e-05, "top1": 0.96875}}
    same = compare(
        {**upstream, "compat-monkeypatch": mono, "compat-patches": junit("1.40001e-05", "0.96875")}
    )
    assert same["ok"] and same["compat_figures_compared"] == 1
    worse = compare({**upstream, "compat-monkeypatch": mono, "compat-patches": junit("4.7e-05", "0.9375")})
    assert not worse["ok"]
    assert worse["compat_figure_mismatch"] == {
        test: {"kl_mean": [1.4e-05, 4.7e-05], "top1": [0.96875, 0.9375]}
    }
    assert "kl_mean: monkeypatch 1.4e-05, patches 4.7e-05" in markdown("0.32.2", [], worse)


RENAMING_DIFF = """\
diff --git a/tests/test_server.py b/tests/test_server.py
--- a/tests/test_server.py
+++ b/tests/test_server.py
@@ -688,9 +688,9 @@ class TestServerKVCacheQuantization(unittest.TestCase):
         cls.server_thread.join()
-    def test_quantized_kv_disables_batching(self):
+    def test_quantized_kv_batches(self):
         args = type("args", (object,), {"seed": None})
@@ -900,6 +900,3 @@ def helper():
-    def test_gone(self):
-        pass
"""


def test_tests_the_series_replaces_are_listed_not_counted_as_regressions(tmp_path):
    from mlx_lm_ext.upstream.replaced import replaced_tests
    from mlx_lm_ext.upstream.report import compare, markdown

    patch = tmp_path / "0001-x.patch"
    patch.write_text(RENAMING_DIFF)
    old = "tests.test_server.TestServerKVCacheQuantization::test_quantized_kv_disables_batching"
    new = "tests.test_server.TestServerKVCacheQuantization::test_quantized_kv_batches"
    replaced = replaced_tests([patch])
    assert replaced == {old: new, "tests.test_server.TestServerKVCacheQuantization::test_gone": None}
    compat = {"compat-monkeypatch": _run("m", {"x": "passed"}), "compat-patches": _run("d", {"x": "passed"})}
    runs = dict(
        compat,
        **{
            "upstream-unpatched": _run("u", {old: "passed", "a": "passed"}),
            "upstream-patched": _run("p", {new: "passed", "a": "passed"}),
        },
    )
    assert compare(runs)["upstream_regressions"] == [old]  # without the diffs: red
    result = compare(runs, replaced)
    assert result["ok"] and result["upstream_regressions"] == [] and result["upstream_replaced"] == {old: new}
    assert f"- {old} -> {new}" in markdown("0.32.2", ["0001-x.patch"], result)
    # A replaced test that still exists patched and fails is a regression all the same.
    runs["upstream-patched"] = _run("p", {old: "failed", new: "passed", "a": "passed"})
    assert compare(runs, replaced)["upstream_regressions"] == [old] and not compare(runs, replaced)["ok"]


def test_the_committed_report_covers_exactly_the_series():
    import json

    names, release = series.read_series()
    results = series.PATCHES.parent / "benchmarks" / "results" / "patches"
    report = json.loads((results / f"{release}.json").read_text())
    assert report["applied"] == names, "re-run `nox -s patches`: the committed report is stale"
    assert f"Applied: {', '.join(names)}." in (results / f"{release}.md").read_text()
    assert report["ok"], "the committed report is red"
