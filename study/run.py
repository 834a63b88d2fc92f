"""Command line: list ablation arms, print their resolved configs, and train them into MLflow runs."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# Run as a script (`python study/run.py`): make the repository root importable for `study.*`.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import yaml  # noqa: E402

from liquid_diffusion.config import ConfigError, ExperimentConfig  # noqa: E402
from study.arms import ABLATIONS_DIR, load_arms, select_arms  # noqa: E402
from study.budgets import BUDGETS_FILE, get_budget, load_budgets, resolve_config  # noqa: E402
from study.weights import add_weights_arguments, inception_weights_for  # noqa: E402

DEFAULT_EXPERIMENT = "liquid-diffusion"


class OneLineParser(argparse.ArgumentParser):
    """argparse, but usage errors are one line on stderr and exit 2, like every other error here."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def int_at_least(lowest: int):
    """An argparse type: an integer >= lowest, or a one-line usage error naming the value."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < lowest:
            raise argparse.ArgumentTypeError(f"invalid value {text!r}; expected an integer >= {lowest}")
        return value

    return parse


non_negative_int = int_at_least(0)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="run.py", description=__doc__)
    parser.add_argument("--list", action="store_true", help="print every ablation arm with its description")
    parser.add_argument("--ablation", metavar="A[,B,...]|all", help="arm(s) to run, by file name in ablations/")
    parser.add_argument("--dataset", default="mnist", help="mnist (embedded), afhq, celeba, flowers, pokemon, anime, "
                        "cartoon, hf:owner/name, or a folder of images (default: %(default)s)")
    parser.add_argument("--budget", default="cpu-demo", help="budget profile from study/budgets.yaml (default: %(default)s)")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="training seed (default: %(default)s)")
    parser.add_argument("--dry-run", action="store_true", help="print each arm's resolved config as YAML and train nothing")
    parser.add_argument("--experiment", default=DEFAULT_EXPERIMENT, help="MLflow experiment name (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=Path("outputs"), help="run folders with checkpoints (default: %(default)s)")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="latent, classifier and reference-statistics cache (default: $LIQUID_DIFFUSION_CACHE or ~/.cache/liquid_diffusion)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="(default: %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_weights_arguments(parser)
    parser.add_argument("--ablations-dir", type=Path, default=ABLATIONS_DIR, help="where the arm files live (default: %(default)s)")
    parser.add_argument("--budgets-file", type=Path, default=BUDGETS_FILE, help=argparse.SUPPRESS)
    return parser


class _ConfigDumper(yaml.SafeDumper):
    """Block-style mappings with short lists kept on one line, e.g. `channels: [32, 64, 128]`."""


_ConfigDumper.add_representer(list, lambda dumper, value: dumper.represent_sequence("tag:yaml.org,2002:seq", value, flow_style=True))


def dump_config(cfg: ExperimentConfig) -> str:
    return yaml.dump(cfg.to_dict(), Dumper=_ConfigDumper, sort_keys=False)


def train_arms(args, plans) -> int:
    from study.trial import run_dir_for, run_trial  # torch, diffusers and mlflow load only when training

    weights = inception_weights_for([cfg for _, cfg in plans], args)  # fails here, before anything trains
    failures = 0
    for arm, cfg in plans:
        dataset = cfg.data.dataset  # a folder is tagged by its absolute path
        tags = {"ablation": arm.name, "dataset": dataset, "seed": str(cfg.train.seed), "budget": args.budget,
                "study": f"{arm.name}-{dataset}-{args.budget}"}
        run_dir = run_dir_for(args.out, args.experiment, arm.name, cfg, args.budget)
        print(f"== {arm.name}: {arm.description}\n   run folder: {run_dir}", flush=True)
        outcome = run_trial(cfg, tags, run_dir, args.experiment, args.device, args.cache_dir, not args.no_progress,
                            weights)
        print(f"   {outcome.status}: MLflow run {outcome.run_id}" + (f" ({outcome.reason})" if outcome.reason else ""))
        if outcome.result is not None:
            r = outcome.result
            s = r.seconds
            print(f"   {r.images_seen} images in {r.steps} steps, final loss {r.final_loss:.4f}"
                  + (f", resumed at {r.resumed_from} images" if r.resumed_from else ""))
            print(f"   wall time: step {s['step']:.1f}s, eval {s['eval']:.1f}s, data {s['data']:.2f}s, logging "
                  f"{s['logging']:.2f}s, checkpoints {s['checkpoint']:.2f}s; harness overhead "
                  f"{100 * r.overhead_fraction:.2f}% of training time (eval excluded)")
        failures += outcome.status != "FINISHED"
    import mlflow

    uri = mlflow.get_tracking_uri()
    print(f"\nOpen the runs with:  mlflow ui --backend-store-uri {uri}")
    return 1 if failures else 0


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
    if not args.ablation:
        raise ConfigError("nothing to do; pass --list, or --ablation NAME[,NAME...]|all (see --help)")
    selected = select_arms(arms, args.ablation)
    plans = [(arm, resolve_config(arm, budget, args.dataset, args.seed)) for arm in selected]
    if args.dry_run:
        for i, (arm, cfg) in enumerate(plans):
            metrics, objective = cfg.eval_metrics
            print(("---\n" if i else "") + f"# arm: {arm.name} - {arm.description}\n"
                  f"# eval metrics: {', '.join(metrics)}; objective: {objective}\n" + dump_config(cfg), end="")
        return 0
    return train_arms(args, plans)


if __name__ == "__main__":
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    try:
        sys.exit(main())
    except ConfigError as err:  # includes DataError: bad input, said in one line
        print(f"run.py: error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("run.py: interrupted; the run is marked KILLED and rerunning the same command resumes it", file=sys.stderr)
        sys.exit(130)
