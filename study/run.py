"""Command line: list ablation arms, print their resolved configs, and train them as Optuna studies into MLflow.

One study per (arm, dataset, budget); its trials are seeds (--seeds N) or a TPE search (--search N).
Rerunning the same command continues every study: finished trials are never run again, and
interrupted ones resume from their checkpoints.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

# Run as a script (`python study/run.py`): make the repository root importable for `study.*`.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import yaml  # noqa: E402

from liquid_diffusion.cli import (  # noqa: E402
    BASELINE_ARM,
    DEFAULT_EXPERIMENT,
    DEFAULT_TRACKING_URI,
    MLFLOW_UI,
    OneLineParser,
    add_runtime_arguments,
    check_tracking_uri,
    float_between,
    int_at_least,
    run_command,
    runs_page,
)
from liquid_diffusion.config import ConfigError, ExperimentConfig  # noqa: E402
from reports.decisions import MARGIN_TEXT  # noqa: E402
from study.arms import ABLATIONS_DIR, load_arms, select_arms  # noqa: E402
from study.budgets import BUDGETS_FILE, get_budget, load_budgets, resolve_config  # noqa: E402
from study.search import SEARCH_SPACE_FILE  # noqa: E402
from study.sequential import check_settings  # noqa: E402
from study.storage import HEARTBEAT_SECONDS, redact  # noqa: E402
from study.weights import add_weights_arguments, inception_weights_for  # noqa: E402

non_negative_int = int_at_least(0)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="run.py", description=__doc__)
    parser.add_argument("--list", action="store_true", help="print every ablation arm with its description")
    parser.add_argument("--ablation", metavar="A[,B,...]|all", help="arm(s) to run, by file name in ablations/")
    parser.add_argument(
        "--design",
        metavar="NAME|FILE",
        help="a factorial design from ablations/designs/ (or a .yaml path): its arms are generated, one per "
        "combination of the factors' levels",
    )
    parser.add_argument(
        "--dataset",
        default="mnist",
        metavar="D[,D,...]",
        help="mnist (embedded), afhq, celeba, flowers, pokemon, anime, cartoon, hf:owner/name, or a "
        "folder of images; several, comma-separated, make a cross product with the arms "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--budget", default="cpu-demo", help="budget profile from study/budgets.yaml (default: %(default)s)"
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--seeds",
        type=int_at_least(1),
        default=None,
        metavar="N",
        help="train seeds 0..N-1 of every arm (default: 1, i.e. seed 0)",
    )
    mode.add_argument("--seed", type=non_negative_int, default=None, help="train this one seed")
    mode.add_argument(
        "--search",
        type=int_at_least(1),
        default=None,
        metavar="N",
        help="tune with TPE for N trials over the space in --search-space, pruning on the objective",
    )
    parser.add_argument(
        "--until-decided",
        action="store_true",
        help="sequential seeds: start with --seeds N (default 3), then add seeds to the comparisons still "
        "undecided, with anytime-valid intervals, until all are decided or a cap is reached",
    )
    parser.add_argument(
        "--max-seeds",
        type=int_at_least(2),
        default=10,
        metavar="N",
        help="--until-decided: never more seeds than this per arm (default: %(default)s)",
    )
    parser.add_argument(
        "--max-cpu-hours",
        type=float_between(0),
        default=None,
        metavar="H",
        help="--until-decided: no round that would take the study's runs past H CPU-hours (default: no cap)",
    )
    parser.add_argument(
        "--margin",
        default=MARGIN_TEXT,
        help="the equivalence margin, fixed before the study: a share of the reference arm's mean (5%%) or a "
        "number in the objective's units (default: %(default)s)",
    )
    parser.add_argument(
        "--alpha",
        type=float_between(0, 1),
        default=0.05,
        help="family-wise error rate of the study's decisions (default: %(default)s)",
    )
    parser.add_argument("--round-seeds", default=None, help=argparse.SUPPRESS)  # a worker: this round's seeds per arm
    parser.add_argument(
        "--search-space",
        type=Path,
        default=SEARCH_SPACE_FILE,
        metavar="FILE",
        help="YAML search space and pruner for --search (default: study/search_space.yaml)",
    )
    parser.add_argument(
        "--storage",
        default=None,
        metavar="URL",
        help="Optuna storage shared by all workers: an SQLAlchemy URL (postgresql://...) or a journal "
        "file (journal:PATH or PATH.log) (default: optuna.db beside a sqlite mlflow.db)",
    )
    parser.add_argument(
        "--workers",
        type=int_at_least(1),
        default=1,
        metavar="K",
        help="local worker processes that split the trials (default: %(default)s)",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="print each arm's resolved config as YAML and train nothing"
    )
    parser.add_argument(
        "--experiment", default=DEFAULT_EXPERIMENT, help="MLflow experiment name (default: %(default)s)"
    )
    parser.add_argument(
        "--out", type=Path, default=Path("outputs"), help="run folders with checkpoints (default: %(default)s)"
    )
    add_runtime_arguments(parser)
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the training forward: same results to float rounding, faster steps after "
        "minutes of compiling; worth it for long runs only",
    )
    parser.add_argument(
        "--upload-checkpoints",
        action="store_true",
        help="also keep each checkpoint in the MLflow run's artifacts, so that a retry on another machine "
        "resumes from it (always on with a tracking server, http:// or https://)",
    )
    add_weights_arguments(parser)
    parser.add_argument(
        "--ablations-dir", type=Path, default=ABLATIONS_DIR, help="where the arm files live (default: %(default)s)"
    )
    parser.add_argument(
        "--budgets-file",
        type=Path,
        default=BUDGETS_FILE,
        metavar="FILE",
        help="where --budget's profiles are read, e.g. the one study/plan.py recommends (default: study/budgets.yaml)",
    )
    parser.add_argument("--heartbeat-seconds", type=int_at_least(1), default=HEARTBEAT_SECONDS, help=argparse.SUPPRESS)
    parser.add_argument("--worker", type=int, default=0, help=argparse.SUPPRESS)  # child K of --workers: studies exist
    return parser


class _ConfigDumper(yaml.SafeDumper):
    """Block-style mappings with short lists kept on one line, e.g. `channels: [32, 64, 128]`."""


_ConfigDumper.add_representer(
    list, lambda dumper, value: dumper.represent_sequence("tag:yaml.org,2002:seq", value, flow_style=True)
)


def dump_config(cfg: ExperimentConfig) -> str:
    return yaml.dump(cfg.to_dict(), Dumper=_ConfigDumper, sort_keys=False)


def worker_argv(argv: list[str], number: int) -> list[str]:
    """This command's arguments for child worker `number`: without --workers, without progress bars."""
    out, skip = [], False
    for token in argv:
        if skip:
            skip = False
        elif token == "--workers":
            skip = True
        elif not token.startswith("--workers="):
            out.append(token)
    return [*out, "--worker", str(number), "--no-progress"]


def run_workers(count: int, argv: list[str]) -> int:
    """Start `count` worker processes on the prepared studies and wait for them.

    Each gets an equal share of the CPU threads: oversubscribed torch threads slow every worker down
    many times over. Ctrl-C or SIGTERM here is passed on as SIGTERM, which each worker turns into a
    clean stop of its current trial.
    """
    script = str(Path(__file__).resolve())
    env = {**os.environ}
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // count)))
    workers = [subprocess.Popen([sys.executable, script, *worker_argv(argv, i)], env=env) for i in range(1, count + 1)]
    try:
        codes = [worker.wait() for worker in workers]
    except KeyboardInterrupt:
        for worker in workers:
            if worker.poll() is None:
                worker.send_signal(signal.SIGTERM)
        for worker in workers:
            worker.wait()
        raise
    if 2 in codes:
        return 2
    if 130 in codes:
        raise KeyboardInterrupt
    return max(codes)


def train(args, argv: list[str], plans, show_next: bool = True) -> int:
    # A dead tracking server fails first, in a second, before the seconds of imports below
    check_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_TRACKING_URI))
    import mlflow  # torch, diffusers, mlflow and optuna load only when training
    from optuna.trial import TrialState

    from liquid_diffusion.train import resolve_device
    from study.driver import Book, Driver
    from study.remote_checkpoints import uploads_wanted
    from study.storage import default_storage_url, open_storage
    from study.tracking import existing_run_id, open_tracking_store
    from study.trial import RuntimeOptions, run_dir_for

    resolve_device(args.device)  # --device cuda on a machine without CUDA fails here, before any storage exists
    open_tracking_store()
    for plan in plans:  # so does a run folder left by another tracking store
        for seed in plan.seeds or []:
            existing_run_id(
                run_dir_for(args.out, plan.experiment, plan.arm.name, plan.config_for(seed, {}), plan.budget)
            )
    weights = inception_weights_for([plan.base for plan in plans], args)  # fails here, before anything trains
    url = args.storage or default_storage_url(mlflow.get_tracking_uri())
    prefix = f"[worker {args.worker}] " if args.worker else ""
    runtime = RuntimeOptions(
        device=args.device,
        cache_dir=args.cache_dir,
        progress=not args.no_progress,
        weights=weights,
        compile=args.compile,
        upload_checkpoints=uploads_wanted(mlflow.get_tracking_uri(), args.upload_checkpoints),
    )
    driver = Driver(
        open_storage(url, args.heartbeat_seconds),
        url,
        args.out,
        runtime,
        echo=lambda line: print(prefix + line.replace("\n", "\n" + prefix), flush=True),
        worker_number=args.worker,
    )
    for plan in plans:  # a dataset that cannot be had fails here, before any study or run exists
        driver.source_for(plan.base)
    try:
        if not args.worker:  # studies, queues and parent runs exist before any worker starts
            for plan in plans:
                driver.prepare(plan)
        if args.workers > 1:
            code = run_workers(args.workers, argv)
            if code == 2:
                return 2
        else:
            driver.work(plans)
    except KeyboardInterrupt:
        driver.interrupted(plans)
        raise
    if args.worker:
        return 1 if driver.failures else 0

    print()
    failed = 0
    for plan in plans:
        study = driver.study(plan)
        summary = driver.summarize(plan, study)
        book = Book(study)
        failed += summary["study/n_failed"]
        result = (
            f"{plan.objective} mean {summary['study/mean']:.6g} +- {summary['study/std']:.3g}, best "
            f"{summary['study/best']:.6g}"
            if "study/mean" in summary
            else "no completed trial"
        )
        resumable = summary["study/n_resumable"]
        print(
            f"study {plan.name}: {summary['study/n_complete']:.0f} complete, {summary['study/n_pruned']:.0f} pruned, "
            f"{summary['study/n_failed']:.0f} failed"
            + (f" ({resumable:.0f} resumed by rerunning this command)" if resumable else "")
            + f", {len(book.of_state(TrialState.RUNNING))} running; {result}"
        )
        driver.close(plan, study)
    print(f"\nOptuna storage: {redact(url)}")
    if show_next:
        print("Next:")
        for command, why in next_steps(argv, plans, redact(url)):
            print(f"  {command}    # {why}")
    return 1 if failed else 0


def with_ablation(argv: list[str], arm: str) -> list[str]:
    """This command's arguments with --ablation replaced by `arm`."""
    out, replace_next = [], False
    for token in argv:
        if replace_next:
            token, replace_next = arm, False
        elif token == "--ablation":
            replace_next = True
        elif token.startswith("--ablation="):
            token = f"--ablation={arm}"
        out.append(token)
    return out


def next_steps(argv: list[str], plans, storage_url: str) -> list[tuple[str, str]]:
    """The commands to run next, each as it can be typed in this shell: the baseline arm if an experiment
    has no finished run of it (the report compares every arm with it), the report, then the two UIs."""
    import mlflow

    client = mlflow.MlflowClient()
    steps, pages = [], []
    for experiment in sorted({plan.experiment for plan in plans}):
        experiment_id = client.get_experiment_by_name(experiment).experiment_id
        pages.append(experiment_id)
        found = client.search_runs(
            [experiment_id],
            f"tags.kind = 'trial' AND tags.ablation = '{BASELINE_ARM}' AND attributes.status = 'FINISHED'",
            max_results=1,
        )
        if not found and not any("design" in plan.arm.tags for plan in plans):  # a design has its own reference
            baseline = shlex.join(["python", "study/run.py", *with_ablation(argv, BASELINE_ARM)])
            steps.append((baseline, "the arm the report compares with; it has no finished run yet"))
        named = ["--experiment", experiment] if experiment != DEFAULT_EXPERIMENT else []
        report = ["python", "reports/build.py", *named]
        steps.append((shlex.join(report), "the report: report/report.html, report.pdf and summary.csv"))
    uri = mlflow.get_tracking_uri()
    server = uri.startswith(("http://", "https://"))
    addresses = ", ".join(runs_page(uri if server else MLFLOW_UI, page) for page in pages)
    if server:
        steps.append((f"open {runs_page(uri, pages[0])}", "the runs in the tracking server's UI"))
    else:
        steps.append((f"mlflow ui --backend-store-uri {uri}", f"the runs in a browser: {addresses}"))
    steps.append((f"optuna-dashboard {storage_url}", "the studies in a browser"))
    return steps


def build_plans(args, arms, budget) -> list:
    from study.designs import load_design
    from study.plans import StudyPlan
    from study.search import load_search_space

    datasets = [name.strip() for name in args.dataset.split(",") if name.strip()]
    if not datasets:
        raise ConfigError(f"--dataset {args.dataset!r} names no dataset")
    selected = load_design(args.design).arms(budget) if args.design else select_arms(arms, args.ablation)
    space = load_search_space(args.search_space) if args.search else None
    seeds = [args.seed] if args.seed is not None else list(range(args.seeds or (3 if args.until_decided else 1)))
    settings = {
        "decision.margin": args.margin,
        "decision.alpha": f"{args.alpha:g}",
        "decision.interval": "anytime" if args.until_decided else "fixed",
    }
    if args.until_decided:
        settings["decision.max_seeds"] = str(args.max_seeds)
        if args.max_cpu_hours is not None:
            settings["decision.max_cpu_hours"] = f"{args.max_cpu_hours:g}"
    plans = []
    for dataset in datasets:
        for arm in selected:
            base = resolve_config(arm, budget, dataset, seeds[0] if not args.search else (args.seed or 0))
            plans.append(
                StudyPlan(
                    arm,
                    base.data.dataset,
                    args.budget,
                    base,
                    args.experiment,
                    seeds=None if args.search else seeds,
                    search=space.for_budget(base) if space else None,
                    n_trials=args.search or 0,
                    search_seed=args.seed or 0,
                    tags=settings,
                )
            )
    if args.round_seeds:  # a worker of a sequential round: that round's seeds, per arm
        counts = dict(part.split("=") for part in args.round_seeds.split(","))
        for plan in plans:
            plan.seeds = list(range(int(counts[plan.arm.name])))
    return plans


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    budgets = load_budgets(args.budgets_file)
    budget = get_budget(budgets, args.budget)
    arms = load_arms(args.ablations_dir, base=budget.apply(ExperimentConfig()))  # a bad arm file fails every command
    if args.list:
        width = max(map(len, arms))
        for arm in arms.values():
            print(f"{arm.name:<{width}}  {arm.description}")
        return 0
    if args.ablation and args.design:
        raise ConfigError("--ablation and --design both choose the arms; pass one of them")
    if not (args.ablation or args.design):
        raise ConfigError("nothing to do; pass --list, --ablation NAME[,NAME...]|all or --design NAME (see --help)")
    check_settings(args)
    plans = build_plans(args, arms, budget)
    if args.dry_run:
        for i, plan in enumerate(plans):
            metrics, objective = plan.base.metrics, plan.base.objective
            mode = f"search, {plan.n_trials} trials" if plan.search else f"seeds {plan.seeds}"
            print(
                ("---\n" if i else "")
                + f"# study: {plan.name} ({mode})\n# arm: {plan.arm.name} - {plan.arm.description}\n"
                f"# eval metrics: {', '.join(metrics)}; objective: {objective}\n" + dump_config(plan.base),
                end="",
            )
        return 0
    argv = sys.argv[1:] if argv is None else argv
    if args.until_decided and not args.worker:
        return train_until_decided(args, argv, plans)
    return train(args, argv, plans)


def train_until_decided(args, argv: list[str], plans) -> int:
    """Rounds of seeds (study/sequential.py); each round trains like any command, its workers told its seeds."""
    from study.designs import StoppingRule
    from study.sequential import run_until_decided

    reference = plans[0].arm.name if args.design else BASELINE_ARM

    def train_round(round_plans) -> int:
        counts = ",".join(f"{plan.arm.name}={len(plan.seeds)}" for plan in round_plans)
        return train(args, [*argv, "--round-seeds", counts], round_plans, show_next=False)

    code = run_until_decided(plans, train_round, StoppingRule(args.max_seeds, args.max_cpu_hours), reference)
    named = ["--experiment", args.experiment] if args.experiment != DEFAULT_EXPERIMENT else []
    print(f"Next:\n  {shlex.join(['python', 'reports/build.py', *named])}    # the report, with every decision")
    return code


def cli(argv: list[str] | None = None) -> int:
    """The exit code of `python study/run.py ARGV`: main() with the command lines' error handling."""
    on_interrupt = "the trial is marked (MLflow KILLED) and rerunning the same command resumes it"
    return run_command(lambda: main(argv), "run.py", on_interrupt)


if __name__ == "__main__":
    sys.exit(cli())
