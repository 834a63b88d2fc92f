"""Decisions: each comparison called better, worse, equivalent (within a margin fixed before the study) or
undecided, from confidence intervals that stay valid however the seeds were added.

Every comparison is a coefficient of a linear model blocked by seed (statsmodels OLS): an arm minus the
baseline over their common seeds (`value ~ 1` on the per-seed differences), or a factorial effect
(`value ~ C(seed) + factors + two-way interactions`, each column coded -1/2, +1/2 so that a coefficient
is the difference between the two levels).

Two kinds of interval, one decision rule:
- fixed: a study whose seed count was fixed in advance gets the ordinary t interval.
- anytime: a study that added seeds until its comparisons were decided gets the anytime-valid confidence
  sequence of Lindon, Ham, Tingley and Bojinov (2024, "Anytime-valid linear models and regression adjusted
  causal inference"), the t-test of a normal-mixture Bayes factor with a right-Haar prior on the noise scale.
  It holds at every look at once, P(ever excludes the truth) <= alpha, so stopping when it is decided keeps the
  error rate. The formula is the one the savvi package implements for its online (recursive least squares)
  regression; written out here on statsmodels' exact fit because savvi only updates one observation at a
  time under a ridge start and needs cvxpy.
Both are taken at alpha / m for m comparisons (Bonferroni): with probability 1 - alpha every interval holds
at once, so every better, worse and equivalent of the study is right together, at any stopping time.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy import stats

ALPHA = 0.05  # family-wise, over a study's comparisons
MARGIN_TEXT = "5%"  # the default equivalence margin: a share of the reference arm's mean
# The mixture's prior precision (savvi's default is 1). 0.25 keeps the interval finite from 5 paired seeds and near
# its narrowest at 4-10 seeds, the sizes a CPU study can pay for.
PHI = 0.25
MAX_EXTRA_SEEDS = 200


def anytime_radius(se, nu, z2, alpha: float, phi: float = PHI):
    """Half-width of the anytime-valid interval of a coefficient with standard error `se`, `nu` residual
    degrees of freedom and z2 = scale / se^2 (the coefficient's information; n for a mean of n values).

    It is the set where the Bayes factor sqrt(r) ((1 + t^2/nu) / (1 + r t^2/nu))^((nu+1)/2), r = phi / (phi + z2),
    stays below 1/alpha. Infinite where the Bayes factor can never reach 1/alpha (too few seeds)."""
    se, nu, z2 = np.asarray(se, float), np.asarray(nu, float), np.asarray(z2, float)
    r = phi / (phi + z2)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = (r * alpha**2) ** (1 / (nu + 1))
        radius = se * np.sqrt(nu * (1 - q) / (q - r))
    return np.where((q > r) & (nu > 0), radius, np.inf)


def anytime_p(t, nu, z2, phi: float = PHI):
    """The anytime-valid p-value min(1, 1/BF) of the same Bayes factor, for the coefficient's t statistic."""
    t, nu, z2 = np.asarray(t, float), np.asarray(nu, float), np.asarray(z2, float)
    r = phi / (phi + z2)
    log_bf = 0.5 * np.log(r) + 0.5 * (nu + 1) * (np.log1p(t**2 / nu) - np.log1p(r * t**2 / nu))
    return np.minimum(1.0, np.exp(-log_bf))


def fixed_radius(se, nu, alpha: float):
    """Half-width of the ordinary two-sided t interval at level 1 - alpha."""
    return np.asarray(se, float) * stats.t.ppf(1 - alpha / 2, np.asarray(nu, float))


def decide(low: float, high: float, margin: float, lower_is_better: bool) -> str:
    """The interval [low, high] of (alternative - reference) against 0 and the margin.

    Inside (-margin, margin): equivalent, even if it also excludes 0 (a difference too small to matter).
    Otherwise above or below 0: the alternative is worse or better, by the metric's direction. Else undecided.
    """
    if -margin < low and high < margin:
        return "equivalent"
    if low > 0:
        return "worse" if lower_is_better else "better"
    if high < 0:
        return "better" if lower_is_better else "worse"
    return "undecided"


def factorial_effects(runs: pd.DataFrame, factors: dict[str, tuple[str, str]], interactions: bool = True):
    """Main effects (and two-way interactions) of a 2^k design from `runs` (columns seed, value and one per
    factor holding its level), by OLS blocked by seed. One row per term: term, estimate, se, nu, z2.

    Columns that another column determines (aliases in a fractional design) are left out and named in `aliased`.
    """
    import statsmodels.formula.api as smf

    data = pd.DataFrame({"value": runs["value"].astype(float), "seed": runs["seed"].astype(str)})
    terms = []
    for name, (_reference, second) in factors.items():
        data[name] = np.where(runs[name] == second, 0.5, -0.5)
        terms.append(name)
    names = list(factors)
    if interactions:
        for i, a in enumerate(names):
            for b in names[i + 1 :]:
                data[f"{a}__x__{b}"] = 2 * data[a] * data[b]  # +-1/2 again: its coefficient is the contrast
                terms.append(f"{a}__x__{b}")
    kept, aliased, seen = [], {}, {}
    for term in terms:  # a fractional design makes some columns equal (or opposite) to others
        key = tuple(np.sign(data[term].to_numpy()))
        flipped = tuple(-v for v in key)
        if key in seen or flipped in seen:
            aliased[term] = seen.get(key, seen.get(flipped))
            continue
        seen[key] = term
        kept.append(term)
    blocks = "C(seed) + " if data["seed"].nunique() > 1 else ""
    fit = smf.ols(f"value ~ {blocks}" + " + ".join(kept), data).fit()
    rows = []
    for term in kept:
        se = float(fit.bse[term])
        rows.append(
            {
                "term": term.replace("__x__", " x "),
                "estimate": float(fit.params[term]),
                "se": se,
                "nu": float(fit.df_resid),
                "z2": float(fit.scale / se**2) if se > 0 else math.inf,
                "aliased_with": ", ".join(t.replace("__x__", " x ") for t, w in aliased.items() if w == term),
            }
        )
    return pd.DataFrame(rows)


def paired_effect(arm: pd.Series, base: pd.Series) -> dict:
    """The arm minus the baseline over their common seeds, as the coefficient of `d ~ 1`."""
    d = (arm - base).dropna().to_numpy(float)
    n = len(d)
    se = float(d.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan
    return {"estimate": float(d.mean()) if n else math.nan, "se": se, "nu": float(n - 1), "z2": float(n), "n": n}


def with_decisions(
    effects: pd.DataFrame,
    margin: float,
    lower_is_better: bool,
    sequential: bool,
    alpha: float = ALPHA,
    comparisons: int | None = None,
) -> pd.DataFrame:
    """`effects` (estimate, se, nu, z2, and n: the seeds each used) with ci_low, ci_high, p, decision and
    extra_seeds: roughly how many more seeds an undecided comparison needs, if its spread stays as measured."""
    m = comparisons or len(effects)
    level = alpha / m
    out = effects.copy()
    if sequential:
        radius = anytime_radius(out["se"], out["nu"], out["z2"], level)
        p = anytime_p(out["estimate"] / out["se"], out["nu"], out["z2"]) * m
    else:
        radius = fixed_radius(out["se"], out["nu"], level)
        p = 2 * stats.t.sf(np.abs(out["estimate"] / out["se"]), out["nu"]) * m
    out["ci_low"], out["ci_high"] = out["estimate"] - radius, out["estimate"] + radius
    out["p_adjusted"] = np.minimum(1.0, p)
    out["decision"] = [decide(lo, hi, margin, lower_is_better) for lo, hi in zip(out["ci_low"], out["ci_high"])]
    out["extra_seeds"] = [
        extra_seeds(r, margin, level, sequential) if r["decision"] == "undecided" else 0 for _, r in out.iterrows()
    ]
    out["interval"] = "anytime-valid" if sequential else "fixed-n t"
    return out


def extra_seeds(row, margin: float, level: float, sequential: bool) -> int | None:
    """More seeds until the interval, at its current centre and spread, either excludes 0 or fits the margin."""
    n = int(row["n"])
    if not (n > 0 and row["se"] > 0 and math.isfinite(row["se"])):
        return None
    needed = max(abs(row["estimate"]), margin - abs(row["estimate"]))
    for extra in range(1, MAX_EXTRA_SEEDS + 1):
        scale = (n + extra) / n  # information and residual df grow with the seeds
        se, nu, z2 = row["se"] / math.sqrt(scale), row["nu"] * scale, row["z2"] * scale
        radius = anytime_radius(se, nu, z2, level) if sequential else fixed_radius(se, nu, level)
        if float(radius) < needed:
            return extra
    return None


# --- a study's decisions, from its runs ---------------------------------------------------------------------

FACTORS_TAG = "design.factors"  # "mixer=cfc|conv;relax=temb|none": every factor, its reference level first


def factors_from_tag(text: str) -> dict[str, tuple[str, str]]:
    return {name: tuple(levels.split("|")) for name, levels in (part.split("=") for part in text.split(";") if part)}


def factors_tag(levels: dict[str, tuple[str, str]]) -> str:
    return ";".join(f"{name}={'|'.join(pair)}" for name, pair in levels.items())


def parse_margin(text: str) -> tuple[float, bool]:
    """'5%' -> (0.05, relative to the reference arm's mean); '0.4' -> (0.4, absolute, in the metric's units)."""
    text = str(text).strip()
    relative = text.endswith("%")
    try:
        value = float(text.rstrip("%")) / (100 if relative else 1)
    except ValueError:
        value = math.nan
    if not value > 0:
        raise ValueError(f"margin {text!r} is not valid; expected a share such as 5% or a positive number such as 0.4")
    return value, relative


def replicated_effects(runs: pd.DataFrame, factors: dict[str, tuple[str, str]]) -> pd.DataFrame:
    """The factorial effects estimated again on each half of the seeds (reports.analysis.seed_halves), side by
    side: term, first_half, second_half, same_sign. A main effect whose sign flips between halves has not
    replicated, whatever the full study's interval says."""
    from reports.analysis import seed_halves

    halves = seed_halves(runs["seed"])
    if not halves[0]:
        return pd.DataFrame(columns=["term", "first_half", "second_half", "same_sign"])
    first, second = (factorial_effects(runs[runs["seed"].isin(h)], factors).set_index("term") for h in halves)
    out = pd.DataFrame({"first_half": first["estimate"], "second_half": second["estimate"]}).reset_index()
    out["same_sign"] = np.sign(out["first_half"]) == np.sign(out["second_half"])
    out.attrs["halves"] = halves
    return out


def study_decisions(
    values: pd.DataFrame,
    reference: str,
    margin: str,
    lower_is_better: bool,
    sequential: bool,
    alpha: float = ALPHA,
    factors: dict[str, tuple[str, str]] | None = None,
) -> tuple[pd.DataFrame, float]:
    """Every comparison of a study with its decision, and the margin in the metric's units.

    `values`: arm, seed, value (the final objective of each completed run), and with `factors` a column per
    factor holding the run's level. One-at-a-time: each arm against `reference` over their common seeds.
    Factorial: main effects and two-way interactions of a model blocked by seed, `reference` being the
    all-reference-levels arm. A relative margin is a share of the reference arm's mean.
    """
    share, relative = parse_margin(margin)
    margin_abs = share * abs(values.loc[values["arm"] == reference, "value"].mean()) if relative else share
    if factors:
        effects = factorial_effects(values, factors)
        effects["n"] = values["seed"].nunique() if len(effects) else []
        effects["arm"] = effects["term"]
        effects["main"] = [" x " not in term for term in effects["term"]]
        effects["comparison"] = [
            term if " x " in term else f"{term}: {factors[term][1]} vs {factors[term][0]}" for term in effects["term"]
        ]
    else:
        by_arm = values.pivot_table(index="seed", columns="arm", values="value", aggfunc="last")
        rows = []
        for arm in by_arm.columns:
            if arm != reference and reference in by_arm:
                rows.append(
                    {
                        "arm": arm,
                        "comparison": f"{arm} vs {reference}",
                        "main": True,
                        **paired_effect(by_arm[arm], by_arm[reference]),
                    }
                )
        effects = pd.DataFrame(rows, columns=["arm", "comparison", "main", "estimate", "se", "nu", "z2", "n"])
    effects = effects[effects["nu"] > 0] if len(effects) else effects  # a spread to judge by
    if effects.empty:
        return effects.assign(decision=[], ci_low=[], ci_high=[]), margin_abs
    return with_decisions(effects.reset_index(drop=True), margin_abs, lower_is_better, sequential, alpha), margin_abs


def report_decisions(runs: pd.DataFrame, objective: str, baseline: str) -> list[tuple[str, pd.DataFrame, float, dict]]:
    """The decisions of a dataset's completed runs (the report's frame, tag: and metric: columns): one
    (title, table, margin, settings) per design in it, and one for the one-at-a-time arms if `baseline` ran."""
    column = f"metric:{objective}"
    if column not in runs or runs.empty:
        return []

    def setting(group, tag, default):
        found = group[f"tag:{tag}"].dropna()
        return found.iloc[0] if len(found) else default

    out = []
    from reports.analysis import lower_is_better

    lower_better = lower_is_better(objective)
    designs = runs["tag:design.factors"].fillna("")
    for factors_text, group in [*runs[designs != ""].groupby(designs), ("", runs[designs == ""])]:
        if group.empty:
            continue
        factors = factors_from_tag(factors_text) if factors_text else None
        values = pd.DataFrame({"arm": group["arm"], "seed": group["seed"], "value": group[column]})
        if factors:
            for name in factors:
                values[name] = group[f"tag:factor.{name}"]
            reference = values[(values[list(factors)] == [pair[0] for pair in factors.values()]).all(axis=1)]
            reference_arm = reference["arm"].iloc[0] if len(reference) else ""
            title = f"design {setting(group, 'design', '?')}"
        else:
            reference_arm, title = baseline, "arms against the baseline"
            if baseline not in set(values["arm"]) or values["arm"].nunique() < 2:
                continue
        settings = {
            "margin": setting(group, "decision.margin", MARGIN_TEXT),
            "alpha": float(setting(group, "decision.alpha", ALPHA)),
            "interval": setting(group, "decision.interval", "fixed"),
        }
        table, margin = study_decisions(
            values.dropna(subset=["value"]),
            reference_arm,
            settings["margin"],
            lower_better,
            settings["interval"] == "anytime",
            settings["alpha"],
            factors,
        )
        settings.update(reference=reference_arm, factors=factors, values=values)
        out.append((title, table, margin, settings))
    return out
