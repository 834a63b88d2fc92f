import pytest
import torch

from liquid_diffusion.flow import euler_sample, rectified_flow_loss, sample_t


class PointMassVelocity(torch.nn.Module):
    """The exact rectified-flow velocity when the data is the single point x0: v = (x_t - x0) / t."""

    def __init__(self, x0):
        super().__init__()
        self.x0 = x0

    def forward(self, x, t):
        return (x - self.x0) / t.view(-1, 1, 1, 1)


def test_loss_is_zero_for_the_true_velocity():
    x0, noise = torch.randn(4, 1, 4, 4), torch.randn(4, 1, 4, 4)
    t = torch.rand(4) * 0.9 + 0.05
    assert rectified_flow_loss(PointMassVelocity(x0), x0, noise, t).abs().max() < 1e-5


def test_loss_is_per_sample_mse_of_noise_minus_data():
    x0, noise, t = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4), torch.rand(3)
    zero = lambda x, t: torch.zeros_like(x)  # noqa: E731
    assert torch.allclose(rectified_flow_loss(zero, x0, noise, t), (noise - x0).square().mean(dim=(1, 2, 3)))


@pytest.mark.parametrize("steps", [1, 5, 25])
def test_euler_from_noise_lands_on_the_data_point(steps):
    x0, noise = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    assert torch.allclose(euler_sample(PointMassVelocity(x0), noise, steps), x0, atol=1e-4)


def test_euler_runs_on_the_even_time_grid_and_matches_a_hand_written_integration():
    seen = []

    def model(x, t):
        seen.append(t[0].item())
        return torch.sin(x) + t.view(-1, 1, 1, 1)

    noise = torch.randn(2, 1, 3, 3)
    out = euler_sample(model, noise, 4)
    # The grid itself, not the one the sampler reports: 1 down to 1/1000 in even steps, then 0.
    times = [1.0, 1.0 - 0.999 / 3, 1.0 - 2 * 0.999 / 3, 0.001, 0.0]
    assert seen == pytest.approx(times[:-1], abs=1e-6)
    x = noise
    for t, t_next in zip(times[:-1], times[1:]):
        x = x - (t - t_next) * (torch.sin(x) + t)
    assert torch.allclose(out, x, atol=1e-6)


def test_t_sampling():
    g = torch.Generator().manual_seed(0)
    uniform, logit = sample_t(20000, "uniform", g), sample_t(20000, "logit_normal", g)
    assert uniform.min() >= 0 and uniform.max() <= 1 and abs(uniform.mean() - 0.5) < 0.01
    assert logit.min() > 0 and logit.max() < 1 and abs(logit.mean() - 0.5) < 0.01
    assert logit.std() < uniform.std()  # logit-normal concentrates around t = 0.5
    with pytest.raises(ValueError, match="uniform, logit_normal"):
        sample_t(2, "beta", g)
