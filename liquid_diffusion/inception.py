"""Find the Inception weights that FID, KID and precision/recall need, and check they are the standard file.

torch-fidelity's FID uses the TensorFlow Inception of 2015-12-05, converted to PyTorch. Only that
exact file gives numbers comparable with published ones, so a file is accepted when its SHA-256
matches, or, if the user explicitly allows it, marked unverified; values computed with an
unverified file are logged under names ending in `_unverified`, never as FID.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import ConfigError
from .hub import reachable

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"
WEIGHTS_ENV = "LIQUID_DIFFUSION_INCEPTION_WEIGHTS"
HOW_TO_SUPPLY = (
    f"download {INCEPTION_URL} on a connected machine and pass it with --inception-weights PATH "
    f"(or set {WEIGHTS_ENV}=PATH)"
)


class WeightsError(ConfigError):
    """The Inception weights are missing or are not the standard file; the message says what to do."""


@dataclass(frozen=True)
class InceptionWeights:
    path: Path
    verified: bool

    @property
    def tag(self) -> str:
        return "verified" if self.verified else "unverified"


_sha_cache: dict[tuple[str, int, int], str] = {}


def sha256_of(path: Path) -> str:
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _sha_cache:  # 95 MB: hash it once per process
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        _sha_cache[key] = digest.hexdigest()
    return _sha_cache[key]


def _checked(path: Path, allow_unverified: bool, origin: str) -> InceptionWeights:
    if not path.is_file():
        raise WeightsError(f"Inception weights {origin} '{path}' is not a file; {HOW_TO_SUPPLY}")
    actual = sha256_of(path)
    if actual == INCEPTION_SHA256:
        return InceptionWeights(path, verified=True)
    if allow_unverified:
        # torch-fidelity unpickles the file in full; an unknown file must first pass torch's safe
        # loader, which accepts tensors and plain containers and nothing that could run code.
        try:
            torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # pickle and torch raise many kinds
            raise WeightsError(
                f"Inception weights '{path}' are not a plain state dict that torch can load safely "
                f"({type(err).__name__}); refusing them even with --allow-unverified-weights"
            ) from None
        return InceptionWeights(path, verified=False)
    raise WeightsError(
        f"Inception weights '{path}' have SHA-256 {actual[:16]}..., not the standard {INCEPTION_FILE} "
        f"({INCEPTION_SHA256[:16]}...); pass the standard file, or --allow-unverified-weights to use this one "
        f"with every value tagged weights=unverified (and never called FID)"
    )


def _hub_checkpoint() -> Path:
    """Where torch.hub (and so torch-fidelity) keeps downloaded weights: $TORCH_HOME/hub/checkpoints."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE


def resolve_inception_weights(path: str | Path | None = None, allow_unverified: bool = False) -> InceptionWeights:
    """The weights file to use, checked: --inception-weights, then $LIQUID_DIFFUSION_INCEPTION_WEIGHTS,
    then torch.hub's cache, then a download as torch-fidelity would do it. WeightsError if none works."""
    if path:
        return _checked(Path(path).expanduser(), allow_unverified, "from --inception-weights")
    if env := os.environ.get(WEIGHTS_ENV):
        return _checked(Path(env).expanduser(), allow_unverified, f"from ${WEIGHTS_ENV}")
    cached = _hub_checkpoint()
    if not cached.is_file() and reachable(INCEPTION_URL):
        cached.parent.mkdir(parents=True, exist_ok=True)
        try:
            torch.hub.download_url_to_file(INCEPTION_URL, str(cached), hash_prefix=INCEPTION_SHA256[:8])
        except Exception as err:  # network errors come in many types; the message below covers them
            raise WeightsError(
                f"downloading the Inception weights failed ({type(err).__name__}: {err}); {HOW_TO_SUPPLY}"
            ) from None
    if cached.is_file():
        return _checked(cached, allow_unverified, "in the torch.hub cache")
    raise WeightsError(f"no Inception weights here and the download site is unreachable; {HOW_TO_SUPPLY}")
