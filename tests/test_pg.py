"""diffcli pg: the sign of the repulsion on a toy mixture with an exact denoiser, exactness at lambda = 0,
kernel gradients against autograd and finite differences, the CLI on a tiny digit model and a tiny SD pipeline."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import run_cli
from diffcli.guidance import particle_guidance
from diffcli.particles import feature_grad, median_bandwidth, pairwise_sq_dists, rbf_energy, rbf_grad
from diffcli.samplers import SAMPLERS, get_sigmas_karras, run_sampler

# ---------------------------------------------------------------- toy: 4 Gaussians in 2-D, exact denoiser

MODES = torch.tensor([[-2.0, -2.0], [2.0, 2.0], [-2.0, 2.0], [2.0, -2.0]], dtype=torch.float64)
MODE_STD = 0.3


def mixture_denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """E[x0 | x] for an equal mixture of N(mu_k, s^2 I) seen through x = x0 + sigma n (Tweedie, exact)."""
    var = MODE_STD ** 2 + sigma.reshape(-1, 1, 1).double() ** 2
    diff = x.double()[:, None] - MODES[None]
    resp = (-(diff ** 2).sum(-1, keepdim=True) / (2 * var)).softmax(1)
    post_mean = MODES[None] + MODE_STD ** 2 / var * diff
    return (resp * post_mean).sum(1).to(x.dtype)


def toy_batches(sampler: str, factor: float, seeds: range, n: int = 8, denoiser=None) -> list[torch.Tensor]:
    from diffcli.common import PerSampleRandn
    sigmas = get_sigmas_karras(12, 0.01, 20.0)
    denoiser = denoiser or particle_guidance(mixture_denoiser, factor, rbf_grad)
    outs = []
    for s in seeds:
        rng = PerSampleRandn([100 * s + i for i in range(n)])
        x = rng.randn((2,)) * sigmas[0]
        outs.append(run_sampler(sampler, denoiser, x, sigmas, noise=rng, s_churn=10.0, eta=1.0))
    return outs


@pytest.mark.parametrize("sampler", ["heun", "euler", "stochastic_heun", "ddim"])
def test_higher_factor_spreads_particles(sampler):
    """The sign check the 001 thesis code fails: more lambda, larger mean pairwise distance.

    (With heavy churn the spread saturates past lambda ~ 1.5 on this toy: fresh noise undoes part of it.)
    """
    spread = [torch.stack([torch.pdist(b).mean() for b in toy_batches(sampler, f, range(8))]).mean()
              for f in (0.0, 0.5, 1.5)]
    assert spread[0] < spread[1] < spread[2], spread


def test_pg_finds_more_modes_on_the_mixture():
    def modes(batches):
        return sum(len(set(torch.cdist(b.double(), MODES).argmin(1).tolist())) for b in batches) / len(batches)
    assert modes(toy_batches("heun", 1.0, range(10))) > modes(toy_batches("heun", 0.0, range(10)))


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_factor_zero_is_plain_sampling(sampler):
    assert particle_guidance(mixture_denoiser, 0.0, rbf_grad) is mixture_denoiser
    plain = toy_batches(sampler, 0.0, range(2), denoiser=mixture_denoiser)
    zero = toy_batches(sampler, 0.0, range(2))
    # PG scheduled above every sigma the sampler visits: also exactly plain
    off = toy_batches(sampler, 0.0, range(2), denoiser=particle_guidance(mixture_denoiser, 5.0, rbf_grad, sigma_min=1e3))
    for p, z, o in zip(plain, zero, off):
        assert torch.equal(p, z) and torch.equal(p, o)


def test_schedule_limits_where_pg_acts():
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    shrink = lambda z, sigma: z * 0.5
    guided = particle_guidance(shrink, 2.0, rbf_grad, sigma_min=1.0, sigma_max=5.0)
    assert torch.equal(guided(x, torch.full((5,), 0.5)), x * 0.5)
    assert torch.equal(guided(x, torch.full((5,), 6.0)), x * 0.5)
    inside = guided(x, torch.full((5,), 2.0))
    assert torch.allclose(inside, x * 0.5 - 2.0 * 4.0 * rbf_grad(x))


# ---------------------------------------------------------------- kernel gradients

def test_rbf_grad_matches_autograd_and_finite_differences():
    z = torch.randn(6, 2, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    zr = z.clone().requires_grad_(True)
    (auto,) = torch.autograd.grad(rbf_energy(zr), zr)
    assert torch.allclose(rbf_grad(z), auto, atol=1e-10)
    # central differences of particle 2's own kernel sum, bandwidth frozen as in the method
    h = median_bandwidth(pairwise_sq_dists(z.flatten(1)))
    own = lambda zz: torch.exp(-((zz[2] - zz) ** 2).flatten(1).sum(1) / h).sum()
    eps, fd = 1e-6, torch.zeros_like(z[2])
    for idx in range(z[2].numel()):
        dz = torch.zeros_like(z)
        dz[2].view(-1)[idx] = eps
        fd.view(-1)[idx] = (own(z + dz) - own(z - dz)) / (2 * eps)
    assert torch.allclose(rbf_grad(z)[2], fd, atol=1e-7)


def test_rbf_grad_points_towards_neighbours():
    z = torch.tensor([[0.0], [1.0], [3.0]], dtype=torch.float64)
    g = rbf_grad(z)
    assert g[0] > 0 and g[2] < 0  # the outer particles are pulled inwards by +grad; PG goes the other way


def test_feature_grad_matches_autograd():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 5), torch.nn.Tanh()).double()
    z = torch.randn(5, 3, 2, 2, dtype=torch.float64)
    zr = z.clone().requires_grad_(True)
    (auto,) = torch.autograd.grad(rbf_energy(net(zr)), zr)
    with torch.no_grad():  # as inside a sampler
        ours = feature_grad(net)(z)
    assert torch.allclose(ours, auto, atol=1e-10)


def test_classifier_kernel_runs_on_small_digits():
    from diffcli.classifier import DigitNet
    from diffcli.particles import classifier_features
    torch.manual_seed(0)
    clf = DigitNet(width=4).eval().requires_grad_(False)
    g = feature_grad(classifier_features(clf))(torch.randn(4, 1, 8, 8))
    assert g.shape == (4, 1, 8, 8) and torch.isfinite(g).all() and g.abs().sum() > 0


# ---------------------------------------------------------------- CLI on the tiny digit model

def test_cli_compare_on_tiny_model(tiny_run, tmp_path):
    out = tmp_path / "pg"
    proc = run_cli("pg", "--checkpoint", tiny_run, "--n", "4", "--labels", "all", "--steps", "3", "--pg-factor", "2",
                   "--compare", "--out", out, "--device", "cpu", check=True)
    assert "modes discovered" in proc.stdout and "class accuracy" in proc.stdout
    rec = json.loads((out / "run.json").read_text())
    assert rec["command"] == "pg" and rec["options"]["pg_factor"] == 2.0
    assert [s["label"] for s in rec["samples"]] == [0, 1, 2, 0] and [s["seed"] for s in rec["samples"]] == [0, 1, 2, 3]
    assert all((out / s["file"]).is_file() for s in rec["samples"])
    assert (out / "grid.png").is_file() and (out / "compare.png").is_file() and (out / "plain" / "run.json").is_file()
    cmp = json.loads((out / "compare.json").read_text())
    for part in ("plain", "pg"):
        assert {"modes_discovered", "mean_similarity", "accuracy"} <= set(cmp[part])
    assert json.loads((out / "plain" / "run.json").read_text())["options"]["pg_factor"] == 0.0
    run_cli("eval", "--digits", out, "--device", "cpu", check=True)  # the folder is an ordinary sample folder


def test_cli_reproducible_by_seed(tiny_run, tmp_path):
    def draw(name, seed):
        out = tmp_path / name
        run_cli("pg", "--checkpoint", tiny_run, "--n", "3", "--steps", "3", "--sampler", "stochastic_heun",
                "--seed", seed, "--out", out, "--device", "cpu", check=True)
        return [(out / f"{i:05d}-seed{int(seed) + i}.png").read_bytes() for i in range(3)]
    assert draw("a", "5") == draw("b", "5")
    from diffcli.models import load_model
    from diffcli.pg import PGConfig, make_kernel, sample_digits
    model, meta = load_model(tiny_run)
    five, six = (sample_digits(model, meta, PGConfig(n=3, steps=3, seed=s), 1.7, make_kernel("rbf"), torch.device("cpu"))
                 for s in (5, 6))
    assert not torch.equal(five, six)


@pytest.mark.parametrize("args,message", [
    (("--n", "1"), "PG needs a batch"),
    (("--pg-factor", "-0.5"), "--pg-factor"),
    (("--kernel", "cosine"), "unknown --kernel"),
])
def test_bad_inputs_one_line_and_nothing_written(tiny_run, tmp_path, args, message):
    out = tmp_path / "never"
    proc = run_cli("pg", "--checkpoint", tiny_run, *args, "--out", out, "--device", "cpu")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
    assert not out.exists()


# ---------------------------------------------------------------- a tiny Stable Diffusion pipeline

def test_cli_pipeline_compare(tiny_sd, tmp_path):
    out = tmp_path / "dogs"
    proc = run_cli("pg", "a photo of a dog", "--model", tiny_sd, "--n", "3", "--steps", "4", "--sampler", "euler",
                   "--pg-factor", "3", "--cfg", "3", "--compare", "--out", out, "--device", "cpu", check=True)
    assert "mean in-batch similarity" in proc.stdout
    from PIL import Image
    assert Image.open(out / "00000-seed0.png").size == (16, 16)
    cmp = json.loads((out / "compare.json").read_text())
    assert cmp["pg"]["mean_pairwise_distance"] > cmp["plain"]["mean_pairwise_distance"]
    rec = json.loads((out / "run.json").read_text())
    assert rec["model"]["kind"] == "StableDiffusionPipeline" and len(rec["samples"]) == 3
    assert (out / "plain" / "00002-seed2.png").read_bytes() != (out / "00002-seed2.png").read_bytes()


def test_cli_sdxl_pipeline(tiny_sdxl, tmp_path):
    out = tmp_path / "xl"
    run_cli("pg", "a cat", "--model", tiny_sdxl, "--n", "2", "--steps", "2", "--sampler", "euler", "--width", "32",
            "--out", out, "--device", "cpu", check=True)
    from PIL import Image
    assert Image.open(out / "00001-seed1.png").size == (32, 16)


def test_cli_pipeline_missing_model(tmp_path):
    out = tmp_path / "x"
    proc = run_cli("pg", "a dog", "--model", tmp_path / "no-such-pipeline", "--out", out, "--device", "cpu")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and len(lines) == 1 and "local folder" in lines[0] and not out.exists()
