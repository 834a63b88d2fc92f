"""Budget profiles (study/budgets.yaml) and how one run's config is assembled from budget, data, seed and arm."""

from __future__ import annotations

from pathlib import Path

from liquid_diffusion.config import ConfigError, ExperimentConfig, check_dataset_name, is_local_folder

from .arms import OverrideSet, parse_override_set, read_yaml

BUDGETS_FILE = Path(__file__).resolve().parent / "budgets.yaml"


def load_budgets(path: Path = BUDGETS_FILE) -> dict[str, OverrideSet]:
    data = read_yaml(path)
    if not isinstance(data, dict) or not data:
        raise ConfigError(f"{path}: expected a mapping of profile name -> {{description, overrides}}")
    return {name: parse_override_set(name, entry, f"{path}:{name}") for name, entry in data.items()}


def get_budget(budgets: dict[str, OverrideSet], name: str) -> OverrideSet:
    if name not in budgets:
        raise ConfigError(f"unknown budget '{name}'; valid budgets: {', '.join(budgets)}")
    return budgets[name]


def resolve_config(arm: OverrideSet, budget: OverrideSet, dataset: str, seed: int) -> ExperimentConfig:
    """defaults <- budget <- dataset and seed <- arm: the arm's overrides win, so it can vary anything."""
    check_dataset_name(dataset)
    if is_local_folder(dataset):  # one folder, one config, whatever the working directory
        dataset = str(Path(dataset).expanduser().resolve())
    cfg = budget.apply(ExperimentConfig())
    # MNIST is grey; everything else, and anything an autoencoder encodes, is RGB.
    channels = 1 if dataset == "mnist" and cfg.data.codec == "pixel" else 3
    cfg = cfg.with_overrides({"data.dataset": dataset, "data.channels": channels, "train.seed": seed})
    return arm.apply(cfg)
