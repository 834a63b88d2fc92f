"""LiquidUNet: the attention-free U-Net of liquid CfC blocks that predicts the rectified-flow velocity.

Inside the blocks activations are channels-last, (B, H, W, C), so every 1x1 map is an `nn.Linear`
over the last axis (as in ConvNeXt); convolutions see the same memory as a channels_last NCHW view.
Section references ([R]/[D], Eq. 10) point to ../shared/MODEL_SPEC.md.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.models.embeddings import TimestepEmbedding, get_timestep_embedding

from .config import ModelConfig


def to_nhwc(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 2, 3, 1)


def to_nchw(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 3, 1, 2)


def norm_groups(dim: int) -> int:
    # 32 groups where the width allows it; the micro preset's 32-wide stage becomes per-channel.
    return math.gcd(32, dim)


class GroupNormNHWC(nn.GroupNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return to_nhwc(super().forward(to_nchw(x)))


class DepthwiseConvNHWC(nn.Conv2d):
    def __init__(self, dim: int, kernel: int):
        super().__init__(dim, dim, kernel, padding=kernel // 2, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return to_nhwc(super().forward(to_nchw(x)))


class ParallelCfC(nn.Module):
    """Closed-form continuous-depth cell (CfC Eq. 10) applied per pixel, its gate driven by the diffusion time."""

    def __init__(self, dim: int, time_dim: int, gate: str):
        super().__init__()
        self.gate = gate
        self.dwconv = DepthwiseConvNHWC(dim, 7)
        self.backbone = nn.Linear(dim, 2 * dim)
        # f, g, h share one matmul; the minimal form uses f alone.
        self.heads = nn.Linear(2 * dim, (1 if gate == "minimal" else 3) * dim)
        if gate in ("default", "no_gate"):
            self.time_ab = nn.Linear(time_dim, 2 * dim)  # a(temb) and b(temb)
        elif gate == "time_free":
            self.a = nn.Parameter(torch.ones(dim))
            self.b = nn.Parameter(torch.zeros(dim))
        else:  # minimal; initialised as in the ncps reference (A = 1, w_tau = 0)
            self.A = nn.Parameter(torch.ones(dim))
            self.w_tau = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, temb: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        z = F.silu(self.backbone(self.dwconv(x)))
        if self.gate == "minimal":
            f = self.heads(z)
            decay = torch.exp(-t[:, None, None, None] * (self.w_tau.abs() + f.abs()))
            return self.proj(self.A - self.A * decay * f)
        f, g, h = self.heads(z).chunk(3, dim=-1)
        g, h = torch.tanh(g), torch.tanh(h)
        if self.gate == "time_free":
            a, b = self.a, self.b
        else:
            a, b = self.time_ab(temb)[:, None, None, :].chunk(2, dim=-1)
        gate = torch.sigmoid(torch.addcmul(-b, a, f))  # a * f - b
        if self.gate == "no_gate":
            return self.proj(torch.addcmul(g, gate, h))  # g + gate * h
        # lerp does not promote: with the time_free gate's fp32 a and b under autocast, the gate is
        # fp32 while g and h are fp16/bf16.
        return self.proj(torch.lerp(h, g, gate.to(h.dtype)))  # gate * g + (1 - gate) * h, in one pass


class ConvMixer(nn.Module):
    """The plain-conv stand-in for ParallelCfC, widened to the same parameter count."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.dwconv = DepthwiseConvNHWC(dim, 7)
        self.expand = nn.Linear(dim, hidden)
        self.reduce = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, temb: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.reduce(F.silu(self.expand(self.dwconv(x))))

    @staticmethod
    def matched_hidden(dim: int, time_dim: int) -> int:
        """Hidden width whose parameter count equals that of a default-gate ParallelCfC of this width."""
        with torch.device("meta"):
            target = sum(p.numel() for p in ParallelCfC(dim, time_dim, "default").parameters())
        dwconv = 49 * dim + dim
        # expand + reduce hold hidden * (2 * dim + 1) + dim parameters.
        return max(1, round((target - dwconv - dim) / (2 * dim + 1)))


class MultiScaleSpatialMix(nn.Module):
    """Sum of same-centred depthwise k x k convolutions plus a global-pool branch (replaces attention)."""

    def __init__(self, dim: int, kernels: tuple[int, ...], global_pool: bool):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(dim, dim, k, padding=k // 2, groups=dim) for k in kernels)
        self.pool_proj = nn.Linear(dim, dim) if global_pool else None
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Exact re-parameterisation: zero-pad every kernel to the largest size and add them, so one
        # depthwise convolution does the work of len(kernels); gradients still reach each kernel.
        size = max(conv.kernel_size[0] for conv in self.convs)
        weight = sum(F.pad(conv.weight, [(size - conv.kernel_size[0]) // 2] * 4) for conv in self.convs)
        bias = sum(conv.bias for conv in self.convs)
        y = to_nhwc(F.conv2d(to_nchw(x), weight, bias, padding=size // 2, groups=x.shape[-1]))
        if self.pool_proj is not None:
            y = y + self.pool_proj(x.mean(dim=(1, 2)))[:, None, None, :]
        return self.out(F.silu(y))


class FeedForward(nn.Sequential):
    def __init__(self, dim: int, mult: int):
        super().__init__(nn.Linear(dim, mult * dim), nn.GELU(), nn.Linear(mult * dim, dim))


class LiquidRelaxation(nn.Module):
    """x <- alpha * x + (1 - alpha) * u with alpha = exp(-softplus(rho) * tau), rho learned per channel."""

    def __init__(self, dim: int):
        super().__init__()
        self.rho = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor, u: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        alpha = torch.exp(-F.softplus(self.rho) * tau[:, None, None, None])
        # lerp does not promote, and under autocast u (a Linear's output) is fp16/bf16 while the
        # residual stream x and alpha are fp32: mix in the residual stream's precision.
        return torch.lerp(u.to(x.dtype), x, alpha.to(x.dtype))  # alpha * x + (1 - alpha) * u, in one pass


class LiquidDiffusionBlock(nn.Module):
    """CfC (or conv) mixer with relaxation, multi-scale spatial mix, feed-forward; each after a time-conditioned
    norm."""

    def __init__(self, dim: int, cfg: ModelConfig):
        super().__init__()
        time_dim = cfg.time_dim
        self.relax = cfg.relax
        self.norms = nn.ModuleList(GroupNormNHWC(norm_groups(dim), dim, affine=not cfg.adaln) for _ in range(3))
        if cfg.adaln:
            # scale and shift for all three norms from one matmul, zero-initialised so every
            # block starts as the unconditioned network.
            self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(time_dim, 6 * dim))
            nn.init.zeros_(self.modulation[1].weight)
            nn.init.zeros_(self.modulation[1].bias)
        else:
            self.time_proj = nn.Linear(time_dim, dim)
        if cfg.mixer == "cfc":
            self.mixer = ParallelCfC(dim, time_dim, cfg.gate)
        else:
            self.mixer = ConvMixer(dim, ConvMixer.matched_hidden(dim, time_dim))
        self.relaxation = LiquidRelaxation(dim) if cfg.relax != "none" else None
        self.spatial = MultiScaleSpatialMix(dim, cfg.kernels, cfg.global_pool)
        self.ff = FeedForward(dim, cfg.ff_mult)

    def forward(self, x: torch.Tensor, temb: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "modulation"):
            scale_shift = self.modulation(temb)[:, None, None, :].chunk(6, dim=-1)
        else:
            x = x + self.time_proj(temb)[:, None, None, :]
            scale_shift = None

        def normed(i: int, x: torch.Tensor) -> torch.Tensor:
            h = self.norms[i](x)
            if scale_shift is None:
                return h
            return torch.addcmul(scale_shift[2 * i + 1], h, 1 + scale_shift[2 * i])  # h * (1 + s) + b

        u = self.mixer(normed(0, x), temb, t)
        if self.relaxation is None:
            x = x + u
        else:
            tau = temb.mean(dim=-1).abs() if self.relax == "temb" else t
            x = self.relaxation(x, u, tau)
        x = x + self.spatial(normed(1, x))
        return x + self.ff(normed(2, x))


class Upsample(nn.Sequential):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(dim_in, dim_out, 3, padding=1))


class LiquidUNet(ModelMixin, ConfigMixin):
    """`LiquidUNet(config)(x, t)` -> velocity of shape x.shape, with t in [0, 1] (1 = noise) of shape (B,)."""

    def __init__(self, config: ModelConfig | dict | None = None):
        super().__init__()
        cfg = config if isinstance(config, ModelConfig) else ModelConfig.from_dict(dict(config or {}))
        # Stored as a plain dict so save_pretrained writes it to config.json and from_pretrained
        # hands it back to this constructor.
        self.register_to_config(config=cfg.to_dict())
        self.model_config = cfg
        ch, levels = cfg.channels, len(cfg.channels)

        self.time_embed = TimestepEmbedding(ch[0], cfg.time_dim)
        self.stem = nn.Sequential(
            nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1), nn.SiLU(), nn.Conv2d(ch[0], ch[0], 3, padding=1)
        )
        self.encoder = nn.ModuleList(
            nn.ModuleList(LiquidDiffusionBlock(ch[i], cfg) for _ in range(cfg.depths[i])) for i in range(levels)
        )
        self.downsamples = nn.ModuleList(nn.Conv2d(ch[i], ch[i + 1], 3, stride=2, padding=1) for i in range(levels - 1))
        self.middle = nn.ModuleList(LiquidDiffusionBlock(ch[-1], cfg) for _ in range(cfg.mid_depth))
        # Decoder modules are indexed by level, like the encoder's, and run from the deepest level up.
        self.skip_fuse = nn.ModuleList(nn.Linear(2 * ch[i], ch[i]) for i in range(levels))
        self.decoder = nn.ModuleList(
            nn.ModuleList(LiquidDiffusionBlock(ch[i], cfg) for _ in range(cfg.depths[i])) for i in range(levels)
        )
        self.upsamples = nn.ModuleList(Upsample(ch[i], ch[i - 1]) for i in range(1, levels))
        self.head = nn.Sequential(
            nn.GroupNorm(norm_groups(ch[0]), ch[0]), nn.SiLU(), nn.Conv2d(ch[0], cfg.in_channels, 3, padding=1)
        )
        nn.init.zeros_(self.head[-1].weight)
        nn.init.zeros_(self.head[-1].bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        sinusoid = get_timestep_embedding(
            t * 1000, self.model_config.channels[0], flip_sin_to_cos=True, downscale_freq_shift=0
        )
        temb = self.time_embed(sinusoid.to(x.dtype))

        h = to_nhwc(self.stem(x.contiguous(memory_format=torch.channels_last)))
        skips = []
        for level, blocks in enumerate(self.encoder):
            for block in blocks:
                h = block(h, temb, t)
            skips.append(h)
            if level < len(self.downsamples):
                h = to_nhwc(self.downsamples[level](to_nchw(h)))
        for block in self.middle:
            h = block(h, temb, t)
        for level in reversed(range(len(self.decoder))):
            h = self.skip_fuse[level](torch.cat([h, skips[level]], dim=-1))
            for block in self.decoder[level]:
                h = block(h, temb, t)
            if level > 0:
                h = to_nhwc(self.upsamples[level - 1](to_nchw(h)))
        return self.head(to_nchw(h)).contiguous()
