"""How peaked a model's cached keys and values are, per quantization group, with and without
the Hadamard rotation of `--kv-rotate`.

    python benchmarks/key_outliers.py smollm2-135m-instruct gemma-3-270m

The crest factor of a group (max |x| over its dims / their rms) sets how much of a
quantized group's range one value takes: a group of Gaussian values has ~2.5 at 64 dims,
one outlier dim raises it. Rotation helps 4-bit keys only as far as it lowers it. Keys
and values come from a 16-bit cache after 512 tokens of the zoo's English prose, as
stored (keys after RoPE); the mean is over tokens, heads and groups, then layers.
"""

from __future__ import annotations

import argparse

import mlx.core as mx
from mlx_lm import load
from mlx_lm.models.cache import make_prompt_cache

from mlx_lm_ext.caches.kv_format import hadamard
from mlx_lm_ext.report.memory import model_source
from mlx_lm_ext.report.quality import prose


def crest(x: mx.array, group: int) -> float:
    """Mean over groups of max |x| / rms(x), the last dim cut into groups."""
    g = x.astype(mx.float32).reshape(*x.shape[:-1], -1, group)
    return (mx.abs(g).max(-1) / mx.sqrt((g * g).mean(-1))).mean().item()


def measure(name: str, tokens: int, group: int) -> dict[str, list[float]]:
    """Per layer crest factors of keys and values, plain and rotated."""
    model, tokenizer = load(model_source(name, offline=True)[1])
    cache = make_prompt_cache(model)
    model(mx.array(tokenizer.encode(prose(400))[:tokens])[None], cache=cache)
    out: dict[str, list[float]] = {}
    for c in cache:
        for kind, x in (("keys", c.keys[..., : c.offset, :]), ("values", c.values[..., : c.offset, :])):
            out.setdefault(kind, []).append(crest(x, group))
            out.setdefault(f"{kind} rotated", []).append(crest(hadamard(x), group))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="models.yaml ids (real models convert offline)")
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--group", type=int, default=64)
    args = parser.parse_args()
    print(f"| model | {' | '.join(('keys', 'keys rotated', 'values', 'values rotated'))} |")
    print("|---|---|---|---|---|")
    for name in args.models:
        got = measure(name, args.tokens, args.group)
        cells = [f"{sum(v) / len(v):.2f} (max {max(v):.2f})" for v in got.values()]
        print(f"| {name} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
