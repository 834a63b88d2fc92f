"""Latent codecs: identity on pixels, the frozen SD-VAE, and TAESD; from the hub or a local directory."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from .config import DataError
from .hub import cache_only_unless_reachable

STANDARD_WEIGHTS = {"sd-vae": "stabilityai/sd-vae-ft-mse", "taesd": "madebyollin/taesd"}


class PixelCodec:
    """Training in pixel space: encode and decode are the identity."""

    name = "pixel"
    digest = "identity"

    def to(self, device):
        return self

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z


class AutoencoderCodec:
    """A frozen diffusers autoencoder; latents are multiplied by its `scaling_factor` (0.18215 for SD-VAE)."""

    def __init__(self, name: str, vae):
        self.name = name
        self.vae = vae.eval().requires_grad_(False)
        self.scale = float(vae.config.scaling_factor)
        digest = hashlib.sha256()
        for key, tensor in sorted(vae.state_dict().items()):
            digest.update(key.encode())
            digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        self.digest = digest.hexdigest()[:16]

    def to(self, device):
        self.vae.to(device)
        return self

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        out = self.vae.encode(x.to(self.vae.device, self.vae.dtype))
        # AutoencoderKL returns a distribution (we keep its mean: the cache stores one latent per
        # image); AutoencoderTiny returns latents directly.
        z = out.latent_dist.mean if hasattr(out, "latent_dist") else out.latents
        return z.float() * self.scale

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae.decode((z / self.scale).to(self.vae.device, self.vae.dtype)).sample.float().clamp(-1, 1)


def load_codec(name: str, weights: str = ""):
    """`pixel`, `sd-vae` or `taesd`; `weights` is a hub id or a local directory written by save_pretrained."""
    if name == "pixel":
        return PixelCodec()
    from diffusers import AutoencoderKL, AutoencoderTiny

    kind = AutoencoderKL if name == "sd-vae" else AutoencoderTiny
    source = weights or STANDARD_WEIGHTS[name]
    try:
        if Path(source).expanduser().is_dir():
            vae = kind.from_pretrained(Path(source).expanduser())
        else:
            with cache_only_unless_reachable() as online:
                vae = kind.from_pretrained(source, local_files_only=not online)
    except (OSError, ValueError) as err:
        raise DataError(
            f"codec '{name}': cannot load weights '{source}' ({type(err).__name__}). Pre-cache them on a connected "
            f"machine (`huggingface-cli download {source}`), or set data.codec_weights to a local directory"
        ) from None
    return AutoencoderCodec(name, vae)
