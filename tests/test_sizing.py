"""reports/sizing.py checked against known answers (statsmodels' power, chi-square coverage, simulated noise)
and study/plan.py end to end at cpu-smoke size."""

import math

import numpy as np
import pandas as pd
import pytest
import yaml
from helpers import assert_clean_error, study_env
from scipy import stats
from statsmodels.stats.power import TTestPower

from reports import sizing


def test_the_planning_sd_is_the_upper_80_percent_limit_and_covers_the_true_sd_80_percent_of_the_time():
    assert sizing.sd_upper(1.0, 2) == pytest.approx(math.sqrt(2 / stats.chi2.ppf(0.2, 2)))  # 2.12x, as documented
    assert sizing.sd_upper(1.0, 2) == pytest.approx(2.117, abs=1e-3)
    rng = np.random.default_rng(0)
    samples = rng.normal(0, 3.0, size=(20_000, 3))  # 3 seeds: 2 df
    upper = np.array([sizing.sd_upper(sd, 2) for sd in samples.std(axis=1, ddof=1)])
    assert (upper >= 3.0).mean() == pytest.approx(0.8, abs=0.01)  # MC error 0.003
    assert (samples.std(axis=1, ddof=1) >= 3.0).mean() < 0.5  # the point estimate alone is too low most of the time


@pytest.mark.parametrize(("effect", "sd", "comparisons"), [(1.0, 1.0, 1), (1.0, 2.0, 3), (0.5, 1.0, 7), (3.0, 1.0, 1)])
def test_seeds_needed_agrees_with_statsmodels_solve_power(effect, sd, comparisons):
    n = sizing.seeds_needed(effect, sd, comparisons)
    solved = TTestPower().solve_power(effect / sd, alpha=0.05 / comparisons, power=0.8, alternative="two-sided")
    assert n == max(2, math.ceil(solved))
    power = TTestPower().power(effect / sd, nobs=n, alpha=0.05 / comparisons, alternative="two-sided")
    assert power >= 0.8
    if n > 2:
        assert TTestPower().power(effect / sd, nobs=n - 1, alpha=0.05 / comparisons, alternative="two-sided") < 0.8


def test_seeds_needed_reaches_the_stated_power_in_simulated_paired_studies():
    n = sizing.seeds_needed(1.0, 1.0, comparisons=3)
    rng = np.random.default_rng(1)
    diffs = rng.normal(1.0, 1.0, size=(20_000, n))
    p = stats.ttest_1samp(diffs, 0.0, axis=1).pvalue
    assert (p < 0.05 / 3).mean() >= 0.8 - 0.01
    assert sizing.seeds_needed(0.001, 1.0) is None  # out of reach within MAX_SEEDS


def test_noise_split_recovers_known_training_and_evaluation_variances_where_the_naive_split_does_not():
    rng = np.random.default_rng(2)
    seeds, repeats, train_sd, eval_sd = 400, 3, 1.0, 2.0  # evaluation noise dominates: 80% of the variance
    seed_effect = rng.normal(0, train_sd, seeds)
    rows = [
        {"seed": s, "repeat": r, "value": 10 + seed_effect[s] + rng.normal(0, eval_sd)}
        for s in range(seeds)
        for r in range(repeats)
    ]
    values = pd.DataFrame(rows)
    split = sizing.noise_split(values)
    assert split["eval_var"] == pytest.approx(4.0, rel=0.1)
    assert split["train_var"] == pytest.approx(1.0, rel=0.3)
    assert split["eval_share"] == pytest.approx(0.8, abs=0.05)
    # The naive reading, the variance of the seed means taken as training noise, keeps eval_var / 3 in it.
    naive = values.groupby("seed")["value"].mean().var(ddof=1)
    assert naive == pytest.approx(1.0 + 4.0 / 3, rel=0.2) and naive > 1.8


def test_a_factorial_main_effect_has_half_the_sd_of_a_paired_difference_at_k_3():
    rng = np.random.default_rng(3)
    runs = rng.normal(0, 1.0, size=(50_000, 8))  # 8 arms, independent run noise, no true effects
    high = np.array([bool(arm & 1) for arm in range(8)])
    effect = runs[:, high].mean(axis=1) - runs[:, ~high].mean(axis=1)
    paired = runs[:, 1] - runs[:, 0]
    assert effect.std() / paired.std() == pytest.approx(sizing.effect_sd_factor(3), rel=0.02)
    assert sizing.effect_sd_factor(3) == 0.5 and sizing.effect_sd_factor(0) == 1.0


def _pilot(diff_sd_by_length: dict[int, float], cpu_s: dict[int, float], seeds: int = 4):
    """A pilot whose paired differences have exactly the given sd at each length."""
    rng = np.random.default_rng(4)
    z = np.arange(seeds) - (seeds - 1) / 2
    z /= z.std(ddof=1)
    values, costs = [], []
    for length, sd in diff_sd_by_length.items():
        for s in range(seeds):
            base = 10 + rng.normal(0, 1)
            for arm, value in (("baseline", base), ("other", base + 0.5 + sd * z[s])):
                for r in range(2):
                    values.append({"arm": arm, "seed": s, "repeat": r, "length": length, "value": value + 0.01 * r})
                costs.append({"arm": arm, "seed": s, "length": length, "cpu_s": cpu_s[length], "wall_s": cpu_s[length]})
    return pd.DataFrame(values), pd.DataFrame(costs)


def test_the_table_recommends_the_length_with_the_cheapest_sized_study():
    """A length 4x the cost whose spread is 10x smaller wins: the sized study needs far fewer seeds."""
    values, costs = _pilot({1000: 3.0, 4000: 0.3}, {1000: 60.0, 4000: 240.0})
    table = sizing.sizing_table(values, costs, "baseline", study_arms=8, comparisons=3, factors=3)
    short, long = table.iloc[0], table.iloc[1]
    assert long["recommended"] and not short["recommended"]
    assert long["seeds_needed"] < short["seeds_needed"]
    assert long["study_cpu_hours"] == pytest.approx(long["seeds_needed"] * 8 * 4 / 60)
    assert long["cpu_min_per_run"] == 4.0 and long["diff_sd_df"] == 3 and long["diff_sd"] == pytest.approx(0.3)
    expected = sizing.seeds_needed(long["effect"], sizing.sd_upper(long["diff_sd"], 3) * 0.5, 3)
    assert long["seeds_needed"] == expected
    assert "CPU-hours" in sizing.describe(long, pilot_seeds=4)


# --- the command ------------------------------------------------------------------------------------------


@pytest.fixture
def plan_here(monkeypatch, capsys, tmp_path):
    """`python study/plan.py ARGS` in this process, from a fresh folder with its own stores."""
    import subprocess

    import mlflow

    from study.plan import cli

    env = study_env(tmp_path)
    for key in ("MLFLOW_TRACKING_URI", "LIQUID_DIFFUSION_CACHE"):
        monkeypatch.setenv(key, env[key])
    monkeypatch.chdir(tmp_path)

    def run(*args: str) -> subprocess.CompletedProcess:
        mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
        capsys.readouterr()
        code = cli(list(args))
        printed = capsys.readouterr()
        return subprocess.CompletedProcess(["study/plan.py", *args], code, printed.out, printed.err)

    return run


SMOKE_PILOT = ("--budget", "cpu-smoke", "--seeds", "2", "--lengths", "48,96", "--eval-repeats", "2", "--no-progress")


def test_plan_trains_a_pilot_prints_the_table_logs_it_and_writes_a_profile_run_py_reads(plan_here, tmp_path, run_here):
    import mlflow

    result = plan_here(*SMOKE_PILOT, "--factors", "3")
    assert result.returncode == 0, result.stderr
    assert "seeds_needed" in result.stdout and "2^3 factorial study of 8 arms and 3 comparison(s)" in result.stdout
    profile_path = tmp_path / "outputs" / "pilot" / "recommended-budget.yaml"
    profile = yaml.safe_load(profile_path.read_text())
    ((name, entry),) = profile.items()
    assert name in result.stdout and "CPU-min" in entry["description"]
    assert entry["overrides"]["train.images"] in (48, 96)

    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name("pilot")
    trials = client.search_runs([experiment.experiment_id], "tags.kind = 'trial'")
    assert len(trials) == 4 and {r.data.tags["budget"] for r in trials} == {"cpu-smoke-pilot"}
    (pilot,) = client.search_runs([experiment.experiment_id], "tags.kind = 'pilot'")
    artifacts = {a.path for a in client.list_artifacts(pilot.info.run_id)}
    assert artifacts == {"sizing.csv", "sizing.png", "recommended-budget.yaml"}
    assert pilot.data.params["study_arms"] == "8"

    # The printed next step works as typed (here: its dry run, in the same folder and stores).
    line = next(line for line in result.stdout.splitlines() if "study/run.py" in line)
    args = line.split("#")[0].split()[2:]
    dry = run_here(study_env(tmp_path), *args, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert f"images: {entry['overrides']['train.images']}" in dry.stdout

    # The report of the pilot's experiment shows the table.
    from reports.build import cli as build

    assert build(["--experiment", "pilot", "--out", str(tmp_path / "report")]) == 0
    page = (tmp_path / "report" / "report.html").read_text()
    assert "Sizing (pilot)" in page and "seeds_needed" in page and "Sized for a 2^3 factorial study of 8 arms" in page

    # A rerun resumes: nothing is trained again, and the table is the same.
    again = plan_here(*SMOKE_PILOT, "--factors", "3")
    assert again.returncode == 0 and "== baseline" not in again.stdout
    assert len(client.search_runs([experiment.experiment_id], "tags.kind = 'trial'")) == 4


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        pytest.param(("--lengths", "20k,40k"), ("--lengths", "20k,40k"), id="bad-lengths"),
        pytest.param(("--lengths", "96"), ("at least two",), id="one-length"),
        pytest.param(("--ablation", "baseline"), ("at least one other arm",), id="one-arm"),
        pytest.param(("--ablation", "baseline,nope"), ("unknown ablation 'nope'", "no_relax"), id="unknown-arm"),
        pytest.param(("--budget", "nope"), ("unknown budget 'nope'", "cpu-demo"), id="unknown-budget"),
        pytest.param(("--effect", "2"), ("--effect",), id="bad-effect"),
        pytest.param(("--seeds", "1"), ("--seeds",), id="one-seed"),
    ],
)
def test_bad_input_is_one_line_and_exit_2_before_anything_trains(plan_here, tmp_path, args, fragments):
    result = plan_here(*SMOKE_PILOT, *args)
    assert_clean_error(result, *fragments)
    assert not (tmp_path / "outputs").exists()


def test_a_cosine_budget_is_refused_because_its_lengths_are_not_exact(plan_here, tmp_path):
    budgets = {
        "cosine-smoke": {"description": "cosine", "overrides": {"train.lr_schedule": "cosine", "train.images": 96}}
    }
    path = tmp_path / "budgets.yaml"
    path.write_text(yaml.safe_dump(budgets))
    result = plan_here("--budgets-file", str(path), "--budget", "cosine-smoke", "--lengths", "48,96")
    assert_clean_error(result, "cosine-smoke", "constant schedule")
