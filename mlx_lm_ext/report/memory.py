"""How much KV cache a model needs, per precision, from config.json: the memory table.

Users choose `--kv-bits` from a table like "132K context: fp16 X GB, 8-bit Y, 4-bit Z".
The table must be exact for the model's real layout (sliding windows, KV-shared layers,
recurrent layers, different global/local head dims), so the layout is not re-derived
per family from config keys: the real mlx-lm model class is built lazily from config.json
(no weights are allocated: MLX arrays are lazy) and one token goes through it; the keys
and values each cache receives then carry the exact per-layer shapes, read without
evaluating anything. Bytes follow from those shapes exactly as the caches store them:
16-bit rows, or packed `bits`-bit words plus a 16-bit scale and bias per group.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import layout
from ..settings import read_config

GB = 1e9


@dataclass(frozen=True)
class LayerKV:
    """One cache of the model: attention (heads x key dim, value dim) or recurrent state."""

    index: str
    kind: str  # layout.FULL, layout.SLIDING or layout.RECURRENT
    kv_heads: int = 0
    k_dim: int = 0
    v_dim: int = 0
    window: int | None = None
    state_bytes: int = 0
    dtype_bytes: int = 2  # of the unquantized keys/values, and of the scales and biases

    @property
    def layer(self) -> int:
        """The model layer this cache belongs to (`index` is "3", or "3.1" in a CacheList)."""
        return int(self.index.split(".")[0])

    def tokens(self, context: int, bound: int | None = None) -> int:
        """Tokens held at `context`: a window or bound caps it, full attention holds all."""
        held = context if self.window is None else min(context, self.window)
        return held if bound is None else min(held, bound)

    def row_bytes(self, bits: int | tuple[int, int] | None, group_size: int) -> int:
        """Bytes of one token's keys and values in this layer; `bits`: one width, or
        (key bits, value bits)."""
        if bits is None:
            return self.dtype_bytes * self.kv_heads * (self.k_dim + self.v_dim)
        key, value = (bits, bits) if isinstance(bits, int) else bits
        groups = 2 * self.dtype_bytes  # a scale and a bias per group
        per_dim = [d * b // 8 + d // group_size * groups for d, b in ((self.k_dim, key), (self.v_dim, value))]
        return self.kv_heads * sum(per_dim)


def trace_layout(config: dict[str, Any], dtype: str = "bfloat16") -> list[LayerKV]:
    """Every cache the model makes, with its exact shapes (see the module docstring)."""
    return model_layout(model_from_config(config, dtype))


def model_layout(model: Any) -> list[LayerKV]:
    """Every cache a loaded model makes, with its exact shapes (one token through it)."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    model(mx.array([[1]]), cache=cache)
    return _describe(cache, prefix="")


def model_from_config(config: dict[str, Any], dtype: str = "bfloat16") -> Any:
    """The real mlx-lm model class for config.json, random weights, nothing evaluated yet."""
    import mlx.core as mx
    from mlx_lm.utils import _get_classes

    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    model.set_dtype(getattr(mx, dtype))  # bf16 as checkpoints ship; fp32 stays where a model insists
    return model


def _describe(caches: list[Any], prefix: str) -> list[LayerKV]:
    out = []
    for i, c in enumerate(caches):
        index = f"{prefix}{i}"
        kind = layout.classify(c)
        if kind == layout.LIST:
            out += _describe(list(c.caches), prefix=f"{index}.")
        elif kind == layout.RECURRENT:
            state = sum(x.nbytes for x in c.cache if x is not None)
            out.append(LayerKV(index, kind, state_bytes=state))
        elif kind in (layout.FULL, layout.SLIDING) and c.keys is not None:
            window = c.max_size if kind == layout.SLIDING else None
            heads, k_dim, v_dim = c.keys.shape[1], c.keys.shape[-1], c.values.shape[-1]
            out.append(LayerKV(index, kind, heads, k_dim, v_dim, window, dtype_bytes=c.keys.dtype.size))
        elif kind not in (layout.FULL, layout.SLIDING):
            raise layout.UnknownCacheLayout(f"report: no memory model for a {type(c).__name__}")
    return out


def kv_bytes(
    layers: list[LayerKV], context: int, bits: int | None, group_size: int, bound=None
) -> int | None:
    """Attention KV bytes at `context` tokens; None where the group size does not divide a dim."""
    attention = [lay for lay in layers if lay.kind != layout.RECURRENT]
    if bits is not None and any(d % group_size for lay in attention for d in (lay.k_dim, lay.v_dim)):
        return None
    return sum(lay.tokens(context, bound) * lay.row_bytes(bits, group_size) for lay in attention)


def table(layers: list[LayerKV], context: int, bits: list, group_size: int, bound=None) -> list[dict]:
    """Rows of the report: precision, attention KV bytes, recurrent state, ratio to 16-bit.
    `bits`: widths, each one int or (key bits, value bits)."""
    state = sum(lay.state_bytes for lay in layers)
    fp16 = kv_bytes(layers, context, None, group_size, bound)
    rows = []
    for b in [None, *bits]:
        kv = kv_bytes(layers, context, b, group_size, bound)
        rows.append(
            {
                "precision": f"{_unquantized_bits(layers)}-bit"
                if b is None
                else f"{width_label(b)} (group {group_size})",
                "kv_bytes": kv,
                "recurrent_bytes": state,
                "ratio": None if kv is None or not fp16 else kv / fp16,
            }
        )
    return rows


def width_label(bits: int | tuple[int, int]) -> str:
    """`8-bit`, or `K8V4` where keys and values differ."""
    key, value = (bits, bits) if isinstance(bits, int) else bits
    return f"{key}-bit" if key == value else f"K{key}V{value}"


def parse_widths(text: str) -> list[int | tuple[int, int]]:
    """`8,4,K8V4` -> [8, 4, (8, 4)]: the report's --bits (ValueError names a bad item)."""
    out: list[int | tuple[int, int]] = []
    for item in (x.strip() for x in text.split(",") if x.strip()):
        match = re.fullmatch(r"[kK](\d+)[vV](\d+)", item)
        if match:
            key, value = int(match[1]), int(match[2])
            out.append(key if key == value else (key, value))
        elif item.isdigit():
            out.append(int(item))
        else:
            raise ValueError(item)
    return out


def _unquantized_bits(layers: list[LayerKV]) -> int:
    return 8 * max((lay.dtype_bytes for lay in layers if lay.kind != layout.RECURRENT), default=2)


def summarize(layers: list[LayerKV]) -> str:
    """`62 caches: 10 full attention (16 KV heads x 128/128), 52 sliding (window 1024) ...`."""
    parts = []
    for kind, name in (
        (layout.FULL, "full attention"),
        (layout.SLIDING, "sliding"),
        (layout.RECURRENT, "recurrent"),
    ):
        group = [lay for lay in layers if lay.kind == kind]
        if not group:
            continue
        shapes = sorted(
            {f"{lay.kv_heads} KV heads x {lay.k_dim}/{lay.v_dim}" for lay in group if lay.kv_heads}
        )
        windows = sorted({lay.window for lay in group if lay.window})
        detail = ", ".join(shapes + [f"window {w}" for w in windows])
        parts.append(f"{len(group)} {name}" + (f" ({detail})" if detail else ""))
    return f"{len(layers)} caches: " + "; ".join(parts)


def markdown(model: str, context: int, rows: list[dict], layers: list[LayerKV], bound=None) -> str:
    lines = [
        f"{model}, {context:,} tokens"
        + (f", --max-kv-size {bound}" if bound else "")
        + f": {summarize(layers)}",
        "",
        "| KV cache | attention KV | recurrent state | vs unquantized |",
        "|---|---|---|---|",
    ]
    for r in rows:
        kv = "n/a: group size does not divide a head dim" if r["kv_bytes"] is None else human(r["kv_bytes"])
        ratio = "" if r["ratio"] is None else f"{r['ratio']:.3f}"
        lines.append(f"| {r['precision']} | {kv} | {human(r['recurrent_bytes'])} | {ratio} |")
    return "\n".join(lines)


def per_rank_markdown(
    layers: list[LayerKV], context: int, bits: list, group_size: int, ranks: int, pipeline: bool, bound=None
) -> str:
    """The cache each machine holds when the server runs on `ranks` ranks (mlx.launch)."""
    from ..distributed import rank_layers

    shares = rank_layers(layers, ranks, pipeline)
    how = "pipeline: each holds its stage's layers" if pipeline else "tensor parallel: 1/N of the heads each"
    lines = [
        f"Per machine, {ranks} ranks ({how}):",
        "",
        "| KV cache | " + " | ".join(f"rank {r}" for r in range(ranks)) + " |",
        "|---|" + "---|" * ranks,
    ]
    per_rank = [table(share, context, bits, group_size, bound) for share in shares]
    for i, row in enumerate(per_rank[0]):
        cells = []
        for rows in per_rank:
            kv = rows[i]["kv_bytes"]
            cells.append("n/a" if kv is None else human(kv + rows[i]["recurrent_bytes"]))
        lines.append(f"| {row['precision']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def human(n: int) -> str:
    """Decimal units, as users quote them ("215 GB")."""
    for unit, size in (("GB", GB), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:,.2f} {unit}"
    return f"{n} B"


def model_source(model: str, offline: bool) -> tuple[str, str, bool]:
    """(name shown, what read_config and mlx_lm.load take, whether it is a models.yaml id).

    A folder is itself; a models.yaml id is its hub repo, or with `offline` its stand-in's
    folder; anything else is taken for a hub repo id.
    """
    from ..zoo import get_entry, resolve

    if Path(model).is_dir():
        return model, model, False
    try:
        entry = get_entry(model)
    except KeyError:
        return model, model, False
    if offline:
        shown = entry.id if entry.real else f"{entry.id} (offline stand-in)"
        return shown, str(resolve(entry, "offline")), True
    return entry.hub, entry.hub, True


def resolve_config(model: str, offline: bool) -> tuple[str, dict[str, Any]]:
    """config.json of a folder, a hub repo, or a models.yaml id (its hub repo; --offline: stand-in)."""
    name, source, catalogued = model_source(model, offline)
    if (config := read_config(source)) is not None:
        return name, config
    if Path(source).is_dir():
        raise SystemExit(f"report: {source} has no config.json")
    hint = " (or --offline for its stand-in)" if catalogued else ""
    raise SystemExit(
        f"report: cannot read config.json of {source}: not a folder, and the hub is unreachable{hint}"
    )
