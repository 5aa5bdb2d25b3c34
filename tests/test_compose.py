"""Guidance and samplers compose in every command: switching a method off is the command without it, bit for bit;
SEG in a one-window panorama is `diffcli seg`; every pass of a step is one network call; options a model or command
cannot use are refused in one line before anything is written."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import ROOT, invoke_cli
from diffcli.backends import pipelines
from diffcli import options, seg
from diffcli.shared.errors import DiffcliError
from diffcli.backends.models import load_model
from diffcli.panorama import PanoramaConfig, generate, plan, validate
from diffcli.core.guidance import Guidance
from diffcli.core.query_blur import parse_blur
from diffcli.drawing import sample_images
from diffcli.sample import SampleConfig

CPU = torch.device("cpu")
SHIPPED = ROOT / "checkpoints" / "mnist-edm.safetensors"


@pytest.fixture(scope="module")
def sd(tiny_sd):
    return pipelines.load_pipeline(str(tiny_sd), CPU, torch.float32)


def panorama(pipe, **kw):
    cfg = PanoramaConfig(**{"prompt": "a beach", "steps": 3, "height": 16, "width": 40, "stride": 3, **kw})
    p = plan(pipe, cfg, validate(cfg))
    return (*generate(pipe, p, cfg.prompt, cfg, CPU), p)


def count_calls(monkeypatch, unet) -> list[int]:
    sizes: list[int] = []
    forward = unet.forward
    monkeypatch.setattr(unet, "forward", lambda x, *a, **k: sizes.append(len(x)) or forward(x, *a, **k))
    return sizes


# ---------------------------------------------------------------- off = without, bit for bit

def test_seg_scale_zero_and_pg_factor_zero_are_the_plain_panorama(sd):
    plain, z, _ = panorama(sd)
    for off in (dict(blurs=["gaussian_-1_2"], seg_scale=0.0), dict(pg_factor=0.0, kernel="rbf")):
        image, z_off, _ = panorama(sd, **off)
        assert torch.equal(z_off, z) and torch.equal(image, plain)
    guided, z_seg, _ = panorama(sd, blurs=["gaussian_-1_2"], seg_scale=3.0)
    assert not torch.equal(z_seg, z)  # and on is not off


def test_seg_and_pg_off_are_plain_sample_on_our_own_model():
    model, meta = load_model(SHIPPED, CPU)
    base = dict(n=4, steps=3, labels="1,7", cfg=2.0)
    plain, _, _ = sample_images(model, meta, SampleConfig(**base), CPU)
    for off in (dict(blurs=["gaussian_-1_1"], seg_scale=0.0), dict(pg_factor=0.0)):
        same, _, _ = sample_images(model, meta, SampleConfig(**base, **off), CPU)
        assert torch.equal(same, plain)
    with_seg, _, _ = sample_images(model, meta, SampleConfig(**base, blurs=["gaussian_-1_1"]), CPU)
    with_pg, _, _ = sample_images(model, meta, SampleConfig(**base, pg_factor=5.0), CPU)
    assert not torch.equal(with_seg, plain) and not torch.equal(with_pg, plain)


def test_seg_in_a_one_window_panorama_is_diffcli_seg(sd):
    blur = "gaussian_-1_2"
    image, _, _ = panorama(sd, width=16, blurs=[blur], seg_scale=2.0, cfg=4.0, layers=["down", "mid"], seed=5)
    cfg = seg.SegConfig(prompts=["a beach"], steps=3, cfg=4.0, seg_scale=2.0, blurs=[blur], layers=["down", "mid"],
                        height=16, width=16, seed=5)
    g = options.seg_of(cfg, parse_blur(blur))
    cond, uncond = pipelines.encode_prompts(sd, ["a beach"], None, 16, 16, CPU)
    with g.installed(sd.unet):
        alone = seg.sample(sd, cond, uncond, [5], cfg, Guidance(4.0, g), pipelines.sigmas(sd, 3, CPU), CPU)
    torch.testing.assert_close(image, alone[0], atol=1e-5, rtol=0)


# ---------------------------------------------------------------- one network call a step

def test_panorama_perturbed_pass_rides_in_the_one_batched_call(sd, monkeypatch):
    sizes = count_calls(monkeypatch, sd.unet)
    _, _, p = panorama(sd, blurs=["gaussian_-1_2"], seg_scale=3.0, view_batch=8)
    windows = len(p.views)
    assert sizes == [3 * windows] * 3  # uncond, cond and perturbed rows of every window: one call per step


def test_sample_seg_with_cfg_is_one_call_of_three_chunks(monkeypatch):
    model, meta = load_model(SHIPPED, CPU)
    sizes = count_calls(monkeypatch, model.net.unet)
    sample_images(model, meta, SampleConfig(n=2, steps=2, labels="3", cfg=2.0, blurs=["gaussian_-1_1"],
                                            sampler="euler"), CPU)
    assert len(sizes) == 2 and all(size % 3 == 0 and size >= 6 for size in sizes)  # one call a step, 3 chunks


# ---------------------------------------------------------------- the examples, end to end

def cli_ok(capsys, *args):
    code, out, err = invoke_cli(args, capsys)
    assert code == 0, err
    return out


def test_cli_examples_compose(tiny_sd, tmp_path, capsys):
    cli_ok(capsys, "panorama", "a beach", "--model", tiny_sd, "--height", "16", "--width", "40", "--stride", "3",
            "--steps", "2", "--blur", "gaussian_-1_10", "--seg-scale", "3", "--out", tmp_path / "pano")
    record = json.loads((tmp_path / "pano.run.json").read_text())
    assert record["options"]["blurs"] == ["gaussian_-1_10"] and record["options"]["seg_scale"] == 3.0
    cli_ok(capsys, "pg", "a dog", "--model", tiny_sd, "--n", "2", "--steps", "2", "--blur", "gaussian_-1_10",
            "--pg-factor", "5", "--sampler", "dpmpp_2m", "--schedule", "karras", "--out", tmp_path / "pg")
    cli_ok(capsys, "seg", "a cat", "--model", tiny_sd, "--steps", "3", "--n", "2", "--pg-factor", "2",
            "--sampler", "euler_ancestral", "--out", tmp_path / "seg")
    cli_ok(capsys, "sample", "--n", "2", "--steps", "2", "--blur", "gaussian_-1_1", "--pg-factor", "1.7",
            "--sampler", "dpmpp_2m", "--out", tmp_path / "digits")
    assert len(list((tmp_path / "digits").glob("0000*.png"))) == 2


def test_stochastic_sampler_on_a_panorama_is_seeded_and_synchronized(sd):
    a, z, p = panorama(sd, sampler="euler_ancestral", seed=3)
    b, _, _ = panorama(sd, sampler="euler_ancestral", seed=3)
    c, _, _ = panorama(sd, sampler="euler_ancestral", seed=4)
    assert torch.equal(a, b) and not torch.equal(a, c)


# ---------------------------------------------------------------- refused in one line, nothing written

@pytest.mark.parametrize("args,message", [
    (["panorama", "a b", "--pg-factor", "2"], "PG needs a batch"),
    (["anagram", "a", "b", "--pg-factor", "2"], "PG needs a batch"),
    (["seg", "a cat", "--kernel", "classifier", "--pg-factor", "2", "--n", "2"], "--kernel classifier is for digit models"),
    (["panorama", "a b", "--blur", "gaussian_-1_2", "--blur", "gaussian_-1_3"], "this command runs one blur"),
    (["seg", "a cat", "--sampler", "plms"], "unknown --sampler 'plms'"),
    (["seg", "a cat", "--schedule", "cosine"], "unknown --schedule 'cosine'"),
    (["sample", "--schedule", "scheduler"], "--schedule scheduler needs a diffusers pipeline"),
    (["sample", "--pg-factor", "nan"], "--pg-factor must be a finite number"),
    (["sample", "--seg-scale", "-1"], "--seg-scale must be a finite number >= 0"),
])
def test_options_a_command_cannot_use_are_refused(tmp_path, args, message, capsys):
    code, _, err = invoke_cli([*args, "--out", tmp_path / "out"], capsys)
    assert code == 2, err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_seg_on_a_net_without_self_attention_is_refused():
    from diffusers import UNet2DModel
    bare = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), norm_num_groups=4,
                       down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2, add_attention=False)
    opts = SampleConfig(blurs=["gaussian_-1_1"])
    with pytest.raises(DiffcliError, match="no self-attention") as e:
        options.seg_layers(bare, opts, "--layers")
    assert "\n" not in str(e.value) and options.seg_layers(bare, SampleConfig(), "--layers") == []


def test_library_errors_are_value_errors():
    with pytest.raises(ValueError):
        seg.validate(seg.SegConfig(prompts=["a"], sampler="nope"))
    assert issubclass(DiffcliError, ValueError)
