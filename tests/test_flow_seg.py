"""SEG on joint attention (SD3 joint blocks, Flux double/single blocks): the image queries blurred on their 2-D
grid after QK-norm and RoPE, in the same batch as the CFG passes; the derivation of docs/seg.md by hand."""
from __future__ import annotations

import pytest
import torch

from conftest import call_cli
from diffcli.backends import pipelines
from diffcli.core import attention, joint_attention
from diffcli.core.guidance import classifier_free, smoothed_energy
from diffcli.core.query_blur import _gaussian_operator, parse_blur
from diffcli.shared.images import load_images

CPU = torch.device("cpu")


def family(path):
    return pipelines.load_family(str(path), CPU, torch.float32)


def inputs(fam, h=16, w=32, n=2, seed=0):
    fam.check_size(h, w)
    cond, uncond = fam.encode_prompts(["a cat"] * n, None, h, w)
    x = torch.randn(n, *fam.latent_shape(h, w), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return x * 3, torch.full((n,), 2.0, dtype=torch.float64), cond, uncond


@pytest.mark.parametrize("which", ["tiny_sd3", "tiny_flux"])
def test_processor_without_blur_is_the_diffusers_processor(which, request):
    """Our processors on every layer, no blur: the network's output is diffusers' own, through our computation
    (same math) and, where a call perturbs nothing, through the module's own processor (bit for bit)."""
    fam = family(request.getfixturevalue(which))
    x, sigma, cond, _ = inputs(fam)
    d = fam.denoiser()
    want = d(x, sigma, **cond)
    state = attention.SegState(roles=("cond",))
    state.latent_hw = tuple(x.shape[-2:])
    every = fam.layers(["all"])
    with attention.installed(fam.attention, state, every, factory=fam.seg_processor):
        assert torch.equal(d(x, sigma, **cond), want)
        modules = dict(fam.attention.named_modules())
        for p in every:
            modules[p].processor.plain = None  # our own computation of the same attention
        got = d(x, sigma, **cond)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("which", ["tiny_sd3", "tiny_flux"])
def test_sigma_zero_perturbs_nothing_and_the_perturbed_pass_rides_in_the_batch(which, request):
    fam = family(request.getfixturevalue(which))
    x, sigma, cond, uncond = inputs(fam)
    calls = []
    hook = fam.attention.register_forward_pre_hook(lambda m, a, kw: calls.append(kw["hidden_states"].shape[0]),
                                                   with_kwargs=True)
    state = attention.SegState()
    zero = parse_blur("gaussian_-1_0")
    seg = smoothed_energy(fam.denoiser(), 3.0, 4.0, cond, uncond, state, lambda s: zero)
    with attention.installed(fam.attention, state, fam.layers(["all"]), factory=fam.seg_processor):
        got = seg(x, sigma)
    hook.remove()
    assert calls == [3 * x.shape[0]]  # uncond, cond and the perturbed pass: one network call
    plain = classifier_free(fam.denoiser(), 4.0, cond, uncond)(x, sigma)
    torch.testing.assert_close(got, plain, atol=1e-6, rtol=1e-6)


def test_flux_infinite_blur_is_the_mean_of_the_rotated_image_queries(tiny_flux, monkeypatch):
    """In a single-stream block (text and image in one sequence) the perturbed chunk's image rows all see one
    query, the mean of the image queries after RoPE (so every image row of the output is the same; a mean taken
    before RoPE would be rotated differently at every position); text rows and the other chunks are untouched."""
    fam = family(tiny_flux)
    x, sigma, cond, uncond = inputs(fam, n=1)
    seen = []
    original = joint_attention.attend

    def spy(q, k, v, image, grid, blur, roles, identity=False, mask=None):
        out = original(q, k, v, image, grid, blur, roles, identity, mask)
        seen.append((q, k, v, image, out))
        return out

    monkeypatch.setattr(joint_attention, "attend", spy)
    state = attention.SegState()
    seg = smoothed_energy(fam.denoiser(), 3.0, 1.0, cond, uncond, state, lambda s: parse_blur("gaussian_-1_99999"))
    with attention.installed(fam.attention, state, ["single_transformer_blocks.0.attn"], factory=fam.seg_processor):
        seg(x, sigma)
    (q, k, v, image, out), = seen
    assert image.stop == q.shape[2] and image.stop - image.start == 4 * 8  # the last 4x8 tokens
    seg_rows = out[1, :, image]
    assert torch.allclose(seg_rows, seg_rows[:, :1].expand_as(seg_rows), atol=1e-6)
    q_mean = q[1, :, image].mean(1, keepdim=True)
    want = torch.softmax(q_mean @ k[1].transpose(-1, -2) / q.shape[-1] ** 0.5, -1) @ v[1]
    torch.testing.assert_close(seg_rows[:, :1], want, atol=1e-6, rtol=1e-5)
    text = slice(0, image.start)
    plain = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(out[:, :, text], plain[:, :, text])
    torch.testing.assert_close(out[0], plain[0])


def test_post_rope_query_blur_is_a_logit_blur_and_pre_rope_is_not():
    """docs/seg.md by hand: with B the gaussian on a 3x4 grid and R the RoPE rotation of each position,
    (B R q) k^T = B (R q k^T) exactly, while (R B q) k^T differs."""
    from diffusers.models.embeddings import apply_rotary_emb, get_1d_rotary_pos_embed
    torch.manual_seed(0)
    h, w, d = 3, 4, 8
    q, k = torch.randn(h * w, d, dtype=torch.float64), torch.randn(h * w, d, dtype=torch.float64)
    rows, cols = torch.arange(h).repeat_interleave(w), torch.arange(w).repeat(h)
    freqs = [get_1d_rotary_pos_embed(d // 2, p.double(), repeat_interleave_real=True, use_real=True,
                                     freqs_dtype=torch.float64) for p in (rows, cols)]
    rope = (torch.cat([freqs[0][0], freqs[1][0]], -1), torch.cat([freqs[0][1], freqs[1][1]], -1))
    rot = lambda t: apply_rotary_emb(t[None, :, None], rope, sequence_dim=1)[0, :, 0]  # noqa: E731
    op = torch.kron(_gaussian_operator(h, 3, 1.0, CPU, torch.float64), _gaussian_operator(w, 3, 1.0, CPU, torch.float64))
    logits = rot(q) @ rot(k).T
    blur = parse_blur("gaussian_3_1")
    post = blur(rot(q), h, w) @ rot(k).T
    pre = rot(blur(q, h, w)) @ rot(k).T
    torch.testing.assert_close(post, op @ logits)  # the logit map blurred along the query axis
    assert (pre - op @ logits).abs().max() > 1e-2


def test_seg_command_on_flow_models(tiny_sd3, tiny_flux, tmp_path):
    """--seg-scale 0 with SEG's processors installed on every block writes the bytes of the plain CFG run (no
    processors); SEG (the command's default: scale 3, infinite blur, the middle block) changes them; bad layer names and --guidance-embed on a
    model without the embedding are refused in one line before anything is written."""
    common = ["--steps", "2", "--n", "1", "--height", "16", "--width", "32", "--device", "cpu"]
    for name, model in (("sd3", tiny_sd3), ("flux", tiny_flux)):
        plain, zero, on = (tmp_path / f"{name}-{k}" for k in ("plain", "zero", "on"))
        call_cli("seg", "a cat", "--model", model, *common, "--seg-scale", "0", "--out", plain, check=True)
        call_cli("seg", "a cat", "--model", model, *common, "--blur", "gaussian_-1_2", "--seg-scale", "0",
                 "--layers", "all", "--out", zero, check=True)
        call_cli("seg", "a cat", "--model", model, *common, "--out", on, check=True)
        a, b, c = (load_images([o / "a_cat_seed0.png"]) for o in (plain, zero, on))
        assert torch.equal(a, b) and not torch.equal(a, c)
    bad = call_cli("seg", "a cat", "--model", tiny_sd3, *common, "--blur", "gaussian_-1_2", "--layers", "u1",
                   "--out", tmp_path / "bad1")
    assert bad.returncode != 0 and "no such attention block" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "bad1").exists()
    bad = call_cli("seg", "a cat", "--model", tiny_sd3, *common, "--guidance-embed", "3", "--out", tmp_path / "bad2")
    assert bad.returncode != 0 and "no distilled guidance embedding" in bad.stderr
    assert not (tmp_path / "bad2").exists()
    bad = call_cli("seg", "a cat", "--model", tiny_flux, *common[:4], "--width", "18", "--device", "cpu",
                   "--out", tmp_path / "bad3")
    assert bad.returncode != 0 and "multiple of 4 px" in bad.stderr and not (tmp_path / "bad3").exists()


def test_pag_on_sd3_joint_attention_equals_diffusers_pag_pipeline(tmp_path):
    """PAG on SD3's joint blocks (identity on the image-to-image block, text rows and columns kept) with CFG, in one
    batch of three chunks: equal to diffusers' StableDiffusion3PAGPipeline on the same layer, scales and noise.
    diffusers' PAG joint processors skip QK-norm (SD3.5 has it), so the reference model is SD3 medium's shape,
    without QK-norm; ours applies the norm where the model has one, as the model's own processor does."""
    from diffusers import StableDiffusion3PAGPipeline
    from diffcli.core.guidance import Guidance, Pag
    from diffcli.core.samplers import run_sampler
    from pipes import build_tiny_sd3
    from test_flow import _Fixed
    path = build_tiny_sd3(tmp_path, qk_norm=None)
    fam = family(path)
    ref_pipe = StableDiffusion3PAGPipeline.from_pretrained(str(path), pag_applied_layers=["blocks.1"],
                                                           text_encoder_3=None, tokenizer_3=None)
    h, w, steps, cfg, pag = 16, 32, 4, 4.0, 3.0
    fam.check_size(h, w)
    noise = torch.randn(2, *fam.latent_shape(h, w), generator=torch.Generator().manual_seed(4))
    want = ref_pipe(prompt=["a cat", "a dog"], height=h, width=w, num_inference_steps=steps, guidance_scale=cfg,
                    pag_scale=pag, latents=noise.clone(), output_type="latent").images
    cond, uncond = fam.encode_prompts(["a cat", "a dog"], None, h, w)
    sigmas = fam.sigmas(steps)

    def ours(guidance):
        model = guidance.denoiser(fam.denoiser(), cond, uncond, sigmas)
        with guidance.installed(fam.attention), torch.no_grad():
            x = fam.initial_latents(_Fixed(noise), noise.shape[1:], sigmas[0])
            return run_sampler("euler", model, x, sigmas).float()

    torch.testing.assert_close(ours(Guidance(cfg, pag=Pag(pag, ["j1"]))), want, atol=2e-5, rtol=1e-4)
    assert not torch.allclose(ours(Guidance(cfg)), want, atol=1e-3)  # PAG changed the result: the test means something


@pytest.mark.parametrize("which", ["tiny_sd3", "tiny_flux"])
def test_pag_and_seg_on_joint_attention_ride_in_one_batch(which, request):
    """CFG + SEG + PAG on a transformer: one network call of four chunks; the seg chunk (not the pag one) is blurred
    and the pag chunk takes identity attention, each only on its own layers."""
    from diffcli.core.guidance import Guidance, Pag, Seg
    fam = family(request.getfixturevalue(which))
    x, sigma, cond, uncond = inputs(fam)
    sigmas = torch.tensor([2.0, 0.0], dtype=torch.float64)
    blur = parse_blur("gaussian_-1_9999999")
    first, last = ("j0", "j1") if which == "tiny_sd3" else ("d0", "s1")
    model, calls = fam.denoiser(), []
    counted = lambda x, s, **kw: calls.append(x.shape[0]) or model(x, s, **kw)  # noqa: E731

    def run(guidance):
        calls.clear()
        with guidance.installed(fam.attention), torch.no_grad():
            return guidance.denoiser(counted, cond, uncond, sigmas)(x, sigma)

    seg, pag = Seg(2.0, blur, [first]), Pag(3.0, [last])
    both = run(Guidance(4.0, seg=seg, pag=pag))
    assert calls == [8]
    plain = run(Guidance(4.0))
    seg_only = run(Guidance(4.0, seg=Seg(2.0, blur, [first])))
    pag_only = run(Guidance(4.0, pag=Pag(3.0, [last])))
    torch.testing.assert_close(both - plain, (seg_only - plain) + (pag_only - plain), atol=1e-6, rtol=1e-5)
    assert (seg_only - plain).abs().max() > 1e-4 and (pag_only - plain).abs().max() > 1e-4
