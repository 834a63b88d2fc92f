import os

import pytest
import torch
from diffusers import AutoencoderKL, AutoencoderTiny
from helpers import write_images

from liquid_diffusion.codecs import PixelCodec, load_codec
from liquid_diffusion.config import DataConfig, DataError
from liquid_diffusion.data import open_source
from liquid_diffusion.latent_cache import cache_key, load_or_encode


class CountingCodec(PixelCodec):
    def __init__(self):
        self.calls = 0

    def encode(self, x):
        self.calls += 1
        return x * 0.5


def encode(folder, cache, codec, **data):
    cfg = DataConfig(dataset=str(folder), resolution=8, channels=3, **data)
    return load_or_encode(open_source(cfg), codec, cfg, cache, progress=False)


def test_second_run_reads_the_cache_without_encoding(tmp_path):
    folder = write_images(tmp_path / "data")
    (folder / "broken.png").write_bytes(b"not an image")
    first_codec, second_codec = CountingCodec(), CountingCodec()
    first = encode(folder, tmp_path / "cache", first_codec)
    cfg = DataConfig(dataset=str(folder), resolution=8, channels=3)
    source = open_source(cfg)
    second = load_or_encode(source, second_codec, cfg, tmp_path / "cache", progress=False)
    assert first_codec.calls > 0 and second_codec.calls == 0
    assert torch.equal(first, second) and first.shape == (4, 3, 8, 8)
    assert source.skipped == 1  # the count recorded when the cache was written


def test_changed_data_is_encoded_again(tmp_path):
    folder = write_images(tmp_path / "data")
    encode(folder, tmp_path / "cache", CountingCodec())
    write_images(folder, n=1, seed=99)  # overwrite img0.png with different pixels
    codec = CountingCodec()
    encode(folder, tmp_path / "cache", codec)
    assert codec.calls > 0


def test_flip_adds_each_images_mirror(tmp_path):
    folder = write_images(tmp_path / "data", n=2)
    plain = encode(folder, tmp_path / "cache", CountingCodec())
    flipped = encode(folder, tmp_path / "cache", CountingCodec(), flip=True)
    assert flipped.shape[0] == 2 * plain.shape[0]
    assert torch.equal(flipped[0], plain[0]) and torch.equal(flipped[1], plain[0].flip(-1))


def test_half_written_cache_file_is_ignored(tmp_path):
    folder = write_images(tmp_path / "data")
    cfg = DataConfig(dataset=str(folder), resolution=8, channels=3)
    good = encode(folder, tmp_path / "cache", CountingCodec())
    path = tmp_path / "cache" / "latents" / f"{cache_key(open_source(cfg), CountingCodec(), cfg)}.safetensors"
    assert path.exists() and not list(path.parent.glob("*.partial"))
    path.write_bytes(path.read_bytes()[: os.path.getsize(path) // 2])  # as if killed mid-write, without the rename
    codec = CountingCodec()
    again = encode(folder, tmp_path / "cache", codec)
    assert codec.calls > 0 and torch.equal(again, good)


def tiny_sd_vae(path):
    vae = AutoencoderKL(
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        norm_num_groups=4,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
    )
    vae.save_pretrained(path)
    return vae


def tiny_taesd(path):
    vae = AutoencoderTiny(
        encoder_block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8),
        num_encoder_blocks=(1, 1, 1, 1),
        num_decoder_blocks=(1, 1, 1, 1),
        latent_channels=4,
    )
    vae.save_pretrained(path)
    return vae


@pytest.mark.parametrize("name, build", [("sd-vae", tiny_sd_vae), ("taesd", tiny_taesd)])
def test_autoencoder_codecs_load_from_a_local_directory(tmp_path, name, build):
    torch.manual_seed(0)
    reference = build(tmp_path / name).eval()
    codec = load_codec(name, str(tmp_path / name))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    z = codec.encode(x)
    assert z.shape == (2, 4, 4, 4)
    with torch.no_grad():
        out = reference.encode(x)
        raw = out.latent_dist.mean if name == "sd-vae" else out.latents
    assert torch.allclose(z, raw * reference.config.scaling_factor, atol=1e-5)
    if name == "sd-vae":
        assert codec.scale == pytest.approx(0.18215)
    assert codec.decode(z).shape == x.shape and all(not p.requires_grad for p in codec.vae.parameters())


def test_codec_digest_follows_the_weights(tmp_path):
    torch.manual_seed(0)
    tiny_taesd(tmp_path / "a")
    torch.manual_seed(1)
    tiny_taesd(tmp_path / "b")
    assert load_codec("taesd", str(tmp_path / "a")).digest != load_codec("taesd", str(tmp_path / "b")).digest
    assert load_codec("taesd", str(tmp_path / "a")).digest == load_codec("taesd", str(tmp_path / "a")).digest


def test_uncached_hub_codec_fails_with_the_fix():
    with pytest.raises(DataError, match="stabilityai/sd-vae-ft-mse.*codec_weights"):
        load_codec("sd-vae")


def _encode_with(tmp_path, change: str) -> CountingCodec:
    """Encode the folder once as the reference, then once with one part of the cache key changed."""
    folder = write_images(tmp_path / "data", n=3)
    encode(folder, tmp_path / "cache", CountingCodec())
    data, codec = {}, CountingCodec()
    if change == "resolution":
        data = {"resolution": 16}
    elif change == "max_images":
        data = {"max_images": 2}
    elif change == "codec name":
        codec.name = "other-codec"
    elif change == "codec weights":
        codec.digest = "other-weights"
    cfg = DataConfig(dataset=str(folder), **{"resolution": 8, "channels": 3, **data})
    source = open_source(cfg)
    if change == "data digest":  # what the MNIST digest and a hub dataset's fingerprint feed into
        source.digest = "another-content"
    load_or_encode(source, codec, cfg, tmp_path / "cache", progress=False)
    return codec


@pytest.mark.parametrize("change", ["resolution", "max_images", "codec name", "codec weights", "data digest"])
def test_every_part_of_the_cache_key_misses_when_it_changes(tmp_path, change):
    assert _encode_with(tmp_path, change).calls > 0


def test_the_same_key_hits(tmp_path):
    assert _encode_with(tmp_path, "nothing").calls == 0
