"""The TPE search space and pruner of `run.py --search`, read from YAML (study/search_space.yaml)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from liquid_diffusion.config import ConfigError, ExperimentConfig

from .arms import read_yaml

SEARCH_SPACE_FILE = Path(__file__).resolve().parent / "search_space.yaml"
PRUNERS = ("median", "threshold", "none")


def _distribution(key: str, spec: Any, where: str):
    import optuna.distributions as d

    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: {key} must be {{low, high}} or {{choices: [...]}}, got {spec!r}")
    if "choices" in spec:
        if set(spec) != {"choices"} or not isinstance(spec["choices"], list) or not spec["choices"]:
            raise ConfigError(f"{where}: {key} takes only a non-empty list under choices")
        return d.CategoricalDistribution(spec["choices"])
    unknown = set(spec) - {"low", "high", "log", "step"}
    if unknown or not {"low", "high"} <= set(spec):
        raise ConfigError(f"{where}: {key} needs low and high (and optionally log, step); got {sorted(spec)}")
    low, high, log, step = spec["low"], spec["high"], bool(spec.get("log", False)), spec.get("step")
    try:
        if all(isinstance(v, int) and not isinstance(v, bool) for v in (low, high)):
            return d.IntDistribution(low, high, log=log, step=step or 1)
        return d.FloatDistribution(float(low), float(high), log=log, step=step)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{where}: {key}: {err}") from None


@dataclass
class SearchSpace:
    distributions: dict[str, Any]  # dotted config key -> optuna distribution
    pruner: dict[str, Any]

    def for_budget(self, budget_cfg: ExperimentConfig) -> SearchSpace:
        """Drop batch sizes above the budget profile's, which is sized to its memory."""
        import optuna.distributions as d

        dists = dict(self.distributions)
        batch = dists.get("train.batch_size")
        if isinstance(batch, d.CategoricalDistribution):
            fitting = [b for b in batch.choices if b <= budget_cfg.train.batch_size] or [budget_cfg.train.batch_size]
            dists["train.batch_size"] = d.CategoricalDistribution(fitting)
        return SearchSpace(dists, self.pruner)

    def suggest(self, trial) -> dict[str, Any]:
        """Overrides for one trial, sampled (or replayed, for a queued trial) by Optuna."""
        import optuna.distributions as d

        out = {}
        for key, dist in self.distributions.items():
            if isinstance(dist, d.CategoricalDistribution):
                out[key] = trial.suggest_categorical(key, dist.choices)
            elif isinstance(dist, d.IntDistribution):
                out[key] = trial.suggest_int(key, dist.low, dist.high, step=dist.step, log=dist.log)
            else:
                out[key] = trial.suggest_float(key, dist.low, dist.high, step=dist.step, log=dist.log)
        return out

    def make_pruner(self):
        import optuna

        kind = self.pruner.get("type", "median")
        options = {k: v for k, v in self.pruner.items() if k != "type"}
        try:
            if kind == "median":
                return optuna.pruners.MedianPruner(**options)
            if kind == "threshold":
                return optuna.pruners.ThresholdPruner(**options)
            return optuna.pruners.NopPruner()
        except (TypeError, ValueError) as err:
            raise ConfigError(f"pruner {kind}: {err}") from None


def load_search_space(path: Path = SEARCH_SPACE_FILE) -> SearchSpace:
    data = read_yaml(path)
    if not isinstance(data, dict) or set(data) - {"space", "pruner"} or not isinstance(data.get("space"), dict):
        raise ConfigError(f"{path}: expected a mapping with `space` (and optionally `pruner`)")
    valid = set(ExperimentConfig().flat())
    for key in data["space"]:
        if key not in valid:
            raise ConfigError(f"{path}: unknown config key '{key}' in space")
    pruner = data.get("pruner") or {"type": "median"}
    if not isinstance(pruner, dict) or pruner.get("type", "median") not in PRUNERS:
        raise ConfigError(f"{path}: pruner type must be one of: {', '.join(PRUNERS)}")
    dists = {key: _distribution(key, spec, str(path)) for key, spec in data["space"].items()}
    return SearchSpace(dists, pruner)
