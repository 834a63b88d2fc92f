"""Rectified flow: x_t = (1 - t) x0 + t noise, target v = noise - x0, sampled by Euler from t = 1 to 0."""

from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler


def sample_t(n: int, kind: str, generator: torch.Generator) -> torch.Tensor:
    """Training times: uniform on [0, 1], or logit-normal(0, 1) as in SD3."""
    if kind == "uniform":
        return torch.rand(n, generator=generator)
    if kind == "logit_normal":
        return torch.sigmoid(torch.randn(n, generator=generator))
    raise ValueError(f"t_sampling={kind!r} is not valid; choose one of: uniform, logit_normal")


def rectified_flow_loss(model, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Per-sample MSE between the predicted and the true velocity, shape (B,)."""
    t_ = t.view(-1, *([1] * (x0.ndim - 1)))
    x_t = (1 - t_) * x0 + t_ * noise
    v = model(x_t, t)
    return (v.float() - (noise - x0)).square().flatten(1).mean(1)


@torch.no_grad()
def euler_sample(model, noise: torch.Tensor, steps: int) -> torch.Tensor:
    """Integrate dx/dt = v from t = 1 (noise) to t = 0 (data) with diffusers' flow-matching Euler scheduler.

    Its sigma is our t: sigma runs from 1 down to 1/1000 in `steps` even steps, then one step to 0.
    """
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    scheduler.set_timesteps(steps, device=noise.device)
    x = noise
    for timestep, sigma in zip(scheduler.timesteps, scheduler.sigmas):
        v = model(x, sigma.expand(x.shape[0]).to(x.dtype))
        # Under autocast v is fp16/bf16, and the scheduler returns its result in v's dtype: keep the
        # integrated state in the noise's precision, or every step would round it.
        x = scheduler.step(v.to(x.dtype), timestep, x).prev_sample
    return x
