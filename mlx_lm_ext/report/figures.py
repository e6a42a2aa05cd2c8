"""The quality and recall figures as users read them: tables, JSON, two PNGs.

One row per setting: its bytes per token against the 16-bit cache's and what it costs
(KL mean and p99, top-1, perplexity change); recall as counts with 95% intervals. The
first PNG puts every setting (ours and llama.cpp's) at its KL against its bytes per
token and marks the Pareto front: the settings no other setting beats on both.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .. import layout
from .kv_quality import Scores
from .memory import LayerKV


@dataclass(frozen=True)
class Row(Scores):
    """One setting at one context: its scores, and where it sits on the plot."""

    source: str = "mlx-lm-ext"  # or "llama.cpp"
    label: str = ""
    bits: int | None = None
    bytes_per_token: float = 0.0
    ratio: float = 0.0  # bytes against the 16-bit cache at this context
    value_bits: int | None = None  # where keys and values differ (bits: the keys')
    rotate: str | None = None  # "keys" or "all" where rotated

    @property
    def kind(self) -> str:
        """How the plot groups it: llama.cpp, uniform, K/V split, or rotated."""
        if self.source != "mlx-lm-ext":
            return self.source
        if self.rotate is not None:
            return "rotated"
        return "uniform" if self.value_bits in (None, self.bits) else "K/V split"


def cache_bytes(layers: Sequence[LayerKV], context: int, per_layer_bits, group: int) -> int:
    """Bytes of the KV cache at `context`; per_layer_bits(i, sliding) -> bits or None."""
    total = 0
    attention = [lay for lay in layers if lay.kind != layout.RECURRENT]
    for i, lay in enumerate(attention):
        total += lay.tokens(context) * lay.row_bytes(per_layer_bits(i, lay.kind == layout.SLIDING), group)
    return total


def llamacpp_bytes(layers: Sequence[LayerKV], context: int, bytes_per_value: float) -> float:
    """llama.cpp's cache at `context` with one type for K and V (its windows held alike)."""
    attention = [lay for lay in layers if lay.kind != layout.RECURRENT]
    return sum(
        lay.tokens(context) * lay.kv_heads * (lay.k_dim + lay.v_dim) * bytes_per_value for lay in attention
    )


def pareto(rows: Sequence[Row]) -> list[Row]:
    """Rows no other row beats on both bytes and KL, cheapest first."""
    front, best = [], float("inf")
    for r in sorted(rows, key=lambda r: (r.bytes_per_token, r.kl_mean)):
        if r.kl_mean < best:
            front.append(r)
            best = r.kl_mean
    return front


def quality_markdown(model: str, rows: Sequence[Row]) -> str:
    lines = []
    for context in sorted({r.context for r in rows}):
        mine = sorted(
            (r for r in rows if r.context == context), key=lambda r: (r.source, -r.ratio, r.kl_mean)
        )
        n = mine[0].positions if mine else 0
        lines += [
            f"{model}, context {context:,} ({n} scored positions; 16-bit perplexity {mine[0].ppl_16:.2f}):",
            "",
            "| setting | bytes/token | vs 16-bit | KL mean | KL p99 | top-1 | perplexity |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in mine:
            lines.append(
                f"| {r.label} | {r.bytes_per_token:,.0f} | {r.ratio:.3f} | {r.kl_mean:.2e} | "
                f"{r.kl_p99:.2e} | {r.top1:.3f} | {r.ppl_change:+.1%} |"
            )
        lines.append("")
    return "\n".join(lines)


def recall_markdown(model: str, cells: dict[str, list]) -> str:
    """Recall per setting and length (all depths pooled), with the 95% interval."""
    from .passkey import wilson

    lengths = sorted({c.length for cs in cells.values() for c in cs})
    lines = [
        f"{model}: pass key recall (correct / asked, 95% interval; all depths)",
        "",
        "| setting | " + " | ".join(f"{n:,}" for n in lengths) + " |",
        "|---|" + "---|" * len(lengths),
    ]
    for label, cs in cells.items():
        out = []
        for n in lengths:
            k = sum(c.correct for c in cs if c.length == n)
            t = sum(c.total for c in cs if c.length == n)
            lo, hi = wilson(k, t)
            out.append(f"{k}/{t} ({lo:.2f}-{hi:.2f})")
        lines.append(f"| {label} | " + " | ".join(out) + " |")
    return "\n".join(lines)


KIND_MARKERS = {"uniform": "o", "K/V split": "^", "rotated": "D", "llama.cpp": "s"}


def plot_front(rows: Sequence[Row], path: Path, title: str) -> None:
    """KL mean against bytes per token, one point per setting (marked by kind: uniform
    bits, keys and values apart, rotated, llama.cpp), with two Pareto fronts: uniform bits
    alone, and every setting."""
    plt = _pyplot()
    contexts = sorted({r.context for r in rows})
    fig, axes = plt.subplots(1, len(contexts), figsize=(6 * len(contexts), 5), squeeze=False)
    for ax, context in zip(axes[0], contexts, strict=True):
        mine = [r for r in rows if r.context == context and r.kl_mean > 0]
        for kind, marker in KIND_MARKERS.items():
            pts = [r for r in mine if r.kind == kind]
            if not pts:
                continue
            ax.scatter([r.bytes_per_token for r in pts], [r.kl_mean for r in pts], marker=marker, label=kind)
            for r in pts:
                ax.annotate(r.label.replace("llama.cpp ", ""), (r.bytes_per_token, r.kl_mean), fontsize=6)
        uniform = pareto([r for r in mine if r.kind == "uniform"])
        if any(r.kind in ("K/V split", "rotated") for r in mine):
            ax.plot(
                [r.bytes_per_token for r in uniform],
                [r.kl_mean for r in uniform],
                ":",
                color="grey",
                lw=1,
                label="front, uniform bits",
            )
        front = pareto(mine)
        ax.plot(
            [r.bytes_per_token for r in front], [r.kl_mean for r in front], "k--", lw=1, label="Pareto front"
        )
        ax.set(xlabel="KV bytes per token", ylabel="KL(16-bit || setting), mean", yscale="log")
        ax.set_title(f"context {context:,}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_recall(cells: dict[str, list], path: Path, title: str) -> None:
    """Recall heatmap (depth x length) per setting, each cell annotated correct/asked."""
    import numpy as np

    plt = _pyplot()
    lengths = sorted({c.length for cs in cells.values() for c in cs})
    depths = sorted({c.depth for cs in cells.values() for c in cs})
    fig, axes = plt.subplots(
        1, len(cells), figsize=(2.2 + 1.1 * len(lengths) * len(cells), 3.8), squeeze=False
    )
    for ax, (label, cs) in zip(axes[0], cells.items(), strict=True):
        grid = np.full((len(depths), len(lengths)), np.nan)
        for c in cs:
            grid[depths.index(c.depth), lengths.index(c.length)] = c.correct / max(c.total, 1)
            ax.text(
                lengths.index(c.length),
                depths.index(c.depth),
                f"{c.correct}/{c.total}",
                ha="center",
                va="center",
                fontsize=7,
            )
        ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(lengths)), [f"{n // 1024}K" if n >= 1024 else str(n) for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
        ax.set(xlabel="length", ylabel="depth", title=label)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
