"""The fast LiquidUNet equals the direct NCHW reference (tests/reference_model.py) for every arm."""

import pytest
import torch
from helpers import arm_model, randomize_head
from reference_model import fast_to_reference_names, reference_from_fast

from liquid_diffusion import LiquidUNet
from study.arms import load_arms

ARMS = load_arms()


def fast_and_reference(arm: str):
    cfg = arm_model(ARMS[arm], channels=3, size=16)
    torch.manual_seed(0)
    fast = LiquidUNet(cfg)
    with torch.no_grad():  # move off the zero init, so every path carries signal
        for p in fast.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    randomize_head(fast)
    return fast, reference_from_fast(fast)


@pytest.mark.parametrize("arm", sorted(ARMS))
def test_outputs_match_the_reference_in_fp32(arm):
    fast, ref = fast_and_reference(arm)
    x, t = torch.randn(2, 3, 16, 16), torch.rand(2)
    assert torch.allclose(fast(x, t), ref(x, t), atol=1e-4)


@pytest.mark.parametrize("arm", sorted(ARMS))
def test_gradients_match_the_reference(arm):
    # In float64, so that summation order (fp32 cancellation in tiny bias gradients) cannot hide a real difference.
    fast, ref = (m.double() for m in fast_and_reference(arm))
    x, t = torch.randn(2, 3, 16, 16, dtype=torch.float64), torch.rand(2, dtype=torch.float64)
    fast(x, t).square().sum().backward()
    ref(x, t).square().sum().backward()
    grads = fast_to_reference_names({n: p.grad for n, p in fast.named_parameters()}, dict(ref.named_parameters()))
    assert grads.keys() == dict(ref.named_parameters()).keys()
    for name, p in ref.named_parameters():
        assert torch.allclose(grads[name], p.grad, rtol=1e-7, atol=1e-9), f"{arm}: {name}"
