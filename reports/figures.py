"""The report's matplotlib figures: curves per arm, loss per t-bin, per-seed points, the forest plot, sample grids.

Each is returned as a Figure: a PNG and a caption. The caption is the figure's title, kept out of the image
so that the HTML and the PDF set it as text: it wraps instead of running off the page.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from PIL import Image  # noqa: E402

from liquid_diffusion.config import T_BINS, loss_bin_key  # noqa: E402

WIDTH_IN = 7.5  # inches: a portrait page's text width at 1:1, so 8-point labels stay 8 points in the PDF
DPI = 150


@dataclass(frozen=True)
class Figure:
    caption: str
    png: bytes


def finish(fig: plt.Figure, caption: str) -> Figure:
    """The figure as a PNG cropped to what it draws (nothing clipped), and closed."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight", pad_inches=0.05)
    plt.close(fig)
    return Figure(caption, buffer.getvalue())


def plain_numbers(ax, axis: str) -> None:
    """Tick labels as plain numbers: never matplotlib's offset ("1e-6+1.7003") or scientific notation. A
    single value (one seed, one arm) gets a range of +-5% around it instead of a sliver of float noise."""
    low, high = ax.get_xlim() if axis == "x" else ax.get_ylim()
    centre = (low + high) / 2
    if high - low < 1e-6 * max(1.0, abs(centre)):
        half = 0.05 * abs(centre) or 1.0
        (ax.set_xlim if axis == "x" else ax.set_ylim)(centre - half, centre + half)
    ax.ticklabel_format(useOffset=False, style="plain", axis=axis)


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


def curves(runs: pd.DataFrame, histories: pd.DataFrame, dataset: str, objective: str) -> Figure:
    """Objective vs images seen (mean over seeds, band = min to max) and the training loss, per arm."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(WIDTH_IN, 3.2))
    for arm, table in _by_arm(runs, histories, objective).items():
        (line,) = left.plot(table.index, table.mean(axis=1), marker="o", ms=3, label=f"{arm} ({table.shape[1]})")
        if table.shape[1] > 1:
            left.fill_between(table.index, table.min(axis=1), table.max(axis=1), color=line.get_color(), alpha=0.2)
    left.set(xlabel="training images", ylabel=objective)
    for arm, table in _by_arm(runs, histories, "train/loss").items():
        smooth = table.mean(axis=1).rolling(5, min_periods=1).mean()
        right.plot(table.index, smooth, label=arm)
    right.set(xlabel="training images", ylabel="train/loss", yscale="log")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6)
    fig.tight_layout()
    return finish(
        fig,
        f"{dataset}: {objective} against training images, mean over seeds (band: min to max; the legend gives "
        f"the seed count), and the training loss, mean over seeds.",
    )


def loss_per_t_bin(runs: pd.DataFrame, dataset: str) -> Figure:
    """The last logged loss in each t-bin, mean over seeds, per arm: where in t an arm wins or loses."""
    fig, ax = plt.subplots(figsize=(WIDTH_IN, 3))
    centres = (np.arange(T_BINS) + 0.5) / T_BINS
    for arm, group in runs.groupby("arm", sort=True):
        columns = [f"metric:{loss_bin_key(i)}" for i in range(T_BINS)]
        values = [group[c].mean() if c in group else np.nan for c in columns]
        ax.plot(centres, values, marker="o", ms=3, label=arm)
    ax.set(xlabel="t (0 = data, 1 = noise)", ylabel="train/loss_bin")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=6, ncol=4)
    fig.tight_layout()
    return finish(fig, f"{dataset}: the training loss per t-bin at the end of training, mean over seeds.")


def seed_points(summary: pd.DataFrame, dataset: str) -> Figure:
    """Every seed's final value as a point beside its arm's mean; a seed has one colour in every arm,
    so the pairing the statistics use can be seen."""
    rows = summary[(summary["dataset"] == dataset) & (summary["n_seeds"] > 0)].sort_values("mean")
    fig, ax = plt.subplots(figsize=(WIDTH_IN, 0.3 * len(rows) + 1.2))
    colours = plt.get_cmap("tab10")
    for y, (_, row) in enumerate(rows.iterrows()):
        for item in row["values"].split():
            seed, value = item.split(":")
            ax.plot(float(value), y, "o", ms=5, color=colours(int(float(seed)) % 10), alpha=0.8)
        ax.plot(row["mean"], y, "|", ms=18, mew=2, color="black")
    objective = rows["objective"].iloc[0] if len(rows) else ""
    ax.set_yticks(range(len(rows)), rows["arm"])
    ax.set(xlabel=objective)
    plain_numbers(ax, "x")
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    return finish(fig, f"{dataset}: each seed's final {objective} (colour = seed, the same in every arm; bar = mean).")


def forest(summary: pd.DataFrame, dataset: str, baseline: str) -> Figure:
    """Each arm's difference from the baseline with its paired 95% CI (thick) and Welch's (thin), sorted by
    effect; a filled marker survives Holm's correction."""
    rows = summary[(summary["dataset"] == dataset) & (summary["arm"] != baseline)].dropna(subset=["delta"])
    rows = rows.sort_values("delta")
    fig, ax = plt.subplots(figsize=(WIDTH_IN, 0.3 * len(rows) + 1.2))
    for y, (_, row) in enumerate(rows.iterrows()):
        ax.plot([row["welch_ci_low"], row["welch_ci_high"]], [y, y], color="0.6", lw=1)
        ax.plot([row["paired_ci_low"], row["paired_ci_high"]], [y, y], color="C0", lw=3)
        # the paired estimate where there is one, so the point lies inside its own interval
        point = row["delta"] if np.isnan(row["paired_delta"]) else row["paired_delta"]
        ax.plot(point, y, "o", color="C3", mfc="C3" if row["significant"] else "white", ms=7)
    ax.axvline(0, color="black", lw=0.8)
    ax.set_yticks(range(len(rows)), rows["arm"])
    objective = rows["objective"].iloc[0] if len(rows) else ""
    ax.set(xlabel=f"arm − {baseline}")
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    return finish(
        fig,
        f"{dataset}: Δ {objective} of each arm against {baseline}, sorted by effect. Thick: paired 95% CI; "
        f"thin: Welch's; a filled point survives Holm's correction (p < 0.05).",
    )


def sample_grids(grids: dict[str, bytes], dataset: str) -> Figure:
    """Each arm's last sample grid, from the same fixed noise, side by side."""
    n = max(1, len(grids))
    cols = min(n, 4)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(WIDTH_IN, WIDTH_IN / cols * 1.1 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (arm, png) in zip(axes.flat, sorted(grids.items())):
        ax.imshow(Image.open(io.BytesIO(png)), cmap="gray", interpolation="nearest")
        ax.set_title(arm, fontsize=8)
    fig.tight_layout()
    return finish(fig, f"{dataset}: each arm's last sample grid, from the same noise (EMA weights, lowest seed).")


def sizing(table: pd.DataFrame, objective: str) -> Figure:
    """The pilot's two curves against run length: the spread of the paired differences (with the planning
    upper limit), and the CPU-hours of the study that detects the stated effect."""
    fig, (spread, cost) = plt.subplots(1, 2, figsize=(WIDTH_IN, 2.6))
    kimages = table["images"] / 1000
    spread.plot(kimages, table["diff_sd"], "o-", label="sd of paired differences")
    spread.plot(kimages, table["diff_sd_upper"], "s--", label="upper limit used for planning")
    spread.plot(kimages, table["effect"], ":", color="grey", label="effect to detect")
    spread.set(xlabel="training images (thousands)", ylabel=objective)
    spread.legend(fontsize=7)
    hours = table["study_cpu_hours"].replace(np.inf, np.nan)
    cost.plot(kimages, hours, "o-")
    for x, y, n in zip(kimages, hours, table["seeds_needed"]):
        if y == y:
            cost.annotate(f"{n:.0f} seeds", (x, y), fontsize=7, textcoords="offset points", xytext=(3, 3))
    cost.set(xlabel="training images (thousands)", ylabel="CPU-hours of the sized study")
    for axis in (spread, cost):
        plain_numbers(axis, "y")
    fig.tight_layout()
    return finish(fig, f"Pilot: noise of {objective} against run length, and the cost of a study sized by it")


def interactions(values: pd.DataFrame, factors: dict[str, tuple[str, str]], objective: str, title: str) -> Figure:
    """One panel per pair of factors: the mean objective at each level of the first, a line per level of the
    second. Parallel lines mean no interaction; crossing or diverging ones mean the effect depends on it."""
    names = list(factors)
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1 :]]
    fig, axes = plt.subplots(1, len(pairs), figsize=(WIDTH_IN, 2.4), squeeze=False)
    for axis, (a, b) in zip(axes[0], pairs):
        for level in factors[b]:
            rows = values[values[b] == level]
            means = [rows.loc[rows[a] == x, "value"].mean() for x in factors[a]]
            axis.plot(range(2), means, "o-", label=f"{b} {level}")
        axis.set_xticks(range(2), factors[a])
        axis.set(xlabel=a, ylabel=objective)
        plain_numbers(axis, "y")
        axis.legend(fontsize=7)
    fig.tight_layout()
    return finish(fig, f"Interactions, {title}: mean {objective} over seeds at each pair of levels")
