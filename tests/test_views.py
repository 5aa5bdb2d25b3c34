"""Views and windows as pure tensor maps: exact inverses, determinism, coverage, and the sync cases' algebra."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from diffcli.shared.errors import DiffcliError
from diffcli.core.sync import synchronized
from diffcli.core.views import (BIJECTIONS, SQUARE_ONLY, ViewOptions, ViewSet, Window, coverage, frame, make_view,
                                window_starts, windows)

SQUARE_SIZES = [(16, 16), (24, 24), (64, 64)]


def disc(h: int, w: int) -> torch.Tensor:
    i = (2 * torch.arange(h) - (h - 1)).view(-1, 1)
    j = (2 * torch.arange(w) - (w - 1)).view(1, -1)
    return i ** 2 + j ** 2 < min(h, w) ** 2


@pytest.mark.parametrize("name", BIJECTIONS)
@pytest.mark.parametrize("size", SQUARE_SIZES + [(16, 32), (24, 8)])
def test_inverse_view_undoes_view_exactly(name, size):
    h, w = size
    opts = ViewOptions(patches=4, pieces=2 if min(h, w) < 16 else 4, squares=2)
    if name in SQUARE_ONLY and h != w:
        with pytest.raises(DiffcliError, match="square"):
            make_view(name, h, w, opts)
        return
    v = make_view(name, h, w, opts)
    x = torch.randn(2, 3, h, w)
    y = v.view(x)
    assert y.shape == x.shape
    assert torch.equal(v.inverse_view(y), x) and torch.equal(v.view(v.inverse_view(x)), x)
    if name != "identity":
        assert not torch.equal(y, x)
    # at twice the size (IF stage II) the view is the same map on 2x2 blocks: it commutes with upsampling
    big = F.interpolate(x, scale_factor=2, mode="nearest")
    assert torch.equal(v.view(big), F.interpolate(y, scale_factor=2, mode="nearest"))
    assert torch.equal(v.inverse_view(v.view(big)), big)


def test_rotations_compose():
    x = torch.randn(1, 3, 16, 16)
    cw, ccw, half = (make_view(n, 16, 16) for n in ("rotate_cw", "rotate_ccw", "rotate_180"))
    y = x
    for _ in range(4):
        y = cw.view(y)
    assert torch.equal(y, x)
    assert torch.equal(ccw.view(cw.view(x)), x) and torch.equal(half.view(x), cw.view(cw.view(x)))
    # clockwise: the top-left corner goes to the top-right
    assert cw.view(x)[..., 0, -1].equal(x[..., 0, 0])


@pytest.mark.parametrize("size", [16, 17, 64])
def test_inner_rotate_turns_only_the_disc(size):
    x = torch.randn(3, size, size)
    v = make_view("inner_rotate", size, size)
    m = disc(size, size)
    assert torch.equal(v.view(x), torch.where(m, torch.rot90(x, -1, (-2, -1)), x))  # 90 degrees: an exact quarter turn
    odd = make_view("inner_rotate", size, size, ViewOptions(inner_angle=37.0))
    y = odd.view(x)
    assert torch.equal(odd.inverse_view(y), x) and torch.equal(y[:, ~m], x[:, ~m]) and not torch.equal(y, x)


def test_permutation_views_are_seeded():
    x = torch.randn(1, 3, 32, 32)
    for name in ("pixel_permute", "patch_permute", "jigsaw"):
        a, b = make_view(name, 32, 32, ViewOptions(seed=3)), make_view(name, 32, 32, ViewOptions(seed=3))
        c = make_view(name, 32, 32, ViewOptions(seed=4))
        assert torch.equal(a.view(x), b.view(x)) and not torch.equal(a.view(x), c.view(x))


def test_bad_views_are_named():
    with pytest.raises(DiffcliError, match="unknown view 'spin'.*identity.*square_hinge"):
        make_view("spin", 16, 16)
    with pytest.raises(DiffcliError, match="does not split"):
        make_view("patch_permute", 20, 20, ViewOptions(patches=8))
    with pytest.raises(DiffcliError, match="whole multiple"):
        make_view("pixel_permute", 16, 16).view(torch.zeros(1, 3, 24, 24))


def test_frames_run_from_the_image_to_its_view():
    x = torch.rand(3, 16, 16) * 2 - 1
    for name in BIJECTIONS:
        v = make_view(name, 16, 16)
        assert torch.equal(frame(v, x, 0), x) and torch.equal(frame(v, x, 1), v.view(x))
        assert frame(v, x, 0.5).shape == x.shape


# ---------------------------------------------------------------- windows

def test_003_windows_41_with_the_last_at_the_border():
    wins = windows(64, 384, (64, 64), 8)
    assert len(wins) == 41 and wins[0].left == 0 and wins[-1].left + 64 == 384
    count = coverage(wins, (64, 384))
    assert count.min() == 1 and count[0, 0, 0] == 1 and count[0, 0, 190] == 8


@pytest.mark.parametrize("h,w,win,stride", [(16, 100, 16, 12), (16, 50, 16, 16), (100, 16, 16, 7), (40, 40, 16, 5),
                                            (16, 16, 16, 3)])
def test_windows_cover_every_pixel_and_both_borders(h, w, win, stride):
    wins = windows(h, w, (win, win), stride)
    count = coverage(wins, (h, w))
    assert (count >= 1).all()
    assert min(x.top for x in wins) == 0 and max(x.top + x.height for x in wins) == h
    assert min(x.left for x in wins) == 0 and max(x.left + x.width for x in wins) == w
    assert len({(x.top, x.left) for x in wins}) == len(wins)
    # the count at (r, c) is (windows over row r) x (windows over column c)
    per = lambda size: torch.tensor([sum(s <= c < s + win for s in window_starts(size, win, stride))
                                     for c in range(size)], dtype=torch.float32)
    assert torch.equal(count[0], torch.outer(per(h), per(w)))


def test_window_errors():
    with pytest.raises(DiffcliError, match="smaller than one window"):
        window_starts(8, 16, 4)
    for stride in (0, 17):
        with pytest.raises(DiffcliError, match="stride"):
            window_starts(64, 16, stride)


def test_window_view_and_inverse():
    z = torch.randn(4, 16, 40)
    win = Window(0, 8, 16, 16, (16, 40))
    crop = win.view(z)
    back = win.inverse_view(crop)
    assert torch.equal(win.view(back), crop) and back[..., :8].abs().sum() == 0
    assert torch.equal(win.scaled(2).view(F.interpolate(z[None], scale_factor=2)[0]),
                       F.interpolate(crop[None], scale_factor=2)[0])


@pytest.mark.parametrize("kind", ["windows", "anagram"])
def test_average_of_forward_is_the_canvas_and_projection_is_idempotent(kind):
    if kind == "windows":
        vs = ViewSet(windows(16, 40, (16, 16), 6), (4, 16, 40))
    else:
        vs = ViewSet([make_view(n, 16, 16) for n in ("identity", "rotate_cw", "negate", "jigsaw")], (3, 16, 16))
    z = torch.randn(vs.canvas)
    torch.testing.assert_close(vs.average(vs.forward(z)), z)
    w = torch.randn(len(vs), *vs.forward(z).shape[1:])
    p = vs.project(w)
    torch.testing.assert_close(vs.project(p), p)


def test_sync_cases_on_a_toy_denoiser():
    """x0 / eps / xt agree on consistent instances (exact views), none does not synchronize."""
    vs = ViewSet([make_view(n, 8, 8) for n in ("identity", "flip")], (1, 8, 8))
    weights = torch.tensor([0.5, -0.3]).view(2, 1, 1, 1)
    toy = lambda x, sigma: x * weights + 0.1  # a different "prompt" per view
    w = vs.forward(torch.randn(vs.canvas))
    sigma = torch.full((2,), 2.0)
    d = {case: synchronized(toy, vs, case)[0](w, sigma) for case in ("x0", "eps", "none")}
    torch.testing.assert_close(d["x0"], d["eps"])
    torch.testing.assert_close(vs.project(d["x0"]), d["x0"])
    assert not torch.allclose(vs.project(d["none"]), d["none"])
    model, hook = synchronized(toy, vs, "xt")
    step = {"x": w.clone()}
    hook(step)
    torch.testing.assert_close(step["x"], w)  # already consistent: the projection changes nothing
