"""Test environment: offline, CPU, quiet; the session fixtures. Shared helpers live in helpers.py."""

import os

# Tests never wait on the network: the hub libraries read these at import time.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # study/ and reports/ are imported as packages from the repository root
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def random_inception_weights(tmp_path_factory) -> Path:
    """An Inception weights file with torch-fidelity's layout and random values: never the standard file."""
    from unittest import mock

    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    with (
        mock.patch.object(FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None),
        mock.patch("torch_fidelity.feature_extractor_inceptionv3.load_state_dict_from_url", return_value={}),
    ):
        network = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    path = tmp_path_factory.mktemp("inception") / "random-inception.pth"
    torch.save(network.state_dict(), path)
    return path


@pytest.fixture
def run_here(monkeypatch, capsys):
    """`python study/run.py ARGS` in this process, with the environment `env`: a CompletedProcess with the
    exit code and what it printed. The imports a new process pays (about 8 s of torch, diffusers and
    MLflow here) are paid once, so the tests of what a command does use this. Tests of the process
    itself (signals, kills, concurrent starts, the smoke run) start real processes."""
    import subprocess

    import mlflow

    from study.run import cli

    def run(env: dict, *args: str) -> subprocess.CompletedProcess:
        for key in set(os.environ) | set(env):
            if key not in env:
                monkeypatch.delenv(key)
            elif os.environ.get(key) != env[key]:
                monkeypatch.setenv(key, env[key])
        mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])  # a URI set earlier in the process would win
        capsys.readouterr()
        code = cli(list(args))
        printed = capsys.readouterr()
        return subprocess.CompletedProcess(["study/run.py", *args], code, printed.out, printed.err)

    return run
