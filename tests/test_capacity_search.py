"""benchmarks/capacity.py's search: the most requests under a memory limit, found in few
full runs (each one is minutes of the lent GPU) and bracketed exactly."""

from __future__ import annotations

import sys

import pytest
from benchmark_scripts import BENCHMARKS, load

import mlx_lm_ext
from mlx_lm_ext.settings import KVSettings

GIB = 2**30


@pytest.fixture(scope="module")
def capacity():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        yield load("capacity")
    finally:
        sys.path.remove(str(BENCHMARKS))


def _search(capacity, peak, limit: int, weights: int, per_request: int, runs: int = 12) -> list[int]:
    """The counts the search runs against `peak(n)`, in order."""
    tries: list[dict[str, int]] = []
    n = capacity.next_count(tries, limit, weights, per_request)
    while n is not None and len(tries) < runs:
        tries.append({"requests": n, "peak_bytes": peak(n)})
        n = capacity.next_count(tries, limit, weights, per_request)
    assert n is None, tries  # bracketed within `runs`
    return [t["requests"] for t in tries]


def _most(peak, limit: int) -> int:
    return max(n for n in range(1, 10_000) if peak(n) <= limit)


MIB = 2**20
CASES = {
    # Gemma 3 270M at 4 bits under 4 GiB: 0.81 GiB of weights, 29 MiB a request, and
    # prefilling 8 prompts ~2.7 GiB over whatever the count (halving ran 112, 56, 28).
    "fixed overhead": (
        lambda n: int(0.81 * GIB + n * 29 * MIB + 2.7 * GIB),
        4 * GIB,
        int(0.81 * GIB),
        29 * MIB,
    ),
    # 16-bit batched decode materializes scores: an overhead growing with the count.
    "growing overhead": (
        lambda n: int(0.81 * GIB + n * 104 * MIB + 1.5 * GIB + n * 21 * MIB),
        8 * GIB,
        int(0.81 * GIB),
        104 * MIB,
    ),
    # Llama-3.1-8B shape at 16 bits under 80 GiB: 4 GiB a request, 5.6 GiB of prefill.
    "large requests": (lambda n: int(15 * GIB + n * 4 * GIB + 5.6 * GIB), 80 * GIB, 15 * GIB, 4 * GIB),
    # A prefill group (8 prompts) at a time: steps in the peak every 8 requests.
    "steps": (lambda n: int(GIB + n * 50 * MIB + ((n + 7) // 8) * 120 * MIB), 6 * GIB, GIB, 50 * MIB),
}


@pytest.mark.parametrize("case", list(CASES))
def test_search_brackets_the_most_that_fit_in_few_runs(capacity, case):
    peak, limit, weights, per_request = CASES[case]
    runs = _search(capacity, peak, limit, weights, per_request)
    most = _most(peak, limit)
    assert most in runs and most + 1 in runs  # one that fits, one more that does not
    assert len(runs) <= 5, runs


def test_the_bytes_only_bound_fitting_needs_no_second_run(capacity):
    """Weights and caches alone bound the count: if it fits, one more cannot."""
    runs = _search(capacity, lambda n: GIB + n * MIB, 2 * GIB, GIB, MIB)
    assert runs == [1024]


def test_nothing_fits_ends_at_one_request(capacity):
    runs = _search(capacity, lambda n: 5 * GIB + n * MIB, 4 * GIB, GIB, MIB)
    assert runs[-1] == 1 and len(runs) <= 2


@pytest.mark.parametrize("most", [12, 14, 15])
def test_a_search_started_at_the_last_count_brackets_it_in_two_runs(capacity, monkeypatch, most):
    """`--start` re-measures from the last count: one run at it and one beside it settle
    the count when it moved by one or not at all (each run is minutes of the lent GPU);
    a move further still ends bracketed."""
    weights, per_request, limit = 15 * GIB, 4 * GIB, 80 * GIB
    overhead = limit - weights - most * per_request  # `most` fits, one more does not

    def serve(model, n, context, bits, args, vocab):
        peak = weights + n * per_request + overhead
        return {"requests": n, "peak_bytes": peak, "prefill_peak_bytes": 0, "decode_peak_bytes": peak}

    monkeypatch.setattr(capacity, "serve", serve)
    args = capacity.command_line().parse_args(["--model", "llama-3.2", "--limit-gib", "80"])
    result = capacity.fit(None, None, args, weights, per_request, 0, start=15)
    counts = [t["requests"] for t in result["tries"]]
    assert counts[0] == 15 and result["bracketed"] and result["requests"] == most
    assert {most, most + 1} <= set(counts)
    assert len(counts) <= (2 if abs(most - 15) <= 1 else 4)


def test_start_takes_a_count_per_width(capacity):
    with pytest.raises(SystemExit) as exit_info:
        capacity.main(["--model", "llama-3.2", "--limit-gib", "1", "--bits", "16", "8", "--start", "3"])
    assert exit_info.value.code == 2


def test_every_request_decodes_through_a_cache_growth(capacity):
    """The decode peak counts the step where the whole batch's caches grow (one layer
    held twice while it is copied into a larger buffer): with the default --tokens the
    requests decode together long enough that it happens; with 16 tokens it did not,
    and the decode peak came out low. The growth shows as the active bytes rising by
    256 rows of every request's cache while they decode together."""
    from test_cuda_prefill import _model

    model = _model(layers=2)
    n = 6
    grown = {}
    mlx_lm_ext.apply(KVSettings(kv_group_size=64, quantized_kv_start=0))
    try:
        for tokens in (None, 16):
            # --model is only parsed: serve() runs the model handed to it
            argv = ["--model", "tiny", "--timeline", str(n), "--prefill-step-size", "128"]
            argv += [] if tokens is None else ["--tokens", str(tokens)]
            args = capacity.command_line().parse_args(argv)
            rows: list[dict] = []
            capacity.serve(model, n, 256, 8, args, 300, rows)
            together = [r["active_bytes"] for r in rows if r["generation"] == n and not r["finished"]]
            grown[tokens] = max(together) - together[0]
    finally:
        mlx_lm_ext.revert()
    block = n * capacity.kv_bytes(capacity.model_layout(model), 256, 8, 64)  # 256 rows, every request
    assert grown[None] >= block > grown[16], (grown, block)


def _result(command: str, rows: list[tuple], limit_gib: float = 80.0) -> dict:
    """A capacity.py result: (bits, [(requests, peak GiB), ...], decode tok/s of the best fit)."""
    out = []
    for bits, runs, tok_s in rows:
        tries = [{"requests": n, "peak_bytes": int(p * GIB)} for n, p in runs]
        fits = [t for t in tries if t["peak_bytes"] <= limit_gib * GIB]
        best = max(fits, key=lambda t: t["requests"], default={"requests": 0})
        best = {**best, "prefill_peak_bytes": 0, "decode_peak_bytes": best.get("peak_bytes", 0)}
        per_request = {None: 4 * GIB, 8: 2 * GIB, 4: GIB}[bits]
        row = {"bits": bits, "kv_bytes_per_request": per_request, "weights_bytes": 15 * GIB}
        out.append({**row, **best, "decode_tok_s": tok_s, "tries": tries, "bracketed": False})
    settings = {"model": "m", "machine": "gpu", "mlx_lm": "0.32.2", "context": 32768, "tokens": 256}
    settings |= {"prompt_concurrency": 8, "prefill_step_size": 2048, "limit_gib": limit_gib}
    return {**settings, "command": command, "rows": out}


def test_searches_split_over_calls_pool_per_width(capacity):
    """Each width's tries pool across calls: the count is the most that fit anywhere,
    bracketed once another call ran one more over the limit, ratios against the pooled
    16-bit row, and every try names the command that ran it."""
    first = _result("a", [(None, [(15, 79.8), (16, 84.1)], 88.0), (8, [(28, 79.4), (30, 85.9)], 790.0)])
    second = _result("b", [(8, [(29, 81.7)], 800.0), (4, [(52, 78.5), (57, 85.1), (53, 79.7)], 980.0)])
    third = _result("c", [(4, [(54, 80.9)], 1020.0)])
    merged = capacity.merge([first, second, third])
    rows = {r["bits"]: r for r in merged["rows"]}
    assert [r["bits"] for r in merged["rows"]] == [None, 8, 4]
    assert [rows[b]["requests"] for b in (None, 8, 4)] == [15, 28, 53]
    assert all(r["bracketed"] for r in merged["rows"])
    assert rows[4]["x_requests"] == pytest.approx(53 / 15)
    assert rows[4]["decode_tok_s"] == 980.0 and rows[8]["decode_tok_s"] == 790.0  # the best fit's own
    assert [t["command"] for t in rows[4]["tries"]] == ["b", "b", "b", "c"]
    assert "| 53 (54 over) |" in capacity.markdown(merged)


def test_a_width_still_open_after_pooling_says_so(capacity):
    merged = capacity.merge(
        [_result("a", [(None, [(15, 79.8)], 88.0), (4, [(52, 78.5), (57, 85.1)], 980.0)])]
    )
    rows = {r["bits"]: r for r in merged["rows"]}
    assert not rows[4]["bracketed"] and rows[4]["requests"] == 52
    assert "| 52 (57 over, search cut by --tries) |" in capacity.markdown(merged)


def test_results_of_other_settings_do_not_pool(capacity):
    with pytest.raises(ValueError, match="limit_gib"):
        capacity.merge([_result("a", [(None, [(15, 79.8)], 88.0)]), _result("b", [], limit_gib=48.0)])
