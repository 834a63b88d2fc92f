"""Read an MLflow experiment into pandas: one row per trial run, plus the metric histories the report plots."""

from __future__ import annotations

import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException

from liquid_diffusion.config import ConfigError
from liquid_diffusion.train import SAMPLES_KEY, latest_image_path

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
    "design",  # a factorial's: its name and its factors (reports/decisions.py) ...
    "design.factors",
    "decision.margin",  # ... and every study's decision settings, fixed when it started
    "decision.alpha",
    "decision.interval",
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


PREFIXES = {"tags.": "tag:", "params.": "param:", "metrics.": "metric:"}


def _frame(runs: pd.DataFrame) -> pd.DataFrame:
    """mlflow.search_runs' frame under the report's column names (tag:, param:, metric:), with a column
    for each tag and param the report reads even when no run has it."""
    renamed = {"status": "run_status", "start_time": "start", "end_time": "end"}
    for column in runs.columns:
        for prefix, ours in PREFIXES.items():
            if column.startswith(prefix):
                renamed[column] = ours + column.removeprefix(prefix)
    frame = runs.rename(columns=renamed)
    for column in [f"tag:{k}" for k in TAGS] + [f"param:{k}" for k in PARAMS]:
        if column not in frame:
            frame[column] = None
    frame["seed"] = pd.to_numeric(frame["tag:seed"], errors="coerce")
    frame["arm"] = frame["tag:ablation"].fillna("?")
    frame["dataset"] = frame["tag:dataset"].fillna("?")
    return frame


def sql_store(client: mlflow.MlflowClient):
    """The client's SQL store, or None for a tracking server or a file store. A SQL store answers a metric's
    history for many runs in one query (get_metric_history_bulk), which MlflowClient does not expose: a report
    over hundreds of runs takes seconds instead of minutes. This is the only reach-in into MLflow's internals."""
    store = client._tracking_client.store
    return store if hasattr(store, "get_metric_history_bulk") else None


def metric_histories(client, run_ids: list[str], keys: set[str]) -> pd.DataFrame:
    """Every point of `keys` for `run_ids`: one query per key on SQL stores, else one request per (run, key)."""
    store = sql_store(client)
    rows = []
    if store is not None:
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
        [experiment.experiment_id], filter_string="tags.kind = 'trial'", output_format="pandas", max_results=100_000
    )
    if runs.empty:
        raise ConfigError(f"experiment '{experiment_name}' has no trial runs to report (train some with study/run.py)")
    frame = _frame(runs)
    running = frame[frame["run_status"] == "RUNNING"]
    frame = frame[frame["run_status"] != "RUNNING"].reset_index(drop=True)
    keys = set(HISTORY_KEYS) | set(frame["tag:eval.objective"].dropna())
    histories = (
        metric_histories(client, list(frame["run_id"]), keys)
        if len(frame)
        else pd.DataFrame(columns=["run_id", "key", "step", "value"])
    )
    return Collected(experiment, frame, running.reset_index(drop=True), histories)


def last_sample_grid(run_id: str) -> bytes | None:
    """The PNG of the run's last sample grid, or None when it has none."""
    client = mlflow.MlflowClient()
    try:
        files = {a.path for a in client.list_artifacts(run_id, "images")}
    except MlflowException:
        return None
    path = latest_image_path(SAMPLES_KEY)
    if path not in files:
        path = _last_step_image(files, SAMPLES_KEY)
    if path is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        return Path(client.download_artifacts(run_id, path, tmp)).read_bytes()


def _last_step_image(files: set[str], key: str) -> str | None:
    """Runs logged before the fixed name existed keep only the step-keyed images of mlflow.log_image. MLflow
    has no public lookup of those by step, so the step is read from the file name: images/KEY+step+N+..."""
    steps = [
        (int(p.split("+step+")[1].split("+")[0]), p)
        for p in files
        if p.startswith(f"images/{key}+step+") and p.endswith(".png")
    ]
    return max(steps)[1] if steps else None


@dataclass
class Pilot:
    """The sizing table a pilot (study/plan.py) logged in an experiment: its newest run tagged kind=pilot."""

    run_id: str
    table: pd.DataFrame
    figure_png: bytes
    settings: dict[str, str]


def latest_pilot(experiment_id: str) -> Pilot | None:
    client = mlflow.MlflowClient()
    runs = client.search_runs(
        [experiment_id],
        "tags.kind = 'pilot' AND attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
    )
    if not runs:
        return None
    run = runs[0]
    with tempfile.TemporaryDirectory() as tmp:
        table = pd.read_csv(client.download_artifacts(run.info.run_id, "sizing.csv", tmp))
        png = Path(client.download_artifacts(run.info.run_id, "sizing.png", tmp)).read_bytes()
    return Pilot(run.info.run_id, table, png, dict(run.data.params))
