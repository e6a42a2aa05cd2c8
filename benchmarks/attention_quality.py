"""Which quantized attention keeps a real model closer to 16-bit: ours or upstream's?

python benchmarks/attention_quality.py --model smollm2-135m-instruct --windows 4 --bits 8 4

On a real model from the zoo (converted from PyPI's GGUF files), for windows of English
prose (the standard library's pydoc_data topics, each window starting `--stride` tokens
after the last): a `--prefill`-token prompt in `--chunk`-token chunks, the cache
quantized after each chunk with upstream's `maybe_quantize_kv_cache(cache, 0, 64,
bits)`, then `--decode` teacher-forced steps, quantized after each; KL and top-1 of the
next-token distributions against the same run with a 16-bit cache. Two attention paths
over the same cache bytes: upstream's quantized SDPA (no fixes applied) and this
project's (`quantized-attention` applied). Per window and the mean over windows: the
window-to-window spread at 4 bits is as large as any difference between the paths.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

import mlx.core as mx
from results_io import emit, machine

import mlx_lm_ext
from mlx_lm_ext.report.quality import agreement, prose
from mlx_lm_ext.zoo import get_entry, resolve

PATHS = {"upstream": None, "mlx-lm-ext": ["quantized-attention"]}


def logprobs(model, ids: list[int], bits: int | None, args) -> mx.array:
    from mlx_lm.models.cache import make_prompt_cache

    quantize = importlib.import_module("mlx_lm.generate").maybe_quantize_kv_cache
    cache = make_prompt_cache(model)
    for start in range(0, args.prefill, args.chunk):
        model(mx.array([ids[start : min(start + args.chunk, args.prefill)]]), cache=cache)
        if bits:
            quantize(cache, 0, 64, bits)
        mx.eval([c.state for c in cache])
    out = []
    for token in ids[args.prefill : args.prefill + args.decode]:
        logits = model(mx.array([[token]]), cache=cache)[0, -1].astype(mx.float32)
        if bits:
            quantize(cache, 0, 64, bits)
        out.append(logits - mx.logsumexp(logits))
        mx.eval(out[-1])
    return mx.stack(out)


def run(args) -> list[dict]:
    from mlx_lm import load

    model, tokenizer = load(str(resolve(get_entry(args.model), "offline")))
    text = tokenizer.encode(prose(400))
    rows = []
    for w in range(args.windows):
        ids = text[w * args.stride : w * args.stride + args.prefill + args.decode]
        reference = logprobs(model, ids, None, args)
        for path, only in PATHS.items():
            mlx_lm_ext.revert()
            if only:
                mlx_lm_ext.apply(only=only)
            for bits in args.bits:
                got = agreement(reference, logprobs(model, ids, bits, args))
                rows.append(
                    {"window": w, "path": path, "bits": bits, "kl_mean": got.kl_mean, "top1": got.top1}
                )
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        mlx_lm_ext.revert()
    return rows


def markdown(result: dict) -> str:
    rows, bits_list = result["rows"], result["bits"]
    windows = sorted({r["window"] for r in rows})
    head = " | ".join(f"window {w}" for w in windows)
    lines = [f"| bits | attention | {head} | mean KL | mean top-1 |", "|---" * (len(windows) + 4) + "|"]
    for bits in bits_list:
        for path in PATHS:
            sel = [r for r in rows if r["bits"] == bits and r["path"] == path]
            cells = " | ".join(f"{r['kl_mean']:.3g}" for r in sel)
            kl = sum(r["kl_mean"] for r in sel) / len(sel)
            top1 = sum(r["top1"] for r in sel) / len(sel)
            lines.append(f"| {bits} | {path} | {cells} | {kl:.3g} | {top1:.3f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct", help="a real models.yaml entry")
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--stride", type=int, default=1500)
    p.add_argument("--prefill", type=int, default=600)
    p.add_argument("--chunk", type=int, default=256)
    p.add_argument("--decode", type=int, default=64)
    p.add_argument("--bits", type=int, nargs="+", default=[8, 4])
    p.add_argument("--json", type=Path, help="write the rows here")
    args = p.parse_args()
    rows = run(args)
    settings = {k: getattr(args, k) for k in ("prefill", "chunk", "decode", "stride", "bits")}
    emit({"model": args.model, "machine": machine(), **settings, "rows": rows}, args.json, markdown)


if __name__ == "__main__":
    main()
