"""Blurring diffusion: the DCT, the damping, the forward marginals, sigma_B,max = 0 == plain DDPM, training
through the shared loop (resume, IO), sampling through `diffcli sample` (--strip, --gif, --show-forward), bad input."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import call_cli
from diffcli.core import dct as dct_mod
from diffcli.core.blurring import (BlurringLoss, BlurSchedule, blurred_mean, diffuse, get_ts, reverse_step,
                                   sample_blurring)
from diffcli.cli import app
from diffcli.shared.errors import DiffcliError
from diffcli.shared.checkpoints import load_checkpoint
from diffcli.core.dct import dct, dct2, idct, idct2
from diffcli.backends.models import load_model
from diffcli.train import TrainConfig, train

SIZES = [(8, 8), (7, 12), (28, 28)]


# ---------------------------------------------------------------- DCT

@pytest.mark.parametrize("fft", [False, True], ids=["matrix", "fft"])
@pytest.mark.parametrize("size", SIZES, ids=str)
def test_dct_round_trip_is_identity_and_orthonormal(monkeypatch, fft, size):
    if fft:
        monkeypatch.setattr(dct_mod, "FFT_ABOVE", 0)
    x = torch.randn(3, 2, *size, dtype=torch.float64)
    u = dct2(x)
    assert torch.allclose(idct2(u), x, atol=1e-12)
    assert torch.allclose(dct2(idct2(x)), x, atol=1e-12)
    assert torch.allclose((u ** 2).sum((-2, -1)), (x ** 2).sum((-2, -1)))  # Parseval: a rotation
    # frequency (0, 0) is the mean times sqrt(HW); a constant image has nothing else
    assert torch.allclose(u[..., 0, 0], x.mean((-2, -1)) * math.sqrt(size[0] * size[1]))
    const = dct2(torch.full((1, 1, *size), 0.3, dtype=torch.float64))
    assert const[..., 1:, :].abs().max() < 1e-12 and const[..., 0, 1:].abs().max() < 1e-12


def test_fft_form_equals_matrix_form_and_scipy(monkeypatch):
    x = torch.randn(4, 5, 33, dtype=torch.float64)
    by_matrix = dct(x), idct(x)
    monkeypatch.setattr(dct_mod, "FFT_ABOVE", 0)
    assert torch.allclose(dct(x), by_matrix[0], atol=1e-12) and torch.allclose(idct(x), by_matrix[1], atol=1e-12)
    fft = pytest.importorskip("scipy.fft")
    assert torch.allclose(dct(x, dim=1), torch.from_numpy(fft.dct(x.numpy(), axis=1, norm="ortho")), atol=1e-12)


def test_dct_stays_fp32_under_bf16_autocast():
    x = torch.randn(2, 1, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = idct2(dct2(x))
    assert y.dtype == torch.float32 and torch.allclose(y, x, atol=1e-5)


# ---------------------------------------------------------------- schedule and forward process

def test_damping_is_one_at_frequency_zero_and_decreasing_in_frequency():
    s = BlurSchedule(blur_sigma_max=20.0)
    t = torch.tensor([0.0, 0.05, 0.3, 0.7, 1.0])
    d = s.damping(t, (8, 12))[:, 0]
    assert d.shape == (5, 8, 12)
    assert torch.all(d[:, 0, 0] == 1)
    assert torch.all(d[0] == 1)  # sigma_B(0) = 0: no blur at all
    assert torch.all((d >= s.d_min) & (d <= 1))
    assert torch.all(d[:, 1:, :] <= d[:, :-1, :]) and torch.all(d[:, :, 1:] <= d[:, :, :-1])
    early = d[1]  # before the high frequencies reach d_min: strictly decreasing along both axes
    assert torch.all(early[1:, :] < early[:-1, :]) and torch.all(early[:, 1:] < early[:, :-1])
    assert torch.all(d[1:] <= d[:-1]) and d[-1, 1:, 1:].max() < 1.01 * s.d_min  # and in time, to d_min
    assert torch.all(BlurSchedule(blur_sigma_max=0.0).damping(t, (8, 8)) == 1)  # exactly, not nearly


def test_logsnr_spans_the_clipped_range():
    s = BlurSchedule()
    ls = s.logsnr(torch.tensor([0.0, 0.5, 1.0]))
    assert torch.allclose(ls, torch.tensor([10.0, 0.0, -10.0], dtype=torch.float64), atol=1e-9)
    a, sigma = s.noise_scaling(torch.linspace(0, 1, 11))
    assert torch.allclose(a ** 2 + sigma ** 2, torch.ones(11, dtype=torch.float64))
    assert torch.all(a.diff() < 0)


def test_forward_marginals_at_t_to_0_and_t_to_1():
    torch.manual_seed(0)
    s = BlurSchedule(blur_sigma_max=20.0)
    x = torch.rand(2, 1, 8, 8) * 2 - 1
    noise = torch.randn_like(x)
    z0 = diffuse(x, torch.zeros(2), noise, s)
    assert (z0 - x).abs().max() < 0.04  # a_0 ~ 1, sigma_0 = sqrt(sigmoid(-10)) ~ 0.0067
    z1 = diffuse(x, torch.ones(2), noise, s)
    assert (z1 - noise).abs().max() < 0.01  # alpha_1 <= 0.0067, sigma_1 ~ 1: pure noise
    # fully blurred at t = 1: the image mean plus d_min of the rest
    mean = x.mean((-2, -1), keepdim=True)
    assert torch.allclose(blurred_mean(x, torch.ones(2), s), mean + s.d_min * (x - mean), atol=1e-5)
    # in between, z_t has mean IDCT(alpha_t DCT x) and per-pixel std sigma_t
    t = torch.full((4000,), 0.4)
    z = diffuse(x[:1].expand(4000, -1, -1, -1), t, torch.randn(4000, 1, 8, 8), s)
    alpha, sigma = s.alphas_sigmas(t[:1], (8, 8))
    assert torch.allclose(z.mean(0), idct2(alpha.float() * dct2(x[:1]))[0], atol=0.06)
    assert abs(z.std(0).mean().item() - sigma.item()) < 0.02


# ---------------------------------------------------------------- blur_sigma_max = 0 is plain DDPM

PLAIN = BlurSchedule(blur_sigma_max=0.0)


def plain_a_sigma(t: torch.Tensor):
    a, s = PLAIN.noise_scaling(t)
    return a.float().reshape(-1, 1, 1, 1), s.float().reshape(-1, 1, 1, 1)


def plain_step(z, eps, t, s, noise):
    """Scalar DDPM/VDM ancestral step, no DCT: mu = (z - sigma_ts^2 / sigma_t eps) / alpha_ts."""
    (a_t, sig_t), (a_s, sig_s) = plain_a_sigma(t), plain_a_sigma(s)
    a_ts = a_t / a_s
    s2_ts = sig_t ** 2 - a_ts ** 2 * sig_s ** 2
    mu = (z - s2_ts / sig_t * eps) / a_ts
    return mu if noise is None else mu + (s2_ts * sig_s ** 2 / sig_t ** 2).sqrt() * noise


def toy_eps(z, t, class_labels=None):
    """A smooth stand-in for a net (eps of data 0, bent a little)."""
    return z / plain_a_sigma(t)[1] * 0.9 + 0.1 * torch.sin(3 * z)


def test_blur_sigma_zero_equals_plain_diffusion():
    torch.manual_seed(1)
    x, noise = torch.rand(3, 1, 8, 8) * 2 - 1, torch.randn(3, 1, 8, 8)
    t, s = torch.tensor([0.9, 0.5, 0.1]), torch.tensor([0.8, 0.4, 0.0])
    a, sig = plain_a_sigma(t)
    assert torch.allclose(diffuse(x, t, noise, PLAIN), a * x + sig * noise, atol=1e-6)
    z = torch.randn(3, 1, 8, 8)
    eps = toy_eps(z, t)
    for n in (None, torch.randn_like(z)):
        assert torch.allclose(reverse_step(z, eps, t, s, PLAIN, n), plain_step(z, eps, t, s, n), atol=1e-5)
    # with DDPM's clip_denoised: the posterior mean at x_hat = clip((z - sigma_t eps) / a_t)
    (a_s, sig_s), a_ts = plain_a_sigma(s), a / plain_a_sigma(s)[0]
    x_hat = ((z - sig * eps) / a).clamp(-1, 1)
    clipped = (a_ts * sig_s ** 2 * z + a_s * (sig ** 2 - a_ts ** 2 * sig_s ** 2) * x_hat) / sig ** 2
    assert torch.allclose(reverse_step(z, eps, t, s, PLAIN, None, clip_denoised=True), clipped, atol=1e-5)
    # the training loss
    loss = BlurringLoss(blur_sigma_max=0.0)(toy_eps, x, t, noise, None)
    assert torch.allclose(loss, ((toy_eps(a * x + sig * noise, t) - noise) ** 2).mean(), atol=1e-6)
    # a whole 20-step sampling run, same noise draws
    ts = get_ts(20)
    gen_a, gen_b = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    ours = sample_blurring(toy_eps, z, ts, PLAIN, noise=lambda v: torch.randn(v.shape, generator=gen_a))
    ref = z
    for i in range(20):
        ti, si = ts[i].float().expand(3), ts[i + 1].float().expand(3)
        ref = plain_step(ref, toy_eps(ref, ti), ti, si, torch.randn(ref.shape, generator=gen_b) if i < 19 else None)
    assert torch.allclose(ours, ref, atol=1e-4), (ours - ref).abs().max()
    # and blurring really differs
    assert not torch.allclose(sample_blurring(toy_eps, z, ts, BlurSchedule(), noise=torch.zeros_like), ours, atol=1e-2)


# ---------------------------------------------------------------- the blurring sampler against an exact denoiser

MIX_SIZE = (16, 16)


def mixture_eps(images: torch.Tensor, weights: torch.Tensor, schedule: BlurSchedule, error: float = 0.0):
    """The exact eps-predictor of data = a two-image mixture: under q(z_t | x), image k has mean
    IDCT(alpha_t DCT x_k) and isotropic std sigma_t, so E[eps | z_t] = (z_t - sum_k p(k | z_t) mean_k) / sigma_t.
    `error` adds white noise of that std to the prediction, standing in for a net's imperfection."""
    def eps(z, t, class_labels=None):
        alpha, sigma = (v.float() for v in schedule.alphas_sigmas(t.double(), MIX_SIZE))
        means = idct2(alpha[:, None] * dct2(images)[None])  # (B, K, C, H, W)
        logp = weights.log()[None] - ((z[:, None] - means) ** 2).flatten(2).sum(-1) / (2 * sigma.reshape(-1, 1) ** 2)
        mean = (logp.softmax(1)[..., None, None, None] * means).sum(1)
        e = (z - mean) / sigma
        return e + error * torch.randn(e.shape, generator=torch.Generator().manual_seed(int(1e4 * t[0]))) if error else e
    return eps


def mixture_draws(schedule: BlurSchedule, n: int, error: float = 0.0, clip: bool = False):
    """(share of image 1, worst RMSE to the nearest image) of n samples, 100 steps."""
    gen = torch.Generator().manual_seed(3)
    images = torch.rand(2, 1, *MIX_SIZE, generator=gen) * 2 - 1
    eps = mixture_eps(images, torch.tensor([0.25, 0.75]), schedule, error)
    z = torch.randn(n, 1, *MIX_SIZE, generator=gen)
    out = sample_blurring(eps, z, get_ts(100), schedule, noise=lambda v: torch.randn(v.shape, generator=gen),
                          clip_denoised=clip)
    rmse = ((out[:, None] - images[None]) ** 2).flatten(2).mean(-1).sqrt()
    return (rmse.argmin(1) == 1).float().mean().item(), rmse.min(1).values.max().item()


@pytest.mark.parametrize("blur", [0.0, 20.0])
def test_sampler_draws_the_data_distribution_under_an_exact_denoiser(blur):
    """Every sample lands on one of the two images (to the last step's std) and in the mixture's 1:3 proportion,
    with and without blur: the reverse step's coefficients and noise are those of q(u_s | u_t, u_x)."""
    share, worst = mixture_draws(BlurSchedule(blur_sigma_max=blur), 1000)
    assert worst < 0.01 and abs(share - 0.75) < 0.06, (share, worst)


def test_clipping_x0_hat_is_sound_without_blur_only():
    """Why `sample --clip-denoised` refuses blurring models: 1 % of eps error, harmless unclipped and under
    plain diffusion, is amplified by 1 / alpha_t in x0_hat and the clamp turns it into a biased sampler."""
    plain, blurred = BlurSchedule(blur_sigma_max=0.0), BlurSchedule(blur_sigma_max=20.0)
    exact_share = mixture_draws(blurred, 1000)[0]
    assert abs(mixture_draws(blurred, 1000, error=0.01)[0] - exact_share) < 0.03
    assert abs(mixture_draws(plain, 1000, error=0.01, clip=True)[0] - mixture_draws(plain, 1000)[0]) < 0.03
    assert abs(mixture_draws(blurred, 1000, error=0.01, clip=True)[0] - exact_share) > 0.1


# ---------------------------------------------------------------- training through the shared loop

def tiny_blurring(digits: Path, steps: int, out: Path, **kw) -> Path:
    cfg = TrainConfig(dataset=f"folder:{digits}", net="tiny", batch=8, lr=2e-3, lr_warmup=1, steps=steps,
                      grid_every=0, log_every=0, process="blurring", blur_sigma_max=20.0, **kw)
    train(cfg, out, device_name="cpu", quiet=True, **({"resume": True} if (out / "model.safetensors").exists() else {}))
    return out


@pytest.fixture(scope="module")
def blur_run(tmp_path_factory, digit_folder) -> Path:
    return tiny_blurring(digit_folder, 6, tmp_path_factory.mktemp("blur") / "run", ckpt_every=0)


def test_checkpoint_records_the_process_and_loads(blur_run):
    tensors, meta = load_checkpoint(blur_run / "model.safetensors")
    record = meta["model"]
    assert record["kind"] == "blurring" and record["blur_sigma_max"] == 20.0 and record["d_min"] == 0.001
    model, meta2 = load_model(blur_run, kinds=("edm", "blurring"))
    assert meta2 == record and type(model).__name__ == "BlurringModel"
    state = load_checkpoint(blur_run / "training-state.safetensors")[1]
    assert state["train"]["config"]["process"] == "blurring" and state["train"]["step"] == 6
    with pytest.raises(DiffcliError, match="no diffcli EDM model"):
        load_model(blur_run)  # commands that need a denoiser keep refusing it


def test_sampling_is_seeded_per_sample_and_cfg_mixes_eps(blur_run):
    from diffcli.drawing import sample_images
    from diffcli.sample import SampleConfig
    model, meta = load_model(blur_run, kinds=("edm", "blurring"))
    dev = torch.device("cpu")
    whole, labels, strip = sample_images(model, meta, SampleConfig(n=3, steps=4, batch_size=3, strip=True), dev)
    ones, _, _ = sample_images(model, meta, SampleConfig(n=3, steps=4, batch_size=1), dev)
    assert torch.allclose(whole, ones, atol=1e-5) and labels == [0, 1, 2]
    assert strip.shape == (3, 5, 1, 8, 8) and torch.equal(strip[:, -1], whole)  # z_t at t = 1, ..., 0
    guided, _, _ = sample_images(model, meta, SampleConfig(n=3, steps=4, cfg=3.0), dev)
    one, _, _ = sample_images(model, meta, SampleConfig(n=3, steps=4, cfg=1.0), dev)
    assert torch.equal(one, whole) and not torch.allclose(guided, whole)


def test_resume_equals_straight_run(tmp_path, digit_folder, blur_run):
    out = tmp_path / "run"
    tiny_blurring(digit_folder, 3, out)
    tiny_blurring(digit_folder, 6, out)
    a, b = load_checkpoint(out / "training-state.safetensors")[0], load_checkpoint(blur_run / "training-state.safetensors")[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------- the CLI, end to end

def test_cli_train_sample_gif_strip_and_show_forward(tmp_path, digit_folder):
    run = tmp_path / "run"
    call_cli("train", "--dataset", f"folder:{digit_folder}", "--process", "blurring", "--blur-sigma-max", "20",
            "--net", "tiny", "--batch", "8", "--steps", "2", "--grid-every", "2", "--log-every", "0", "--quiet",
            "--device", "cpu", "--out", run, check=True)
    assert (run / "grids" / "step-0000002.png").is_file()  # the preview used the blurring sampler
    out = tmp_path / "s"  # sampling in-process through the same Typer app (saves two interpreter starts)
    proc = CliRunner().invoke(app, ["sample", "--checkpoint", str(run), "--n", "3", "--steps", "5", "--strip", "--gif",
                                    "--out", str(out), "--device", "cpu"])
    assert proc.exit_code == 0 and "wrote 3 samples" in proc.stdout, proc.output
    from PIL import Image
    strip = Image.open(out / "strip.png")
    assert strip.size == (2 + 6 * 10, 2 + 3 * 10)  # 3 rows; z_t at t = 1, 0.8, ..., 0
    gif = Image.open(out / "process.gif")
    assert gif.n_frames == 6  # z_t at every step; the final image is held longer
    gif.seek(5)
    assert gif.info["duration"] == 21 * 60
    record = json.loads((out / "run.json").read_text())
    assert record["options"]["sampler"] == "ancestral" and record["options"]["steps"] == 5
    assert record["model"]["kind"] == "blurring" and record["nfe_per_sample"] == 5
    fwd = tmp_path / "fwd"
    proc = CliRunner().invoke(app, ["sample", "--show-forward", str(digit_folder / "class0" / "0.png"),
                                    "--checkpoint", str(run), "--gif", "--out", str(fwd)])
    assert proc.exit_code == 0 and "sigma_B,max 20" in proc.stdout, proc.output
    assert Image.open(fwd / "forward.png").size == (2 + 11 * 10, 2 + 2 * 10)  # blurred | z_t, t = 0, 0.1, ..., 1
    assert Image.open(fwd / "forward.gif").n_frames == 50


# ---------------------------------------------------------------- bad input: one line, exit 2

@pytest.fixture(scope="module")
def edm_ckpt(tmp_path_factory, digit_folder) -> Path:
    out = tmp_path_factory.mktemp("edm") / "run"
    train(TrainConfig(dataset=f"folder:{digit_folder}", net="tiny", batch=8, steps=1, grid_every=0, log_every=0),
          out, device_name="cpu", quiet=True)
    return out


BAD = [
    (["train", "--process", "blurring", "--blur-sigma-max", "-1"], "blur_sigma_max must be a finite number >= 0"),
    (["train", "--process", "blurring", "--blur-sigma-max", "nan"], "blur_sigma_max must be a finite number >= 0"),
    (["train", "--process", "heat"], "unknown --process 'heat'; choose one of edm, blurring"),
    (["train", "--blur-sigma-max", "5"], "--blur-sigma-max is a --process blurring option"),
    (["sample", "--checkpoint", "{blur}", "--sampler", "heun"], "a blurring model samples with ancestral"),
    (["sample", "--checkpoint", "{blur}", "--sampler", "ddim"], "a blurring model samples with ancestral"),
    (["sample", "--checkpoint", "{blur}", "--sigma-max", "10"], "--sigma-min/--sigma-max/--schedule set an EDM schedule"),
    (["sample", "--checkpoint", "{edm}", "--sampler", "ancestral"], "an EDM model samples with euler, heun"),
    (["sample", "--checkpoint", "{blur}", "--sampler", "dpm"], "unknown sampler 'dpm'"),
    (["sample", "--checkpoint", "{edm}", "--clip-denoised"], "--clip-denoised is a blurring-model option"),
    (["sample", "--checkpoint", "{blur}", "--clip-denoised"], "--clip-denoised works only for blur_sigma_max 0"),
    (["sample", "--checkpoint", "{blur}", "--blur-sigma-max", "3"], "--blur-sigma-max goes with --show-forward"),
    (["sample", "--show-forward", "{tmp}/none.png"], "cannot read image"),
    (["sample", "--show-forward", "{digit}", "--blur-sigma-max", "-2"], "blur_sigma_max must be a finite"),
    (["sample", "--show-forward", "{digit}", "--checkpoint", "{edm}"], "is no blurring model"),
    (["pg", "--checkpoint", "{blur}"], "no diffcli EDM model"),
]


@pytest.mark.parametrize("args,message", BAD, ids=[" ".join(a[:3]) + f" {i}" for i, (a, _) in enumerate(BAD)])
def test_bad_input(tmp_path, digit_folder, blur_run, edm_ckpt, args, message):
    fill = {"blur": blur_run, "edm": edm_ckpt, "tmp": tmp_path, "digit": digit_folder / "class0" / "0.png"}
    args = [a.format(**fill) for a in args]
    if args[0] == "train":
        args += ["--dataset", f"folder:{digit_folder}", "--net", "tiny", "--steps", "1", "--device", "cpu"]
    out = tmp_path / "out"
    result = CliRunner().invoke(app, [*args, "--out", str(out)])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert not out.exists()


def test_clip_denoised_is_accepted_without_blur():
    from diffcli.drawing import resolve
    from diffcli.sample import SampleConfig
    plain = {"kind": "blurring", "blur_sigma_max": 0.0}
    assert resolve(SampleConfig(clip_denoised=True), plain).clip_denoised
    with pytest.raises(DiffcliError, match="works only for blur_sigma_max 0"):
        resolve(SampleConfig(clip_denoised=True), {**plain, "blur_sigma_max": 0.5})
