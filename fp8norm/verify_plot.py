"""`fp8norm verify --plot`: a verify report drawn as SQNR per tensor, by layer and tensor kind, against
the format's floor and its bands. Needs matplotlib (the `plot` extra)."""

from __future__ import annotations

import math
from pathlib import Path

from .checks import FAIL, GOOD, WARN, TensorCheck
from .verify import VerifyReport, layer_order, tensor_kind


PLOT_NEEDS_MATPLOTLIB = "--plot needs matplotlib: pip install 'fp8norm[plot]' (or pip install matplotlib)"
WORST_ANNOTATED = 4  # lowest-SQNR tensors the plot names
BAND_COLOURS = {GOOD: "#dcf0d5", WARN: "#fde5ad", FAIL: "#f8c9c8"}  # light enough to read points over


def require_matplotlib() -> None:
    """Raise the one-line ValueError of `--plot` when matplotlib is missing: call it before the work
    whose result is to be plotted."""
    try:
        import matplotlib.figure  # noqa: F401
    except ImportError:
        raise ValueError(PLOT_NEEDS_MATPLOTLIB) from None


def _sqnr_view(report: VerifyReport) -> tuple[float, float]:
    """The plot's y range (dB): the finite SQNRs and the format's floor, the nearest band edge on each
    side of them (how far the data sit from the next band), and a strip below the worst tensor for
    the names of the worst ones. Not the whole band range: that squashes 1 dB of spread to nothing."""
    b = report.bands
    floor = report.element_format.floor_sqnr_db
    values = [c.sqnr_db for c in report.checks if math.isfinite(c.sqnr_db)]
    lo, hi = min(values + [floor]), max(values + [floor])
    if any(c.sqnr_db == -math.inf for c in report.checks):  # drawn on the bottom edge: in the FAIL band
        lo = min(lo, b.sqnr_warn)
    edges = (b.sqnr_good, b.sqnr_warn)
    lo = max((e for e in edges if e <= lo), default=lo)
    hi = min((e for e in edges if e >= hi), default=hi)
    span = max(hi - lo, 1.0)
    top, bottom = hi + 0.08 * span, lo - 0.12 * span
    worst_db = min(values, default=floor)
    # the worst tensor at least 30% of the height above the bottom: room for the names
    return min(bottom, (worst_db - 0.3 * top) / 0.7), top


def sqnr_figure(report: VerifyReport):
    """The matplotlib Figure of plot_report (no pyplot: no global backend or figure state).

    One point per checked tensor at its layer (one x position each; tensor kinds side by side within
    it, each kind at the same offset, colour and marker in every layer; experts of a kind stacked at
    one x), no lines between points; GOOD / WARN / FAIL shaded from report.bands, the format's
    floor as a dashed line, the WORST_ANNOTATED lowest-SQNR tensors ringed and named."""
    require_matplotlib()
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    fmt, b = report.element_format, report.bands
    floor = fmt.floor_sqnr_db
    placed = [(c, kind, layer or "-") for c in report.checks for kind, layer in [tensor_kind(c.name)]]
    layers = sorted({layer for _, _, layer in placed}, key=layer_order)
    kinds = sorted({kind for _, kind, _ in placed})
    x_of_layer = {k: i for i, k in enumerate(layers)}
    width = 0.8 / max(1, len(kinds))  # of one layer's x slot per kind
    offset = {k: (i - (len(kinds) - 1) / 2) * width for i, k in enumerate(kinds)}
    lo, hi = _sqnr_view(report)

    fig = Figure(figsize=(min(18.0, max(10.0, 4 + 0.5 * len(layers))), 5.6), dpi=100)
    ax = fig.add_subplot()
    ax.set_xlim(-0.5, max(len(layers), 1) - 0.5)
    ax.set_ylim(lo, hi)
    for status, y0, y1, label in ((GOOD, b.sqnr_good, max(hi, b.sqnr_good), f"GOOD \u2265 {b.sqnr_good:g} dB"),
                                  (WARN, b.sqnr_warn, b.sqnr_good, f"WARN {b.sqnr_warn:g}\u2013{b.sqnr_good:g} dB"),
                                  (FAIL, min(lo, b.sqnr_warn), b.sqnr_warn, f"FAIL < {b.sqnr_warn:g} dB")):
        ax.axhspan(y0, y1, facecolor=BAND_COLOURS[status], edgecolor="none", zorder=0, label=label)
        shown0, shown1 = max(y0, lo), min(y1, hi)
        if shown1 - shown0 > 0.08 * (hi - lo):  # named beside the axis where it shows
            ax.text(1.006, (shown0 + shown1) / 2, status, transform=ax.get_yaxis_transform(), ha="left",
                    va="center", rotation=90, fontsize=9, fontweight="bold", color="#555555")
    ax.axhline(floor, color="#1a7a1a", linestyle="--", linewidth=1.3, zorder=2,
               label=f"{fmt.name} floor {floor:.1f} dB ({report.scheme})")

    def y_of(c: TensorCheck) -> float:  # infinite SQNR (exact, or nothing to compare) drawn on the edge
        return min(max(c.sqnr_db, lo), hi)

    markers = "osD^v<>phP*X"
    colours = [f"C{i}" for i in range(10)]
    for i, kind in enumerate(kinds):
        mine = [(c, layer) for c, k, layer in placed if k == kind]
        ax.scatter([x_of_layer[layer] + offset[kind] for _, layer in mine], [y_of(c) for c, _ in mine],
                   s=34, marker=markers[i % len(markers)], color=colours[i % len(colours)],
                   edgecolors="black", linewidths=0.4, zorder=3, clip_on=False, label=kind)

    worst_first = sorted(placed, key=lambda p: p[0].sqnr_db)[:WORST_ANNOTATED]
    x_of_worst = [x_of_layer[layer] + offset[kind] for _, kind, layer in worst_first]
    y_of_worst = [y_of(c) for c, _, _ in worst_first]
    if worst_first:
        ax.scatter(x_of_worst, y_of_worst, s=190, facecolors="none", edgecolors="black", linewidths=1.6,
                   zorder=4, clip_on=False)
        # the names in the strip below the data that _sqnr_view keeps free, numbered as the rings
        ax.text(0.01, 0.02, "\n".join(f"{rank}. {c.name}  {c.sqnr_db:.2f} dB ({c.status})"
                                      for rank, (c, _, _) in enumerate(worst_first, 1)),
                transform=ax.transAxes, ha="left", va="bottom", fontsize=8, zorder=5, linespacing=1.3,
                bbox={"boxstyle": "round,pad=0.35", "facecolor": "white", "edgecolor": "#888888", "alpha": 0.92})
    for side, i in enumerate(sorted(range(len(worst_first)), key=x_of_worst.__getitem__)):
        # numbers alternately left and right of the rings, so two neighbouring rings keep theirs apart
        right = side % 2 == 1
        ax.annotate(str(i + 1), xy=(x_of_worst[i], y_of_worst[i]), xytext=(7 if right else -7, -4),
                    textcoords="offset points", ha="left" if right else "right", va="top", fontsize=9,
                    fontweight="bold", zorder=5)

    every = max(1, math.ceil(len(layers) / 40))  # at most ~40 layer names on the axis
    ax.set_xticks(range(0, len(layers), every), ["other" if k == "-" else k for k in layers[::every]])
    ax.set_xticks([i + 0.5 for i in range(len(layers) - 1)], minor=True)
    ax.tick_params(axis="x", which="minor", length=0)
    ax.grid(which="minor", axis="x", color="#999999", linewidth=0.8)  # separates the layers
    ax.grid(which="major", axis="y", color="white", linewidth=0.6, alpha=0.8)
    ax.set_xlabel("layer (tensor kinds side by side within each)")
    ax.set_ylabel("SQNR (dB), higher is better")
    title = (f"{report.scheme} ({fmt.name}) quantization error per tensor: {len(report.checks)} tensors, "
             f"status {report.status}")
    if report.calibration:
        title += f", calibration {report.calibration}"
    ax.set_title(title, fontsize=11)
    handles, _ = ax.get_legend_handles_labels()
    if worst_first:
        handles.append(Line2D([], [], linestyle="none", marker="o", markersize=11, markerfacecolor="none",
                              markeredgecolor="black", markeredgewidth=1.6,
                              label=f"{len(worst_first)} lowest SQNR (named)"))
    if not report.checks:
        handles.append(Patch(facecolor="none", edgecolor="none", label="no tensors checked"))
    ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.035, 1.0), borderaxespad=0)
    fig.tight_layout()
    return fig


def plot_report(report: VerifyReport, path: str | Path) -> Path:
    """A PNG of SQNR (dB) per tensor by layer and tensor kind against the format's floor and the bands
    (sqnr_figure). Needs matplotlib (extra `plot`): ValueError naming it, before anything is drawn."""
    fig = sqnr_figure(report)
    path = Path(path)
    fig.savefig(path)
    return path
