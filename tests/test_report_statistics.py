"""The report's comparison statistics on synthetic MLflow stores with known numbers, against scipy and statsmodels."""

import itertools

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient
from scipy import stats
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.power import TTestPower

from reports.analysis import findings, summarize
from reports.collect import collect
from reports.synthetic import make_experiment


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One MLflow store for the module (creating one costs seconds); each test makes its own experiments."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('stats') / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    return MlflowClient(uri)


def summary_of(store, arms: dict[str, list[float]], **kwargs):
    """summarize() of a new synthetic experiment whose arm X has final value arms[X][s] for seed s."""
    name = f"stats-{len(store.search_experiments())}"
    make_experiment(store, name, arms, **kwargs)
    data = collect(name)
    summary, rho = summarize(data.runs, data.histories, "baseline")
    return summary.set_index("arm"), rho


# A large shared seed effect (seed 3 is 30 worse than seed 0 in every arm) and a small, steady arm effect.
BASELINE = [10.0, 20.0, 30.0, 40.0]
STEADY = [11.0, 21.2, 30.9, 41.1]


def test_pairing_finds_a_small_steady_effect_under_a_large_seed_effect_that_welch_misses(store):
    summary, _ = summary_of(store, {"baseline": BASELINE, "steady": STEADY})
    row = summary.loc["steady"]
    paired = stats.ttest_rel(STEADY, BASELINE)
    welch = stats.ttest_ind(STEADY, BASELINE, equal_var=False)
    assert row["n_pairs"] == 4 and row["test"] == "paired t"
    assert row["paired_delta"] == pytest.approx(np.mean(np.subtract(STEADY, BASELINE)))
    assert (row["paired_ci_low"], row["paired_ci_high"]) == pytest.approx(tuple(paired.confidence_interval(0.95)))
    assert (row["welch_ci_low"], row["welch_ci_high"]) == pytest.approx(tuple(welch.confidence_interval(0.95)))
    assert row["p"] == pytest.approx(paired.pvalue)
    assert row["paired_ci_low"] > 0 and row["welch_ci_low"] < 0 < row["welch_ci_high"]  # what pairing buys
    assert row["significant"]  # a single comparison: Holm leaves p as it is
    assert summary.loc["baseline", "note"] == ""  # nothing for the report's "Left out" to print
    sd = np.std(np.subtract(STEADY, BASELINE), ddof=1)
    assert row["mde"] == pytest.approx(TTestPower().solve_power(nobs=4, alpha=0.05, power=0.8) * sd)


def test_holm_turns_a_nominal_difference_into_no_clear_difference(store):
    arms = {
        "baseline": BASELINE,
        "nominal": [10.6, 21.6, 30.6, 41.0],  # paired p = 0.028 alone, 0.084 after Holm over 3
        "null_a": [10.2, 19.5, 30.4, 39.8],
        "null_b": [9.6, 20.3, 29.9, 40.5],
    }
    summary, rho = summary_of(store, arms)
    raw = {arm: stats.ttest_rel(arms[arm], BASELINE).pvalue for arm in ("nominal", "null_a", "null_b")}
    assert raw["nominal"] < 0.05  # significant before the correction ...
    reject, adjusted, _, _ = multipletests(list(raw.values()), alpha=0.05, method="holm")
    for arm, p_holm, significant in zip(raw, adjusted, reject):
        assert summary.loc[arm, "p_holm"] == pytest.approx(p_holm)
        assert bool(summary.loc[arm, "significant"]) == bool(significant)
    assert summary.loc["nominal", "p_holm"] > 0.05 and not summary.loc["nominal", "significant"]  # ... not after
    row = summary.loc["nominal"]
    sentence = (
        f"nominal (mnist): no clear difference at 4 seeds: fd_digits {row['delta']:+.3g} "
        f"({row['delta_rel_pct']:+.1f}%) vs baseline (paired t 95% CI [{row['paired_ci_low']:+.3g}, "
        f"{row['paired_ci_high']:+.3g}], Holm p = {row['p_holm']:.2g}); the smallest difference these seeds "
        f"could detect (80% power) is {row['mde']:.3g}."
    )
    assert sentence in findings(summary.reset_index(), "baseline", rho)


def test_a_single_seed_arm_gets_a_delta_but_no_interval_and_says_why(store):
    summary, rho = summary_of(store, {"baseline": BASELINE, "once": [12.0]})
    row = summary.loc["once"]
    assert row["delta"] == pytest.approx(12.0 - np.mean(BASELINE)) and row["note"] == "one seed: no CI"
    assert all(np.isnan(row[c]) for c in ("paired_ci_low", "welch_ci_low", "p", "p_holm", "mde", "p_improvement"))
    assert not row["significant"]
    assert (
        "once (mnist): fd_digits -13 (-52.0%) vs baseline, 1 seed; no test (one seed: no CI): anecdotal "
        "(lower is better)."
    ) in findings(summary.reset_index(), "baseline", rho)


def test_probability_of_improvement_counts_every_pair_of_runs_and_its_bootstrap_ci_is_reproducible(store):
    arms = {"baseline": BASELINE, "mixed": [12.0, 15.0, 35.0, 39.0]}
    summary, _ = summary_of(store, arms)
    wins = [(a < b) + 0.5 * (a == b) for a, b in itertools.product(arms["mixed"], BASELINE)]  # fd: lower is better
    row = summary.loc["mixed"]
    assert row["p_improvement"] == pytest.approx(np.mean(wins))
    assert 0 <= row["p_improvement_ci_low"] <= row["p_improvement"] <= row["p_improvement_ci_high"] <= 1
    again, _ = summary_of(store, arms)
    assert again.loc["mixed", "p_improvement_ci_low"] == row["p_improvement_ci_low"]


def test_a_higher_is_better_objective_calls_a_higher_arm_better(store):
    arms = {"baseline": [0.50, 0.60, 0.70, 0.80], "sharper": [0.56, 0.66, 0.75, 0.87]}
    summary, rho = summary_of(store, arms, objective="eval/confident_frac")
    row = summary.loc["sharper"]
    assert row["significant"] and row["delta"] > 0
    assert row["p_improvement"] == pytest.approx(
        np.mean([a > b for a, b in itertools.product(arms["sharper"], arms["baseline"])])
    )
    [sentence] = [s for s in findings(summary.reset_index(), "baseline", rho) if s.startswith("sharper")]
    assert sentence.startswith("sharper (mnist): better than baseline: confident_frac +0.06 (+9.2%)")
    assert sentence.endswith("(higher is better).")


def test_the_final_value_is_compared_even_where_an_earlier_evaluation_was_better(store):
    """The objective's history dips below its last value; the report uses the last, not the best."""
    experiment = make_experiment(store, "dip", {"baseline": [10.0, 12.0], "dip": [11.0, 13.0]})
    for run in store.search_runs([experiment], "tags.ablation = 'dip'"):
        store.log_metric(run.info.run_id, "eval/fd_digits", 1.0, step=10)  # far better, but earlier
    data = collect("dip")
    summary, _ = summarize(data.runs, data.histories, "baseline")
    assert summary.set_index("arm").loc["dip", "mean"] == pytest.approx(12.0)


@pytest.mark.parametrize(
    "replicates", [pytest.param(True, id="same ranking in both halves"), pytest.param(False, id="ranking reversed")]
)
def test_replication_is_spearman_s_rho_between_two_halves_of_the_seeds(store, replicates):
    first = {"baseline": 10.0, "a": 11.0, "b": 12.0, "c": 13.0}
    second = first if replicates else {arm: 23.0 - value for arm, value in first.items()}
    arms = {arm: [first[arm], first[arm] + 0.1, second[arm], second[arm] + 0.1] for arm in first}
    summary, rho = summary_of(store, arms)
    halves = [(np.mean(v[:2]), np.mean(v[2:])) for v in arms.values()]
    assert rho["mnist"] == pytest.approx(stats.spearmanr(*zip(*halves)).statistic)
    assert rho["mnist"] == pytest.approx(1.0 if replicates else -1.0)
    verdict = "it replicates." if replicates else "at this budget the ranking is mostly noise."
    assert findings(summary.reset_index(), "baseline", rho)[-1].endswith(verdict)
