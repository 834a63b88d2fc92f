"""Command line: list ablation arms, print their resolved configs, and run them."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# Run as a script (`python study/run.py`): make the repository root importable for `study.*`.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import yaml  # noqa: E402

from liquid_diffusion.config import ConfigError, ExperimentConfig, ModelConfig  # noqa: E402
from study.arms import ABLATIONS_DIR, load_arms, select_arms  # noqa: E402


class OneLineParser(argparse.ArgumentParser):
    """argparse, but usage errors are one line on stderr and exit 2, like every other error here."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="run.py", description=__doc__)
    parser.add_argument("--list", action="store_true", help="print every ablation arm with its description")
    parser.add_argument("--ablation", metavar="A[,B,...]|all", help="arm(s) to run, by file name in ablations/")
    parser.add_argument("--dry-run", action="store_true", help="print each arm's resolved config as YAML and train nothing")
    parser.add_argument("--ablations-dir", type=Path, default=ABLATIONS_DIR, help="where the arm files live (default: %(default)s)")
    return parser


def base_config() -> ExperimentConfig:
    # The embedded default: MNIST digits in pixel space at 32x32 on the CPU-sized preset.
    return ExperimentConfig(model=ModelConfig.preset("micro", in_channels=1, resolution=32))


class _ConfigDumper(yaml.SafeDumper):
    """Block-style mappings with short lists kept on one line, e.g. `channels: [32, 64, 128]`."""


_ConfigDumper.add_representer(list, lambda dumper, value: dumper.represent_sequence("tag:yaml.org,2002:seq", value, flow_style=True))


def print_dry_run(arms, base: ExperimentConfig) -> None:
    for i, arm in enumerate(arms):
        if i:
            print("---")
        print(f"# arm: {arm.name} - {arm.description}")
        print(yaml.dump(arm.resolve(base).to_dict(), Dumper=_ConfigDumper, sort_keys=False), end="")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    base = base_config()
    arms = load_arms(args.ablations_dir, base)
    if args.list:
        width = max(map(len, arms))
        for arm in arms.values():
            print(f"{arm.name:<{width}}  {arm.description}")
        return 0
    if not args.ablation:
        raise ConfigError("nothing to do; pass --list, or --ablation NAME[,NAME...]|all (see --help)")
    selected = select_arms(arms, args.ablation)
    if args.dry_run:
        print_dry_run(selected, base)
        return 0
    raise ConfigError("training is not implemented yet; use --dry-run to print the resolved config")


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ConfigError as err:
        print(f"run.py: error: {err}", file=sys.stderr)
        sys.exit(2)
