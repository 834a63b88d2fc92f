"""Helpers the test files share: running the study command, reading what it logged, small configs,
trainers and models. (pytest's conftest.py is for fixtures; helpers are imported from here.)"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import optuna
import torch
import yaml
from mlflow.tracking import MlflowClient
from PIL import Image

from liquid_diffusion.codecs import PixelCodec
from liquid_diffusion.config import ExperimentConfig, ModelConfig
from liquid_diffusion.train import Trainer

REPO = Path(__file__).resolve().parent.parent
RUN = [sys.executable, "study/run.py"]
# The data and digit-classifier cache most command tests share: MNIST and the classifier are prepared
# once (about a minute), not once per test.
SHARED_CACHE = REPO / ".pytest_cache" / "liquid-cache"
# A headless Chromium for the tests that look at pages as a user's browser renders them; .ci/run installs one.
BROWSER = shutil.which("chromium-headless-shell") or shutil.which("chromium") or shutil.which("google-chrome")


# --- the command line -------------------------------------------------------------------------------


def study_env(store_dir: Path, cache: Path = SHARED_CACHE, store: str = "mlflow.db", **extra: str) -> dict:
    """The environment of a study command with its own MLflow store in `store_dir`."""
    return {
        **os.environ,
        "MLFLOW_TRACKING_URI": f"sqlite:///{store_dir / store}",
        "LIQUID_DIFFUSION_CACHE": str(cache),
        "PYTHONUNBUFFERED": "1",
        **extra,
    }


def run_script(script: str, env: dict | None, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """`python SCRIPT ARGS` from the repository root, as a user types it."""
    command = [sys.executable, script, *args]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def run_study(env: dict | None, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """`python study/run.py ARGS` from the repository root, as a user types it."""
    return run_script("study/run.py", env, *args, timeout=timeout)


def assert_clean_error(result, *fragments):
    """Bad input: exit code 2 and one line on stderr that names what was wrong; never a traceback.

    `result` is a CompletedProcess, or anything with `returncode` and `stderr`.
    """
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def trial_runs(env: dict, experiment: str, **tags: str) -> list:
    """The experiment's trial runs (or, with kind="study", its parent runs) that carry `tags`."""
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name(experiment)
    query = " and ".join(f"tags.{k} = '{v}'" for k, v in {"kind": "trial", **tags}.items())
    return client.search_runs([exp.experiment_id], filter_string=query) if exp else []


def optuna_db(store_dir: Path) -> str:
    """The Optuna storage a study command uses by default: optuna.db beside the sqlite mlflow.db."""
    return f"sqlite:///{store_dir / 'optuna.db'}"


def study_trials(storage: str, name: str) -> list:
    from study.storage import open_storage

    return optuna.load_study(study_name=name, storage=open_storage(storage)).get_trials(deepcopy=False)


def long_smoke_budget(tmp_path: Path, images: int = 1600) -> str:
    """A budgets file whose cpu-smoke has enough steps (of 16 images) to kill a run between checkpoints,
    which come every 2 steps."""
    budgets = yaml.safe_load((REPO / "study" / "budgets.yaml").read_text())
    smoke = budgets["cpu-smoke"]
    smoke["overrides"].update(
        {
            "train.images": images,
            "train.checkpoint_every_images": 32,
            "train.eval_every_images": 800,
            "train.log_every_steps": 5,
        }
    )
    path = tmp_path / "budgets.yaml"
    path.write_text(yaml.safe_dump({"cpu-smoke": smoke}))
    return str(path)


def wait_for(predicate, timeout=120.0, poll=0.0005) -> bool:
    """Poll `predicate` until it holds (True) or `timeout` seconds pass (False)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(poll)
    return False


def checkpoint_dirs(out: Path, arm: str = "baseline") -> list[Path]:
    """The checkpoint folders of `arm`'s run folders under a study's --out."""
    return list(out.glob(f"*/{arm}/*/checkpoints"))


def latest_checkpoint(out: Path) -> str | None:
    names = [name for folder in checkpoint_dirs(out) for name in os.listdir(folder) if name.startswith("checkpoint-")]
    return max(names, default=None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(command: list[str], port: int, folder, ready_path: str = "/"):
    """A server process on `port`, started in `folder` and up once `ready_path` answers; stopped afterwards.
    Its log goes to a file there: a chatty server writing into a pipe nobody reads would block."""
    log = Path(folder) / f"server-{port}.log"
    with open(log, "w") as sink:
        server = subprocess.Popen(command, cwd=folder, stdout=sink, stderr=subprocess.STDOUT)
    try:
        for _ in range(240):
            with contextlib.suppress(OSError):
                urllib.request.urlopen(f"http://127.0.0.1:{port}{ready_path}", timeout=2)
                break
            assert server.poll() is None, log.read_text()[-2000:]
            time.sleep(0.5)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(timeout=30)


def write_arm(folder: Path, name: str, overrides: dict) -> Path:
    """An arms folder holding one arm file, `name.yaml`, with `overrides`."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.yaml").write_text(yaml.safe_dump({"description": f"test arm {name}", "overrides": overrides}))
    return folder


def write_images(folder: Path, n: int = 4, size: tuple[int, int] = (40, 30), seed: int = 0) -> Path:
    """A folder of `n` random RGB PNGs of `size` (width, height)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    return folder


# --- models and trainers in process -----------------------------------------------------------------


def arm_model(arm, channels: int, size: int) -> ModelConfig:
    """An ablation arm's model (study.arms.OverrideSet) at the micro preset, for channels x size x size inputs."""
    micro = ExperimentConfig().with_overrides({"model.preset": "micro"})
    return arm.apply(micro).model.replace(in_channels=channels, resolution=size)


def randomize_head(model: torch.nn.Module, seed: int = 0) -> None:
    """The head is zero-initialised; give it weights so outputs and gradients depend on every layer."""
    gen = torch.Generator().manual_seed(seed)
    conv = model.head[-1]
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) * 0.1)
        conv.bias.copy_(torch.randn(conv.bias.shape, generator=gen) * 0.1)


def smoke_config(**train) -> ExperimentConfig:
    """micro at 8x8: 96 images in steps of 16, an evaluation every 48 and a checkpoint every 32."""
    return ExperimentConfig().with_overrides(
        {
            "data.resolution": 8,
            "model.preset": "micro",
            "train.images": 96,
            "train.batch_size": 16,
            "train.lr": 1e-3,
            "train.warmup_images": 32,
            "train.log_every_steps": 1,
            "train.eval_every_images": 48,
            "train.checkpoint_every_images": 32,
            "train.n_samples": 4,
            "train.sample_steps": 2,
            **{f"train.{k}": v for k, v in train.items()},
        }
    )


def latents(n: int = 64) -> torch.Tensor:
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(7)).clamp(-1, 1)


class Recorder:
    """A tracker that keeps the training loss per step; raises KeyboardInterrupt at `stop_at`, as a kill would."""

    def __init__(self, stop_at=None):
        self.losses, self.images, self.checkpoints, self.stop_at = {}, [], [], stop_at

    def log_metrics(self, metrics, step):
        if "train/loss" in metrics:
            self.losses[step] = metrics["train/loss"]
            if step == self.stop_at:
                raise KeyboardInterrupt("simulated kill")

    def log_image(self, image, key, step):
        self.images.append((key, step, image.shape))

    def log_checkpoint(self, path):
        self.checkpoints.append(path.name)


def make_trainer(run_dir: Path, cfg: ExperimentConfig | None = None, recorder=None, data=None, **kw) -> Trainer:
    """A CPU trainer over `latents()` with the pixel codec: smoke_config() unless `cfg` is given."""
    cfg = cfg if cfg is not None else smoke_config()
    data = data if data is not None else latents()
    return Trainer(cfg, data, PixelCodec(), run_dir, recorder, device="cpu", progress=False, **kw)
