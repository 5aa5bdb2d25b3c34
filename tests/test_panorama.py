"""diffcli panorama on a tiny random SD: oracles (one window = plain sampling, = diffusers' MultiDiffusion on the
same windows), the sync cases, the 003 file layout and every refused input."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import ROOT, call_cli, run_torchrun
from diffcli.backends import pipelines
from diffcli.shared.errors import DiffcliError
from diffcli.shared.devices import PerSampleRandn
from diffcli.core.denoisers import ve_to_vp
from diffcli.core.guidance import classifier_free
from diffcli.shared.shipped import PROMPTS_DIR
from diffcli.panorama import PanoramaConfig, generate, plan, read_wide_prompts, validate
from diffcli.core.samplers import sample_euler

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def pipe(tiny_sd):
    return pipelines.load_pipeline(str(tiny_sd), CPU, torch.float32)


def run_panorama(pipe, **kw):
    cfg = PanoramaConfig(prompt="a beach", **{"steps": 3, "height": 16, "width": 40, "stride": 3, **kw})
    p = plan(pipe, cfg, validate(cfg))
    image, z = generate(pipe, p, cfg.prompt, cfg, CPU)
    return image, z, p


def test_one_window_is_plain_sampling(pipe):
    image, z, p = run_panorama(pipe, width=16, view_batch=3)
    assert len(p.views) == 1 and image.shape == (3, 16, 16)
    sigmas = pipelines.sigmas(pipe, 3, CPU)
    cond, uncond = pipelines.encode_prompts(pipe, ["a beach"], None, 16, 16, CPU)
    x = pipelines.initial_latents(PerSampleRandn([1]), pipelines.latent_shape(pipe, 16, 16), sigmas[0])
    plain = sample_euler(classifier_free(pipelines.denoiser(pipe), 7.5, cond, uncond), x, sigmas)
    assert torch.equal(z, plain[0])
    assert torch.equal(image, pipelines.decode(pipe, plain, sigmas[-1])[0])


def test_equals_diffusers_multidiffusion_on_the_same_windows(pipe):
    """Deterministic DDIM is linear in (x_t, eps), so averaging each window's x_{t-1} (MultiDiffusion, diffusers'
    panorama pipeline) and averaging x0 (SyncTweedies) are the same map when the windows start from one canvas."""
    from diffusers import DDIMScheduler, StableDiffusionPanoramaPipeline
    _, z, p = run_panorama(pipe, view_batch=2)
    ref_pipe = StableDiffusionPanoramaPipeline(**{**pipe.components, "scheduler": DDIMScheduler.from_config(
        pipe.scheduler.config)})
    ref_pipe.set_progress_bar_config(disable=True)
    # its get_views assumes a VAE factor of 8 and no border window; hand it ours
    ref_pipe.get_views = lambda *a, **k: [(w.top, w.top + w.height, w.left, w.left + w.width) for w in p.views.views]
    start = PerSampleRandn([1]).randn(p.latent)
    ref = ref_pipe("a beach", height=16, width=40, num_inference_steps=3, guidance_scale=7.5, latents=start,
                   view_batch_size=2, output_type="latent").images
    sigmas = pipelines.sigmas(pipe, 3, CPU)
    torch.testing.assert_close(ve_to_vp(z, sigmas[-1]), ref[0], atol=1e-4, rtol=1e-4)


def test_sync_cases(pipe):
    """With canvas noise x0 / eps / xt are one map (up to rounding); from per-window noise they differ; none
    leaves the windows unsynchronized."""
    out = {(noise, case): run_panorama(pipe, sync=case, noise=noise)[1]
           for noise in ("canvas", "views") for case in ("x0", "eps", "xt", "none")}
    assert all(torch.isfinite(z).all() for z in out.values())
    for case in ("eps", "xt"):
        torch.testing.assert_close(out["canvas", case], out["canvas", "x0"], atol=1e-4, rtol=1e-4)
    assert (out["canvas", "none"] - out["canvas", "x0"]).abs().max() > 1e-2
    views = [out["views", c] for c in ("x0", "eps", "xt", "none")]
    for i in range(4):
        for j in range(i):
            assert (views[i] - views[j]).abs().max() > 1e-3


def test_tall_image_and_uneven_windows(pipe):
    image, _, p = run_panorama(pipe, height=40, width=24, stride=5, decode_stride=8, decode_batch=1)
    assert image.shape == (3, 40, 24) and torch.isfinite(image).all()
    tops = sorted({w.top for w in p.views.views})
    assert tops[0] == 0 and tops[-1] + 8 == 20 and len(p.tiles) == 3 * 2


def test_cli_writes_the_003_layout_eval_reads(tmp_path, tiny_sd):
    from PIL import Image
    from diffcli.data.grading import plan_clip_files
    prompts = tmp_path / "wide.json"
    hostile = "../../evil/CON: a\\b <x>"
    prompts.write_text(json.dumps({"A_beach_scene": {"prompt": "A beach scene", "eval_pos": [0, 5, 32]},
                                   "evil": {"prompt": hostile, "eval_pos": [16]}}))
    out = tmp_path / "wide_images"
    proc = call_cli("panorama", "--prompts-file", prompts, "--model", tiny_sd, "--height", "16", "--width", "48",
                   "--stride", "2", "--steps", "2", "--out", out, check=True)
    assert "2 image(s)" in proc.stdout and "4 crop(s)" in proc.stdout
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(["A_beach_scene.png", "A_beach_scene_0.png", "A_beach_scene_5.png",
                            "A_beach_scene_32.png", "evil_CON_a_b_x.png", "evil_CON_a_b_x_16.png"])  # images only
    full = np.asarray(Image.open(out / "A_beach_scene.png"))
    assert full.shape == (16, 48, 3)
    for pos in (0, 5, 32):
        assert np.array_equal(np.asarray(Image.open(out / f"A_beach_scene_{pos}.png")), full[:, pos:pos + 16])
    files, _ = plan_clip_files(str(out), "wide_images")
    assert {f.prompt for f in files if f.name.startswith("A_beach_scene_")} == {"A beach scene"}
    record = json.loads((tmp_path / "wide_images.run.json").read_text())  # the run record beside the folder
    assert record["windows"] == 9 and record["command"] == "panorama"


def test_shipped_prompt_sets():
    jobs = read_wide_prompts(str(PROMPTS_DIR / "wide_image_prompts.json"))
    assert len(jobs) == 10 and all(len(j.eval_pos) == 8 for j in jobs)
    assert "MIT" in (PROMPTS_DIR / "README.md").read_text()
    shared = ROOT.parent / "shared" / "data" / "prompts"
    for name in ("wide_image_prompts.json", "ambiguous_image_prompts.json"):
        if (shared / name).is_file():
            assert (PROMPTS_DIR / name).read_bytes() == (shared / name).read_bytes()
    cfg = PanoramaConfig(prompts_file="assignment")
    assert [j.prompt for j in validate(cfg)] == [j.prompt for j in jobs]


def test_bad_input_is_refused_before_work(pipe, tmp_path):
    def refuse(match, **kw):
        with pytest.raises(DiffcliError, match=match):
            cfg = PanoramaConfig(**{"prompt": "x", "height": 16, "width": 48, **kw})
            plan(pipe, cfg, validate(cfg))

    refuse("multiple of 8", width=50)
    refuse("multiple of 8", height=0)
    refuse("smaller than one window", height=8)
    refuse("smaller than one window", width=8)
    refuse("stride 0", stride=0)
    refuse("stride 9 must be between 1 and the window size", stride=9)
    refuse(r"eval position\(s\) \[40\] lie outside", eval_pos=[0, 40])
    refuse(r"eval position\(s\) \[-1\]", eval_pos=[-1])
    refuse("unknown --sync 'tweedie'", sync="tweedie")
    refuse("prompt or --prompts-file", prompt=None)
    bad = tmp_path / "bad.json"
    bad.write_text('{\n  "a": {"prompt": "a cat",\n  "eval_pos": [1,]}\n}')
    refuse("not valid JSON.*line 3", prompt=None, prompts_file=str(bad))
    bad.write_text('{\n  "a": {"prompt": "a cat"},\n  "b_key": {"text": "a dog"}\n}')
    refuse(r"entry 'b_key' \(line 3\) needs a string field 'prompt'", prompt=None, prompts_file=str(bad))
    bad.write_text('{"a": {"prompt": "a cat", "eval_pos": ["10"]}}')
    refuse("'eval_pos' must be a list of integer", prompt=None, prompts_file=str(bad))


def test_model_not_found_offline_is_one_line(tmp_path):
    proc = call_cli("panorama", "a cat", "--model", tmp_path / "no-such-model", "--out", tmp_path / "o")
    assert proc.returncode == 2 and "cannot load" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_resume_and_two_ranks_write_the_same_files(tmp_path, tiny_sd):
    prompts = tmp_path / "wide.txt"
    prompts.write_text("a red barn\na blue lake\na green hill\n")
    args = ["panorama", "--prompts-file", str(prompts), "--model", str(tiny_sd), "--height", "16", "--width", "32",
            "--stride", "4", "--steps", "2", "--eval-pos", "0,16"]
    whole, cut, two = tmp_path / "whole", tmp_path / "cut", tmp_path / "two"
    call_cli(*args, "--out", whole, check=True)
    call_cli(*args, "--out", cut, check=True)
    for f in cut.glob("a_blue_lake*.png"):
        f.unlink()
    (cut / "a_green_hill_16.png").unlink()  # a prompt killed between its files is redone whole
    proc = call_cli(*args, "--out", cut, "--resume", check=True)
    assert "1 prompt(s) already there" in proc.stdout
    proc = run_torchrun(*args, "--out", two, port=29541)
    pngs = sorted(p.name for p in whole.glob("*.png"))
    assert len(pngs) == 9
    for folder in (cut, two):
        assert sorted(p.name for p in folder.glob("*.png")) == pngs
        for name in pngs:
            assert (folder / name).read_bytes() == (whole / name).read_bytes(), (folder.name, name)
    assert json.loads((tmp_path / "two.run.json").read_text())["world_size"] == 2


def test_circular_equals_diffusers_circular_padding(pipe):
    """--circular: diffusers' StableDiffusionPanoramaPipeline(circular_padding=True) on the same canvas gives the
    same latents; its own get_views (in latent cells) gives our windows, the last ones wrapping the side border."""
    from diffusers import DDIMScheduler, StableDiffusionPanoramaPipeline
    _, z, p = run_panorama(pipe, view_batch=3, circular=True)
    ref_pipe = StableDiffusionPanoramaPipeline(**{**pipe.components, "scheduler": DDIMScheduler.from_config(
        pipe.scheduler.config)})
    ref_pipe.set_progress_bar_config(disable=True)
    h, w = p.latent[1:]
    theirs = ref_pipe.get_views(h * 8, w * 8, window_size=p.window, stride=3, circular_padding=True)  # it divides by 8
    ours = [(v.top, v.top + v.height, v.left, v.left + v.width) for v in p.views.views]
    assert ours == theirs and len(ours) == w // 3 and ours[-1][3] > w  # 20 // 3 = 6 windows, the last wraps
    ref_pipe.get_views = lambda *a, **k: ours  # it also assumes a VAE factor of 8 (ours is 2)
    start = PerSampleRandn([1]).randn(p.latent)
    ref = ref_pipe("a beach", height=16, width=40, num_inference_steps=3, guidance_scale=7.5, latents=start,
                   view_batch_size=3, output_type="latent", circular_padding=True).images
    sigmas = pipelines.sigmas(pipe, 3, CPU)
    torch.testing.assert_close(ve_to_vp(z, sigmas[-1]), ref[0], atol=1e-4, rtol=1e-4)
    flat, _, _ = run_panorama(pipe, view_batch=3)
    assert (z - run_panorama(pipe, view_batch=3)[1]).abs().max() > 1e-3 and flat.shape == (3, 16, 40)


def test_circular_windows_wrap_and_average_back():
    from diffcli.core.views import ViewSet, windows
    z = torch.arange(40.0).view(1, 4, 10)
    ws = windows(4, 10, (4, 6), 3, circular=True)  # 10 // 3 = 3 windows at 0, 3, 6; the last covers 6..9, 0, 1
    assert [w.left for w in ws] == [0, 3, 6] and [w.wrap for w in ws] == [True] * 3
    assert torch.equal(ws[2].view(z), z[..., [6, 7, 8, 9, 0, 1]]) and torch.equal(ws[0].view(z), z[..., :6])
    pasted = ws[2].inverse_view(ws[2].view(z))
    assert torch.equal(pasted[..., [6, 7, 8, 9, 0, 1]], z[..., [6, 7, 8, 9, 0, 1]]) and not pasted[..., 2:6].any()
    assert torch.equal(ws[2].scaled(2).view(torch.arange(160.0).view(1, 8, 20))[0, 0],
                       torch.tensor([12.0, 13, 14, 15, 16, 17, 18, 19, 0, 1, 2, 3]))  # a pixel tile wraps as well
    vs = ViewSet(ws, (1, 4, 10))
    assert vs.count[0, 0].tolist() == [2, 2, 1, 2, 2, 2, 2, 2, 2, 1]
    torch.testing.assert_close(vs.average(vs.forward(z)), z)
    with pytest.raises(DiffcliError, match="cells 8 to 9 of the 10 around the cylinder unseen"):
        windows(4, 10, (4, 4), 4, circular=True)


def test_circular_refusals_and_one_window(pipe):
    with pytest.raises(DiffcliError, match="smaller than one window"):
        cfg = PanoramaConfig(prompt="x", height=16, width=8, circular=True)
        plan(pipe, cfg, validate(cfg))
    _, z, p = run_panorama(pipe, width=16, circular=True)  # one window: nothing wraps, plain sampling
    assert len(p.views) == 1 and not p.views.views[0].wrap
    assert torch.equal(z, run_panorama(pipe, width=16)[1])


def test_two_d_canvas_equals_multidiffusion_on_its_windows(pipe):
    """Windows over both axes (a 2-D canvas), decoded in 2-D tiles; = diffusers' MultiDiffusion on those windows."""
    from diffusers import DDIMScheduler, StableDiffusionPanoramaPipeline
    image, z, p = run_panorama(pipe, height=32, width=40, stride=4, view_batch=4, decode_batch=2)
    tops, lefts = {w.top for w in p.views.views}, {w.left for w in p.views.views}
    assert len(tops) == 3 and len(lefts) == 4 and len(p.views) == 12 and image.shape == (3, 32, 40)
    assert {t.top for t in p.tiles} == tops and max(t.height for t in p.tiles) == p.window  # tiles stay window-sized
    ref_pipe = StableDiffusionPanoramaPipeline(**{**pipe.components, "scheduler": DDIMScheduler.from_config(
        pipe.scheduler.config)})
    ref_pipe.set_progress_bar_config(disable=True)
    ref_pipe.get_views = lambda *a, **k: [(w.top, w.top + w.height, w.left, w.left + w.width) for w in p.views.views]
    ref = ref_pipe("a beach", height=32, width=40, num_inference_steps=3, guidance_scale=7.5,
                   latents=PerSampleRandn([1]).randn(p.latent), view_batch_size=4, output_type="latent").images
    torch.testing.assert_close(ve_to_vp(z, pipelines.sigmas(pipe, 3, CPU)[-1]), ref[0], atol=1e-4, rtol=1e-4)
