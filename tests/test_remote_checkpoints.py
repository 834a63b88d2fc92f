"""Checkpoints through the MLflow run's artifacts (study/remote_checkpoints.py): upload, prune, download, resume
on a machine without the run folder, and an upload cut short by SIGKILL; and a tracking server that is not there."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time

import mlflow
import pytest
import torch
from helpers import REPO, Recorder, assert_clean_error, free_port, make_trainer, run_script, wait_for
from safetensors.torch import load_file

from liquid_diffusion.checkpoint import checkpoint_dir, latest_checkpoint
from study import remote_checkpoints
from study.tracking import MLflowTracker


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A sqlite tracking store with its artifacts under tmp_path, active for this test."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.create_experiment("remote", artifact_location=str(tmp_path / "artifacts"))
    yield experiment
    mlflow.set_tracking_uri(None)


def uploaded_run(tmp_path, experiment, stop_at=None):
    """A smoke training (96 images, a checkpoint every 32) whose checkpoints are uploaded; `stop_at` kills it
    at that step, as a lost node would. Returns the run id."""
    with mlflow.start_run(experiment_id=experiment) as run:
        tracker = MLflowTracker(upload_checkpoints=True)
        if stop_at is not None:
            recorder = Recorder(stop_at=stop_at)
            tracker.report = lambda metrics, step: recorder.log_metrics(metrics, step)
        trainer = make_trainer(tmp_path / "node-a", recorder=tracker)
        with pytest.raises(KeyboardInterrupt) if stop_at is not None else contextlib.nullcontext():
            trainer.run()
    return run.info.run_id


def test_every_checkpoint_is_uploaded_marked_complete_and_pruned_to_the_last_two(tmp_path, store):
    run_id = uploaded_run(tmp_path, store)
    complete = remote_checkpoints.complete_checkpoints(run_id)
    assert complete == ["checkpoints/checkpoint-000000000064", "checkpoints/checkpoint-000000000096"]
    history = mlflow.MlflowClient().get_metric_history(run_id, "time/checkpoint_upload_s")
    assert [m.step for m in history] == [32, 64, 96] and all(m.value > 0 for m in history)
    local = latest_checkpoint(checkpoint_dir(tmp_path / "node-a"))
    downloaded = remote_checkpoints.download_latest(run_id, checkpoint_dir(tmp_path / "node-b"))
    assert downloaded.name == local.name == "checkpoint-000000000096"
    for name in ("tensors.safetensors", "state.json"):
        assert (downloaded / name).read_bytes() == (local / name).read_bytes()
    assert not list(checkpoint_dir(tmp_path / "node-b").glob(".download-*"))  # the temporary folder is gone


def test_resuming_from_the_artifacts_equals_resuming_from_the_run_folder(tmp_path, store):
    """Node A is lost after its checkpoint at 64 images; node B, with an empty run folder, downloads it and
    finishes. The EMA weights equal an uninterrupted run's to 1e-5."""
    run_id = uploaded_run(tmp_path, store, stop_at=80)  # killed between the checkpoints at 64 and 96
    assert remote_checkpoints.download_latest(run_id, checkpoint_dir(tmp_path / "node-b")).name.endswith("64")
    resumed = make_trainer(tmp_path / "node-b")
    assert resumed.resumed_from == 64
    resumed.run()
    whole = make_trainer(tmp_path / "uninterrupted")
    whole.run()
    for a, b in zip(resumed.ema.shadow_params, whole.ema.shadow_params, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_a_half_uploaded_checkpoint_is_never_used_even_when_its_uploader_is_killed(tmp_path, store):
    run_id = uploaded_run(tmp_path, store)
    # a large checkpoint, so that the kill lands while its files are being copied into the artifacts
    big = tmp_path / "checkpoint-000000000999"
    big.mkdir()
    torch.manual_seed(0)
    from safetensors.torch import save_file

    save_file({"x": torch.randn(64, 1024, 1024)}, big / "tensors.safetensors")  # 256 MB
    (big / "state.json").write_text("{}")
    upload = (
        f"from pathlib import Path; from study.remote_checkpoints import upload; upload({run_id!r}, Path({str(big)!r}))"
    )
    uploader = subprocess.Popen([sys.executable, "-c", upload], cwd=REPO)
    target = tmp_path / "artifacts" / run_id / "artifacts" / "checkpoints" / big.name
    assert wait_for(lambda: any(target.glob("*")) or uploader.poll() is not None, timeout=60, poll=0.001)
    uploader.kill()
    uploader.wait()
    files = {p.name for p in target.iterdir()}
    assert files and remote_checkpoints.COMPLETE not in files, files  # the kill landed mid-upload
    assert remote_checkpoints.complete_checkpoints(run_id)[-1].endswith("096")
    downloaded = remote_checkpoints.download_latest(run_id, checkpoint_dir(tmp_path / "node-b"))
    assert downloaded.name == "checkpoint-000000000096"
    assert set(load_file(downloaded / "tensors.safetensors")) != {"x"}


def test_uploads_are_wanted_for_a_tracking_server_or_when_asked():
    assert remote_checkpoints.uploads_wanted("http://mlflow.lab:5000", asked=False)
    assert remote_checkpoints.uploads_wanted("sqlite:///mlflow.db", asked=True)
    assert not remote_checkpoints.uploads_wanted("sqlite:///mlflow.db", asked=False)


@pytest.mark.parametrize(
    "script, args",
    [
        pytest.param("study/run.py", ["--ablation", "baseline", "--budget", "cpu-smoke"], id="run.py"),
        pytest.param("reports/build.py", [], id="build.py"),
    ],
)
def test_an_unreachable_tracking_server_is_one_line_within_10_seconds(tmp_path, script, args):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    started = time.perf_counter()
    result = run_script(script, {**os.environ, "MLFLOW_TRACKING_URI": uri}, *args, "--out", str(tmp_path / "o"))
    assert time.perf_counter() - started < 10
    assert_clean_error(result, f"tracking server {uri} does not answer")


def test_a_typo_in_the_tracking_uri_s_scheme_is_one_line(tmp_path):
    result = run_script("reports/build.py", None, "--tracking-uri", "htp://127.0.0.1:5000")
    assert_clean_error(result, "tracking URI 'htp://127.0.0.1:5000': unknown scheme 'htp'; valid: http, https")
