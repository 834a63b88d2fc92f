"""Faults as they happen on real machines, with real processes and signals: repeated SIGKILLs, commands
started at the same instant, a fresh tracking store beside old run folders, an unexpected error, and a
dead worker on a journal storage."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch
from helpers import (
    RUN,
    assert_clean_error,
    checkpoint_dirs,
    latest_checkpoint,
    long_smoke_budget,
    optuna_db,
    study_env,
    study_trials,
    trial_runs,
    wait_for,
)
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file


def environment(tmp_path, store="mlflow.db"):
    """The tests here start several processes at once: one thread each, on two cores."""
    return study_env(tmp_path, store=store, OMP_NUM_THREADS="1")


FAIL, COMPLETE = optuna.trial.TrialState.FAIL, optuna.trial.TrialState.COMPLETE


def args_for(tmp_path, out, experiment, *extra, images=1600):
    return [
        "--ablation",
        "baseline",
        "--budget",
        "cpu-smoke",
        "--budgets-file",
        long_smoke_budget(tmp_path, images),
        "--experiment",
        experiment,
        "--out",
        str(out),
        "--no-progress",
        "--heartbeat-seconds",
        "1",
        *extra,
    ]


def start(repo, env, args):
    return subprocess.Popen(
        [*RUN, *args], cwd=repo, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )  # its own process group, killed whole as a disconnect would


def kill_group(process) -> None:
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def partial_checkpoint_exists(out: Path) -> bool:
    return any(name.startswith(".partial-") for folder in checkpoint_dirs(out) for name in os.listdir(folder))


def final_ema(out: Path) -> dict[str, torch.Tensor]:
    [path] = out.glob("*/baseline/*/ema/diffusion_pytorch_model.safetensors")
    return load_file(path)


@pytest.mark.slow  # about 110 s of process starts and training here: run by CI after the fast suite
def test_any_number_of_sigkills_then_a_rerun_gives_the_uninterrupted_result(repo, tmp_path):
    env = environment(tmp_path)
    killed_out, whole_out = tmp_path / "killed", tmp_path / "whole"
    args = args_for(tmp_path, killed_out, "kills")
    rng = random.Random(0)
    during_writes = 0
    for kill in range(4):  # one more than the heartbeat's 3 automatic retries
        before = latest_checkpoint(killed_out)
        process = start(repo, env, args)
        # training (resumed) is under way once a checkpoint newer than the last one appears
        assert wait_for(
            lambda b=before, p=process: latest_checkpoint(killed_out) != b or p.poll() is not None, poll=0.01
        )
        if kill % 2:  # at the moment a checkpoint is being written
            during_writes += wait_for(lambda: partial_checkpoint_exists(killed_out), timeout=20)
        else:  # anywhere in training
            time.sleep(rng.uniform(0.0, 1.5))
        assert process.poll() is None, "the run finished before it could be killed"
        kill_group(process)
    assert during_writes >= 1  # at least one kill landed inside a checkpoint write

    result = subprocess.run([*RUN, *args], cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    (tmp_path / "whole").mkdir()  # its own MLflow store and Optuna file
    whole = subprocess.run(
        [*RUN, *args_for(tmp_path, whole_out, "kills")],
        cwd=repo,
        env=environment(tmp_path, "whole/mlflow.db"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert whole.returncode == 0, whole.stderr[-2000:]

    resumed, uninterrupted = final_ema(killed_out), final_ema(whole_out)
    assert resumed.keys() == uninterrupted.keys()
    for name, tensor in uninterrupted.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=0, atol=1e-5, msg=name)

    [run] = trial_runs(env, "kills")  # one MLflow run, continued through every kill
    assert run.info.status == "FINISHED"
    assert [p.info.status for p in trial_runs(env, "kills", kind="study")] == ["FINISHED"]
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    for key in ("train/loss", "train/loss_bin5", "eval/fd_digits", "eval/seconds", "data/images"):
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        assert steps and len(steps) == len(set(steps)), f"{key} logged twice at a step: {sorted(steps)}"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == list(range(80, 1601, 80))
    trials = study_trials(optuna_db(tmp_path), "kills:baseline:mnist:cpu-smoke")
    assert len(trials) == 5 and trials[-1].state == COMPLETE and all(t.state == FAIL for t in trials[:-1])
    assert all(t.params == {"seed": 0} for t in trials) and trials[-1].user_attrs["resumed_from"] > 0
    assert trials[-1].user_attrs["mlflow_run_id"] == run.info.run_id


def fresh_postgres_database(server_url: str) -> str:
    """A new, empty database on the test server (which outlives the test), so its tables are created here."""
    import psycopg

    name = f"race_{os.getpid()}_{int(time.time() * 1000)}"
    with psycopg.connect(server_url, autocommit=True) as connection:
        connection.execute(f"CREATE DATABASE {name}")
    return server_url.rsplit("/", 1)[0] + "/" + name


@pytest.mark.parametrize(
    "storage",
    [
        pytest.param("sqlite", marks=pytest.mark.slow),  # about 25 s; the claim logic is the same as PostgreSQL's
        "postgresql",
    ],
)
def test_three_commands_started_at_the_same_instant_train_each_seed_once(repo, tmp_path, storage):
    if storage == "postgresql":
        server = os.environ.get("LIQUID_DIFFUSION_TEST_POSTGRES")
        if not server:
            pytest.skip("no PostgreSQL server: .ci/run starts one and sets LIQUID_DIFFUSION_TEST_POSTGRES")
        url, experiment = fresh_postgres_database(server), "race"
    else:
        url, experiment = optuna_db(tmp_path), "race"
    env = environment(tmp_path)
    args = [
        "--ablation",
        "baseline,no_relax",
        "--seeds",
        "2",
        "--budget",
        "cpu-smoke",
        "--experiment",
        experiment,
        "--out",
        str(tmp_path / "o"),
        "--no-progress",
        "--storage",
        url,
        "--heartbeat-seconds",
        "10",
    ]
    # Nothing is killed here: a long heartbeat keeps three loaded processes from failing each other's
    # live trials as stale, which would train a seed twice for a reason other than the race under test.
    commands = [
        subprocess.Popen([*RUN, *args], cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    results = [(c.wait(timeout=600), *c.communicate()) for c in commands]
    for code, out, err in results:
        assert code == 0, out[-2000:] + err[-2000:]
        assert "Traceback" not in err

    runs = trial_runs(env, experiment)
    assert sorted((r.data.tags["ablation"], r.data.tags["seed"]) for r in runs) == [
        ("baseline", "0"),
        ("baseline", "1"),
        ("no_relax", "0"),
        ("no_relax", "1"),
    ]
    assert all(r.info.status == "FINISHED" for r in runs)
    for arm in ("baseline", "no_relax"):
        trials = study_trials(url, f"{experiment}:{arm}:mnist:cpu-smoke")
        trained = [t for t in trials if "duplicate_of" not in t.user_attrs]
        assert sorted(t.params["seed"] for t in trained) == [0, 1] and all(t.state == COMPLETE for t in trained)
        assert not [t for t in trials if t.state == optuna.trial.TrialState.WAITING]  # no queued copy left behind
    from study.storage import redact

    parents = trial_runs(env, experiment, kind="study")
    assert len(parents) == 2 and all(p.data.tags["optuna.storage"] == redact(url) for p in parents)
    assert (tmp_path / "optuna.db").exists() == (storage == "sqlite")  # the given storage, not the default file


OPEN_STORE = """
import sys, mlflow
from study.tracking import open_tracking_store
mlflow.set_tracking_uri(sys.argv[1])
open_tracking_store()
"""


@pytest.mark.slow
def test_processes_opening_one_fresh_sqlite_store_at_once_all_succeed(repo, tmp_path):
    """Without the lock file, 4 processes started together broke a fresh database for good in 3 rounds of
    5 here ('table _alembic_tmp_tags already exists': a joiner's half-done batch migration; seen once in
    CI in the three-command race test). Slow: five rounds of four processes that import torch."""
    for round in range(5):
        uri = f"sqlite:///{tmp_path / f'mlflow{round}.db'}"
        processes = [
            subprocess.Popen([sys.executable, "-c", OPEN_STORE, uri], cwd=repo, stderr=subprocess.PIPE, text=True)
            for _ in range(4)
        ]
        for process in processes:
            assert process.wait(timeout=300) == 0, process.stderr.read()[-2000:]
        assert MlflowClient(uri).get_experiment_by_name("Default") is not None


def test_a_fresh_tracking_store_beside_old_run_folders_is_refused_in_one_line(tmp_path, run_here):
    out = tmp_path / "outputs"
    args = ["--ablation", "baseline", "--budget", "cpu-smoke", "--experiment", "fresh", "--out", str(out)]
    args.append("--no-progress")
    (tmp_path / "old").mkdir()
    first = run_here(environment(tmp_path, "old/mlflow.db"), *args)
    assert first.returncode == 0, first.stderr[-2000:]

    (tmp_path / "new").mkdir()
    result = run_here(environment(tmp_path, "new/mlflow.db"), *args)
    [folder] = out.glob("fresh/baseline/*")
    assert_clean_error(
        result,
        f"run folder {folder} belongs to MLflow run",
        "another tracking store",
        "move or delete the folder, or pass another --out",
    )
    assert not (tmp_path / "new" / "optuna.db").exists()  # refused before any study was made


def test_an_unexpected_error_fails_the_command_and_a_rerun_resumes_it(repo, tmp_path, monkeypatch, capsys):
    import mlflow

    from liquid_diffusion.train import Trainer
    from study import run as run_py

    real_batch = Trainer._batch

    def broken_after_the_first_checkpoint(self):
        if self.step == 4:
            raise RuntimeError("a bug at step 5")
        return real_batch(self)

    env = environment(tmp_path)
    monkeypatch.setenv("LIQUID_DIFFUSION_CACHE", env["LIQUID_DIFFUSION_CACHE"])
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    args = [
        "--ablation",
        "baseline",
        "--budget",
        "cpu-smoke",
        "--experiment",
        "error",
        "--out",
        str(tmp_path / "o"),
        "--no-progress",
    ]
    try:
        with monkeypatch.context() as patch:
            patch.setattr(Trainer, "_batch", broken_after_the_first_checkpoint)
            assert run_py.main(args) == 1
        out = capsys.readouterr().out
        assert "FAILED with an error (RuntimeError: a bug at step 5)" in out
        assert (
            "study error:baseline:mnist:cpu-smoke: 0 complete, 0 pruned, 1 failed (1 resumed by rerunning this "
            "command), 0 running; no completed trial" in out
        )
        [child], [parent] = trial_runs(env, "error"), trial_runs(env, "error", kind="study")
        assert child.info.status == "FAILED" and "a bug at step 5" in child.data.tags["error"]
        assert parent.info.status == "FAILED" and parent.data.metrics["study/n_failed"] == 1

        assert run_py.main(args) == 0  # the bug is fixed: the rerun resumes the trial
        out = capsys.readouterr().out
        assert "resumed at 48 images" in out and "1 complete, 0 pruned, 0 failed, 0 running" in out
    finally:
        mlflow.set_tracking_uri(None)
    [child], [parent] = trial_runs(env, "error"), trial_runs(env, "error", kind="study")
    assert child.info.status == "FINISHED" and parent.info.status == "FINISHED"


@pytest.mark.slow  # about 25 s: a worker SIGKILLed at its first checkpoint, then the rerun
def test_a_dead_worker_s_trial_on_a_journal_storage_is_taken_over_by_a_rerun(repo, tmp_path):
    env = environment(tmp_path)
    out = tmp_path / "o"
    # killed at its first checkpoint, of 30 steps
    args = args_for(tmp_path, out, "journal", "--storage", f"journal:{tmp_path / 'study.log'}", images=480)
    process = start(repo, env, args)
    assert wait_for(lambda: latest_checkpoint(out) is not None or process.poll() is not None, poll=0.01)
    kill_group(process)

    started = time.time()
    result = subprocess.run([*RUN, *args], cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "resumed at" in result.stdout and time.time() - started < 120, result.stdout
    killed, resumed = study_trials(f"journal:{tmp_path / 'study.log'}", "journal:baseline:mnist:cpu-smoke")
    assert killed.state == FAIL and resumed.state == COMPLETE and resumed.user_attrs["resumed_from"] > 0
