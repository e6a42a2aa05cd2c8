"""The figures users choose --kv-bits by, as tests on the real models (CPU tier).

Quality: teacher-forced on English prose (report/kv_quality.py), KL(16-bit || quantized)
at 8 and 4 bits, and where measured at 8-bit keys with 4-bit values (K8V4) and 4 bits
with rotated keys (4rot), each at most its measured figure times MARGIN (models.yaml
`real.choose.quality`, with the measurement beside it); K8V4 under half the KL of 4 bits
and 4rot at most a third of it where measured so (issue #22's goals: SmolLM2 meets
both; on Gemma rotation leaves 0.64x, so there 4rot must stay under 4 bits' KL / 1.2).
Recall: pass keys hidden in prose (report/passkey.py); 16-bit must reach its measured
count (else the comparison says nothing), 8-bit must answer within one key of 16-bit,
4-bit at least its own measured count. By default one length with few keys; under -m
slow, 20 keys (4 at each of 5 depths) at every CPU length, as `report --measure recall`
runs them.
"""

from __future__ import annotations

import pytest

from mlx_lm_ext.report import kv_quality, passkey
from mlx_lm_ext.report.kv_quality import Choice
from mlx_lm_ext.report.quality import prose

MARGIN = 1.5  # bound = measured x MARGIN: room for the summation-order noise between machines
DEPTHS = [0.0, 0.25, 0.5, 0.75, 1.0]
# models.yaml's names for the key/value formats (--kv-key-bits 8 --kv-value-bits 4;
# --kv-bits 4 --kv-rotate)
FORMATS = {"K8V4": Choice(8, value_bits=4), "4rot": Choice(4, rotate="keys")}


def _choose(real_entry) -> dict:
    if "choose" not in real_entry.checks:
        pytest.skip(f"{real_entry.id}: no `real.choose` figures in models.yaml")
    return real_entry.checks["choose"]


@pytest.mark.parametrize("length", [512, pytest.param(2048, marks=pytest.mark.slow)])
def test_quantized_kl_on_prose_is_within_its_measured_bound(real_entry, real_model, length, record_property):
    measured = _choose(real_entry)["quality"][length]
    model, tokenizer = real_model
    tokens = tokenizer.encode(prose(400))[: length + 1]
    choices = {8: Choice(8), 4: Choice(4)}
    choices.update({k: FORMATS[k] for k in FORMATS if k in measured})
    got = kv_quality.lockstep(model, tokens, list(choices.values()), [length], window=256)
    kl = {}
    for name, choice in choices.items():
        s = got[choice][0]
        kl[name] = s.kl_mean
        record_property(f"kl_{name}", s.kl_mean)
        print(
            f"\n{real_entry.id} {length}: {choice.label} KL mean {s.kl_mean:.2e} "
            f"p99 {s.kl_p99:.2e} top-1 {s.top1:.3f}"
        )
        assert s.kl_mean <= measured[name] * MARGIN, (
            f"{choice.label} KL {s.kl_mean:.3e}, measured {measured[name]:.3e}"
        )
    assert kl[8] < kl[4] / 10
    if "K8V4" in kl:
        assert kl["K8V4"] < kl[4] / 2
    if "4rot" in kl:  # the goal (a third) where the measurement met it; better, everywhere
        assert kl["4rot"] <= kl[4] / (3 if measured["4rot"] <= measured[4] / 3 else 1.2)


RECALL_CASES = [
    pytest.param("default", id="default"),
    pytest.param(1024, id="1024", marks=pytest.mark.slow),
    pytest.param(2048, id="2048", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("case", RECALL_CASES)
def test_8bit_recalls_pass_keys_as_16bit_does(real_entry, real_model, case, record_property):
    figures = _choose(real_entry)["passkey"]
    if case == "default":
        if "default" not in figures:
            pytest.skip(f"{real_entry.id}: recall runs under -m slow only (see models.yaml)")
        length, depths, keys, measured = (
            figures["default"][k] for k in ("length", "depths", "keys", "measured")
        )
        depths = [d / 100 for d in depths]
    else:
        length, depths, keys, measured = case, DEPTHS, 4, figures[case]
    model, tokenizer = real_model
    choices = [Choice(None), Choice(8), Choice(4)]
    cells = passkey.sweep(model, tokenizer, prose(400), choices, [length], depths, keys)
    count = {c.bits or 16: sum(x.correct for x in cells[c]) for c in choices}
    asked = keys * len(depths)
    record_property("recall", count)
    print(f"\n{real_entry.id} {length}: pass keys recalled of {asked}: {count}")
    assert count[16] >= measured[16], f"16-bit recalled {count[16]} of {asked}; measured {measured[16]}"
    assert abs(count[8] - count[16]) <= 1
    assert count[4] >= measured[4]
