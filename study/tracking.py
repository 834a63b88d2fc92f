"""MLflow: the tracker the trainer logs through, and runs whose final status tells the truth.

FINISHED on success; FAILED with tags `status` and `reason` when training stopped early (over
budget, non-finite loss); KILLED with tags `status=pruned` and `optuna.state=PRUNED` when a study's
pruner stopped it; FAILED with tag `error` on any other exception; KILLED on SIGINT or SIGTERM.
A run folder remembers its MLflow run, so a rerun of the same command continues it; a folder whose
run lives in another tracking store is refused, since its checkpoints' history is not in this one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import shlex
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
from filelock import FileLock
from mlflow.data.dataset import Dataset
from mlflow.data.dataset_source_registry import get_dataset_source_from_json
from mlflow.data.huggingface_dataset_source import HuggingFaceDatasetSource
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import SourceType
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import (
    MLFLOW_DATASET_CONTEXT,
    MLFLOW_PARENT_RUN_ID,
    MLFLOW_SOURCE_NAME,
    MLFLOW_SOURCE_TYPE,
)

from liquid_diffusion.checkpoint import PREFIX
from liquid_diffusion.cli import artifact_root, sigterm_as_interrupt
from liquid_diffusion.config import ConfigError, DataConfig, dataset_slug
from liquid_diffusion.data import ImageSource
from liquid_diffusion.outcomes import OUTCOMES
from liquid_diffusion.train import TrainingStopped, latest_image_path

from . import remote_checkpoints
from .storage import one_line_reason

MARKER = "mlflow_run.json"


class MLflowTracker:
    """Logs to the active run; `report(metrics, step)` sees every logged dict too (a study's pruning hook).

    `logged` maps a metric key to the last step the run already holds (see logged_steps). A resumed
    run replays the steps between its checkpoint and the kill; those points are not logged twice.
    """

    def __init__(self, report=None, logged: dict[str, int] | None = None, upload_checkpoints: bool = False):
        self.report = report
        self.logged = logged or {}
        self.upload_checkpoints = upload_checkpoints

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        new = {key: value for key, value in metrics.items() if step > self.logged.get(key, -1)}
        if new:
            mlflow.log_metrics(new, step=step)
        if self.report is not None:
            self.report(metrics, step)

    def log_image(self, image: np.ndarray, key: str, step: int) -> None:
        # A grid is logged just before its evaluation's metrics, which end with eval/seconds.
        if step > self.logged.get("eval/seconds", -1):
            mlflow.log_image(image, key=key, step=step)  # every grid, for the UI's step slider
            mlflow.log_image(image, artifact_file=latest_image_path(key))  # the latest one, by a fixed name

    def log_checkpoint(self, path: Path) -> None:
        if self.upload_checkpoints:  # for a node that takes the trial over (study/remote_checkpoints.py)
            seconds = remote_checkpoints.upload(mlflow.active_run().info.run_id, path)
            mlflow.log_metric("time/checkpoint_upload_s", seconds, step=int(path.name.removeprefix(PREFIX)))


def logged_steps(run_id: str) -> dict[str, int]:
    """The last logged step of each metric of a run (MLflow keeps only the latest value per key in the run)."""
    client = mlflow.MlflowClient()
    keys = [key for key in client.get_run(run_id).data.metrics if not key.startswith("system/")]
    return {key: max(m.step for m in client.get_metric_history(run_id, key)) for key in keys}


STORE_ATTEMPTS = 6


def open_tracking_store() -> None:
    """Make sure the tracking store exists and is migrated, retrying while another command creates it.

    Commands started at the same instant on a fresh store all run MLflow's migrations. On sqlite, two
    at once can break the file for good: a loser's half-done batch migration leaves a table
    `_alembic_tmp_*` behind. So commands on one machine take turns through a lock file beside the
    database; on a server store the losers fail on the winner's alembic_version row and retry.
    """
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)  # "Creating initial MLflow database tables..."
    uri = mlflow.get_tracking_uri()
    database = Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None
    with FileLock(f"{database}.lock") if database else contextlib.nullcontext():
        for attempt in range(STORE_ATTEMPTS):
            try:
                mlflow.MlflowClient().search_experiments(max_results=1)
                return
            except Exception as err:  # alembic, SQLAlchemy and MLflow raise many kinds while the store is half made
                if attempt + 1 == STORE_ATTEMPTS:
                    raise ConfigError(f"tracking store {uri}: cannot open it ({one_line_reason(err)})") from None
                time.sleep(0.5 + random.random())


# MLflow 3's UI opens an experiment on the page its kind names; without the tag it guesses a GenAI one
# (traces, no runs in sight). MLflow has no Python constant for the key; MLflow 2 ignores the tag.
EXPERIMENT_KIND_TAG, TRAINING_KIND = "mlflow.experimentKind", "custom_model_development"


def set_experiment(name: str):
    """mlflow.set_experiment, creating a new experiment with its artifacts beside its store (artifact_root),
    even when another command creates it at the same instant; a new experiment is marked as model training,
    and a kind the user chose is kept."""
    client = mlflow.MlflowClient()
    if client.get_experiment_by_name(name) is None:
        with contextlib.suppress(MlflowException):  # RESOURCE_ALREADY_EXISTS: the other command won; it exists
            client.create_experiment(name, artifact_location=artifact_root(mlflow.get_tracking_uri()))
    experiment = mlflow.set_experiment(name)
    if EXPERIMENT_KIND_TAG not in experiment.tags:
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, TRAINING_KIND)
    return experiment


def source_tags() -> dict[str, str]:
    """The command as typed, as the run's source (the UI's Source column)."""
    return {
        MLFLOW_SOURCE_NAME: shlex.join(["python", *sys.argv]),
        MLFLOW_SOURCE_TYPE: SourceType.to_string(SourceType.LOCAL),
    }


def dataset_input(source: ImageSource, cfg: DataConfig) -> Dataset:
    """The training data as an MLflow dataset (the UI's Dataset column): its name, content digest and origin.
    A MetaDataset carries no rows: the images stay where they are, only their identity is recorded."""
    if source.on_hub:
        origin = HuggingFaceDatasetSource(path=source.location, split="train")
    else:
        origin = get_dataset_source_from_json(json.dumps({"uri": source.location}), source_type="local")
    return MetaDataset(origin, name=dataset_slug(cfg.dataset), digest=source.digest)


def log_training_data(run_id: str, dataset: Dataset) -> None:
    """mlflow.log_input(dataset, context="training") for a run that is not the active one (a study's parent)."""
    entity = mlflow.entities.Dataset(**dataset.to_dict())
    context = mlflow.entities.InputTag(MLFLOW_DATASET_CONTEXT, "training")
    mlflow.MlflowClient().log_inputs(run_id, [mlflow.entities.DatasetInput(entity, [context])])


class StaleRunFolder(ConfigError):
    """A run folder belongs to an MLflow run that the current tracking store does not have."""


def read_marker(run_dir: Path) -> dict:
    path = Path(run_dir) / MARKER
    return json.loads(path.read_text()) if path.exists() else {}


def _write_marker(run_dir: Path, run_id: str, status: str) -> None:
    path = Path(run_dir) / MARKER
    partial = path.with_name(f".{MARKER}.{os.getpid()}")  # a kill mid-write must not leave half a marker
    partial.write_text(json.dumps({"run_id": run_id, "status": status, "tracking_uri": mlflow.get_tracking_uri()}))
    os.replace(partial, path)


def existing_run_id(run_dir: Path) -> str | None:
    """The MLflow run that `run_dir` belongs to, or None for a new folder.

    StaleRunFolder when the folder remembers a run the current store does not hold (the store was
    replaced, or MLFLOW_TRACKING_URI points elsewhere): continuing its checkpoints in a new run would
    log a history that starts in the middle, so the user must move the folder or choose another --out.
    """
    marker = read_marker(run_dir)
    run_id = marker.get("run_id")
    if not run_id:
        return None
    try:
        mlflow.get_run(run_id)
        return run_id
    except MlflowException:
        raise StaleRunFolder(
            f"run folder {run_dir} belongs to MLflow run {run_id} of another tracking store "
            f"({marker.get('tracking_uri', 'unknown')}), not {mlflow.get_tracking_uri()}; move or delete the folder, "
            f"or pass another --out"
        ) from None


@contextlib.contextmanager
def tracked_run(
    run_dir: Path,
    experiment: str,
    run_name: str,
    tags: dict[str, str],
    params: dict,
    parent_run_id: str | None = None,
    adopt_run_id: str | None = None,
):
    """An MLflow run for `run_dir`, new or continued; its status on exit follows the module docstring.
    `adopt_run_id`: the run to continue when the folder has none (its checkpoint came from the artifacts)."""
    run_id = existing_run_id(run_dir) or adopt_run_id
    set_experiment(experiment)
    if parent_run_id and not run_id:  # the tag itself: start_run(parent_run_id=) needs MLflow 2.16 or later
        tags = {**tags, MLFLOW_PARENT_RUN_ID: parent_run_id}
    run = mlflow.start_run(run_id=run_id, run_name=None if run_id else run_name, tags=tags, log_system_metrics=True)
    resumed, run_id = run_id is not None, run.info.run_id
    _write_marker(run_dir, run_id, "RUNNING")
    status = OUTCOMES["error"].run_status
    try:
        with sigterm_as_interrupt():
            if not resumed:
                mlflow.log_params(params)
            yield run
        status = OUTCOMES["finished"].run_status
    except TrainingStopped as err:
        outcome = OUTCOMES[err.kind]
        status = outcome.run_status
        mlflow.set_tags({"status": err.kind, "reason": str(err)})
        if outcome.trial_state == "PRUNED":  # the study's pruner ended it: the run says so before Optuna does
            mlflow.set_tag("optuna.state", outcome.trial_state)
        raise
    except KeyboardInterrupt as err:
        status = OUTCOMES["interrupted"].run_status
        mlflow.set_tag("reason", f"interrupted ({err or 'SIGINT'}); rerun the same command to resume")
        raise
    except BaseException as err:
        mlflow.set_tag("error", f"{type(err).__name__}: {err}"[:4000])
        raise
    finally:
        mlflow.end_run(status)
        _write_marker(run_dir, run_id, status)
