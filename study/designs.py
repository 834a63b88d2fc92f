"""Study designs: the arms of a 2^k (or 2^(k-p)) factorial from a design file, and which seeds a sequential
study trains next.

A design file (ablations/designs/NAME.yaml) names its factors, each with two levels, the first being the
reference (the baseline's setting), and each level a set of config overrides:

    description: "The seed's three ideas"
    factors:
      mixer: {cfc: {model.mixer: cfc}, conv: {model.mixer: conv}}
      relax: {temb: {model.relax: temb}, none: {model.relax: none}}
    fraction: {kernels: [mixer, relax]}   # optional: kernels' level is the product of the others' signs

Arms are generated, never hand-copied: one per combination of levels, named `mixer-cfc.relax-temb`, and
tagged factor.<name> = <level> so that the report can fit effects from what MLflow holds.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from pathlib import Path

from liquid_diffusion.config import ConfigError, ExperimentConfig, flatten_overrides
from reports.decisions import FACTORS_TAG, factors_tag

from .arms import ABLATIONS_DIR, OverrideSet, described_entry, read_yaml

DESIGNS_DIR = ABLATIONS_DIR / "designs"
DESIGN_KEYS = ("description", "factors", "fraction")
NAME = re.compile(r"^[a-z][a-z0-9_]*$")
LEVEL = re.compile(r"^[A-Za-z0-9_]+$")


@dataclass(frozen=True)
class Design:
    name: str
    description: str
    factors: dict[str, dict[str, dict]]  # factor -> {level: overrides}, the first level the reference
    fraction: dict[str, tuple[str, ...]]  # generated factor -> the factors whose sign product sets its level
    source: str

    @property
    def levels(self) -> dict[str, tuple[str, str]]:
        return {name: tuple(levels) for name, levels in self.factors.items()}

    def arms(self, budget: OverrideSet | None = None) -> list[OverrideSet]:
        """One arm per run of the design, the all-reference arm first; with `budget`, each is checked against
        its config (an unknown key or a bad value stops the command)."""
        free = [name for name in self.factors if name not in self.fraction]
        arms = []
        for signs in itertools.product((0, 1), repeat=len(free)):
            chosen = dict(zip(free, signs))
            for generated, parents in self.fraction.items():
                chosen[generated] = sum(chosen[p] for p in parents) % 2  # the sign product, as 0/1 parity
            levels = {name: self.levels[name][chosen[name]] for name in self.factors}
            overrides = {}
            for name, level in levels.items():
                overrides.update(self.factors[name][level])
            arm_name = ".".join(f"{name}-{level}" for name, level in levels.items())
            described = ", ".join(f"{name} {level}" for name, level in levels.items())
            tags = {
                "design": self.name,
                FACTORS_TAG: factors_tag(self.levels),
                **{f"factor.{name}": level for name, level in levels.items()},
            }
            arms.append(OverrideSet(arm_name, f"{self.name}: {described}", overrides, self.source, tags))
        if budget is not None:
            base = budget.apply(ExperimentConfig())
            for arm in arms:
                arm.apply(base)
        return arms

    @property
    def reference_arm(self) -> str:
        return self.arms()[0].name


def _parse_factors(data, source: str) -> dict[str, dict[str, dict]]:
    if not isinstance(data, dict) or not data:
        raise ConfigError(f"{source}: 'factors' must map each factor's name to its two levels")
    factors = {}
    for name, levels in data.items():
        if not isinstance(name, str) or not NAME.match(name):
            raise ConfigError(f"{source}: factor name {name!r} is not valid; expected lower-case letters, digits, _")
        if not isinstance(levels, dict) or len(levels) != 2:
            raise ConfigError(f"{source}: factor '{name}' must have exactly two levels, each a mapping of overrides")
        parsed = {}
        for level, overrides in levels.items():
            level = str(level)
            if not LEVEL.match(level):
                raise ConfigError(f"{source}: level {level!r} of '{name}' is not valid; expected letters, digits, _")
            if not isinstance(overrides, dict) or not overrides:
                raise ConfigError(f"{source}: level '{level}' of '{name}' must be a non-empty mapping of overrides")
            parsed[level] = flatten_overrides(overrides)
        factors[name] = parsed
    return factors


def load_design(spec: str) -> Design:
    """A design by name (ablations/designs/NAME.yaml) or by path; every arm is checked against the config."""
    path = Path(spec) if spec.endswith((".yaml", ".yml")) else DESIGNS_DIR / f"{spec}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in DESIGNS_DIR.glob("*.yaml"))
        valid = ", ".join(known) or "none"
        raise ConfigError(f"unknown design '{spec}'; valid designs: {valid} (or a path to a .yaml)")
    data, source = read_yaml(path), str(path)
    description = described_entry(data, DESIGN_KEYS, source)
    factors = _parse_factors(data.get("factors"), source)
    fraction, generators = {}, data.get("fraction") or {}
    for generated, parents in generators.items():
        parents = tuple(parents) if isinstance(parents, list) else ()
        if generated not in factors or len(parents) < 2 or any(p not in factors or p in generators for p in parents):
            raise ConfigError(
                f"{source}: fraction '{generated}: {parents}' is not valid; expected a factor set by a list of two "
                f"or more of the other (not generated) factors: {', '.join(factors)}"
            )
        fraction[generated] = parents
    return Design(path.stem, description.strip(), factors, fraction, source)


# --- sequential seeds -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StoppingRule:
    """When a sequential study stops adding seeds: all decided, or a cap. Fixed before the study starts."""

    max_seeds: int
    max_cpu_hours: float | None = None


def next_seeds(
    decisions,
    seeds: dict[str, int],
    baseline: str,
    factorial: bool,
    rule: StoppingRule,
    spent_cpu_hours: float,
    cpu_hours_per_run: float,
) -> tuple[dict[str, int], str]:
    """The seed count each arm trains next round, and why the study stops when nothing changes.

    `decisions` (reports.decisions.with_decisions) has a row per comparison: `arm` (one-at-a-time) or a
    main effect (factorial). A factorial adds a whole seed (every arm) while any main effect is undecided; a
    one-at-a-time study adds a seed to each undecided arm and to the baseline. A round that would pass a cap
    is not started.
    """
    undecided = decisions[decisions["decision"] == "undecided"]
    if undecided.empty:
        return seeds, "every comparison is decided"
    if factorial:
        grown = {arm: n + 1 for arm, n in seeds.items()}
    else:
        grown = dict(seeds)
        for arm in undecided["arm"]:
            grown[arm] = seeds[arm] + 1
        grown[baseline] = max(grown[a] for a in grown)
    if max(grown.values()) > rule.max_seeds:
        return seeds, f"the cap of {rule.max_seeds} seeds is reached with {len(undecided)} comparison(s) undecided"
    new_runs = sum(grown.values()) - sum(seeds.values())
    if rule.max_cpu_hours is not None and spent_cpu_hours + new_runs * cpu_hours_per_run > rule.max_cpu_hours:
        return seeds, (
            f"another round ({new_runs} runs, about {new_runs * cpu_hours_per_run:.2f} CPU-hours) would pass the cap "
            f"of {rule.max_cpu_hours:g} CPU-hours ({spent_cpu_hours:.2f} spent) with {len(undecided)} undecided"
        )
    return grown, ""
