"""Test environment: offline, CPU, quiet; shared helpers for building small models."""

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
sys.path.insert(0, str(REPO))
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


def assert_clean_error(result, *fragments):
    """Bad input: exit code 2 and one line on stderr that names what was wrong; never a traceback.

    `result` is a CompletedProcess, or anything with `returncode` and `stderr`.
    """
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def randomize_head(model: torch.nn.Module, seed: int = 0) -> None:
    """The head is zero-initialised; give it weights so outputs and gradients depend on every layer."""
    gen = torch.Generator().manual_seed(seed)
    conv = model.head[-1]
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) * 0.1)
        conv.bias.copy_(torch.randn(conv.bias.shape, generator=gen) * 0.1)


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
