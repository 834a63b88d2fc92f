"""Typed, validated configuration: the model's switches, presets, and dotted-key overrides."""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field, fields
from typing import Any


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


def _int_tuple(name: str, value: Any) -> tuple[int, ...]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value,)
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise ConfigError(f"{name}={value!r} is not valid; expected a list of integers")
    return tuple(value)


class _Section:
    """Shared dict conversion for the config dataclasses; unknown keys are rejected with a hint."""

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        if not isinstance(data, dict):
            raise ConfigError(f"{cls.__name__} expects a mapping, got {type(data).__name__}")
        valid = [f.name for f in fields(cls)]
        for key in data:
            if key not in valid:
                raise ConfigError(f"unknown key '{key}' in {cls.__name__}{_closest(key, valid)}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    def replace(self, **changes):
        return self.from_dict({**self.to_dict(), **changes})


MIXERS = ("cfc", "conv")
GATES = ("default", "no_gate", "minimal", "time_free")
RELAXES = ("temb", "t", "none")
IN_CHANNELS = (1, 3, 4)

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
    in_channels: int = 4
    resolution: int = 32
    mixer: str = "cfc"
    gate: str = "default"
    relax: str = "temb"
    kernels: tuple[int, ...] = (3, 5, 7)
    global_pool: bool = True
    adaln: bool = True
    ff_mult: int = 4

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen dataclass)
        set_("channels", _int_tuple("channels", self.channels))
        set_("depths", _int_tuple("depths", self.depths))
        set_("kernels", _int_tuple("kernels", self.kernels))
        set_("global_pool", _on_off("global_pool", self.global_pool))
        set_("adaln", _on_off("adaln", self.adaln))

        if not self.channels or any(c <= 0 for c in self.channels):
            raise ConfigError(f"channels={list(self.channels)} is not valid; expected a non-empty list of positive widths")
        if len(self.depths) != len(self.channels) or any(d < 0 for d in self.depths):
            raise ConfigError(
                f"depths={list(self.depths)} is not valid; expected {len(self.channels)} non-negative block counts, one per entry of channels"
            )
        for name in ("mid_depth", "ff_mult", "resolution"):
            value = getattr(self, name)
            lowest = 0 if name == "mid_depth" else 1
            if not isinstance(value, int) or isinstance(value, bool) or value < lowest:
                raise ConfigError(f"{name}={value!r} is not valid; expected an integer >= {lowest}")
        _choice("mixer", self.mixer, MIXERS)
        _choice("gate", self.gate, GATES)
        _choice("relax", self.relax, RELAXES)
        _choice("in_channels", self.in_channels, IN_CHANNELS)
        if not self.kernels:
            raise ConfigError("kernels=[] is not valid; expected a non-empty list of odd sizes such as [3, 5, 7]")
        if any(k <= 0 or k % 2 == 0 for k in self.kernels):
            raise ConfigError(f"kernels={list(self.kernels)} is not valid; every size must be odd and positive (e.g. 3, 5, 7)")
        factor = 2 ** (len(self.channels) - 1)
        if self.resolution % factor:
            raise ConfigError(
                f"resolution={self.resolution} is not valid; with {len(self.channels)} levels it must be a multiple of {factor}"
            )

    @property
    def time_dim(self) -> int:
        return 4 * self.channels[0]

    @classmethod
    def preset(cls, name: str, **overrides) -> "ModelConfig":
        _choice("preset", name, tuple(PRESETS))
        return cls.from_dict({**PRESETS[name], **overrides})


T_SAMPLINGS = ("uniform", "logit_normal")


@dataclass(frozen=True)
class TrainConfig(_Section):
    """Optimisation settings of one rectified-flow training run."""

    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_images: int = 0
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    t_sampling: str = "uniform"

    def __post_init__(self):
        for name in ("lr", "weight_decay", "grad_clip", "ema_decay"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"{name}={value!r} is not valid; expected a number >= 0")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"ema_decay={self.ema_decay!r} is not valid; expected 0 <= ema_decay < 1")
        if not isinstance(self.warmup_images, int) or self.warmup_images < 0:
            raise ConfigError(f"warmup_images={self.warmup_images!r} is not valid; expected an integer >= 0")
        _choice("t_sampling", self.t_sampling, T_SAMPLINGS)


@dataclass(frozen=True)
class ExperimentConfig:
    """The resolved configuration of one arm: what is logged as params and printed by --dry-run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    @classmethod
    def sections(cls) -> dict[str, type]:
        return {"model": ModelConfig, "train": TrainConfig}

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {name: getattr(self, name).to_dict() for name in self.sections()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ExperimentConfig":
        sections = cls.sections()
        for key in data:
            if key not in sections:
                raise ConfigError(f"unknown section '{key}'{_closest(key, list(sections))}")
        return cls(**{name: kind.from_dict(data.get(name, {})) for name, kind in sections.items()})

    def flat(self) -> dict[str, Any]:
        """`section.key` -> value, the form MLflow params and overrides use."""
        return {f"{s}.{k}": v for s, values in self.to_dict().items() for k, v in values.items()}

    def with_overrides(self, overrides: dict[str, Any]) -> "ExperimentConfig":
        """Apply `section.key: value` overrides; unknown keys and bad values raise ConfigError."""
        data = self.to_dict()
        valid = list(self.flat())
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


__all__ = ["ConfigError", "ModelConfig", "TrainConfig", "ExperimentConfig", "PRESETS", "flatten_overrides"]
