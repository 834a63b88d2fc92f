"""Build the ablation report of an MLflow experiment: DIR/report.html, DIR/report.pdf and DIR/summary.csv.

python reports/build.py [--experiment NAME] [--out DIR] [--baseline ARM] [--tracking-uri URI]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from liquid_diffusion.cli import (  # noqa: E402
    BASELINE_ARM,
    DEFAULT_EXPERIMENT,
    OneLineParser,
    check_tracking_uri,
    run_command,
)
from liquid_diffusion.config import ConfigError  # noqa: E402

HOW_TO_READ = (
    "How to read them: Δ is the arm's mean minus the baseline's, on each run's final objective. The same seed "
    "gives every arm the same data order, t and noise draws and sample noise, so runs of one seed are pairs: "
    "the paired t-test over seeds in common is the primary comparison, with Welch's unpaired interval beside "
    "it. p-values are Holm-adjusted over the arm-vs-baseline comparisons of a dataset, and '*' marks those "
    "below 0.05. P(improvement) is the chance a run of the arm beats a run of the baseline, with a percentile "
    "bootstrap CI. MDE is the smallest difference the test detects with 80% power at the observed spread and "
    "seed count (alpha 0.05, before Holm). Replication: Spearman's rho between the arms' means over the lower "
    "and the upper half of each arm's seeds."
)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="build.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", default=DEFAULT_EXPERIMENT, help="MLflow experiment (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=Path("report"), help="output folder (default: %(default)s)")
    parser.add_argument(
        "--baseline",
        default=None,
        help=f"the arm others are compared with (default: {BASELINE_ARM}; without its runs the report "
        "has no comparison columns)",
    )
    parser.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)",
    )
    return parser


def _links(run_ids: str, uri: str, experiment_id: str) -> str:
    ids = run_ids.split()
    if uri.startswith(("http://", "https://")):
        return " ".join(f"<a href='{uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{i}'>{i[:8]}</a>" for i in ids)
    return " ".join(f"<code title='{i}'>{i[:8]}</code>" for i in ids)


def _interval(low: float, high: float) -> str:
    return "—" if low != low else f"[{low:+.3g}, {high:+.3g}]"  # low != low: NaN


def _comparison_columns(rows, baseline: str) -> dict[str, list[str]]:
    """The arm-vs-baseline columns of the results table, as text; '*' marks what survives Holm's correction."""

    def delta(row):
        if row["delta"] != row["delta"]:
            return row["note"] or "—"
        return f"{row['delta']:+.3g} ({row['delta_rel_pct']:+.1f}%)" + (" *" if row["significant"] else "")

    return {
        f"Δ vs {baseline}": [delta(r) for _, r in rows.iterrows()],
        "paired 95% CI": [_interval(lo, hi) for lo, hi in zip(rows["paired_ci_low"], rows["paired_ci_high"])],
        "Welch 95% CI": [_interval(lo, hi) for lo, hi in zip(rows["welch_ci_low"], rows["welch_ci_high"])],
        "Holm p": [f"{p:.2g}" if p == p else "—" for p in rows["p_holm"]],
        "P(improvement) [95% CI]": [
            f"{p:.2f} [{lo:.2f}, {hi:.2f}]" if p == p else "—"
            for p, lo, hi in zip(rows["p_improvement"], rows["p_improvement_ci_low"], rows["p_improvement_ci_high"])
        ],
        "MDE (80%)": [f"{m:.3g}" if m == m else "—" for m in rows["mde"]],
    }


def build(experiment: str, out: Path, baseline: str | None = None) -> dict:
    """The report of every trial run of `experiment`. An explicit `baseline` must have runs; the default
    one may not have any yet (the quick start trains one arm first), and then the comparison is left out."""
    import mlflow
    import pandas as pd

    from reports.analysis import findings, outcome, summarize
    from reports.collect import collect, last_sample_grid
    from reports.figures import curves, forest, loss_per_t_bin, sample_grids, seed_points
    from reports.render import Section, write_html, write_pdf

    started = time.perf_counter()
    data = collect(experiment)
    runs, histories = data.runs, data.histories
    arms = sorted(runs["arm"].unique())
    if baseline is not None and baseline not in arms:
        raise ConfigError(f"--baseline '{baseline}' has no runs in experiment '{experiment}'; arms: {', '.join(arms)}")
    baseline = baseline or BASELINE_ARM
    compared = baseline in arms
    summary, rho = summarize(runs, histories, baseline)
    runs = runs.assign(outcome=runs.apply(outcome, axis=1))
    uri = mlflow.get_tracking_uri()

    # --- header -------------------------------------------------------------------------------
    protocol = []
    for dataset, group in runs.groupby("dataset"):
        objective = summary.loc[summary["dataset"] == dataset, "objective"].iloc[0]
        first = group.iloc[0]
        weights = group["tag:weights"].dropna().unique()
        space = (
            "Inception weights: " + ", ".join(weights).upper()
            if len(weights)
            else "digit-classifier feature space (not FID)"
            if "digits" in objective or "confident" in objective or "entropy" in objective
            else ""
        )
        protocol.append(
            f"{dataset}: objective {objective or '—'}, N = {first['param:eval.n']}, N_ref = "
            f"{first['param:eval.n_ref']} ({first['param:eval.reference']}; reference set "
            f"{first['tag:eval.reference_set']}), {first['param:train.sample_steps']} Euler steps from the "
            f"EMA weights; {space}"
        )
    versions = "; ".join(sorted(runs["tag:versions"].dropna().unique())) or "not recorded"
    commits = ", ".join(sorted(runs["tag:git.commit"].dropna().unique())) or "not recorded"
    header = Section(
        "Protocol",
        [
            f"Experiment '{experiment}' ({uri}); {len(runs)} finished trial runs.",
            f"Datasets: {', '.join(sorted(runs['dataset'].unique()))}. Budget profiles: "
            f"{', '.join(sorted(runs['tag:budget'].dropna().unique()))}. Baseline arm: {baseline}"
            + ("." if compared else " (no runs yet)."),
            *[f"Evaluation, {line}" for line in protocol],
            f"Software: {versions}. Git commit(s): {commits}.",
            f"Runs from {runs['start'].min():%Y-%m-%d %H:%M} to {runs['end'].max():%Y-%m-%d %H:%M} UTC.",
        ],
    )
    found = Section(
        "Findings", [*findings(summary, baseline, rho), HOW_TO_READ] if compared else [no_baseline_note(baseline)]
    )

    # --- per dataset ---------------------------------------------------------------------------
    sections = [header, found]
    for dataset, rows in summary.groupby("dataset"):
        objective = rows["objective"].iloc[0]
        table = pd.DataFrame(
            {
                "arm": rows["arm"],
                f"{objective} mean ± std": [
                    f"{m:.4g} ± {s:.2g}" if s == s else (f"{m:.4g}" if m == m else "—")
                    for m, s in zip(rows["mean"], rows["std"])
                ],
                "seeds": rows["n_seeds"],
                **(_comparison_columns(rows, baseline) if compared else {}),
                "params (M)": rows["params"] / 1e6,
                "train img/s": rows["img_per_s"],
                "peak mem (GB)": rows["peak_mem_gb"],
                "images seen": rows["images_seen"],
                "links": [_links(r, uri, data.experiment.experiment_id) for r in rows["run_ids"]],
            }
        )
        done = runs[(runs["dataset"] == dataset) & (runs["outcome"] == "complete")]
        grids = {}
        for arm, group in done.groupby("arm"):
            png = last_sample_grid(group.sort_values("seed")["run_id"].iloc[0])
            if png:
                grids[arm] = png
        figures = [
            *([forest(summary, dataset, baseline)] if compared else []),
            seed_points(summary, dataset),
            curves(done, histories, dataset, objective),
            loss_per_t_bin(done, dataset),
        ]
        if grids:
            figures.append(sample_grids(grids, dataset))
        sections.append(
            Section(f"Results: {dataset}", [] if compared else [no_baseline_note(baseline)], [table], figures)
        )

    # --- budget and untidy data ---------------------------------------------------------------
    budget = summary[["dataset", "arm", "wall_s", "images_seen", "device", "precision", "n_seeds"]].copy()
    budget["wall (min)"] = budget.pop("wall_s") / 60
    total = pd.DataFrame(
        [
            {
                "dataset": "total",
                "arm": "",
                "wall (min)": budget["wall (min)"].sum(),
                "images_seen": (summary["images_seen"] * summary["n_seeds"]).sum(),
                "device": "",
                "precision": "",
                "n_seeds": budget["n_seeds"].sum(),
            }
        ]
    )
    sections.append(
        Section(
            "Budget accounting",
            [
                "Wall time is each run's start to end, summed; images seen are "
                "per completed run (the total multiplies by seeds)."
            ],
            [pd.concat([budget, total], ignore_index=True)],
        )
    )
    left = runs[runs["outcome"] != "complete"]
    notes = [
        f"{len(data.running)} RUNNING run(s) left out: "
        + ", ".join(f"{r['arm']} seed {r['tag:seed']} ({r['run_id'][:8]})" for _, r in data.running.iterrows())
        if len(data.running)
        else "No RUNNING runs."
    ]
    notes.append(
        "Not completed: " + ", ".join(f"{k} {v}" for k, v in left["outcome"].value_counts().items())
        if len(left)
        else "Every finished run completed."
    )
    notes += [f"Arm {r['arm']} ({r['dataset']}): {r['note']}." for _, r in summary.iterrows() if r["note"]]
    listing = left[["arm", "dataset", "tag:seed", "outcome", "tag:reason", "run_id"]].rename(
        columns={"tag:seed": "seed", "tag:reason": "reason"}
    )
    sections.append(Section("Left out", notes, [listing]))

    # --- write: into temporary names, then renamed, so a crash leaves no half-written report ---
    out.mkdir(parents=True, exist_ok=True)
    title = f"LiquidDiffusion ablation report: {experiment}"
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        tmp = Path(tmp)
        summary.to_csv(tmp / "summary.csv", index=False)
        write_html(tmp / "report.html", title, sections)
        pages = write_pdf(tmp / "report.pdf", title, sections)
        for name in ("summary.csv", "report.html", "report.pdf"):
            os.replace(tmp / name, out / name)
    return {"runs": len(runs), "pages": pages, "seconds": time.perf_counter() - started}


def no_baseline_note(baseline: str) -> str:
    return (
        f"No comparison: the baseline arm '{baseline}' has no runs in this experiment yet. Train it with "
        f"`python study/run.py --ablation {baseline}` (same options as the other arms) and build the report again."
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import mlflow

    if args.tracking_uri:
        mlflow.set_tracking_uri(args.tracking_uri)
    check_tracking_uri(mlflow.get_tracking_uri())
    result = build(args.experiment, args.out, args.baseline)
    print(
        f"report of {result['runs']} runs in {result['seconds']:.1f} s: {args.out / 'report.html'}, "
        f"{args.out / 'report.pdf'} ({result['pages']} pages), {args.out / 'summary.csv'}"
    )
    return 0


def cli(argv: list[str] | None = None) -> int:
    """The exit code of `python reports/build.py ARGV`: main() with the command lines' error handling."""
    return run_command(lambda: main(argv), "build.py", "no report was written")


if __name__ == "__main__":
    sys.exit(cli())
