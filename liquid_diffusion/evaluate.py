"""Score generated images against a reference set under one fixed protocol, through torch-fidelity.

The protocol (ExperimentConfig.eval): N samples from fixed per-sample noise seeds, integrated with
`train.sample_steps` Euler steps from the EMA weights and decoded by the codec; N_ref reference
images drawn with a fixed seed from the training data, as they are or after a codec round trip.
Both sides are quantised to uint8 as saved images would be. Reference features and statistics
are computed once and kept in torch-fidelity's cache, under a name that carries a digest of the
data, the reference settings and the feature network's weights.

Metric names say what they are: fd_digits / kid_digits are Fréchet and kernel distances in the
digit classifier's feature space (not FID); fid / kid / precision / recall use the Inception
network, and get the suffix `_unverified` when its weights are not the standard file.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from pathlib import Path

import torch
import torch_fidelity
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from .config import DIGIT_METRICS, INCEPTION_METRICS, ConfigError, ExperimentConfig, dataset_slug, json_digest
from .digits import classifier_path, read_classifier, register_digit_features, score_digits
from .inception import InceptionWeights, WeightsError, sha256_of
from .latent_cache import default_cache_dir

log = logging.getLogger(__name__)
EVAL_NOISE_SEED = 10_000  # sample j starts from the noise of seed EVAL_NOISE_SEED + j, in every run
REPEAT_SEED_STRIDE = 1_000_000  # repeat k of an evaluation draws from seeds k * stride + ..., apart from repeat 0's
REFERENCE_SEED = 0  # which images of the dataset form the reference set
PRC_NEIGHBOURS = 3  # torch-fidelity's default k for precision/recall
REFERENCE_VERSION = 1  # bump when the reference preprocessing changes, so old statistics are never read

# torch-fidelity's result keys -> ours, for each feature space
_DIGIT_KEYS = {"frechet_inception_distance": "fd_digits", "kernel_inception_distance_mean": "kid_digits"}
_INCEPTION_KEYS = {
    "frechet_inception_distance": "fid",
    "kernel_inception_distance_mean": "kid",
    "precision": "precision",
    "recall": "recall",
}


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats -> uint8, as a PNG of the image would hold them."""
    return images.float().add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8).cpu()


class ImageSet(Dataset):
    """uint8 images (N, C, H, W) as torch-fidelity reads them: one RGB uint8 tensor per item.

    With `build`, the images are made on first access only, so a cache hit never loads them.
    """

    def __init__(self, images: torch.Tensor | None = None, build: Callable[[], torch.Tensor] | None = None):
        self._images, self._build = images, build

    @property
    def images(self) -> torch.Tensor:
        if self._images is None:
            self._images = self._build()
        return self._images

    @property
    def built(self) -> bool:
        return self._images is not None

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        image = self.images[index]
        return image.expand(3, -1, -1) if image.shape[0] == 1 else image


def objective_key(cfg: ExperimentConfig, weights: InceptionWeights | None) -> str:
    """The logged name of the objective metric, e.g. eval/fd_digits or eval/fid_unverified."""
    objective = cfg.objective
    unverified = objective in INCEPTION_METRICS and weights is not None and not weights.verified
    return f"eval/{objective}" + ("_unverified" if unverified else "")


def noise_for(indices: range, shape: tuple[int, ...], repeat: int = 0) -> torch.Tensor:
    """Sample j's noise depends on j (and the repeat) only, so the first k samples agree whatever N or batch
    size. Repeat 0 is the protocol's noise; repeat k > 0 is fresh noise for measuring the evaluation's own spread."""
    first = EVAL_NOISE_SEED + repeat * REPEAT_SEED_STRIDE
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(first + j)) for j in indices])


class Evaluator:
    """Computes the configured metrics for one (dataset, reference, N) protocol.

    `source` is the training ImageSource and `codec` its codec; `weights` are required when an
    Inception metric is requested (see inception.resolve_inception_weights).
    """

    def __init__(
        self,
        cfg: ExperimentConfig,
        source,
        codec,
        weights: InceptionWeights | None = None,
        cache_dir: Path | None = None,
        device: str | torch.device = "cpu",
        progress: bool = False,
        n: int | None = None,
        metrics: tuple[str, ...] | None = None,
    ):
        self.cfg, self.source, self.codec, self.weights = cfg, source, codec, weights
        self.device = torch.device(device)
        self.progress = progress
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self.metrics = tuple(metrics) if metrics else cfg.metrics
        self.n = n or cfg.eval.n
        if self.n < 2:
            raise ConfigError(f"n={self.n} is not valid; expected an integer >= 2")
        if any(m in INCEPTION_METRICS for m in self.metrics) and weights is None:
            raise WeightsError("Inception metrics need weights; see resolve_inception_weights")
        if any(m in DIGIT_METRICS for m in self.metrics) and cfg.data.dataset != "mnist":
            raise ConfigError(f"digit metrics need dataset mnist, not '{cfg.data.dataset}'")
        n_ref = cfg.eval.n_ref or self.n
        with contextlib.suppress(TypeError):  # a streaming source has no length; a short stream gives fewer images
            n_ref = min(n_ref, len(source))
        if n_ref < 2:
            raise ConfigError(f"dataset '{cfg.data.dataset}' has {n_ref} image(s); a reference set needs at least 2")
        self.n_ref = n_ref
        if {"precision", "recall"} & set(self.metrics) and min(self.n, n_ref) <= PRC_NEIGHBOURS:
            raise ConfigError(
                f"precision/recall need more than {PRC_NEIGHBOURS} samples on each side; got N={self.n}, N_ref={n_ref}"
            )
        self.reference = ImageSet(build=self._build_reference)
        self.kid_subset_size = min(cfg.eval.kid_subset_size, self.n, self.n_ref)
        if self.kid_subset_size < cfg.eval.kid_subset_size and any(m in ("kid", "kid_digits") for m in self.metrics):
            log.warning(
                "KID subset size lowered from %d to %d (N=%d, N_ref=%d)",
                cfg.eval.kid_subset_size,
                self.kid_subset_size,
                self.n,
                self.n_ref,
            )

    @property
    def objective_key(self) -> str:
        return objective_key(self.cfg, self.weights)

    @property
    def tags(self) -> dict[str, str]:
        """What a report needs to state the protocol: metrics, objective, reference set, weights."""
        tags = {
            "eval.metrics": ",".join(self.metrics),
            "eval.objective": self.objective_key,
            "eval.reference_set": self.reference_name,
        }
        if any(m in INCEPTION_METRICS for m in self.metrics):
            tags["weights"] = self.weights.tag
        return tags

    # --- reference --------------------------------------------------------------------------

    @property
    def reference_name(self) -> str:
        """Names the reference set by content: dataset digest, resolution, round trip, N_ref."""
        d, e = self.cfg.data, self.cfg.eval
        parts = {
            "version": REFERENCE_VERSION,
            "data": self.source.digest,
            "resolution": d.resolution,
            "channels": d.channels,
            "max_images": d.max_images,
            "reference": e.reference,
            "n_ref": self.n_ref,
            "seed": REFERENCE_SEED,
            "codec": self.codec.digest if e.reference == "roundtrip" else None,
        }
        digest = json_digest(parts)
        return f"ref-{dataset_slug(d.dataset)}-{d.resolution}px-{e.reference}-n{self.n_ref}-{digest}"

    def _build_reference(self) -> torch.Tensor:
        log.info("building reference set %s", self.reference_name)
        chunks = []
        drawn = self.source.draw(self.n_ref, REFERENCE_SEED)
        for pixels in tqdm(drawn.batches(64), desc="reference images", unit="batch", disable=not self.progress):
            if self.cfg.eval.reference == "roundtrip":
                pixels = self.codec.decode(self.codec.encode(pixels.to(self.device)))
            chunks.append(to_uint8(pixels))
        if not chunks:
            raise ConfigError(f"dataset '{self.cfg.data.dataset}' gave no reference images")
        return torch.cat(chunks)

    # --- evaluation -------------------------------------------------------------------------

    def generate(
        self, sample: Callable[[torch.Tensor], torch.Tensor], batch_size: int = 64, repeat: int = 0
    ) -> torch.Tensor:
        """N images as uint8 from repeat `repeat`'s noise; `sample` maps a batch of noise to images in [-1, 1]."""
        channels, size = self.cfg.data.latent_shape
        out = []
        with tqdm(total=self.n, desc="eval samples", unit="img", disable=not self.progress, leave=False) as bar:
            for start in range(0, self.n, batch_size):
                indices = range(start, min(start + batch_size, self.n))
                out.append(to_uint8(sample(noise_for(indices, (channels, size, size), repeat))))
                bar.update(len(indices))
        return torch.cat(out)

    def _fidelity(
        self,
        generated: ImageSet,
        extractor: str,
        weights_path: Path,
        cache_suffix: str,
        fid: bool,
        kid: bool,
        prc: bool,
    ) -> dict[str, float]:
        if not (fid or kid or prc):
            return {}
        return torch_fidelity.calculate_metrics(
            input1=generated,
            input2=self.reference,
            input2_cache_name=f"{self.reference_name}-{cache_suffix}",
            cache_root=str(self.cache_dir / "fidelity"),
            feature_extractor=extractor,
            feature_extractor_weights_path=str(weights_path),
            fid=fid,
            kid=kid,
            prc=prc,
            kid_subset_size=self.kid_subset_size,
            kid_subsets=self.cfg.eval.kid_subsets,
            prc_neighborhood=PRC_NEIGHBOURS,
            cuda=self.device.type == "cuda",
            batch_size=64,
            save_cpu_ram=True,
            verbose=False,
        )

    def score(self, images: torch.Tensor, prefix: str = "eval/") -> dict[str, float]:
        """The configured metrics for uint8 `images` against the reference, keyed `{prefix}{metric}`."""
        generated, wanted, out = ImageSet(images), set(self.metrics), {}
        if wanted & set(DIGIT_METRICS):
            path = classifier_path(self.cfg.data.resolution, self.cache_dir)
            raw = self._fidelity(
                generated,
                register_digit_features(),
                path,
                f"digits{sha256_of(path)[:8]}",
                fid="fd_digits" in wanted,
                kid="kid_digits" in wanted,
                prc=False,
            )
            out.update({_DIGIT_KEYS[k]: v for k, v in raw.items() if k in _DIGIT_KEYS})
            digits = score_digits(read_classifier(path)[0], images.float().div(127.5).sub(1))
            out.update(confident_frac=digits.confident_frac, class_entropy=digits.class_entropy)
        if wanted & set(INCEPTION_METRICS):
            raw = self._fidelity(
                generated,
                "inception-v3-compat",
                self.weights.path,
                f"inception{sha256_of(self.weights.path)[:8]}",
                fid="fid" in wanted,
                kid="kid" in wanted,
                prc=bool(wanted & {"precision", "recall"}),
            )
            suffix = "" if self.weights.verified else "_unverified"
            out.update({_INCEPTION_KEYS[k] + suffix: v for k, v in raw.items() if k in _INCEPTION_KEYS})
        out = {name: value for name, value in out.items() if name.removesuffix("_unverified") in wanted}
        # The protocol travels with every value.
        out.update(n=self.n, n_ref=self.n_ref, sample_steps=self.cfg.train.sample_steps)
        if wanted & {"kid", "kid_digits"}:
            out["kid_subset_size"] = self.kid_subset_size
        return {f"{prefix}{name}": float(value) for name, value in out.items()}

    def evaluate(
        self,
        sample: Callable[[torch.Tensor], torch.Tensor],
        batch_size: int = 64,
        prefix: str = "eval/",
        repeat: int = 0,
    ) -> dict[str, float]:
        """Generate N samples with `sample` from repeat `repeat`'s noise and score them."""
        return self.score(self.generate(sample, batch_size, repeat), prefix)
