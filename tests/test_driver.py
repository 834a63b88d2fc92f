"""The Optuna study driver on cpu-smoke: seeds and search, parent and child runs, resume, workers, storages."""

import optuna
import pytest
import yaml
from helpers import (
    assert_clean_error,
    optuna_db,
    run_study,
    study_env,
    study_trials,
    trial_runs,
)

SMOKE = ["--budget", "cpu-smoke", "--no-progress"]


@pytest.fixture
def store(tmp_path):
    """A fresh MLflow store and Optuna file per test, sharing one data/classifier cache."""
    return tmp_path, study_env(tmp_path)


def trials(tmp_path, name, storage=None):
    return study_trials(storage or optuna_db(tmp_path), name)


def test_two_arms_by_two_seeds_make_four_children_under_two_parents_and_a_rerun_adds_nothing(repo, store, run_here):
    tmp_path, env = store
    args = [
        "--ablation",
        "baseline,no_relax",
        "--seeds",
        "2",
        "--experiment",
        "grid",
        "--out",
        str(tmp_path / "o"),
        *SMOKE,
    ]
    result = run_here(env, *args)
    assert result.returncode == 0, result.stderr[-3000:]
    parents = {p.data.tags["ablation"]: p for p in trial_runs(env, "grid", kind="study")}
    children = trial_runs(env, "grid")
    assert sorted(parents) == ["baseline", "no_relax"] and len(children) == 4
    for child in children:
        arm = child.data.tags["ablation"]
        parent = parents[arm]
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.info.status == "FINISHED" and child.data.tags["optuna.state"] == "COMPLETE"
        assert child.data.tags["study"] == parent.data.tags["study"] == f"grid:{arm}:mnist:cpu-smoke"
    assert sorted((c.data.tags["ablation"], c.data.tags["seed"]) for c in children) == [
        ("baseline", "0"),
        ("baseline", "1"),
        ("no_relax", "0"),
        ("no_relax", "1"),
    ]
    for arm, parent in parents.items():
        values = [c.data.metrics["eval/fd_digits"] for c in children if c.data.tags["ablation"] == arm]
        assert parent.info.status == "FINISHED" and parent.data.tags["budget"] == "cpu-smoke"
        assert parent.data.metrics["study/mean"] == pytest.approx(sum(values) / 2)
        assert parent.data.metrics["study/best"] == pytest.approx(min(values))  # fd_digits: lower is better
        assert parent.data.metrics["study/std"] == pytest.approx(abs(values[0] - values[1]) / 2**0.5)
        assert parent.data.metrics["study/n_complete"] == 2

    again = run_here(env, *args)
    assert again.returncode == 0 and "== " not in again.stdout
    assert len(trial_runs(env, "grid")) == 4 and len(trials(tmp_path, "grid:baseline:mnist:cpu-smoke")) == 2


def test_two_workers_split_the_trials_without_duplicates(repo, store):
    tmp_path, env = store
    result = run_study(
        env,
        "--ablation",
        "baseline",
        "--seeds",
        "4",
        "--workers",
        "2",
        "--experiment",
        "two",
        "--out",
        str(tmp_path / "o"),
        *SMOKE,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    done = trials(tmp_path, "two:baseline:mnist:cpu-smoke")
    assert sorted(t.params["seed"] for t in done) == [0, 1, 2, 3]
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in done)
    assert len({t.user_attrs["worker"] for t in done}) == 2
    assert "[worker 1]" in result.stdout and "[worker 2]" in result.stdout
    assert "Traceback" not in result.stderr


def test_a_failing_trial_is_recorded_and_the_study_goes_on(repo, store, monkeypatch, capsys):
    tmp_path, env = store
    import mlflow

    from liquid_diffusion.train import Trainer
    from study import run as run_py

    real_batch = Trainer._batch

    def nan_for_seed_1(self):  # a NaN injected into one seed's data
        x0, noise, t = real_batch(self)
        return (x0 * float("nan") if self.cfg.train.seed == 1 else x0), noise, t

    monkeypatch.setattr(Trainer, "_batch", nan_for_seed_1)
    monkeypatch.setenv("LIQUID_DIFFUSION_CACHE", env["LIQUID_DIFFUSION_CACHE"])
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    code = run_py.main(
        ["--ablation", "baseline", "--seeds", "3", "--experiment", "nan", "--out", str(tmp_path / "o"), *SMOKE]
    )
    assert code == 1  # the study finished, with a failure to report
    by_seed = {t.params["seed"]: t for t in trials(tmp_path, "nan:baseline:mnist:cpu-smoke")}
    assert by_seed[1].state == optuna.trial.TrialState.FAIL and by_seed[1].user_attrs["status"] == "non_finite"
    assert by_seed[0].state == by_seed[2].state == optuna.trial.TrialState.COMPLETE
    failed = [r for r in trial_runs(env, "nan") if r.data.tags["seed"] == "1"][0]
    assert failed.info.status == "FAILED" and failed.data.tags["optuna.state"] == "FAIL"
    [parent] = trial_runs(env, "nan", kind="study")
    assert parent.data.metrics["study/n_failed"] == 1 and parent.data.metrics["study/n_complete"] == 2
    assert "1 failed" in capsys.readouterr().out


def test_search_with_pruning_marks_pruned_trials_killed(repo, store, run_here):
    tmp_path, env = store
    space = tmp_path / "space.yaml"
    space.write_text(
        yaml.safe_dump(
            {
                "space": {
                    "train.lr": {"low": 1e-4, "high": 3e-3, "log": True},
                    "train.batch_size": {"choices": [8, 16, 64]},
                },
                "pruner": {"type": "threshold", "upper": 0.0},
            }
        )
    )  # prunes at the first eval
    result = run_here(
        env,
        "--ablation",
        "baseline",
        "--search",
        "3",
        "--search-space",
        str(space),
        "--experiment",
        "search",
        "--out",
        str(tmp_path / "o"),
        *SMOKE,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    done = trials(tmp_path, "search:baseline:mnist:cpu-smoke:search")
    assert len(done) == 3 and all(t.state == optuna.trial.TrialState.PRUNED for t in done)
    assert all(t.params["train.batch_size"] in (8, 16) for t in done)  # 64 is above cpu-smoke's batch of 16
    assert len({t.params["train.lr"] for t in done}) == 3
    children = trial_runs(env, "search")
    assert len(children) == 3
    for child in children:
        assert child.info.status == "KILLED" and child.data.tags["optuna.state"] == "PRUNED"
        assert child.data.tags["reason"].startswith("pruned at 48 images")


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--storage", "nosuchdb://x"], "--storage nosuchdb://x: cannot open it"),
        (["--storage", "not a url"], "--storage 'not a url' is not valid"),
        (["--storage", "journal:/no/such/folder/j.log"], "folder /no/such/folder does not exist"),
        (["--ablation", "baseline,no_such_arm"], "unknown ablation 'no_such_arm'"),
        (["--seeds", "0"], "--seeds: invalid value '0'"),
        (["--search", "-1"], "--search: invalid value '-1'"),
        (["--workers", "0"], "--workers: invalid value '0'"),
        (["--seeds", "2", "--search", "2"], "not allowed with argument"),
        (["--search", "2", "--search-space", "/no/such.yaml"], "/no/such.yaml: cannot read it"),
        (["--dataset", "mnist,"], None),  # a trailing comma is fine: it names mnist
    ],
)
def test_bad_study_options_exit_2_with_one_line(repo, store, args, fragment, run_here):
    tmp_path, env = store
    if "--ablation" not in args:
        args = ["--ablation", "baseline", *args]
    if "--storage" not in args:
        args = [*args, "--dry-run"]  # the storage is opened only when training starts
    result = run_here(env, *args, "--experiment", "bad", "--out", str(tmp_path / "o"), *SMOKE)
    if fragment is None:
        assert result.returncode == 0, result.stderr
        return
    assert_clean_error(result, fragment)


def test_storage_urls_lose_their_password_in_tags():
    from study.storage import default_storage_url, redact

    assert redact("postgresql://ann:secret@db.lab:5432/optuna") == "postgresql://ann:***@db.lab:5432/optuna"
    assert redact("sqlite:///x.db") == "sqlite:///x.db"
    assert default_storage_url("sqlite:////data/runs/mlflow.db") == "sqlite:////data/runs/optuna.db"
    assert default_storage_url("http://mlflow.lab:5000") == "sqlite:///optuna.db"


def test_a_worker_that_claims_a_seed_s_second_copy_while_another_claims_the_first_closes_it(tmp_path):
    """The interleaving of two commands started at the same instant, made deterministic: worker B reads
    the queue, worker A claims the seed's first copy, then B claims the second copy. Only A may train it."""
    from types import SimpleNamespace

    from study.driver import Driver
    from study.storage import storage_of, trial_id_of

    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'o.db'}")
    study.enqueue_trial({"seed": 1}, user_attrs={"seed": 1})
    study.enqueue_trial({"seed": 1}, user_attrs={"seed": 1})  # the copy queued by the other command
    storage = storage_of(study)
    real_set_state = storage.set_trial_state_values

    def a_claims_first_copy_just_before(trial_id, state, values=None):
        if trial_id == trial_id_of(first) and state == optuna.trial.TrialState.RUNNING:
            real_set_state(trial_id, state)  # worker A wins the first copy ...
            return False  # ... so worker B's compare-and-set on it fails and B moves on to the second
        return real_set_state(trial_id, state, values)

    first, second = study.get_trials(deepcopy=False)
    storage.set_trial_state_values = a_claims_first_copy_just_before
    worker_b = SimpleNamespace(worker="b:1")
    assert Driver.claim(worker_b, SimpleNamespace(seeds=[1], search=None), study) is None
    first, second = study.get_trials(deepcopy=False)
    assert first.state == optuna.trial.TrialState.RUNNING and "duplicate_of" not in first.user_attrs
    assert second.state == optuna.trial.TrialState.FAIL and second.user_attrs["duplicate_of"] == 1
