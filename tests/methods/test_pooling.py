"""Second-order pooling against references: einsum, the bilinear kernel, scipy's sqrtm, gradcheck."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import timm
import torch

from fgclf.methods import create_method
from fgclf.methods.pooling import (TensorSketch, bilinear_pool, covariance, newton_schulz_sqrt, signed_sqrt,
                                   upper_triangle)


def _maps(b=3, c=5, h=4, w=6, seed=0) -> torch.Tensor:
    return torch.randn(b, c, h, w, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_bilinear_pool_equals_the_einsum_of_outer_products():
    x = _maps()
    expected = torch.einsum("bchw,bdhw->bcd", x, x) / (4 * 6)
    torch.testing.assert_close(bilinear_pool(x), expected)


def test_signed_sqrt_follows_the_official_form_and_bcnn_features_have_unit_norm():
    z = torch.tensor([-4.0, -1e-3, 0.0, 1e-3, 9.0], dtype=torch.float64)
    eps = 1e-5  # cvl-umass/bilinear-cnn: sqrt(relu(z) + eps) - sqrt(relu(-z) + eps)
    expected = torch.sqrt(torch.relu(z) + eps) - torch.sqrt(torch.relu(-z) + eps)
    torch.testing.assert_close(signed_sqrt(z, eps), expected)
    model = create_method("bcnn", reduce_dim=8).build(timm.create_model("resnet18", num_classes=3), 3)
    feats = model.forward_head(model.forward_features(torch.randn(2, 3, 64, 64)), pre_logits=True)
    assert feats.shape == (2, 64)
    torch.testing.assert_close(feats.norm(dim=1), torch.ones(2))


def test_covariance_is_the_biased_sample_covariance_over_locations():
    x = _maps()
    flat = x.reshape(3, 5, -1).numpy()
    expected = np.stack([np.cov(f, bias=True) for f in flat])
    np.testing.assert_allclose(covariance(x).numpy(), expected, rtol=1e-10, atol=1e-12)
    # the official MPN-COV form X I_hat X^T, I_hat = (-1/M^2) 1 1^T + (1/M) I
    m = flat.shape[2]
    i_hat = -np.ones((m, m)) / m / m + np.eye(m) / m
    np.testing.assert_allclose(covariance(x).numpy(), flat @ i_hat @ flat.transpose(0, 2, 1), rtol=1e-10, atol=1e-12)


def _spd(b=4, c=12, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(b, c, 3 * c, generator=g, dtype=torch.float64)
    return a @ a.transpose(1, 2) / (3 * c) + 0.1 * torch.eye(c, dtype=torch.float64)


def test_newton_schulz_converges_to_scipy_sqrtm():
    a = _spd()
    reference = np.stack([scipy.linalg.sqrtm(m).real for m in a.numpy()])
    errors = []
    for iterations in (3, 5, 10, 30):
        approx = newton_schulz_sqrt(a, iterations).numpy()
        errors.append(np.abs(approx - reference).max() / np.abs(reference).max())
    # five iterations are iSQRT-COV's approximation; more converge to the exact root
    assert errors == sorted(errors, reverse=True) and errors[-1] < 1e-10, errors
    assert errors[1] < 0.1, errors


def test_newton_schulz_passes_gradcheck():
    a = _spd(b=2, c=4).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda m: newton_schulz_sqrt(m, 5), (a,), eps=1e-6, atol=1e-5)


def test_upper_triangle_is_numpys_row_major_upper_triangle():
    a = torch.arange(2 * 16, dtype=torch.float64).reshape(2, 4, 4)
    rows, cols = np.triu_indices(4)
    np.testing.assert_array_equal(upper_triangle(a).numpy(), a.numpy()[:, rows, cols])
    model = create_method("isqrt_cov", reduce_dim=6).build(timm.create_model("resnet18", num_classes=3), 3)
    assert model.num_features == 21 and model.fg_head.in_features == 21


def _sketch_error(dim: int, seeds: range) -> float:
    """Mean squared relative error of <phi(x), phi(y)> as an estimate of <x, y>^2 over hash seeds."""
    g = torch.Generator().manual_seed(123)
    x, y = torch.randn(2, 32, generator=g, dtype=torch.float64)
    y = x + 0.5 * y  # correlated, so the kernel is far from zero
    target = float(x @ y) ** 2
    errors = []
    for seed in seeds:
        ts = TensorSketch(32, dim, seed).double()
        px, py = (ts(v.reshape(1, 32, 1, 1)) for v in (x, y))
        errors.append((float((px * py).sum()) - target) ** 2 / target ** 2)
    return float(np.mean(errors))


def test_tensor_sketch_approximates_the_bilinear_kernel_better_with_more_dimensions():
    coarse, fine = _sketch_error(64, range(40)), _sketch_error(2048, range(40))
    # the estimator is unbiased with variance ~ 1/dim: 32x the dimension, far less error
    assert fine < coarse / 8, (coarse, fine)
    assert fine < 0.01, fine


def test_tensor_sketch_pools_over_locations_and_keeps_its_hashes_in_the_state_dict():
    ts = TensorSketch(5, 16, seed=3).double()
    x = _maps()
    per_location = [ts(x[:, :, i:i + 1, j:j + 1]) for i in range(4) for j in range(6)]
    torch.testing.assert_close(ts(x), torch.stack(per_location).mean(0))
    assert set(ts.state_dict()) == {"h1", "s1", "h2", "s2"}
    other = TensorSketch(5, 16, seed=3)
    assert all(torch.equal(v, other.state_dict()[k]) for k, v in ts.state_dict().items() if k.startswith("h"))


@pytest.mark.parametrize("name", ["bcnn", "cbp", "isqrt_cov"])
def test_pooling_runs_in_float32_under_bf16_autocast(name):
    options = {"reduce_dim": 8, **({"sketch_dim": 32} if name == "cbp" else {})}
    model = create_method(name, **options).build(timm.create_model("resnet18", num_classes=3), 3)
    x = torch.randn(2, 3, 64, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        feats = model.forward_features(x)
        pooled = model.forward_head(feats, pre_logits=True)
    # the pooling and normalisation run in float32 (then the result returns to the features' dtype)
    reference = model.normalise(model.fg_pool(feats.float())).to(torch.bfloat16)
    assert feats.dtype == pooled.dtype == torch.bfloat16
    torch.testing.assert_close(pooled, reference, rtol=0, atol=0)
