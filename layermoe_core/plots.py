"""PNG plots of the plain values the pipeline passes around (DataFrames, lists).

Each function takes data and a path, writes one PNG and returns the path. Figures are
built with `matplotlib.figure.Figure` on the Agg canvas, never pyplot, so plotting keeps no
global state and is safe from worker threads.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

_DPI = 120


def _figure(num_layers: int) -> Figure:
    figure = Figure(figsize=(max(6.0, 0.32 * num_layers + 2.0), 3.6), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    return path


def plot_similarity(df: pd.DataFrame, path: str | Path, title: str = "Cross-lingual similarity per layer") -> Path:
    """`sim_old_new`, `sim_new_new` (when defined) and the `score` that drives allocation, per layer."""
    figure = _figure(len(df))
    axes = figure.add_subplot()
    curves = [("sim_old_new", "new–old pairs", "-", 1.5), ("sim_new_new", "new–new pairs", "-", 1.5)]
    for column, label, style, width in [*curves, ("score", "score", "--", 2.5)]:
        if df[column].notna().any():
            axes.plot(df["layer"], df[column], style, marker="o", markersize=3, linewidth=width, label=label)
    axes.set(xlabel="layer", ylabel="mean cosine of MLP inputs", title=title)
    axes.set_xticks(df["layer"])
    axes.grid(alpha=0.3)
    axes.legend()
    return _save(figure, path)


def plot_allocation(allocation: Sequence[int], path: str | Path, title: str = "New experts per layer") -> Path:
    """A bar per layer, labelled with its count; the realised total goes in the title."""
    figure = _figure(len(allocation))
    axes = figure.add_subplot()
    bars = axes.bar(range(len(allocation)), allocation, color="tab:blue")
    axes.bar_label(bars, fontsize=8)
    axes.set(xlabel="layer", ylabel="new experts", title=f"{title} (total {sum(allocation)})")
    axes.set_xticks(range(len(allocation)))
    axes.yaxis.set_major_locator(MaxNLocator(integer=True))  # expert counts are whole
    axes.margins(y=0.15)
    return _save(figure, path)


def plot_signal(table: pd.DataFrame, method: str, path: str | Path) -> Path:
    """The allocation signal per layer (line) over the new experts it gave (bars); `table` as plan_allocation's."""
    figure = _figure(len(table))
    bars_axes = figure.add_subplot()
    bars = bars_axes.bar(table["layer"], table["new_experts"], color="tab:blue", alpha=0.5, label="new experts")
    bars_axes.bar_label(bars, fontsize=8)
    bars_axes.set(xlabel="layer", ylabel="new experts", title=f"{method} signal and allocation (total {int(table['new_experts'].sum())})")
    bars_axes.set_xticks(table["layer"])
    bars_axes.yaxis.set_major_locator(MaxNLocator(integer=True))
    line_axes = bars_axes.twinx()
    line_axes.plot(table["layer"], table["signal"], "-o", color="tab:red", markersize=3, label=f"{method} signal")
    line_axes.set_ylabel(f"{method} signal", color="tab:red")
    return _save(figure, path)


def plot_language_comparison(df: pd.DataFrame, path: str | Path, metric: str = "loss") -> Path:
    """Parent and child bars per language from a `compare_models` table; new languages on a shaded band."""
    rows = df[df["metric"] == metric].reset_index(drop=True)
    figure = _figure(2 * len(rows))
    axes = figure.add_subplot()
    width = 0.4
    for position in rows.index[rows["group"] == "new"]:
        axes.axvspan(position - 0.5, position + 0.5, color="tab:orange", alpha=0.12, linewidth=0)
    axes.bar(rows.index - width / 2, rows["parent"], width, color="tab:gray", label="parent")
    bars = axes.bar(rows.index + width / 2, rows["child"], width, color="tab:blue", label="child")
    axes.bar_label(bars, labels=[f"{d:+.2f}" for d in rows["delta"]], fontsize=8)
    axes.set_xticks(rows.index, [f"{lang}\n({group})" for lang, group in zip(rows["language"], rows["group"])])
    axes.set(xlabel="language", ylabel=metric, title=f"Held-out {metric}: parent vs child")
    axes.margins(y=0.15)
    axes.legend()
    return _save(figure, path)


def plot_routing_heatmap(df: pd.DataFrame, path: str | Path) -> Path:
    """Layers x languages heatmap of `new_expert_weight` from `routing_statistics`, old languages first.

    The routed weight on this round's experts: near 1 where new-language tokens use what the
    round added, near 0 where old-language tokens keep the parent's experts.
    """
    languages = list(dict.fromkeys(df.sort_values("is_old", ascending=False, kind="stable")["language"]))
    is_old = df.groupby("language")["is_old"].first()
    table = df.pivot(index="layer", columns="language", values="new_expert_weight")[languages]  # (layers, languages)
    figure = Figure(figsize=(1.1 * len(languages) + 2.8, 0.38 * len(table) + 1.8), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    image = axes.imshow(table.to_numpy(), vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    for (row, column), value in pd.DataFrame(table.to_numpy()).stack().items():
        axes.text(column, row, f"{value:.2f}", ha="center", va="center", fontsize=8, color="black" if value > 0.6 else "white")
    axes.set_xticks(range(len(languages)), [f"{lang}\n({'old' if is_old[lang] else 'new'})" for lang in languages])
    axes.set_yticks(range(len(table)), table.index)
    axes.set(xlabel="language", ylabel="layer", title="Routed weight on this round's new experts")
    figure.colorbar(image, ax=axes, label="weight on new experts")
    return _save(figure, path)


def plot_variant_comparison(df: pd.DataFrame, path: str | Path) -> Path:
    """Side by side per variant (a `compare_variants` or `summarise_seeds` table): experts added, old-language drift,
    new-language gain; with `<column>_std` columns (several seeds), error bars of one std."""
    figure = Figure(figsize=(10.0, 3.4), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(figure)
    panels = [
        ("new_experts", "new experts added"),
        ("old_drift", "old-language drift (nats, lower is better)"),
        ("new_gain", "new-language gain (nats, higher is better)"),
    ]
    for index, (column, title) in enumerate(panels, start=1):
        axes = figure.add_subplot(1, len(panels), index)
        errors = df[f"{column}_std"].fillna(0) if f"{column}_std" in df else None
        bars = axes.bar(df["variant"], df[column], yerr=errors, capsize=4, color=[f"C{i}" for i in range(len(df))])
        axes.bar_label(bars, fmt="%.3g", fontsize=8)
        axes.axhline(0, color="black", linewidth=0.6)
        axes.set_title(title, fontsize=9)
        axes.tick_params(axis="x", labelrotation=20)
    return _save(figure, path)
