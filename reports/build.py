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
    runs_page,
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
        return " ".join(f"<a href='{runs_page(uri, experiment_id, i)}'>{i[:8]}</a>" for i in ids)
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
    from reports.collect import collect, last_sample_grid, latest_pilot
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
    no_comparison = no_baseline_note(baseline, design_only=bool(runs["tag:design"].notna().all()))
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
    found = Section("Findings", [*findings(summary, baseline, rho), HOW_TO_READ] if compared else [no_comparison])

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
        sections.append(Section(f"Results: {dataset}", [] if compared else [no_comparison], [table], figures))
        sections += decision_sections(done, objective, baseline, dataset)

    pilot = latest_pilot(data.experiment.experiment_id)
    if pilot is not None:
        sections.append(pilot_section(pilot))

    # --- budget and untidy data ---------------------------------------------------------------
    budget = summary[["dataset", "arm", "wall_s", "cpu_s", "images_seen", "device", "precision", "n_seeds"]].copy()
    budget["wall (min)"] = budget.pop("wall_s") / 60
    budget["CPU (h)"] = budget.pop("cpu_s") / 3600
    total = pd.DataFrame(
        [
            {
                "dataset": "total",
                "arm": "",
                "wall (min)": budget["wall (min)"].sum(),
                "CPU (h)": budget["CPU (h)"].sum(min_count=1),
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
                "Wall time is each run's start to end, summed; CPU time is each run's own (time/cpu_s: every "
                "thread of every process that trained or evaluated it), blank for runs logged before it was kept; "
                "images seen are per completed run (the total multiplies by seeds)."
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
    design_arms = set(runs.loc[runs["tag:design"].notna(), "arm"])  # compared within their design, not with baseline
    notes += [
        f"Arm {r['arm']} ({r['dataset']}): {r['note']}."
        for _, r in summary.iterrows()
        if r["note"] and r["arm"] not in design_arms
    ]
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


def pilot_section(pilot):
    """The pilot's sizing table and figure (study/plan.py), as it logged them."""
    from reports.figures import Figure
    from reports.render import Section

    p = pilot.settings
    text = [
        f"Pilot run {pilot.run_id[:8]}: arms {p.get('arms')}, {p.get('pilot_seeds')} seeds, budget {p.get('budget')} "
        f"evaluated at {p.get('lengths')} images, each evaluation repeated {p.get('eval_repeats')} times with fresh "
        f"sample noise. Sized for a {p.get('design')} study of {p.get('study_arms')} arms and {p.get('comparisons')} "
        f"comparison(s): an effect of {float(p.get('effect_fraction', 'nan')):.0%} of the baseline's mean at "
        f"{float(p.get('power', 'nan')):.0%} power, family-wise alpha {p.get('alpha')} (Bonferroni-sized). The sd used "
        f"for planning is the upper {float(p.get('sd_confidence', 'nan')):.0%} confidence limit of the measured one; "
        "eval_share is the part of the paired differences' variance that evaluation noise makes.",
    ]
    columns = [
        "images",
        "cpu_min_per_run",
        "wall_min_per_run",
        "baseline_mean",
        "baseline_sd",
        "diff_sd",
        "diff_sd_upper",
        "eval_share",
        "effect",
        "seeds_needed",
        "study_cpu_hours",
        "recommended",
    ]
    table = pilot.table[[c for c in columns if c in pilot.table]]
    figure = Figure("Pilot: noise against run length, and the cost of the sized study", pilot.figure_png)
    return Section("Sizing (pilot)", text, [table], [figure])


def decision_sections(done, objective: str, baseline: str, dataset: str) -> list:
    """A section per design (and one for the arms against the baseline): every comparison's decision."""
    import pandas as pd

    from reports.decisions import replicated_effects, report_decisions
    from reports.figures import interactions
    from reports.render import Section

    sections = []
    for title, table, margin, settings in report_decisions(done, objective, baseline):
        if table.empty:
            continue
        m = len(table)
        how = (
            "anytime-valid (seeds were added until decided; the intervals hold at every look)"
            if settings["interval"] == "anytime"
            else "fixed-n t intervals"
        )
        text = [
            f"Reference: {settings['reference']}. Equivalence margin ±{margin:.4g} ({settings['margin']}, fixed "
            f"before the study). Intervals: {how}, each at {1 - settings['alpha'] / m:.4g} so that all {m} hold "
            f"together with probability {1 - settings['alpha']:g} (Bonferroni). Decision: equivalent when the "
            "interval lies inside the margin, better or worse when it excludes 0, else undecided, with roughly "
            "the seeds it would still need at the spread measured so far.",
        ]
        shown = pd.DataFrame(
            {
                "comparison": table["comparison"],
                "estimate": table["estimate"],
                "interval": [f"[{lo:+.4g}, {hi:+.4g}]" for lo, hi in zip(table["ci_low"], table["ci_high"])],
                "decision": table["decision"],
                "seeds": table["n"],
                "more seeds to decide": [
                    "" if d != "undecided" else (f"~{e:.0f}" if e == e and e is not None else "> 200")
                    for d, e in zip(table["decision"], table["extra_seeds"])
                ],
            }
        )
        if "aliased_with" in table and table["aliased_with"].astype(bool).any():
            shown["aliased with"] = table["aliased_with"]
        tables, figures = [shown], []
        if settings["factors"]:
            figures.append(interactions(settings["values"], settings["factors"], objective, title))
            replicated = replicated_effects(settings["values"].dropna(subset=["value"]), settings["factors"])
            if len(replicated):
                first, second = replicated.attrs["halves"]
                main = replicated[[" x " not in term for term in replicated["term"]]]
                text.append(
                    f"Replication: every effect estimated again on seeds {first} and on seeds {second} alone. "
                    f"{int(main['same_sign'].sum())} of {len(main)} main effects keep their sign in both halves."
                )
                tables.append(
                    replicated.rename(
                        columns={"first_half": f"seeds {first}", "second_half": f"seeds {second}", "term": "effect"}
                    )
                )
        sections.append(Section(f"Decisions: {dataset}, {title}", text, tables, figures))
    return sections


def no_baseline_note(baseline: str, design_only: bool) -> str:
    if design_only:  # a factorial has no baseline arm: its comparisons are its effects
        return (
            "Every run belongs to a factorial design: its comparisons are the design's effects, in the Decisions "
            "section below. `--baseline ARM` adds each arm's comparison with one of them (its reference arm, say)."
        )
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
