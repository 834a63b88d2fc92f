"""The report's matplotlib figures: curves per arm, loss per t-bin, per-seed points, the forest plot, sample grids."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from PIL import Image  # noqa: E402

from liquid_diffusion.config import T_BINS, loss_bin_key  # noqa: E402


def _by_arm(runs: pd.DataFrame, histories: pd.DataFrame, key: str) -> dict[str, pd.DataFrame]:
    """arm -> (step x run) table of `key`, completed runs only."""
    out = {}
    points = histories[histories["key"] == key]
    for arm, group in runs.groupby("arm", sort=True):
        table = points[points["run_id"].isin(group["run_id"])].pivot_table(
            index="step", columns="run_id", values="value", aggfunc="last"
        )
        if not table.empty:
            out[arm] = table
    return out


def curves(runs: pd.DataFrame, histories: pd.DataFrame, dataset: str, objective: str) -> plt.Figure:
    """Objective vs images seen (mean over seeds, band = min to max) and the training loss, per arm."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for arm, table in _by_arm(runs, histories, objective).items():
        (line,) = left.plot(table.index, table.mean(axis=1), marker="o", ms=3, label=f"{arm} ({table.shape[1]})")
        if table.shape[1] > 1:
            left.fill_between(table.index, table.min(axis=1), table.max(axis=1), color=line.get_color(), alpha=0.2)
    left.set(title=f"{dataset}: {objective} (band: min to max over seeds)", xlabel="training images", ylabel=objective)
    for arm, table in _by_arm(runs, histories, "train/loss").items():
        smooth = table.mean(axis=1).rolling(5, min_periods=1).mean()
        right.plot(table.index, smooth, label=arm)
    right.set(
        title=f"{dataset}: training loss (mean over seeds)", xlabel="training images", ylabel="train/loss", yscale="log"
    )
    for ax in (left, right):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def loss_per_t_bin(runs: pd.DataFrame, dataset: str) -> plt.Figure:
    """The last logged loss in each t-bin, mean over seeds, per arm: where in t an arm wins or loses."""
    fig, ax = plt.subplots(figsize=(11, 3.5))
    centres = (np.arange(T_BINS) + 0.5) / T_BINS
    for arm, group in runs.groupby("arm", sort=True):
        columns = [f"metric:{loss_bin_key(i)}" for i in range(T_BINS)]
        values = [group[c].mean() if c in group else np.nan for c in columns]
        ax.plot(centres, values, marker="o", ms=3, label=arm)
    ax.set(
        title=f"{dataset}: loss per t-bin at the end of training",
        xlabel="t (0 = data, 1 = noise)",
        ylabel="train/loss_bin",
    )
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, ncol=4)
    fig.tight_layout()
    return fig


def seed_points(summary: pd.DataFrame, dataset: str) -> plt.Figure:
    """Every seed's final value as a point beside its arm's mean; a seed has one colour in every arm,
    so the pairing the statistics use can be seen."""
    rows = summary[(summary["dataset"] == dataset) & (summary["n_seeds"] > 0)].sort_values("mean")
    fig, ax = plt.subplots(figsize=(11, 0.35 * len(rows) + 1.5))
    colours = plt.get_cmap("tab10")
    for y, (_, row) in enumerate(rows.iterrows()):
        for item in row["values"].split():
            seed, value = item.split(":")
            ax.plot(float(value), y, "o", ms=5, color=colours(int(float(seed)) % 10), alpha=0.8)
        ax.plot(row["mean"], y, "|", ms=18, mew=2, color="black")
    ax.set_yticks(range(len(rows)), rows["arm"])
    ax.set(
        title=f"{dataset}: final {rows['objective'].iloc[0] if len(rows) else ''} per seed (colour = seed, bar = mean)",
        xlabel=rows["objective"].iloc[0] if len(rows) else "",
    )
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    return fig


def forest(summary: pd.DataFrame, dataset: str, baseline: str) -> plt.Figure:
    """Each arm's difference from the baseline with its paired 95% CI (thick) and Welch's (thin), sorted by
    effect; a filled marker survives Holm's correction."""
    rows = summary[(summary["dataset"] == dataset) & (summary["arm"] != baseline)].dropna(subset=["delta"])
    rows = rows.sort_values("delta")
    fig, ax = plt.subplots(figsize=(11, 0.35 * len(rows) + 1.5))
    for y, (_, row) in enumerate(rows.iterrows()):
        ax.plot([row["welch_ci_low"], row["welch_ci_high"]], [y, y], color="0.6", lw=1)
        ax.plot([row["paired_ci_low"], row["paired_ci_high"]], [y, y], color="C0", lw=3)
        # the paired estimate where there is one, so the point lies inside its own interval
        point = row["delta"] if np.isnan(row["paired_delta"]) else row["paired_delta"]
        ax.plot(point, y, "o", color="C3", mfc="C3" if row["significant"] else "white", ms=7)
    ax.axvline(0, color="black", lw=0.8)
    ax.set_yticks(range(len(rows)), rows["arm"])
    objective = rows["objective"].iloc[0] if len(rows) else ""
    ax.set(
        title=f"{dataset}: Δ {objective} vs {baseline} (thick: paired 95% CI, thin: Welch; filled: Holm p < 0.05)",
        xlabel=f"arm − {baseline}",
    )
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    return fig


def sample_grids(grids: dict[str, bytes], dataset: str) -> plt.Figure:
    """Each arm's last sample grid, from the same fixed noise, side by side."""
    n = max(1, len(grids))
    cols = min(n, 4)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.8 * cols, 3 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (arm, png) in zip(axes.flat, sorted(grids.items())):
        ax.imshow(Image.open(io.BytesIO(png)), cmap="gray", interpolation="nearest")
        ax.set_title(arm, fontsize=8)
    fig.suptitle(f"{dataset}: samples from the same noise (EMA weights, lowest seed)", fontsize=10)
    fig.tight_layout()
    return fig


def to_png(fig: plt.Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()
