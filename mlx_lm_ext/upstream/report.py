"""What a verification run proved, as data and as the markdown patches/README.md links to."""

from __future__ import annotations

from .replaced import split_regressions
from .verify import Run

# Tests that check one delivery and skip in the others: test_delivery.py, and
# test_against_upstream.py (ours against upstream's, only where both are installed).
DELIVERY_SPECIFIC = ("compat_tests.test_delivery::", "compat_tests.test_against_upstream::")


def _short(message: str) -> str:
    first = (message or "").strip().splitlines()[0] if (message or "").strip() else ""
    return first[:160].replace("|", "/")


# Both deliveries run the same arithmetic, so a figure both record must agree to within
# float reordering; a difference beyond this is a behaviour the series does not carry.
FIGURE_RTOL = 1e-3


def figure_mismatch(mono: Run, diffs: Run) -> dict[str, dict[str, list[float]]]:
    """Per test, the figures (KL, top-1, bytes) both deliveries recorded and that differ."""
    out: dict[str, dict[str, list[float]]] = {}
    for test in sorted(set(mono.figures) & set(diffs.figures)):
        a, b = mono.figures[test], diffs.figures[test]
        differ = {
            name: [a[name], b[name]]
            for name in sorted(set(a) & set(b))
            if abs(a[name] - b[name]) > FIGURE_RTOL * max(abs(a[name]), abs(b[name])) + 1e-12
        }
        if differ:
            out[test] = differ
    return out


def compare(runs: dict[str, Run], replaced: dict[str, str | None] | None = None) -> dict:
    """The verdicts: upstream regressions, added tests, and delivery agreement.

    `replaced`: the tests the series removes, old -> new (replaced.replaced_tests); one
    that passed unpatched and is gone patched is listed as replaced, not regressed.
    """
    before, after = runs["upstream-unpatched"], runs["upstream-patched"]
    passed_before = before.ids("passed")
    lost = sorted(passed_before - after.ids("passed"))
    regressions, moved = split_regressions(lost, set(after.outcomes), replaced or {})
    added = sorted(set(after.outcomes) - set(before.outcomes))
    both_failed = sorted(before.ids("failed") & after.ids("failed"))
    mono, diffs = runs["compat-monkeypatch"], runs["compat-patches"]
    mismatch = sorted(
        t
        for t in set(mono.outcomes) | set(diffs.outcomes)
        if mono.outcomes.get(t) != diffs.outcomes.get(t) and not t.startswith(DELIVERY_SPECIFIC)
    )
    result = {
        "counts": {label: run.counts() for label, run in runs.items()},
        "upstream_regressions": regressions,
        "upstream_replaced": moved,
        "upstream_added": {t: after.outcomes[t] for t in added},
        "upstream_fixed": sorted(before.ids("failed") & after.ids("passed")),
        "upstream_failing_on_both": {t: _short(after.messages.get(t, "")) for t in both_failed},
        "compat_failures": {t: _short(diffs.messages[t]) for t in sorted(diffs.ids("failed"))},
        "compat_mismatch": {t: [mono.outcomes.get(t), diffs.outcomes.get(t)] for t in mismatch},
        "compat_figure_mismatch": figure_mismatch(mono, diffs),
        "compat_figures_compared": len(set(mono.figures) & set(diffs.figures)),
    }
    result["ok"] = bool(
        runs["compat-patches"].outcomes
        and not result["upstream_regressions"]
        and all(o == "passed" for o in result["upstream_added"].values())
        and not result["compat_failures"]
        and not result["compat_mismatch"]
        and not result["compat_figure_mismatch"]
    )
    return result


def markdown(release: str, applied: list[str], result: dict) -> str:
    counts = result["counts"]
    lines = [
        f"# Patch series on mlx-lm {release}",
        "",
        f"Verdict: **{'green' if result['ok'] else 'red'}**. Applied: {', '.join(applied)}.",
        "",
        "| run | passed | failed | skipped |",
        "|---|---|---|---|",
    ]
    for label, c in counts.items():
        lines.append(f"| {label} | {c.get('passed', 0)} | {c.get('failed', 0)} | {c.get('skipped', 0)} |")
    lines += [
        "",
        f"Upstream tests that pass unpatched and not patched: {len(result['upstream_regressions'])}",
    ]
    lines += [f"- {t}" for t in result["upstream_regressions"]]
    moved = result.get("upstream_replaced", {})
    lines += ["", f"Upstream tests the series replaces (old -> new): {len(moved)}"]
    lines += [f"- {old} -> {new or 'removed'}" for old, new in moved.items()]
    lines += ["", f"Tests the series adds to upstream's tests/: {len(result['upstream_added'])}"]
    lines += [f"- {t}: {o}" for t, o in result["upstream_added"].items()]
    lines += [
        "",
        f"Compat tests whose outcome differs between the deliveries: {len(result['compat_mismatch'])}",
    ]
    lines += [f"- {t}: monkeypatch {a}, patches {b}" for t, (a, b) in result["compat_mismatch"].items()]
    figures = result.get("compat_figure_mismatch", {})
    lines += [
        "",
        f"Recorded figures (KL, top-1, bytes) compared between the deliveries: "
        f"{result.get('compat_figures_compared', 0)} tests; differing by more than {FIGURE_RTOL:g}: "
        f"{len(figures)}",
    ]
    lines += [
        f"- {t} {name}: monkeypatch {a:.6g}, patches {b:.6g}"
        for t, props in figures.items()
        for name, (a, b) in props.items()
    ]
    lines += ["", f"Compat failures with the patches alone: {len(result['compat_failures'])}"]
    lines += [f"- {t}: {m}" for t, m in result["compat_failures"].items()]
    both = result["upstream_failing_on_both"]
    lines += [
        "",
        f"Upstream tests failing on both trees (outside the series): {len(both)}",
        "",
        "| test | error on both trees |",
        "|---|---|",
    ]
    lines += [f"| {t} | {m} |" for t, m in both.items()]
    return "\n".join(lines) + "\n"
