"""MLflow: the tracker the trainer logs through, and runs whose final status tells the truth.

FINISHED on success; FAILED with tags `status` and `reason` when training stopped early (over
budget, non-finite loss); KILLED with tags `status=pruned` and `optuna.state=PRUNED` when a study's
pruner stopped it; FAILED with tag `error` on any other exception; KILLED on SIGINT or SIGTERM.
A run folder remembers its MLflow run, so a rerun of the same command continues it.
"""

from __future__ import annotations

import contextlib
import json
import signal
from pathlib import Path

import mlflow
import numpy as np
from mlflow.exceptions import MlflowException

from liquid_diffusion.train import NonFiniteLoss, OverBudget, Pruned, TrainingStopped

DEFAULT_EXPERIMENT = "liquid-diffusion"
MARKER = "mlflow_run.json"


class MLflowTracker:
    """Logs to the active run; `report(metrics, step)` sees every logged dict too (a study's pruning hook)."""

    def __init__(self, report=None):
        self.report = report

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        mlflow.log_metrics(metrics, step=step)
        if self.report is not None:
            self.report(metrics, step)

    def log_image(self, image: np.ndarray, key: str, step: int) -> None:
        mlflow.log_image(image, key=key, step=step)


@contextlib.contextmanager
def sigterm_as_interrupt():
    """SIGTERM raises KeyboardInterrupt, so a terminated run is cleaned up like a Ctrl-C."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt("SIGTERM")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def stop_kind(err: TrainingStopped) -> str:
    kinds = {OverBudget: "over_budget", NonFiniteLoss: "non_finite", Pruned: "pruned"}
    return next((kind for cls, kind in kinds.items() if isinstance(err, cls)), "stopped")


def read_marker(run_dir: Path) -> dict:
    path = Path(run_dir) / MARKER
    return json.loads(path.read_text()) if path.exists() else {}


def _write_marker(run_dir: Path, run_id: str, status: str) -> None:
    path = Path(run_dir) / MARKER
    path.write_text(json.dumps({"run_id": run_id, "status": status, "tracking_uri": mlflow.get_tracking_uri()}))


def _existing_run_id(run_dir: Path) -> str | None:
    run_id = read_marker(run_dir).get("run_id")
    if not run_id:
        return None
    try:
        mlflow.get_run(run_id)
        return run_id
    except MlflowException:  # the tracking store changed since; start a new run
        return None


@contextlib.contextmanager
def tracked_run(run_dir: Path, experiment: str, run_name: str, tags: dict[str, str], params: dict,
                parent_run_id: str | None = None):
    """An MLflow run for `run_dir`, new or continued; its status on exit follows the module docstring."""
    mlflow.set_experiment(experiment)
    run_id = _existing_run_id(run_dir)
    run = mlflow.start_run(run_id=run_id, run_name=None if run_id else run_name, tags=tags, log_system_metrics=True,
                           parent_run_id=None if run_id else parent_run_id)
    resumed, run_id = run_id is not None, run.info.run_id
    _write_marker(run_dir, run_id, "RUNNING")
    status = "FAILED"
    try:
        with sigterm_as_interrupt():
            if not resumed:
                mlflow.log_params(params)
            yield run
        status = "FINISHED"
    except TrainingStopped as err:
        mlflow.set_tags({"status": stop_kind(err), "reason": str(err)})
        if isinstance(err, Pruned):
            status = "KILLED"
            mlflow.set_tag("optuna.state", "PRUNED")
        raise
    except KeyboardInterrupt as err:
        status = "KILLED"
        mlflow.set_tag("reason", f"interrupted ({err or 'SIGINT'}); rerun the same command to resume")
        raise
    except BaseException as err:
        mlflow.set_tag("error", f"{type(err).__name__}: {err}"[:4000])
        raise
    finally:
        mlflow.end_run(status)
        _write_marker(run_dir, run_id, status)
