"""Size a study before paying for it: train a pilot, measure its noise against run length, recommend a budget.

python study/plan.py --ablation baseline,no_relax --budget cpu-demo --seeds 3 --lengths 20000,40000,80000,130000

The pilot trains each arm for each seed once, at the longest length, and evaluates it at every length on
the way. With a constant learning rate an evaluation at N images of a long run is exactly what a run of N
images ends with (same data, t and noise draws, same EMA), so one run measures every candidate budget.
Each evaluation is repeated with fresh sample noise, which splits the noise into the evaluation's share
(cured by a larger eval.n) and the training seed's (cured only by more seeds or longer runs). The table
(reports/sizing.py) gives, per length, the CPU minutes of a run, the spread of the paired differences, the
seeds needed and the CPU-hours of the study; the cheapest becomes a budget profile that study/run.py reads.
Rerunning the same command resumes the pilot; more --seeds adds seeds to it.
"""

from __future__ import annotations

import math
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from liquid_diffusion.cli import (  # noqa: E402
    BASELINE_ARM,
    OneLineParser,
    add_runtime_arguments,
    float_between,
    int_at_least,
    run_command,
)
from liquid_diffusion.config import ConfigError, ExperimentConfig, eval_prefix  # noqa: E402
from reports import sizing  # noqa: E402
from study.arms import ABLATIONS_DIR, OverrideSet, load_arms  # noqa: E402
from study.budgets import BUDGETS_FILE, get_budget, load_budgets  # noqa: E402

DEFAULT_EXPERIMENT = "pilot"  # apart from the studies it sizes, so their reports never mix pilot runs in
PILOT_SUFFIX = "-pilot"  # the pilot's budget is the sized one's, named with this suffix


def build_parser():
    parser = OneLineParser(prog="plan.py", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--ablation",
        default=f"{BASELINE_ARM},no_relax",
        metavar="A,B[,...]",
        help="the pilot's arms; the first is the baseline (default: %(default)s)",
    )
    parser.add_argument(
        "--budget", default="cpu-demo", help="the profile to size, from study/budgets.yaml (default: %(default)s)"
    )
    parser.add_argument("--seeds", type=int_at_least(2), default=3, help="pilot seeds 0..N-1 (default: %(default)s)")
    parser.add_argument(
        "--lengths",
        default=None,
        metavar="N1,N2,...",
        help="candidate budgets in training images (default: 1/8, 1/4, 1/2 and all of the budget's)",
    )
    parser.add_argument(
        "--eval-repeats",
        type=int_at_least(2),
        default=3,
        help="evaluations of each checkpoint with fresh sample noise (default: %(default)s)",
    )
    parser.add_argument(
        "--effect",
        type=float_between(0, 1),
        default=sizing.EFFECT_FRACTION,
        help="the effect to detect, as a share of the baseline's mean (default: %(default)s)",
    )
    parser.add_argument(
        "--factors",
        type=int_at_least(0),
        default=0,
        help="size a 2^K factorial over K factors instead of one-at-a-time arms (default: 0)",
    )
    parser.add_argument(
        "--study-arms",
        type=int_at_least(2),
        default=None,
        help="arms of the sized study (default: 2^K with --factors, else the pilot's arms)",
    )
    parser.add_argument(
        "--comparisons",
        type=int_at_least(1),
        default=None,
        help="tests the study corrects for (default: K with --factors, else arms - 1)",
    )
    parser.add_argument("--power", type=float_between(0, 1), default=sizing.POWER, help="(default: %(default)s)")
    parser.add_argument(
        "--alpha", type=float_between(0, 1), default=sizing.ALPHA, help="family-wise (default: %(default)s)"
    )
    parser.add_argument("--experiment", default=DEFAULT_EXPERIMENT, help="MLflow experiment (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=Path("outputs"), help="run folders (default: %(default)s)")
    parser.add_argument("--storage", default=None, metavar="URL", help="Optuna storage (default: as study/run.py)")
    parser.add_argument(
        "--write-budget",
        type=Path,
        default=None,
        metavar="FILE",
        help="where the recommended profile goes (default: OUT/EXPERIMENT/recommended-budget.yaml)",
    )
    add_runtime_arguments(parser)
    parser.add_argument("--budgets-file", type=Path, default=BUDGETS_FILE, help="(default: study/budgets.yaml)")
    return parser


def parse_lengths(text: str | None, images: int) -> list[int]:
    if text is None:
        return sorted({max(1, images // 8), max(1, images // 4), max(1, images // 2), images})
    try:
        lengths = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise ConfigError(f"--lengths {text!r} is not valid; expected image counts such as 20000,40000,80000") from None
    if len(lengths) < 2 or lengths[0] < 1:
        raise ConfigError(f"--lengths {text!r} is not valid; expected at least two image counts >= 1")
    return lengths


def pilot_budget(budget: OverrideSet, lengths: list[int], repeats: int) -> OverrideSet:
    """The budget at its longest candidate length, evaluated at every length with `repeats` noise draws."""
    cfg = budget.apply(ExperimentConfig())
    if cfg.train.lr_schedule != "constant":
        raise ConfigError(
            f"budget '{budget.name}' has train.lr_schedule {cfg.train.lr_schedule}; a pilot evaluates several "
            "lengths in one run, which is exact only with the constant schedule"
        )
    overrides = {
        **budget.overrides,
        # The pilot is judged by CPU time; a wall-clock cap would end runs early on a machine shared with other work.
        "train.max_wall_minutes": 0,
        "train.images": lengths[-1],
        "train.eval_every_images": lengths[-1],
        "train.eval_at_images": lengths,
        "eval.noise_repeats": repeats,
    }
    name = budget.name + PILOT_SUFFIX
    return OverrideSet(name, f"pilot of {budget.name} at {lengths} images", overrides, budget.source)


def train_pilot(args, budget: OverrideSet) -> int:
    """Train the pilot's arms through study/run.py's own driver (resume, retries, tracking), one seed at a
    time: every finished seed is a pair, so a pilot stopped early still has its differences."""
    from study import run

    arms = load_arms(ABLATIONS_DIR, base=budget.apply(ExperimentConfig()))
    code = 0
    for seed in range(args.seeds):
        argv = ["--ablation", args.ablation, "--seed", str(seed), "--budget", budget.name]
        argv += ["--experiment", args.experiment, "--out", str(args.out), "--device", args.device]
        argv += ["--storage", args.storage] if args.storage else []
        argv += ["--cache-dir", str(args.cache_dir)] if args.cache_dir else []
        argv += ["--no-progress"] if args.no_progress else []
        run_args = run.build_parser().parse_args(argv)
        code = max(code, run.train(run_args, argv, run.build_plans(run_args, arms, budget), show_next=False))
    return code


def pilot_frames(experiment: str, budget: str, lengths: list[int], repeats: int, arms: list[str]):
    """(values, costs) of the pilot's finished runs, in the shapes reports.sizing reads."""
    import mlflow
    import pandas as pd

    from reports.collect import metric_histories

    client = mlflow.MlflowClient()
    found = client.get_experiment_by_name(experiment)
    runs = mlflow.search_runs(
        [found.experiment_id],
        f"tags.kind = 'trial' AND tags.budget = '{budget}' AND attributes.status = 'FINISHED'",
        output_format="pandas",
    )
    runs = runs[runs["tags.ablation"].isin(arms)]
    objective = runs["tags.eval.objective"].mode().iloc[0].removeprefix("eval/")
    keys = {f"{eval_prefix(k)}{objective}" for k in range(repeats)}
    keys |= {"eval/cpu_s", "eval/seconds", "time/train_cpu_s", "time/train_s"}
    history = metric_histories(client, list(runs["run_id"]), keys)
    who = runs.set_index("run_id")[["tags.ablation", "tags.seed"]]
    history["arm"] = history["run_id"].map(who["tags.ablation"])
    history["seed"] = history["run_id"].map(who["tags.seed"]).astype(int)
    values, costs = [], []
    for (_run, arm, seed), points in history.groupby(["run_id", "arm", "seed"]):
        at = points.pivot_table(index="step", columns="key", values="value", aggfunc="last")
        if not keys <= set(at.columns):  # a run that has not reached its first evaluation yet
            continue
        for length in lengths:
            step = next((s for s in at.index if s >= length), None)  # pivot_table sorts the steps
            if step is None:
                continue
            row = at.loc[step]
            values += [
                {"arm": arm, "seed": seed, "repeat": k, "length": length, "value": row[f"{eval_prefix(k)}{objective}"]}
                for k in range(repeats)
            ]
            costs.append(
                {
                    "arm": arm,
                    "seed": seed,
                    "length": length,
                    "cpu_s": row["time/train_cpu_s"] + row["eval/cpu_s"],
                    "wall_s": row["time/train_s"] + row["eval/seconds"] / repeats,
                }
            )
    return pd.DataFrame(values), pd.DataFrame(costs), f"eval/{objective}"


def recommended_profile(budget: OverrideSet, row, pilot_seeds: int) -> dict:
    """The recommended length as a budget profile: the sized one with its images and evaluation changed."""
    images = int(row["images"])
    name = f"{budget.name}-{images // 1000}k" if images % 1000 == 0 else f"{budget.name}-{images}"
    overrides = {**budget.overrides, "train.images": images, "train.eval_every_images": images}
    return {name: {"description": sizing.describe(row, pilot_seeds), "overrides": overrides}}


def log_pilot(experiment: str, table, objective: str, profile_yaml: str, settings: dict) -> str:
    """The pilot's own MLflow run (tag kind=pilot): its table, figure, profile and settings."""
    import mlflow

    from reports.figures import sizing as sizing_figure
    from study.tracking import set_experiment

    set_experiment(experiment)
    with mlflow.start_run(run_name="pilot", tags={"kind": "pilot", "eval.objective": objective}) as run:
        mlflow.log_params(settings)
        with tempfile.TemporaryDirectory() as tmp:
            table.to_csv(Path(tmp) / "sizing.csv", index=False)
            (Path(tmp) / "sizing.png").write_bytes(sizing_figure(table, objective).png)
            (Path(tmp) / "recommended-budget.yaml").write_text(profile_yaml)
            mlflow.log_artifacts(tmp)
    return run.info.run_id


def print_table(table, objective: str, confidence: float) -> None:
    print(f"\nSizing from the pilot ({objective}; sd upper = the {confidence:.0%} upper confidence limit of the sd):")
    columns = {
        "images": "{:,.0f}",
        "cpu_min_per_run": "{:.2f}",
        "wall_min_per_run": "{:.2f}",
        "baseline_mean": "{:.4g}",
        "diff_sd": "{:.3g}",
        "diff_sd_upper": "{:.3g}",
        "eval_share": "{:.0%}",
        "seeds_needed": "{}",
        "study_cpu_hours": "{:.2f}",
    }
    rows = [
        [fmt.format(v) if v == v and v is not None else "-" for v, fmt in zip(r, columns.values())]
        for r in table[list(columns)].itertuples(index=False)
    ]
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)) + "  recommended")
    for r, chosen in zip(rows, table["recommended"]):
        print("  ".join(v.rjust(w) for v, w in zip(r, widths)) + ("  <-" if chosen else ""))


def main(argv: list[str] | None = None) -> int:
    import yaml

    args = build_parser().parse_args(argv)
    budget = get_budget(load_budgets(args.budgets_file), args.budget)
    arm_names = [name.strip() for name in args.ablation.split(",") if name.strip()]
    if len(arm_names) < 2:
        raise ConfigError(f"--ablation {args.ablation!r}: a pilot needs the baseline and at least one other arm")
    lengths = parse_lengths(args.lengths, budget.apply(ExperimentConfig()).train.images)
    pilot = pilot_budget(budget, lengths, args.eval_repeats)
    code = train_pilot(args, pilot)

    values, costs, objective = pilot_frames(args.experiment, pilot.name, lengths, args.eval_repeats, arm_names)
    baseline = arm_names[0]
    seeds_done = values[values["arm"] == baseline]["seed"].nunique() if len(values) else 0
    if seeds_done < 2:
        print(
            f"plan.py: the pilot has {seeds_done} finished seed(s) of {baseline}; at least 2 are needed "
            "(rerun the same command to resume it)",
            file=sys.stderr,
        )
        return 1
    study_arms = args.study_arms or (2**args.factors if args.factors else len(arm_names))
    comparisons = args.comparisons or (args.factors or study_arms - 1)
    table = sizing.sizing_table(
        values, costs, baseline, study_arms, comparisons, args.factors, args.effect, args.alpha, args.power
    )
    print_table(table, objective, sizing.SD_CONFIDENCE)
    design = f"2^{args.factors} factorial" if args.factors else "one-at-a-time"
    print(
        f"for a {design} study of {study_arms} arms and {comparisons} comparison(s), effect {args.effect:.0%} "
        f"of the baseline's mean, power {args.power:.0%}, family-wise alpha {args.alpha:g} (Bonferroni-sized, "
        f"so conservative for Holm)"
    )
    settings = {
        "arms": args.ablation,
        "budget": args.budget,
        "pilot_seeds": seeds_done,
        "lengths": lengths,
        "eval_repeats": args.eval_repeats,
        "effect_fraction": args.effect,
        "design": design,
        "study_arms": study_arms,
        "comparisons": comparisons,
        "power": args.power,
        "alpha": args.alpha,
        "sd_confidence": sizing.SD_CONFIDENCE,
    }
    chosen = table[table["recommended"]]
    if chosen.empty:
        print(f"no length reaches {args.power:.0%} power within {sizing.MAX_SEEDS} seeds; no profile recommended")
        log_pilot(args.experiment, table, objective, yaml.safe_dump({}), settings)
        return 1
    profile = recommended_profile(budget, chosen.iloc[0], seeds_done)
    profile_yaml = yaml.safe_dump(profile, sort_keys=False, width=100)
    run_id = log_pilot(args.experiment, table, objective, profile_yaml, settings)
    path = args.write_budget or args.out / args.experiment / "recommended-budget.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(profile_yaml)
    tmp.replace(path)  # never a half-written profile
    name, row = next(iter(profile)), chosen.iloc[0]
    print(
        f"\nPilot run {run_id} in experiment '{args.experiment}'. Recommended: {name}, {row['seeds_needed']} seeds "
        f"(about {row['study_cpu_hours']:.1f} CPU-hours), written to {path}"
    )
    print(
        f"Next:\n  python study/run.py --ablation {args.ablation} --budgets-file {path} --budget {name} "
        f"--seeds {row['seeds_needed']}    # the sized study"
    )
    if not math.isfinite(row["eval_share"]):
        print("  (the evaluation-noise share could not be estimated)")
    return code


def cli(argv: list[str] | None = None) -> int:
    return run_command(
        lambda: main(argv), "plan.py", "the pilot's trial is marked; rerunning the same command resumes it"
    )


if __name__ == "__main__":
    sys.exit(cli())
