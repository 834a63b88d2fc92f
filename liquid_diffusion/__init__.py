"""LiquidDiffusion: an attention-free diffusion U-Net of liquid CfC blocks, and the parts to train and ablate it."""

from .config import ConfigError, DataConfig, ExperimentConfig, ModelConfig, TrainConfig


def __getattr__(name: str):
    # torch and diffusers take seconds to import; commands such as `run.py --list` never need them.
    if name == "LiquidUNet":
        from .model import LiquidUNet

        return LiquidUNet
    raise AttributeError(f"module 'liquid_diffusion' has no attribute {name!r}")


__all__ = ["ConfigError", "DataConfig", "ExperimentConfig", "LiquidUNet", "ModelConfig", "TrainConfig"]
