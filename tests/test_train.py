import json
import time

import pytest
import torch
from helpers import Recorder, latents, make_trainer, smoke_config

from liquid_diffusion import LiquidUNet
from liquid_diffusion.config import ConfigError
from liquid_diffusion.train import NonFiniteLoss, OverBudget


class MetricRecorder(Recorder):
    def __init__(self):
        super().__init__()
        self.logged = []

    def log_metrics(self, metrics, step):
        self.logged.append((step, metrics))


def test_resumed_run_matches_an_uninterrupted_one(tmp_path):
    cfg = smoke_config()
    whole = Recorder()
    make_trainer(tmp_path / "whole", cfg, whole).run()

    killed = Recorder(stop_at=80)  # after the checkpoint at 64 images
    with pytest.raises(KeyboardInterrupt):
        make_trainer(tmp_path / "resumed", cfg, killed).run()
    resumed = Recorder()
    trainer = make_trainer(tmp_path / "resumed", cfg, resumed)
    assert trainer.resumed_from == 64
    trainer.run()

    assert sorted(resumed.losses) == [80, 96]
    for step in (80, 96):
        assert resumed.losses[step] == pytest.approx(whole.losses[step], rel=1e-6, abs=1e-6)
    ema_whole = make_trainer(tmp_path / "whole", cfg).ema.shadow_params
    ema_resumed = trainer.ema.shadow_params
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(ema_whole, ema_resumed))


def test_checkpoints_are_safetensors_and_json_only(tmp_path):
    make_trainer(tmp_path).run()
    folders = sorted((tmp_path / "checkpoints").iterdir())
    assert len(folders) == 2 and folders[-1].name == "checkpoint-000000000096"  # older ones pruned
    assert sorted(p.name for p in folders[-1].iterdir()) == ["state.json", "tensors.safetensors"]
    state = json.loads((folders[-1] / "state.json").read_text())
    assert state["images_seen"] == 96 and state["step"] == 6


def test_samples_are_logged_at_every_eval_with_images_seen_as_step(tmp_path):
    recorder = Recorder()
    make_trainer(tmp_path, recorder=recorder).run()
    assert [(key, step) for key, step, _ in recorder.images] == [("samples", 48), ("samples", 96)]
    assert recorder.images[0][2] == (2 * 9 + 1, 2 * 9 + 1, 3)  # 2x2 grid of 8x8 with 1-pixel padding


def test_exported_ema_weights_load_as_a_liquid_unet(tmp_path):
    trainer = make_trainer(tmp_path)
    trainer.run()
    model = LiquidUNet.from_pretrained(trainer.export_ema(tmp_path / "ema"))
    for p, shadow in zip(model.parameters(), trainer.ema.shadow_params):
        assert torch.equal(p, shadow)


def test_seeded_runs_are_identical_and_seeds_differ(tmp_path):
    a, b, c = Recorder(), Recorder(), Recorder()
    make_trainer(tmp_path / "a", smoke_config(images=32), a).run()
    make_trainer(tmp_path / "b", smoke_config(images=32), b).run()
    make_trainer(tmp_path / "c", smoke_config(images=32, seed=1), c).run()
    assert a.losses == b.losses and a.losses != c.losses


def test_non_finite_loss_stops_with_the_step(tmp_path):
    bad = latents()
    bad[:] = float("nan")
    with pytest.raises(NonFiniteLoss, match="non-finite loss at step 1"):
        make_trainer(tmp_path, data=bad).run()


def test_wall_clock_cap_ends_the_run_over_budget(tmp_path):
    with pytest.raises(OverBudget, match="over budget"):
        make_trainer(tmp_path, smoke_config(max_wall_minutes=1e-6)).run()


class SlowEvaluator:
    """Stands in for liquid_diffusion.evaluate.Evaluator: takes its time, samples through the trainer."""

    def __init__(self, seconds):
        self.seconds = seconds

    def evaluate(self, sample, batch_size, prefix="eval/", repeat=0):
        time.sleep(self.seconds)
        return {"eval/mean": float(sample(torch.randn(2, 1, 8, 8)).mean())}


def test_evaluation_is_logged_but_not_charged_to_the_wall_clock_cap(tmp_path):
    recorder = MetricRecorder()
    cfg = smoke_config(max_wall_minutes=0.05)  # 3 s; the two evaluations alone take 4 s
    result = make_trainer(tmp_path, cfg, recorder, evaluator=SlowEvaluator(2.0)).run()
    assert result.images_seen == 96 and result.seconds["eval"] >= 4.0
    assert [step for step, metrics in recorder.logged if "eval/mean" in metrics] == [48, 96]


def test_cosine_schedule_warms_up_then_decays_to_zero(tmp_path):
    lrs = {}

    class LrRecorder(Recorder):
        def log_metrics(self, metrics, step):
            if "train/lr" in metrics:
                lrs[step] = metrics["train/lr"]

    cfg = smoke_config(lr_schedule="cosine")
    make_trainer(tmp_path, cfg, LrRecorder()).run()
    values = [lrs[s] for s in sorted(lrs)]
    assert values[0] == pytest.approx(0.5e-3)  # step 1 of 2 warmup steps
    assert values[1] == pytest.approx(1e-3) and values[-1] == pytest.approx(0.0, abs=1e-12)
    assert values[1:] == sorted(values[1:], reverse=True)


@pytest.mark.slow  # torch.compile builds its C++ kernels first: 6.5 minutes on one core of a fresh machine
def test_compiled_training_matches_eager_training(tmp_path):
    eager, compiled = Recorder(), Recorder()
    cfg = smoke_config(images=48)
    make_trainer(tmp_path / "eager", cfg, eager).run()
    trainer = make_trainer(tmp_path / "compiled", cfg, compiled, compile=True)
    assert hasattr(trainer.train_model, "_orig_mod")  # the forward really goes through torch.compile
    trainer.run()
    assert sorted(compiled.losses) == sorted(eager.losses)
    for step, loss in eager.losses.items():
        assert compiled.losses[step] == pytest.approx(loss, rel=1e-4)
    # checkpoints hold the plain model's names, so an eager run resumes a compiled one
    assert make_trainer(tmp_path / "compiled", cfg).resumed_from == 48


def test_one_seed_gives_every_arm_the_same_batches_t_draws_and_sample_noise(tmp_path):
    """The paired design the report relies on: only the model differs between two arms' runs of one seed."""
    from study.arms import OverrideSet, load_arms

    def draws(arm):
        trainer = make_trainer(tmp_path / arm.name, arm.apply(smoke_config(seed=3)))
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


def test_a_checkpoint_written_under_another_config_is_never_loaded(tmp_path):
    from study.trial import run_dir_for

    make_trainer(tmp_path).run()
    changed = smoke_config(lr=5e-4)
    with pytest.raises(ConfigError, match="written with another config"):
        make_trainer(tmp_path, changed)
    # and the study never points two configs at one folder: its name carries the config's digest
    folders = {run_dir_for(tmp_path, "e", "baseline", cfg, "cpu-smoke") for cfg in (smoke_config(), changed)}
    assert len(folders) == 2


class ImageEvaluator:
    """Stands in for Evaluator: keeps the images the EMA weights make from each repeat's noise, by step."""

    def __init__(self):
        self.images, self.step = {}, 0

    def evaluate(self, sample, batch_size, prefix="eval/", repeat=0):
        from liquid_diffusion.evaluate import noise_for

        images = sample(noise_for(range(4), (1, 8, 8), repeat))
        self.images[(self.step, prefix)] = images
        return {f"{prefix}mean": float(images.mean())}


def _evaluated(tmp_path, cfg):
    evaluator, recorder = ImageEvaluator(), MetricRecorder()
    trainer = make_trainer(tmp_path, cfg, recorder, evaluator=evaluator)
    original = trainer.evaluate

    def evaluate():
        evaluator.step = trainer.images_seen
        return original()

    trainer.evaluate = evaluate
    trainer.run()
    return evaluator.images, recorder


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_an_evaluation_along_a_long_run_is_the_end_of_a_short_one_only_with_a_constant_schedule(tmp_path, schedule):
    """The pilot's premise (study/plan.py): evaluating a 96-image run at 48 images gives what a 48-image run
    ends with, bit for bit, EMA and warmup included. A cosine schedule decays towards its own end, so there
    the two differ: the check can fail, and the pilot refuses such a budget."""
    # one warmup step, so that the cosine's decay has begun by the third step
    short, _ = _evaluated(tmp_path / "short", smoke_config(images=48, warmup_images=16, lr_schedule=schedule))
    cfg = smoke_config(images=96, warmup_images=16, eval_every_images=96, eval_at_images=[48], lr_schedule=schedule)
    long, recorder = _evaluated(tmp_path / "long", cfg)
    assert sorted(step for step, _ in long) == [48, 96]
    same = torch.equal(short[(48, "eval/")], long[(48, "eval/")])
    assert same == (schedule == "constant")
    cpu = [m["time/train_cpu_s"] for _, m in recorder.logged if "time/train_cpu_s" in m]
    assert len(cpu) == 2 and 0 < cpu[0] < cpu[1]  # the training cost up to each evaluation, growing


def test_noise_repeats_evaluate_the_same_weights_with_fresh_noise_under_their_own_prefix(tmp_path):
    one, _ = _evaluated(tmp_path / "one", smoke_config(images=48))
    three, recorder = _evaluated(tmp_path / "three", smoke_config(images=48).with_overrides({"eval.noise_repeats": 3}))
    assert set(three) == {(48, "eval/"), (48, "eval_repeat1/"), (48, "eval_repeat2/")}
    assert torch.equal(one[(48, "eval/")], three[(48, "eval/")])  # repeat 0 is the protocol's own noise
    assert not torch.equal(three[(48, "eval/")], three[(48, "eval_repeat1/")])
    logged = {k for _, m in recorder.logged for k in m}
    assert {"eval/mean", "eval_repeat1/mean", "eval_repeat2/cpu_s", "eval/cpu_s"} <= logged
