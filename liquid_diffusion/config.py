"""Typed, validated configuration: the model's switches, presets, and dotted-key overrides."""

from __future__ import annotations

import difflib
import functools
import hashlib
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, Literal, get_args, get_origin, get_type_hints


class ConfigError(ValueError):
    """A configuration value or key is invalid; the message names it and the valid choices."""


def _closest(key: str, valid: list[str]) -> str:
    match = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f"; did you mean '{match[0]}'?" if match else ""
    return f"{hint} valid keys: {', '.join(sorted(valid))}"


def _choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"{name}={value!r} is not valid; choose one of: {', '.join(map(str, choices))}")


def _on_off(name: str, value: Any) -> bool:
    # YAML 1.1 reads bare on/off as booleans, so both spellings must mean the same thing.
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("on", "off", "true", "false"):
        return value.lower() in ("on", "true")
    raise ConfigError(f"{name}={value!r} is not valid; choose one of: on, off")


def _number(name: str, value: Any, lowest: float = 0, integer: bool = False) -> None:
    kinds = (int,) if integer else (int, float)
    if not isinstance(value, kinds) or isinstance(value, bool) or value < lowest:
        kind = "an integer" if integer else "a number"
        raise ConfigError(f"{name}={value!r} is not valid; expected {kind} >= {lowest}")


def _int_tuple(name: str, value: Any) -> tuple[int, ...]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value,)
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise ConfigError(f"{name}={value!r} is not valid; expected a list of integers")
    return tuple(value)


def _normalised(name: str, value: Any, kind: Any) -> Any:
    """A value as YAML or a command line spells it, in the field's own type: on/off as a bool, a single
    number or a list as a tuple. Anything else is left for the checks."""
    if kind is bool:
        return _on_off(name, value)
    if kind == tuple[int, ...]:
        return _int_tuple(name, value)
    if kind == tuple[str, ...]:
        if isinstance(value, str):
            value = (value,)
        if not isinstance(value, (list, tuple)) or not value or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{name}={value!r} is not valid; expected a name or a non-empty list of names")
        return tuple(value)
    return value


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    """A config dataclass's fields and their declared types (annotations are strings in this module)."""
    hints = get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls)}


class _Section:
    """Shared by the config dataclasses: dict conversion (unknown keys are rejected with a hint), and one
    check of every field against its declared type: a `Literal[...]` lists a field's valid choices."""

    PREFIX: ClassVar[str] = ""  # how error messages name this section's keys

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        if not isinstance(data, dict):
            raise ConfigError(f"{cls.__name__} expects a mapping, got {type(data).__name__}")
        types = _field_types(cls)
        for key in data:
            if key not in types:
                raise ConfigError(f"unknown key '{key}' in {cls.__name__}{_closest(key, list(types))}")
        return cls(**{key: _normalised(cls.PREFIX + key, value, types[key]) for key, value in data.items()})

    def _check_types(self) -> None:
        types = _field_types(type(self))
        for f in fields(self):
            name, value, kind = self.PREFIX + f.name, getattr(self, f.name), types[f.name]
            if get_origin(kind) is Literal:
                _choice(name, value, get_args(kind))
            elif (normal := _normalised(name, value, kind)) != value or type(normal) is not type(value):
                # Only code builds a section directly; files and overrides go through from_dict.
                raise ConfigError(f"{name}={value!r} is not valid here; pass {normal!r} (or use from_dict)")

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    def replace(self, **changes):
        return self.from_dict({**self.to_dict(), **changes})


# channels and depths per preset; parameter counts at 4x32x32 are checked in tests/test_model.py.
PRESETS: dict[str, dict[str, tuple[int, ...]]] = {
    "micro": {"channels": (32, 64, 128), "depths": (1, 1, 2)},
    "tiny": {"channels": (64, 128, 256), "depths": (2, 2, 4)},
    "small": {"channels": (96, 192, 384), "depths": (2, 3, 6)},
    "base": {"channels": (128, 256, 512), "depths": (2, 4, 8)},
}


@dataclass(frozen=True)
class ModelConfig(_Section):
    """Every architectural switch of LiquidUNet (see MODEL_SPEC.md); each is one ablation axis."""

    channels: tuple[int, ...] = PRESETS["tiny"]["channels"]
    depths: tuple[int, ...] = PRESETS["tiny"]["depths"]
    mid_depth: int = 2
    in_channels: Literal[1, 3, 4] = 4
    resolution: int = 32
    mixer: Literal["cfc", "conv"] = "cfc"
    gate: Literal["default", "no_gate", "minimal", "time_free"] = "default"
    relax: Literal["temb", "t", "none"] = "temb"
    kernels: tuple[int, ...] = (3, 5, 7)
    global_pool: bool = True
    adaln: bool = True
    ff_mult: int = 4

    def __post_init__(self):
        self._check_types()
        if not self.channels or any(c <= 0 for c in self.channels):
            raise ConfigError(
                f"channels={list(self.channels)} is not valid; expected a non-empty list of positive widths"
            )
        if len(self.depths) != len(self.channels) or any(d < 0 for d in self.depths):
            raise ConfigError(
                f"depths={list(self.depths)} is not valid; expected {len(self.channels)} non-negative block counts, "
                f"one per entry of channels"
            )
        _number("mid_depth", self.mid_depth, 0, integer=True)
        _number("ff_mult", self.ff_mult, 1, integer=True)
        _number("resolution", self.resolution, 1, integer=True)
        if not self.kernels:
            raise ConfigError("kernels=[] is not valid; expected a non-empty list of odd sizes such as [3, 5, 7]")
        if any(k <= 0 or k % 2 == 0 for k in self.kernels):
            raise ConfigError(
                f"kernels={list(self.kernels)} is not valid; every size must be odd and positive (e.g. 3, 5, 7)"
            )
        factor = 2 ** (len(self.channels) - 1)
        if self.resolution % factor:
            raise ConfigError(
                f"resolution={self.resolution} is not valid; with {len(self.channels)} levels it must be a multiple "
                f"of {factor}"
            )

    @property
    def time_dim(self) -> int:
        return 4 * self.channels[0]

    @classmethod
    def preset(cls, name: str, **overrides) -> ModelConfig:
        _choice("preset", name, tuple(PRESETS))
        return cls.from_dict({**PRESETS[name], **overrides})


@dataclass(frozen=True)
class TrainConfig(_Section):
    """One rectified-flow training run: optimiser, budget (in training images), precision and schedule."""

    seed: int = 0
    images: int = 50_000
    batch_size: int = 64
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_images: int = 0
    # after warmup: constant, or cosine decay to 0 at the budget's end
    lr_schedule: Literal["constant", "cosine"] = "constant"
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    # SD3's logit-normal(0, 1) rather than the seed's uniform t: at the cpu-demo budget it is what
    # makes the digits recognisable (72% vs 67-69% confident samples); the uniform_t arm measures it.
    t_sampling: Literal["uniform", "logit_normal"] = "logit_normal"
    precision: Literal["auto", "fp32", "fp16", "bf16"] = "auto"
    log_every_steps: int = 10
    eval_every_images: int = 10_000
    # extra evaluations at these image counts: with a constant learning rate, the evaluation at N images
    # of a long run is the one a run of N images ends with, so one run measures several budgets (study/plan.py)
    eval_at_images: tuple[int, ...] = ()
    checkpoint_every_images: int = 10_000
    n_samples: int = 64
    sample_steps: int = 25
    max_wall_minutes: float = 0.0
    vram_cap_gb: float = 0.0

    def __post_init__(self):
        self._check_types()
        for name in ("lr", "weight_decay", "grad_clip", "ema_decay", "max_wall_minutes", "vram_cap_gb"):
            _number(name, getattr(self, name))
        for name in ("seed", "warmup_images"):
            _number(name, getattr(self, name), 0, integer=True)
        for name in (
            "images",
            "batch_size",
            "log_every_steps",
            "eval_every_images",
            "checkpoint_every_images",
            "n_samples",
            "sample_steps",
        ):
            _number(name, getattr(self, name), 1, integer=True)
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"ema_decay={self.ema_decay!r} is not valid; expected 0 <= ema_decay < 1")
        if any(n < 1 for n in self.eval_at_images):
            raise ConfigError(f"eval_at_images={list(self.eval_at_images)} is not valid; expected image counts >= 1")


# The seed README's verified datasets, by short name.
HUB_DATASETS = {
    "afhq": "huggan/AFHQv2",
    "celeba": "nielsr/CelebA-faces",
    "flowers": "huggan/flowers-102-categories",
    "pokemon": "reach-vb/pokemon-blip-captions",
    "anime": "huggan/anime-faces",
    "cartoon": "Norod78/cartoon-blip-captions",
}


class DataError(ConfigError):
    """The configured data cannot be had; the message says what to do."""


def dataset_choices() -> str:
    return f"mnist, {', '.join(HUB_DATASETS)}, hf:owner/name, or a folder of images"


def is_local_folder(name: str) -> bool:
    return not (name == "mnist" or name in HUB_DATASETS or name.startswith("hf:"))


def check_dataset_name(name: str) -> None:
    """Reject a name that is no known dataset, hub id or existing folder, before any work starts."""
    if not is_local_folder(name):
        if name.startswith("hf:") and name.count("/") != 1:
            raise DataError(f"dataset '{name}' is not valid; write hub datasets as hf:owner/name")
        return
    path = Path(name).expanduser()
    if not path.exists():
        raise DataError(f"dataset '{name}' is neither a known name nor an existing folder; valid: {dataset_choices()}")
    if not path.is_dir():
        raise DataError(f"dataset '{name}' is a file; pass a folder of images, or one of: {dataset_choices()}")


@dataclass(frozen=True)
class DataConfig(_Section):
    """What the model learns from: the image source, its preprocessing, and the latent codec."""

    dataset: str = "mnist"
    resolution: int = 32
    channels: Literal[1, 3] = 1
    codec: Literal["pixel", "sd-vae", "taesd"] = "pixel"
    codec_weights: str = ""  # hub id or local directory; empty means the codec's standard weights
    flip: bool = False
    streaming: bool = False
    max_images: int = 0  # 0 = every image

    def __post_init__(self):
        self._check_types()
        if not isinstance(self.dataset, str) or not self.dataset:
            raise ConfigError(f"dataset={self.dataset!r} is not valid; expected a name, hf:owner/name or a folder")
        _number("resolution", self.resolution, 1, integer=True)
        _number("max_images", self.max_images, 0, integer=True)
        if self.codec != "pixel" and (self.channels != 3 or self.resolution % 8):
            raise ConfigError(
                f"codec={self.codec} needs channels=3 and a resolution divisible by 8, got "
                f"channels={self.channels}, resolution={self.resolution}"
            )

    @property
    def latent_shape(self) -> tuple[int, int]:
        """(channels, size) of what the model sees after the codec."""
        if self.codec == "pixel":
            return self.channels, self.resolution
        return 4, self.resolution // 8


def json_digest(value: Any, length: int = 16) -> str:
    """The first `length` hex digits of the SHA-256 of `value` as canonical JSON: names that change
    exactly when the content does (configs, reference sets, latent caches)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:length]


def dataset_slug(dataset: str) -> str:
    """A dataset's name in study, run-folder and reference-set names: a built-in name as it is, a folder
    or a hub dataset by its last part plus a digest of the whole, so two folders called `images` differ."""
    if "/" in dataset:
        return f"{Path(dataset).name}-{hashlib.sha256(dataset.encode()).hexdigest()[:8]}"
    return dataset.replace(":", "_")


# The training loss is also logged per bin of t (minRF's diagnostic): T_BINS even bins of [0, 1].
T_BINS = 10


def eval_prefix(repeat: int) -> str:
    """Where evaluation `repeat` logs its metrics: the first (the protocol's own noise) under eval/, the
    others, each from fresh sample noise, under eval_repeat<k>/ so that nothing reads them as the result."""
    return "eval/" if repeat == 0 else f"eval_repeat{repeat}/"


def loss_bin_key(i: int) -> str:
    """The logged name of the training loss in t-bin i."""
    return f"train/loss_bin{i}"


# Sample-quality metrics, each with whether higher is better. The digit ones live in the feature space
# of a small MNIST classifier (liquid_diffusion/digits.py) and are not FID; the others need the
# real Inception weights (liquid_diffusion/inception.py).
DIGIT_METRICS = {"fd_digits": False, "kid_digits": False, "confident_frac": True, "class_entropy": True}
INCEPTION_METRICS = {"fid": False, "kid": False, "precision": True, "recall": True}
METRICS = {**DIGIT_METRICS, **INCEPTION_METRICS}


@dataclass(frozen=True)
class EvalConfig(_Section):
    """The evaluation protocol: how many samples, against which reference, judged by which metrics.

    Samples come from the EMA weights, fixed noise seeds and `train.sample_steps` Euler steps.
    """

    PREFIX: ClassVar[str] = "eval."

    n: int = 1000  # generated samples per evaluation
    n_ref: int = 0  # reference images drawn (seeded) from the dataset; 0 = the same as n
    # images as they are, or as they come back through the codec (roundtrip)
    reference: Literal["images", "roundtrip"] = "images"
    metrics: tuple[str, ...] = ("auto",)  # auto = the digit metrics for mnist, the Inception ones otherwise
    objective: str = "auto"  # the metric a study optimises; auto = fd_digits for mnist, fid otherwise
    kid_subset_size: int = 1000  # lowered to the smaller set's size when N is below it
    kid_subsets: int = 100
    # how many times each evaluation is repeated with fresh sample noise: repeats beyond the first measure
    # the evaluation's own noise (study/plan.py) and are logged under eval_repeat<k>/, never as eval/
    noise_repeats: int = 1

    def __post_init__(self):
        self._check_types()
        if self.metrics != ("auto",):
            for name in self.metrics:
                _choice("eval.metrics", name, tuple(METRICS))
        _choice("eval.objective", self.objective, ("auto", *METRICS))
        _number("eval.n", self.n, 2, integer=True)  # a covariance needs two samples
        _number("eval.n_ref", self.n_ref, 0, integer=True)
        if self.n_ref == 1:
            raise ConfigError("eval.n_ref=1 is not valid; expected 0 (the same as n) or an integer >= 2")
        _number("eval.kid_subset_size", self.kid_subset_size, 2, integer=True)
        _number("eval.kid_subsets", self.kid_subsets, 1, integer=True)
        _number("eval.noise_repeats", self.noise_repeats, 1, integer=True)


def _model_for(data: DataConfig, model: ModelConfig) -> ModelConfig:
    """The model's input shape is not a free choice: it follows from the data and the codec."""
    channels, size = data.latent_shape
    return model.replace(in_channels=channels, resolution=size)


@dataclass(frozen=True)
class ExperimentConfig:
    """The resolved configuration of one arm: what is logged as params and printed by --dry-run."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=lambda: _model_for(DataConfig(), ModelConfig()))
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self):
        if self.model != _model_for(self.data, self.model):
            channels, size = self.data.latent_shape
            raise ConfigError(
                f"model input {self.model.in_channels}x{self.model.resolution} does not match the data's "
                f"{channels}x{size}; build configs with from_dict or with_overrides, which derive it"
            )
        metrics, objective = self.metrics, self.objective
        if self.data.dataset != "mnist" and (wrong := [m for m in metrics if m in DIGIT_METRICS]):
            raise ConfigError(
                f"eval.metrics {', '.join(wrong)} judge digits and need dataset mnist, not "
                f"'{self.data.dataset}'; choose from: {', '.join(INCEPTION_METRICS)}"
            )
        if objective not in metrics:
            raise ConfigError(f"eval.objective={objective} is not among eval.metrics ({', '.join(metrics)})")

    @property
    def metrics(self) -> tuple[str, ...]:
        """The metrics every evaluation computes: eval.metrics, with `auto` resolved for this dataset."""
        if self.eval.metrics != ("auto",):
            return self.eval.metrics
        return tuple(DIGIT_METRICS if self.data.dataset == "mnist" else INCEPTION_METRICS)

    @property
    def objective(self) -> str:
        """The metric a study optimises: eval.objective, with `auto` resolved for this dataset."""
        if self.eval.objective != "auto":
            return self.eval.objective
        return "fd_digits" if self.data.dataset == "mnist" else "fid"

    @classmethod
    def sections(cls) -> dict[str, type]:
        return {"data": DataConfig, "model": ModelConfig, "train": TrainConfig, "eval": EvalConfig}

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {name: getattr(self, name).to_dict() for name in self.sections()}

    def digest(self) -> str:
        """16 hex digits that identify the whole resolved config (run folders use the first 8)."""
        return json_digest(self.to_dict())

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExperimentConfig:
        sections = cls.sections()
        for key in data:
            if key not in sections:
                raise ConfigError(f"unknown section '{key}'{_closest(key, list(sections))}")
        parts = {name: kind.from_dict(data.get(name, {})) for name, kind in sections.items()}
        return cls(**{**parts, "model": _model_for(parts["data"], parts["model"])})

    def flat(self) -> dict[str, Any]:
        """`section.key` -> value, the form MLflow params and overrides use."""
        return {f"{s}.{k}": v for s, values in self.to_dict().items() for k, v in values.items()}

    def with_overrides(self, overrides: dict[str, Any]) -> ExperimentConfig:
        """Apply `section.key: value` overrides; unknown keys and bad values raise ConfigError.

        `model.preset: NAME` sets channels and depths from a preset, before the other overrides.
        """
        data = self.to_dict()
        valid = list(self.flat()) + ["model.preset"]
        overrides = dict(overrides)
        if "model.preset" in overrides:
            name = overrides.pop("model.preset")
            _choice("model.preset", name, tuple(PRESETS))
            data["model"].update({k: list(v) for k, v in PRESETS[name].items()})
        for dotted, value in overrides.items():
            section, _, key = str(dotted).partition(".")
            if section not in data or key not in data[section]:
                raise ConfigError(f"unknown key '{dotted}'{_closest(str(dotted), valid)}")
            data[section][key] = value
        return ExperimentConfig.from_dict(data)


def flatten_overrides(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Turn nested `{model: {relax: none}}` into `{model.relax: none}`; dotted keys pass through."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_overrides(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


__all__ = [
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "ExperimentConfig",
    "ModelConfig",
    "TrainConfig",
    "PRESETS",
    "flatten_overrides",
]
