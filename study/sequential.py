"""Seeds until decided: train a round, read every comparison's decision from MLflow, add seeds only where a
comparison is still undecided, and stop when all are decided or a cap is reached.

The decisions use the anytime-valid intervals of reports/decisions.py, so looking after every round and
stopping when decided keeps the family-wise error rate. A rerun of the same command replays the rounds from
what MLflow holds (finished seeds are never trained again) and goes on where the last one stopped.
"""

from __future__ import annotations

import pandas as pd

from liquid_diffusion.cli import BASELINE_ARM
from liquid_diffusion.config import ConfigError
from reports.analysis import lower_is_better
from reports.decisions import FACTORS_TAG, factors_from_tag, parse_margin, study_decisions

from .designs import StoppingRule, next_seeds


def finished_values(plans) -> pd.DataFrame:
    """arm, seed, value, cpu_s and the factor levels of the completed trial runs of `plans`' studies."""
    import mlflow  # only once training: run.py --list and --dry-run do without it

    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name(plans[0].experiment)
    runs = mlflow.search_runs(
        [experiment.experiment_id], "tags.kind = 'trial' AND attributes.status = 'FINISHED'", output_format="pandas"
    )
    names = {plan.name for plan in plans}
    columns = ["arm", "seed", "value", "cpu_s"]
    if runs.empty:
        return pd.DataFrame(columns=columns)
    runs = runs[runs["tags.study"].isin(names)]
    objective = f"metrics.eval/{plans[0].objective}"
    out = pd.DataFrame(
        {
            "arm": runs["tags.ablation"],
            "seed": runs["tags.seed"].astype(int),
            "value": runs[objective] if objective in runs else float("nan"),
            "cpu_s": runs["metrics.time/cpu_s"] if "metrics.time/cpu_s" in runs else float("nan"),
        }
    )
    for column in [c for c in runs.columns if c.startswith("tags.factor.")]:
        out[column.removeprefix("tags.factor.")] = runs[column]
    return out.dropna(subset=["value"]).reset_index(drop=True)


def decisions_now(plans, reference: str):
    """The study's comparisons and decisions from what MLflow holds now, with the settings on its plans."""
    values = finished_values(plans)
    tags = plans[0].tags
    factors = factors_from_tag(plans[0].arm.tags[FACTORS_TAG]) if FACTORS_TAG in plans[0].arm.tags else None
    table, margin = study_decisions(
        values,
        reference,
        tags["decision.margin"],
        lower_is_better(plans[0].objective),
        sequential=True,
        alpha=float(tags["decision.alpha"]),
        factors=factors,
    )
    return values, table, margin


def run_until_decided(plans, train_round, rule: StoppingRule, reference: str, echo=print) -> int:
    """Rounds of `train_round(plans)` until every comparison is decided or `rule` stops it; the exit code."""
    factorial = FACTORS_TAG in plans[0].arm.tags
    seeds = {plan.arm.name: len(plan.seeds) for plan in plans}
    for number in range(1, 10_000):
        for plan in plans:
            plan.seeds = list(range(seeds[plan.arm.name]))
        by_count = {}
        for arm, count in seeds.items():
            by_count.setdefault(count, []).append(arm)
        echo(f"\n=== round {number}: " + "; ".join(f"{n} seeds for {', '.join(a)}" for n, a in by_count.items()))
        code = train_round(plans)
        if code:
            echo("a run of this round did not finish; rerun the same command to resume the study")
            return code
        values, table, margin = decisions_now(plans, reference)
        deciding = table[table["main"]] if len(table) else table
        for _, row in table.iterrows():
            echo(
                f"  {row['comparison']}: {row['estimate']:+.4g} [{row['ci_low']:+.4g}, {row['ci_high']:+.4g}] "
                f"-> {row['decision']}" + (f" (about {row['extra_seeds']} more seeds)" if row["extra_seeds"] else "")
            )
        spent = values["cpu_s"].sum() / 3600
        per_run = values["cpu_s"].mean() / 3600 if len(values) else 0.0
        grown, why = next_seeds(deciding, seeds, reference, factorial, rule, spent, per_run)
        if grown == seeds:
            echo(f"stopped after round {number}: {why}; margin +-{margin:.4g}; {spent:.2f} CPU-hours of runs")
            return 0
        seeds = grown
    raise AssertionError("unreachable: every round adds a seed and seeds are capped")


def check_settings(args) -> None:
    """study/run.py's decision settings, fixed before a study starts: bad ones stop the command before anything
    trains."""
    try:
        parse_margin(args.margin)
    except ValueError as err:
        raise ConfigError(f"--margin: {err}") from None
    if not args.until_decided:
        return
    if args.search or args.seed is not None:
        raise ConfigError(
            "--until-decided adds seeds itself; it takes --seeds N (the first round), not --seed, --search"
        )
    if "," in args.dataset:
        raise ConfigError(f"--until-decided runs one dataset at a time, not {args.dataset!r}")
    first = args.seeds or 3
    if first < 2 or first > args.max_seeds:
        raise ConfigError(
            f"--seeds {first} is not valid with --until-decided; expected 2 to --max-seeds {args.max_seeds}"
        )
    if not args.design and BASELINE_ARM not in [a.strip() for a in args.ablation.split(",")] and args.ablation != "all":
        raise ConfigError(f"--until-decided compares every arm with '{BASELINE_ARM}'; add it to --ablation")
