"""A small digit classifier trained on the embedded MNIST: an offline judge of generated digits.

It is trained once (seeded, with a held-out split) and cached as safetensors keyed on the data
digest. It scores samples by how confidently it recognises them and how evenly the classes appear,
and its feature space is registered with torch-fidelity for fd_digits and kid_digits.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from torch_fidelity import register_feature_extractor
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from .config import DataConfig
from .data import MnistSource
from .latent_cache import default_cache_dir, save_file_atomic

log = logging.getLogger(__name__)
CLASSIFIER_VERSION = 2  # 2: resolution in the file's metadata
HELD_OUT_PER_CLASS = 50  # 500 held-out digits, 4,500 for training


class DigitClassifier(nn.Module):
    """Three conv stages and a linear head over grey digits in [-1, 1]; `features` is the penultimate layer.

    It is trained at the resolution it judges: a 28x28 classifier is unreliable on 16x16 digits
    scaled up (it saw none so blurred).
    """

    feature_dim = 128

    def __init__(self, resolution: int = 28):
        super().__init__()
        self.resolution = resolution
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 3, padding=1),
            nn.BatchNorm2d(128),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(128, 10)

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """Any (B, 1|3, H, W) batch in [-1, 1] -> grey at the classifier's resolution."""
        if images.shape[1] == 3:
            images = images.mean(dim=1, keepdim=True)
        if images.shape[-1] != self.resolution:
            images = F.interpolate(images, size=self.resolution, mode="bilinear", antialias=True, align_corners=False)
        return images

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(self.prepare(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


def mnist_split(resolution: int = 28) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train images, train labels, held-out images, held-out labels); the last 50 digits of each class are held out.

    Images go through the same preprocessing as training data at `resolution`.
    """
    source = MnistSource(DataConfig(dataset="mnist", resolution=resolution, channels=1))
    images = torch.cat(list(source.batches(1000)))
    labels = torch.from_numpy(source.labels).long()
    held = torch.zeros(len(labels), dtype=torch.bool)
    for digit in range(10):
        held[torch.nonzero(labels == digit).flatten()[-HELD_OUT_PER_CLASS:]] = True
    return images[~held], labels[~held], images[held], labels[held]


def _shift(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random translations of up to 1/14 of the size, the augmentation that lets 4,500 digits generalise."""
    size, pad = images.shape[-1], max(1, round(images.shape[-1] / 14))
    padded = F.pad(images, (pad, pad, pad, pad), value=-1.0)
    dx, dy = torch.randint(0, 2 * pad + 1, (2,), generator=generator).tolist()
    return padded[..., dy : dy + size, dx : dx + size]


def train_classifier(resolution: int = 28, epochs: int = 12, seed: int = 0) -> tuple[DigitClassifier, float]:
    """Train from scratch; returns the model (eval mode) and its held-out accuracy."""
    x, y, x_test, y_test = mnist_split(resolution)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = DigitClassifier(resolution)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    steps = epochs * math.ceil(len(x) / 64)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for batch in order.split(64):
            loss = F.cross_entropy(model(_shift(x[batch], generator)), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    return model, accuracy


def classifier_path(resolution: int, cache_dir: Path | None = None) -> Path:
    """The cached classifier for `resolution`, trained (about a minute) on first use."""
    data_digest = MnistSource(DataConfig(dataset="mnist")).digest
    digest = hashlib.sha256(f"{data_digest}-{resolution}-{CLASSIFIER_VERSION}".encode()).hexdigest()[:16]
    path = (
        (Path(cache_dir) if cache_dir else default_cache_dir())
        / "classifiers"
        / f"digits{resolution}-{digest}.safetensors"
    )
    if path.exists():
        try:
            read_classifier(path)
            return path
        except Exception as err:  # a damaged cache is rebuilt, never trusted
            log.warning("ignoring unreadable classifier cache %s (%s)", path, err)
    model, accuracy = train_classifier(resolution)
    save_file_atomic(model.state_dict(), path, {"held_out_accuracy": str(accuracy), "resolution": str(resolution)})
    return path


def read_classifier(path: Path) -> tuple[DigitClassifier, float]:
    """A classifier file written by classifier_path, with its held-out accuracy."""
    with safe_open(path, framework="pt") as cached:
        meta = cached.metadata()
        model = DigitClassifier(int(meta["resolution"]))
        names = cached.keys()  # safetensors' file handle is not a dict: keys() is its API
        model.load_state_dict({key: cached.get_tensor(key) for key in names})
    return model.eval(), float(meta["held_out_accuracy"])


def load_classifier(resolution: int = 28, cache_dir: Path | None = None) -> tuple[DigitClassifier, float]:
    """The classifier for `resolution` with its held-out accuracy; see classifier_path."""
    return read_classifier(classifier_path(resolution, cache_dir))


class DigitFeatures(FeatureExtractorBase):
    """The classifier as a torch-fidelity feature extractor: FD and KID in its 128-d feature space.

    These are fd_digits and kid_digits. They are not FID: the network is a small MNIST classifier,
    not Inception, so the numbers compare runs of this project only. Input: uint8 (B, 1|3, H, W).
    """

    NAME = "liquid-digits"

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        if not feature_extractor_weights_path:
            raise ValueError("DigitFeatures needs feature_extractor_weights_path (see classifier_path)")
        self.classifier, _ = read_classifier(Path(feature_extractor_weights_path))
        self.requires_grad_(False)

    def forward(self, x: torch.Tensor):
        features = self.classifier.features(x.float().div(127.5).sub(1.0))
        out = {"features": features, "logits": self.classifier.head(features)}
        return tuple(out[name] for name in self.features_list)

    @staticmethod
    def get_provided_features_list():
        return "features", "logits"

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return "features"

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 1, 28, 28, dtype=torch.uint8)


def register_digit_features() -> str:
    """Register DigitFeatures with torch-fidelity (once per process); returns its name."""
    if DigitFeatures.NAME not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(DigitFeatures.NAME, DigitFeatures)
    return DigitFeatures.NAME


@dataclass
class DigitScore:
    confident_frac: float  # share of samples whose top-class probability is >= 0.9
    class_entropy: float  # entropy of the predicted-class histogram; ln 10 = all classes equally present
    classes_present: int
    n: int


@torch.no_grad()
def score_digits(classifier: DigitClassifier, images: torch.Tensor) -> DigitScore:
    probs = classifier(images.float().cpu()).softmax(dim=1)
    confident = (probs.max(dim=1).values >= 0.9).float().mean().item()
    counts = np.bincount(probs.argmax(dim=1).numpy(), minlength=10)
    share = counts[counts > 0] / counts.sum()
    return DigitScore(confident, float(-(share * np.log(share)).sum()), int((counts > 0).sum()), len(images))
