"""PNG plots of a run's curves (matplotlib, Agg backend, imported only when plotting)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from evolver.diagnosis.metrics import FoldStats
from evolver.diagnosis.posthoc import PosthocStudy
from evolver.records import LR_SCHEDULE_PNG, RELIABILITY_PNG, TRAIN_VS_VAL_PNG, VAL_LOSS_PNG

DPI = 100


def write_plots(history: pd.DataFrame, folds: list[FoldStats], out_dir: Path) -> list[Path]:
    """Write the three plots into `out_dir`; returns the files written (none without history)."""
    if history.empty:
        return []
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib import pyplot as plt

    stats = {fold.fold: fold for fold in folds}
    groups = [(int(fold), rows) for fold, rows in history.groupby("fold", sort=True)]
    written = []
    for name, draw in (
        (VAL_LOSS_PNG, _val_loss),
        (TRAIN_VS_VAL_PNG, _train_vs_val),
        (LR_SCHEDULE_PNG, _lr_schedule),
    ):
        figure = draw(plt, groups, stats)
        if figure is None:
            continue
        try:
            figure.tight_layout()
            figure.savefig(out_dir / name, dpi=DPI)
            written.append(out_dir / name)
        finally:
            plt.close(figure)
    return written


def _colors(plt: Any, count: int) -> list[Any]:
    cmap = plt.get_cmap("tab10")
    return [cmap(index % 10) for index in range(count)]


def _phase_boundaries(groups: list[tuple[int, pd.DataFrame]]) -> set[float]:
    """x positions between the last phase-1 epoch and the first phase-2 epoch of each fold."""
    bounds = set()
    for _, rows in groups:
        phase1 = rows.loc[rows["phase"] == 1, "epoch"]
        if len(phase1) and (rows["phase"] == 2).any():
            bounds.add(float(phase1.max()) + 0.5)
    return bounds


def _mark_phases(axes: Any, groups: list[tuple[int, pd.DataFrame]]) -> None:
    for index, bound in enumerate(sorted(_phase_boundaries(groups))):
        label = "phase 1 | phase 2" if index == 0 else None
        axes.axvline(bound, color="grey", linestyle=":", linewidth=1, label=label)


def _val_loss(plt: Any, groups: list[tuple[int, pd.DataFrame]], stats: dict[int, FoldStats]):
    figure, axes = plt.subplots(figsize=(8, 4.5))
    for color, (fold, rows) in zip(_colors(plt, len(groups)), groups, strict=True):
        axes.plot(rows["epoch"], rows["val_loss"], marker=".", color=color, label=f"fold {fold}")
        stat = stats.get(fold)
        if stat is not None and stat.best_epoch is not None:
            axes.plot(stat.best_epoch, stat.best_val_loss, marker="*", markersize=13, color=color)
            axes.plot(rows["epoch"].iloc[-1], stat.final_val_loss, marker="X", color=color)
    _mark_phases(axes, groups)
    axes.plot([], [], "k*", label="best epoch")
    axes.plot([], [], "kX", label="final epoch")
    axes.set(xlabel="epoch", ylabel="validation loss", title="Validation loss per fold")
    axes.legend(fontsize="small", ncol=2)
    axes.grid(alpha=0.3)
    return figure


def _train_vs_val(plt: Any, groups: list[tuple[int, pd.DataFrame]], stats: dict[int, FoldStats]):
    if not any(rows["train_loss"].notna().any() for _, rows in groups):
        return None
    figure, axes = plt.subplots(figsize=(8, 4.5))
    for color, (fold, rows) in zip(_colors(plt, len(groups)), groups, strict=True):
        axes.plot(rows["epoch"], rows["val_loss"], color=color, label=f"fold {fold} val")
        axes.plot(rows["epoch"], rows["train_loss"], color=color, linestyle="--", alpha=0.8)
    axes.plot([], [], "k--", label="train (dashed)")
    _mark_phases(axes, groups)
    axes.set(xlabel="epoch", ylabel="loss", title="Training vs validation loss")
    axes.legend(fontsize="small", ncol=2)
    axes.grid(alpha=0.3)
    return figure


def _lr_schedule(plt: Any, groups: list[tuple[int, pd.DataFrame]], stats: dict[int, FoldStats]):
    columns = [
        name for name in ("lr_backbone", "lr_head") if any(r[name].notna().any() for _, r in groups)
    ]
    if not columns:
        return None
    figure, panels = plt.subplots(1, len(columns), figsize=(4.5 * len(columns), 3.8), squeeze=False)
    for axes, column in zip(panels[0], columns, strict=True):
        for color, (fold, rows) in zip(_colors(plt, len(groups)), groups, strict=True):
            axes.step(rows["epoch"], rows[column], where="mid", color=color, label=f"fold {fold}")
        _mark_phases(axes, groups)
        axes.set(xlabel="epoch", ylabel="learning rate", title=column.replace("_", " "))
        axes.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
        axes.grid(alpha=0.3)
    panels[0][0].legend(fontsize="small")
    return figure


def write_reliability_plot(study: PosthocStudy, out_dir: Path) -> Path:
    """Accuracy against confidence per bin, before (configured) and after the post-hoc choice."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib import pyplot as plt

    chosen = study.chosen
    clip = "no clip" if chosen.clip is None else f"clip {chosen.clip:g}"
    panels = (
        (f"before: {study.configured}", study.reliability_before, study.ece_before),
        (
            f"after: {chosen.name}, T={chosen.temperature:.3g}, {clip} (cross-fitted)",
            study.reliability_after,
            study.ece_after,
        ),
    )
    figure, axes = plt.subplots(1, 2, figsize=(10, 4.5), sharey=True)
    try:
        for ax, (title, bins, ece) in zip(axes, panels, strict=True):
            filled = [b for b in bins if b.count]
            ax.bar(
                [(b.low + b.high) / 2 for b in filled],
                [b.accuracy for b in filled],
                width=[b.high - b.low for b in filled],
                edgecolor="black",
                alpha=0.7,
                label="accuracy",
            )
            ax.plot(
                [b.confidence for b in filled],
                [b.accuracy for b in filled],
                "o",
                color="tab:red",
                label="mean confidence",
            )
            ax.plot([0, 1], [0, 1], "k--", linewidth=1, label="calibrated")
            ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence (top class)")
            ax.set_title(f"{title}\nECE {ece:.4f}", fontsize="medium")
            ax.grid(alpha=0.3)
        axes[0].set_ylabel("accuracy")
        axes[0].legend(fontsize="small", loc="upper left")
        figure.tight_layout()
        path = out_dir / RELIABILITY_PNG
        figure.savefig(path, dpi=DPI)
    finally:
        plt.close(figure)
    return path
