"""Test environment: offline, CPU, quiet; the session fixtures. Shared helpers live in helpers.py."""

import os

# Tests never wait on the network: the hub libraries read these at import time.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # study/ and reports/ are imported as packages from the repository root
if os.environ.get("PYTEST_XDIST_WORKER"):  # one of pytest -n 2's workers: a core each, for the commands it starts too
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
else:
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


# What a test may leave in the repository: pytest's and ruff's caches (SHARED_CACHE lives in .pytest_cache),
# bytecode and the editable install's metadata. Anything else is a test writing into a user's working tree.
ALLOWED_IN_REPO = (".pytest_cache/", ".ruff_cache/", "__pycache__/", ".egg-info/")


def untracked_in_repo() -> set[str]:
    listing = subprocess.run(
        ["git", "status", "--porcelain", "--ignored", "--untracked-files=normal"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    paths = {line[3:] for line in listing.splitlines() if line.startswith(("??", "!!"))}
    return {p for p in paths if not any(p.endswith(a) or f"/{a}" in f"/{p}" for a in ALLOWED_IN_REPO)}


@pytest.fixture(scope="session", autouse=True)
def nothing_written_into_the_repository():
    """Fails the session when a test leaves files in the working tree (mlruns/, outputs/, mlflow.db, ...)."""
    before = untracked_in_repo()
    yield
    new = untracked_in_repo() - before
    assert not new, f"tests wrote into the working tree: {sorted(new)}"
