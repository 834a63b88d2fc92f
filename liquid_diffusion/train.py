"""The rectified-flow training loop: AdamW with warmup, EMA, mixed precision, checkpoints and resume.

The budget is counted in training images. Rerunning with the same run folder resumes from its
latest checkpoint and continues bit for bit on the CPU: every random draw comes from one seeded
generator whose state is checkpointed.
"""

from __future__ import annotations

import contextlib
import math
import resource
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from diffusers.optimization import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup
from diffusers.training_utils import EMAModel
from torchvision.utils import make_grid
from tqdm.auto import tqdm

from .checkpoint import checkpoint_dir, latest_checkpoint, load_checkpoint, save_checkpoint
from .config import T_BINS, ConfigError, ExperimentConfig, eval_prefix, loss_bin_key
from .flow import euler_sample, rectified_flow_loss, sample_t
from .model import LiquidUNet

SAMPLE_NOISE_SEED = 1234  # the same fixed noise for every arm and seed, so sample grids compare


class Tracker(Protocol):
    """Where metrics and images go; study/ provides the MLflow one."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def log_image(self, image: np.ndarray, key: str, step: int) -> None: ...

    def log_checkpoint(self, path: Path) -> None:
        """A checkpoint was written to `path` (a tracker may copy it where other machines can read it)."""


SAMPLES_KEY = "samples"  # the images key of the sample grids


def latest_image_path(key: str) -> str:
    """The artifact in which a tracker keeps the last image logged under `key`: reports read the final
    sample grid from this fixed name."""
    return f"images/{key}-latest.png"


class NullTracker:
    def log_metrics(self, metrics, step):
        pass

    def log_image(self, image, key, step):
        pass

    def log_checkpoint(self, path):
        pass


class TrainingStopped(RuntimeError):
    """The run ended early for a reason that is a result, not a bug; each subclass's `kind` names its row
    in outcomes.OUTCOMES."""

    kind: str


class NonFiniteLoss(TrainingStopped):
    kind = "non_finite"


class OverBudget(TrainingStopped):
    kind = "over_budget"


class Pruned(TrainingStopped):
    """A study's pruner judged the run not worth finishing, from its evaluations so far."""

    kind = "pruned"


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda is not available on this machine; choose one of: auto, cpu")
    return torch.device(name)


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto` is bf16 on GPUs that have it, fp16 on older GPUs (a T4), and fp32 on the CPU.

    On the CPU, `auto` stays fp32 even where the CPU has native bf16 (avx512_bf16, AMX): measured on
    such a CPU, bf16 autocast made the micro step 0.57-0.86x and the tiny step 0.90-0.97x as fast as fp32
    (README, Mixed precision). fp16 on the CPU is allowed because it runs the T4's code path (fp16
    autocast and a GradScaler) where no GPU is at hand, but it is many times slower than fp32 there.
    """
    if precision == "auto":
        if device.type != "cuda":
            return "fp32"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if precision == "fp16" and device.type != "cuda":
        warnings.warn(
            "precision=fp16 on the CPU runs the GPU's fp16 code path for checking it; it is many times "
            "slower than fp32 here",
            stacklevel=2,
        )
    return precision


def apply_vram_cap(device: torch.device, cap_gb: float) -> float | None:
    """Cap this process's CUDA memory at `cap_gb`, so a T4 budget means the same on a larger GPU.

    Returns the fraction of the device's memory passed to set_per_process_memory_fraction, or None
    when there is nothing to cap (CPU, or no cap). An allocation past the cap raises
    torch.cuda.OutOfMemoryError, which the trainer reports as over budget.
    """
    if device.type != "cuda" or not cap_gb:
        return None
    total = torch.cuda.get_device_properties(device).total_memory
    fraction = min(1.0, cap_gb * 2**30 / total)
    torch.cuda.set_per_process_memory_fraction(fraction, device)
    torch.cuda.reset_peak_memory_stats(device)
    return fraction


def adamw(params, lr: float, weight_decay: float = 0.01) -> torch.optim.AdamW:
    """The trainer's optimizer. fused=True updates every tensor in one kernel instead of a dozen element-wise
    ops per tensor: 17.0 -> 5.1 ms a step for micro's 296 tensors on a 2-core CPU, the same update to float
    rounding. A checkpoint written before keeps its own setting on resume (load_state_dict restores it)."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)


def autocast(device: torch.device, precision: str):
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


@torch.no_grad()
def generate(
    model, codec, noise: torch.Tensor, steps: int, precision: str = "fp32", batch_size: int = 64
) -> torch.Tensor:
    """Images in [-1, 1] on the CPU: Euler-integrate `model` from `noise`, then decode through `codec`."""
    device = next(model.parameters()).device
    out = []
    with autocast(device, precision):
        for chunk in noise.split(batch_size):
            latents = euler_sample(model, chunk.to(device), steps)
            out.append(codec.decode(latents.float()).float().cpu())
    return torch.cat(out).clamp(-1, 1)


@dataclass
class TrainResult:
    images_seen: int
    steps: int
    final_loss: float
    resumed_from: int  # images seen at the checkpoint this process started from (0 = fresh)
    seconds: dict[str, float] = field(default_factory=dict)  # wall time by activity, this process
    peak_memory_gb: float = 0.0
    eval_metrics: dict[str, float] = field(default_factory=dict)  # the last evaluation's

    @property
    def overhead_fraction(self) -> float:
        """Data, logging and checkpoint time as a share of training wall time, evaluation excluded."""
        s = self.seconds
        overhead = s.get("data", 0) + s.get("logging", 0) + s.get("checkpoint", 0)
        return overhead / max(1e-9, overhead + s.get("step", 0))


class Stopwatch:
    """Wall seconds per phase of the training loop: `with clock("step"):` adds the block's time."""

    def __init__(self, *phases: str):
        self.seconds = dict.fromkeys(phases, 0.0)

    @contextlib.contextmanager
    def __call__(self, phase: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] += time.perf_counter() - start

    def total(self, *phases: str) -> float:
        return sum(self.seconds[phase] for phase in phases)


class LossWindow:
    """Per-sample losses since the last log, overall and binned by t (minRF's cheap diagnostic), and the
    throughput over the window's training seconds (drawing batches and stepping; logging, evaluation and
    checkpoints excluded)."""

    def __init__(self, training_seconds: float):
        self.sums = torch.zeros(T_BINS, dtype=torch.float64)
        self.counts = torch.zeros(T_BINS, dtype=torch.float64)
        self.images = 0
        self.opened_at = training_seconds  # the trainer's training seconds so far

    def add(self, losses: torch.Tensor, t: torch.Tensor) -> None:
        losses = losses.cpu().double()
        bins = (t.cpu() * T_BINS).long().clamp(0, T_BINS - 1)
        self.sums.index_add_(0, bins, losses)
        self.counts.index_add_(0, bins, torch.ones_like(losses))
        self.images += len(losses)

    def metrics(self, training_seconds: float) -> dict[str, float]:
        out = {"train/loss": float(self.sums.sum() / self.counts.sum())}
        for i in range(T_BINS):
            if self.counts[i] > 0:
                out[loss_bin_key(i)] = float(self.sums[i] / self.counts[i])
        out["train/img_per_s"] = self.images / max(training_seconds - self.opened_at, 1e-9)
        return out


class Trainer:
    def __init__(
        self,
        cfg: ExperimentConfig,
        latents: torch.Tensor,
        codec,
        run_dir: Path,
        tracker: Tracker | None = None,
        device: str = "auto",
        progress: bool = True,
        evaluator=None,
        compile: bool = False,
    ):
        """`evaluator` (liquid_diffusion.evaluate.Evaluator) adds sample-quality metrics to every evaluation.

        `compile` runs the training forward through torch.compile: the same numbers to float
        rounding, faster steps after a compile that costs minutes on a small CPU (see README).
        """
        self.cfg, self.codec, self.run_dir = cfg, codec, Path(run_dir)
        self.evaluator = evaluator
        self.tracker = tracker or NullTracker()
        self.progress = progress
        tc = cfg.train
        self.device = resolve_device(device)
        self.precision = resolve_precision(tc.precision, self.device)
        apply_vram_cap(self.device, tc.vram_cap_gb)

        torch.manual_seed(tc.seed)
        self.model = LiquidUNet(cfg.model).to(self.device)
        # Checkpoints, EMA and sampling use self.model; only the training forward goes through the compiled wrapper.
        self.train_model = torch.compile(self.model) if compile else self.model
        self.optimizer = adamw(self.model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
        warmup_steps = math.ceil(tc.warmup_images / tc.batch_size)
        if tc.lr_schedule == "cosine":
            total_steps = math.ceil(tc.images / tc.batch_size)
            self.lr_schedule = get_cosine_schedule_with_warmup(self.optimizer, warmup_steps, total_steps)
        else:
            self.lr_schedule = get_constant_schedule_with_warmup(self.optimizer, warmup_steps)
        # foreach: one multi-tensor update instead of a Python loop over ~300 tensors (6.1 -> 3.4 ms a micro
        # step on a 2-core CPU); the same arithmetic, so the same numbers.
        self.ema = EMAModel(self.model.parameters(), decay=tc.ema_decay, foreach=True)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self.generator = torch.Generator().manual_seed(tc.seed)
        self.latents = latents.to(self.device)
        channels, size = cfg.data.latent_shape
        noise_gen = torch.Generator().manual_seed(SAMPLE_NOISE_SEED)
        self.sample_noise = torch.randn(tc.n_samples, channels, size, size, generator=noise_gen)
        self.images_seen = self.step = 0
        self.wall_before = 0.0  # wall seconds spent by earlier processes on this run, evaluation excluded
        self.eval_seconds = 0.0  # spent evaluating in this process
        # CPU seconds (all of this process's threads) of training, evaluation excluded, all processes so far: what a
        # study costs a shared machine, where wall time also counts the other jobs' turns
        self.cpu_before = self.eval_cpu_before = 0.0
        self.eval_cpu_seconds = 0.0
        self._started, self._cpu_started = time.perf_counter(), time.process_time()  # run() starts them again
        self.last_eval: dict[str, float] = {}
        self.resumed_from = 0
        self.checkpoint_dir = checkpoint_dir(self.run_dir)
        if (latest := latest_checkpoint(self.checkpoint_dir)) is not None:
            self._restore(latest)

    # --- checkpoints -------------------------------------------------------------------------

    def _param_names(self) -> list[str]:
        return [name for name, _ in self.model.named_parameters()]

    def save(self) -> Path:
        # The EMA weights go into the checkpoint's one safetensors file under their parameter names, not
        # through EMAModel.state_dict(), which is a pickled dict around a list: named tensors can be read
        # without unpickling, and a checkpoint stays one file of tensors plus one of plain JSON.
        tensors = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        tensors.update({f"ema.{n}": p for n, p in zip(self._param_names(), self.ema.shadow_params)})
        tensors["rng.torch"] = torch.get_rng_state()
        tensors["rng.generator"] = self.generator.get_state()
        if self.device.type == "cuda":
            tensors["rng.cuda"] = torch.cuda.get_rng_state(self.device)
        state = {
            "step": self.step,
            "images_seen": self.images_seen,
            "wall_seconds": self._wall_spent(),
            "cpu_seconds": self._cpu_spent(),
            "eval_cpu_seconds": self.eval_cpu_before + self.eval_cpu_seconds,
            "ema_optimization_step": self.ema.optimization_step,
            "lr_schedule": self.lr_schedule.state_dict(),  # plain values; lr_lambdas is [None] for functions
            "scaler": self.scaler.state_dict(),
            "config": self.cfg.to_dict(),
        }
        return save_checkpoint(self.checkpoint_dir, self.images_seen, tensors, self.optimizer, state)

    def _restore(self, path: Path) -> None:
        tensors, state = load_checkpoint(path, self.optimizer)
        if state["config"] != self.cfg.to_dict():
            raise ConfigError(f"checkpoint {path} was written with another config; use another run folder")
        self.model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        for name, shadow in zip(self._param_names(), self.ema.shadow_params):
            shadow.copy_(tensors[f"ema.{name}"])
        self.ema.optimization_step = state["ema_optimization_step"]
        self.lr_schedule.load_state_dict(state["lr_schedule"])
        if state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(tensors["rng.torch"])
        self.generator.set_state(tensors["rng.generator"])
        if "rng.cuda" in tensors and self.device.type == "cuda":
            torch.cuda.set_rng_state(tensors["rng.cuda"], self.device)
        self.step, self.images_seen = state["step"], state["images_seen"]
        self.wall_before = state["wall_seconds"]
        # checkpoints written before CPU time was kept have none
        self.cpu_before, self.eval_cpu_before = state.get("cpu_seconds", 0.0), state.get("eval_cpu_seconds", 0.0)
        self.resumed_from = self.images_seen

    # --- training ----------------------------------------------------------------------------

    def _batch(self):
        """A batch and its t and noise, all drawn from the seed's own generator: every arm sees the same
        ones for the same seed (the report's paired design), whatever its architecture consumed at init."""
        tc = self.cfg.train
        index = torch.randint(len(self.latents), (tc.batch_size,), generator=self.generator)
        x0 = self.latents[index.to(self.device)]
        noise = torch.randn(x0.shape, generator=self.generator).to(self.device)
        t = sample_t(tc.batch_size, tc.t_sampling, self.generator).to(self.device)
        return x0, noise, t

    def _wall_spent(self) -> float:
        """Wall seconds of training so far, all processes; evaluation is not charged to the budget."""
        return self.wall_before + time.perf_counter() - self._started - self.eval_seconds

    def _cpu_spent(self) -> float:
        """CPU seconds of training so far, all processes, evaluation excluded."""
        return self.cpu_before + time.process_time() - self._cpu_started - self.eval_cpu_seconds

    def _check_wall(self) -> None:
        limit = self.cfg.train.max_wall_minutes * 60
        spent = self._wall_spent()
        if limit and spent > limit:
            raise OverBudget(
                f"over budget: {spent / 60:.1f} min of wall time exceeds the "
                f"{self.cfg.train.max_wall_minutes:g} min cap "
                f"after {self.images_seen} of {self.cfg.train.images} images"
            )

    def run(self) -> TrainResult:
        tc = self.cfg.train
        self._started, self.eval_seconds = time.perf_counter(), 0.0
        self._cpu_started, self.eval_cpu_seconds = time.process_time(), 0.0
        clock = Stopwatch("data", "step", "logging", "eval", "checkpoint")

        def training_seconds() -> float:
            return clock.total("data", "step")

        window, last_loss, last_eval = LossWindow(training_seconds()), float("nan"), -1
        bar = tqdm(
            total=tc.images,
            initial=self.images_seen,
            unit="img",
            desc="train",
            disable=not self.progress,
            dynamic_ncols=True,
        )

        def crossed(every: int) -> bool:
            return self.images_seen // every > (self.images_seen - tc.batch_size) // every

        def reached(images: int) -> bool:  # this step is the first at or past `images`
            return self.images_seen >= images > self.images_seen - tc.batch_size

        try:
            while self.images_seen < tc.images:
                # --- draw a batch ---
                with clock("data"):
                    x0, noise, t = self._batch()

                # --- loss, backward, clip, optimizer step, EMA ---
                with clock("step"):
                    with autocast(self.device, self.precision):
                        losses = rectified_flow_loss(self.train_model, x0, noise, t)
                    loss = losses.mean()
                    if not torch.isfinite(loss):  # a CPU-GPU sync point, once a step: cheap next to the step
                        raise NonFiniteLoss(f"non-finite loss at step {self.step + 1}")
                    self.scaler.scale(loss).backward()  # the scaler is a no-op unless fp16
                    self.scaler.unscale_(self.optimizer)  # so that clipping sees the true gradient norm
                    if tc.grad_clip > 0:
                        torch.nn.utils.clip_grad_norm_(self.model.parameters(), tc.grad_clip, foreach=True)
                    self.scaler.step(self.optimizer)  # skipped when fp16 gradients overflowed
                    self.scaler.update()
                    self.optimizer.zero_grad(set_to_none=True)
                    self.lr_schedule.step()
                    self.ema.step(self.model.parameters())
                    window.add(losses.detach(), t)  # .cpu() waits for the device, so the step's time is honest
                self.step += 1
                self.images_seen += tc.batch_size
                bar.update(tc.batch_size)

                # --- log: the loss overall and per t-bin, the learning rate, throughput ---
                if self.step % tc.log_every_steps == 0:
                    with clock("logging"):
                        metrics = window.metrics(training_seconds())
                        metrics["train/lr"] = self.lr_schedule.get_last_lr()[0]
                        self.tracker.log_metrics(metrics, step=self.images_seen)
                        last_loss = metrics["train/loss"]
                        bar.set_postfix(loss=f"{last_loss:.4f}", img_s=f"{metrics['train/img_per_s']:.0f}")
                        window = LossWindow(training_seconds())

                # --- evaluate (its time is not charged to the wall-clock budget) ---
                if (
                    crossed(tc.eval_every_images)
                    or any(map(reached, tc.eval_at_images))
                    or self.images_seen >= tc.images
                ):
                    with clock("eval"):
                        self.evaluate()
                    last_eval = self.images_seen

                # --- checkpoint ---
                if crossed(tc.checkpoint_every_images) or self.images_seen >= tc.images:
                    with clock("checkpoint"):
                        self.tracker.log_checkpoint(self.save())

                # --- budget ---
                self._check_wall()

            if window.images:
                metrics = window.metrics(training_seconds())
                last_loss = metrics["train/loss"]
                self.tracker.log_metrics(metrics, step=self.images_seen)
            if last_eval != self.images_seen:  # e.g. a rerun of a finished run: evaluate once more
                with clock("eval"):
                    self.evaluate()
        except torch.cuda.OutOfMemoryError:  # the cap set by set_per_process_memory_fraction
            raise OverBudget(
                f"over budget: out of memory under the {tc.vram_cap_gb:g} GB cap at step {self.step + 1}"
            ) from None
        finally:
            bar.close()
        result = TrainResult(
            self.images_seen,
            self.step,
            last_loss,
            self.resumed_from,
            clock.seconds,
            self.peak_memory_gb(),
            self.last_eval,
        )
        self.tracker.log_metrics(
            {
                "train/peak_mem_gb": result.peak_memory_gb,
                "train/overhead_frac": result.overhead_fraction,
                # the run's whole CPU cost, training and evaluation, over every process that worked on it
                "time/cpu_s": self._cpu_spent() + self.eval_cpu_before + self.eval_cpu_seconds,
            },
            step=self.images_seen,
        )
        return result

    def peak_memory_gb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**30
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux: whole process

    # --- sampling ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def ema_weights(self):
        """Inside the block the model holds the EMA weights, in eval mode."""
        self.ema.store(self.model.parameters())
        self.ema.copy_to(self.model.parameters())
        self.model.eval()
        try:
            yield self.model
        finally:
            self.ema.restore(self.model.parameters())
            self.model.train()

    @torch.no_grad()
    def sample(self, noise: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """Decoded images in [-1, 1] from the EMA weights, `sample_steps` Euler steps."""
        with self.ema_weights() as model:
            return generate(model, self.codec, noise, self.cfg.train.sample_steps, self.precision, batch_size)

    def evaluate(self) -> float:
        """Log a grid of samples from the fixed noise, and the evaluator's metrics (each of eval.noise_repeats
        repeats under its own prefix, with its CPU seconds); returns the wall seconds it took."""
        start, cpu_start = time.perf_counter(), time.process_time()
        images = self.sample(self.sample_noise)
        nrow = max(1, int(math.sqrt(len(images))))
        grid = make_grid(images.add(1).div(2), nrow=nrow, padding=1)
        array = (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        self.tracker.log_image(array, key=SAMPLES_KEY, step=self.images_seen)
        metrics, logged = {}, {}
        if self.evaluator is not None:  # one swap to the EMA weights for all N samples
            with self.ema_weights() as model:
                steps, precision = self.cfg.train.sample_steps, self.precision
                for repeat in range(self.cfg.eval.noise_repeats):
                    repeat_cpu_start, prefix = time.process_time(), eval_prefix(repeat)
                    scores = self.evaluator.evaluate(
                        lambda noise: generate(model, self.codec, noise, steps, precision, len(noise)),
                        self.cfg.train.batch_size,
                        prefix=prefix,
                        repeat=repeat,
                    )
                    logged.update(scores, **{f"{prefix}cpu_s": time.process_time() - repeat_cpu_start})
                    metrics = metrics or scores  # the result is repeat 0's, the protocol's own noise
        elapsed = time.perf_counter() - start
        self.eval_seconds += elapsed
        self.eval_cpu_seconds += time.process_time() - cpu_start
        self.last_eval = metrics
        # the training cost up to this evaluation: what a run of this many images would have paid
        logged.update(
            {"eval/seconds": elapsed, "time/train_s": self._wall_spent(), "time/train_cpu_s": self._cpu_spent()}
        )
        self.tracker.log_metrics(logged, step=self.images_seen)
        return elapsed

    def export_ema(self, directory: Path) -> Path:
        """The EMA weights as a LiquidUNet folder (safetensors + config.json)."""
        with self.ema_weights() as model:
            model.save_pretrained(directory)
        return Path(directory)
