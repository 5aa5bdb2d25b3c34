"""diffcli anagram on a tiny random DeepFloyd IF (stage I 16 px, stage II 32 px): oracles against plain sampling
and IF's own pipelines, the sync cases, the 003 file layout and refused input."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import call_cli, run_torchrun
from diffcli.backends import pipelines
from diffcli.anagram import AnagramConfig, Job, generate, load, read_pairs, validate
from diffcli.shared.errors import DiffcliError
from diffcli.shared.devices import PerSampleRandn
from diffcli.shared.names import safe_name
from diffcli.core.guidance import classifier_free
from diffcli.shared.shipped import PROMPTS_DIR
from diffcli.core.samplers import sample_euler
from diffcli.core.views import VIEWS

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def pipes(tiny_if):
    return load(AnagramConfig(model=str(tiny_if[0]), sr_model=str(tiny_if[1])), CPU, torch.float32)


def ddim_like_pipeline(pipe):
    """The pipeline's own loop on deterministic DDIM; thresholding off in both, since diffusers' DDIM keeps the
    unclipped eps (use_clipped_model_output=False) while our Euler step re-derives it from the clipped x0."""
    from diffusers import DDIMScheduler
    config = {**pipe.scheduler.config, "thresholding": False, "clip_sample": False, "variance_type": "fixed_small"}
    pipe.scheduler = DDIMScheduler.from_config(config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_our_stages_equal_the_if_pipelines(tiny_if):
    from diffusers import IFPipeline, IFSuperResolutionPipeline
    p1 = ddim_like_pipeline(IFPipeline.from_pretrained(str(tiny_if[0])))
    p2 = ddim_like_pipeline(IFSuperResolutionPipeline.from_pretrained(str(tiny_if[1])))
    steps, scale = 3, 4.0
    ref1 = p1("a horse", num_inference_steps=steps, guidance_scale=scale, output_type="pt",
              generator=torch.Generator().manual_seed(5)).images
    g = torch.Generator().manual_seed(7)
    image = torch.rand(1, 3, 16, 16, generator=g) * 2 - 1
    ref2 = p2(image=image, prompt="a horse", num_inference_steps=steps, guidance_scale=scale, noise_level=50,
              output_type="pt", generator=torch.Generator().manual_seed(5)).images

    def ours(pipe, size, sr=False):
        g = torch.Generator().manual_seed(5)  # the pipelines draw the start, then the upsampled image's noise
        start = torch.randn((1, 3, size, size), generator=g)
        sigmas = pipelines.sigmas(pipe, steps, CPU)
        cond, uncond = pipelines.encode_prompts(pipe, ["a horse"], None, size, size, CPU)
        base = pipelines.denoiser(pipe)
        if sr:
            up, labels = pipelines.sr_condition(pipe, image, size, size, 50, torch.randn(start.shape, generator=g))
            cond, uncond = ({**c, "image": up, "class_labels": labels} for c in (cond, uncond))
            base = pipelines.sr_denoiser(pipe)
        model = pipelines.clip_x0(classifier_free(base, scale, cond, uncond), pipe)
        x = sample_euler(model, start * (1 + sigmas[0] ** 2).sqrt(), sigmas)
        return x / (1 + sigmas[-1] ** 2).sqrt()

    torch.testing.assert_close(ours(p1, 16), ref1, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ours(p2, 32, sr=True), ref2, atol=1e-4, rtol=1e-4)


def test_identity_views_are_plain_sampling(pipes):
    pipe, sr_pipe = pipes
    cfg = AnagramConfig(views=["identity"], steps=3, sr_steps=2)
    got = generate(pipe, sr_pipe, Job("x", ["a horse"]), cfg, (16, 16), CPU)
    twice = generate(pipe, sr_pipe, Job("x", ["a horse"] * 2), AnagramConfig(views=["identity"] * 2, steps=3,
                                                                           sr_steps=2), (16, 16), CPU)
    # plain: the same noise draws in the same order, no views anywhere
    rng = PerSampleRandn([0])
    sig1, sig2 = pipelines.sigmas(pipe, 3, CPU), pipelines.sigmas(sr_pipe, 2, CPU)
    cond, uncond = pipelines.encode_prompts(pipe, ["a horse"], None, 16, 16, CPU)
    model = pipelines.clip_x0(classifier_free(pipelines.denoiser(pipe), 10.0, cond, uncond), pipe)
    x1 = sample_euler(model, pipelines.initial_latents(rng, (3, 16, 16), sig1[0]), sig1)
    stage1 = pipelines.decode(pipe, x1, sig1[-1])
    up, labels = pipelines.sr_condition(sr_pipe, stage1, 32, 32, 50, rng.randn((3, 32, 32)))
    cond2, uncond2 = ({**c, "image": up, "class_labels": labels} for c in (cond, uncond))
    model2 = pipelines.clip_x0(classifier_free(pipelines.sr_denoiser(sr_pipe), 10.0, cond2, uncond2), sr_pipe)
    x2 = sample_euler(model2, pipelines.initial_latents(rng, (3, 32, 32), sig2[0]), sig2)
    final = pipelines.decode(sr_pipe, x2, sig2[-1])[0]
    assert torch.equal(got["stage1"], stage1[0]) and torch.equal(got["canvas"], final)
    torch.testing.assert_close(twice["canvas"], final, atol=1e-4, rtol=1e-4)  # batch of 2 rounds differently
    assert got["canvas"].shape == (3, 32, 32) and got["views"].shape == (1, 3, 32, 32)


def test_sync_cases_differ_from_per_view_noise(pipes):
    pipe, _ = pipes
    job = Job("x", ["a horse", "a village"])
    run = lambda case, noise: generate(pipe, None, job, AnagramConfig(steps=3, sync=case, noise=noise),
                                       (16, 16), CPU)
    canvas = {c: run(c, "canvas") for c in ("x0", "eps", "xt", "none")}
    views = {c: run(c, "views") for c in ("x0", "eps", "xt", "none")}
    for c in ("eps", "xt"):
        torch.testing.assert_close(canvas[c]["canvas"], canvas["x0"]["canvas"], atol=1e-4, rtol=1e-4)
    # synchronized: the second view is the canvas turned; unsynchronized: two unrelated samples
    x0 = canvas["x0"]
    assert torch.equal(x0["views"][1], torch.rot90(x0["canvas"], -1, (-2, -1)))
    none = canvas["none"]["views"]
    assert (none[1] - torch.rot90(none[0], -1, (-2, -1))).abs().max() > 0.1
    finals = [views[c]["canvas"] for c in ("x0", "eps", "xt", "none")]
    for i in range(4):
        assert torch.isfinite(finals[i]).all()
        for j in range(i):
            assert (finals[i] - finals[j]).abs().max() > 1e-3


@pytest.mark.parametrize("name", [v for v in VIEWS if v != "identity" and VIEWS[v].factor is None])
def test_every_view_runs_both_stages(pipes, name):
    pipe, sr_pipe = pipes
    cfg = AnagramConfig(views=["identity", name], steps=2, sr_steps=1, patches=4, pieces=2)
    out = generate(pipe, sr_pipe, Job("x", ["a horse", "a village"]), cfg, (16, 16), CPU)
    assert out["views"].shape == (2, 3, 32, 32) and torch.isfinite(out["views"]).all()


def test_cli_writes_the_003_layout_eval_reads(tmp_path, tiny_if):
    from PIL import Image
    from diffcli.data.grading import plan_clip_files
    pairs = tmp_path / "pairs.json"
    hostile = "../a dog/..\\NUL"
    pairs.write_text(json.dumps({"horse-village": {"canonical_prompt": "a horse", "instance_prompt": "a village"},
                                 "evil": {"canonical_prompt": "a cat", "instance_prompt": hostile}}))
    out = tmp_path / "ambiguous_images"
    proc = call_cli("anagram", "--prompts-file", pairs, "--views", "identity", "rotate_cw", "--model", tiny_if[0],
                   "--sr-model", tiny_if[1], "--steps", "2", "--sr-steps", "1", "--frames", "2", "--out", out,
                   check=True)
    assert "4 view image(s) of 2 anagram(s)" in proc.stdout
    pngs = sorted(p.name for p in out.glob("*.png"))
    evil = safe_name(hostile) + ".png"
    assert pngs == sorted(["a_cat.png", evil, "a_horse.png", "a_village.png"])
    assert "/" not in evil and "\\" not in evil and not evil.startswith(".")
    horse, village = (np.asarray(Image.open(out / n)) for n in ("a_horse.png", "a_village.png"))
    assert horse.shape == (32, 32, 3) and np.array_equal(village, np.rot90(horse, -1))
    assert sorted(p.name for p in out.iterdir()) == pngs  # the graded folder holds only the views
    assert {p.name for p in (tmp_path / "ambiguous_images.animations").iterdir()} == {
        "horse-village.gif", "horse-village_strip.png", "evil.gif", "evil_strip.png"}
    files, _ = plan_clip_files(str(out), "ambiguous_images")
    assert {f.prompt for f in files} == {"a cat", evil[:-4].replace("_", " "), "a horse", "a village"}
    # an interrupted run: the second pair's files gone; --resume redoes exactly that pair
    before = {p.name: p.read_bytes() for p in out.glob("*.png")}
    (out / "a_cat.png").unlink()
    proc = call_cli("anagram", "--prompts-file", pairs, "--views", "identity", "rotate_cw", "--model", tiny_if[0],
                   "--sr-model", tiny_if[1], "--steps", "2", "--sr-steps", "1", "--frames", "2", "--out", out,
                   "--resume", check=True)
    assert "(1 already there)" in proc.stdout
    assert {p.name: p.read_bytes() for p in out.glob("*.png")} == before


def test_two_ranks_write_the_same_files(tmp_path, tiny_if):
    pairs = tmp_path / "pairs.json"
    pairs.write_text(json.dumps({"horse-village": {"canonical_prompt": "a horse", "instance_prompt": "a village"},
                                 "cat-dog": {"canonical_prompt": "a cat", "instance_prompt": "a dog"}}))
    args = ["anagram", "--prompts-file", pairs, "--views", "identity", "rotate_cw", "--model", tiny_if[0],
            "--sr-model", tiny_if[1], "--steps", "2", "--sr-steps", "1", "--frames", "2"]
    one, two = tmp_path / "one", tmp_path / "two"
    call_cli(*args, "--out", one, check=True)
    proc = run_torchrun(*args, "--out", two, port=29571)  # one pair per rank
    assert proc.stdout.count("4 view image(s) of 2 anagram(s)") == 1  # one merged report, from rank 0
    def written(d):  # name -> bytes: the views in the folder, the animations in d.animations beside it
        anim = d.with_name(d.name + ".animations")
        return {("animations/" if f.parent == anim else "") + f.name: f.read_bytes()
                for f in [*d.iterdir(), *anim.iterdir()]}
    files = written(one)
    assert len(files) == 4 + 2 * 2  # a PNG per view, a GIF and a strip per pair
    assert written(two) == files
    record, single = (json.loads(d.with_name(d.name + ".run.json").read_text()) for d in (two, one))
    assert record["world_size"] == 2 and record["status"] == "complete" and record["files"] == single["files"]


def test_shipped_pairs():
    jobs = read_pairs(str(PROMPTS_DIR / "ambiguous_image_prompts.json"))
    assert len(jobs) == 10 and jobs[-1].prompts == ["a photo of a car", "a photo of Pisa tower"]
    assert len(validate(AnagramConfig(prompts_file="assignment"))) == 10


def test_bad_input_is_refused(tmp_path, tiny_if, tiny_sd):
    def refuse(match, **kw):
        with pytest.raises(DiffcliError, match=match):
            validate(AnagramConfig(**{"prompts": ["a", "b"], **kw}))

    refuse("unknown view.*spin.*choose from identity, flip", views=["identity", "spin"])
    refuse("2 prompt.*3 view", views=["identity", "flip", "negate"])
    refuse("multiple of 8", height=20)
    refuse("unknown --sync", sync="z")
    refuse("one prompt per view", prompts=[])
    bad = tmp_path / "bad.json"
    bad.write_text('{\n "p": {"canonical_prompt": "a", "instance_prompt": "b"},\n "q": {"canonical_prompt": "a"}\n}')
    refuse(r"entry 'q' \(line 3\) needs string fields canonical_prompt and instance_prompt", prompts=[],
           prompts_file=str(bad))
    bad.write_text('{"p": {"canonical_prompt": "a",,}}')
    refuse("not valid JSON.*line 1", prompts=[], prompts_file=str(bad))
    from diffcli.anagram import run
    with pytest.raises(DiffcliError, match="needs a square image, got 16x32"):
        run(AnagramConfig(prompts=["a", "b"], height=16, width=32, model="nowhere"), tmp_path / "o", False, "cpu", {})
    with pytest.raises(DiffcliError, match="cannot load"):
        load(AnagramConfig(model=str(tmp_path / "none")), CPU, torch.float32)
    with pytest.raises(DiffcliError, match="negate: no meaning on a StableDiffusionPipeline's latent grid"):
        load(AnagramConfig(model=str(tiny_sd), views=["identity", "negate"]), CPU, torch.float32)  # latent model
    with pytest.raises(DiffcliError, match="stage II"):
        load(AnagramConfig(model=str(tiny_if[0]), sr_model=str(tiny_if[0])), CPU, torch.float32)
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------- composition: SEG, samplers

def test_seg_on_both_if_stages_off_is_plain_and_the_cli_example_runs(pipes, tiny_if, tmp_path, capsys):
    from conftest import invoke_cli
    pipe, sr_pipe = pipes
    job = Job("x", ["a horse", "a village"])
    base = dict(steps=3, sr_steps=2)
    plain = generate(pipe, sr_pipe, job, AnagramConfig(**base), (16, 16), CPU)
    off = generate(pipe, sr_pipe, job, AnagramConfig(**base, blurs=["ema_0.5_0.9_cosine"], seg_scale=0.0), (16, 16), CPU)
    on = generate(pipe, sr_pipe, job, AnagramConfig(**base, blurs=["ema_0.5_0.9_cosine"]), (16, 16), CPU)
    assert torch.equal(off["views"], plain["views"]) and not torch.equal(on["views"], plain["views"])
    dpm = generate(pipe, sr_pipe, job, AnagramConfig(**base, sampler="dpmpp_2m", schedule="karras"), (16, 16), CPU)
    assert torch.isfinite(dpm["views"]).all() and not torch.equal(dpm["views"], plain["views"])
    code, out, err = invoke_cli(["anagram", "a horse", "a village", "--model", tiny_if[0], "--sr-model", tiny_if[1],
                                 "--steps", "2", "--sr-steps", "1", "--frames", "2", "--blur", "ema_0.5_0.9_cosine",
                                 "--out", tmp_path / "a"], capsys)
    assert code == 0, err
