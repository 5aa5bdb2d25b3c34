"""diffcli seg: the attention processor, SEG as a denoiser combinator, the guided steps, the command end to end."""
from __future__ import annotations

import csv
import json
import math

import pytest
import torch
from conftest import call_cli, run_torchrun

from diffcli.core import attention, guidance
from diffcli.backends import pipelines
from diffcli import seg
from diffcli.core.query_blur import gaussian_blur, parse_blur
from diffcli.shared.errors import DiffcliError
from diffcli.core.guidance import classifier_free, smoothed_energy

CPU = torch.device("cpu")


# ---------------------------------------------------------------- the processor on one attention layer

def attention_layer():
    from diffusers.models.attention_processor import Attention
    torch.manual_seed(0)
    return Attention(query_dim=8, heads=2, dim_head=4).eval()


def run_layer(layer, x, state, perturb=True):
    with torch.no_grad():
        return attention.SegAttnProcessor(state, "attn1", perturb)(layer, x)


def reference_attention(layer, x, q_map=lambda q: q):
    """softmax(q K^T / sqrt(d)) V by hand, with the (B, heads, N, d) query mapped first."""
    b, n, _ = x.shape
    split = lambda t: t.view(b, n, 2, 4).transpose(1, 2)
    with torch.no_grad():
        q, k, v = split(layer.to_q(x)), split(layer.to_k(x)), split(layer.to_v(x))
        weights = torch.softmax(q_map(q) @ k.transpose(-1, -2) / 2.0, -1)
        return layer.to_out[0]((weights @ v).transpose(1, 2).reshape(b, n, 8))


def test_processor_without_blur_is_the_default_processor():
    from diffusers.models.attention_processor import AttnProcessor2_0
    layer, x = attention_layer(), torch.randn(4, 12, 8)
    with torch.no_grad():
        default = AttnProcessor2_0()(layer, x)
    state = attention.SegState(roles=("uncond", "cond"), latent_hw=(3, 4))
    torch.testing.assert_close(run_layer(layer, x, state), default)
    torch.testing.assert_close(reference_attention(layer, x), default)


def test_sigma_zero_equals_the_unperturbed_pass():
    layer, x = attention_layer(), torch.randn(4, 12, 8)
    plain = run_layer(layer, x, attention.SegState(roles=("cond", "seg"), latent_hw=(3, 4)))
    state = attention.SegState(roles=("cond", "seg"), blur=parse_blur("gaussian_-1_0"), latent_hw=(3, 4))
    assert torch.equal(run_layer(layer, x, state), plain)


def test_infinite_blur_is_attention_with_the_mean_query():
    layer, x = attention_layer(), torch.randn(6, 12, 8)
    state = attention.SegState(roles=("uncond", "cond", "seg"), blur=parse_blur("gaussian_-1_1e7"), latent_hw=(3, 4))
    out = run_layer(layer, x, state)
    plain = reference_attention(layer, x[:4])
    mean_q = reference_attention(layer, x[4:], lambda q: q.mean(2, keepdim=True).expand_as(q))
    torch.testing.assert_close(out[:4], plain)  # the uncond and cond chunks are untouched
    torch.testing.assert_close(out[4:], mean_q)
    assert torch.allclose(out[4:], out[4:, :1].expand_as(out[4:]), atol=1e-6)  # one output row, repeated
    mean_v = reference_attention(layer, x[4:], torch.zeros_like)  # a zero query weighs all tokens alike: mean(V)
    assert not torch.allclose(out[4:], mean_v, atol=1e-4)  # the infinite blur is NOT mean(V)


def test_finite_blur_uses_the_non_square_token_grid():
    assert attention.token_grid(32, (8, 16)) == (4, 8) and attention.token_grid(128, (8, 16)) == (8, 16)
    with pytest.raises(ValueError):
        attention.token_grid(30, (8, 16))
    layer, x = attention_layer(), torch.randn(2, 32, 8)
    blur = parse_blur("gaussian_3_1.5")
    out = run_layer(layer, x, attention.SegState(roles=("cond", "seg"), blur=blur, latent_hw=(8, 16)))
    torch.testing.assert_close(out[:1], reference_attention(layer, x[:1]))
    torch.testing.assert_close(out[1:], reference_attention(layer, x[1:], lambda q: gaussian_blur(q, 4, 8, 3, 1.5)))
    # an unselected layer ignores the blur
    torch.testing.assert_close(run_layer(layer, x, attention.SegState(roles=("cond", "seg"), blur=blur,
                                                                      latent_hw=(8, 16)), perturb=False),
                               reference_attention(layer, x))


def test_metrics_of_a_layer():
    out = torch.randn(2, 12, 5)
    m = attention.attention_metrics(out, out, 3, 4)
    assert m["l2"] == 0 and m["laplacian_var"] > 0 and 0 < m["edge_entropy"] <= math.log(12) + 1e-6
    flat = attention.attention_metrics(out, torch.ones(2, 12, 5), 3, 4)
    assert flat["laplacian_var"] == 0 and flat["l2"] > 0


# ---------------------------------------------------------------- SEG on a tiny SD pipeline

@pytest.fixture(scope="module")
def sd(tiny_sd):
    return pipelines.load_pipeline(str(tiny_sd), CPU, torch.float32)


def encodings(pipe, n=2, size=(16, 16)):
    return pipelines.encode_prompts(pipe, ["a cat"] * n, None, *size, CPU)


def test_layer_names_follow_the_official_indexing(sd):
    layers = attention.self_attention_layers(sd.unet)
    assert [len(layers[b]) for b in ("down", "mid", "up")] == [2, 1, 4]
    assert attention.resolve_layers(sd.unet, ["m0"]) == layers["mid"]
    assert attention.resolve_layers(sd.unet, ["d1", "down"]) == [layers["down"][1], layers["down"][0]]
    with pytest.raises(DiffcliError, match=r"'u9'.*valid: down \(d0-d1\), mid \(m0\), up \(u0-u3\)"):
        attention.resolve_layers(sd.unet, ["u9"])


def test_seg_with_no_layer_perturbed_equals_cfg(sd):
    cond, uncond = encodings(sd)
    x, sigma = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)) * 3, torch.full((2,), 3.0)
    model, state = pipelines.denoiser(sd), attention.SegState()
    always = lambda s: parse_blur("gaussian_-1_1e7")
    with attention.installed(sd.unet, state, []), torch.no_grad():
        for w in (5.0, 0.0):
            d_seg = smoothed_energy(model, 3.0, w, cond, uncond, state, always)(x, sigma)
            torch.testing.assert_close(d_seg, classifier_free(model, w or 1.0, cond, uncond)(x, sigma),
                                       atol=1e-5, rtol=1e-5)
    with attention.installed(sd.unet, state, attention.resolve_layers(sd.unet, ["down", "mid", "up"])), \
            torch.no_grad():
        identity = smoothed_energy(model, 3.0, 5.0, cond, uncond, state, lambda s: parse_blur("gaussian_-1_0"))
        torch.testing.assert_close(identity(x, sigma), classifier_free(model, 5.0, cond, uncond)(x, sigma),
                                   atol=1e-5, rtol=1e-5)
        guided = smoothed_energy(model, 3.0, 5.0, cond, uncond, state, always)(x, sigma)
        assert not torch.allclose(guided, classifier_free(model, 5.0, cond, uncond)(x, sigma), atol=1e-3)
    assert state.blur is None


def test_guided_steps_regions_and_sigma_window():
    sigmas = torch.tensor([10.0, 5.0, 2.0, 1.0, 0.5, 0.2, 0.0])
    assert [guidance.region(i, 6) for i in range(6)] == ["begin"] * 2 + ["mid"] * 2 + ["end"] * 2
    assert guidance.guided_steps(sigmas, ["begin"]) == [True, True, False, False, False, False]
    assert guidance.guided_steps(sigmas, ["begin", "end"]) == [True, True, False, False, True, True]
    assert guidance.guided_steps(sigmas, list(guidance.REGIONS), 4.0, 0.6) == [False, False, True, True, False, False]
    assert [guidance.region(i, 50) for i in (0, 16, 17, 33, 34, 49)] == ["begin", "begin", "mid", "mid", "end", "end"]
    at = guidance.blur_schedule(parse_blur("ema_0.2_0.8_linear"), sigmas, [True] * 6)
    assert at(torch.tensor([10.0])).alpha == pytest.approx(0.2) and at(torch.tensor([0.2])).alpha == pytest.approx(0.8)
    assert guidance.blur_schedule(parse_blur("ema_0.2_0.8_linear"), sigmas, [False] * 6)(torch.tensor([1.0])) is None


@pytest.mark.parametrize("regions,w,expected", [(["begin"], 5.0, [6, 6, 4, 4, 4, 4]),
                                                       (["mid", "end"], 5.0, [4, 4, 6, 6, 6, 6]),
                                                       (["begin", "mid", "end"], 0.0, [4] * 6)])
def test_regions_count_the_perturbed_passes(sd, regions, w, expected, monkeypatch):
    batches = []
    forward = sd.unet.forward
    monkeypatch.setattr(sd.unet, "forward", lambda x, *a, **k: batches.append(len(x)) or forward(x, *a, **k))
    cfg = seg.SegConfig(prompts=["a cat"], steps=6, n=2, cfg=w, regions=regions)
    sigmas = pipelines.sigmas(sd, 6, CPU)
    g = guidance.Seg(3.0, parse_blur("gaussian_-1_2"), ["mid"], regions)
    with g.installed(sd.unet):
        images = seg.sample(sd, *encodings(sd), [0, 1], cfg, guidance.Guidance(w, g), sigmas, CPU)
    assert batches == expected and images.shape == (2, 3, 16, 16)


# ---------------------------------------------------------------- the command

def options(path, **kw):
    base = dict(prompts=["a cat"], model=str(path), steps=2, n=1, blurs=["gaussian_-1_2"])
    return seg.SegConfig(**{**base, **kw})


def test_sdxl_path_and_non_square(tiny_sdxl, tmp_path):
    out = tmp_path / "xl"
    cfg = options(tiny_sdxl, layers=["down", "mid", "up"], height=16, width=32, cfg=5.0, n=2,
                  blurs=["gaussian_-1_1e7", "interpolatedBoxBlur_3_0.5"], metrics=True, track_block="u0")
    result = seg.run(cfg, out, False, "cpu", {})
    record = json.loads((out / "run.json").read_text())
    assert result["images"] == 4 and record["model"]["kind"] == "StableDiffusionXLPipeline"
    assert record["tracked_layers"] == ["up_blocks.0.attentions.0.transformer_blocks.0.attn1"]
    from PIL import Image
    first = out / record["images"]["gaussian_-1_1e7"][0]
    assert Image.open(first).size == (32, 16)
    plain = seg.run(options(tiny_sdxl, seg_scale=0.0, height=16, width=32, cfg=5.0, n=2), tmp_path / "cfg",
                    False, "cpu", {})
    assert plain["images"] == 2
    assert Image.open(tmp_path / "cfg" / "a_cat_seed0.png").tobytes() != Image.open(first).tobytes()


def test_cli_prompts_file_hostile_names_blurs_and_metrics(tiny_sd, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n../x\n# skipped\n\na/b\na b\n")
    out = tmp_path / "run" / "out"
    proc = call_cli("seg", "--prompts-file", prompts, "--model", tiny_sd, "--steps", "3", "--n", "2",
                   "--blur", "gaussian_-1_2", "--blur", "ema_0.1_0.9_cosine", "--layers", "down,mid",
                   "--regions", "begin", "--guidance", "4", "--metrics", "--width", "32", "--out", out,
                   "--device", "cpu", check=True)
    assert "wrote 16 images (2 blurs)" in proc.stdout
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["out"]  # nothing escaped the folder
    for folder in ("gaussian_-1_2", "ema_0.1_0.9_cosine"):
        names = sorted(p.name for p in (out / folder).glob("*.png"))
        assert names == sorted(f"{stem}_seed{s}.png" for stem in ("a_cat", "x", "a_b", "a_b-2") for s in (0, 1))
        with open(out / folder / "metrics.csv") as f:
            rows = list(csv.DictReader(f))
        assert list(rows[0]) == list(seg.METRIC_FIELDS)
        assert {r["prompt"] for r in rows} == {"a cat", "../x", "a/b", "a b"}
        blurred = {(r["step"], r["role"]) for r in rows if r["blurred"] == "True"}
        assert blurred == {("0", "seg")}  # regions begin of 3 steps: step 0 only
    from PIL import Image
    assert Image.open(out / "grid.png").size == (2 + 2 * 34, 2 + 8 * 18)  # 8 rows (prompt x seed), 2 blurs
    record = json.loads((out / "run.json").read_text())
    assert record["guided_steps"] == [0] and record["options"]["blurs"] == ["gaussian_-1_2", "ema_0.1_0.9_cosine"]


@pytest.mark.parametrize("change,message", [
    (dict(layers=["u9"]), r"--layers 'u9'.*valid: down \(d0-d1\), mid \(m0\), up \(u0-u3\)"),
    (dict(blurs=["gaussian_-1"]), "accepted forms: gaussian_K_S"),
    (dict(height=18), "--height 18: this model needs a positive multiple of 4"),
    (dict(model="/nonexistent/model"), "local folder"),
    (dict(steps=0), "--steps must be >= 1"),
    (dict(regions=["start"]), "--regions"),
    (dict(sigma_start=1.0, sigma_end=2.0), "--sigma-end <= --sigma-start"),
    (dict(metrics=True, track_block="side"), "--track-block 'side'"),
    (dict(cfg=-1.0), "--cfg"),
])
def test_bad_input_is_one_error_and_writes_nothing(tiny_sd, tmp_path, change, message):
    out = tmp_path / "out"
    with pytest.raises(DiffcliError, match=message) as e:
        seg.run(options(tiny_sd, **change), out, False, "cpu", {})
    assert "\n" not in str(e.value) and not out.exists()


def test_existing_outputs_need_overwrite_and_cli_errors_exit_2(tiny_sd, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.png").write_bytes(b"x")
    with pytest.raises(DiffcliError, match="--overwrite"):
        seg.run(options(tiny_sd), out, False, "cpu", {})
    proc = call_cli("seg", "a cat", "--model", tiny_sd, "--blur", "gaussian_x_1", "--out", tmp_path / "new")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "accepted forms" in proc.stderr
    assert not (tmp_path / "new").exists() and sorted(p.name for p in out.iterdir()) == ["keep.png"]


def test_cli_resume_and_two_ranks_write_the_same_images(tiny_sd, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red barn\na blue lake\na green hill\n")
    args = ["seg", "--prompts-file", str(prompts), "--model", str(tiny_sd), "--steps", "2", "--n", "2",
            "--blur", "gaussian_-1_1", "--blur", "interpolatedBoxBlur_3_0.5"]
    whole, cut, two = tmp_path / "whole", tmp_path / "cut", tmp_path / "two"
    call_cli(*args, "--out", whole, check=True)
    call_cli(*args, "--out", cut, check=True)
    victims = sorted(cut.rglob("a_blue_lake_seed1.png"))
    assert len(victims) == 2
    victims[0].unlink()
    (cut / "grid.png").unlink()
    proc = call_cli(*args, "--out", cut, "--resume", check=True)
    assert "2 prompt(s) already there" in proc.stdout
    proc = run_torchrun(*args, "--out", two, port=29551)
    pngs = sorted(str(p.relative_to(whole)) for p in whole.rglob("*.png"))
    assert len(pngs) == 13  # 3 prompts x 2 seeds x 2 blurs + grid
    for folder in (cut, two):
        assert sorted(str(p.relative_to(folder)) for p in folder.rglob("*.png")) == pngs
        for name in pngs:
            assert (folder / name).read_bytes() == (whole / name).read_bytes(), (folder.name, name)
