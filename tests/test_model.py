import pytest
import torch
import torch.nn.functional as F
from helpers import arm_model, randomize_head

from liquid_diffusion import LiquidUNet, ModelConfig
from liquid_diffusion.model import LiquidDiffusionBlock, ParallelCfC
from study.arms import load_arms

ARMS = load_arms()


def micro(**changes) -> ModelConfig:
    return ModelConfig.preset("micro", **changes)


@pytest.mark.parametrize("shape", [(1, 16, 16), (4, 8, 8)], ids=["1x16x16", "4x8x8"])
@pytest.mark.parametrize("arm", sorted(ARMS))
def test_every_arm_runs_forward_and_backward(arm, shape):
    channels, size, _ = shape
    cfg = arm_model(ARMS[arm], channels, size)
    torch.manual_seed(0)
    model = LiquidUNet(cfg)
    randomize_head(model)
    x, t = torch.randn(2, *shape), torch.rand(2)
    out = model(x, t)
    assert out.shape == x.shape and torch.isfinite(out).all()
    out.square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{arm}: {name} gets no gradient"
        assert torch.isfinite(p.grad).all(), f"{arm}: {name} has non-finite gradient"


def test_untrained_model_outputs_exactly_zero():
    model = LiquidUNet(micro(in_channels=1, resolution=16))
    assert torch.equal(model(torch.randn(3, 1, 16, 16), torch.rand(3)), torch.zeros(3, 1, 16, 16))


def test_scalar_t_is_broadcast_over_the_batch():
    torch.manual_seed(0)
    model = LiquidUNet(micro(in_channels=1, resolution=8))
    randomize_head(model)
    x = torch.randn(2, 1, 8, 8)
    assert torch.allclose(model(x, torch.tensor(0.3)), model(x, torch.full((2,), 0.3)))


def test_save_pretrained_round_trip_gives_identical_outputs(tmp_path):
    torch.manual_seed(0)
    model = LiquidUNet(micro(in_channels=3, resolution=16, relax="t", gate="minimal"))
    randomize_head(model)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").exists()
    loaded = LiquidUNet.from_pretrained(tmp_path)
    assert loaded.model_config == model.model_config
    x, t = torch.randn(2, 3, 16, 16), torch.rand(2)
    assert torch.equal(model(x, t), loaded(x, t))


# --- each switch changes the computation the way it claims -------------------------------------


class Zero(torch.nn.Module):
    def forward(self, x, *args):
        return torch.zeros_like(x)


def first_sublayer(relax: str):
    """A block whose spatial-mix and feed-forward are silenced, so its output is the CfC sub-layer's."""
    torch.manual_seed(0)
    cfg = micro(relax=relax)
    block = LiquidDiffusionBlock(32, cfg)
    block.spatial, block.ff = Zero(), Zero()
    if block.relaxation is not None:
        with torch.no_grad():
            block.relaxation.rho.copy_(torch.randn(32))
    captured = {}
    block.mixer.register_forward_hook(lambda mod, inp, out: captured.__setitem__("u", out))
    x, temb, t = torch.randn(2, 4, 4, 32), torch.randn(2, cfg.time_dim), torch.rand(2)
    out = block(x, temb, t)
    return out, x, captured["u"], temb, t, block


def test_relax_none_is_the_plain_residual():
    out, x, u, *_ = first_sublayer("none")
    assert torch.equal(out, x + u)


def test_relax_t_matches_the_formula():
    out, x, u, _, t, block = first_sublayer("t")
    alpha = torch.exp(-F.softplus(block.relaxation.rho) * t[:, None, None, None])
    assert torch.allclose(out, alpha * x + (1 - alpha) * u, atol=1e-6)
    assert not torch.allclose(out, x + u, atol=1e-3)


def test_relax_temb_uses_the_mean_time_embedding():
    out, x, u, temb, _, block = first_sublayer("temb")
    tau = temb.mean(dim=-1).abs()
    alpha = torch.exp(-F.softplus(block.relaxation.rho) * tau[:, None, None, None])
    assert torch.allclose(out, alpha * x + (1 - alpha) * u, atol=1e-6)


def test_fewer_kernels_mean_fewer_parameters_and_a_different_output():
    torch.manual_seed(0)
    full = LiquidUNet(micro(in_channels=1, resolution=16))
    randomize_head(full)
    only3 = LiquidUNet(micro(in_channels=1, resolution=16, kernels=(3,)))
    # Same weights everywhere; the 3x3 kernels are convs.0 in both, the 5x5/7x7 ones are dropped.
    missing, unexpected = only3.load_state_dict(full.state_dict(), strict=False)
    assert not missing and unexpected and all(".convs.1." in k or ".convs.2." in k for k in unexpected)
    assert sum(p.numel() for p in only3.parameters()) < sum(p.numel() for p in full.parameters())
    x, t = torch.randn(2, 1, 16, 16), torch.rand(2)
    assert not torch.allclose(full(x, t), only3(x, t), atol=1e-5)


def test_merged_spatial_kernels_equal_separate_convolutions():
    torch.manual_seed(0)
    block = LiquidDiffusionBlock(32, micro())
    mix = block.spatial
    x = torch.randn(2, 6, 6, 32)
    x_nchw = x.permute(0, 3, 1, 2)
    y = sum(conv(x_nchw) for conv in mix.convs).permute(0, 2, 3, 1)
    y = y + mix.pool_proj(x.mean(dim=(1, 2)))[:, None, None, :]
    assert torch.allclose(mix(x), mix.out(F.silu(y)), atol=1e-5)


@pytest.mark.parametrize("gate", ["default", "no_gate", "minimal", "time_free"])
def test_cfc_gate_matches_its_formula(gate):
    dim, time_dim = 2, 3
    cell = ParallelCfC(dim, time_dim, gate)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # hand-set weights, not the module's init
        for p in cell.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.7)
    x = torch.randn(1, 3, 3, dim, generator=gen)
    temb = torch.randn(1, time_dim, generator=gen)
    t = torch.tensor([0.4])

    # Direct computation, NCHW convolution and explicit matmuls.
    dw = F.conv2d(x.permute(0, 3, 1, 2), cell.dwconv.weight, cell.dwconv.bias, padding=3, groups=dim).permute(
        0, 2, 3, 1
    )
    z = F.silu(dw @ cell.backbone.weight.T + cell.backbone.bias)
    heads = z @ cell.heads.weight.T + cell.heads.bias
    f = heads[..., :dim]
    if gate == "minimal":
        inner = cell.A - cell.A * torch.exp(-0.4 * (cell.w_tau.abs() + f.abs())) * f
    else:
        g, h = torch.tanh(heads[..., dim : 2 * dim]), torch.tanh(heads[..., 2 * dim :])
        if gate == "time_free":
            a, b = cell.a, cell.b
        else:
            ab = temb @ cell.time_ab.weight.T + cell.time_ab.bias
            a, b = ab[:, :dim], ab[:, dim:]
        sig = 1 / (1 + torch.exp(-(a * f - b)))
        inner = g + sig * h if gate == "no_gate" else sig * g + (1 - sig) * h
    expected = inner @ cell.proj.weight.T + cell.proj.bias
    assert torch.allclose(cell(x, temb, t), expected, atol=1e-6)


def test_time_free_gate_ignores_the_time_embedding():
    cell = ParallelCfC(4, 8, "time_free")
    x = torch.randn(1, 2, 2, 4)
    assert torch.equal(cell(x, torch.randn(1, 8), torch.rand(1)), cell(x, torch.randn(1, 8), torch.rand(1)))


def test_no_adaln_uses_affine_norms_and_one_time_projection_per_block():
    block = LiquidDiffusionBlock(32, micro(adaln=False))
    assert all(norm.affine for norm in block.norms)
    assert not hasattr(block, "modulation") and block.time_proj.out_features == 32


def test_no_global_pool_drops_the_branch():
    block = LiquidDiffusionBlock(32, micro(global_pool="off"))
    assert block.spatial.pool_proj is None
    with_pool = LiquidDiffusionBlock(32, micro()).spatial
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    assert count(block.spatial) == count(with_pool) - (32 * 32 + 32)
