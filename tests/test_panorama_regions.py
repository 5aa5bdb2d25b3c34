"""Region prompts (MultiDiffusion sec. 4.2) in `diffcli panorama` on a tiny random SD: equal to the paper's
algorithm written out here on diffusers' DDIM scheduler and UNet (bootstrapping included), identical prompts
change nothing, and every region that cannot apply is refused in one line before anything is written."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import call_cli
from diffcli.backends import pipelines
from diffcli.core.denoisers import ve_to_vp
from diffcli.panorama import PanoramaConfig, bootstrap_of, generate, plan, validate
from diffcli.shared.devices import PerSampleRandn
from diffcli.shared.errors import DiffcliError

CPU = torch.device("cpu")
BOXES = ["4,2,20,12:a red ball", "24,0,36,16:a green tree"]  # even pixels: whole latent cells (VAE factor 2)


@pytest.fixture(scope="module")
def pipe(tiny_sd):
    return pipelines.load_pipeline(str(tiny_sd), CPU, torch.float32)


def run_regions(pipe, **kw):
    cfg = PanoramaConfig(**{"prompt": "a beach", "steps": 4, "height": 16, "width": 40, "stride": 4,
                            "region_boxes": BOXES, "view_batch": 5, **kw})
    jobs = validate(cfg)
    p = plan(pipe, cfg, jobs)
    image, z = generate(pipe, p, jobs[0].prompt, cfg, CPU, regions=jobs[0].regions)
    return image, z, p, cfg


def paper_region_based(pipe, masks, prompts, views, start, steps, scale, colours, boot_steps):
    """Bar-Tal et al. 2023, sec. 4.2, as their algorithm reads: every window runs every prompt (the background's
    mask is what the regions leave); in the first `boot_steps` steps each region's window is its latent inside its
    mask and a flat colour noised to the step outside; each DDIM step of a window is weighted by the masks and the
    canvas is the weighted average."""
    from diffusers import DDIMScheduler
    sched = DDIMScheduler.from_config(pipe.scheduler.config)
    sched.set_timesteps(steps)
    cond, uncond = pipe.encode_prompt(prompts, CPU, 1, True, [""] * len(prompts))
    fg = masks[:, None]
    m = torch.cat([(1 - fg.sum(0, keepdim=True)).clamp(min=0), fg])
    latent, noise = start[None].clone(), start[None].clone()
    for i, t in enumerate(sched.timesteps):
        value, count = torch.zeros_like(latent), torch.zeros_like(latent)
        for h0, h1, w0, w1 in views:
            mv = m[:, :, h0:h1, w0:w1]
            lv = latent[:, :, h0:h1, w0:w1].repeat(len(prompts), 1, 1, 1)
            if i < boot_steps:
                bg = colours[i][:, :, None, None].expand(-1, -1, h1 - h0, w1 - w0)
                bg = sched.add_noise(bg, noise[:, :, h0:h1, w0:w1].expand_as(bg), t)
                lv[1:] = lv[1:] * mv[1:] + bg * (1 - mv[1:])
            eps = pipe.unet(torch.cat([lv, lv]), t, encoder_hidden_states=torch.cat([uncond, cond])).sample
            e_u, e_c = eps.chunk(2)
            stepped = sched.step(e_u + scale * (e_c - e_u), t, lv).prev_sample
            value[:, :, h0:h1, w0:w1] += (stepped * mv).sum(0, keepdim=True)
            count[:, :, h0:h1, w0:w1] += mv.sum(0, keepdim=True)
        latent = torch.where(count > 0, value / count, value)
    return latent[0]


@pytest.mark.parametrize("bootstrap", [0.0, 0.5])
def test_regions_equal_the_papers_algorithm(pipe, bootstrap):
    _, z, p, cfg = run_regions(pipe, bootstrap=bootstrap)
    sigmas = pipelines.sigmas(pipe, 4, CPU)
    assert p.masks.shape == (2, 8, 20) and set(p.masks.unique().tolist()) == {0.0, 1.0}
    boot = bootstrap_of(pipelines.pipeline_family(pipe), p, cfg, sigmas, 2, True, CPU)
    assert (boot is None) == (bootstrap == 0) and (boot is None or boot.colours.shape == (2, 2, 4))
    views = [(w.top, w.top + w.height, w.left, w.left + w.width) for w in p.views.views]
    ref = paper_region_based(pipe, p.masks, ["a beach", "a red ball", "a green tree"], views,
                             PerSampleRandn([1]).randn(p.latent)[0], 4, 7.5,
                             None if boot is None else boot.colours, 0 if boot is None else boot.steps)
    torch.testing.assert_close(ve_to_vp(z, sigmas[-1]), ref, atol=1e-4, rtol=1e-4)
    if bootstrap:  # bootstrapping changes the picture
        assert (z - run_regions(pipe, bootstrap=0.0)[1]).abs().max() > 1e-3


def test_regions_with_the_background_prompt_change_nothing(pipe):
    """Every prompt the background's: the weighted average of equal predictions is the plain panorama."""
    _, z, _, _ = run_regions(pipe, bootstrap=0.0, region_boxes=["4,2,20,12:a beach", "24,0,36,16:a beach"])
    _, plain, _, _ = run_regions(pipe, region_boxes=[])
    torch.testing.assert_close(z, plain, atol=1e-5, rtol=1e-5)


def test_regions_without_background_and_masks_from_files(pipe, tmp_path):
    from PIL import Image
    left, right = tmp_path / "left.png", tmp_path / "right.png"
    img = torch.zeros(16, 40, dtype=torch.uint8)
    img[:, :21] = 255
    Image.fromarray(img.numpy()).save(left)
    Image.fromarray((255 - img).numpy()).save(right)
    image, z, p, _ = run_regions(pipe, prompt=None, region_boxes=[], bootstrap=0.25, seg_scale=1.0,
                                 region_masks=[f"{left}:a red ball", f"{right}:a green tree"])
    assert torch.isfinite(z).all() and image.shape == (3, 16, 40)
    assert p.masks[0, 0, 10].item() == 0.5 and p.masks[1, 0, 10].item() == 0.5  # px 20 lit, px 21 not: a half cell


def test_region_refusals(pipe, tmp_path):
    from PIL import Image

    def refuse(match, **kw):
        with pytest.raises(DiffcliError, match=match):
            run_regions(pipe, **kw)

    refuse("must lie inside the 40x16 px image", region_boxes=["30,0,44,8:a cat"])
    refuse("must lie inside", region_boxes=["8,4,8,10:a cat"])
    refuse("expected 'X0,Y0,X1,Y1:prompt'", region_boxes=["1,2,3:a cat"])
    refuse("expected 'X0,Y0,X1,Y1:prompt'", region_boxes=["1,2,3,4"])
    refuse("zero total weight and there is no background", prompt=None, region_boxes=BOXES)
    refuse("not --prompts-file", prompt=None, prompts_file="assignment")
    refuse(r"--region-mask .*nope.png: cannot read it", region_masks=[f"{tmp_path / 'nope.png'}:a cat"])
    (tmp_path / "junk.png").write_bytes(b"not a png")
    refuse("cannot read it as an image", region_masks=[f"{tmp_path / 'junk.png'}:a cat"])
    Image.new("L", (32, 16), 255).save(tmp_path / "small.png")
    refuse("is 32x16 px, the image is 40x16", region_masks=[f"{tmp_path / 'small.png'}:a cat"])
    Image.new("L", (40, 16), 0).save(tmp_path / "black.png")
    refuse("black everywhere", region_masks=[f"{tmp_path / 'black.png'}:a cat"])
    refuse("between 0 and 1|--bootstrap", bootstrap=1.5)


def test_cli_regions_write_nothing_when_refused_and_record_regions(tmp_path, tiny_sd):
    out = tmp_path / "o"
    base = ["panorama", "a beach", "--model", tiny_sd, "--height", "16", "--width", "32", "--stride", "4",
            "--steps", "2"]
    proc = call_cli(*base, "--region", "0,0,40,8:a cat", "--out", out)
    assert proc.returncode != 0 and len(proc.stderr.strip().splitlines()) == 1 and "inside" in proc.stderr
    assert not out.exists()
    call_cli(*base, "--region", "0,0,16,8:a cat", "--region", "16,8,32,16:a dog", "--bootstrap", "0.5",
             "--circular", "--out", out, check=True)
    record = json.loads((tmp_path / "o.run.json").read_text())
    assert record["prompts"][0]["regions"] == [{"prompt": "a cat", "region": "0,0,16,8"},
                                               {"prompt": "a dog", "region": "16,8,32,16"}]
    assert record["circular"] and sorted(p.name for p in out.iterdir()) == ["a_beach.png"]


def test_regions_on_sdxl_with_seg_and_circular(tiny_sdxl):
    """Another family (SDXL: pooled embeddings and size ids gathered per instance) with SEG and --circular."""
    sdxl = pipelines.load_pipeline(str(tiny_sdxl), CPU, torch.float32)
    f = pipelines.pipeline_family(sdxl).scale_factor
    w = pipelines.pipeline_family(sdxl).native_size()
    cfg = PanoramaConfig(prompt="a beach", steps=2, height=w, width=2 * w, stride=max(1, w // f // 4),
                         region_boxes=[f"0,0,{w},{w}:a red ball"], bootstrap=0.5, seg_scale=2.0, circular=True)
    jobs = validate(cfg)
    p = plan(sdxl, cfg, jobs)
    image, z = generate(sdxl, p, "a beach", cfg, CPU, regions=jobs[0].regions)
    assert torch.isfinite(z).all() and image.shape == (3, w, 2 * w) and any(v.wrap for v in p.views.views)


def test_a_single_canvas_is_one_window(pipe):
    """Region prompts on one ordinary image: a panorama of one window, still the paper's algorithm."""
    boxes = ["0,0,8,16:a red ball", "8,4,16,12:a green tree"]
    _, z, p, cfg = run_regions(pipe, width=16, region_boxes=boxes, bootstrap=0.5)
    assert len({(v.top, v.left) for v in p.views.views}) == 1  # one window, one instance per prompt present
    sigmas = pipelines.sigmas(pipe, 4, CPU)
    boot = bootstrap_of(pipelines.pipeline_family(pipe), p, cfg, sigmas, 2, True, CPU)
    ref = paper_region_based(pipe, p.masks, ["a beach", "a red ball", "a green tree"], [(0, 8, 0, 8)],
                             PerSampleRandn([1]).randn(p.latent)[0], 4, 7.5, boot.colours, boot.steps)
    torch.testing.assert_close(ve_to_vp(z, sigmas[-1]), ref, atol=1e-4, rtol=1e-4)
