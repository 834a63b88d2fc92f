"""The correctness oracle: MODEL_SPEC's LiquidUNet written the most direct way.

NCHW throughout, a 1x1 `Conv2d` for every per-pixel map, separate f/g/h heads and a/b time maps,
and one depthwise convolution per spatial-mix kernel. `from_fast` copies a LiquidUNet's weights in,
so both can be compared output for output and gradient for gradient. Too slow to train with.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.models.embeddings import TimestepEmbedding, get_timestep_embedding

from liquid_diffusion.config import ModelConfig


def conv1x1(c_in: int, c_out: int) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 1)


def groups(dim: int) -> int:
    return math.gcd(32, dim)


class RefCfC(nn.Module):
    def __init__(self, dim, time_dim, gate):
        super().__init__()
        self.gate = gate
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.backbone = conv1x1(dim, 2 * dim)
        self.f = conv1x1(2 * dim, dim)
        if gate != "minimal":
            self.g, self.h = conv1x1(2 * dim, dim), conv1x1(2 * dim, dim)
        if gate in ("default", "no_gate"):
            self.a, self.b = nn.Linear(time_dim, dim), nn.Linear(time_dim, dim)
        elif gate == "time_free":
            self.a, self.b = nn.Parameter(torch.ones(dim)), nn.Parameter(torch.zeros(dim))
        else:
            self.A, self.w_tau = nn.Parameter(torch.ones(dim)), nn.Parameter(torch.zeros(dim))
        self.proj = conv1x1(dim, dim)

    def forward(self, x, temb, t):
        z = F.silu(self.backbone(self.dwconv(x)))
        f = self.f(z)
        if self.gate == "minimal":
            A, w_tau = self.A[None, :, None, None], self.w_tau[None, :, None, None]
            return self.proj(A - A * torch.exp(-t[:, None, None, None] * (w_tau.abs() + f.abs())) * f)
        g, h = torch.tanh(self.g(z)), torch.tanh(self.h(z))
        if self.gate == "time_free":
            a, b = self.a[None, :, None, None], self.b[None, :, None, None]
        else:
            a, b = self.a(temb)[:, :, None, None], self.b(temb)[:, :, None, None]
        gate = torch.sigmoid(a * f - b)
        return self.proj(g + gate * h if self.gate == "no_gate" else gate * g + (1 - gate) * h)


class RefConvMixer(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.expand, self.reduce = conv1x1(dim, hidden), conv1x1(hidden, dim)

    def forward(self, x, temb, t):
        return self.reduce(F.silu(self.expand(self.dwconv(x))))


class RefSpatialMix(nn.Module):
    def __init__(self, dim, kernels, global_pool):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(dim, dim, k, padding=k // 2, groups=dim) for k in kernels)
        self.pool_proj = nn.Linear(dim, dim) if global_pool else None
        self.out = conv1x1(dim, dim)

    def forward(self, x):
        y = sum(conv(x) for conv in self.convs)
        if self.pool_proj is not None:
            y = y + self.pool_proj(x.mean(dim=(2, 3)))[:, :, None, None]
        return self.out(F.silu(y))


class RefBlock(nn.Module):
    def __init__(self, dim, cfg: ModelConfig, conv_hidden: int):
        super().__init__()
        self.cfg = cfg
        self.norms = nn.ModuleList(nn.GroupNorm(groups(dim), dim, affine=not cfg.adaln) for _ in range(3))
        if cfg.adaln:
            self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(cfg.time_dim, 6 * dim))
        else:
            self.time_proj = nn.Linear(cfg.time_dim, dim)
        self.mixer = RefCfC(dim, cfg.time_dim, cfg.gate) if cfg.mixer == "cfc" else RefConvMixer(dim, conv_hidden)
        if cfg.relax != "none":
            self.relaxation = nn.Module()
            self.relaxation.rho = nn.Parameter(torch.zeros(dim))
        self.spatial = RefSpatialMix(dim, cfg.kernels, cfg.global_pool)
        self.ff = nn.Sequential(conv1x1(dim, cfg.ff_mult * dim), nn.GELU(), conv1x1(cfg.ff_mult * dim, dim))

    def forward(self, x, temb, t):
        if self.cfg.adaln:
            s = [m[:, :, None, None] for m in self.modulation(temb).chunk(6, dim=1)]
            norm = lambda i, x: self.norms[i](x) * (1 + s[2 * i]) + s[2 * i + 1]  # noqa: E731
        else:
            x = x + self.time_proj(temb)[:, :, None, None]
            norm = lambda i, x: self.norms[i](x)  # noqa: E731
        u = self.mixer(norm(0, x), temb, t)
        if self.cfg.relax == "none":
            x = x + u
        else:
            tau = temb.mean(dim=1).abs() if self.cfg.relax == "temb" else t
            alpha = torch.exp(-F.softplus(self.relaxation.rho)[None, :, None, None] * tau[:, None, None, None])
            x = alpha * x + (1 - alpha) * u
        x = x + self.spatial(norm(1, x))
        return x + self.ff(norm(2, x))


class ReferenceLiquidUNet(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        from liquid_diffusion.model import ConvMixer  # only its parameter-matching rule

        self.cfg = cfg
        ch, levels = cfg.channels, len(cfg.channels)
        block = lambda c: RefBlock(c, cfg, ConvMixer.matched_hidden(c, cfg.time_dim))  # noqa: E731
        self.time_embed = TimestepEmbedding(ch[0], cfg.time_dim)
        self.stem = nn.Sequential(
            nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1), nn.SiLU(), nn.Conv2d(ch[0], ch[0], 3, padding=1)
        )
        self.encoder = nn.ModuleList(nn.ModuleList(block(ch[i]) for _ in range(cfg.depths[i])) for i in range(levels))
        self.downsamples = nn.ModuleList(nn.Conv2d(ch[i], ch[i + 1], 3, stride=2, padding=1) for i in range(levels - 1))
        self.middle = nn.ModuleList(block(ch[-1]) for _ in range(cfg.mid_depth))
        self.skip_fuse = nn.ModuleList(conv1x1(2 * ch[i], ch[i]) for i in range(levels))
        self.decoder = nn.ModuleList(nn.ModuleList(block(ch[i]) for _ in range(cfg.depths[i])) for i in range(levels))
        self.upsamples = nn.ModuleList(
            nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(ch[i], ch[i - 1], 3, padding=1))
            for i in range(1, levels)
        )
        self.head = nn.Sequential(
            nn.GroupNorm(groups(ch[0]), ch[0]), nn.SiLU(), nn.Conv2d(ch[0], cfg.in_channels, 3, padding=1)
        )

    def forward(self, x, t):
        sinusoid = get_timestep_embedding(t * 1000, self.cfg.channels[0], flip_sin_to_cos=True, downscale_freq_shift=0)
        temb = self.time_embed(sinusoid.to(x.dtype))
        h, skips = self.stem(x), []
        for level, blocks in enumerate(self.encoder):
            for b in blocks:
                h = b(h, temb, t)
            skips.append(h)
            if level < len(self.downsamples):
                h = self.downsamples[level](h)
        for b in self.middle:
            h = b(h, temb, t)
        for level in reversed(range(len(self.decoder))):
            h = self.skip_fuse[level](torch.cat([h, skips[level]], dim=1))
            for b in self.decoder[level]:
                h = b(h, temb, t)
            if level > 0:
                h = self.upsamples[level - 1](h)
        return self.head(h)


def fast_to_reference_names(
    fast_state: dict[str, torch.Tensor], ref_state: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Map LiquidUNet weights onto the reference: same names, except the fused f/g/h heads and a/b
    time maps, which are split; Linear weights become 1x1 convolution weights by a reshape."""
    out = {}
    for name, value in fast_state.items():
        owner, leaf = name.rsplit(".", 1)
        if owner.endswith("mixer.heads") or owner.endswith("mixer.time_ab"):
            base, fused = owner.rsplit(".", 1)
            names = "fgh" if fused == "heads" else "ab"
            pieces = value.chunk(sum(f"{base}.{n}.{leaf}" in ref_state for n in names), dim=0)
            for n, piece in zip(names, pieces):
                out[f"{base}.{n}.{leaf}"] = piece
        else:
            out[name] = value
    return {name: value.reshape(ref_state[name].shape) for name, value in out.items()}


def reference_from_fast(fast) -> ReferenceLiquidUNet:
    ref = ReferenceLiquidUNet(fast.model_config)
    ref.load_state_dict(fast_to_reference_names(fast.state_dict(), ref.state_dict()), strict=True)
    return ref
