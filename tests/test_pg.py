"""diffcli pg: the sign of the repulsion on a toy mixture with an exact denoiser, exactness at lambda = 0,
kernel gradients against autograd and finite differences, the CLI on a tiny digit model and a tiny SD pipeline."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import call_cli, run_cli, run_torchrun, write_log_env
from diffcli.core.guidance import particle_guidance
from diffcli.core.particles import feature_grad, median_bandwidth, pairwise_sq_dists, rbf_energy, rbf_grad
from diffcli.core.samplers import CFG_PP, SAMPLERS, get_sigmas_karras, run_sampler

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
    from diffcli.shared.devices import PerSampleRandn
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


@pytest.mark.parametrize("sampler", [s for s in SAMPLERS if s not in CFG_PP])  # CFG++ refuses PG
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
    from diffcli.backends.classifier import DigitNet
    from diffcli.core.particles import classifier_features
    torch.manual_seed(0)
    clf = DigitNet(width=4).eval().requires_grad_(False)
    g = feature_grad(classifier_features(clf))(torch.randn(4, 1, 8, 8))
    assert g.shape == (4, 1, 8, 8) and torch.isfinite(g).all() and g.abs().sum() > 0


def test_exact_grad_is_the_vector_jacobian_product_and_skip_is_c_skip():
    """A linear denoiser D(x) = x A^T has Jacobian A: the exact path must return D - f sigma^2 A^T g(D), the skip
    path D - f sigma^2 c_skip g(D), both under the samplers' no_grad."""
    torch.manual_seed(0)
    a = torch.randn(6, 6, dtype=torch.float64)
    denoiser = lambda x, sigma: (x.flatten(1) @ a.T).view_as(x)
    x, sigma, factor = torch.randn(4, 1, 2, 3, dtype=torch.float64), torch.tensor([3.0], dtype=torch.float64), 2.0
    d = denoiser(x, sigma)
    g = rbf_grad(d)
    with torch.no_grad():
        exact = particle_guidance(denoiser, factor, rbf_grad, on_denoised=True, exact=True)(x, sigma)
        skip = particle_guidance(denoiser, factor, rbf_grad, on_denoised=True, sigma_data=0.5)(x, sigma)
    assert torch.allclose(exact, d - factor * 9.0 * (g.flatten(1) @ a).view_as(x), atol=1e-12)
    assert torch.allclose(skip, d - factor * 9.0 * g * 0.25 / (9.0 + 0.25), atol=1e-12)
    assert not exact.requires_grad


@pytest.mark.parametrize("bandwidth", [0.25, 1.0, 3.0])
def test_bandwidth_scales_the_median_heuristic(bandwidth):
    torch.manual_seed(1)
    z = torch.randn(5, 7, dtype=torch.float64)
    zr = z.clone().requires_grad_(True)
    (auto,) = torch.autograd.grad(rbf_energy(zr, bandwidth), zr)
    assert torch.allclose(rbf_grad(z, bandwidth), auto, atol=1e-10)
    d2 = pairwise_sq_dists(z)
    assert torch.allclose(median_bandwidth(d2, bandwidth), bandwidth * median_bandwidth(d2))
    from diffcli.core.particles import make_kernel
    grad, reads_x0 = make_kernel("x0", bandwidth=bandwidth)
    assert reads_x0 and torch.allclose(grad(z), rbf_grad(z, bandwidth))


def test_clip_kernel_gradient_matches_finite_differences(tiny_sd, tmp_path):
    """The pipelines' semantic kernel: RBF on CLIP image features of the VAE-decoded x0_hat (float64, tiny SD and
    tiny CLIP): its gradient is that of the kernel sum (bandwidth held fixed) by central differences."""
    pytest.importorskip("open_clip")
    from pipes import build_tiny_clip
    from diffcli.backends import pipelines
    from diffcli.backends.clip_model import image_features_fn, load_clip
    config, weights, _ = build_tiny_clip(tmp_path, "tinyclip-pgtest", seed=2)
    clip = load_clip(str(config), str(weights), torch.device("cpu"))
    clip.model.double()
    pipe = pipelines.load_pipeline(str(tiny_sd), torch.device("cpu"), torch.float64)
    features = pipelines.decoded_features(pipe, image_features_fn(clip))
    from diffcli.core.particles import make_kernel
    grad_fn, reads_x0 = make_kernel("clip", features)
    torch.manual_seed(3)
    z = torch.randn(3, 4, 2, 2, dtype=torch.float64)
    with torch.no_grad():
        grad = grad_fn(z)
        f0 = features(z).flatten(1)
        h = median_bandwidth(pairwise_sq_dists(f0))
        energy = lambda zz: 0.5 * torch.exp(-pairwise_sq_dists(features(zz).flatten(1)) / h).sum()
        for k in range(3):
            v = torch.randn_like(z)
            eps = 1e-5
            fd = (energy(z + eps * v) - energy(z - eps * v)) / (2 * eps)
            assert torch.allclose((grad * v).sum(), fd, rtol=1e-5, atol=1e-9), (k, float((grad * v).sum()), float(fd))
    assert reads_x0 and grad.abs().sum() > 0 and f0.shape == (3, 16)


# ---------------------------------------------------------------- CLI on the tiny digit model

@pytest.mark.parametrize("kernel", ["x0", "classifier"])
def test_kernels_on_x0_hat_exact_and_skip_differ_and_sample_respects_the_kernel(tiny_run, tmp_path, kernel, capsys):
    from conftest import invoke_cli
    from diffcli.backends.classifier import DigitNet
    from diffcli.shared.checkpoints import save_checkpoint
    clf = tmp_path / "clf.safetensors"
    torch.manual_seed(0)
    save_checkpoint(clf, DigitNet(width=4).state_dict(), {"classifier": {"width": 4, "num_classes": 10}})
    files = {}
    for name, extra in {"plain": ["--pg-factor", "0"], "exact": ["--pg-grad", "exact"], "skip": ["--pg-grad", "skip"],
                        "rbf": ["--kernel", "rbf"]}.items():
        args = ["--kernel", kernel, "--pg-factor", "20", *extra] if name != "rbf" else ["--pg-factor", "20", *extra]
        out = tmp_path / f"{kernel}-{name}"
        code, _, err = invoke_cli(["pg", "--checkpoint", tiny_run, "--n", "3", "--steps", "3", "--classifier", clf,
                                   *args, "--out", out, "--device", "cpu"], capsys)
        assert code == 0, err
        files[name] = [(out / f"{i:05d}-seed{i}.png").read_bytes() for i in range(3)]
        assert json.loads((out / "run.json").read_text())["options"]["kernel"] == (kernel if name != "rbf" else "rbf")
    assert len({tuple(v) for v in files.values()}) == 4  # each setting changes the samples
    if kernel == "x0":  # diffcli sample takes the same kernel options (it ignored --kernel before)
        out = tmp_path / "sample-x0"
        code, _, err = invoke_cli(["sample", "--checkpoint", tiny_run, "--n", "3", "--batch-size", "3", "--labels",
                                   "0", "--steps", "3", "--kernel", "x0", "--pg-factor", "20", "--out", out,
                                   "--device", "cpu"], capsys)
        assert code == 0, err
        rbf = tmp_path / "sample-rbf"
        invoke_cli(["sample", "--checkpoint", tiny_run, "--n", "3", "--batch-size", "3", "--labels", "0", "--steps",
                    "3", "--pg-factor", "20", "--out", rbf, "--device", "cpu"], capsys)
        assert (out / "00000-seed0-label0.png").read_bytes() != (rbf / "00000-seed0-label0.png").read_bytes()

def test_cli_compare_on_tiny_model(tiny_run, tmp_path):
    out = tmp_path / "pg"
    proc = call_cli("pg", "--checkpoint", tiny_run, "--n", "4", "--labels", "all", "--steps", "3", "--pg-factor", "2",
                   "--compare", "--out", out, "--device", "cpu", check=True)
    assert "modes discovered" in proc.stdout and "class accuracy" in proc.stdout
    rec = json.loads((out / "run.json").read_text())
    assert rec["command"] == "pg" and rec["options"]["pg_factor"] == 2.0
    assert [s["label"] for s in rec["samples"]] == [0, 1, 2, 0] and [s["seed"] for s in rec["samples"]] == [0, 1, 2, 3]
    assert all((out / s["file"]).is_file() for s in rec["samples"])
    assert (out / "grid.png").is_file() and (out / "compare.png").is_file() and (out / "plain" / "run.json").is_file()
    from PIL import Image
    assert Image.open(out / "embedding.png").size[0] > 400  # plain | PG panels of the classifier features
    cmp = json.loads((out / "compare.json").read_text())
    for part in ("plain", "pg"):
        assert {"modes_discovered", "mean_similarity", "accuracy"} <= set(cmp[part])
    assert json.loads((out / "plain" / "run.json").read_text())["options"]["pg_factor"] == 0.0
    call_cli("eval", "--digits", out, "--device", "cpu", check=True)  # the folder is an ordinary sample folder


def test_cli_reproducible_by_seed(tiny_run, tmp_path):
    def draw(name, seed):
        out = tmp_path / name
        call_cli("pg", "--checkpoint", tiny_run, "--n", "3", "--steps", "3", "--sampler", "stochastic_heun",
                "--seed", seed, "--out", out, "--device", "cpu", check=True)
        return [(out / f"{i:05d}-seed{int(seed) + i}.png").read_bytes() for i in range(3)]
    assert draw("a", "5") == draw("b", "5")
    from diffcli.backends.models import load_model
    from diffcli.core.particles import make_kernel
    from diffcli.pg import PGConfig, sample_digits
    model, meta = load_model(tiny_run)
    five, six = (sample_digits(model, meta, PGConfig(n=3, steps=3, seed=s), 1.7, make_kernel("rbf"), torch.device("cpu"))
                 for s in (5, 6))
    assert not torch.equal(five, six)


@pytest.mark.parametrize("args,message", [
    (("--n", "1"), "PG needs a batch"),
    (("--pg-factor", "-0.5"), "--pg-factor"),
    (("--kernel", "cosine"), "unknown --kernel"),
    (("--kernel", "clip"), "--kernel clip is for pipelines"),
    (("--pg-grad", "adjoint"), "unknown --pg-grad"),
    (("--pg-bandwidth", "0"), "--pg-bandwidth must be"),
    (("--pg-bandwidth", "nan"), "--pg-bandwidth must be"),
    (("--kernel", "posterior", "--labels", "all"), "drop --labels"),
    (("--kernel", "posterior", "--blur", "gaussian_1_1"), "takes no SEG"),
])
def test_bad_inputs_one_line_and_nothing_written(tiny_run, tmp_path, args, message):
    out = tmp_path / "never"
    proc = call_cli("pg", "--checkpoint", tiny_run, *args, "--out", out, "--device", "cpu")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
    assert not out.exists()


# ---------------------------------------------------------------- a tiny Stable Diffusion pipeline

def test_cli_pipeline_compare(tiny_sd, tmp_path):
    out = tmp_path / "dogs"
    proc = call_cli("pg", "a photo of a dog", "--model", tiny_sd, "--n", "3", "--steps", "4", "--sampler", "euler",
                   "--pg-factor", "3", "--cfg", "3", "--compare", "--out", out, "--device", "cpu", check=True)
    assert "mean in-batch similarity" in proc.stdout
    from PIL import Image
    assert Image.open(out / "00000-seed0.png").size == (16, 16)
    cmp = json.loads((out / "compare.json").read_text())
    assert cmp["pg"]["mean_pairwise_distance"] > cmp["plain"]["mean_pairwise_distance"]
    assert (out / "embedding.png").is_file()
    rec = json.loads((out / "run.json").read_text())
    assert rec["model"]["kind"] == "StableDiffusionPipeline" and len(rec["samples"]) == 3
    assert (out / "plain" / "00002-seed2.png").read_bytes() != (out / "00002-seed2.png").read_bytes()


def test_cli_sdxl_pipeline(tiny_sdxl, tmp_path):
    out = tmp_path / "xl"
    call_cli("pg", "a cat", "--model", tiny_sdxl, "--n", "2", "--steps", "2", "--sampler", "euler", "--width", "32",
            "--out", out, "--device", "cpu", check=True)
    from PIL import Image
    assert Image.open(out / "00001-seed1.png").size == (32, 16)


def test_cli_pipeline_clip_kernel(tiny_sd, tmp_path, capsys):
    pytest.importorskip("open_clip")
    from conftest import invoke_cli
    from pipes import build_tiny_clip
    config, weights, _ = build_tiny_clip(tmp_path, "tinyclip-pgcli", seed=4)
    out = tmp_path / "clip"
    code, stdout, err = invoke_cli(["pg", "a dog", "--model", tiny_sd, "--n", "2", "--steps", "3", "--sampler", "euler",
                                    "--kernel", "clip", "--clip-model", config, "--clip-pretrained", weights,
                                    "--pg-factor", "50", "--compare", "--out", out, "--device", "cpu"], capsys)
    assert code == 0, err
    assert (out / "plain" / "00001-seed1.png").read_bytes() != (out / "00001-seed1.png").read_bytes()
    for args, message in [(["--kernel", "classifier"], "--kernel classifier is for digit models"),
                          (["--kernel", "clip", "--clip-model", "no-such-clip"], "unknown CLIP model")]:
        bad = tmp_path / "never"
        code, _, err = invoke_cli(["pg", "a dog", "--model", tiny_sd, "--n", "2", "--steps", "2", "--pg-factor", "1",
                                   *args, "--out", bad, "--device", "cpu"], capsys)
        assert code != 0 and len(err.strip().splitlines()) == 1 and message in err and not bad.exists(), err
    bad = tmp_path / "never-seg"
    code, _, err = invoke_cli(["seg", "a dog", "--model", tiny_sd, "--n", "2", "--steps", "2", "--pg-factor", "1",
                               "--kernel", "clip", "--out", bad, "--device", "cpu"], capsys)
    assert code != 0 and "--kernel clip" in err and not bad.exists(), err


def test_cli_pipeline_missing_model(tmp_path):
    out = tmp_path / "x"
    proc = call_cli("pg", "a dog", "--model", tmp_path / "no-such-pipeline", "--out", out, "--device", "cpu")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and len(lines) == 1 and "local folder" in lines[0] and not out.exists()


def test_pca_2d_keeps_the_two_largest_directions():
    from diffcli.core.metrics import pca_2d
    torch.manual_seed(5)
    basis = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))[0]
    coords = torch.randn(40, 6, dtype=torch.float64) * torch.tensor([5.0, 2.0, 0.1, 0.1, 0.1, 0.1], dtype=torch.float64)
    points = coords @ basis.T + 3.0
    proj = pca_2d(points)
    assert proj.shape == (40, 2) and torch.allclose(proj.mean(0), torch.zeros(2, dtype=torch.float64), atol=1e-10)
    centred = coords - coords.mean(0)
    assert torch.allclose(proj.var(0), centred[:, :2].var(0), rtol=0.05)  # the 5 and 2 axes, in that order
    assert torch.allclose(pca_2d(points), proj)  # deterministic signs


def test_resume_after_an_interrupted_compare_gives_the_uninterrupted_outputs(tiny_run, tmp_path, capsys, monkeypatch):
    """--compare draws two particle sets (plain, PG); killed after the first, --resume keeps it and draws the
    second, and every file equals an uninterrupted run's."""
    from conftest import invoke_cli
    import diffcli.pg as pg_module
    args = ["pg", "--checkpoint", tiny_run, "--n", "3", "--steps", "3", "--labels", "all", "--pg-factor", "3",
            "--compare", "--device", "cpu"]
    whole = tmp_path / "whole"
    assert invoke_cli([*args, "--out", whole], capsys)[0] == 0
    real, calls = pg_module.sample_digits, []

    def dies_on_the_second_set(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **kw)
    monkeypatch.setattr(pg_module, "sample_digits", dies_on_the_second_set)
    cut = tmp_path / "cut"
    assert invoke_cli([*args, "--out", cut], capsys)[0] != 0
    assert (cut / "plain" / pg_module.SETS / "00000.safetensors").is_file() and not (cut / "00000-seed0-label0.png").exists()
    code, _, err = invoke_cli([*args, "--pg-factor", "4", "--out", cut, "--resume"], capsys)
    assert code != 0 and "options differ" in err  # other options: refused, nothing redrawn
    monkeypatch.setattr(pg_module, "sample_digits", real)
    calls.clear()
    code, _, err = invoke_cli([*args, "--out", cut, "--resume"], capsys)
    assert code == 0, err
    skip = {"run.json", "embedding.png"}  # run.json: times and argv; embedding.png: matplotlib's metadata
    names = sorted(p.relative_to(whole).as_posix() for p in whole.rglob("*") if p.is_file())
    assert names == sorted(p.relative_to(cut).as_posix() for p in cut.rglob("*") if p.is_file())
    for name in names:
        if Path(name).name not in skip:
            assert (whole / name).read_bytes() == (cut / name).read_bytes(), name
    assert json.loads((cut / "compare.json").read_text()) == json.loads((whole / "compare.json").read_text())


def test_two_ranks_write_the_same_files_as_one_each_once(tiny_run, tmp_path):
    """torchrun: each rank draws every other particle set (here plain and PG: one each), rank 0 writes the outputs;
    the files are one process's, byte for byte, and each is written as often as one process writes it (once;
    run.json twice: running, then complete)."""
    from collections import Counter
    args = ("pg", "--checkpoint", str(tiny_run), "--n", "2", "--steps", "2", "--labels", "all", "--pg-factor", "3",
            "--compare", "--device", "cpu")
    one, two = tmp_path / "one", tmp_path / "two"
    env_one, log_one = write_log_env(tmp_path / "log-one")
    env_two, log_two = write_log_env(tmp_path / "log-two")
    run_cli(*args, "--out", one, check=True, env=env_one)
    run_torchrun(*args, "--out", two, port=29581, env=env_two)
    names = sorted(p.relative_to(one).as_posix() for p in one.rglob("*") if p.is_file())
    assert names == sorted(p.relative_to(two).as_posix() for p in two.rglob("*") if p.is_file())
    assert "plain/00001-seed1-label1.png" in names and not any(".pg-sets" in n for n in names)
    for name in names:
        if Path(name).name not in ("run.json", "embedding.png"):  # times and argv; matplotlib's metadata
            assert (one / name).read_bytes() == (two / name).read_bytes(), name
    writes = [Counter(Path(line).relative_to(folder).as_posix() for line in log.read_text().splitlines())
              for folder, log in ((one, log_one), (two, log_two))]
    assert writes[0] == writes[1]
    assert {n for n, k in writes[1].items() if k != 1} == {"run.json"} and writes[1]["run.json"] == 2
    assert writes[1]["plain/.pg-sets/00000.safetensors"] == writes[1][".pg-sets/00000.safetensors"] == 1


# ---------------------------------------------------------------- the class-posterior kernel (--kernel posterior)

TETRAHEDRON = torch.tensor([[1.0, 1.0, 1.0], [1.0, -1.0, -1.0], [-1.0, 1.0, -1.0], [-1.0, -1.0, 1.0]],
                           dtype=torch.float64) * 2  # 4 affinely independent modes: the posterior mix is unique


def class_model(x: torch.Tensor, sigma: torch.Tensor, class_labels: torch.Tensor | None = None,
                modes: torch.Tensor = MODES) -> torch.Tensor:
    """The toy mixture as a class-conditional model: label k < 4 is E[x0 | x, mode k], label 4 (null) E[x0 | x]."""
    s = sigma.reshape(-1, 1).double().expand(len(x), 1)
    var = MODE_STD ** 2 + s ** 2
    labels = class_labels if class_labels is not None else torch.full((len(x),), 4)
    post = lambda mu: mu + MODE_STD ** 2 / var * (x.double() - mu)  # noqa: E731
    null = (mixture_posterior(x, s, modes)[..., None] * post(modes[:, None]).transpose(0, 1)).sum(1)
    return torch.where((labels == 4)[:, None], null, post(modes[labels.clamp(max=3)])).to(x.dtype)


def mixture_posterior(x: torch.Tensor, sigma, modes: torch.Tensor = MODES) -> torch.Tensor:
    var = MODE_STD ** 2 + torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1) ** 2
    return (-((x.double()[:, None] - modes[None]) ** 2).sum(-1) / (2 * var)).softmax(1)


def test_project_simplex_is_the_euclidean_projection():
    from diffcli.core.particles import project_simplex
    w = torch.tensor([[0.5, 0.2, 0.1], [2.0, 0.0, -1.0], [-1.0, -1.0, -1.0]], dtype=torch.float64)
    p = project_simplex(w)
    torch.testing.assert_close(p, torch.tensor([[0.5 + 0.2 / 3, 0.2 + 0.2 / 3, 0.1 + 0.2 / 3], [1.0, 0.0, 0.0], [1 / 3, 1 / 3, 1 / 3]],
                                               dtype=torch.float64))
    # no other point of the simplex is nearer (random candidates)
    cand = torch.distributions.Dirichlet(torch.ones(3)).sample((2000,)).double()
    for row, proj in zip(w, p):
        assert (row - proj).norm() <= (row - cand).norm(dim=1).min() + 1e-12


@pytest.mark.parametrize("sigma", [0.5, 2.0, 8.0])
def test_class_posterior_is_read_from_the_denoisers(sigma):
    """Exact denoisers: the null output is the posterior mix of the class outputs, and class_posterior finds it."""
    from diffcli.core.particles import class_posterior
    x = torch.randn(16, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * (2 + sigma)
    s = torch.full((16,), sigma, dtype=torch.float64)
    d_classes = torch.stack([class_model(x, s, torch.full((16,), c), TETRAHEDRON) for c in range(4)], 1)
    p = class_posterior(d_classes, class_model(x, s, None, TETRAHEDRON), iters=2000)
    torch.testing.assert_close(p, mixture_posterior(x, sigma, TETRAHEDRON), atol=1e-4, rtol=0)


def test_posterior_push_is_sigma_squared_times_the_kernel_gradient():
    """sum_c p_i q_i (D_c - D_bar) = sigma^2 grad_{x_i} sum_{j != i} <p(x_i), p(x_j)>, against autograd."""
    from diffcli.core.particles import posterior_push
    sigma = 1.5
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 2
    s = torch.full((5,), sigma, dtype=torch.float64)
    d_classes = torch.stack([class_model(x, s, torch.full((5,), c)) for c in range(4)], 1)
    push = posterior_push(mixture_posterior(x, sigma), d_classes)
    grads = []
    for i in range(5):
        xi = x[i:i + 1].clone().requires_grad_(True)
        others = mixture_posterior(torch.cat([x[:i], x[i + 1:]]), sigma)
        (g,) = torch.autograd.grad((mixture_posterior(xi, sigma) * others).sum(), xi)
        grads.append(g[0])
    torch.testing.assert_close(push, sigma ** 2 * torch.stack(grads))


def test_class_pg_finds_more_modes_and_factor_zero_is_the_null_pass():
    from diffcli.core.guidance import class_particle_guidance

    def modes(factor, seeds=range(12)):
        den = class_particle_guidance(class_model, factor, 4, {}, 0.05, 20.0)
        found = [len(set(torch.cdist(b.double(), MODES).argmin(1).tolist()))
                 for b in toy_batches("heun", 0.0, seeds, n=4, denoiser=den)]
        return sum(found) / len(found)

    plain = toy_batches("heun", 0.0, range(3), n=4)
    assert all(torch.equal(a, b) for a, b in zip(plain, toy_batches("heun", 0.0, range(3), n=4,
                                                                     denoiser=class_particle_guidance(class_model, 0.0, 4, {}))))
    plain_modes, pg_modes = modes(0.0), modes(3.0)  # each drawn once
    assert plain_modes < 3.5 and pg_modes > plain_modes + 0.4, (plain_modes, pg_modes)


def test_cli_posterior_kernel_on_the_tiny_model(tiny_run, tiny_uncond_run, tmp_path, capsys):
    from conftest import invoke_cli
    files = {}
    for name, extra in {"plain": ["--pg-factor", "0"], "posterior": ["--kernel", "posterior", "--pg-factor", "5"]}.items():
        out = tmp_path / name
        code, _, err = invoke_cli(["pg", "--checkpoint", tiny_run, "--n", "3", "--steps", "3", *extra, "--out", out,
                                   "--device", "cpu"], capsys)
        assert code == 0, err
        files[name] = [(out / f"{i:05d}-seed{i}.png").read_bytes() for i in range(3)]
    assert files["plain"] != files["posterior"]
    out = tmp_path / "sample"  # diffcli sample takes it too (the batch is the particle set)
    args = ["sample", "--checkpoint", tiny_run, "--n", "3", "--batch-size", "3", "--steps", "3", "--kernel",
            "posterior", "--pg-factor", "5", "--out", out, "--device", "cpu"]
    code, _, err = invoke_cli(args, capsys)  # conditional by default: refused
    assert code != 0 and "--cfg 0" in err and not out.exists()
    code, _, err = invoke_cli([*args, "--cfg", "0"], capsys)
    assert code == 0, err
    out = tmp_path / "never"
    code, _, err = invoke_cli(["pg", "--checkpoint", tiny_uncond_run, "--n", "3", "--kernel", "posterior",
                               "--pg-factor", "5", "--out", out, "--device", "cpu"], capsys)
    assert code != 0 and "has no classes" in err and not out.exists()
