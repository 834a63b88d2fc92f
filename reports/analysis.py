"""The numbers of the report: per (dataset, arm) seed aggregates, deltas to the baseline with Welch CIs, findings."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
from scipy import stats
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.power import TTestIndPower, TTestPower

from liquid_diffusion.config import METRICS
from liquid_diffusion.outcomes import OUTCOMES

CONFIDENCE = 0.95  # of every interval, and 1 - alpha of every test
POWER = 0.8  # of the minimum detectable effect
BOOTSTRAP_RESAMPLES = 2000
REPLICATION_RHO = 0.8  # below it, the ranking of the arms at this budget is called mostly noise


def outcome(row) -> str:
    """complete | pruned | over_budget | failed, from a run's `status` tag (outcomes.OUTCOMES), else its
    MLflow status: an interrupted or crashed run carries no `status` tag."""
    if row["tag:optuna.state"] == OUTCOMES["pruned"].trial_state:
        return OUTCOMES["pruned"].counted_as
    if row["tag:status"] in OUTCOMES:
        return OUTCOMES[row["tag:status"]].counted_as
    return "complete" if row["run_status"] == OUTCOMES["finished"].run_status else "failed"


def objective_of(runs: pd.DataFrame) -> str:
    """The logged objective metric of a dataset's runs (e.g. eval/fd_digits), the most common one."""
    names = runs["tag:eval.objective"].dropna()
    return names.mode().iloc[0] if len(names) else ""


def lower_is_better(objective: str) -> bool:
    name = objective.split("/")[-1].removesuffix("_unverified")
    return not METRICS.get(name, False)


def probability_of_improvement(arm: np.ndarray, base: np.ndarray, lower_better: bool, axis: int = -1):
    """P(a run of the arm beats a run of the baseline), over all pairs of runs, ties counting half.

    rliable's "probability of improvement", i.e. the Mann-Whitney U over the pair count. Written out
    in numpy rather than calling mannwhitneyu so that the bootstrap evaluates every resample at once.
    """
    a = np.moveaxis(arm, axis, -1)[..., :, None]
    b = np.moveaxis(base, axis, -1)[..., None, :]
    wins = (a < b) if lower_better else (a > b)
    return (wins + 0.5 * (a == b)).mean(axis=(-2, -1))


def compare(arm: pd.Series, base: pd.Series, lower_better: bool, rng_seed: int = 0) -> dict:
    """An arm against the baseline, each a Series of final values indexed by seed.

    The same seed gives both the same data order, t and noise draws and sample noise, so seeds in
    common are pairs: the paired t-test is the primary comparison, and Welch's unpaired interval is
    kept beside it to show what the pairing buys. Without two pairs the Welch test stands in.
    The p-value is adjusted for the other arms afterwards (Holm, in summarize).
    """
    a, b = arm.to_numpy(float), base.to_numpy(float)
    out = {
        "delta": a.mean() - b.mean(),
        "n_pairs": 0,
        "paired_delta": np.nan,
        "paired_ci_low": np.nan,
        "paired_ci_high": np.nan,
        "welch_ci_low": np.nan,
        "welch_ci_high": np.nan,
        "test": "",
        "p": np.nan,
        "mde": np.nan,
        "p_improvement": np.nan,
        "p_improvement_ci_low": np.nan,
        "p_improvement_ci_high": np.nan,
        "note": "",
    }
    if len(a) < 2 or len(b) < 2:
        out["note"] = "one seed: no CI" if min(len(a), len(b)) == 1 else "no seeds"
        return out
    with np.errstate(all="ignore"), warnings.catch_warnings():  # zero spread: a degenerate interval, shown as is
        warnings.simplefilter("ignore", RuntimeWarning)
        welch = stats.ttest_ind(a, b, equal_var=False)
        ci = welch.confidence_interval(CONFIDENCE)
        out.update(welch_ci_low=ci.low, welch_ci_high=ci.high, test="Welch t", p=welch.pvalue)
        pooled_sd = math.sqrt(((len(a) - 1) * a.var(ddof=1) + (len(b) - 1) * b.var(ddof=1)) / (len(a) + len(b) - 2))
        effect = TTestIndPower().solve_power(nobs1=len(a), ratio=len(b) / len(a), alpha=1 - CONFIDENCE, power=POWER)
        out["mde"] = effect * pooled_sd
        pairs = arm.index.intersection(base.index)
        if len(pairs) >= 2:
            pa, pb = arm[pairs].to_numpy(float), base[pairs].to_numpy(float)
            paired = stats.ttest_rel(pa, pb)
            ci = paired.confidence_interval(CONFIDENCE)
            out.update(
                n_pairs=len(pairs),
                paired_delta=(pa - pb).mean(),
                paired_ci_low=ci.low,
                paired_ci_high=ci.high,
                test="paired t",
                p=paired.pvalue,
            )
            effect = TTestPower().solve_power(nobs=len(pairs), alpha=1 - CONFIDENCE, power=POWER)
            out["mde"] = effect * (pa - pb).std(ddof=1)
        else:
            out["note"] = "no seeds in common with the baseline: unpaired only"
    out["p_improvement"] = float(probability_of_improvement(a, b, lower_better))
    boot = stats.bootstrap(
        (a, b),
        lambda x, y, axis: probability_of_improvement(x, y, lower_better, axis),
        n_resamples=BOOTSTRAP_RESAMPLES,
        confidence_level=CONFIDENCE,
        method="percentile",
        random_state=np.random.default_rng(rng_seed),
    )
    out.update(p_improvement_ci_low=boot.confidence_interval.low, p_improvement_ci_high=boot.confidence_interval.high)
    return out


def seed_halves(seeds) -> tuple[list, list]:
    """The two disjoint halves a replication check compares: the lower and the upper half of the sorted seeds
    (the upper one takes the odd seed out)."""
    ordered = sorted(set(seeds))
    return ordered[: len(ordered) // 2], ordered[len(ordered) // 2 :]


def replication(values: dict[str, pd.Series]) -> float:
    """Spearman's rho between the arms' means over two disjoint halves of the seeds (`seed_halves` of each
    arm's seeds); NaN with fewer than 3 arms of at least 2 seeds."""
    halves = []
    for v in values.values():
        if len(v) >= 2:
            first, second = seed_halves(v.index)
            halves.append((v[first].mean(), v[second].mean()))
    if len(halves) < 3:
        return np.nan
    first, second = zip(*halves)
    return float(stats.spearmanr(first, second).statistic)


def final_step(histories: pd.DataFrame) -> pd.Series:
    """Images seen per run: the last step of its training loss."""
    loss = histories[histories["key"] == "train/loss"]
    return loss.groupby("run_id")["step"].max()


def final_values(done: pd.DataFrame, objective: str) -> dict[str, pd.Series]:
    """arm -> the final objective of each completed run, indexed by seed."""
    column = f"metric:{objective}"
    if column not in done:
        return {}
    return {arm: group.dropna(subset=[column]).groupby("seed")[column].last() for arm, group in done.groupby("arm")}


def summarize(runs: pd.DataFrame, histories: pd.DataFrame, baseline: str) -> tuple[pd.DataFrame, dict[str, float]]:
    """One row per (dataset, arm): seeds, objective mean/std, the comparison with `baseline`, costs, run ids;
    and per dataset the replication rho of the arms' ranking."""
    runs = runs.assign(outcome=runs.apply(outcome, axis=1))
    steps = final_step(histories)
    rows, rho = [], {}
    for dataset, data_runs in runs.groupby("dataset", sort=True):
        objective = objective_of(data_runs)
        lower_better = lower_is_better(objective)
        values = final_values(data_runs[data_runs["outcome"] == "complete"], objective)
        base = values.get(baseline, pd.Series(dtype=float))
        dataset_rows = []
        for arm, group in data_runs.groupby("arm", sort=True):
            complete = group[group["outcome"] == "complete"]
            v = values.get(arm, pd.Series(dtype=float))
            row = {
                "dataset": dataset,
                "arm": arm,
                "objective": objective,
                "n_seeds": len(v),
                "mean": v.mean() if len(v) else np.nan,
                "std": v.std(ddof=1) if len(v) > 1 else np.nan,
                "values": " ".join(f"{seed:g}:{value:.6g}" for seed, value in v.items()),
                "note": "",  # the baseline's row too: compare() never runs for it
            }
            comparison = compare(v, base, lower_better) if arm != baseline and len(v) and len(base) else {}
            row.update(comparison)
            row["delta_rel_pct"] = 100 * row["delta"] / abs(base.mean()) if comparison and base.mean() else np.nan
            if not len(v):
                row["note"] = "no completed run with the objective"
            elif arm != baseline and not len(base):
                row["note"] = f"no completed '{baseline}' runs to compare with"
            row.update(
                {
                    "params": pd.to_numeric(group["param:model.parameters"], errors="coerce").max(),
                    "img_per_s": complete.get("metric:train/img_per_s", pd.Series(dtype=float)).mean(),
                    "peak_mem_gb": complete.get("metric:train/peak_mem_gb", pd.Series(dtype=float)).mean(),
                    "images_seen": steps.reindex(complete["run_id"]).mean(),
                    "wall_s": (group["end"] - group["start"]).dt.total_seconds().sum(),
                    # every process that worked on a run, training and evaluation; NaN for runs logged before it
                    "cpu_s": group.get("metric:time/cpu_s", pd.Series(dtype=float)).sum(min_count=1),
                    "n_pruned": int((group["outcome"] == "pruned").sum()),
                    "n_over_budget": int((group["outcome"] == "over_budget").sum()),
                    "n_failed": int((group["outcome"] == "failed").sum()),
                    "device": ", ".join(sorted(group["tag:device"].dropna().unique())),
                    "precision": ", ".join(sorted(group["tag:precision"].dropna().unique())),
                    "run_ids": " ".join(group["run_id"]),
                }
            )
            dataset_rows.append(row)
        frame = pd.DataFrame(dataset_rows)
        frame["p_holm"], frame["significant"] = np.nan, False
        tested = frame["p"].notna() if "p" in frame else pd.Series(False, index=frame.index)
        if tested.any():  # Holm over this dataset's arm-vs-baseline comparisons
            reject, adjusted, _, _ = multipletests(frame.loc[tested, "p"], alpha=1 - CONFIDENCE, method="holm")
            frame.loc[tested, "p_holm"], frame.loc[tested, "significant"] = adjusted, reject
        rows.append(frame)
        rho[dataset] = replication(values)
    summary = pd.concat(rows, ignore_index=True)
    first = [
        "dataset",
        "arm",
        "objective",
        "n_seeds",
        "mean",
        "std",
        "delta",
        "delta_rel_pct",
        "n_pairs",
        "paired_delta",
        "paired_ci_low",
        "paired_ci_high",
        "welch_ci_low",
        "welch_ci_high",
        "test",
        "p",
        "p_holm",
        "significant",
        "p_improvement",
        "p_improvement_ci_low",
        "p_improvement_ci_high",
        "mde",
        "note",
        "values",
    ]
    summary = summary.reindex(columns=first + [c for c in summary.columns if c not in first])
    return summary, rho


def _pct(x: float) -> str:
    return f"{x:+.1f}%"


def findings(summary: pd.DataFrame, baseline: str, rho: dict[str, float]) -> list[str]:
    """One cautious sentence per arm against the baseline, and one on whether the ranking replicates."""
    out = []
    for _, row in summary[summary["arm"] != baseline].iterrows():
        metric = row["objective"].split("/")[-1]
        better = "lower" if lower_is_better(row["objective"]) else "higher"
        name = f"{row['arm']} ({row['dataset']})"
        if np.isnan(row.get("delta", np.nan)):
            out.append(f"{name}: not compared; {row['note']}.")
            continue
        seeds = f"{row['n_seeds']} seed{'s' if row['n_seeds'] != 1 else ''}"
        change = f"{metric} {row['delta']:+.3g} ({_pct(row['delta_rel_pct'])}) vs {baseline}"
        if np.isnan(row["p"]):
            out.append(f"{name}: {change}, {seeds}; no test ({row['note']}): anecdotal ({better} is better).")
            continue
        paired = row["test"] == "paired t"
        low, high = (
            (row["paired_ci_low"], row["paired_ci_high"]) if paired else (row["welch_ci_low"], row["welch_ci_high"])
        )
        interval = f"{row['test']} 95% CI [{low:+.3g}, {high:+.3g}], Holm p = {row['p_holm']:.2g}"
        if row["significant"]:
            verdict = "better" if (row["delta"] < 0) == (better == "lower") else "worse"
            out.append(
                f"{name}: {verdict} than {baseline}: {change} ({interval}), {seeds}; P(improvement) = "
                f"{row['p_improvement']:.2f} [{row['p_improvement_ci_low']:.2f}, "
                f"{row['p_improvement_ci_high']:.2f}] ({better} is better)."
            )
        else:
            out.append(
                f"{name}: no clear difference at {seeds}: {change} ({interval}); the smallest difference these "
                f"seeds could detect (80% power) is {row['mde']:.3g}."
            )
    for dataset, r in rho.items():
        if np.isnan(r):
            out.append(f"Replication ({dataset}): too few arms with two or more seeds to compare two halves of them.")
        elif r < REPLICATION_RHO:
            out.append(
                f"Replication ({dataset}): the arms' ranking over one half of the seeds against the other has "
                f"Spearman rho = {r:.2f} (< {REPLICATION_RHO}): at this budget the ranking is mostly noise."
            )
        else:
            out.append(
                f"Replication ({dataset}): the arms' ranking over one half of the seeds against the other has "
                f"Spearman rho = {r:.2f}: it replicates."
            )
    return out
