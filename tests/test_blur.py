"""Query blurs as pure tensor functions: each against a direct reference on the token grid."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from diffcli.core.query_blur import (box_blur, ema_rows, gaussian_blur, gaussian_kernel_size, interpolated_box_blur,
                                     mean_query, parse_blur, ramp)
from diffcli.shared.errors import DiffcliError


def query(h: int, w: int, batch: int = 2, heads: int = 3, d: int = 4, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, heads, h * w, d, generator=g, dtype=torch.float64)


def as_maps(q: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, heads, h*w, d) -> (B*heads*d, 1, h, w): one image per channel, for torch's 2-D reference ops."""
    b, n_heads, _, d = q.shape
    return q.unflatten(2, (h, w)).permute(0, 1, 4, 2, 3).reshape(b * n_heads * d, 1, h, w)


def from_maps(maps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    b, n_heads, _, d = like.shape
    h, w = maps.shape[-2:]
    return maps.reshape(b, n_heads, d, h, w).permute(0, 1, 3, 4, 2).flatten(2, 3)


def taps(k: int, sigma: float) -> torch.Tensor:
    x = torch.arange(k, dtype=torch.float64) - k // 2
    t = torch.exp(-0.5 * (x / sigma) ** 2)
    return t / t.sum()


def gaussian_conv2d(q: torch.Tensor, h: int, w: int, kh: int, sigma: float, kw: int | None = None) -> torch.Tensor:
    """Direct 2-D convolution with the outer-product kernel (kh x kw) after reflect padding."""
    kw = kh if kw is None else kw
    kernel = (taps(kh, sigma)[:, None] * taps(kw, sigma)[None, :])[None, None]
    padded = F.pad(as_maps(q, h, w), (kw // 2, kw // 2, kh // 2, kh // 2), mode="reflect")
    return from_maps(F.conv2d(padded, kernel), q)


@pytest.mark.parametrize("h,w,k,sigma", [(8, 8, 5, 1.3), (6, 10, 3, 0.7), (7, 5, -1, 0.6), (9, 9, 9, 3.0)])
def test_gaussian_equals_direct_conv2d_with_reflect_padding(h, w, k, sigma):
    q = query(h, w)
    size = gaussian_kernel_size(sigma) if k == -1 else k
    torch.testing.assert_close(gaussian_blur(q, h, w, k, sigma), gaussian_conv2d(q, h, w, size, sigma))


def test_gaussian_kernel_size_rule_and_cap():
    assert [gaussian_kernel_size(s) for s in (0.5, 1, 1.1, 10)] == [3, 7, 7, 61]
    q = query(4, 6)
    # K = -1 with sigma 10 asks for 61 taps: capped per side to the largest odd size, 3 down the rows, 5 across
    torch.testing.assert_close(gaussian_blur(q, 4, 6, -1, 10.0), gaussian_conv2d(q, 4, 6, 3, 10.0, kw=5))
    # an even K is made odd (4 -> 5)
    torch.testing.assert_close(gaussian_blur(q, 4, 6, 4, 1.0), gaussian_conv2d(q, 4, 6, 3, 1.0, kw=5))


def test_gaussian_sigma_zero_is_identity_and_infinite_is_the_mean():
    q = query(4, 6)
    assert torch.equal(parse_blur("gaussian_-1_0")(q, 4, 6), q)
    inf = parse_blur("gaussian_-1_9999999")
    assert inf.infinite and not parse_blur("gaussian_-1_9999").infinite
    out = inf(q, 4, 6)
    torch.testing.assert_close(out, q.mean(2, keepdim=True).expand_as(q))
    torch.testing.assert_close(mean_query(q), out)


def test_box_blur_of_a_constant_is_the_constant():
    for h, w, k in [(8, 8, 3), (5, 9, 4), (6, 6, 11), (1, 7, 3)]:
        c = torch.full((1, 2, h * w, 3), 2.5, dtype=torch.float64)
        torch.testing.assert_close(box_blur(c, h, w, k), c)
    half = torch.full((1, 1, 64 * 64, 2), 3.0, dtype=torch.bfloat16)
    assert torch.equal(box_blur(half, 64, 64, 9), half)


@pytest.mark.parametrize("h,w,k", [(8, 8, 3), (7, 10, 5), (9, 6, 1)])
def test_box_blur_equals_average_pool(h, w, k):
    q = query(h, w)
    out = box_blur(q, h, w, k)
    p = k // 2
    interior = from_maps(F.avg_pool2d(as_maps(q, h, w), k, stride=1), q[..., : (h - 2 * p) * (w - 2 * p), :])
    inner = out.unflatten(2, (h, w))[:, :, p:h - p, p:w - p].flatten(2, 3)
    torch.testing.assert_close(inner, interior)
    # and at the borders: the mean over the cells of the clipped window
    clipped = from_maps(F.avg_pool2d(as_maps(q, h, w), k, stride=1, padding=p, count_include_pad=False), q)
    torch.testing.assert_close(out, clipped)


def test_box_blur_wider_than_the_grid_is_the_mean_and_interpolation_endpoints():
    q = query(5, 7)
    torch.testing.assert_close(box_blur(q, 5, 7, 13), mean_query(q))
    assert torch.equal(interpolated_box_blur(q, 5, 7, 3, 0.0), q)
    torch.testing.assert_close(interpolated_box_blur(q, 5, 7, 3, 1.0), box_blur(q, 5, 7, 3))
    torch.testing.assert_close(interpolated_box_blur(q, 5, 7, 3, 0.25), 0.75 * q + 0.25 * box_blur(q, 5, 7, 3))


def test_ema_is_the_causal_recurrence_along_each_row():
    h, w, alpha = 3, 6, 0.7
    q = query(h, w)
    grid = q.unflatten(2, (h, w))
    ref = grid.clone()
    for j in range(1, w):  # y_0 = x_0, y_j = alpha y_{j-1} + (1 - alpha) x_j; rows restart
        ref[:, :, :, j] = alpha * ref[:, :, :, j - 1] + (1 - alpha) * grid[:, :, :, j]
    torch.testing.assert_close(ema_rows(q, h, w, alpha), ref.flatten(2, 3))
    assert torch.equal(ema_rows(q, h, w, 0.0), q)
    assert torch.equal(parse_blur("ema_0_0_linear").at(0.5)(q, h, w), q)


def test_ema_alpha_ramps_over_the_steps():
    blur = parse_blur("ema_0.2_0.8_linear")
    assert blur.at(0.0).alpha == pytest.approx(0.2) and blur.at(1.0).alpha == pytest.approx(0.8)
    assert blur.at(0.5).alpha == pytest.approx(0.5)
    assert ramp(0.2, 0.8, "quadratic", 0.5) == pytest.approx(0.35)
    assert ramp(0.2, 0.8, "cosine", 0.5) == pytest.approx(0.5) and ramp(0.2, 0.8, "cosine", 0.25) < 0.35


@pytest.mark.parametrize("spec", ["gaussian_10", "gaussian_a_1", "gaussian_0_1", "gaussian_-1_-2", "box_3_0.5",
                                  "interpolatedBoxBlur_0_0.5", "interpolatedBoxBlur_3_1.5", "ema_0.1_0.9_sine",
                                  "ema_0.1_1.2_linear", ""])
def test_malformed_specs_say_the_accepted_forms(spec):
    with pytest.raises(DiffcliError) as e:
        parse_blur(spec)
    message = str(e.value)
    assert "\n" not in message and "gaussian_K_S" in message and "interpolatedBoxBlur_K_A" in message
    assert "ema_A0_A1" in message


def test_specs_parse():
    assert parse_blur("gaussian_-1_10").kernel_size == -1 and parse_blur("gaussian_-1_10").sigma == 10
    assert parse_blur("gaussian_-1_inf").infinite
    assert parse_blur("interpolatedBoxBlur_5_0.5").alpha == 0.5
    assert parse_blur("ema_0.5_0.9_quadratic").ramp == "quadratic"
    assert math.isclose(parse_blur("gaussian_3_1e-1").sigma, 0.1)
