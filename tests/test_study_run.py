"""study/run.py training end to end on cpu-smoke, into a temporary MLflow store."""

from pathlib import Path

import mlflow
import pytest
import torch
import yaml
from helpers import assert_clean_error, study_env, trial_runs
from mlflow.tracking import MlflowClient

from liquid_diffusion.train import SAMPLES_KEY, latest_image_path
from reports.collect import last_sample_grid


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    return root, study_env(root, cache=root / "cache")


def client_for(env) -> MlflowClient:
    return MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])


def test_smoke_run_logs_tags_params_metrics_samples_and_weights(repo, store, run_here):
    root, env = store
    result = run_here(  # in this process; tests/test_quick_start.py starts the same command as a process
        env,
        "--ablation",
        "no_relax",
        "--budget",
        "cpu-smoke",
        "--experiment",
        "smoke",
        "--out",
        str(root / "outputs"),
        "--no-progress",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "COMPLETE: MLflow run" in result.stdout and "mlflow ui --backend-store-uri" in result.stdout
    assert "harness overhead" in result.stdout
    [run] = trial_runs(env, "smoke")
    assert run.info.status == "FINISHED"
    assert {k: run.data.tags[k] for k in ("ablation", "dataset", "seed", "budget", "study", "optuna.state")} == {
        "ablation": "no_relax",
        "dataset": "mnist",
        "seed": "0",
        "budget": "cpu-smoke",
        "study": "smoke:no_relax:mnist:cpu-smoke",
        "optuna.state": "COMPLETE",
    }
    [parent] = trial_runs(env, "smoke", kind="study")
    assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id and parent.info.status == "FINISHED"
    params = run.data.params
    assert params["model.relax"] == "none" and params["model.mixer"] == "cfc" and float(params["train.lr"]) == 1e-3
    assert params["data.dataset"] == "mnist" and int(params["model.parameters"]) > 0

    client = client_for(env)
    losses = client.get_metric_history(run.info.run_id, "train/loss")
    assert [m.step for m in losses] == [16, 32, 48, 64, 80, 96]
    assert all(m.value > 0 for m in losses)
    for key in ("train/img_per_s", "train/loss_bin0", "train/lr", "eval/seconds", "train/peak_mem_gb"):
        assert client.get_metric_history(run.info.run_id, key), key
    # The digit metrics at every eval, with the protocol beside them; cpu-smoke's N=16 shrinks KID's subsets.
    for key in ("eval/fd_digits", "eval/kid_digits", "eval/confident_frac", "eval/class_entropy"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [48, 96], key
    metrics = run.data.metrics
    assert (metrics["eval/n"], metrics["eval/n_ref"], metrics["eval/sample_steps"]) == (16, 32, 2)
    assert metrics["eval/kid_subset_size"] == 16
    assert run.data.tags["eval.objective"] == "eval/fd_digits" and "weights" not in run.data.tags

    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "ema", "images"} <= artifacts
    config = yaml.safe_load(Path(client.download_artifacts(run.info.run_id, "config.yaml", str(root))).read_text())
    assert config["model"]["relax"] == "none"
    ema = {a.path for a in client.list_artifacts(run.info.run_id, "ema")}
    assert "ema/diffusion_pytorch_model.safetensors" in ema and "ema/config.json" in ema
    images = [a.path for a in client.list_artifacts(run.info.run_id, "images")]
    # mlflow.log_image names each file samples+step+<step>+timestamp+...; the latest grid also has a fixed name
    steps = sorted({int(p.split("+step+")[1].split("+")[0]) for p in images if "+step+" in p and p.endswith(".png")})
    assert steps == [48, 96] and latest_image_path(SAMPLES_KEY) in images
    [last] = [p for p in images if f"+step+{steps[-1]}+" in p and p.endswith(".png")]
    read = lambda path: Path(client.download_artifacts(run.info.run_id, path, str(root / path))).read_bytes()  # noqa: E731
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])  # for the report's reader, in this process
    assert read(latest_image_path(SAMPLES_KEY)) == read(last) == last_sample_grid(run.info.run_id)

    again = run_here(  # the same command again, in this process
        env,
        "--ablation",
        "no_relax",
        "--budget",
        "cpu-smoke",
        "--experiment",
        "smoke",
        "--out",
        str(root / "outputs"),
        "--no-progress",
    )
    assert again.returncode == 0 and "== no_relax" not in again.stdout  # nothing left to train
    assert len(trial_runs(env, "smoke")) == 1 and len(trial_runs(env, "smoke", kind="study")) == 1


@pytest.fixture
def in_process(store, monkeypatch):
    """study.trial in this process against the module's store, and a cpu-smoke baseline config."""
    root, env = store
    monkeypatch.setenv("LIQUID_DIFFUSION_CACHE", str(root / "cache"))
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    import study.trial as trial
    from study.arms import load_arms
    from study.budgets import get_budget, load_budgets, resolve_config

    cfg = resolve_config(load_arms()["baseline"], get_budget(load_budgets(), "cpu-smoke"), "mnist", 0)
    return trial, cfg, env


def test_non_finite_loss_marks_the_run_failed_with_the_reason(in_process, monkeypatch, tmp_path):
    trial, cfg, env = in_process
    monkeypatch.setattr(trial, "load_or_encode", lambda *args, **kwargs: torch.full((32, 1, 8, 8), float("nan")))
    runtime = trial.RuntimeOptions(device="cpu", progress=False)
    outcome = trial.run_trial(cfg, {"ablation": "baseline"}, tmp_path / "run", "nan", runtime)
    assert outcome.status == "FAILED" and outcome.reason == "non-finite loss at step 1"
    run = client_for(env).get_run(outcome.run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["reason"] == "non-finite loss at step 1" and run.data.tags["status"] == "non_finite"


def test_unexpected_error_marks_the_run_failed_with_the_error(in_process, monkeypatch, tmp_path):
    trial, cfg, env = in_process

    def broken_run(self):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(trial.Trainer, "run", broken_run)
    with pytest.raises(RuntimeError, match="disk on fire"):
        runtime = trial.RuntimeOptions(device="cpu", progress=False)
        trial.run_trial(cfg, {"ablation": "baseline", "kind": "trial"}, tmp_path / "run", "crash", runtime)
    [run] = trial_runs(env, "crash")
    assert run.info.status == "FAILED" and run.data.tags["error"] == "RuntimeError: disk on fire"


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--budget", "gpu-fast"], "unknown budget 'gpu-fast'; valid budgets: cpu-smoke, cpu-demo"),
        (["--dataset", "no/such/folder"], "dataset 'no/such/folder' is neither"),
        (["--seed", "-3"], "--seed: invalid value '-3'"),
        (["--seed", "one"], "--seed: invalid value 'one'"),
        (["--device", "tpu"], "--device: invalid choice"),
    ],
)
def test_bad_values_exit_2_with_one_line(repo, store, args, fragment, run_here):
    _, env = store
    result = run_here(env, "--ablation", "no_relax", *args)
    assert_clean_error(result, fragment)


def test_unreachable_hub_dataset_exits_2_before_any_run(repo, store, tmp_path, random_inception_weights, run_here):
    root, env = store
    result = run_here(
        env,
        "--ablation",
        "no_relax",
        "--dataset",
        "afhq",
        "--experiment",
        "hub",
        "--out",
        str(tmp_path),
        "--inception-weights",
        str(random_inception_weights),
        "--allow-unverified-weights",
    )
    assert_clean_error(result, "huggan/AFHQv2")
    assert trial_runs(env, "hub") == []


def test_fid_objective_without_weights_fails_before_training(repo, store, tmp_path, run_here):
    root, env = store
    folder = tmp_path / "images"
    folder.mkdir()
    env = {**env, "TORCH_HOME": str(tmp_path / "torch")}
    env.pop("LIQUID_DIFFUSION_INCEPTION_WEIGHTS", None)
    result = run_here(
        env,
        "--ablation",
        "baseline",
        "--dataset",
        str(folder),
        "--experiment",
        "noweights",
        "--out",
        str(tmp_path / "out"),
    )
    assert_clean_error(result, "--inception-weights PATH")
    assert trial_runs(env, "noweights") == [] and not (tmp_path / "out").exists()


def test_one_more_seed_continues_the_same_study(tmp_path, monkeypatch, run_here):
    """`--seed 1` after `--seeds 1` adds a trial to the study `--seeds 1` began: a study's trials are its seeds,
    so the seed is not part of the config that a rerun must match (study/plan.py trains its pilot this way)."""
    monkeypatch.chdir(tmp_path)
    env = study_env(tmp_path)
    args = ("--ablation", "no_relax", "--budget", "cpu-smoke", "--no-progress", "--out", str(tmp_path / "out"))
    assert run_here(env, *args, "--seeds", "1").returncode == 0
    second = run_here(env, *args, "--seed", "1")
    assert second.returncode == 0, second.stderr
    runs = trial_runs(env, "liquid-diffusion")
    assert sorted(r.data.tags["seed"] for r in runs) == ["0", "1"]
    assert {r.data.tags["study"] for r in runs} == {"liquid-diffusion:no_relax:mnist:cpu-smoke"}
