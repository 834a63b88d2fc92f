"""Sizing a study from a pilot: noise against run length, the evaluation's share of it, and power per CPU-hour.

The pilot (study/plan.py) trains a few arms for a few seeds at the longest candidate length and evaluates
each run at several lengths along the way, each evaluation repeated with fresh sample noise. This module
turns those numbers into a table: for each length, the CPU minutes a run costs, the spread of the paired
per-seed differences, the seeds a study needs to detect a stated effect with the stated power after its
multiple-comparison correction, and what that study would cost.

Power comes from statsmodels (TTestPower); the variance split is the textbook one-way random-effects
ANOVA (method of moments), written out here because statsmodels has it only inside MixedLM's iterative fit.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy import stats
from statsmodels.stats.power import TTestPower

ALPHA = 0.05  # family-wise, over the study's comparisons
POWER = 0.8
SD_CONFIDENCE = 0.8  # a planning sd is the upper limit of its one-sided 80% interval, not the point estimate
EFFECT_FRACTION = 0.10  # the effect a study must detect, as a share of the baseline's mean
MAX_SEEDS = 200  # beyond this a comparison is called out of reach at that length


def sd_upper(sd: float, df: int, confidence: float = SD_CONFIDENCE) -> float:
    """The upper limit of a one-sided `confidence` interval for a normal sd estimated with `df` degrees of
    freedom: sd * sqrt(df / chi2_{1-confidence}(df)). With 2 df the 80% limit is 2.1x the estimate."""
    if df < 1 or not math.isfinite(sd):
        return math.nan
    return sd * math.sqrt(df / stats.chi2.ppf(1 - confidence, df))


def seeds_needed(
    effect: float, sd: float, comparisons: int = 1, alpha: float = ALPHA, power: float = POWER
) -> int | None:
    """The fewest seeds (pairs) whose two-sided paired t-test detects `effect` at `power`, with `sd` the sd
    of the per-seed differences, when `comparisons` tests share a family-wise `alpha`.

    Each test is sized at alpha / comparisons (Bonferroni). Holm rejects everything Bonferroni does, so
    this is a lower bound on each comparison's power under Holm: the count is conservative. None when
    even MAX_SEEDS would not do.
    """
    if not (effect > 0 and sd > 0):
        return None
    analysis, size, alpha_each = TTestPower(), effect / sd, alpha / comparisons
    for n in range(2, MAX_SEEDS + 1):
        if analysis.power(effect_size=size, nobs=n, alpha=alpha_each, alternative="two-sided") >= power:
            return n
    return None


def noise_split(values: pd.DataFrame) -> dict[str, float]:
    """Evaluation noise and training-seed noise in `values` (columns seed, repeat, value), from a one-way
    random-effects ANOVA with seeds as groups and repeated evaluations of the same weights within them.

    eval_var is the variance between evaluations of the same weights (fresh sample noise); train_var the
    variance between seeds that is left once the evaluation's share of the seed means is taken out
    (clipped at 0). eval_share is eval_var's part of a single evaluation's variance.
    """
    groups = values.groupby([key for key in ("arm", "seed") if key in values])["value"]  # one group per run
    repeats = groups.size()
    if len(repeats) < 2 or repeats.min() < 2:
        return {"eval_var": math.nan, "train_var": math.nan, "eval_share": math.nan}
    eval_var = float(groups.var(ddof=1).mean())  # the within-seed mean square, for equal repeats
    seed_means_var = float(groups.mean().var(ddof=1))  # = train_var + eval_var / repeats, in expectation
    r = len(repeats) / float((1 / repeats).sum())  # harmonic mean: exact when every seed has the same repeats
    train_var = max(0.0, seed_means_var - eval_var / r)
    total = eval_var + train_var
    return {"eval_var": eval_var, "train_var": train_var, "eval_share": eval_var / total if total > 0 else math.nan}


def effect_sd_factor(factors: int) -> float:
    """How much smaller the sd of one per-seed effect estimate is than that of a paired difference of two runs.

    A 2^k factorial estimates a main effect per seed as the mean of 2^(k-1) runs minus the mean of the
    other 2^(k-1): variance 4 s^2 / 2^k for run noise s^2, against 2 s^2 for one arm minus the baseline.
    """
    return math.sqrt(2 / 2**factors) if factors else 1.0


def paired_differences(values: pd.DataFrame, baseline: str) -> pd.DataFrame:
    """Each arm minus the baseline, per seed and repeat (columns arm, seed, repeat, value)."""
    base = values[values["arm"] == baseline].set_index(["seed", "repeat"])["value"]
    out = []
    for arm, group in values[values["arm"] != baseline].groupby("arm"):
        diff = group.set_index(["seed", "repeat"])["value"] - base
        out.append(diff.dropna().rename("value").reset_index().assign(arm=arm))
    return pd.concat(out, ignore_index=True) if out else pd.DataFrame(columns=["arm", "seed", "repeat", "value"])


def sizing_table(
    values: pd.DataFrame,
    costs: pd.DataFrame,
    baseline: str,
    study_arms: int,
    comparisons: int,
    factors: int = 0,
    effect_fraction: float = EFFECT_FRACTION,
    alpha: float = ALPHA,
    power: float = POWER,
    confidence: float = SD_CONFIDENCE,
) -> pd.DataFrame:
    """One row per candidate length.

    `values`: arm, seed, repeat, length, value (the objective; repeat 0 is what a study run would log).
    `costs`: arm, seed, length, cpu_s, wall_s (a run of that length: its training plus one evaluation).
    The sd of the paired differences is pooled over the pilot's non-baseline arms (repeat 0 only); the
    planning sd is its upper `confidence` limit, scaled by effect_sd_factor for a factorial of `factors`.
    """
    rows = []
    for length, at in values.groupby("length"):
        first = at[at["repeat"] == 0]
        base_mean = float(first.loc[first["arm"] == baseline, "value"].mean())
        diffs = paired_differences(first, baseline)
        per_arm = diffs.groupby("arm")["value"]
        df = int((per_arm.size() - 1).clip(lower=0).sum())
        pooled_var = float(((per_arm.size() - 1) * per_arm.var(ddof=1)).sum() / df) if df else math.nan
        sd = math.sqrt(pooled_var) if df else math.nan
        sd_up = sd_upper(sd, df, confidence)
        sd_plan = sd_up * effect_sd_factor(factors)  # the sd of one seed's estimate of the sized study's effect
        effect = effect_fraction * abs(base_mean)
        seeds = seeds_needed(effect, sd_plan, comparisons, alpha, power) if math.isfinite(sd_plan) else None
        cost = costs[costs["length"] == length]
        cpu_min, wall_min = cost["cpu_s"].median() / 60, cost["wall_s"].median() / 60
        base_split = noise_split(at[at["arm"] == baseline])
        split = noise_split(paired_differences(at, baseline)) if len(diffs) else base_split
        rows.append(
            {
                "images": int(length),
                "cpu_min_per_run": cpu_min,
                "wall_min_per_run": wall_min,
                "baseline_mean": base_mean,
                "baseline_sd": float(first.loc[first["arm"] == baseline, "value"].std(ddof=1)),
                "diff_sd": sd,
                "diff_sd_df": df,
                "diff_sd_upper": sd_up,
                "baseline_eval_share": base_split["eval_share"],
                "eval_share": split["eval_share"],
                "effect": effect,
                "seeds_needed": seeds,
                "study_runs": seeds * study_arms if seeds else None,
                "study_cpu_hours": seeds * study_arms * cpu_min / 60 if seeds else math.inf,
            }
        )
    table = pd.DataFrame(rows).sort_values("images").reset_index(drop=True)
    table["recommended"] = False
    finite = table["study_cpu_hours"].replace(math.inf, np.nan)
    if finite.notna().any():
        table.loc[finite.idxmin(), "recommended"] = True
    return table


def describe(row: pd.Series, pilot_seeds: int, confidence: float = SD_CONFIDENCE) -> str:
    """The recommended profile's description: its measured spread and cost, and what they mean."""
    return (
        f"Chosen by study/plan.py from a pilot of {pilot_seeds} seeds: at {row['images']:,} images a run costs "
        f"{row['cpu_min_per_run']:.1f} CPU-min; the baseline gave {row['baseline_mean']:.4g} +- "
        f"{row['baseline_sd']:.2g} (sd) and the paired per-seed differences an sd of {row['diff_sd']:.3g} "
        f"({row['diff_sd_df']} df; {confidence:.0%} upper limit {row['diff_sd_upper']:.3g}); "
        f"{row['eval_share']:.0%} of that variance is evaluation noise. Detecting {row['effect']:.3g} "
        f"needs {row['seeds_needed']} seeds: {row['study_cpu_hours']:.1f} CPU-hours for the sized study."
    )
