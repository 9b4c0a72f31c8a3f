"""PNG plots of a run's curves (matplotlib, Agg backend, imported only when plotting)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from evolver.diagnosis.metrics import FoldStats

VAL_LOSS_PNG = "val_loss.png"
TRAIN_VS_VAL_PNG = "train_vs_val.png"
LR_SCHEDULE_PNG = "lr_schedule.png"
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
