"""Checkpoints kept in the MLflow run's artifacts, so that a trial resumes on a machine that never saw its run folder.

With a tracking server every node shares the artifact store, while run folders (--out) stay on the node that
wrote them. Each checkpoint the trainer writes locally is also uploaded as `checkpoints/checkpoint-<images>/`,
and a file COMPLETE is uploaded after its files: a reader takes only checkpoints that have it, so an upload cut
short by a kill is never used. A node that takes over a trial with no local checkpoint downloads the newest
complete one into its run folder (into a temporary folder first, renamed when whole) and resumes from it.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import mlflow

ARTIFACT_DIR = "checkpoints"
COMPLETE = "COMPLETE"
KEEP = 2  # complete checkpoints kept in the artifacts, as in the run folder


def uploads_wanted(tracking_uri: str, asked: bool) -> bool:
    """Upload when asked to, and always to a tracking server: the one store every node shares."""
    return asked or tracking_uri.startswith(("http://", "https://"))


def _listing(client: mlflow.MlflowClient, run_id: str) -> dict[str, set[str]]:
    """checkpoint folder (artifact path) -> the names of the files it holds so far."""
    return {
        folder.path: {Path(f.path).name for f in client.list_artifacts(run_id, folder.path)}
        for folder in client.list_artifacts(run_id, ARTIFACT_DIR)
        if folder.is_dir
    }


def complete_checkpoints(run_id: str) -> list[str]:
    """The run's uploaded checkpoints whose upload finished, oldest first (names sort by images seen)."""
    listing = _listing(mlflow.MlflowClient(), run_id)
    return sorted(path for path, files in listing.items() if COMPLETE in files)


def upload(run_id: str, checkpoint: Path) -> float:
    """Upload a local checkpoint folder, its COMPLETE marker last, then prune; returns the seconds it took."""
    started = time.perf_counter()
    client = mlflow.MlflowClient()
    destination = f"{ARTIFACT_DIR}/{checkpoint.name}"
    client.log_artifacts(run_id, str(checkpoint), destination)
    client.log_text(run_id, json.dumps({"uploaded_at": time.time()}), f"{destination}/{COMPLETE}")
    _prune(client, run_id)
    return time.perf_counter() - started


def _prune(client: mlflow.MlflowClient, run_id: str) -> None:
    """Delete every uploaded checkpoint older than the KEEP newest complete ones, unfinished uploads included.

    MlflowClient has no call that deletes artifacts; the run's artifact repository has one, and MLflow's
    proxied (mlflow-artifacts:) and local repositories implement it. This is the only use of that registry."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    listing = _listing(client, run_id)
    complete = sorted(path for path, files in listing.items() if COMPLETE in files)
    if len(complete) <= KEEP:
        return
    oldest_kept = complete[-KEEP]
    repository = get_artifact_repository(client.get_run(run_id).info.artifact_uri)
    for path in listing:
        if path < oldest_kept:
            repository.delete_artifacts(path)


def download_latest(run_id: str, checkpoint_dir: Path) -> Path | None:
    """The run's newest complete checkpoint, downloaded into `checkpoint_dir`; None when it has none."""
    complete = complete_checkpoints(run_id)
    if not complete:
        return None
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    final = checkpoint_dir / Path(complete[-1]).name
    with tempfile.TemporaryDirectory(dir=checkpoint_dir, prefix=".download-") as tmp:
        local = Path(mlflow.MlflowClient().download_artifacts(run_id, complete[-1], tmp))
        os.replace(local, final)  # the trainer sees the checkpoint whole or not at all
    return final
