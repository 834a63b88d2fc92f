"""Benchmark: LiquidUNet against the direct reference and a parameter-matched diffusers UNet2DModel.

Training-step (forward + backward + AdamW) and sampling (Euler, 25 steps) throughput, measured in
one process with warm-up and interleaved repetitions; the median of each is reported, then ratios,
and each as a share of the machine's matmul peak. --profile splits a training step by kind of op.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script: `study.*` and `tests.*`
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import torch  # noqa: E402
from diffusers import UNet2DModel  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count  # noqa: E402

from liquid_diffusion import LiquidUNet, ModelConfig  # noqa: E402
from liquid_diffusion.flow import euler_sample, rectified_flow_loss  # noqa: E402
from liquid_diffusion.train import adamw, autocast  # noqa: E402


@dataclass
class Candidate:
    name: str
    model: torch.nn.Module
    params: int
    velocity: callable  # (x, t) -> v, whatever the model's own calling convention

    def __post_init__(self):
        self.optimizer = adamw(self.model.parameters(), lr=1e-4)
        self.train_times: list[float] = []
        self.sample_times: list[float] = []


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def matched_unet(target: int, channels: int, resolution: int, attention: bool) -> UNet2DModel:
    """The UNet2DModel of 3 levels whose parameter count is closest to `target` (must be within 10%)."""

    def build(width: int, mult: tuple[int, ...]) -> UNet2DModel:
        down = ("DownBlock2D",) + (("AttnDownBlock2D",) if attention else ("DownBlock2D",)) * 2
        up = (("AttnUpBlock2D",) if attention else ("UpBlock2D",)) * 2 + ("UpBlock2D",)
        return UNet2DModel(
            sample_size=resolution,
            in_channels=channels,
            out_channels=channels,
            layers_per_block=2,
            block_out_channels=tuple(width * m for m in mult),
            down_block_types=down,
            up_block_types=up,
            norm_num_groups=math.gcd(32, width),
        )

    options = []
    with torch.device("meta"):
        for mult in ((1, 1, 2), (1, 2, 2), (1, 2, 3), (1, 2, 4)):
            for width in range(16, 513, 8):
                options.append((abs(count(build(width, mult)) - target), width, mult))
    _, width, mult = min(options)
    model = build(width, mult)
    if abs(count(model) - target) > 0.1 * target:
        raise SystemExit(f"bench.py: error: no UNet2DModel within 10% of {target} parameters")
    return model


def candidates(presets: list[str], channels: int, resolution: int, compile_: bool = False) -> list[Candidate]:
    from reference_model import reference_from_fast

    out = []
    torch.manual_seed(0)
    for preset in presets:
        for mixer in ("cfc", "conv"):
            cfg = ModelConfig.preset(preset, in_channels=channels, resolution=resolution, mixer=mixer)
            model = LiquidUNet(cfg)
            arm = "baseline" if mixer == "cfc" else "plain_conv"
            out.append(Candidate(f"liquid-{preset}-{arm}", model, count(model), model))
            if mixer == "cfc":
                reference = reference_from_fast(model)
                out.append(Candidate(f"reference-{preset}", reference, count(reference), reference))
                if compile_:
                    compiled = LiquidUNet(cfg)
                    out.append(
                        Candidate(f"liquid-{preset}-compiled", compiled, count(compiled), torch.compile(compiled))
                    )
    target = out[0].params  # the first preset's baseline LiquidUNet
    for attention in (True, False):
        unet = matched_unet(target, channels, resolution, attention)
        label = "unet2d-attn" if attention else "unet2d-noattn"
        out.append(Candidate(label, unet, count(unet), lambda x, t, m=unet: m(x, t * 1000).sample))
    return out


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def matmul_peak(dtype: torch.dtype, device: torch.device | None = None, n_max: int = 2048, reps: int = 5) -> float:
    """The device's matmul throughput in FLOP/s: the median of `reps` n x n products after one warm-up.
    The yardstick for a step's FLOP/s, measured in the same process just before, on the same threads.
    n doubles from 256 to `n_max` while one product takes under 50 ms: a dtype the CPU only emulates (bf16
    without AVX-512 bf16 or AMX ran at about 1 GFLOP/s on an AVX2 EPYC, 17 s a 2048 product) is measured at
    the size where it already takes that long, and the measurement ends in seconds rather than minutes."""
    device = device or torch.device("cpu")

    def product_seconds(a: torch.Tensor, b: torch.Tensor) -> float:
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # kernels run asynchronously: wait before reading the clock
        return time.perf_counter() - start

    n = 256
    while True:
        a, b = (torch.randn(n, n, dtype=dtype, device=device) for _ in range(2))
        if product_seconds(a, b) >= 0.05 or n >= n_max:  # this first product is also the warm-up
            break
        n *= 2
    return 2 * n**3 / statistics.median(product_seconds(a, b) for _ in range(reps))


def _conv_backward_flop(
    grad_out_shape, x_shape, w_shape, bias, stride, padding, dilation, transposed, output_padding, groups, output_mask,
    out_shape=None, **kwargs,
) -> int:  # fmt: skip
    """A convolution's backward: each gradient asked for (input, weight) costs what the forward does. torch's
    own formula agrees for dense convolutions but overcounts grouped (depthwise) ones, 65x the forward for a
    64-channel 7x7 depthwise convolution (torch 2.14.1)."""
    return conv_flop_count(x_shape, w_shape, grad_out_shape) * (int(output_mask[0]) + int(output_mask[1]))


def train_step_flop_counts(velocity, x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> dict[str, int]:
    """FLOP of one training step's forward and backward by aten op ("mm", "convolution_backward", ...): matmuls
    and convolutions, as AdamW's element-wise update is a rounding error next to them. Counted by torch's
    FlopCounterMode."""
    with FlopCounterMode(
        display=False, custom_mapping={torch.ops.aten.convolution_backward: _conv_backward_flop}
    ) as counter:
        rectified_flow_loss(velocity, x, noise, t).mean().backward()
    return {str(op).split(".")[1]: n for op, n in counter.get_flop_counts()["Global"].items()}


def train_step_flops(velocity, x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> int:
    return sum(train_step_flop_counts(velocity, x, noise, t).values())


def forward_flops(velocity, x: torch.Tensor) -> int:
    """FLOP of one forward at t = 0.5, as one sampling step costs."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        velocity(x, torch.full((x.shape[0],), 0.5))
    return counter.get_total_flops()


def time_train_step(c: Candidate, x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> float:
    start = time.perf_counter()
    rectified_flow_loss(c.velocity, x, noise, t).mean().backward()
    c.optimizer.step()
    c.optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def time_sampling(c: Candidate, noise: torch.Tensor, steps: int) -> float:
    start = time.perf_counter()
    euler_sample(c.velocity, noise, steps)
    return time.perf_counter() - start


def baseline_step_inputs(preset: str, shape: tuple[int, ...], device: torch.device):
    """The baseline LiquidUNet of `preset` for inputs of `shape`, its trainer optimizer, and a fixed batch
    (x, noise, t), all seeded: what the precision table and the step breakdown time."""
    torch.manual_seed(0)
    model = LiquidUNet(ModelConfig.preset(preset, in_channels=shape[1], resolution=shape[2])).to(device)
    gen = torch.Generator().manual_seed(0)
    x, noise = (torch.randn(shape, generator=gen).to(device) for _ in range(2))
    t = torch.rand(shape[0], generator=gen).to(device)
    return model, adamw(model.parameters(), lr=1e-4), x, noise, t


def precision_throughput(
    preset: str, shape: tuple[int, ...], precision: str, device: torch.device, reps: int, sample_steps: int
) -> dict[str, float]:
    """Train and sample img/s of the baseline LiquidUNet under one precision, and the peak CUDA memory.

    The training step is the trainer's: autocast, and a GradScaler for fp16. Repetitions run back
    to back after one warm-up; the median is reported.
    """
    model, optimizer, x, noise, t = baseline_step_inputs(preset, shape, device)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # kernels run asynchronously: wait before reading the clock

    def train_step() -> float:
        start = time.perf_counter()
        with autocast(device, precision):
            loss = rectified_flow_loss(model, x, noise, t).mean()
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        sync()
        return time.perf_counter() - start

    def sample() -> float:
        start = time.perf_counter()
        with autocast(device, precision):
            euler_sample(model, noise, sample_steps)
        sync()
        return time.perf_counter() - start

    flops = train_step_flops(model, x, noise, t)  # the same FLOP count under any precision
    optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    train_step(), sample()  # warm-up: allocator, oneDNN/cuDNN primitive caches
    train_times = [train_step() for _ in range(reps)]
    sample_times = [sample() for _ in range(reps)]
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return {
        "train_img_s": shape[0] / statistics.median(train_times),
        "sample_img_s": shape[0] / statistics.median(sample_times),
        "peak_mem_gb": peak,
        "train_flop": flops,
        "train_flop_s": flops / statistics.median(train_times),
    }


def print_precision_table(
    cases: list[tuple[str, tuple[int, ...]]], precisions: list[str], device: torch.device, reps: int, sample_steps: int
) -> dict[str, dict[str, float]]:
    """fp32 against the mixed precisions for each (preset, shape), with the ratios to fp32, and each training
    step's FLOP/s as a share of the device's matmul peak in that precision (measured here, just before)."""
    peaks = {precision: matmul_peak(DTYPES[precision], device) for precision in precisions}
    rows = {}
    print(
        f"\nprecision on {device} (baseline LiquidUNet; ratio = img/s over fp32 img/s; matmul peak "
        + ", ".join(f"{p} {peak / 1e9:.0f} GFLOP/s" for p, peak in peaks.items())
        + "):"
    )
    print(
        f"{'preset':<8}{'shape':<14}{'precision':<10}{'train img/s':>12}{'ratio':>7}{'sample img/s':>14}{'ratio':>7}"
        f"{'GFLOP/step':>12}{'GFLOP/s':>9}{'of peak':>9}"
    )
    for preset, shape in cases:
        case = f"{preset}-{'x'.join(map(str, shape))}"
        for precision in precisions:
            row = precision_throughput(preset, shape, precision, device, reps, sample_steps)
            row["peak_share"] = row["train_flop_s"] / peaks[precision]
            rows[f"{case}/{precision}"] = row
            base = rows[f"{case}/fp32"]
            print(
                f"{preset:<8}{'x'.join(map(str, shape)):<14}{precision:<10}{row['train_img_s']:>12.1f}"
                f"{row['train_img_s'] / base['train_img_s']:>6.2f}x{row['sample_img_s']:>14.2f}"
                f"{row['sample_img_s'] / base['sample_img_s']:>6.2f}x{row['train_flop'] / 1e9:>12.2f}"
                f"{row['train_flop_s'] / 1e9:>9.1f}{100 * row['peak_share']:>8.0f}%",
                flush=True,
            )
    return rows


# What each profiled op is, for the breakdown of a training step; everything else is element-wise work and copies.
OP_KINDS = {
    "aten::mm": "matmul",
    "aten::addmm": "matmul",
    "aten::bmm": "matmul",
    "aten::mkldnn_convolution": "convolution",
    "aten::convolution_backward": "convolution",
    "aten::native_group_norm": "GroupNorm",
    "aten::native_group_norm_backward": "GroupNorm",
    "aten::_fused_adamw_": "AdamW (fused)",
}
FLOP_KINDS = {
    "mm": "matmul",
    "addmm": "matmul",
    "bmm": "matmul",
    "convolution": "convolution",
    "convolution_backward": "convolution",
}


def step_breakdown(preset: str, shape: tuple[int, ...], steps: int = 5) -> tuple[dict[str, float], dict[str, int]]:
    """Seconds per training step (forward, backward, AdamW) spent in each kind of op, by torch's profiler (self
    time on the calling thread), and the FLOP per step of each kind. "outside ops" is the rest of the step's
    wall time: Python, the autograd engine and the profiler's own cost."""
    from torch.profiler import ProfilerActivity, profile

    model, optimizer, x, noise, t = baseline_step_inputs(preset, shape, torch.device("cpu"))
    flops = {}
    for op, n in train_step_flop_counts(model, x, noise, t).items():
        kind = FLOP_KINDS.get(op, "other")
        flops[kind] = flops.get(kind, 0) + n

    def step():
        rectified_flow_loss(model, x, noise, t).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        wall = (time.perf_counter() - start) / steps
    seconds = {}
    for event in prof.key_averages():
        if event.key.startswith("aten::") and event.self_cpu_time_total > 0:
            kind = OP_KINDS.get(event.key, "element-wise, copies, the rest")
            seconds[kind] = seconds.get(kind, 0.0) + event.self_cpu_time_total / 1e6 / steps
    seconds["outside ops"] = max(0.0, wall - sum(seconds.values()))
    return seconds, flops


def print_step_breakdown(preset: str, shape: tuple[int, ...], peak: float, steps: int = 5) -> None:
    """Where a training step's time goes, each kind's FLOP/s as a share of the fp32 matmul peak, and the share
    of the peak the whole step would reach if only matmuls and convolutions took time."""
    seconds, flops = step_breakdown(preset, shape, steps)
    total = sum(seconds.values())
    print(f"\nwhere a {preset} training step goes ({'x'.join(map(str, shape))}, fp32, torch profiler, {steps} steps):")
    print(f"{'kind':<32}{'ms/step':>9}{'share':>7}{'GFLOP':>8}{'GFLOP/s':>9}{'of peak':>9}")
    for kind, s in sorted(seconds.items(), key=lambda item: -item[1]):
        row = f"{kind:<32}{1000 * s:>9.1f}{100 * s / total:>6.0f}%"
        if kind in flops:
            row += f"{flops[kind] / 1e9:>8.2f}{flops[kind] / s / 1e9:>9.1f}{100 * flops[kind] / s / peak:>8.0f}%"
        print(row)
    bound = sum(flops.values()) / (seconds.get("matmul", 0.0) + seconds.get("convolution", 0.0))
    print(
        f"step {1000 * total:.1f} ms (profiled), {100 * sum(flops.values()) / total / peak:.0f}% of the fp32 peak; "
        f"with every other op free it would be {100 * bound / peak:.0f}%"
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="bench.py", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="micro preset at 4x16x16, for CI (under a minute)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--channels", type=int, default=4)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--reps", type=int, default=5, help="interleaved repetitions; the median is reported (>= 5)")
    parser.add_argument("--sample-steps", type=int, default=25)
    parser.add_argument("--mlflow", action="store_true", help="log the table to MLflow, experiment 'bench'")
    parser.add_argument("--profile", action="store_true", help="print where a LiquidUNet training step spends its time")
    parser.add_argument(
        "--compile", action="store_true", help="also measure torch.compile'd LiquidUNet (compiles first)"
    )
    args = parser.parse_args(argv)
    if args.reps < 5:
        parser.exit(2, "bench.py: error: --reps must be >= 5 (the median of at least five)\n")
    presets = ["tiny", "micro"]
    if args.quick:
        presets, args.resolution, args.batch = ["micro"], 16, 4

    shape = (args.batch, args.channels, args.resolution, args.resolution)
    gen = torch.Generator().manual_seed(0)
    x, noise, t = (
        torch.randn(shape, generator=gen),
        torch.randn(shape, generator=gen),
        torch.rand(args.batch, generator=gen),
    )
    pool = candidates(presets, args.channels, args.resolution, args.compile)
    print(
        f"shape {shape}, fp32, {torch.get_num_threads()} threads, torch {torch.__version__}; "
        f"median of {args.reps} interleaved repetitions after one warm-up",
        flush=True,
    )
    peak = matmul_peak(torch.float32)
    flops, sample_flops = {}, {}
    for c in pool:  # FLOP per step and per sampling run (a compiled model is counted eagerly), then the warm-up
        eager = c.model if "compiled" in c.name else c.velocity
        flops[c.name] = train_step_flops(eager, x, noise, t)
        sample_flops[c.name] = forward_flops(eager, noise) * args.sample_steps  # one forward per Euler step
        c.optimizer.zero_grad(set_to_none=True)
        time_train_step(c, x, noise, t)  # warm-up: allocator, oneDNN primitive caches
        time_sampling(c, noise, 2)
    for _ in range(args.reps):
        for c in pool:
            c.train_times.append(time_train_step(c, x, noise, t))
            c.sample_times.append(time_sampling(c, noise, args.sample_steps))

    rows = {
        c.name: (
            c.params,
            args.batch / statistics.median(c.train_times),
            args.batch / statistics.median(c.sample_times),
        )
        for c in pool
    }
    print(
        f"\n{'model':<26}{'params':>10}{'train img/s':>14}{'sample img/s':>15}{'GFLOP/step':>12}{'GFLOP/s':>9}"
        f"{'of peak':>9}{'sample GFLOP/s':>16}{'of peak':>9}   (fp32 matmul peak here: {peak / 1e9:.0f} GFLOP/s)"
    )
    for name, (params, train, sample) in rows.items():
        achieved = flops[name] * train / args.batch  # FLOP per step x steps per second
        sampling = sample_flops[name] * sample / args.batch  # FLOP per sampling run x runs per second
        print(
            f"{name:<26}{params / 1e6:>9.2f}M{train:>14.1f}{sample:>15.2f}{flops[name] / 1e9:>12.2f}"
            f"{achieved / 1e9:>9.1f}{100 * achieved / peak:>8.0f}%{sampling / 1e9:>16.1f}{100 * sampling / peak:>8.0f}%"
        )

    lead = f"liquid-{presets[0]}-baseline"
    ratios = {}
    print(f"\nratios of {lead} (target in brackets):")
    for other, target in ((f"reference-{presets[0]}", 2.0), ("unet2d-attn", 1.5), ("unet2d-noattn", None)):
        for kind, column in (("train", 1), ("sample", 2)):
            ratio = rows[lead][column] / rows[other][column]
            ratios[f"ratio/{kind}_vs_{other}"] = ratio
            mark = "" if target is None else f"  [>= {target}: {'met' if ratio >= target else 'NOT met'}]"
            print(f"  {kind:<6} vs {other:<16} {ratio:5.2f}x{mark}")

    # The training shapes the profiles use: the demo's micro at 1x12x12, batch 64; tiny on SD-VAE latents, batch 8.
    cases = [("micro", (16, 1, 12, 12))] if args.quick else [("micro", (64, 1, 12, 12)), ("tiny", (8, 4, 32, 32))]
    print_precision_table(cases, ["fp32", "bf16"], torch.device("cpu"), args.reps, args.sample_steps)

    if args.profile:
        for preset, case_shape in cases:
            print_step_breakdown(preset, case_shape, peak)

    if args.mlflow:
        import mlflow

        from study.tracking import set_experiment

        set_experiment("bench")
        with mlflow.start_run(run_name="quick" if args.quick else "full"):
            mlflow.log_params(
                {
                    "shape": "x".join(map(str, shape)),
                    "threads": torch.get_num_threads(),
                    "torch": torch.__version__,
                    "reps": args.reps,
                    "sample_steps": args.sample_steps,
                }
            )
            for name, (params, train, sample) in rows.items():
                mlflow.log_metrics(
                    {f"{name}/params": params, f"{name}/train_img_s": train, f"{name}/sample_img_s": sample}
                )
            mlflow.log_metrics(ratios)
    return 0


if __name__ == "__main__":
    sys.exit(main())
