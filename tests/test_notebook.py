"""notebooks/liquid_diffusion_colab.ipynb executed headless on this CPU, as Colab would run it top to bottom:
a smoke study, a disconnect in the middle of training and the rerun that resumes it, bad form fields.

Outside Colab the notebook finds no google.colab, so it skips Drive and keeps results in LOCAL_DIR; the
project is installed, so its install cell only prints versions.
"""

from __future__ import annotations

import os
import subprocess
import sys

import nbformat
import psutil
import pytest
from helpers import REPO, SHARED_CACHE, latest_checkpoint, long_smoke_budget, trial_runs, wait_for
from mlflow import MlflowClient

NOTEBOOK = REPO / "notebooks" / "liquid_diffusion_colab.ipynb"
# The digit classifier and the data the other tests prepared; the notebook keeps a cache already set.
CACHED = {**os.environ, "LIQUID_DIFFUSION_CACHE": str(SHARED_CACHE)}
SMOKE = {"ARMS": "baseline", "DATASET": "mnist", "BUDGET": "cpu-smoke", "SEEDS": 1, "EXPERIMENT": "notebook"}


def papermill_command(tmp_path, name: str, **parameters) -> list[str]:
    """papermill's command line: the notebook with the smoke settings and `parameters`, written to NAME.ipynb."""
    settings = {**SMOKE, "LOCAL_DIR": str(tmp_path / "work"), **parameters}
    flags = [arg for key, value in settings.items() for arg in ("-p", key, str(value))]
    out = tmp_path / f"{name}.ipynb"
    return [sys.executable, "-m", "papermill", str(NOTEBOOK), str(out), "-k", "python3", "--cwd", str(tmp_path), *flags]


def execute(tmp_path, name: str, **parameters) -> tuple[int, nbformat.NotebookNode]:
    command = papermill_command(tmp_path, name, **parameters)
    result = subprocess.run(command, env=CACHED, capture_output=True, text=True, timeout=600)
    return result.returncode, nbformat.read(tmp_path / f"{name}.ipynb", as_version=4)


def code_cells(notebook) -> list:
    return [cell for cell in notebook.cells if cell.cell_type == "code"]


def text_of(cell) -> str:
    """Everything a cell printed: streams, rich text, and errors as shown (their rendered traceback)."""
    parts = []
    for output in cell.get("outputs", []):
        if output.output_type == "stream":
            parts.append(output.text)
        elif output.output_type == "error":
            parts += output.traceback
        else:
            parts.append(str(output.get("data", {}).get("text/plain", "")))
    return "".join(parts)


def run_cell(notebook):
    """The cell that starts study/run.py."""
    [cell] = [c for c in code_cells(notebook) if '"study/run.py"' in c.source]
    return cell


def test_the_notebook_is_committed_with_its_outputs_cleared():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    for cell in code_cells(notebook):
        assert cell.outputs == [] and cell.execution_count is None, cell.source[:80]
    [settings] = [c for c in code_cells(notebook) if "parameters" in c.metadata.get("tags", [])]
    assert 'BUDGET = "t4-30m"' in settings.source and "#@param" in settings.source  # Colab's form fields


@pytest.mark.slow  # about 66 s: a Jupyter kernel under papermill, a study and a report (moved from the fast suite)
def test_the_notebook_runs_top_to_bottom_on_a_cpu(tmp_path):
    code, notebook = execute(tmp_path, "smoke")
    assert code == 0, [text_of(c)[-2000:] for c in code_cells(notebook) if "error" in text_of(c).lower()]
    cells = code_cells(notebook)
    assert all(cell.execution_count for cell in cells)  # every cell ran
    assert not any(o.output_type == "error" for cell in cells for o in cell.outputs)
    assert "study notebook:baseline:mnist:cpu-smoke: 1 complete, 0 pruned, 0 failed" in text_of(run_cell(notebook))
    work = tmp_path / "work"
    assert (work / "report" / "report.html").exists() and (work / "report" / "summary.csv").exists()
    everything = "".join(text_of(cell) for cell in cells)
    assert "No comparison: the baseline arm" not in everything  # the baseline ran: the report compares (nothing)
    assert "Not on Colab (no google.colab module)" in everything and "<iframe srcdoc=" in str(notebook)
    assert "baseline, seed 0" in everything  # the sample grid's caption, then the image
    assert any("image/png" in o.get("data", {}) for cell in cells for o in cell.outputs)
    assert "mlflow ui --backend-store-uri sqlite:///" in everything


@pytest.mark.slow  # about 70 s: two notebook runs of a 100-step study, one killed
def test_rerunning_the_notebook_after_a_disconnect_resumes_the_study(tmp_path):
    """A Colab disconnect kills the kernel and the training command under it at once; running the notebook
    again with the same settings resumes the interrupted seed in its MLflow run."""
    extra = {"EXTRA_ARGS": f"--budgets-file {long_smoke_budget(tmp_path)} --no-progress"}
    first = subprocess.Popen(
        papermill_command(tmp_path, "first", **extra), env=CACHED, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    out = tmp_path / "work" / "outputs"
    try:
        assert wait_for(lambda: latest_checkpoint(out) is not None or first.poll() is not None, timeout=300, poll=0.05)
        assert first.poll() is None, "the notebook ended before its first checkpoint"
    finally:  # the disconnect: papermill, the kernel (its own session) and the training process, all at once
        tree = [psutil.Process(first.pid), *psutil.Process(first.pid).children(recursive=True)]
        for process in tree:
            process.kill()
        psutil.wait_procs(tree, timeout=30)
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'work' / 'mlflow.db'}"}
    [killed] = trial_runs(env, "notebook")
    assert killed.info.status == "RUNNING"  # as a SIGKILL leaves it

    code, notebook = execute(tmp_path, "second", **extra)
    assert code == 0, text_of(run_cell(notebook))[-3000:]
    printed = text_of(run_cell(notebook))
    assert ", resumed at " in printed and "1 complete, 0 pruned, 0 failed" in printed
    [run] = trial_runs(env, "notebook")
    assert run.info.run_id == killed.info.run_id and run.info.status == "FINISHED"
    steps = [m.step for m in MlflowClient(env["MLFLOW_TRACKING_URI"]).get_metric_history(run.info.run_id, "train/loss")]
    assert steps == sorted(set(steps)) and steps[-1] == 1600  # every step once, to the end of the budget


@pytest.mark.parametrize(
    "settings, message",
    [
        pytest.param({"ARMS": "nope"}, "unknown ablation 'nope'; valid arms: all, baseline", id="unknown arm"),
        pytest.param({"BUDGET": "nope"}, "unknown budget 'nope'; valid budgets: cpu-smoke", id="unknown budget"),
        pytest.param(  # about 15 s: past the Inception weights, which load first
            {"DATASET": "afhq"}, "dataset 'afhq'", id="dataset offline", marks=pytest.mark.slow
        ),
    ],
)
def test_a_bad_form_field_stops_with_the_command_line_s_one_line_error(
    tmp_path, settings, message, random_inception_weights
):
    if settings.get("DATASET") == "afhq":  # past the Inception weights, so that the dataset is what fails
        settings["EXTRA_ARGS"] = f"--inception-weights {random_inception_weights} --allow-unverified-weights"
    code, notebook = execute(tmp_path, "bad", **settings)
    assert code != 0
    printed = text_of(run_cell(notebook))
    assert message in printed and "run.py: error:" in printed
    assert "Traceback" not in printed and "Stopped: the command refused its input" in printed
    [error] = [o for o in run_cell(notebook).outputs if o.output_type == "error"]
    assert len(error.traceback) == 1  # one line, no stack
    assert not list((tmp_path / "work").glob("outputs/*/*"))  # nothing trained
