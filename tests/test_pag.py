"""PAG (perturbed-attention guidance): identity self-attention in the chosen layers, one batch with CFG and SEG."""
from __future__ import annotations

import pytest
import torch

from diffcli.backends import pipelines
from diffcli.core import attention
from diffcli.core.guidance import Guidance, Pag, Seg
from diffcli.core.query_blur import parse_blur
from diffcli.core.samplers import sample_euler
from diffcli.shared.devices import PerSampleRandn

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def sd(tiny_sd):
    return pipelines.load_pipeline(str(tiny_sd), CPU, torch.float32)


def our_latents(pipe, guidance: Guidance, prompts, seeds, steps):
    size = pipelines.default_size(pipe)
    shape = pipelines.latent_shape(pipe, size, size)
    sigmas = pipelines.sigmas(pipe, steps, CPU)
    cond, uncond = pipelines.encode_prompts(pipe, prompts, None, size, size, CPU)
    model = guidance.denoiser(pipelines.denoiser(pipe), cond, uncond, sigmas)
    with guidance.installed(pipe.unet), torch.no_grad():
        x = sample_euler(model, pipelines.initial_latents(PerSampleRandn(seeds, CPU), shape, sigmas[0]), sigmas)
    return x / (1 + sigmas[-1] ** 2).sqrt()


# diffusers names PAG layers by a regex on module paths ("mid" matches mid_block's attn1, "up" every up block's):
# the same self-attention layers as our block names
@pytest.mark.parametrize("layers,scale,w", [(["mid"], 3.0, 4.0), (["up"], 2.0, 1.0)])
def test_pag_equals_diffusers_pag_pipeline(tiny_sd, sd, layers, scale, w):
    from diffusers import DDIMScheduler, StableDiffusionPAGPipeline
    ref_pipe = StableDiffusionPAGPipeline.from_pretrained(str(tiny_sd), pag_applied_layers=layers,
                                                          safety_checker=None, requires_safety_checker=False)
    ref_pipe.scheduler = DDIMScheduler.from_config(ref_pipe.scheduler.config)
    sd.scheduler = DDIMScheduler.from_config(sd.scheduler.config)
    size, steps, prompts, seeds = pipelines.default_size(sd), 4, ["a cat", "a dog"], [3, 4]
    start = PerSampleRandn(seeds, CPU).randn(pipelines.latent_shape(sd, size, size))
    ref = ref_pipe(prompts, height=size, width=size, num_inference_steps=steps, guidance_scale=w,
                   pag_scale=scale, latents=start.clone(), output_type="latent").images
    ours = our_latents(sd, Guidance(w, pag=Pag(scale, layers)), prompts, seeds, steps)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
    plain = our_latents(sd, Guidance(w), prompts, seeds, steps)
    assert not torch.allclose(plain, ref, atol=1e-3)  # PAG changed the result: the comparison means something


def test_pag_scale_zero_is_the_run_without_it_bit_for_bit(sd):
    a = our_latents(sd, Guidance(4.0, pag=Pag(0.0, ["mid"])), ["a cat"], [1], 3)
    b = our_latents(sd, Guidance(4.0), ["a cat"], [1], 3)
    assert torch.equal(a, b)


def test_cfg_seg_pag_in_one_batch_on_different_layers(sd):
    """uncond, cond, seg, pag as one network batch of 4 chunks; SEG on mid, PAG on up: equal to the sum of the terms
    computed from separate runs (CFG alone, SEG alone, PAG alone)."""
    size = 16
    cond, uncond = pipelines.encode_prompts(sd, ["a cat"] * 2, None, size, size, CPU)
    x, sigma = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5)) * 3, torch.full((2,), 3.0)
    sigmas = torch.tensor([3.0, 0.0])
    blur = parse_blur("gaussian_-1_2")
    model, calls = pipelines.denoiser(sd), []
    counted = lambda x, s, **kw: calls.append(x.shape[0]) or model(x, s, **kw)  # noqa: E731
    w, s, p = 4.0, 2.0, 3.0

    def run(guidance):
        calls.clear()
        with guidance.installed(sd.unet), torch.no_grad():
            return guidance.denoiser(counted, cond, uncond, sigmas)(x, sigma)

    both = run(Guidance(w, seg=Seg(s, blur, ["mid"]), pag=Pag(p, ["up"])))
    assert calls == [8]  # 4 roles x 2 samples, one call
    assert Guidance(w, seg=Seg(s, blur, ["mid"]), pag=Pag(p, ["up"])).rows() == {"uncond": 1, "cond": 1, "seg": 1,
                                                                                "pag": 1}
    cfg = run(Guidance(w))
    seg_only = run(Guidance(w, seg=Seg(s, blur, ["mid"])))
    pag_only = run(Guidance(w, pag=Pag(p, ["up"])))
    torch.testing.assert_close(both, seg_only + pag_only - cfg, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(pag_only, cfg, atol=1e-3) and not torch.allclose(seg_only, cfg, atol=1e-3)
    # no layer left perturbed after the run: the default processors are back
    assert not any(isinstance(p, attention.SegAttnProcessor) for p in sd.unet.attn_processors.values())


def test_identity_attention_outputs_the_values():
    q, k, v = (torch.randn(4, 2, 6, 3, generator=torch.Generator().manual_seed(i)) for i in range(3))
    out = attention.perturbed_attention(q, k, v, ("cond", "pag"), None, True)
    torch.testing.assert_close(out[2:], v[2:])
    torch.testing.assert_close(out[:2], torch.nn.functional.scaled_dot_product_attention(q[:2], k[:2], v[:2]))
    plain = attention.perturbed_attention(q, k, v, ("cond", "pag"), None, False)  # not a PAG layer: plain
    torch.testing.assert_close(plain, torch.nn.functional.scaled_dot_product_attention(q, k, v))


def test_seg_command_runs_pag_alone_and_with_seg_on_other_layers(tiny_sd, tmp_path):
    import json
    from conftest import call_cli
    common = ("--model", tiny_sd, "--steps", "2", "--n", "1", "--device", "cpu")
    call_cli("seg", "a cat", *common, "--seg-scale", "0", "--pag-scale", "3", "--out", tmp_path / "pag", check=True)
    call_cli("seg", "a cat", *common, "--layers", "mid", "--pag-scale", "3", "--pag-layers", "up",
             "--out", tmp_path / "both", check=True)
    call_cli("seg", "a cat", *common, "--seg-scale", "0", "--out", tmp_path / "cfg", check=True)
    call_cli("seg", "a cat", *common, "--seg-scale", "0", "--pag-scale", "0", "--out", tmp_path / "cfg0", check=True)
    pag, both = (json.loads((tmp_path / d / "run.json").read_text()) for d in ("pag", "both"))
    assert pag["perturbed_layers"] == [] and pag["pag_layers"] and all("mid_block" in p for p in pag["pag_layers"])
    assert pag["cost"]["rows"] == {"uncond": 1, "cond": 1, "pag": 1} and pag["cost"]["evaluations_per_sample"] == 2
    assert all("up_blocks" in p for p in both["pag_layers"]) and both["cost"]["rows_per_evaluation"] == 4
    from conftest import pixels
    image = lambda d: pixels(tmp_path / d / "a_cat_seed0.png")  # noqa: E731
    assert image("cfg0") == image("cfg") != image("pag")
    proc = call_cli("seg", "a cat", *common, "--pag-scale", "3", "--pag-layers", "u9", "--out", tmp_path / "bad")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "--pag-layers 'u9'" in proc.stderr
    assert not (tmp_path / "bad").exists()


def test_pag_on_if_and_our_unets_changes_the_result(tiny_if, tmp_path):
    """IF's added-KV joint attention (identity over the image's own tokens) and our digit UNets take PAG too."""
    pipe = pipelines.load_pipeline(str(tiny_if[0]), CPU, torch.float32)
    cond, uncond = pipelines.encode_prompts(pipe, ["a cat"], None, 16, 16, CPU)
    x, sigma = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(2)), torch.full((1,), 2.0)
    model = pipelines.denoiser(pipe)
    outs = []
    for g in (Guidance(3.0), Guidance(3.0, pag=Pag(2.0, ["down", "mid", "up"]))):
        with g.installed(pipe.unet), torch.no_grad():
            outs.append(g.denoiser(model, cond, uncond, torch.tensor([2.0, 0.0]))(x, sigma))
    assert not torch.allclose(outs[0], outs[1], atol=1e-4)


def test_sample_takes_pipelines_as_seg_does(tiny_sd, tmp_path):
    """`sample "a cat" --model PIPE` is seg's run with SEG off: the same pixels as `seg --seg-scale 0`, PAG included;
    options of diffcli models are refused in one line."""
    import json
    from conftest import call_cli, pixels
    common = ("--model", tiny_sd, "--steps", "2", "--n", "2", "--cfg", "4", "--pag-scale", "2", "--device", "cpu")
    call_cli("sample", "a cat", *common, "--out", tmp_path / "sample", check=True)
    call_cli("seg", "a cat", *common, "--seg-scale", "0", "--out", tmp_path / "seg", check=True)
    for name in ("a_cat_seed0.png", "a_cat_seed1.png", "grid.png"):
        assert pixels(tmp_path / "sample" / name) == pixels(tmp_path / "seg" / name)
    record = json.loads((tmp_path / "sample" / "run.json").read_text())
    assert record["command"] == "sample" and record["cost"]["rows"] == {"uncond": 1, "cond": 1, "pag": 1}
    for bad, message in ((("--labels", "3"), "--labels is for diffcli models"),
                         (("--checkpoint", tiny_sd), "give one"), (("--strip",), "--strip is for diffcli models")):
        proc = call_cli("sample", "a cat", *common, *bad, "--out", tmp_path / "bad")
        assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    proc = call_cli("sample", "a cat", "--out", tmp_path / "bad")
    assert proc.returncode == 2 and "--prompt goes with --model" in proc.stderr
    assert not (tmp_path / "bad").exists()


def test_sample_takes_flow_pipelines_with_their_options(tiny_flux, tmp_path):
    """`sample --model FLUX`: guidance-distilled, so CFG is off unless asked (one network row a step), and
    --guidance-embed reaches the network; both flags are refused on diffcli models in one line."""
    import json
    from conftest import call_cli, pixels
    common = ("a cat", "--model", tiny_flux, "--steps", "2", "--height", "16", "--width", "16", "--device", "cpu")
    call_cli("sample", *common, "--out", tmp_path / "a", check=True)
    call_cli("sample", *common, "--guidance-embed", "6", "--out", tmp_path / "b", check=True)
    record = json.loads((tmp_path / "a" / "run.json").read_text())
    assert record["cost"]["rows"] == {"cond": 1}
    assert pixels(tmp_path / "a" / "a_cat_seed0.png") != pixels(tmp_path / "b" / "a_cat_seed0.png")
    proc = call_cli("sample", "--n", "2", "--guidance-embed", "3", "--out", tmp_path / "bad")
    assert proc.returncode == 2 and "--guidance-embed goes with --model" in proc.stderr
    assert not (tmp_path / "bad").exists()
