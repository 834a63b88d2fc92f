"""Encode a dataset through its codec once, keep the result on disk, and reuse it in every later run."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .config import DataConfig, json_digest

log = logging.getLogger(__name__)
CACHE_VERSION = 1  # bump when preprocessing changes, so old caches are never read


def default_cache_dir() -> Path:
    return Path(os.environ.get("LIQUID_DIFFUSION_CACHE", "~/.cache/liquid_diffusion")).expanduser()


def cache_key(source, codec, cfg: DataConfig) -> str:
    """Digest of everything the cached tensor depends on: data content, preprocessing, codec weights."""
    parts = {
        "version": CACHE_VERSION,
        "data": source.digest,
        "resolution": cfg.resolution,
        "channels": cfg.channels,
        "max_images": cfg.max_images,
        "codec": codec.name,
        "codec_weights": codec.digest,
        "flip": cfg.flip,
    }
    return json_digest(parts, 24)


def save_file_atomic(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Write under a temporary name, then rename: a killed process leaves only a .partial file, never read."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    save_file(tensors, partial, metadata=metadata)
    os.replace(partial, path)


def _read(path: Path, source) -> torch.Tensor | None:
    try:
        with safe_open(path, framework="pt") as cached:
            source.skipped = int(cached.metadata()["skipped"])  # as counted when the cache was written
            return cached.get_tensor("latents")
    except (SafetensorError, OSError, KeyError, ValueError, RuntimeError) as err:
        log.warning("ignoring unreadable latent cache %s (%s); encoding again", path, err)
        return None


def load_or_encode(
    source, codec, cfg: DataConfig, cache_dir: Path | None = None, batch_size: int = 64, progress: bool = True
) -> torch.Tensor:
    """All training latents (N, C, h, w) as float32; with `cfg.flip`, each image's mirror follows it."""
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    path = cache_dir / "latents" / f"{cache_key(source, codec, cfg)}.safetensors"
    if path.exists() and (latents := _read(path, source)) is not None:
        log.info("latent cache hit: %s", path)
        return latents.float()

    chunks = []
    for pixels in tqdm(
        source.batches(batch_size), desc=f"encode {cfg.dataset} ({codec.name})", unit="batch", disable=not progress
    ):
        if cfg.flip:
            pixels = torch.stack([pixels, pixels.flip(-1)], dim=1).flatten(0, 1)
        chunks.append(codec.encode(pixels).cpu())
    if not chunks:
        raise ValueError(f"dataset '{cfg.dataset}' yielded no readable images")
    if source.skipped:
        log.warning("%d unreadable images skipped in %s", source.skipped, cfg.dataset)
    latents = torch.cat(chunks)
    # Autoencoder latents are stored as float16 to halve the cache; pixels stay exact in float32.
    stored = latents if codec.name == "pixel" else latents.half()
    meta = {"dataset": cfg.dataset, "codec": codec.name, "images": str(len(latents)), "skipped": str(source.skipped)}
    save_file_atomic({"latents": stored.contiguous()}, path, meta)
    return stored.float()
