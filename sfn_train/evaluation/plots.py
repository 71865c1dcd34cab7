"""`sfn compare`'s plots: one labelled horizontal bar per model, so that every bar can be matched to its model.

Why this layout: with tens of models, vertical bars in recycled colours need a legend that no reader can match to
the bars. Here each model is a row named on the axis; rows are grouped (e.g. fine-tunes, merges, destruction) and
sorted within a group, the value and its CI are written at the bar, and the baseline is a dashed line across all rows.
One panel per task. Sizes grow with the number of rows, so the text stays readable where the report embeds the image.
"""

from __future__ import annotations

from pathlib import Path

LEVEL_COLORS = {"I": "#b2182b", "II": "#ef8a62", "III": "#67a9cf", "IV": "#1a9850"}
LEVEL_NAMES = {"I": "I degenerate", "II": "II off task", "III": "III on task, wrong", "IV": "IV correct"}
GROUP_COLORS = ["#4c72b0", "#dd8452", "#55a868", "#8172b3", "#937860", "#da8bc3", "#8c8c8c"]
ROW_INCHES = 0.27


def ordered_rows(rows: list[dict], task: str, groups: dict[str, str] | None) -> list[tuple[str, list[dict]]]:
    """[(group, rows sorted by pass@1 descending)] for one task; groups in order of first appearance."""
    groups = groups or {}
    mine = [r for r in rows if r["task"] == task]
    names = list(dict.fromkeys(groups.get(r["model"], "models") for r in mine))
    return [(g, sorted((r for r in mine if groups.get(r["model"], "models") == g),
                       key=lambda r: (-r["pass_at_1"], r["model"]))) for g in names]


def _layout(grouped):
    """y position per row (top to bottom), with a gap and a heading between groups."""
    y, positions, headings = 0.0, [], []
    for group, rows in grouped:
        if len(grouped) > 1:
            headings.append((group, y))
            y += 0.9
        for r in rows:
            positions.append((r, y))
            y += 1.0
        y += 0.4
    return positions, headings, y


def _panels(rows: list[dict], tasks: list[str], groups: dict[str, str] | None, top_inches: float):
    """(pyplot, figure, axes, [(task, grouped rows)]): one panel per task, each as tall as its rows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(task, ordered_rows(rows, task, groups)) for task in tasks]
    heights = [_layout(g)[2] for _, g in panels]
    fig, axes = plt.subplots(len(tasks), 1, figsize=(7.5, top_inches + ROW_INCHES * sum(heights) + 0.6 * len(tasks)),
                             gridspec_kw={"height_ratios": heights}, squeeze=False)
    return plt, fig, axes, panels


def accuracy_plot(rows: list[dict], tasks: list[str], baseline: str, path: Path,
                  groups: dict[str, str] | None = None) -> Path:
    plt, fig, axes, panels = _panels(rows, tasks, groups, top_inches=1.0)
    group_names = list(dict.fromkeys(g for _, grouped in panels for g, _ in grouped))
    for ax, (task, grouped) in zip(axes[:, 0], panels):
        positions, headings, total = _layout(grouped)
        for r, y in positions:
            color = GROUP_COLORS[group_names.index((groups or {}).get(r["model"], "models")) % len(GROUP_COLORS)]
            value, low, high = (100 * r[k] for k in ("pass_at_1", "ci_low", "ci_high"))
            ax.barh(y, value, height=0.72, color=color, alpha=0.9 if r["model"] != baseline else 1.0,
                    edgecolor="black" if r["model"] == baseline else "none", linewidth=1.2)
            ax.errorbar(value, y, xerr=[[value - low], [high - value]], fmt="none", ecolor="black", elinewidth=0.9,
                        capsize=2.5)
            wilson = " W" if r.get("ci_method") == "wilson" else ""
            ax.text(high + 1.2, y, f"{value:.1f} [{low:.1f}, {high:.1f}]{wilson}", va="center", fontsize=8,
                    bbox={"facecolor": "white", "edgecolor": "none", "pad": 0.6, "alpha": 0.85})
        for group, y in headings:
            ax.text(0, y, group, va="center", ha="left", fontsize=9, fontweight="bold", color="#333333")
        ax.set_yticks([y for _, y in positions], [r["model"] for r, _ in positions], fontsize=8.5)
        for tick, (r, _) in zip(ax.get_yticklabels(), positions):
            if r["model"] == baseline:
                tick.set_fontweight("bold")
        base = next((r for r, _ in positions if r["model"] == baseline), None)
        if base is not None:
            ax.axvline(100 * base["pass_at_1"], color="black", linestyle="--", linewidth=1)
            ax.text(100 * base["pass_at_1"], -0.9, f"baseline {baseline}", ha="center", va="bottom", fontsize=8)
        ax.set_ylim(total - 0.2, -1.2)
        ax.set_xlim(0, 119)
        ax.set_xticks(range(0, 101, 20))
        ax.grid(axis="x", alpha=0.3)
        ax.set_xlabel("pass@1 (%) with 95% CI (bootstrap; W = Wilson, see report)")
        ax.set_title(task, fontsize=10, loc="left")
    fig.suptitle("Accuracy per model (bars sorted within each group; dashed line = baseline)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def levels_plot(rows: list[dict], tasks: list[str], baseline: str, path: Path,
                groups: dict[str, str] | None = None) -> Path:
    plt, fig, axes, panels = _panels(rows, tasks, groups, top_inches=1.3)
    for ax, (task, grouped) in zip(axes[:, 0], panels):
        positions, headings, total = _layout(grouped)
        ys = [y for _, y in positions]
        left = [0.0] * len(positions)
        for level, color in LEVEL_COLORS.items():
            share = [100 * r["levels"].get(level, 0) for r, _ in positions]
            ax.barh(ys, share, left=left, height=0.72, color=color, label=LEVEL_NAMES[level])
            left = [a + b for a, b in zip(left, share)]
        for group, y in headings:
            ax.text(0, y, group, va="center", ha="left", fontsize=9, fontweight="bold", color="#333333")
        ax.set_yticks(ys, [r["model"] for r, _ in positions], fontsize=8.5)
        for tick, (r, _) in zip(ax.get_yticklabels(), positions):
            if r["model"] == baseline:
                tick.set_fontweight("bold")
        ax.set_ylim(total - 0.2, -1.2)
        ax.set_xlim(0, 100)
        ax.set_xlabel("share of responses (%)")
        ax.set_title(task, fontsize=10, loc="left")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.suptitle("Response levels per model (same order as the accuracy plot)", fontsize=10)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8, frameon=False, bbox_to_anchor=(0.5, 0.0))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
