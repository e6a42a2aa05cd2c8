"""The quality sweep (report/kv_quality.py), pass keys (passkey.py) and their figures,
on the llama-3.2 and gemma-3 stand-ins (fast; the real models are in compat_tests)."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest

import mlx_lm_ext
from mlx_lm_ext.report import cli, figures, kv_quality, llamacpp, memory, passkey
from mlx_lm_ext.report.kv_quality import Choice
from mlx_lm_ext.settings import KVSettings


@pytest.fixture(scope="module")
def llama():
    from mlx_lm import load

    from mlx_lm_ext.zoo import get_entry, resolve

    mlx_lm_ext.apply()
    yield load(str(resolve(get_entry("llama-3.2"), "offline")))
    mlx_lm_ext.revert()


def _tokens(n: int) -> list[int]:
    return [(i * 7919) % 500 + 5 for i in range(n)]


def test_layer_sets_pick_the_layers_they_name():
    n = 6
    kinds = [True, True, False, True, True, False]  # sliding, sliding, global, ...
    picked = {
        s: [i for i in range(n) if Choice(4, layers=s).quantizes(i, n, kinds[i])]
        for s in kv_quality.LAYER_SETS
    }
    assert picked == {
        "all": [0, 1, 2, 3, 4, 5],
        "sliding": [0, 1, 3, 4],
        "global": [2, 5],
        "early": [0, 1, 2],
        "late": [3, 4, 5],
    }
    assert not any(Choice(None).quantizes(i, n, kinds[i]) for i in range(n))
    assert [i for i in range(n) if Choice(8, keep_sliding=True).quantizes(i, n, kinds[i])] == [2, 5]


def test_windows_lie_past_the_first_chunk():
    assert kv_quality.windows([512, 2048], 256) == [(256, 512), (1792, 2048)]
    for points, window in (([256], 256), ([500], 256), ([1024], 200)):
        with pytest.raises(ValueError):
            kv_quality.windows(points, window)


def test_a_scored_chunk_equals_decode_steps(llama):
    """The sweep scores 256 positions as one chunk; generation decodes them one at a time.
    For a quantized cache both must see the same keys: the two candidate distributions
    agree within float noise (and far closer than 4-bit is to 16-bit)."""
    from mlx_lm_ext.report.quality import decode_logprobs

    model, _ = llama
    tokens = _tokens(513)
    got = kv_quality.lockstep(model, tokens, [Choice(4)], [512], 256)[Choice(4)][0]
    # the decode path: a 256-token prefill (16-bit, then converted, as in the sweep), 256 steps
    stepped = decode_logprobs(model, tokens[:512], 256, KVSettings(4, 64, quantized_kv_start=0))
    reference = decode_logprobs(model, tokens[:512], 256, KVSettings())
    kl_steps = (mx.exp(reference) * (reference - stepped)).sum(-1)
    assert got.positions == 256
    assert abs(got.kl_mean - kl_steps.mean().item()) < 0.1 * got.kl_mean
    assert got.kl_mean > 1e-5  # 4 bits moves the stand-in measurably (it is not 16-bit twice)


def test_fewer_bits_cost_more_and_layers_add_up(llama):
    model, _ = llama
    choices = [Choice(8), Choice(4), Choice(4, layers="early"), Choice(4, layers="late")]
    got = {c: s[0] for c, s in kv_quality.lockstep(model, _tokens(513), choices, [512], 256).items()}
    assert 0 < got[Choice(8)].kl_mean < got[Choice(4)].kl_mean
    assert got[Choice(4, layers="early")].kl_mean < got[Choice(4)].kl_mean
    assert got[Choice(4, layers="late")].kl_mean < got[Choice(4)].kl_mean
    for s in got.values():
        assert 0 < s.kl_mean <= s.kl_p99 and 0 <= s.top1 <= 1 and s.ppl_16 > 1


def test_wilson_interval():
    lo, hi = passkey.wilson(20, 20)
    assert hi == 1.0 and lo == pytest.approx(0.8389, abs=1e-3)
    lo, hi = passkey.wilson(10, 20)
    assert (lo, hi) == pytest.approx((0.2993, 0.7007), abs=1e-3)
    assert passkey.wilson(0, 0) == (0.0, 1.0)


@pytest.fixture(scope="module")
def smol_tokenizer():
    from pathlib import Path

    from mlx_lm.utils import load_tokenizer

    from mlx_lm_ext.zoo import get_entry, resolve

    return load_tokenizer(Path(resolve(get_entry("smollm2-135m-instruct"), "offline")))


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_pass_key_prompts_have_the_length_and_depth_asked(smol_tokenizer, depth):
    from mlx_lm_ext.report.quality import prose

    hay = passkey.Haystack(smol_tokenizer, prose(20), 1024)
    a, b = (hay.prompt(1024, depth, k) for k in passkey.keys(2, seed=1))
    assert len(a.ids) == len(b.ids) == 1024
    assert a.split == b.split and a.ids[: a.split] == b.ids[: b.split] and a.ids != b.ids
    text = smol_tokenizer.decode(a.ids)
    assert f"The pass key is {a.key}." in text and text.count(a.key) == 2
    assert text.rstrip().endswith("<|im_start|>assistant")  # a chat turn, answered next
    at = text.index(a.key) / len(text)
    assert abs(at - depth) < 0.1


def test_bytes_per_token_match_the_memory_table_and_llamacpp_types():
    layers = [memory.LayerKV("0", "kv", 3, 64, 64), memory.LayerKV("1", "sliding", 1, 256, 256, window=512)]
    for bits in (8, 4):
        want = memory.kv_bytes(layers, 4096, bits, 64)
        assert figures.cache_bytes(layers, 4096, lambda i, s, b=bits: b, 64) == want
    # q8_0 and q4_0 (blocks of 32, a float16 scale) cost what 8 and 4 bits at group 64 do
    assert figures.llamacpp_bytes(layers, 4096, llamacpp.CACHE_TYPES["q8_0"][1]) == memory.kv_bytes(
        layers, 4096, 8, 64
    )
    assert figures.llamacpp_bytes(layers, 4096, 2.0) == memory.kv_bytes(layers, 4096, None, 64)
    # keeping the sliding layer at 16 bits costs its window, not the context
    kept = figures.cache_bytes(layers, 4096, lambda i, sliding: None if sliding else 8, 64)
    assert kept == 4096 * layers[0].row_bytes(8, 64) + 512 * layers[1].row_bytes(None, 64)


def _row(label, b, kl):
    scores = kv_quality.Scores(512, 256, kl, kl, 1.0, 10.0, 10.0)
    return figures.Row(**vars(scores), label=label, bytes_per_token=b, ratio=b / 100)


def test_pareto_front_keeps_only_undominated_settings():
    rows = [
        _row("a", 10, 0.5),
        _row("b", 20, 0.1),
        _row("c", 30, 0.2),
        _row("d", 40, 0.01),
        _row("e", 20, 0.3),
    ]
    assert [r.label for r in figures.pareto(rows)] == ["a", "b", "d"]


def test_llamacpp_scores_match_ours_on_the_same_log_probs():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 256, 50))
    ref, cand = (x - np.log(np.exp(x).sum(-1, keepdims=True)) for x in logits)
    tokens = [int(t) for t in rng.integers(0, 50, size=600)]
    got = llamacpp._scores(ref, cand, tokens, 256, 512)
    ours = kv_quality._position_figures(
        mx.array(ref, dtype=mx.float32), mx.array(cand, dtype=mx.float32), mx.array(tokens[257:513])
    )
    assert got.kl_mean == pytest.approx(float(np.array(ours)[:, 0].mean()), rel=1e-4)
    assert got.top1 == pytest.approx(float(np.array(ours)[:, 1].mean()))
    assert np.log(got.ppl) == pytest.approx(float(np.array(ours)[:, 3].mean()), rel=1e-4)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--measure", "quality,speed"], "speed is measured alone"),
        (["--measure", "kl"], "measure speed, quality or recall"),
        (["--measure", "quality", "--lengths", "500"], "multiples of 256"),
        (["--measure", "quality", "--groups", "48"], "--groups 48"),
        (["--measure", "recall", "--depths", "120"], "--depths within 0-100"),
        (["--measure", "quality", "--llamacpp-gguf", "/no/such.gguf"], "no such file"),
    ],
)
def test_bad_measure_flags_exit_2_before_loading(capsys, argv, message):
    with pytest.raises(SystemExit) as done:
        cli.main(["--model", "/no/such/model", *argv])
    assert done.value.code == 2
    assert message in capsys.readouterr().err


def test_report_writes_tables_json_and_pngs(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "rep"
    argv = [
        "--model",
        "llama-3.2",
        "--offline",
        "--measure",
        "quality,recall",
        "--bits",
        "8",
        "--lengths",
        "512",
    ]
    argv += ["--recall-lengths", "256", "--depths", "50", "--keys", "1", "--no-llamacpp", "--out", str(out)]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "| 8-bit g64 | " in printed and "pass key recall" in printed
    report = json.loads((out / "report.json").read_text())
    assert {r["label"] for r in report["quality"]} == {
        "8-bit g64"
    }  # per layer kind at --per-layer-bits (4) only
    assert set(report["recall"]) == {"16-bit", "8-bit g64"}
    for png in ("kl_vs_bytes.png", "recall.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (out / "recall.png").unlink()
    assert cli.main(["--replot", str(out / "report.json")]) == 0
    assert (out / "recall.png").exists()


def test_a_group_that_does_not_divide_the_head_dim_exits_2_before_loading(capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(
            ["--model", "smollm2-135m-instruct", "--offline", "--measure", "quality", "--groups", "32,128"]
        )
    assert done.value.code == 2
    assert "--groups 128: does not divide the head dim(s) [64]" in capsys.readouterr().err
