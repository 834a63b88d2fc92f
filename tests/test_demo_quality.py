"""The quality bar of the default demo: `python study/run.py --ablation no_relax` makes recognisable digits.

Slow (the whole cpu-demo budget: 7-13 minutes on a 2-core Xeon, about 37 on a 2-core AVX2 EPYC): run with
`pytest -m slow`.
"""

import os
import subprocess
import sys
import time

import pytest
import torch
from mlflow.tracking import MlflowClient

from liquid_diffusion import LiquidUNet
from liquid_diffusion.digits import load_classifier, score_digits
from liquid_diffusion.flow import euler_sample


@pytest.mark.slow
def test_default_demo_samples_are_recognisable_digits(repo, tmp_path):
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "LIQUID_DIFFUSION_CACHE": str(tmp_path / "cache"),
        "OMP_NUM_THREADS": "2",  # the two cores a user's demo gets, even when this test runs in a pytest -n worker
    }
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "study/run.py", "--ablation", "no_relax", "--out", str(tmp_path / "out"), "--no-progress"],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=3600,  # the AVX2 EPYC needs about 37 minutes; cpu-demo's own wall cap is 60
    )
    minutes = (time.perf_counter() - start) / 60
    assert result.returncode == 0, result.stderr[-3000:]

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    [run] = client.search_runs([client.get_experiment_by_name("liquid-diffusion").experiment_id], "tags.kind = 'trial'")
    model = LiquidUNet.from_pretrained(client.download_artifacts(run.info.run_id, "ema", str(tmp_path))).eval()
    size = model.model_config.resolution
    noise = torch.randn(256, 1, size, size, generator=torch.Generator().manual_seed(0))
    samples = euler_sample(model, noise, 25).clamp(-1, 1)
    classifier, accuracy = load_classifier(size, tmp_path / "cache")
    score = score_digits(classifier, samples)
    logged = run.data.metrics
    evals = client.get_metric_history(run.info.run_id, "eval/seconds")
    print(
        f"\ndemo: {minutes:.1f} min wall; classifier held-out accuracy {accuracy:.3f}; "
        f"{score.confident_frac:.1%} of 256 samples confident >= 0.9; {score.classes_present} classes; "
        f"class entropy {score.class_entropy:.3f} (ln 10 = 2.303)\n"
        f"logged protocol (N={logged['eval/n']:.0f}): fd_digits {logged['eval/fd_digits']:.2f}, kid_digits "
        f"{logged['eval/kid_digits']:.4f}, confident_frac {logged['eval/confident_frac']:.3f}, class_entropy "
        f"{logged['eval/class_entropy']:.3f}; evals took {[round(m.value, 1) for m in evals]} s at steps "
        f"{[m.step for m in evals]}"
    )
    assert accuracy >= 0.97
    assert score.confident_frac >= 0.70
    assert score.classes_present == 10
    assert logged["eval/confident_frac"] >= 0.70
    # Evaluation must stay a small part of the run. A bound in seconds fails on a slower CPU for reasons of the
    # CPU, so it is a share of the training time logged beside it: about 10% measured (41 s of a 7.7-minute run).
    train_seconds = client.get_metric_history(run.info.run_id, "time/train_s")[-1].value
    assert sum(m.value for m in evals) <= 0.15 * train_seconds
    # Confident classes alone can come from noise, so the bar also needs the right mix and the right
    # distribution. Measured: class_entropy 2.290 of ln 10 = 2.303; all mass on 8 classes at most
    # gives ln 8 = 2.08, so 2.15 asks for nine or ten classes in near-even shares. fd_digits was 1.71;
    # five seeds at 40,000 images spread by 25% of their mean, and those runs sit at 7-13, so a ceiling
    # of 3.0 leaves three such spreads of margin and still fails a demo trained a third as long.
    assert logged["eval/class_entropy"] >= 2.15
    assert logged["eval/fd_digits"] <= 3.0
