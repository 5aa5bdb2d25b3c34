"""Autoguidance (--ag-model/--ag-scale) and guidance intervals (--TERM-sigma-min/--TERM-sigma-max) on digit models:
the formula against edm2's lerp, off == the run without it bit for bit, the guide's checks, one naming scheme."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import TINY_TRAIN, call_cli, pixels, write_digit_folder
from diffcli.backends.models import load_model
from diffcli.core.guidance import Autoguide, autoguided, classifier_free, inside, stack
from diffcli.drawing import sample_images
from diffcli.sample import SampleConfig

CPU = torch.device("cpu")


def _net(seed: int):
    """A fixed, nonlinear stand-in denoiser D(x, sigma, class_labels=) whose output depends on the label."""
    g = torch.Generator().manual_seed(seed)
    w, e = torch.randn(4, 4, generator=g), torch.randn(11, 4, generator=g)

    def denoise(x, sigma, class_labels=None, **kw):
        h = torch.tanh(x.flatten(1) @ w + e[class_labels]) / (1 + sigma.view(-1, 1) ** 2)
        return h.view_as(x)
    return denoise


def test_autoguided_is_edm2_lerp_and_off_outside_its_interval():
    main, guide = _net(0), _net(1)
    x, sigma, y = torch.randn(3, 4), torch.full((3,), 2.0), torch.tensor([0, 3, 7])
    for w in (0.5, 2.0, 3.5):
        got = autoguided(main, guide, w)(x, sigma, class_labels=y)
        # edm2 generate_images.py: gnet(x).lerp(net(x), guidance)
        assert torch.equal(got, guide(x, sigma, class_labels=y).lerp(main(x, sigma, class_labels=y), w))
        assert torch.allclose(got, guide(x, sigma, class_labels=y) + w * (main(x, sigma, class_labels=y)
                                                                          - guide(x, sigma, class_labels=y)))
    # identical denoisers: the guide changes nothing; w = 1: the main network itself (no guide pass)
    assert torch.equal(autoguided(main, main, 2.5)(x, sigma, class_labels=y), main(x, sigma, class_labels=y))
    assert autoguided(main, guide, 1.0) is main
    # the interval (lo, hi]: lo itself excluded, hi included
    assert torch.equal(autoguided(main, guide, 2.0, 2.0, 5.0)(x, sigma, class_labels=y), main(x, sigma, class_labels=y))
    assert not torch.equal(autoguided(main, guide, 2.0, 1.0, 2.0)(x, sigma, class_labels=y),
                           main(x, sigma, class_labels=y))
    assert inside(torch.tensor([2.0]), 1.0, 2.0) and not inside(2.0, 2.0, 3.0) and inside(1e-3)


def test_autoguidance_runs_under_cfg_on_both_passes():
    """AG composes with CFG: every pass CFG makes runs on the autoguided network, in the same batch."""
    main, guide = _net(0), _net(1)
    x, sigma = torch.randn(3, 4), torch.full((3,), 1.5)
    cond, uncond = {"class_labels": torch.tensor([1, 2, 3])}, {"class_labels": torch.full((3,), 10)}
    got = stack(main, 3.0, cond, uncond, None, ag=Autoguide(guide, 2.0))(x, sigma)
    ag = autoguided(main, guide, 2.0)
    d_u, d_c = ag(x, sigma, **uncond), ag(x, sigma, **cond)
    assert torch.allclose(got, d_u + 3.0 * (d_c - d_u), atol=1e-6)


def test_cfg_interval_is_cfg_inside_and_conditional_outside():
    main = _net(0)
    x = torch.randn(3, 4)
    cond, uncond = {"class_labels": torch.tensor([1, 2, 3])}, {"class_labels": torch.full((3,), 10)}
    full, windowed = classifier_free(main, 3.0, cond, uncond), classifier_free(main, 3.0, cond, uncond, lo=0.5, hi=2.0)
    for s, guided in ((0.4, False), (0.5, False), (1.0, True), (2.0, True), (2.1, False)):
        sigma = torch.full((3,), s)
        expect = full(x, sigma) if guided else main(x, sigma, **cond)
        assert torch.equal(windowed(x, sigma), expect), s


@pytest.fixture(scope="module")
def guide_run(tmp_path_factory, digit_folder):
    """A second tiny model of the same data and classes: another seed, fewer steps, a snapshot."""
    out = tmp_path_factory.mktemp("guide") / "guide"
    call_cli("train", "--dataset", f"folder:{digit_folder}", "--steps", "2", "--seed", "1", "--snapshot-every", "1",
             "--out", out, *TINY_TRAIN, check=True)
    return out


def _sample(tmp_path, run, name, *extra):
    out = tmp_path / name
    call_cli("sample", "--checkpoint", run, "--n", 4, "--steps", 3, "--seed", 5, "--out", out, "--device", "cpu",
             *extra, check=True)
    return {p.name: pixels(p) for p in sorted(out.glob("*.png"))}, json.loads((out / "run.json").read_text())


def test_ag_off_and_identical_guide_give_the_plain_run_bit_for_bit(tmp_path, tiny_run, guide_run):
    plain, record = _sample(tmp_path, tiny_run, "plain")
    assert not any(k.startswith("ag_") or k.startswith("cfg_sigma") for k in record["options"]), \
        "unset interval/AG options stay out of run.json"
    assert _sample(tmp_path, tiny_run, "w1", "--ag-model", f"{guide_run}@1", "--ag-scale", "1")[0] == plain
    # the model as its own guide: D + w (D - D) = D, through the CLI's whole path (groups, labels, batches)
    assert _sample(tmp_path, tiny_run, "self", "--ag-model", tiny_run, "--ag-scale", "3")[0] == plain
    guided, record = _sample(tmp_path, tiny_run, "ag", "--ag-model", f"{guide_run}@1", "--ag-scale", "2")
    assert guided != plain and record["options"]["ag_scale"] == 2.0
    # an interval that holds none of the steps is no guidance; AG in the library equals the CLI
    assert _sample(tmp_path, tiny_run, "none", "--ag-model", f"{guide_run}@1", "--ag-sigma-max", "1e-4")[0] == plain
    model, meta = load_model(tiny_run)
    cfg = SampleConfig(n=4, steps=3, seed=5, ag_model=f"{guide_run}@1", ag_scale=2.0, checkpoint=str(tiny_run))
    images, _, _ = sample_images(model, meta, cfg, CPU)
    again, _, _ = sample_images(model, meta, SampleConfig(**{**cfg.__dict__, "batch_size": 1}), CPU)
    assert torch.equal(images, again), "AG samples do not depend on the batch size"


def test_cfg_interval_off_and_empty(tmp_path, tiny_run):
    cfg2, _ = _sample(tmp_path, tiny_run, "cfg2", "--cfg", "2")
    assert _sample(tmp_path, tiny_run, "every", "--cfg", "2", "--cfg-sigma-min", "0", "--cfg-sigma-max", "inf")[0] == cfg2
    cond, _ = _sample(tmp_path, tiny_run, "cond")
    assert _sample(tmp_path, tiny_run, "empty", "--cfg", "2", "--cfg-sigma-max", "1e-4")[0] == cond
    part, record = _sample(tmp_path, tiny_run, "part", "--cfg", "2", "--cfg-sigma-min", "1")
    assert part not in (cfg2, cond) and record["options"]["cfg_sigma_min"] == 1.0


def test_old_interval_names_are_aliases(tmp_path, tiny_run):
    new, _ = _sample(tmp_path, tiny_run, "new", "--blur", "gaussian_-1_9999999", "--seg-sigma-max", "5",
                     "--seg-sigma-min", "0.5")
    old, _ = _sample(tmp_path, tiny_run, "old", "--blur", "gaussian_-1_9999999", "--sigma-start", "5",
                     "--sigma-end", "0.5")
    assert new == old


@pytest.mark.parametrize("extra, message", [
    (["--ag-scale", "2"], "--ag-scale needs --ag-model"),
    (["--ag-model", "{guide}@1", "--ag-scale", "-1"], "--ag-scale must be a finite number >= 0"),
    (["--ag-model", "{guide}@1", "--ag-scale", "nan"], "--ag-scale must be a finite number"),
    (["--ag-model", "{guide}@1", "--ag-sigma-min", "3", "--ag-sigma-max", "1"], "need --ag-sigma-min <= --ag-sigma-max"),
    (["--cfg-sigma-min", "3", "--cfg-sigma-max", "1"], "need --cfg-sigma-min <= --cfg-sigma-max"),
    (["--ag-model", "{guide}@7"], "has no snapshot of step 7"),
    (["--ag-model", "{other}"], "the guide must draw what the model draws"),
    (["--ag-model", "mnist-edm"], "the guide must draw what the model draws"),
])
def test_bad_guides_are_refused_before_writing(tmp_path, tmp_path_factory, tiny_run, guide_run, extra, message):
    other = tmp_path_factory.mktemp("other") / "run"
    if "{other}" in extra:
        folder = write_digit_folder(tmp_path_factory.mktemp("two"), classes=2)
        call_cli("train", "--dataset", f"folder:{folder}", "--steps", "1", "--out", other, *TINY_TRAIN, check=True)
    args = [a.format(guide=guide_run, other=other) for a in extra]
    out = tmp_path / "out"
    proc = call_cli("sample", "--checkpoint", tiny_run, "--n", 2, "--steps", 2, "--out", out, "--device", "cpu", *args)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not out.exists()


def test_intervals_everywhere_by_default():
    assert inside(80.0) and inside(0.002) and math.isinf(SampleConfig(n=1).cfg_sigma_max)


# ---------------------------------------------------------------- pipelines: a smaller sibling as the guide

@pytest.fixture(scope="module")
def narrow_sd(tmp_path_factory) -> Path:
    """The tiny SD's sibling: the same VAE, text encoder and latent space, a narrower UNet (8, 16), other weights."""
    from pipes import build_tiny_sd
    return build_tiny_sd(tmp_path_factory.mktemp("narrow-sd"), widths=(8, 16), seed=1)


def _seg(tmp_path, sd, name, *extra):
    out = tmp_path / name
    call_cli("seg", "a cat", "--model", sd, "--n", 2, "--steps", 3, "--seg-scale", "0", "--out", out, "--device", "cpu",
             *extra, check=True)
    return {p.name: pixels(p) for p in sorted(out.glob("*.png"))}


def test_pipeline_guide_is_a_smaller_sibling(tmp_path, tiny_sd, narrow_sd, tiny_sdxl):
    plain = _seg(tmp_path, tiny_sd, "plain")
    assert _seg(tmp_path, tiny_sd, "off", "--ag-model", narrow_sd, "--ag-scale", "1") == plain
    assert _seg(tmp_path, tiny_sd, "self", "--ag-model", tiny_sd, "--ag-scale", "2") == plain
    assert _seg(tmp_path, tiny_sd, "ag", "--ag-model", narrow_sd, "--ag-scale", "2") != plain
    # SEG on both networks, AG and CFG in one run
    _seg(tmp_path, tiny_sd, "seg", "--ag-model", narrow_sd, "--seg-scale", "3", "--blur", "gaussian_-1_9999999")
    out = tmp_path / "bad"
    proc = call_cli("seg", "a cat", "--model", tiny_sd, "--n", 1, "--steps", 2, "--ag-model", tiny_sdxl, "--out", out,
                    "--device", "cpu")
    assert proc.returncode != 0 and "the guide must share the model's latent space" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not out.exists()


def test_the_shipped_guide_guides_the_shipped_model(tmp_path):
    """`--ag-model mnist-edm-guide`: the shipped name resolves, fits the shipped model, and changes its samples."""
    def draw(name, *extra):
        out = tmp_path / name
        call_cli("sample", "--n", 2, "--steps", 2, "--seed", 3, "--out", out, "--device", "cpu", *extra, check=True)
        return [pixels(p) for p in sorted(out.glob("0*.png"))]
    assert draw("ag", "--ag-model", "mnist-edm-guide", "--ag-scale", "2") != draw("plain")
