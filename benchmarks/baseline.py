"""What unpatched mlx-lm does with quantized and bounded KV caches, per models.yaml family.

Run once per release (`nox -s baseline` does every release of the matrix) and render the
compat_tests/README.md's baseline table from the JSON files:

    python benchmarks/baseline.py run --json benchmarks/results/baseline/0.32.2.json
    python benchmarks/baseline.py table benchmarks/results/baseline/*.json

Three probes per family, all on the installed mlx-lm with no fix applied:
- generate: `stream_generate(kv_bits=B, quantized_kv_start=0)` for B in 8, 4;
- bound: `make_prompt_cache(model, max_kv_size=64)` after a 200-token prefill and one
  decode step: does every attention layer hold at most 64 tokens?
- server: which of the kv flags `python -m mlx_lm.server --help` lists.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path
from typing import Any

BITS = (8, 4)
BOUND = 64
PREFILL = 200
SERVER_FLAGS = ("--kv-bits", "--kv-group-size", "--quantized-kv-start", "--max-kv-size")


def _prompt(n: int) -> list[int]:
    return [(i * 7919) % 507 + 5 for i in range(n)]


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".strip()


def probe_generate(model: Any, tokenizer: Any, kv_bits: int) -> str:
    """'works', or the exception upstream raises, quantizing from the first token."""
    from mlx_lm import stream_generate

    try:
        for _ in stream_generate(
            model, tokenizer, _prompt(64), max_tokens=4, kv_bits=kv_bits, quantized_kv_start=0
        ):
            pass
    except Exception as exc:  # the point is to record whatever upstream raises
        return _error(exc)
    return "works"


def probe_bound(model: Any) -> str:
    """'bounded', or how many tokens the largest attention layer kept despite the bound."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model, max_kv_size=BOUND)
    model(mx.array(_prompt(PREFILL))[None], cache=cache)
    model(mx.array([[7]]), cache=cache)  # a rotating cache trims an over-long prefill on the next step
    held = [_tokens_held(c) for c in cache]
    worst = max((h for h in held if h is not None), default=0)
    return "bounded" if worst <= BOUND else f"ignored ({worst} tokens held)"


def _tokens_held(layer: Any) -> int | None:
    if hasattr(layer, "caches"):
        return max((_tokens_held(c) or 0) for c in layer.caches)
    keys = getattr(layer, "keys", None)
    if keys is None:
        return None  # recurrent state: constant size
    return min(layer.offset, keys.shape[2])


def probe_server() -> list[str]:
    """The kv flags upstream's own server parser accepts."""
    out = subprocess.run(
        [sys.executable, "-m", "mlx_lm.server", "--help"], capture_output=True, text=True, check=True
    ).stdout
    return [f for f in SERVER_FLAGS if f in out]


def run(models: str | None) -> dict[str, Any]:
    import mlx.core as mx
    from mlx_lm import load

    import mlx_lm_ext
    from mlx_lm_ext.zoo import load_catalog, resolve, select

    if mlx_lm_ext.applied():
        raise SystemExit("baseline must run on unpatched mlx-lm; fixes are applied")
    release = version("mlx-lm")
    families: dict[str, Any] = {}
    for entry in select(load_catalog(), models):
        if not entry.supported_by(release):
            families[entry.id] = {"skipped": f"{entry.model_type} needs mlx-lm >= {entry.min_mlx_lm}"}
            continue
        model, tokenizer = load(str(resolve(entry, "offline")))
        row = {f"kv{b}": probe_generate(model, tokenizer, b) for b in BITS}
        row["max_kv_size"] = probe_bound(model)
        families[entry.id] = row
        print(entry.id, row, flush=True)
    return {"mlx_lm": release, "mlx": mx.__version__, "server_flags": probe_server(), "families": families}


def _short(cell: str, legend: dict[str, str]) -> str:
    if cell in ("works", "bounded"):
        return cell
    if cell.startswith("ignored"):
        return cell
    key = legend.setdefault(cell, f"E{len(legend) + 1}")
    return f"fails ({key})"


def table(results: list[dict[str, Any]]) -> str:
    """Markdown: family x (release, probe), errors footnoted by their exact text."""
    results = sorted(results, key=lambda r: [int(p) for p in r["mlx_lm"].split(".")], reverse=True)
    legend: dict[str, str] = {}
    head = ["family"] + [f"{r['mlx_lm']} kv{b}" for r in results for b in BITS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    families = list(results[0]["families"])
    for fam in families:
        cells = [fam]
        for r in results:
            row = r["families"].get(fam, {})
            for b in BITS:
                cells.append("n/a (no arch)" if "skipped" in row else _short(row[f"kv{b}"], legend))
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines += [f"- {key}: `{text}`" for text, key in legend.items()]
    lines.append("")
    lines.append("| release | server kv flags | `make_prompt_cache(model, max_kv_size=64)` |")
    lines.append("|---|---|---|")
    for r in results:
        ignored = sorted(
            f for f, row in r["families"].items() if row.get("max_kv_size", "").startswith("ign")
        )
        flags = ", ".join(f"`{f}`" for f in r["server_flags"]) or "none"
        lines.append(f"| {r['mlx_lm']} | {flags} | ignored on {', '.join(ignored) or 'none'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="probe the installed mlx-lm")
    r.add_argument("--models", default=None, help="models.yaml ids (substrings, comma-separated)")
    r.add_argument("--json", type=Path, required=True)
    t = sub.add_parser("table", help="render JSON results as compat_tests/README.md's markdown")
    t.add_argument("files", nargs="+", type=Path)
    args = parser.parse_args(argv)
    if args.cmd == "run":
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(run(args.models), indent=1) + "\n")
    else:
        print(table([json.loads(f.read_text()) for f in args.files]))


if __name__ == "__main__":
    main()
