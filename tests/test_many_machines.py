"""The many-machine path on this one machine: an MLflow tracking server with proxied artifacts, a PostgreSQL
Optuna storage, and two "nodes" (commands with their own working folder, --out and cache) that share nothing
else. One node is SIGKILLed mid-trial; the other retries that trial from the checkpoint it uploaded."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import yaml
from helpers import REPO, free_port, serving, study_trials, trial_runs, wait_for
from mlflow import MlflowClient

from study.remote_checkpoints import COMPLETE

IMAGES, CHECKPOINT_EVERY = 1600, 400  # a trial of 100 steps with 4 uploads of its 55 MB checkpoints


def node_command(tmp_path, node: str, experiment: str, storage: str) -> list[str]:
    budgets = yaml.safe_load((REPO / "study" / "budgets.yaml").read_text())
    smoke = budgets["cpu-smoke"]
    smoke["overrides"].update(
        {"train.images": IMAGES, "train.checkpoint_every_images": CHECKPOINT_EVERY, "train.eval_every_images": 800}
    )
    (tmp_path / "budgets.yaml").write_text(yaml.safe_dump({"cpu-smoke": smoke}))
    return [
        sys.executable, str(REPO / "study" / "run.py"),
        "--ablation", "baseline,no_relax", "--seeds", "2", "--budget", "cpu-smoke",
        "--budgets-file", str(tmp_path / "budgets.yaml"), "--experiment", experiment, "--storage", storage,
        "--heartbeat-seconds", "1", "--out", str(tmp_path / node / "outputs"), "--no-progress",
    ]  # fmt: skip


def start_node(tmp_path, node: str, url: str, command: list[str]) -> subprocess.Popen:
    folder = tmp_path / node
    folder.mkdir(exist_ok=True)
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": url,
        "LIQUID_DIFFUSION_CACHE": str(folder / "cache"),
        "OMP_NUM_THREADS": "1",  # two nodes on two cores
        "PYTHONUNBUFFERED": "1",
    }
    log = open(folder / "stdout.log", "w")  # noqa: SIM115 - the node outlives this function
    return subprocess.Popen(command, cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


@pytest.mark.slow  # about two minutes
def test_two_nodes_share_a_tracking_server_and_a_storage_and_a_killed_node_s_trial_resumes_on_the_other(tmp_path):
    storage = os.environ.get("LIQUID_DIFFUSION_TEST_POSTGRES")
    if not storage:
        pytest.skip("no PostgreSQL server: .ci/run starts one and sets LIQUID_DIFFUSION_TEST_POSTGRES")
    experiment = f"nodes-{os.getpid()}-{int(time.time() * 1000)}"  # new studies in the shared database
    server = tmp_path / "server"
    server.mkdir()
    port = free_port()
    mlflow_server = [
        "mlflow", "server", "--backend-store-uri", f"sqlite:///{server / 'mlflow.db'}",
        "--artifacts-destination", str(server / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
        "--workers", "1",
    ]  # fmt: skip
    with serving(mlflow_server, port, server, "/health") as url:
        node_a = start_node(tmp_path, "node-a", url, node_command(tmp_path, "node-a", experiment, storage))
        # node A is killed, as a preempted machine would be, once it has uploaded a checkpoint mid-trial
        uploaded = lambda: list((server / "artifacts").glob(f"**/checkpoints/*/{COMPLETE}"))  # noqa: E731
        assert wait_for(lambda: uploaded() or node_a.poll() is not None, timeout=240, poll=0.05)
        assert node_a.poll() is None, (tmp_path / "node-a" / "stdout.log").read_text()[-3000:]
        os.killpg(node_a.pid, signal.SIGKILL)
        node_a.wait()
        assert len(uploaded()) == 1, (tmp_path / "node-a" / "stdout.log").read_text()[-3000:]
        killed_run = uploaded()[0].parts[-5]  # artifacts/<experiment>/<run>/artifacts/checkpoints/<name>/COMPLETE
        # node B, a machine that never saw node A's run folder, takes over the study
        node_b = start_node(tmp_path, "node-b", url, node_command(tmp_path, "node-b", experiment, storage))
        assert node_b.wait(timeout=400) == 0, (tmp_path / "node-b" / "stdout.log").read_text()[-3000:]
        printed = (tmp_path / "node-b" / "stdout.log").read_text()

        # every (arm, seed) trained once: one COMPLETE trial per seed, one FINISHED run each, nothing RUNNING
        env = {"MLFLOW_TRACKING_URI": url}
        for arm in ("baseline", "no_relax"):
            trials = study_trials(storage, f"{experiment}:{arm}:mnist:cpu-smoke")
            complete = sorted(t.params["seed"] for t in trials if t.state.name == "COMPLETE")
            assert complete == [0, 1], [(t.number, t.state.name, t.user_attrs) for t in trials]
        runs = trial_runs(env, experiment)
        assert sorted((r.data.tags["ablation"], r.data.tags["seed"]) for r in runs) == [
            ("baseline", "0"), ("baseline", "1"), ("no_relax", "0"), ("no_relax", "1"),
        ]  # fmt: skip
        assert {r.info.status for r in runs} == {"FINISHED"}
        # the killed node's run was continued by node B, from the uploaded checkpoint, not from zero
        assert killed_run in {r.info.run_id for r in runs}
        assert f"resumed at {CHECKPOINT_EVERY} images" in printed, printed[-3000:]
        client = MlflowClient(url)
        steps = [m.step for m in client.get_metric_history(killed_run, "train/loss")]
        assert steps == sorted(set(steps)) and steps[-1] == IMAGES
        # samples and EMA weights come back through the server's artifact proxy
        os.environ["MLFLOW_TRACKING_URI"] = url
        try:
            from reports.collect import last_sample_grid

            for run in runs:
                assert last_sample_grid(run.info.run_id)[:8] == b"\x89PNG\r\n\x1a\n"
                ema = {a.path for a in client.list_artifacts(run.info.run_id, "ema")}
                assert "ema/diffusion_pytorch_model.safetensors" in ema
        finally:
            del os.environ["MLFLOW_TRACKING_URI"]

        # the report through the server, its links pointing at the server's UI
        report = [sys.executable, "reports/build.py", "--experiment", experiment]
        served = subprocess.run(
            [*report, "--tracking-uri", url, "--out", str(tmp_path / "served")], cwd=REPO, capture_output=True
        )
        assert served.returncode == 0, served.stderr[-2000:]
        assert f"<a href='{url}/#/experiments/" in (tmp_path / "served" / "report.html").read_text()
    # the same runs read straight from the server's database give the same summary
    direct = subprocess.run(
        [*report, "--tracking-uri", f"sqlite:///{server / 'mlflow.db'}", "--out", str(tmp_path / "direct")],
        cwd=REPO,
        capture_output=True,
    )
    assert direct.returncode == 0, direct.stderr[-2000:]
    pd.testing.assert_frame_equal(
        pd.read_csv(tmp_path / "served" / "summary.csv"), pd.read_csv(tmp_path / "direct" / "summary.csv")
    )
