"""The evaluation protocol: digit-space FD/KID checked against scipy, Inception weights checked, caches, eval.py."""

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import scipy.linalg
import torch
import yaml
from helpers import assert_clean_error, run_script, run_study, study_env, trial_runs
from mlflow.tracking import MlflowClient
from PIL import Image

from liquid_diffusion import LiquidUNet
from liquid_diffusion.codecs import PixelCodec
from liquid_diffusion.config import ConfigError, ExperimentConfig
from liquid_diffusion.data import open_source
from liquid_diffusion.digits import DigitFeatures, classifier_path
from liquid_diffusion.evaluate import Evaluator, to_uint8
from liquid_diffusion.inception import INCEPTION_SHA256, WeightsError, resolve_inception_weights
from liquid_diffusion.train import generate


def mnist_evaluator(cache_dir, **overrides) -> Evaluator:
    cfg = ExperimentConfig().with_overrides({"data.resolution": 12, **{f"eval.{k}": v for k, v in overrides.items()}})
    return Evaluator(cfg, open_source(cfg.data), PixelCodec(), cache_dir=cache_dir)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """One cache for the module, so the digit classifier is trained once."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def digits(cache_dir):
    """An evaluator with N = N_ref = 300 and its reference images."""
    evaluator = mnist_evaluator(cache_dir, n=300)
    return evaluator, evaluator.reference.images


def frechet(a: np.ndarray, b: np.ndarray) -> float:
    """Textbook Fréchet distance between Gaussians fitted to two feature sets, with scipy's sqrtm."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(cov_a @ cov_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * covmean))


def test_a_set_against_itself_is_near_zero_and_a_shifted_set_is_far(digits):
    evaluator, reference = digits
    same = evaluator.score(reference)
    shifted = evaluator.score(to_uint8((reference.float() / 127.5 - 1 + 0.6).clamp(-1, 1)))
    assert abs(same["eval/fd_digits"]) < 1e-6
    # KID's unbiased estimator is not exactly 0 for one set against itself, but tiny next to a real difference
    assert shifted["eval/fd_digits"] > 10 and abs(same["eval/kid_digits"]) < 0.05 * shifted["eval/kid_digits"]


def test_fd_digits_equals_an_independent_scipy_frechet_distance(digits, tmp_path):
    evaluator, reference = digits
    generated = to_uint8(torch.cat(list(evaluator.source.draw(300, seed=99).batches(100))))
    extractor = DigitFeatures("liquid-digits", ["features"], str(classifier_path(12, evaluator.cache_dir)))
    with torch.no_grad():
        [ours], [theirs] = extractor(generated), extractor(reference)
    expected = frechet(ours.double().numpy(), theirs.double().numpy())
    assert evaluator.score(generated)["eval/fd_digits"] == pytest.approx(expected, rel=1e-4)
    assert expected > 0.1  # two different draws of MNIST: small, but not zero


def test_digit_scores_and_protocol_are_logged_with_every_value(digits):
    evaluator, reference = digits
    scores = evaluator.score(reference)
    assert scores["eval/confident_frac"] > 0.9 and scores["eval/class_entropy"] > 2.2  # real digits, all classes
    assert (scores["eval/n"], scores["eval/n_ref"], scores["eval/sample_steps"]) == (300, 300, 25)


def test_kid_with_n_below_the_subset_size_adapts_and_logs_the_size(cache_dir):
    evaluator = mnist_evaluator(cache_dir, n=20, n_ref=50, kid_subset_size=1000)
    images = to_uint8(torch.cat(list(evaluator.source.draw(20, seed=5).batches(20))))
    scores = evaluator.score(images)
    assert scores["eval/kid_subset_size"] == 20 and np.isfinite(scores["eval/kid_digits"])


def test_generated_samples_depend_on_the_sample_index_only(cache_dir):
    evaluator = mnist_evaluator(cache_dir, n=10)
    identity = lambda noise: noise.clamp(-1, 1)  # noqa: E731
    ten = evaluator.generate(identity, batch_size=3)
    assert torch.equal(ten, evaluator.generate(identity, batch_size=10))
    evaluator.n = 4
    assert torch.equal(evaluator.generate(identity, batch_size=4), ten[:4])


def test_digit_metrics_are_refused_for_other_datasets(tmp_path):
    with pytest.raises(ConfigError, match="need dataset mnist"):
        ExperimentConfig().with_overrides({"data.dataset": str(tmp_path), "eval.metrics": ["fd_digits"]})
    with pytest.raises(ConfigError, match="objective=fid is not among"):
        ExperimentConfig().with_overrides({"eval.objective": "fid"})


# --- Inception weights ------------------------------------------------------------------------


def test_unverified_weights_are_refused_unless_allowed(random_inception_weights, monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(WeightsError, match="--allow-unverified-weights"):
        resolve_inception_weights(random_inception_weights)
    weights = resolve_inception_weights(random_inception_weights, allow_unverified=True)
    assert weights.tag == "unverified"
    with pytest.raises(WeightsError, match="not a file"):
        resolve_inception_weights(tmp_path / "missing.pth", allow_unverified=True)
    unsafe = tmp_path / "unsafe.pth"
    torch.save({"weights": torch.zeros(1), "extra": Image.new("L", (1, 1))}, unsafe)  # a pickle of an arbitrary object
    with pytest.raises(WeightsError, match="safely"):
        resolve_inception_weights(unsafe, allow_unverified=True)


def test_the_environment_variable_and_the_hub_cache_are_searched(random_inception_weights, monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("LIQUID_DIFFUSION_INCEPTION_WEIGHTS", str(random_inception_weights))
    assert resolve_inception_weights(allow_unverified=True).path == random_inception_weights
    monkeypatch.delenv("LIQUID_DIFFUSION_INCEPTION_WEIGHTS")
    monkeypatch.setattr("liquid_diffusion.inception.reachable", lambda url: False)
    with pytest.raises(WeightsError, match="--inception-weights PATH"):
        resolve_inception_weights()
    cached = tmp_path / "hub" / "checkpoints" / "weights-inception-2015-12-05-6726825d.pth"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(random_inception_weights.read_bytes())
    with pytest.raises(WeightsError, match="SHA-256"):  # a cached file is checked too
        resolve_inception_weights()
    assert INCEPTION_SHA256.startswith("6726825d")  # torch.hub's convention: the name carries the hash prefix


def test_a_file_with_the_standard_hash_is_verified_and_found_flag_first_then_env_then_hub_cache(
    random_inception_weights, monkeypatch, tmp_path
):
    """The verified branch, with the expected SHA-256 patched to a random-weight file's: the real file
    cannot be downloaded here. Three copies tell the places apart."""
    from liquid_diffusion import inception
    from liquid_diffusion.evaluate import objective_key

    monkeypatch.setattr(inception, "INCEPTION_SHA256", inception.sha256_of(random_inception_weights))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr("liquid_diffusion.inception.reachable", lambda url: False)
    flag, env = tmp_path / "flag.pth", tmp_path / "env.pth"
    hub = tmp_path / "hub" / "checkpoints" / inception.INCEPTION_FILE
    hub.parent.mkdir(parents=True)
    for copy in (flag, env, hub):
        copy.write_bytes(random_inception_weights.read_bytes())
    monkeypatch.setenv(inception.WEIGHTS_ENV, str(env))

    assert resolve_inception_weights(flag).path == flag  # --inception-weights first
    assert resolve_inception_weights().path == env  # then the environment variable
    monkeypatch.delenv(inception.WEIGHTS_ENV)
    weights = resolve_inception_weights()  # then torch.hub's cache
    assert weights.path == hub and weights.verified and weights.tag == "verified"
    fid = ExperimentConfig().with_overrides({"data.dataset": "afhq", "eval.metrics": ["fid"], "eval.objective": "fid"})
    assert objective_key(fid, weights) == "eval/fid"  # the name FID only with verified weights
    monkeypatch.setattr(inception, "INCEPTION_SHA256", INCEPTION_SHA256)  # the real hash: the same file is not it
    assert objective_key(fid, resolve_inception_weights(flag, allow_unverified=True)) == "eval/fid_unverified"


def write_folder(root, seed: int, count: int = 8):
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(root / f"{i}.png")


def test_inception_metrics_are_tagged_unverified_and_the_reference_cache_hits_until_the_data_changes(
    random_inception_weights, tmp_path
):
    folder = tmp_path / "images"
    write_folder(folder, seed=0)
    weights = resolve_inception_weights(random_inception_weights, allow_unverified=True)
    cfg = ExperimentConfig().with_overrides(
        {
            "data.dataset": str(folder),
            "data.channels": 3,
            "data.resolution": 8,
            "eval.n": 6,
            "eval.n_ref": 6,
            "eval.metrics": ["fid", "kid"],
            "eval.objective": "fid",
        }
    )

    def evaluator():
        return Evaluator(cfg, open_source(cfg.data), PixelCodec(), weights, cache_dir=tmp_path / "cache")

    images = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8)
    first = evaluator()
    scores = first.score(images)
    assert first.reference.built and set(scores) >= {"eval/fid_unverified", "eval/kid_unverified"}
    assert not any(key in scores for key in ("eval/fid", "eval/kid"))
    assert first.objective_key == "eval/fid_unverified" and first.tags["weights"] == "unverified"

    second = evaluator()
    assert second.score(images)["eval/fid_unverified"] == scores["eval/fid_unverified"]
    assert not second.reference.built  # statistics and features came from torch-fidelity's cache

    write_folder(folder, seed=1)  # same names, new content
    third = evaluator()
    third.score(images)
    assert third.reference.built and third.reference_name != first.reference_name


# --- study/eval.py ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One cpu-smoke run trained by study/run.py: (run id, environment, client)."""
    root = tmp_path_factory.mktemp("evalpy")
    env = study_env(root, TORCH_HOME=str(root / "torch"))  # the shared cache: its 8 px classifier is built
    env.pop("LIQUID_DIFFUSION_INCEPTION_WEIGHTS", None)
    result = run_study(
        env, "--ablation", "baseline", "--budget", "cpu-smoke", "--out", str(root / "out"), "--no-progress"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    [run] = trial_runs(env, "liquid-diffusion")
    return run.info.run_id, env, MlflowClient(env["MLFLOW_TRACKING_URI"])


def eval_cli(client, capsys, *args) -> tuple[int, str]:
    """study/eval.py's command line, in this process: (exit code, stderr)."""
    import mlflow

    from study.eval import cli

    mlflow.set_tracking_uri(client.tracking_uri)
    code = cli(list(args))
    return code, capsys.readouterr().err


def eval_history(client, run_id) -> dict:
    keys = [key for key in client.get_run(run_id).data.metrics if key.startswith("eval/")]
    return {key: [(m.step, m.value) for m in client.get_metric_history(run_id, key)] for key in keys}


def test_eval_py_logs_a_larger_n_into_the_same_run(finished_run, tmp_path):
    run_id, env, client = finished_run
    training_time = eval_history(client, run_id)
    result = run_script("study/eval.py", env, "--run-id", run_id, "--n", "40", "--no-progress")
    assert result.returncode == 0, result.stderr[-3000:]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["eval_n40/n"] == 40
    [point] = client.get_metric_history(run_id, "eval_n40/fd_digits")
    assert point.step == 96  # where training ended
    assert run.data.tags["eval_n40/reference_set"].startswith("ref-mnist-8px-images-n32-")
    assert eval_history(client, run_id) == training_time and "eval/fd_digits" in training_time

    # The same number from the run's saved EMA weights, evaluated here directly.
    cfg = ExperimentConfig.from_dict(
        yaml.safe_load(Path(client.download_artifacts(run_id, "config.yaml", str(tmp_path))).read_text())
    )
    model = LiquidUNet.from_pretrained(client.download_artifacts(run_id, "ema", str(tmp_path))).eval()
    codec = PixelCodec()
    evaluator = Evaluator(
        cfg, open_source(cfg.data), codec, cache_dir=Path(env["LIQUID_DIFFUSION_CACHE"]), progress=False, n=40
    )
    direct = evaluator.evaluate(
        lambda noise: generate(model, codec, noise, cfg.train.sample_steps, "fp32", len(noise)),
        cfg.train.batch_size,
    )
    assert point.value == pytest.approx(direct["eval/fd_digits"], rel=1e-5)


def test_eval_py_with_unverified_weights_refuses_then_tags(finished_run, random_inception_weights, capsys, monkeypatch):
    run_id, env, client = finished_run
    monkeypatch.setenv("LIQUID_DIFFUSION_CACHE", env["LIQUID_DIFFUSION_CACHE"])
    args = [
        "--run-id",
        run_id,
        "--n",
        "10",
        "--metric",
        "fid,precision",
        "--no-progress",
        "--inception-weights",
        str(random_inception_weights),
    ]
    code, stderr = eval_cli(client, capsys, *args)
    assert code == 2 and "--allow-unverified-weights" in stderr
    code, stderr = eval_cli(client, capsys, *args, "--allow-unverified-weights")
    assert code == 0, stderr[-3000:]
    run = client.get_run(run_id)
    assert run.data.tags["weights"] == "unverified"
    assert "eval_n10/fid_unverified" in run.data.metrics and "eval_n10/fid" not in run.data.metrics


@pytest.mark.parametrize(
    "args, expected",
    [  # RUN stands for the finished run's id, BARE for a run that never finished training
        pytest.param(["--run-id", "0" * 32], "unknown MLflow run id", id="unknown run"),
        pytest.param(["--run-id", "RUN", "--metric", "fid"], "--inception-weights PATH", id="no weights file"),
        pytest.param(["--run-id", "BARE"], "no saved EMA weights", id="no ema"),
        pytest.param(["--run-id", "RUN", "--metric", "fd_digits,fidd"], "unknown metric fidd", id="bad metric"),
        pytest.param(["--run-id", "RUN", "--n", "1"], "expected an integer >= 2", id="n of 1"),
    ],
)
def test_eval_py_bad_input_exits_2_with_one_line(finished_run, args, expected, tmp_path, capsys, monkeypatch):
    run_id, env, client = finished_run
    monkeypatch.setenv("TORCH_HOME", env["TORCH_HOME"])
    monkeypatch.delenv("LIQUID_DIFFUSION_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setattr("liquid_diffusion.inception.reachable", lambda url: False)  # as offline, without the wait
    if "BARE" in args:  # a run that never finished training: it has a config but no EMA weights
        bare = client.create_run(client.get_experiment_by_name("liquid-diffusion").experiment_id)
        client.log_artifact(bare.info.run_id, client.download_artifacts(run_id, "config.yaml", str(tmp_path)))
        run_id = bare.info.run_id
    args = [run_id if arg in ("RUN", "BARE") else arg for arg in args]
    code, stderr = eval_cli(client, capsys, *args)
    assert_clean_error(SimpleNamespace(returncode=code, stderr=stderr), expected)
