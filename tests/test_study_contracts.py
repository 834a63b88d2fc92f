"""What the README promises about a study, end to end through study/run.py: a changed config is refused,
over budget is a final result, Inception metrics from a folder complete a trial, and search mode prunes
with the median rule and resumes an interrupted trial."""

import csv
import signal
import statistics
import subprocess
import time

import optuna
import pytest
import yaml
from helpers import (
    REPO,
    RUN,
    assert_clean_error,
    long_smoke_budget,
    optuna_db,
    run_script,
    study_env,
    study_trials,
    trial_runs,
    write_arm,
    write_images,
)

from liquid_diffusion.config import dataset_slug

COMPLETE, FAIL, PRUNED = (optuna.trial.TrialState[s] for s in ("COMPLETE", "FAIL", "PRUNED"))


def smoke_args(tmp_path, experiment, *extra):
    return [
        "--budget",
        "cpu-smoke",
        "--experiment",
        experiment,
        "--out",
        str(tmp_path / "out"),
        "--no-progress",
        *extra,
    ]


def budgets_file(tmp_path, **overrides) -> str:
    """study/budgets.yaml with cpu-smoke's overrides changed."""
    budgets = yaml.safe_load((REPO / "study" / "budgets.yaml").read_text())
    budgets["cpu-smoke"]["overrides"].update(overrides)
    path = tmp_path / "budgets.yaml"
    path.write_text(yaml.safe_dump(budgets))
    return str(path)


def test_a_rerun_whose_arm_data_or_budget_changed_is_refused_and_trains_nothing(tmp_path, run_here):
    env, arms = study_env(tmp_path), tmp_path / "arms"
    args = smoke_args(tmp_path, "changed", "--ablation", "baseline", "--ablations-dir", str(arms))
    write_arm(arms, "baseline", {})
    assert run_here(env, *args).returncode == 0
    folders = sorted((tmp_path / "out").rglob("*-seed0-*"))

    refusal = ("study 'changed:baseline:mnist:cpu-smoke'", "was run with another config", "use another --experiment")
    write_arm(arms, "baseline", {"train.lr": 5.0e-4})  # the arm changed
    assert_clean_error(run_here(env, *args), *refusal)
    write_arm(arms, "baseline", {"data.max_images": 500})  # the data changed
    assert_clean_error(run_here(env, *args), *refusal)
    write_arm(arms, "baseline", {})
    changed_budget = run_here(env, *args, "--budgets-file", budgets_file(tmp_path, **{"train.images": 144}))
    assert_clean_error(changed_budget, *refusal)

    assert len(trial_runs(env, "changed")) == 1 and sorted((tmp_path / "out").rglob("*-seed0-*")) == folders
    assert run_here(env, *args).returncode == 0  # the unchanged command still continues the study


def test_over_budget_is_a_failed_result_that_is_never_retried_and_is_reported(tmp_path, run_here):
    env = study_env(tmp_path)
    args = smoke_args(tmp_path, "over", "--ablation", "baseline", "--budgets-file")
    args.append(budgets_file(tmp_path, **{"train.max_wall_minutes": 1e-4}))  # 6 ms: over after the first step

    first = run_here(env, *args)
    assert first.returncode == 1, first.stderr[-3000:]
    assert "Traceback" not in first.stderr and "over budget" in first.stdout
    [run] = trial_runs(env, "over")
    assert run.info.status == "FAILED" and run.data.tags["status"] == "over_budget"
    assert run.data.tags["reason"].startswith("over budget:") and "wall time" in run.data.tags["reason"]
    [trial] = study_trials(optuna_db(tmp_path), "over:baseline:mnist:cpu-smoke")
    assert trial.state == FAIL and trial.user_attrs["status"] == "over_budget"

    again = run_here(env, *args)  # a result, not an interruption: nothing is retried
    assert again.returncode == 1 and "== baseline" not in again.stdout
    assert len(study_trials(optuna_db(tmp_path), "over:baseline:mnist:cpu-smoke")) == 1

    report = run_script("reports/build.py", env, "--experiment", "over", "--out", str(tmp_path / "report"))
    assert report.returncode == 0, report.stderr[-3000:]
    [row] = csv.DictReader((tmp_path / "report" / "summary.csv").open())
    assert row["arm"] == "baseline" and int(row["n_over_budget"]) == 1 and int(row["n_seeds"]) == 0


@pytest.mark.parametrize("verified", [True, False], ids=["verified-hash-patched", "unverified"])
def test_a_folder_study_with_inception_metrics_completes_its_trial(
    tmp_path, random_inception_weights, monkeypatch, run_here, verified
):
    """FID from a local image folder with a random-weight Inception file: accepted as the standard file
    when its hash is patched in (in this process), else only with --allow-unverified-weights."""
    folder = write_images(tmp_path / "images", n=24, size=(8, 8))
    arms = write_arm(tmp_path / "arms", "rgb", {"data.channels": 3, "eval.n": 8, "eval.n_ref": 8})
    args = smoke_args(tmp_path, "inception", "--ablation", "rgb", "--ablations-dir", str(arms), "--dataset")
    args += [str(folder), "--inception-weights", str(random_inception_weights)]
    env = study_env(tmp_path, cache=tmp_path / "cache")
    if verified:
        from liquid_diffusion import inception

        monkeypatch.setattr(inception, "INCEPTION_SHA256", inception.sha256_of(random_inception_weights))
    else:
        assert_clean_error(run_here(env, *args), "--allow-unverified-weights")  # refused before any run
        assert trial_runs(env, "inception") == []
        args.append("--allow-unverified-weights")
    result = run_here(env, *args)
    assert result.returncode == 0, result.stderr[-3000:]

    objective = "eval/fid" if verified else "eval/fid_unverified"
    [child] = trial_runs(env, "inception")
    assert child.data.tags["weights"] == ("verified" if verified else "unverified")
    assert child.data.tags["eval.objective"] == objective
    assert {"eval/fid", "eval/kid"} & set(child.data.metrics) == ({"eval/fid", "eval/kid"} if verified else set())
    [trial] = study_trials(optuna_db(tmp_path), f"inception:rgb:{dataset_slug(str(folder))}:cpu-smoke")
    assert trial.state == COMPLETE and trial.value == pytest.approx(child.data.metrics[objective])


def search_space(tmp_path, space: dict, pruner: dict | None = None) -> str:
    """A search-space file: `space`, and the default file's pruner unless another is given."""
    default = yaml.safe_load((REPO / "study" / "search_space.yaml").read_text())
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump({"space": space, "pruner": pruner or default["pruner"]}))
    return str(path)


def test_search_prunes_by_the_median_rule_after_its_startup_trials(tmp_path, run_here):
    """A trial either trains (warmup 0) or barely moves (its warmup is far longer than the whole run):
    two clearly different objective values. The default pruner is the median one with 3 startup trials:
    those always finish, and a later trial is pruned exactly when its objective at an evaluation is
    worse than the median of the finished trials there."""
    env = study_env(tmp_path)
    space = search_space(tmp_path, {"train.warmup_images": {"choices": [0, 1_000_000]}})
    args = smoke_args(tmp_path, "median", "--ablation", "baseline", "--search", "6", "--search-space", space)
    result = run_here(env, *args)
    assert result.returncode == 0, result.stderr[-3000:]
    trials = study_trials(optuna_db(tmp_path), "median:baseline:mnist:cpu-smoke:search")
    assert len(trials) == 6 and all(t.state == COMPLETE for t in trials[:3])
    pruned = []
    for trial in trials[3:]:
        finished = [t for t in trials if t.number < trial.number and t.state == COMPLETE]
        # fd_digits is minimised; Optuna compares the trial's best value so far with the median at each step
        best, should_prune = float("inf"), False
        for step, value in sorted(trial.intermediate_values.items()):
            best = min(best, value)
            if best > statistics.median(t.intermediate_values[step] for t in finished):
                should_prune = True
                break
        assert (trial.state == PRUNED) == should_prune, (trial.number, trial.params, trial.intermediate_values)
        pruned.append(trial.state == PRUNED)
    assert any(pruned) and not all(pruned)  # this seed's draws exercise both outcomes


def test_an_interrupted_search_trial_resumes_with_its_parameters_in_its_run(tmp_path, run_here):
    """SIGTERM (what a scheduler or `kill` sends) marks the child and parent runs KILLED; rerunning the
    command resumes the trial from its checkpoint, with its parameters, in its run and its folder."""
    env = study_env(tmp_path)
    space = search_space(tmp_path, {"train.lr": {"low": 1e-4, "high": 3e-3, "log": True}}, {"type": "none"})
    args = smoke_args(tmp_path, "resume", "--ablation", "baseline", "--search", "1", "--search-space", space)
    args += ["--budgets-file", long_smoke_budget(tmp_path, images=480)]  # SIGTERM at its first checkpoint
    process = subprocess.Popen([*RUN, *args], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not list((tmp_path / "out").rglob("checkpoint-*")) and time.time() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130 and b"Traceback" not in stderr, stderr[-2000:]
    assert b"interrupted; the trial is marked (MLflow KILLED)" in stderr
    [killed] = study_trials(optuna_db(tmp_path), "resume:baseline:mnist:cpu-smoke:search")
    [run], [parent] = trial_runs(env, "resume"), trial_runs(env, "resume", kind="study")
    assert killed.state == FAIL and killed.user_attrs["resumable"]
    assert run.info.status == "KILLED" and "interrupted" in run.data.tags["reason"]
    assert parent.info.status == "KILLED"  # the study is unfinished, and says so

    result = run_here(env, *args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed at" in result.stdout
    first, again = study_trials(optuna_db(tmp_path), "resume:baseline:mnist:cpu-smoke:search")
    assert again.state == COMPLETE and again.params == first.params and again.user_attrs["root_trial"] == 0
    [resumed], [parent_again] = trial_runs(env, "resume"), trial_runs(env, "resume", kind="study")
    assert resumed.info.run_id == run.info.run_id and resumed.info.status == "FINISHED"
    assert parent_again.info.run_id == parent.info.run_id and parent_again.info.status == "FINISHED"
    assert [p.name.rsplit("-", 1)[1] for p in (tmp_path / "out").rglob("*-trial*")] == ["trial0"]  # one folder
