"""The ablation registry: one YAML file per arm in ablations/, each a description plus config overrides."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from liquid_diffusion.config import ConfigError, ExperimentConfig, flatten_overrides

ABLATIONS_DIR = Path(__file__).resolve().parent.parent / "ablations"
ENTRY_KEYS = ("description", "overrides")


@dataclass(frozen=True)
class OverrideSet:
    """A named, described set of `section.key: value` overrides: an ablation arm or a budget profile."""

    name: str
    description: str
    overrides: dict[str, Any]
    source: str  # where it was read, for error messages
    tags: dict[str, str] = field(default_factory=dict)  # logged on the arm's runs, e.g. a factorial's factor.* levels

    def apply(self, base: ExperimentConfig) -> ExperimentConfig:
        try:
            return base.with_overrides(self.overrides)
        except ConfigError as err:
            raise ConfigError(f"{self.source}: {err}") from None


def described_entry(data: Any, keys: tuple[str, ...], source: str) -> str:
    """Check a YAML entry is a mapping of `keys` only, with a non-empty description; returns the description."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping with keys {', '.join(keys)}")
    for key in data:
        if key not in keys:
            raise ConfigError(f"{source}: unknown key '{key}'; valid keys: {', '.join(keys)}")
    description = data.get("description")
    if not isinstance(description, str) or not description.strip():
        raise ConfigError(f"{source}: 'description' must be a non-empty one-line string")
    return description


def parse_override_set(name: str, data: Any, source: str) -> OverrideSet:
    """Validate the `{description, overrides}` shape shared by arm files and budget entries."""
    description = described_entry(data, ENTRY_KEYS, source)
    overrides = data.get("overrides") or {}
    if not isinstance(overrides, dict):
        raise ConfigError(f"{source}: 'overrides' must be a mapping of section.key: value")
    return OverrideSet(name, description.strip(), flatten_overrides(overrides), source)


def read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(Path(path).read_text())
    except OSError as err:
        raise ConfigError(f"{path}: cannot read it ({err.strerror or err})") from None
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        raise ConfigError(f"{path}: not valid YAML{line}: {getattr(err, 'problem', err)}") from None


def load_arms(directory: Path = ABLATIONS_DIR, base: ExperimentConfig | None = None) -> dict[str, OverrideSet]:
    """Every arm in `directory`, by name; with `base`, each arm's overrides are validated against it."""
    paths = sorted(Path(directory).glob("*.yaml"))
    if not paths:
        raise ConfigError(f"no ablation files (*.yaml) in {directory}")
    arms = {path.stem: parse_override_set(path.stem, read_yaml(path), str(path)) for path in paths}
    if base is not None:
        for arm in arms.values():
            arm.apply(base)
    return arms


def select_arms(arms: dict[str, OverrideSet], spec: str) -> list[OverrideSet]:
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
