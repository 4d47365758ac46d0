"""Pictures for the Dagster UI and MLflow: training curves and a metrics bar chart as small PNGs.

Uses matplotlib's object API with the Agg canvas (no pyplot, no global figure state, no display needed): each
function builds its own Figure, saves it and lets it go. `image_markdown` embeds a PNG in markdown metadata as a
base64 data URI, which the Dagster UI renders inline in the asset's metadata."""

import base64
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

PathLike = str | Path

# ~600x350 px at dpi 100: small enough to embed in metadata (a few tens of KB as base64).
FIGSIZE = (6.0, 3.5)
DPI = 100


def _figure(figsize=FIGSIZE):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=DPI)
    return path


def _finite(values: Sequence[float | None]) -> bool:
    return any(v is not None and math.isfinite(v) for v in values)


def training_curves_png(history: Sequence[Mapping], path: PathLike, title: str = "training") -> Path:
    """Training loss (left axis) and evaluation HR@10 / NDCG@10 (right axis) per epoch.

    `history` is `TwoTowerTrainResult.history`: one dict per epoch with "epoch", "loss" and "metrics"
    ({"hr@10": ..., "ndcg@10": ...}); metrics may also sit at the top level of each dict."""
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    epochs = [int(h.get("epoch", i)) + 1 for i, h in enumerate(history)]  # 1-based for humans
    loss = [h.get("loss") for h in history]
    lines = []
    if _finite(loss):
        lines += ax.plot(
            epochs, [float("nan") if v is None else float(v) for v in loss], "o-", color="tab:blue", label="train loss"
        )
    ax.set_xlabel("epoch")
    ax.set_ylabel("train loss")
    ax.grid(alpha=0.3)
    if epochs:
        ax.set_xticks(epochs if len(epochs) <= 15 else epochs[:: max(1, len(epochs) // 10)])
    right = ax.twinx()
    for key, color, style in (("ndcg@10", "tab:orange", "s-"), ("hr@10", "tab:green", "^--")):
        values = [(h.get("metrics") or {}).get(key, h.get(key)) for h in history]
        if _finite(values):
            lines += right.plot(
                epochs,
                [float("nan") if v is None else float(v) for v in values],
                style,
                color=color,
                label=f"{key.upper()} (eval)",
            )
    right.set_ylabel("metric")
    if lines:
        # Below the axes, so it never hides a curve.
        ax.legend(
            lines,
            [line.get_label() for line in lines],
            loc="upper center",
            bbox_to_anchor=(0.5, -0.2),
            ncol=len(lines),
            fontsize=8,
            frameon=False,
        )
    else:
        ax.text(0.5, 0.5, "no epochs", ha="center", va="center", transform=ax.transAxes)
    ax.set_title(title, fontsize=10)
    return _save(fig, path)


def metrics_bar_chart_png(
    rows: Mapping[str, Mapping[str, float]],
    path: PathLike,
    metrics: Sequence[str] = ("hr@10", "ndcg@10"),
    title: str = "models and baselines",
) -> Path:
    """Grouped bars: one group per model/baseline (the keys of `rows`), one bar per metric."""
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    names = list(rows)
    n = max(1, len(metrics))
    width = 0.8 / n
    for j, metric in enumerate(metrics):
        xs = [i + (j - (n - 1) / 2) * width for i in range(len(names))]
        ys = [float(rows[name].get(metric, float("nan"))) for name in names]
        bars = ax.bar(xs, ys, width=width, label=metric.upper())
        for bar, y in zip(bars, ys):
            if math.isfinite(y):
                ax.annotate(
                    f"{y:.3f}",
                    (bar.get_x() + bar.get_width() / 2, y),
                    ha="center",
                    va="bottom",
                    fontsize=7,
                    xytext=(0, 1),
                    textcoords="offset points",
                )
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(
        names, rotation=20 if len(names) > 4 else 0, ha="right" if len(names) > 4 else "center", fontsize=8
    )
    ax.set_ylabel("metric")
    ax.set_ylim(bottom=0)
    ax.margins(y=0.15)
    ax.grid(axis="y", alpha=0.3)
    if names:
        ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    return _save(fig, path)


def image_markdown(path: PathLike, alt: str = "plot") -> str:
    """Markdown that shows the PNG inline (base64 data URI): `![alt](data:image/png;base64,...)`."""
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f"![{alt}](data:image/png;base64,{data})"
