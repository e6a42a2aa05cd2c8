"""`report --measure quality,recall`: the figures users choose --kv-bits by, on their model.

Quality: every bits x group setting (and, on sliding-window models, with the windows kept
at 16 bits, and per layer kind) scored teacher-forced on English prose against the 16-bit
cache at each context length (kv_quality.py); with llama-cpp-python installed and the
model's GGUF file known, llama.cpp's cache types on the same file and tokens next to
them (llamacpp.py). Recall: pass keys at depths of prose haystacks (passkey.py), 16-bit
first, then each bit width at the same keys. Tables print, JSON and two PNGs go to --out.
"""

from __future__ import annotations

import json
import platform
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from . import figures, kv_quality, llamacpp, passkey
from .memory import LayerKV

PROSE_ENTRIES = 400  # pydoc topics: about 220K tokens of English, enough for 32K windows


def machine() -> str:
    """The backend and machine the figures come from, for file names and JSON."""
    import mlx.core as mx

    cuda = getattr(mx, "cuda", None)  # MLX builds before the CUDA backend have no mx.cuda
    if cuda is not None and cuda.is_available():
        return "cuda"
    return "metal" if mx.metal.is_available() else f"cpu-{platform.machine()}"


def gguf_of(model: str) -> Path | None:
    """The GGUF file a zoo entry was converted from (None for anything else)."""
    from ..zoo import get_entry
    from ..zoo.packaged import gguf_file
    from ..zoo.resolve import cache_home

    try:
        entry = get_entry(model)
    except KeyError:
        return None
    return gguf_file(entry.gguf, cache_home().parent / "gguf") if entry.gguf else None


def _bar(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="tok", disable=None)


def quality(model: Any, tokens: list[int], layers: list[LayerKV], args: Any) -> list[figures.Row]:
    """Our settings' rows at every length (see kv_quality)."""
    has_sliding = any(lay.kind == "sliding" for lay in layers)
    attribution = [b for b in args.per_layer_bits if (b, b) in args.bits_list]
    choices = kv_quality.choices_for(args.bits_list, args.groups, attribution, has_sliding, args.rotate)
    with _bar((len(choices) + 1) * max(args.lengths), "quality") as bar:
        scores = kv_quality.lockstep(model, tokens, choices, args.lengths, args.window, progress=bar.update)
    rows = []
    for choice, per_context in scores.items():
        for s in per_context:
            held = figures.cache_bytes(layers, s.context, _bits_of(choice, len(layers)), choice.group)
            full = figures.cache_bytes(layers, s.context, lambda i, sl: None, 64)
            row = _row("mlx-lm-ext", choice.label, choice.bits, s, held, full)
            rows.append(replace(row, value_bits=choice.value_bits, rotate=choice.rotate))
    return rows


def _bits_of(choice: kv_quality.Choice, n_layers: int):
    return lambda i, sliding: choice.widths if choice.quantizes(i, n_layers, sliding) else None


def _row(source: str, label: str, bits, s: kv_quality.Scores, held: float, full: float) -> figures.Row:
    return figures.Row(
        **asdict(s),
        source=source,
        label=label,
        bits=bits,
        bytes_per_token=held / s.context,
        ratio=held / full,
    )


def llamacpp_rows(gguf: Path, tokens: list[int], layers: list[LayerKV], args: Any) -> list[figures.Row]:
    """llama.cpp's cache types against its own f16, rotated (its default) and not."""
    settings = [llamacpp.Setting(t, rot) for t in ("q8_0", "q5_0", "q4_0") for rot in (True, False)]
    scores = llamacpp.lockstep(gguf, tokens, settings, args.lengths, args.window)
    rows = []
    for s, per_context in scores.items():
        bits = {"q8_0": 8, "q5_0": 5, "q4_0": 4}[s.cache_type]
        for sc in per_context:
            held = figures.llamacpp_bytes(layers, sc.context, s.bytes_per_value)
            full = figures.llamacpp_bytes(layers, sc.context, 2.0)
            rows.append(_row("llama.cpp", s.label, bits, sc, held, full))
    return rows


def recall(model: Any, tokenizer: Any, text: str, args: Any) -> dict[str, list[passkey.Cell]]:
    """Pass key recall at 16 bits and each width, rotated as --rotate asks (group
    --kv-group-size)."""
    choices = [kv_quality.Choice(None)] + [
        kv_quality.Choice(k, args.kv_group_size, value_bits=None if v == k else v, rotate=r)
        for k, v in args.bits_list
        for r in (None, *args.rotate)
    ]
    total = len(choices) * len(args.recall_lengths) * len(args.depths) * args.keys
    from tqdm import tqdm

    with tqdm(total=total, desc="recall", unit="key", disable=None) as bar:
        cells = passkey.sweep(
            model, tokenizer, text, choices, args.recall_lengths, args.depths, args.keys, progress=bar.update
        )
    return {c.label: v for c, v in cells.items()}


def run(args: Any, name: str, source: str, layers: list[LayerKV]) -> dict[str, Any]:
    """Measure what args.measure names, print the tables, write JSON and PNGs to args.out."""
    from mlx_lm import load

    from .. import apply, revert
    from .quality import prose

    model, tokenizer = load(source)
    text = prose(PROSE_ENTRIES)
    out: dict[str, Any] = {
        "model": name,
        "machine": machine(),
        "text": f"pydoc_data topics[:{PROSE_ENTRIES}]",
    }
    args.out.mkdir(parents=True, exist_ok=True)
    apply()
    try:
        if "quality" in args.measure:
            tokens = tokenizer.encode(text)[: max(args.lengths) + 1]
            rows = quality(model, tokens, layers, args)
            gguf = args.llamacpp_gguf or gguf_of(args.model)
            if gguf and not args.no_llamacpp and llamacpp.available():
                rows += llamacpp_rows(gguf, tokens, layers, args)
            elif gguf and not args.no_llamacpp:
                print("report: llama-cpp-python is not installed: llama.cpp's figures left out")
            out["quality"] = [asdict(r) for r in rows]
            print(figures.quality_markdown(name, rows))
            (args.out / "report.json").write_text(json.dumps(out, indent=1))  # kept if recall fails
        if "recall" in args.measure:
            cells = recall(model, tokenizer, text, args)
            out["recall"] = {k: [asdict(c) for c in v] for k, v in cells.items()}
            print(figures.recall_markdown(name, cells))
    finally:
        revert()
    (args.out / "report.json").write_text(json.dumps(out, indent=1))
    drawn = draw(out, args.out)
    print(f"\nwrote {args.out}/report.json" + "".join(f", {p.name}" for p in drawn))
    return out


def draw(report: dict[str, Any], folder: Path) -> list[Path]:
    """The PNGs of a report (kl_vs_bytes.png, recall.png); none where matplotlib is missing
    (a GPU machine without it: `report --replot report.json` draws them later)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("report: matplotlib is not installed: no PNGs (draw them later with --replot)")
        return []
    name, drawn = report["model"], []
    if "quality" in report:
        rows = [figures.Row(**r) for r in report["quality"]]
        drawn.append(folder / "kl_vs_bytes.png")
        figures.plot_front(rows, drawn[-1], f"{name} ({report['machine']}): KV settings, KL against bytes")
    if "recall" in report:
        cells = {k: [passkey.Cell(**c) for c in v] for k, v in report["recall"].items()}
        drawn.append(folder / "recall.png")
        figures.plot_recall(cells, drawn[-1], f"{name} ({report['machine']}): pass key recall")
    return drawn
