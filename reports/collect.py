"""Read an MLflow experiment into pandas: one row per trial run, plus the metric histories the report plots."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException

from liquid_diffusion.config import ConfigError

TAGS = (
    "ablation",
    "dataset",
    "seed",
    "budget",
    "study",
    "status",
    "reason",
    "optuna.state",
    "weights",
    "eval.objective",
    "eval.reference_set",
    "device",
    "precision",
    "versions",
    "git.commit",
)
PARAMS = (
    "model.parameters",
    "train.precision",
    "train.sample_steps",
    "data.codec",
    "eval.n",
    "eval.n_ref",
    "eval.reference",
)
HISTORY_KEYS = ("train/loss",)  # plus each run's objective metric


@dataclass
class Collected:
    experiment: object  # mlflow.entities.Experiment
    runs: pd.DataFrame  # finished trial runs (FINISHED, FAILED, KILLED): the report's data
    running: pd.DataFrame  # RUNNING trial runs: left out and listed
    histories: pd.DataFrame  # run_id, key, step, value


def _frame(runs: list) -> pd.DataFrame:
    rows = []
    for run in runs:
        tags, params = run.data.tags, run.data.params
        row = {
            "run_id": run.info.run_id,
            "run_status": run.info.status,
            "start": pd.to_datetime(run.info.start_time, unit="ms", utc=True),
            "end": pd.to_datetime(run.info.end_time, unit="ms", utc=True) if run.info.end_time else pd.NaT,
        }
        row.update({f"tag:{k}": tags.get(k) for k in TAGS})
        row.update({f"param:{k}": params.get(k) for k in PARAMS})
        row.update({f"metric:{k}": v for k, v in run.data.metrics.items()})
        rows.append(row)
    frame = pd.DataFrame(rows)
    if not frame.empty:
        frame["seed"] = pd.to_numeric(frame["tag:seed"], errors="coerce")
        frame["arm"] = frame["tag:ablation"].fillna("?")
        frame["dataset"] = frame["tag:dataset"].fillna("?")
    return frame


def _histories(client, run_ids: list[str], keys: set[str]) -> pd.DataFrame:
    """Every point of `keys` for `run_ids`: one query per key on SQL stores, else one request per (run, key)."""
    store = client._tracking_client.store
    rows = []
    if hasattr(store, "get_metric_history_bulk"):  # SQL stores answer many runs in one query
        for key in keys:
            for start in range(0, len(run_ids), 100):
                for m in store.get_metric_history_bulk(run_ids[start : start + 100], key, max_results=10**7):
                    rows.append((m.run_id, key, m.step, m.value))
    else:  # a tracking server: the public API, one request per (run, key), in parallel
        pairs = [(run_id, key) for run_id in run_ids for key in keys]
        with ThreadPoolExecutor(8) as pool:
            for (run_id, key), history in zip(pairs, pool.map(lambda p: client.get_metric_history(*p), pairs)):
                rows.extend((run_id, key, m.step, m.value) for m in history)
    return pd.DataFrame(rows, columns=["run_id", "key", "step", "value"])


def collect(experiment_name: str) -> Collected:
    """The experiment's trial runs and histories; ConfigError when the experiment is unknown or has none."""
    client = mlflow.MlflowClient()
    try:
        experiment = client.get_experiment_by_name(experiment_name)
    except MlflowException as err:
        raise ConfigError(f"cannot read the tracking store {mlflow.get_tracking_uri()}: {err.message[:200]}") from None
    if experiment is None:
        names = [e.name for e in client.search_experiments()]
        raise ConfigError(
            f"unknown experiment '{experiment_name}' in {mlflow.get_tracking_uri()}; experiments: "
            f"{', '.join(names) or 'none'}"
        )
    runs = mlflow.search_runs(
        [experiment.experiment_id], filter_string="tags.kind = 'trial'", output_format="list", max_results=100_000
    )
    if not runs:
        raise ConfigError(f"experiment '{experiment_name}' has no trial runs to report (train some with study/run.py)")
    frame = _frame(runs)
    running = frame[frame["run_status"] == "RUNNING"]
    frame = frame[frame["run_status"] != "RUNNING"].reset_index(drop=True)
    keys = set(HISTORY_KEYS) | set(frame["tag:eval.objective"].dropna())
    histories = (
        _histories(client, list(frame["run_id"]), keys)
        if len(frame)
        else pd.DataFrame(columns=["run_id", "key", "step", "value"])
    )
    return Collected(experiment, frame, running.reset_index(drop=True), histories)


def last_sample_grid(run_id: str) -> bytes | None:
    """The PNG of the run's last `samples` image (mlflow.log_image names it samples+step+N+...), or None."""
    client = mlflow.MlflowClient()
    try:
        files = [a.path for a in client.list_artifacts(run_id, "images") if a.path.endswith(".png")]
    except MlflowException:
        return None
    grids = [(int(p.split("+step+")[1].split("+")[0]), p) for p in files if "/samples+step+" in p]
    if not grids:
        return None
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        return Path(client.download_artifacts(run_id, max(grids)[1], tmp)).read_bytes()
