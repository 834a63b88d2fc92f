"""Factorial designs and sequential seeds end to end at cpu-smoke size: generated arms, bad design files,
rounds of seeds until decided, a kill and a rerun, workers, and the report's decisions."""

import os
import signal
import subprocess
import sys
import time

import pytest
import yaml
from helpers import assert_clean_error, study_env, trial_runs, wait_for

from study.designs import load_design

SMOKE = ("--budget", "cpu-smoke", "--no-progress")


@pytest.fixture
def here(tmp_path, monkeypatch, run_here):
    """study/run.py in this process, from a fresh folder with its own stores."""
    monkeypatch.chdir(tmp_path)
    env = study_env(tmp_path)
    return lambda *args: run_here(env, *args, *SMOKE, "--out", str(tmp_path / "outputs")), env


def seeds_by_arm(env, experiment="liquid-diffusion") -> dict[str, list[int]]:
    out = {}
    for run in trial_runs(env, experiment):
        if run.info.status == "FINISHED":
            out.setdefault(run.data.tags["ablation"], []).append(int(run.data.tags["seed"]))
    return {arm: sorted(seeds) for arm, seeds in out.items()}


def test_a_design_generates_one_named_arm_per_combination_reference_first():
    design = load_design("three_ideas")
    arms = design.arms()
    assert len(arms) == 8 and len({a.name for a in arms}) == 8
    assert arms[0].name == "mixer-cfc.relax-temb.kernels-k357" == design.reference_arm
    assert arms[-1].overrides == {"model.mixer": "conv", "model.relax": "none", "model.kernels": [3]}
    assert arms[-1].tags["factor.relax"] == "none" and arms[-1].tags["design"] == "three_ideas"
    half = load_design("three_ideas_half").arms()
    assert [a.name for a in half] == [
        "mixer-cfc.relax-temb.kernels-k357",
        "mixer-cfc.relax-none.kernels-k3",
        "mixer-conv.relax-temb.kernels-k3",
        "mixer-conv.relax-none.kernels-k357",
    ]


def test_dry_run_of_a_design_prints_every_generated_arm(here):
    run, _ = here
    result = run("--design", "three_ideas", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("# arm: mixer-") == 8 and "kernels: [3]" in result.stdout


@pytest.mark.parametrize(
    ("design", "args", "fragments"),
    [
        pytest.param(None, ("--design", "nope"), ("unknown design 'nope'", "three_ideas"), id="unknown"),
        pytest.param(
            {"factors": {"mixer": {"a": {"model.mixer": "cfc"}}}}, (), ("exactly two levels",), id="one-level"
        ),
        pytest.param(
            {"factors": {"mixer": {"a b": {"model.mixer": "cfc"}, "c": {"model.mixer": "conv"}}}},
            (),
            ("'a b'",),
            id="level",
        ),
        pytest.param(
            {"factors": {"mixer": {"a": {"model.mixr": "cfc"}, "b": {"model.mixer": "conv"}}}}, (), ("mixr",), id="key"
        ),
        pytest.param(
            {
                "factors": {"mixer": {"a": {"model.mixer": "cfc"}, "b": {"model.mixer": "conv"}}},
                "fraction": {"mixer": ["x", "y"]},
            },
            (),
            ("fraction",),
            id="fraction",
        ),
        pytest.param(None, ("--design", "three_ideas", "--ablation", "baseline"), ("pass one of them",), id="both"),
        pytest.param(None, ("--design", "three_ideas", "--until-decided", "--seeds", "1"), ("--seeds 1",), id="seeds"),
        pytest.param(None, ("--design", "three_ideas", "--margin", "0%"), ("--margin", "0%", "5%"), id="margin"),
        pytest.param(None, ("--ablation", "no_relax", "--until-decided"), ("'baseline'",), id="no-baseline"),
    ],
)
def test_bad_designs_and_settings_exit_2_with_one_line_before_anything_trains(here, tmp_path, design, args, fragments):
    run, _ = here
    if design is not None:
        path = tmp_path / "mine.yaml"
        path.write_text(yaml.safe_dump({"description": "mine", **design}))
        args = ("--design", str(path), *args)
    assert_clean_error(run(*args), *fragments)
    assert not (tmp_path / "outputs").exists()


def test_seeds_until_decided_adds_seeds_only_where_undecided_and_a_rerun_trains_nothing_again(here):
    run, env = here
    args = ("--ablation", "baseline,no_relax,mix_3", "--until-decided", "--seeds", "2", "--max-seeds", "3")
    result = run(*args)
    assert result.returncode == 0, result.stderr
    assert "=== round 1: 2 seeds for baseline, no_relax, mix_3" in result.stdout
    assert "stopped after round" in result.stdout
    trained = seeds_by_arm(env)
    assert trained["baseline"] == [0, 1, 2]  # the baseline follows the arm with the most seeds
    undecided_after_round_1 = [
        line for line in result.stdout.split("=== round 2")[0].splitlines() if "undecided" in line
    ]
    for arm in ("no_relax", "mix_3"):
        grew = any(line.strip().startswith(f"{arm} vs") for line in undecided_after_round_1)
        assert trained[arm] == ([0, 1, 2] if grew else [0, 1])
    tags = trial_runs(env, "liquid-diffusion")[0].data.tags
    assert tags["decision.interval"] == "anytime" and tags["decision.margin"] == "5%"

    again = run(*args)  # replays the rounds from MLflow: nothing is trained twice
    assert again.returncode == 0 and "COMPLETE: MLflow run" not in again.stdout
    assert seeds_by_arm(env) == trained


def test_a_factorial_study_reports_effects_interactions_and_decisions(here, tmp_path):
    run, env = here
    result = run("--design", "three_ideas", "--seeds", "1", "--margin", "2")  # 8 runs: 7 effects, 1 df left
    assert result.returncode == 0, result.stderr
    assert len(seeds_by_arm(env)) == 8
    from reports.build import cli as build

    os.environ["MLFLOW_TRACKING_URI"] = env["MLFLOW_TRACKING_URI"]
    assert build(["--out", str(tmp_path / "report")]) == 0
    html = (tmp_path / "report" / "report.html").read_text()
    assert "Decisions: mnist, design three_ideas" in html and "fixed-n t intervals" in html
    assert "mixer: conv vs cfc" in html and "relax x kernels" in html and "Equivalence margin ±2 (2," in html
    assert "Interactions, design three_ideas" in html
    assert "compare with" not in html  # design arms are compared within the design, never with a missing baseline
    assert "Every run belongs to a factorial design" in html and "Train it with" not in html


@pytest.mark.slow  # real processes: two workers, a SIGTERM mid-round and a rerun (about 2 minutes here)
def test_a_sequential_factorial_killed_mid_round_resumes_on_rerun_and_trains_each_seed_once(repo, tmp_path):
    env = study_env(tmp_path)
    args = [
        sys.executable,
        str(repo / "study" / "run.py"),
        "--design",
        "three_ideas_half",
        "--until-decided",
        "--seeds",
        "2",
        "--max-seeds",
        "3",
        *SMOKE,
    ]
    args += ["--out", str(tmp_path / "outputs"), "--workers", "2"]
    first = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # kill it once round 1 has finished some runs but not all
    assert wait_for(lambda: 2 <= len(seeds_by_arm_flat(env)) < 8 or first.poll() is not None, timeout=300, poll=0.5)
    assert first.poll() is None, "round 1 finished before it could be killed"
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=120) == 130
    done_before = len(seeds_by_arm_flat(env))

    started = time.perf_counter()
    second = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "stopped after round" in second.stdout, second.stdout[-2000:]
    pairs = seeds_by_arm_flat(env)
    assert len(pairs) == len(set(pairs))  # no (arm, seed) trained twice
    per_arm = {}
    for arm, seed in pairs:
        per_arm.setdefault(arm, []).append(seed)
    counts = {len(seeds) for seeds in per_arm.values()}
    assert len(per_arm) == 4 and len(counts) == 1  # a factorial adds whole seeds
    assert sorted(per_arm.popitem()[1]) == list(range(counts.pop()))
    assert done_before >= 2 and time.perf_counter() - started < 600


def seeds_by_arm_flat(env) -> list[tuple[str, int]]:
    return [(arm, seed) for arm, seeds in seeds_by_arm(env).items() for seed in seeds]
