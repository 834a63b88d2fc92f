"""The ablation registry: one YAML file per arm in ablations/, each a description plus config overrides."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from liquid_diffusion.config import ConfigError, ExperimentConfig, flatten_overrides

ABLATIONS_DIR = Path(__file__).resolve().parent.parent / "ablations"
ARM_KEYS = ("description", "overrides")


@dataclass(frozen=True)
class Arm:
    name: str
    description: str
    overrides: dict[str, Any]
    path: Path

    def resolve(self, base: ExperimentConfig) -> ExperimentConfig:
        """The base config with this arm's overrides applied; errors name the arm's file."""
        try:
            return base.with_overrides(self.overrides)
        except ConfigError as err:
            raise ConfigError(f"{self.path}: {err}") from None


def _read_arm(path: Path) -> Arm:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        raise ConfigError(f"{path}: not valid YAML{line}: {getattr(err, 'problem', err)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping with keys {', '.join(ARM_KEYS)}")
    for key in data:
        if key not in ARM_KEYS:
            raise ConfigError(f"{path}: unknown key '{key}'; valid keys: {', '.join(ARM_KEYS)}")
    description = data.get("description")
    if not isinstance(description, str) or not description.strip():
        raise ConfigError(f"{path}: 'description' must be a non-empty one-line string")
    overrides = data.get("overrides") or {}
    if not isinstance(overrides, dict):
        raise ConfigError(f"{path}: 'overrides' must be a mapping of section.key: value")
    return Arm(path.stem, description.strip(), flatten_overrides(overrides), path)


def load_arms(directory: Path = ABLATIONS_DIR, base: ExperimentConfig | None = None) -> dict[str, Arm]:
    """Every arm in `directory`, by name; with `base`, each arm's overrides are validated against it."""
    paths = sorted(Path(directory).glob("*.yaml"))
    if not paths:
        raise ConfigError(f"no ablation files (*.yaml) in {directory}")
    arms = {path.stem: _read_arm(path) for path in paths}
    if base is not None:
        for arm in arms.values():
            arm.resolve(base)
    return arms


def select_arms(arms: dict[str, Arm], spec: str) -> list[Arm]:
    """`all`, or a comma-separated list of arm names, in the order given."""
    if spec.strip() == "all":
        return list(arms.values())
    names = [name.strip() for name in spec.split(",") if name.strip()]
    if not names:
        raise ConfigError(f"--ablation {spec!r} names no arm; valid arms: all, {', '.join(arms)}")
    for name in names:
        if name not in arms:
            raise ConfigError(f"unknown ablation '{name}'; valid arms: all, {', '.join(arms)}")
    return [arms[name] for name in dict.fromkeys(names)]
