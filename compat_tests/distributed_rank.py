"""One rank of a distributed generation (run by test_distributed.py under mlx.launch).

    mlx.launch --backend ring -n 2 -- python compat_tests/distributed_rank.py MODEL --kv-bits 8

Loads MODEL as mlx-lm's server does across ranks (`sharded_load`: tensor parallel, or the
layers split with --pipeline), or whole in one process; generates greedily from a fixed
prompt with the cache quantized from token 0; prints one JSON line with this rank's
tokens and its cache: bytes of its arrays, and each attention layer's class.
"""

from __future__ import annotations

import argparse
import json
import os

import mlx.core as mx

PROMPT = "The cache keeps the keys and the values of every token the model has seen. " * 6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--kv-bits", type=int, default=None)
    parser.add_argument("--max-kv-size", type=int, default=None)
    parser.add_argument("--pipeline", action="store_true")
    parser.add_argument("--tokens", type=int, default=8)
    parser.add_argument("--prompt", action="append", help="also generate from these (texts only)")
    args = parser.parse_args()

    if os.environ.get("MLX_LM_EXT_DELIVERY", "monkeypatch") == "monkeypatch":
        import mlx_lm_ext
        from mlx_lm_ext.settings import KVSettings

        mlx_lm_ext.apply(KVSettings(kv_bits=args.kv_bits, quantized_kv_start=0, max_kv_size=args.max_kv_size))
    from mlx_lm import load, stream_generate
    from mlx_lm.models.cache import make_prompt_cache
    from mlx_lm.utils import sharded_load

    group = mx.distributed.init()
    if group.size() > 1:
        how = {"pipeline_group": group} if args.pipeline else {"tensor_group": group}
        model, tok = sharded_load(args.model, **how)
    else:
        model, tok = load(args.model)
    cache = make_prompt_cache(model, max_kv_size=args.max_kv_size)
    steps = stream_generate(
        model, tok, PROMPT, max_tokens=args.tokens, prompt_cache=cache, kv_bits=args.kv_bits,
        quantized_kv_start=0,
    )  # fmt: skip
    tokens = [r.token for r in steps]
    texts = [
        "".join(r.text for r in stream_generate(
            model, tok, p, max_tokens=args.tokens, prompt_cache=make_prompt_cache(model),
            kv_bits=args.kv_bits, quantized_kv_start=0,
        ))
        for p in args.prompt or []
    ]  # fmt: skip
    from mlx_lm_ext import layout

    held = [(kind, c) for kind, c in layout.leaves(cache) if c.nbytes]  # a pipeline rank's own layers
    kinds = [(kind, type(c).__name__) for kind, c in held]
    result = {
        "rank": group.rank(),
        "size": group.size(),
        "tokens": tokens,
        "cache_bytes": sum(c.nbytes for c in cache),
        "layers": kinds,
        "texts": texts,
    }
    print("RANK " + json.dumps(result), flush=True)
    # A pipeline stage may finish its last sends after its tokens: wait for every rank.
    mx.eval(mx.distributed.all_sum(mx.array(1.0), stream=mx.cpu))


if __name__ == "__main__":
    main()
