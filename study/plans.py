"""What one Optuna study trains: an arm on a dataset under a budget, over seeds or a search space."""

from __future__ import annotations

from dataclasses import dataclass, field

from liquid_diffusion.config import METRICS, ExperimentConfig, dataset_slug

from .arms import OverrideSet
from .search import SearchSpace


@dataclass
class StudyPlan:
    """What one study trains: an arm on a dataset under a budget, over seeds or over a search space."""

    arm: OverrideSet
    dataset: str
    budget: str
    base: ExperimentConfig  # the resolved config before seed and search overrides
    experiment: str
    seeds: list[int] | None = None  # seeds mode
    search: SearchSpace | None = None  # search mode: TPE over this space ...
    n_trials: int = 0  # ... for this many trials
    search_seed: int = 0  # ... all trained with this seed
    tags: dict[str, str] = field(default_factory=dict)  # the study's settings, on its parent and trial runs

    @property
    def name(self) -> str:
        name = f"{self.experiment}:{self.arm.name}:{dataset_slug(self.dataset)}:{self.budget}"
        return name + (":search" if self.search else "")

    @property
    def objective(self) -> str:
        return self.base.objective

    @property
    def direction(self) -> str:
        return "maximize" if METRICS[self.objective] else "minimize"

    @property
    def digest(self) -> str:
        """Identifies the study's config; a rerun with another config must not continue the study. In seeds mode
        the seeds are the study's trials, so `--seed 1` continues the study that `--seeds 1` began."""
        return (self.base.with_overrides({"train.seed": 0}) if self.seeds is not None else self.base).digest()

    def config_for(self, seed: int, overrides: dict) -> ExperimentConfig:
        return self.base.with_overrides({**overrides, "train.seed": seed})
