"""The numbers of the report: per (dataset, arm) seed aggregates, deltas to the baseline with Welch CIs, findings."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy import stats

from liquid_diffusion.config import METRICS

CONFIDENCE = 0.95


def outcome(row) -> str:
    """complete | pruned | over_budget | failed, from a run's status and tags."""
    if row["tag:optuna.state"] == "PRUNED" or row["tag:status"] == "pruned":
        return "pruned"
    if row["tag:status"] == "over_budget":
        return "over_budget"
    return "complete" if row["run_status"] == "FINISHED" else "failed"


def objective_of(runs: pd.DataFrame) -> str:
    """The logged objective metric of a dataset's runs (e.g. eval/fd_digits), the most common one."""
    names = runs["tag:eval.objective"].dropna()
    return names.mode().iloc[0] if len(names) else ""


def lower_is_better(objective: str) -> bool:
    name = objective.split("/")[-1].removesuffix("_unverified")
    return not METRICS.get(name, False)


def welch_ci(a: np.ndarray, b: np.ndarray, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """CI of mean(a) - mean(b) with Welch's unequal-variance t interval."""
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    diff, se = a.mean() - b.mean(), math.sqrt(va + vb)
    if se == 0:
        return diff, diff
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    half = stats.t.ppf(0.5 + confidence / 2, df) * se
    return diff - half, diff + half


def final_step(histories: pd.DataFrame) -> pd.Series:
    """Images seen per run: the last step of its training loss."""
    loss = histories[histories["key"] == "train/loss"]
    return loss.groupby("run_id")["step"].max()


def summarize(runs: pd.DataFrame, histories: pd.DataFrame, baseline: str) -> pd.DataFrame:
    """One row per (dataset, arm): seeds, objective mean/std, delta to `baseline` with its CI, costs, run ids."""
    runs = runs.assign(outcome=runs.apply(outcome, axis=1))
    steps = final_step(histories)
    rows = []
    for dataset, data_runs in runs.groupby("dataset", sort=True):
        objective = objective_of(data_runs)
        done = data_runs[data_runs["outcome"] == "complete"]
        values = {arm: group[f"metric:{objective}"].dropna().to_numpy(float) if f"metric:{objective}" in group else
                  np.array([]) for arm, group in done.groupby("arm")}
        base = values.get(baseline, np.array([]))
        for arm, group in data_runs.groupby("arm", sort=True):
            complete = group[group["outcome"] == "complete"]
            v = values.get(arm, np.array([]))
            row = {"dataset": dataset, "arm": arm, "objective": objective, "n_seeds": len(v),
                   "mean": v.mean() if len(v) else np.nan, "std": v.std(ddof=1) if len(v) > 1 else np.nan,
                   "delta": np.nan, "delta_ci_low": np.nan, "delta_ci_high": np.nan, "delta_rel_pct": np.nan,
                   "ci_excludes_zero": False, "note": ""}
            if arm != baseline and len(v) and len(base):
                row["delta"] = v.mean() - base.mean()
                row["delta_rel_pct"] = 100 * row["delta"] / abs(base.mean()) if base.mean() else np.nan
                if len(v) > 1 and len(base) > 1:
                    low, high = welch_ci(v, base)
                    row.update(delta_ci_low=low, delta_ci_high=high, ci_excludes_zero=bool(low > 0 or high < 0))
                else:
                    row["note"] = "one seed: no CI"
            elif arm != baseline and len(v):
                row["note"] = f"no completed '{baseline}' runs to compare with"
            elif not len(v):
                row["note"] = "no completed run with the objective"
            row.update({
                "params": pd.to_numeric(group["param:model.parameters"], errors="coerce").max(),
                "img_per_s": complete.get("metric:train/img_per_s", pd.Series(dtype=float)).mean(),
                "peak_mem_gb": complete.get("metric:train/peak_mem_gb", pd.Series(dtype=float)).mean(),
                "images_seen": steps.reindex(complete["run_id"]).mean(),
                "wall_s": (group["end"] - group["start"]).dt.total_seconds().sum(),
                "n_pruned": int((group["outcome"] == "pruned").sum()),
                "n_over_budget": int((group["outcome"] == "over_budget").sum()),
                "n_failed": int((group["outcome"] == "failed").sum()),
                "device": ", ".join(sorted(group["tag:device"].dropna().unique())),
                "precision": ", ".join(sorted(group["tag:precision"].dropna().unique())),
                "run_ids": " ".join(group["run_id"]),
            })
            rows.append(row)
    return pd.DataFrame(rows)


def _pct(x: float) -> str:
    return f"{x:+.1f}%"


def findings(summary: pd.DataFrame, baseline: str) -> list[str]:
    """One cautious sentence per arm against the baseline."""
    out = []
    for _, row in summary[summary["arm"] != baseline].iterrows():
        metric = row["objective"].split("/")[-1]
        better = "lower" if lower_is_better(row["objective"]) else "higher"
        if np.isnan(row["delta"]):
            out.append(f"{row['arm']} ({row['dataset']}): not compared; {row['note']}.")
            continue
        seeds = f"{row['n_seeds']} seed{'s' if row['n_seeds'] != 1 else ''}"
        change = f"{metric} {_pct(row['delta_rel_pct'])} vs {baseline}"
        if np.isnan(row["delta_ci_low"]):
            out.append(f"{row['arm']} ({row['dataset']}): {change}, {seeds}, no confidence interval with one seed; "
                       f"anecdotal ({better} is better).")
        elif row["ci_excludes_zero"]:
            base = row["mean"] - row["delta"]
            ci = f"{_pct(100 * row['delta_ci_low'] / abs(base))} … {_pct(100 * row['delta_ci_high'] / abs(base))}"
            out.append(f"{row['arm']} ({row['dataset']}): {change} (95% CI {ci}), {seeds} ({better} is better).")
        else:
            base = row["mean"] - row["delta"]
            ci = f"{_pct(100 * row['delta_ci_low'] / abs(base))} … {_pct(100 * row['delta_ci_high'] / abs(base))}"
            out.append(f"{row['arm']} ({row['dataset']}): {change}, but the 95% CI ({ci}) includes 0: no clear "
                       f"difference at {seeds}.")
    return out
