"""The README's quick start, as a new user meets it: commands typed in a fresh working folder with MLflow's
default store, each next command taken from what the previous one printed. Then what MLflow's UI and
optuna-dashboard show of those runs.

The only change to the typed commands: `--budget cpu-smoke`, so a run takes seconds, not the demo's minutes.
"""

from __future__ import annotations

import html
import json
import os
import re
import shlex
import subprocess
import sys
import urllib.request

import pandas as pd
import pytest
from helpers import BROWSER, REPO, SHARED_CACHE, free_port, serving, trial_runs
from mlflow import MlflowClient

from liquid_diffusion.data import mnist_file


def typed(folder, command: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """`command` as typed in a shell in `folder`; `python` is this interpreter."""
    words = shlex.split(command)
    if words[0] == "python":
        words[0] = sys.executable
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # MLflow's default store
    env.update(LIQUID_DIFFUSION_CACHE=str(SHARED_CACHE), PYTHONUNBUFFERED="1")
    return subprocess.run(words, cwd=folder, env=env, capture_output=True, text=True, timeout=timeout)


def next_commands(stdout: str) -> dict[str, str]:
    """The commands a training command prints after 'Next:', keyed by program (and script or subcommand)."""
    lines = stdout[stdout.index("\nNext:\n") :].splitlines()[2:]
    commands = [line.strip().split("    # ")[0] for line in lines if line.startswith("  ")]
    return {" ".join(c.split()[: 2 if c.startswith(("python", "mlflow")) else 1]): c for c in commands}


@pytest.fixture(scope="module")
def quick_start(tmp_path_factory):
    """The four commands of the quick start in a fresh folder that holds only `study/` and `reports/` (links
    to this checkout), as a clone's root would: each command's files land where a user's would."""
    folder = tmp_path_factory.mktemp("quick-start")
    for name in ("study", "reports"):
        (folder / name).symlink_to(REPO / name)
    steps = {"train no_relax": typed(folder, "python study/run.py --ablation no_relax --budget cpu-smoke")}
    after_no_relax = next_commands(steps["train no_relax"].stdout)
    steps["report without baseline"] = typed(folder, after_no_relax["python reports/build.py"])
    steps["no-baseline report"] = (folder / "report" / "report.html").read_text()
    steps["train baseline"] = typed(folder, after_no_relax["python study/run.py"])
    steps["report with baseline"] = typed(
        folder, next_commands(steps["train baseline"].stdout)["python reports/build.py"]
    )
    return folder, after_no_relax, steps


def test_training_prints_the_next_steps_as_commands(quick_start):
    folder, commands, steps = quick_start
    assert steps["train no_relax"].returncode == 0, steps["train no_relax"].stderr[-3000:]
    assert commands == {
        "python study/run.py": "python study/run.py --ablation baseline --budget cpu-smoke",
        "python reports/build.py": "python reports/build.py",
        "mlflow ui": "mlflow ui --backend-store-uri sqlite:///mlflow.db",  # in the working folder, as typed
        "optuna-dashboard": "optuna-dashboard sqlite:///optuna.db",
    }
    # once the baseline has a finished run, the next steps no longer ask for it
    assert "python study/run.py" not in next_commands(steps["train baseline"].stdout)


def test_the_report_without_a_baseline_succeeds_and_says_how_to_get_one(quick_start):
    _, _, steps = quick_start
    assert steps["report without baseline"].returncode == 0, steps["report without baseline"].stderr
    page = steps["no-baseline report"]
    assert "No comparison: the baseline arm" in page and "Δ vs" not in page and "no_relax" in page


def test_after_training_the_baseline_the_report_compares(quick_start):
    folder, _, steps = quick_start
    assert steps["train baseline"].returncode == 0, steps["train baseline"].stderr[-3000:]
    assert steps["report with baseline"].returncode == 0, steps["report with baseline"].stderr
    summary = pd.read_csv(folder / "report" / "summary.csv").set_index("arm")
    assert list(summary.index) == ["baseline", "no_relax"]
    assert summary.loc["no_relax", "delta"] == pytest.approx(
        summary.loc["no_relax", "mean"] - summary.loc["baseline", "mean"]
    )
    assert "Δ vs baseline" in (folder / "report" / "report.html").read_text()


def test_mlflow_sees_a_training_experiment_with_dataset_description_and_source(quick_start):
    folder, _, _ = quick_start
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}"}
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("liquid-diffusion")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    runs = trial_runs(env, "liquid-diffusion")
    assert sorted(r.info.run_name for r in runs) == ["baseline-seed0", "no_relax-seed0"]
    for run in runs:
        arm = run.data.tags["ablation"]
        [dataset_input] = run.inputs.dataset_inputs
        dataset = dataset_input.dataset
        assert dataset.name == "mnist" and len(dataset.digest) == 16
        assert json.loads(dataset.source) == {"uri": mnist_file()} and dataset.source_type == "local"
        assert [t.value for t in dataset_input.tags if t.key == "mlflow.data.context"] == ["training"]
        assert run.data.tags["mlflow.source.name"] == f"python study/run.py --ablation {arm} --budget cpu-smoke"
        assert run.data.tags["mlflow.source.type"] == "LOCAL"
        description = (REPO / "ablations" / f"{arm}.yaml").read_text()
        assert run.data.tags["mlflow.note.content"] and run.data.tags["mlflow.note.content"] in description
        # the UI's chart view groups metrics by the prefix before '/'
        assert {key.split("/")[0] for key in run.data.metrics} <= {"train", "eval", "data", "time", "system"}
    digests = {r.inputs.dataset_inputs[0].dataset.digest for r in runs}
    assert len(digests) == 1  # the same data, recognised as one dataset across the runs


def rendered_text(url: str) -> str:
    """The text of the page at `url` once headless Chromium has run its scripts (30 s of virtual time)."""
    flags = ["--no-sandbox", "--disable-gpu", "--virtual-time-budget=30000", "--window-size=1600,1000"]
    dom = subprocess.run([BROWSER, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=180).stdout
    dom = re.sub(r"<style.*?</style>", " ", dom, flags=re.S)
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", dom)))


@pytest.mark.slow  # about a minute: MLflow's server starts, and the UI renders three times
@pytest.mark.skipif(not BROWSER, reason="no headless Chromium: .ci/run installs Debian's chromium-headless-shell")
def test_mlflow_s_ui_shows_the_runs_with_their_dataset_source_and_description(quick_start):
    folder, _, steps = quick_start
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}"}
    experiment = MlflowClient(env["MLFLOW_TRACKING_URI"]).get_experiment_by_name("liquid-diffusion")
    [trial] = trial_runs(env, "liquid-diffusion", ablation="no_relax")
    # the address the "Next:" line prints beside `mlflow ui`, as a user would paste it
    [printed] = re.findall(r"the runs in a browser: (\S+)", steps["train baseline"].stdout)
    assert (
        printed == f"http://127.0.0.1:5000/#/experiments/{experiment.experiment_id}/runs?workflowType=machine_learning"
    )
    port = free_port()
    command = ["mlflow", "server", "--backend-store-uri", "sqlite:///mlflow.db", "--host", "127.0.0.1"]
    with serving([*command, "--port", str(port), "--workers", "1"], port, folder, "/health") as url:
        runs_page = rendered_text(printed.replace("http://127.0.0.1:5000", url))
        bare_page = rendered_text(f"{url}/#/experiments/{experiment.experiment_id}/runs")  # no view in the address
        run_page = rendered_text(f"{url}/#/experiments/{experiment.experiment_id}/runs/{trial.info.run_id}")
    # a fresh browser on the printed address: the Model training view (its sidebar has the model registry),
    # where the bare address opens MLflow 3's GenAI view (Judges, Sessions, ...) around the same table
    assert "Model registry" in runs_page and "Judges" not in runs_page, runs_page[:1500]
    assert "Judges" in bare_page and "Model registry" not in bare_page, bare_page[:1500]
    # the runs table: one row per study, its trials nested under it
    dataset = f"mnist ({trial.inputs.dataset_inputs[0].dataset.digest}) training"  # the Dataset column
    for text in ("no_relax:mnist:cpu-smoke", "baseline:mnist:cpu-smoke", "run.py --ablation no_relax", dataset):
        assert text in runs_page, f"{text!r} not on the rendered runs page: {runs_page[-1500:]}"
    description = trial.data.tags["mlflow.note.content"]
    for text in ("no_relax-seed0", description, "run.py --ablation no_relax --budget cpu-smoke"):
        assert text in run_page, f"{text!r} not on the rendered run page: {run_page[-1500:]}"
    assert dataset in run_page


def test_optuna_dashboard_serves_the_studies_and_their_trials(quick_start):
    folder, commands, _ = quick_start
    port = free_port()
    command = [*shlex.split(commands["optuna-dashboard"]), "--port", str(port), "--host", "127.0.0.1"]
    with serving(command, port, folder, "/api/studies") as url:
        get = lambda path: urllib.request.urlopen(f"{url}{path}", timeout=10)  # noqa: E731
        studies = json.load(get("/api/studies"))["study_summaries"]
        trials = {s["study_name"]: json.load(get(f"/api/studies/{s['study_id']}"))["trials"] for s in studies}
        assert get("/dashboard").status == 200  # the page a browser opens
    assert set(trials) == {"liquid-diffusion:baseline:mnist:cpu-smoke", "liquid-diffusion:no_relax:mnist:cpu-smoke"}
    for study_trials in trials.values():
        [trial] = study_trials
        assert trial["state"] == "Complete" and trial["params"][0]["param_external_value"] == "0"  # seed 0
