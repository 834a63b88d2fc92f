import json
import time

import pytest
import torch

from liquid_diffusion import LiquidUNet
from liquid_diffusion.codecs import PixelCodec
from liquid_diffusion.config import ExperimentConfig
from liquid_diffusion.train import NonFiniteLoss, OverBudget, Trainer


def smoke_config(**train) -> ExperimentConfig:
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


def latents(n=64):
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(7)).clamp(-1, 1)


class Recorder:
    def __init__(self, stop_at=None):
        self.losses, self.images, self.stop_at = {}, [], stop_at

    def log_metrics(self, metrics, step):
        if "train/loss" in metrics:
            self.losses[step] = metrics["train/loss"]
            if step == self.stop_at:
                raise KeyboardInterrupt("simulated kill")

    def log_image(self, image, key, step):
        self.images.append((key, step, image.shape))


class MetricRecorder(Recorder):
    def __init__(self):
        super().__init__()
        self.logged = []

    def log_metrics(self, metrics, step):
        self.logged.append((step, metrics))


def test_resumed_run_matches_an_uninterrupted_one(tmp_path):
    cfg = smoke_config()
    whole = Recorder()
    Trainer(cfg, latents(), PixelCodec(), tmp_path / "whole", whole, device="cpu", progress=False).run()

    killed = Recorder(stop_at=80)  # after the checkpoint at 64 images
    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg, latents(), PixelCodec(), tmp_path / "resumed", killed, device="cpu", progress=False).run()
    resumed = Recorder()
    trainer = Trainer(cfg, latents(), PixelCodec(), tmp_path / "resumed", resumed, device="cpu", progress=False)
    assert trainer.resumed_from == 64
    trainer.run()

    assert sorted(resumed.losses) == [80, 96]
    for step in (80, 96):
        assert resumed.losses[step] == pytest.approx(whole.losses[step], rel=1e-6, abs=1e-6)
    ema_whole = Trainer(
        cfg, latents(), PixelCodec(), tmp_path / "whole", device="cpu", progress=False
    ).ema.shadow_params
    ema_resumed = trainer.ema.shadow_params
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(ema_whole, ema_resumed))


def test_checkpoints_are_safetensors_and_json_only(tmp_path):
    Trainer(smoke_config(), latents(), PixelCodec(), tmp_path, device="cpu", progress=False).run()
    folders = sorted((tmp_path / "checkpoints").iterdir())
    assert len(folders) == 2 and folders[-1].name == "checkpoint-000000000096"  # older ones pruned
    assert sorted(p.name for p in folders[-1].iterdir()) == ["state.json", "tensors.safetensors"]
    state = json.loads((folders[-1] / "state.json").read_text())
    assert state["images_seen"] == 96 and state["step"] == 6


def test_samples_are_logged_at_every_eval_with_images_seen_as_step(tmp_path):
    recorder = Recorder()
    Trainer(smoke_config(), latents(), PixelCodec(), tmp_path, recorder, device="cpu", progress=False).run()
    assert [(key, step) for key, step, _ in recorder.images] == [("samples", 48), ("samples", 96)]
    assert recorder.images[0][2] == (2 * 9 + 1, 2 * 9 + 1, 3)  # 2x2 grid of 8x8 with 1-pixel padding


def test_exported_ema_weights_load_as_a_liquid_unet(tmp_path):
    trainer = Trainer(smoke_config(), latents(), PixelCodec(), tmp_path, device="cpu", progress=False)
    trainer.run()
    model = LiquidUNet.from_pretrained(trainer.export_ema(tmp_path / "ema"))
    for p, shadow in zip(model.parameters(), trainer.ema.shadow_params):
        assert torch.equal(p, shadow)


def test_seeded_runs_are_identical_and_seeds_differ(tmp_path):
    a, b, c = Recorder(), Recorder(), Recorder()
    Trainer(smoke_config(images=32), latents(), PixelCodec(), tmp_path / "a", a, device="cpu", progress=False).run()
    Trainer(smoke_config(images=32), latents(), PixelCodec(), tmp_path / "b", b, device="cpu", progress=False).run()
    Trainer(
        smoke_config(images=32, seed=1), latents(), PixelCodec(), tmp_path / "c", c, device="cpu", progress=False
    ).run()
    assert a.losses == b.losses and a.losses != c.losses


def test_non_finite_loss_stops_with_the_step(tmp_path):
    bad = latents()
    bad[:] = float("nan")
    with pytest.raises(NonFiniteLoss, match="non-finite loss at step 1"):
        Trainer(smoke_config(), bad, PixelCodec(), tmp_path, device="cpu", progress=False).run()


def test_wall_clock_cap_ends_the_run_over_budget(tmp_path):
    with pytest.raises(OverBudget, match="over budget"):
        Trainer(
            smoke_config(max_wall_minutes=1e-6), latents(), PixelCodec(), tmp_path, device="cpu", progress=False
        ).run()


class SlowEvaluator:
    """Stands in for liquid_diffusion.evaluate.Evaluator: takes its time, samples through the trainer."""

    def __init__(self, seconds):
        self.seconds = seconds

    def evaluate(self, sample, batch_size):
        time.sleep(self.seconds)
        return {"eval/mean": float(sample(torch.randn(2, 1, 8, 8)).mean())}


def test_evaluation_is_logged_but_not_charged_to_the_wall_clock_cap(tmp_path):
    recorder = MetricRecorder()
    cfg = smoke_config(max_wall_minutes=0.05)  # 3 s; the two evaluations alone take 4 s
    result = Trainer(
        cfg, latents(), PixelCodec(), tmp_path, recorder, device="cpu", progress=False, evaluator=SlowEvaluator(2.0)
    ).run()
    assert result.images_seen == 96 and result.seconds["eval"] >= 4.0
    assert [step for step, metrics in recorder.logged if "eval/mean" in metrics] == [48, 96]


def test_cosine_schedule_warms_up_then_decays_to_zero(tmp_path):
    lrs = {}

    class LrRecorder(Recorder):
        def log_metrics(self, metrics, step):
            if "train/lr" in metrics:
                lrs[step] = metrics["train/lr"]

    cfg = smoke_config(lr_schedule="cosine")
    Trainer(cfg, latents(), PixelCodec(), tmp_path, LrRecorder(), device="cpu", progress=False).run()
    values = [lrs[s] for s in sorted(lrs)]
    assert values[0] == pytest.approx(0.5e-3)  # step 1 of 2 warmup steps
    assert values[1] == pytest.approx(1e-3) and values[-1] == pytest.approx(0.0, abs=1e-12)
    assert values[1:] == sorted(values[1:], reverse=True)


def test_compiled_training_matches_eager_training(tmp_path):
    eager, compiled = Recorder(), Recorder()
    cfg = smoke_config(images=48)
    Trainer(cfg, latents(), PixelCodec(), tmp_path / "eager", eager, device="cpu", progress=False).run()
    trainer = Trainer(
        cfg, latents(), PixelCodec(), tmp_path / "compiled", compiled, device="cpu", progress=False, compile=True
    )
    assert hasattr(trainer.train_model, "_orig_mod")  # the forward really goes through torch.compile
    trainer.run()
    assert sorted(compiled.losses) == sorted(eager.losses)
    for step, loss in eager.losses.items():
        assert compiled.losses[step] == pytest.approx(loss, rel=1e-4)
    # checkpoints hold the plain model's names, so an eager run resumes a compiled one
    assert Trainer(cfg, latents(), PixelCodec(), tmp_path / "compiled", device="cpu", progress=False).resumed_from == 48


def test_one_seed_gives_every_arm_the_same_batches_t_draws_and_sample_noise(tmp_path):
    """The paired design the report relies on: only the model differs between two arms' runs of one seed."""
    from study.arms import OverrideSet, load_arms

    def draws(arm):
        trainer = Trainer(
            arm.apply(smoke_config(seed=3)), latents(), PixelCodec(), tmp_path / arm.name, device="cpu", progress=False
        )
        batches = [trainer._batch() for _ in range(3)]
        return batches, trainer.sample_noise

    arms = load_arms()
    reference, reference_noise = draws(arms["baseline"])
    for name, arm in arms.items():
        batches, noise = draws(arm)
        assert torch.equal(noise, reference_noise), name
        for (x0, eps, t), (x0_ref, eps_ref, t_ref) in zip(batches, reference):
            assert torch.equal(x0, x0_ref) and torch.equal(eps, eps_ref), name
            assert torch.equal(t, t_ref) or name == "uniform_t", name  # uniform_t changes how t is drawn, by design
    other_seed, _ = draws(OverrideSet("seed4", "", {"train.seed": 4}, "test"))
    assert not torch.equal(other_seed[0][1], reference[0][1])  # and another seed draws differently
