"""Mixed precision on the CPU: every arm under bf16 and fp16 (with a GradScaler), the T4 profile's whole
path, the VRAM cap and out-of-memory, and the precision errors a user can meet."""

import json
import os
import subprocess
import sys
from unittest import mock

import mlflow
import pytest
import torch
from helpers import (
    SHARED_CACHE,
    Recorder,
    arm_model,
    assert_clean_error,
    make_trainer,
    randomize_head,
    smoke_config,
    study_env,
    trial_runs,
    write_arm,
)
from safetensors import safe_open

import liquid_diffusion.train as trainer_module
from liquid_diffusion import LiquidUNet
from liquid_diffusion.codecs import PixelCodec
from liquid_diffusion.config import ExperimentConfig
from liquid_diffusion.data import MnistSource
from liquid_diffusion.evaluate import Evaluator
from liquid_diffusion.train import OverBudget, Trainer, apply_vram_cap, autocast, resolve_precision
from study.arms import load_arms
from study.budgets import get_budget, load_budgets

ARMS = load_arms()
PRECISION_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# Relative error of the velocity under autocast against fp32, ||v - v32|| / ||v32||, for a model
# whose zero-initialised head and AdaLN are given weights. Measured over all 12 arms on the CPU:
# bf16 at most 1.6e-2, fp16 at most 2.0e-3, about 4 unit roundoffs each (bf16 keeps 8 mantissa bits,
# 2^-8 = 3.9e-3; fp16 keeps 11, 2^-11 = 4.9e-4). The bounds allow about 12 roundoffs, 3x the measured.
OUTPUT_TOLERANCE = {"bf16": 5e-2, "fp16": 6e-3}
# Largest relative difference of a logged loss from the fp32 run's, measured over the first 6
# training steps of all 12 arms (the test runs 3): bf16 9.3e-5, fp16 6.0e-5. The loss is mostly the
# target's own size while the velocity is still small (the head starts at 0), so it moves far less
# than the velocity. The bounds are about 10x the measured: a quarter of bf16's unit roundoff, one
# of fp16's.
LOSS_TOLERANCE = {"bf16": 1e-3, "fp16": 5e-4}


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("arm", sorted(ARMS))
def test_every_arm_computes_the_fp32_velocity_under_autocast_to_rounding(arm, precision):
    cfg = arm_model(ARMS[arm], channels=1, size=8)
    torch.manual_seed(0)
    model = LiquidUNet(cfg)
    randomize_head(model)
    for module in model.modules():  # AdaLN starts at zero too: give it weights so it matters
        if hasattr(module, "modulation"):
            torch.nn.init.normal_(module.modulation[1].weight, std=0.02)
    x, t = torch.randn(4, 1, 8, 8), torch.rand(4)
    fp32 = model(x, t)
    with torch.autocast("cpu", dtype=PRECISION_DTYPES[precision]):
        mixed = model(x, t)
    assert mixed.dtype == PRECISION_DTYPES[precision]  # the head ran in half precision
    error = ((mixed.float() - fp32).norm() / fp32.norm()).item()
    assert 0 < error < OUTPUT_TOLERANCE[precision]


def train(cfg, run_dir, evaluator=None) -> tuple[Trainer, Recorder]:
    recorder = Recorder()
    trainer = make_trainer(run_dir, cfg, recorder, evaluator=evaluator)
    trainer.run()
    return trainer, recorder


def three_steps(arm: str, precision: str) -> ExperimentConfig:
    return ARMS[arm].apply(smoke_config(precision=precision, images=48))


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("arm", sorted(ARMS))
def test_every_arm_trains_and_samples_under_mixed_precision(arm, precision, tmp_path):
    trainer, mixed = train(three_steps(arm, precision), tmp_path / precision)
    _, fp32 = train(three_steps(arm, "fp32"), tmp_path / "fp32")

    assert trainer.precision == precision
    assert trainer.scaler.is_enabled() == (precision == "fp16")
    with autocast(trainer.device, trainer.precision):  # the forward really runs in half precision
        assert trainer.model.time_embed(torch.randn(2, trainer.model.model_config.channels[0])).dtype != torch.float32
    assert sorted(mixed.losses) == sorted(fp32.losses)
    for step, loss in fp32.losses.items():  # autocast changes the arithmetic by rounding only
        assert mixed.losses[step] == pytest.approx(loss, rel=LOSS_TOLERANCE[precision]), step
    assert mixed.losses != fp32.losses  # ... but it does change it
    # The sample grids of both evaluations came from sampling under the same precision.
    assert [(key, step) for key, step, _ in mixed.images] == [("samples", 48)]
    samples = trainer.sample(torch.randn(3, 1, 8, 8))
    assert samples.dtype == torch.float32 and torch.isfinite(samples).all()


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_evaluation_runs_under_mixed_precision(precision, tmp_path, repo):
    cfg = three_steps("baseline", precision).with_overrides({"eval.n": 16, "eval.n_ref": 32})
    calls = []

    def generate(model, codec, noise, steps, precision_, batch_size):
        calls.append(precision_)
        return real_generate(model, codec, noise, steps, precision_, batch_size)

    real_generate = trainer_module.generate
    evaluator = Evaluator(cfg, MnistSource(cfg.data), PixelCodec(), cache_dir=SHARED_CACHE)
    with mock.patch("liquid_diffusion.train.generate", generate):
        trainer, _ = train(cfg, tmp_path / "run", evaluator)
    assert calls and set(calls) == {precision}  # the grid and the N samples
    assert {"eval/fd_digits", "eval/kid_digits", "eval/confident_frac", "eval/class_entropy"} <= set(trainer.last_eval)
    assert all(torch.isfinite(torch.tensor(v)) for v in trainer.last_eval.values())


def test_sampling_keeps_the_integrated_state_in_fp32():
    from liquid_diffusion.flow import euler_sample

    seen = []

    def velocity(x, t):
        seen.append(x.dtype)
        return (x * 0.5).to(torch.bfloat16)  # what a model under autocast returns

    out = euler_sample(velocity, torch.randn(2, 1, 4, 4), steps=4)
    assert out.dtype == torch.float32 and set(seen) == {torch.float32}


def test_auto_precision_is_fp32_on_the_cpu_and_fp16_there_warns():
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == "fp32"
    assert resolve_precision("bf16", cpu) == "bf16"
    with pytest.warns(UserWarning, match="fp16 on the CPU"):
        assert resolve_precision("fp16", cpu) == "fp16"


def test_fp16_checkpoint_keeps_the_grad_scaler_and_resumes(tmp_path):
    cfg = smoke_config(precision="fp16", images=64)
    trainer, _ = train(cfg, tmp_path)
    state = json.loads(sorted((tmp_path / "checkpoints").iterdir())[-1].joinpath("state.json").read_text())
    assert state["scaler"]["scale"] == trainer.scaler.get_scale()
    again = make_trainer(tmp_path, cfg)
    assert again.resumed_from == 64 and again.scaler.get_scale() == trainer.scaler.get_scale()


# --- the VRAM cap and out-of-memory, without a GPU -------------------------------------------------


def test_vram_cap_sets_the_fraction_of_the_device_memory():
    device = torch.device("cuda", 0)
    properties = mock.Mock(total_memory=80 * 2**30)  # an 80 GB GPU capped to a T4's 16 GB
    with (
        mock.patch("torch.cuda.get_device_properties", return_value=properties) as query,
        mock.patch("torch.cuda.set_per_process_memory_fraction") as set_fraction,
        mock.patch("torch.cuda.reset_peak_memory_stats"),
    ):
        assert apply_vram_cap(device, 16) == pytest.approx(0.2)
        set_fraction.assert_called_once_with(pytest.approx(0.2), device)
        query.assert_called_once_with(device)
        properties.total_memory = 8 * 2**30  # a GPU smaller than the cap: all of it, never more
        assert apply_vram_cap(device, 16) == 1.0
        assert apply_vram_cap(device, 0) is None and apply_vram_cap(torch.device("cpu"), 16) is None


def out_of_memory_at(call: int):
    """A LiquidUNet.forward that raises CUDA's out-of-memory error at its `call`-th training call."""
    from liquid_diffusion.model import LiquidUNet

    original, calls = LiquidUNet.forward, []

    def forward(self, x, t):
        if self.training:
            calls.append(1)
            if len(calls) == call:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(self, x, t)

    return mock.patch.object(LiquidUNet, "forward", forward)


def test_out_of_memory_ends_the_run_over_budget(tmp_path):
    with out_of_memory_at(3), pytest.raises(OverBudget, match="out of memory under the 16 GB cap at step 3"):
        make_trainer(tmp_path, smoke_config(vram_cap_gb=16)).run()


def test_out_of_memory_is_a_failed_over_budget_mlflow_run(tmp_path, monkeypatch):
    from study.trial import RuntimeOptions, run_trial

    monkeypatch.setenv("LIQUID_DIFFUSION_CACHE", str(tmp_path / "cache"))
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:
        cfg = smoke_config(vram_cap_gb=16).with_overrides({"data.channels": 1})
        with out_of_memory_at(2):
            runtime = RuntimeOptions("cpu", tmp_path / "cache", progress=False)
            outcome = run_trial(cfg, {"kind": "trial"}, tmp_path / "run", "oom", runtime)
        run = mlflow.get_run(outcome.run_id)
    finally:
        mlflow.set_tracking_uri(None)
    assert outcome.kind == "over_budget" and outcome.status == "FAILED"
    assert run.info.status == "FAILED" and run.data.tags["status"] == "over_budget"
    assert "out of memory under the 16 GB cap at step 2" in run.data.tags["reason"]


# --- from the command line -------------------------------------------------------------------------


def cli(run_here, tmp_path, *args):
    """study/run.py with a store and outputs of its own in tmp_path, and the shared data cache."""
    return run_here(study_env(tmp_path), *args, "--out", str(tmp_path / "outputs"), "--no-progress")


def only_trial_run(tmp_path, experiment):
    [run] = trial_runs(study_env(tmp_path), experiment)
    return mlflow.MlflowClient(tracking_uri=study_env(tmp_path)["MLFLOW_TRACKING_URI"]), run


def test_a_bf16_arm_finishes_from_the_command_line(repo, tmp_path, run_here):
    arms = write_arm(tmp_path / "arms", "baseline_bf16", {"train.precision": "bf16"})
    result = cli(
        run_here,
        tmp_path,
        "--ablation",
        "baseline_bf16",
        "--budget",
        "cpu-smoke",
        "--ablations-dir",
        str(arms),
        "--experiment",
        "bf16",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    client, run = only_trial_run(tmp_path, "bf16")
    assert run.info.status == "FINISHED" and run.data.tags["precision"] == "bf16"
    assert run.data.params["train.precision"] == "bf16"
    assert client.get_metric_history(run.info.run_id, "eval/fd_digits")


def test_the_t4_path_profile_keeps_everything_of_t4_30m_but_its_sizes():
    budgets = load_budgets()
    t4 = get_budget(budgets, "t4-30m").apply(ExperimentConfig()).flat()
    path = get_budget(budgets, "t4-path-cpu").apply(ExperimentConfig()).flat()
    changed = {key for key in t4 if t4[key] != path[key]}
    sizes = {
        "data.resolution",
        "data.max_images",
        "model.resolution",
        "train.images",
        "train.batch_size",
        "train.warmup_images",
        "train.log_every_steps",
        "train.eval_every_images",
        "train.checkpoint_every_images",
        "train.n_samples",
        "train.sample_steps",
        "train.max_wall_minutes",
        "eval.n",
        "eval.n_ref",
    }
    assert changed <= sizes, changed - sizes
    assert (path["data.codec"], path["model.channels"], path["train.precision"], path["train.vram_cap_gb"]) == (
        "sd-vae",
        [64, 128, 256],
        "fp16",
        16,
    )


@pytest.mark.slow  # about 75 s: the SD-VAE architecture encodes and decodes on the CPU (moved from the fast suite)
def test_the_t4_path_runs_on_the_cpu_with_the_sd_vae_architecture(repo, tmp_path, run_here):
    """t4-path-cpu end to end: real AutoencoderKL architecture (random weights), latent cache, fp16 + GradScaler."""
    from study.gpu_check import random_sd_vae

    vae = random_sd_vae(tmp_path / "sd-vae-random")
    arms = write_arm(tmp_path / "arms", "baseline", {"data.codec_weights": str(vae)})
    result = cli(
        run_here,
        tmp_path,
        "--ablation",
        "baseline",
        "--budget",
        "t4-path-cpu",
        "--ablations-dir",
        str(arms),
        "--experiment",
        "t4",
        "--device",
        "cpu",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    client, run = only_trial_run(tmp_path, "t4")
    assert run.info.status == "FINISHED" and run.data.tags["precision"] == "fp16"
    assert run.data.params["data.codec"] == "sd-vae" and run.data.params["model.channels"] == "[64, 128, 256]"
    losses = client.get_metric_history(run.info.run_id, "train/loss")
    assert [m.step for m in losses] == [8, 16, 24, 32] and all(0 < m.value < float("inf") for m in losses)
    for key in ("eval/fd_digits", "eval/confident_frac"):
        assert client.get_metric_history(run.info.run_id, key), key
    assert client.list_artifacts(run.info.run_id, "images")  # the sample grid
    caches = {}  # the latents went through the cache
    for path in (SHARED_CACHE / "latents").glob("*.safetensors"):
        with safe_open(path, framework="pt") as cached:
            caches[path] = (cached.metadata()["codec"], tuple(cached.get_slice("latents").get_shape()))
    assert ("sd-vae", (64, 4, 4, 4)) in caches.values()


@pytest.mark.slow  # about 30 s: the GPU check script's whole CPU path; run by CI after the fast suite
def test_gpu_check_runs_on_the_cpu_in_fast_mode(repo, tmp_path):
    out = tmp_path / "figures.json"
    result = subprocess.run(
        [sys.executable, "study/gpu_check.py", "--device", "cpu", "--fast", "--out", str(out)],
        cwd=repo,
        capture_output=True,
        text=True,
        env={**os.environ, "LIQUID_DIFFUSION_CACHE": str(SHARED_CACHE)},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert set(figures["throughput"]) == {f"micro-4x1x8x8/{p}" for p in ("fp32", "fp16", "bf16")}
    assert all(row["train_img_s"] > 0 and row["sample_img_s"] > 0 for row in figures["throughput"].values())
    assert figures["memory_claim"]["vae_params"] == 83_653_863  # the SD-VAE architecture, whole
    assert figures["t4_path_run"]["status"] == "FINISHED" and figures["t4_path_run"]["precision"] == "fp16"


# --- bad input -------------------------------------------------------------------------------------


def test_unknown_precision_is_one_line_and_exit_2(repo, tmp_path, run_here):
    arms = write_arm(tmp_path / "arms", "fp8", {"train.precision": "fp8"})
    result = cli(run_here, tmp_path, "--ablation", "fp8", "--budget", "cpu-smoke", "--ablations-dir", str(arms))
    assert_clean_error(result, "precision='fp8'", "auto, fp32, fp16, bf16")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("script", ["study/run.py", "study/gpu_check.py"])
def test_cuda_without_cuda_is_one_line_and_exit_2(repo, tmp_path, script):
    args = ["--ablation", "baseline", "--budget", "cpu-smoke", "--device", "cuda"] if script.endswith("run.py") else []
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    result = subprocess.run(
        [sys.executable, script, *args], cwd=repo, env=env, capture_output=True, text=True, timeout=120
    )
    assert_clean_error(result, "device=cuda is not available")
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "optuna.db").exists()  # nothing half-made
