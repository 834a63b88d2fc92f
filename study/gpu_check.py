"""GPU check: the figures the README's GPU table is built from, in one command of a few minutes.

    python study/gpu_check.py                  # on the GPU; writes gpu_check.json
    python study/gpu_check.py --device cpu --fast   # the same code path on the CPU, small (tests)

It measures, on one device:
1. train and sample img/s and peak memory of the micro and tiny presets under fp16 and bf16
   (study/bench.py's precision_throughput, the trainer's own step);
2. the seed's memory claim, "tiny at 256 px, batch 8, fp16 fits in about 6 GB with the VAE": the
   peak allocation of a training step that encodes a batch through the real AutoencoderKL
   architecture (random weights) and trains tiny on its latents;
3. a short training run through the t4-30m code path (SD-VAE codec with random weights, fp16 with a
   GradScaler, latent cache, evaluation), sized to about a minute, into a throwaway MLflow store.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script: `study.*`

import torch  # noqa: E402

from liquid_diffusion.config import ConfigError  # noqa: E402
from liquid_diffusion.train import adamw, autocast, resolve_device  # noqa: E402

# The architecture of stabilityai/sd-vae-ft-mse (its config.json); the weights here are random.
SD_VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "act_fn": "silu",
    "sample_size": 256,
    "scaling_factor": 0.18215,
}


def random_sd_vae(folder: Path) -> Path:
    """An AutoencoderKL of SD-VAE's architecture with random weights, saved where data.codec_weights can point."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(**SD_VAE_CONFIG).save_pretrained(folder)
    return folder


def memory_claim(device: torch.device, resolution: int, batch: int) -> dict[str, float]:
    """Peak memory of one fp16 step of tiny on latents encoded, in the same step, by the SD-VAE architecture."""
    from diffusers import AutoencoderKL

    from liquid_diffusion import LiquidUNet, ModelConfig
    from liquid_diffusion.flow import rectified_flow_loss

    torch.manual_seed(0)
    vae = AutoencoderKL(**SD_VAE_CONFIG).to(device).eval().requires_grad_(False)
    size = resolution // 8
    model = LiquidUNet(ModelConfig.preset("tiny", in_channels=4, resolution=size)).to(device)
    optimizer = adamw(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    images = torch.rand(batch, 3, resolution, resolution, device=device) * 2 - 1
    for _ in range(2):  # the second step holds the optimizer's moments too
        with autocast(device, "fp16"):
            with torch.no_grad():
                x0 = vae.encode(images).latent_dist.mean * SD_VAE_CONFIG["scaling_factor"]
            loss = rectified_flow_loss(
                model, x0.float(), torch.randn_like(x0.float()), torch.rand(batch, device=device)
            )
        scaler.scale(loss.mean()).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return {
        "resolution": resolution,
        "batch": batch,
        "peak_mem_gb": peak,
        "vae_params": sum(p.numel() for p in vae.parameters()),
        "model_params": sum(p.numel() for p in model.parameters()),
    }


def t4_path_run(device: torch.device, folder: Path, images: int, resolution: int, eval_n: int, max_images: int) -> dict:
    """Train baseline through t4-30m's code path (random-weight SD-VAE, fp16, cache, eval) into a temp MLflow store."""
    import mlflow

    from study.arms import load_arms
    from study.budgets import get_budget, load_budgets, resolve_config
    from study.trial import RuntimeOptions, run_trial

    mlflow.set_tracking_uri(f"sqlite:///{folder / 'mlflow.db'}")
    budget = get_budget(load_budgets(), "t4-30m")
    cfg = resolve_config(load_arms()["baseline"], budget, "mnist", 0).with_overrides(
        {
            "data.codec_weights": str(random_sd_vae(folder / "sd-vae-random")),
            "data.resolution": resolution,
            "data.max_images": max_images,
            "train.images": images,
            "train.eval_every_images": images,
            "train.checkpoint_every_images": images,
            "eval.n": eval_n,
            "eval.n_ref": eval_n,
        }
    )
    start = time.perf_counter()
    outcome = run_trial(
        cfg,
        {"kind": "gpu-check"},
        folder / "run",
        "gpu-check",
        RuntimeOptions(device=str(device), progress=False),  # the usual cache
    )
    wall = time.perf_counter() - start
    run = mlflow.get_run(outcome.run_id)
    metrics = run.data.metrics
    return {
        "status": outcome.status,
        "wall_s": wall,
        "images": images,
        "resolution": resolution,
        "precision": run.data.tags.get("precision"),
        "train_img_s": metrics.get("train/img_per_s"),
        "peak_mem_gb": metrics.get("train/peak_mem_gb"),
        "eval": {k: v for k, v in metrics.items() if k.startswith("eval/")},
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="gpu_check.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="(default: %(default)s)")
    parser.add_argument("--fast", action="store_true", help="small shapes and a few steps: checks the code path only")
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"), help="(default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        device = resolve_device(args.device)
    except ConfigError as err:
        parser.exit(2, f"gpu_check.py: error: {err}\n")
    from study.bench import print_precision_table

    figures: dict = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "fast": args.fast,
    }
    precisions = ["fp32", "fp16"] + (["bf16"] if device.type == "cpu" or torch.cuda.is_bf16_supported() else [])
    if args.fast:
        cases, reps, steps = [("micro", (4, 1, 8, 8))], 2, 2
    else:
        cases, reps, steps = [("micro", (64, 1, 12, 12)), ("tiny", (8, 4, 32, 32)), ("tiny", (32, 4, 32, 32))], 10, 25
    started = time.perf_counter()
    figures["throughput"] = print_precision_table(cases, precisions, device, reps, steps)

    resolution, batch = (32, 2) if args.fast else (256, 8)
    figures["memory_claim"] = memory_claim(device, resolution, batch)
    print(
        f"\ntiny, {resolution} px, batch {batch}, fp16 with the SD-VAE architecture: peak "
        f"{figures['memory_claim']['peak_mem_gb']:.2f} GB allocated (the seed claims about 6 GB)",
        flush=True,
    )

    # About a minute of training at the measured fp16 tiny batch-32 speed (t4-30m's batch).
    preset, shape = cases[-1]
    tiny = figures["throughput"][f"{preset}-{'x'.join(map(str, shape))}/fp16"]
    images = 32 if args.fast else max(32, int(60 * tiny["train_img_s"]) // 32 * 32)
    with tempfile.TemporaryDirectory() as tmp:
        figures["t4_path_run"] = t4_path_run(
            device, Path(tmp), images, *((32, 16, 64) if args.fast else (256, 1000, 2000))
        )
    run = figures["t4_path_run"]
    print(
        f"t4-30m code path: {run['status']} after {run['images']} images in {run['wall_s']:.0f} s, "
        f"{run['train_img_s'] or float('nan'):.1f} img/s, peak {run['peak_mem_gb'] or float('nan'):.2f} GB",
        flush=True,
    )
    figures["total_s"] = time.perf_counter() - started
    tmp_out = args.out.with_name(f".{args.out.name}.{os.getpid()}")
    tmp_out.write_text(json.dumps(figures, indent=1))
    os.replace(tmp_out, args.out)
    print(f"wrote {args.out} ({figures['total_s']:.0f} s)")
    return 0 if run["status"] == "FINISHED" else 1


if __name__ == "__main__":
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    sys.exit(main())
