"""Train one resolved arm into one MLflow run: data, codec, latent cache, trainer, artifacts."""

from __future__ import annotations

import contextlib
import subprocess
from dataclasses import dataclass
from pathlib import Path

import mlflow

from liquid_diffusion.checkpoint import checkpoint_dir, latest_checkpoint
from liquid_diffusion.cli import DEFAULT_EXPERIMENT
from liquid_diffusion.codecs import load_codec
from liquid_diffusion.config import ExperimentConfig, dataset_slug
from liquid_diffusion.data import open_source
from liquid_diffusion.evaluate import Evaluator
from liquid_diffusion.inception import InceptionWeights
from liquid_diffusion.latent_cache import load_or_encode
from liquid_diffusion.outcomes import OUTCOMES
from liquid_diffusion.train import Trainer, TrainingStopped, TrainResult, resolve_device

from . import remote_checkpoints
from .tracking import (
    MLflowTracker,
    dataset_input,
    existing_run_id,
    logged_steps,
    read_marker,
    tracked_run,
)


@dataclass(frozen=True)
class RuntimeOptions:
    """How and where a command's runs execute: the same for all of them, and never part of a run's config.
    An option added here reaches every trial without touching the signatures in between."""

    device: str = "auto"
    cache_dir: Path | None = None  # latents, classifier and reference statistics; None = the default cache
    progress: bool = True
    weights: InceptionWeights | None = None  # for FID, KID and precision/recall
    compile: bool = False  # torch.compile the training forward
    upload_checkpoints: bool = False  # also keep checkpoints in the run's artifacts, for other machines


@dataclass
class TrialOutcome:
    status: str  # the MLflow run's, from outcomes.OUTCOMES
    run_id: str
    run_dir: Path
    reason: str = ""
    result: TrainResult | None = None
    kind: str = "finished"  # a key of outcomes.OUTCOMES: finished | over_budget | non_finite | pruned


def provenance() -> dict[str, str]:
    """The software versions and git commit a run was made with, for the report's header."""
    from importlib.metadata import PackageNotFoundError, version

    versions = []
    for package in ("torch", "diffusers", "mlflow", "optuna", "torch-fidelity"):
        with contextlib.suppress(PackageNotFoundError):
            versions.append(f"{package} {version(package)}")
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {"versions": ", ".join(versions), "git.commit": commit or "unknown"}


def run_dir_for(
    out_root: Path, experiment: str, arm: str, cfg: ExperimentConfig, budget: str, suffix: str = ""
) -> Path:
    """One folder per (experiment, arm, data, budget, seed, resolved config): a rerun finds its checkpoint."""
    folder = f"{dataset_slug(cfg.data.dataset)}-{budget}-seed{cfg.train.seed}-{cfg.digest()[:8]}{suffix}"
    return Path(out_root) / experiment / arm / folder


def _continue_from_artifacts(run_id: str, run_dir: Path) -> str | None:
    """`run_id` when its newest uploaded checkpoint is now in `run_dir`, which had none: that run's history
    continues here. None when the folder has a checkpoint of its own or the run uploaded none."""
    folder = checkpoint_dir(run_dir)
    if latest_checkpoint(folder) is None and remote_checkpoints.download_latest(run_id, folder) is not None:
        return run_id
    return None


def run_trial(
    cfg: ExperimentConfig,
    tags: dict[str, str],
    run_dir: Path,
    experiment: str = DEFAULT_EXPERIMENT,
    runtime: RuntimeOptions = RuntimeOptions(),
    parent_run_id: str | None = None,
    report=None,
    source=None,
    previous_run_id: str | None = None,
) -> TrialOutcome:
    """Train `cfg` to its budget, resuming from `run_dir` if an earlier attempt left a checkpoint.

    Data, codec and evaluation-weights errors are raised before any MLflow run exists. SIGINT/SIGTERM
    and unexpected errors propagate after the run is marked KILLED or FAILED. `report(metrics, step)`
    sees every logged metric dict and may raise Pruned. `source` is cfg.data's ImageSource if already open.
    With runtime.upload_checkpoints, checkpoints also go to the run's artifacts; a folder with no run of its
    own then continues `previous_run_id` (an earlier attempt on another machine) from its newest uploaded one.
    """
    device, cache_dir, progress = runtime.device, runtime.cache_dir, runtime.progress
    run_dir = Path(run_dir)
    run_id = existing_run_id(run_dir)  # StaleRunFolder when the folder's run lives in another tracking store
    if run_id and read_marker(run_dir).get("status") == "FINISHED":
        return TrialOutcome("FINISHED", run_id, run_dir, reason="already finished; nothing to do")
    adopt = None
    if run_id is None and runtime.upload_checkpoints and previous_run_id:
        adopt = _continue_from_artifacts(previous_run_id, run_dir)

    source = source or open_source(cfg.data)
    codec = load_codec(cfg.data.codec, cfg.data.codec_weights).to(resolve_device(device))
    latents = load_or_encode(source, codec, cfg.data, cache_dir, progress=progress)
    evaluator = Evaluator(cfg, source, codec, runtime.weights, cache_dir, resolve_device(device), progress)
    tags = {**tags, **evaluator.tags}
    run_dir.mkdir(parents=True, exist_ok=True)

    run_name = f"{tags.get('ablation', 'run')}-seed{cfg.train.seed}"
    try:
        with tracked_run(run_dir, experiment, run_name, tags, cfg.flat(), parent_run_id, adopt) as run:
            # a resumed run logs each step once
            tracker = MLflowTracker(report, logged_steps(run.info.run_id), runtime.upload_checkpoints)
            mlflow.log_input(dataset_input(source, cfg.data), context="training")  # MLflow keeps one per run
            mlflow.log_dict(cfg.to_dict(), "config.yaml")
            tracker.log_metrics({"data/images": len(latents), "data/skipped": source.skipped}, step=0)
            trainer = Trainer(
                cfg,
                latents,
                codec,
                run_dir,
                tracker=tracker,
                device=device,
                progress=progress,
                evaluator=evaluator,
                compile=runtime.compile,
            )
            mlflow.set_tags(
                {
                    "device": str(trainer.device),
                    "precision": trainer.precision,
                    "compile": str(runtime.compile).lower(),
                    **provenance(),
                }
            )
            mlflow.log_param("model.parameters", sum(p.numel() for p in trainer.model.parameters()))
            result = trainer.run()
            mlflow.log_artifacts(str(trainer.export_ema(run_dir / "ema")), artifact_path="ema")
            mlflow.log_metrics({f"time/{k}_s": v for k, v in result.seconds.items()}, step=result.images_seen)
    except TrainingStopped as err:
        run_id = read_marker(run_dir)["run_id"]
        return TrialOutcome(OUTCOMES[err.kind].run_status, run_id, run_dir, reason=str(err), kind=err.kind)
    return TrialOutcome(OUTCOMES["finished"].run_status, run.info.run_id, run_dir, result=result)
