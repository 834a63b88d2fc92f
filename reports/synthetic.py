"""A synthetic MLflow experiment with known numbers, shaped like study/run.py's: for tests and the benchmark.

Each arm gets one trial run per given final objective value (seed 0, 1, ...), with the tags,
params and metric histories the trainer logs. Untidy extras (running, failed, pruned and
over-budget runs, a run without the objective) are added on request.
"""

from __future__ import annotations

import time

import numpy as np
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag

from liquid_diffusion.cli import artifact_root
from liquid_diffusion.config import T_BINS, loss_bin_key

OBJECTIVE = "eval/fd_digits"


def add_run(
    client: MlflowClient,
    experiment_id: str,
    arm: str,
    seed: int,
    final: float | None,
    status="FINISHED",
    extra_tags: dict | None = None,
    evals: int = 3,
    loss_points: int = 20,
    dataset: str = "mnist",
    grid: np.ndarray | None = None,
    objective: str = OBJECTIVE,
) -> str:
    run = client.create_run(
        experiment_id,
        run_name=f"{arm}-seed{seed}",
        tags={
            "kind": "trial",
            "ablation": arm,
            "dataset": dataset,
            "seed": str(seed),
            "budget": "cpu-demo",
            "study": f"synthetic:{arm}:{dataset}:cpu-demo",
            "eval.objective": objective,
            "device": "cpu",
            "precision": "fp32",
            "eval.reference_set": "ref-mnist-12px-images-n5000-synthetic",
            "versions": "torch 2.14.1",
            "git.commit": "abc1234",
            **(extra_tags or {}),
        },
    )
    run_id, now = run.info.run_id, int(time.time() * 1000)
    params = {
        "model.parameters": 3455553,
        "train.precision": "auto",
        "train.sample_steps": 25,
        "data.codec": "pixel",
        "eval.n": 1000,
        "eval.n_ref": 5000,
        "eval.reference": "images",
    }
    metrics = [Metric("train/loss", 1.0 / (1 + i), now, 1000 * (i + 1)) for i in range(loss_points)]
    metrics += [Metric(loss_bin_key(b), 0.1 * (b + 1), now, 1000 * loss_points) for b in range(T_BINS)]
    metrics += [Metric("train/img_per_s", 250.0, now, 1000 * loss_points), Metric("train/peak_mem_gb", 1.5, now, 0)]
    if final is not None:  # the objective falls towards `final` at the last evaluation
        steps = np.linspace(1000 * loss_points / evals, 1000 * loss_points, evals).astype(int)
        metrics += [Metric(objective, final * (1 + (evals - 1 - i)), now, int(s)) for i, s in enumerate(steps)]
    client.log_batch(
        run_id,
        metrics=metrics,
        params=[Param(k, str(v)) for k, v in params.items()],
        tags=[RunTag("mlflow.runName", f"{arm}-seed{seed}")],
    )
    if grid is not None:
        client.log_image(run_id, grid, key="samples", step=1000 * loss_points)
    if status != "RUNNING":
        client.set_terminated(run_id, status)
    return run_id


def make_experiment(
    client: MlflowClient, name: str, arms: dict[str, list[float]], untidy: bool = False, grids: bool = False, **kwargs
) -> str:
    """`arms`: arm -> final objective per seed. Returns the experiment id."""
    experiment_id = client.create_experiment(name, artifact_location=artifact_root(client.tracking_uri))
    rng = np.random.default_rng(0)
    for arm, finals in arms.items():
        for seed, final in enumerate(finals):
            grid = (rng.random((19, 19, 3)) * 255).astype(np.uint8) if grids and seed == 0 else None
            add_run(client, experiment_id, arm, seed, final, grid=grid, **kwargs)
    if untidy:
        add_run(client, experiment_id, "baseline", 90, None, status="RUNNING")
        add_run(
            client,
            experiment_id,
            "baseline",
            91,
            99.0,
            status="FAILED",
            extra_tags={"status": "over_budget", "reason": "over budget: 21 min"},
        )
        add_run(
            client,
            experiment_id,
            "no_relax",
            92,
            98.0,
            status="KILLED",
            extra_tags={"status": "pruned", "optuna.state": "PRUNED", "reason": "pruned at 50000 images"},
        )
        add_run(client, experiment_id, "no_relax", 93, None, status="FAILED", extra_tags={"error": "RuntimeError: x"})
        add_run(client, experiment_id, "no_metric", 0, None)  # finished, but the objective was never logged
    return experiment_id
