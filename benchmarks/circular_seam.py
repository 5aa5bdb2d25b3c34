"""The seam of a 360-degree panorama: how much the picture changes across its left/right join, against how much
it changes between neighbouring columns inside, with and without --circular.

    python benchmarks/circular_seam.py [--seeds 4] [--steps 10] [--model FOLDER] [--toy]

`--model` takes any SD pipeline folder available offline; without it a random SD-shaped model is built in code
(the one benchmarks/panorama_vs_diffusers.py times). For each seed, the same prompt, canvas (latent 16 x 96,
windows of 16 every 4) and noise run twice: flat (windows stop at the borders) and --circular (windows, noise and
the tiled decode wrap). The figure per image is `core.metrics.seam_figure`: join = mean |last column - first
column|, inside = mean |column j+1 - column j|, ratio = join / inside (1: the join is as smooth as the rest). The
script prints each run's ratio and the mean ratio of each mode, measured in this one run.

`--toy` runs the same synchronization (core/sync.py's `sample_views` over the same flat or circular windows, one
canvas noise, Euler/DDIM steps) on a model whose samples are smooth pictures, so the figure has something to
show: each window's denoiser is the exact posterior mean of a Gaussian prior with a squared-exponential
covariance of correlation length 3 cells (x0_hat = K (K + sigma^2 I)^-1 x on the window). Neighbouring columns of
its samples are close; two far-apart columns are independent.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))
from diffcli.backends import pipelines  # noqa: E402
from diffcli.core.metrics import seam_figure  # noqa: E402
from diffcli.panorama import PanoramaConfig, generate, plan, validate  # noqa: E402

PROMPT = "a beach at sunrise, a 360 degree panorama"


def toy_denoiser(window: int, length: float = 3.0):
    """D(x, sigma) on (V, C, w, w) windows: the posterior mean under x0 ~ N(0, K x K), K the squared-exponential
    covariance over one axis of the window (separable, so it acts as U diag U^T along each axis)."""
    i = torch.arange(window, dtype=torch.float64)
    k = torch.exp(-0.5 * ((i[:, None] - i[None, :]) / length) ** 2)
    lam, u = torch.linalg.eigh(k)
    lam2 = (lam[:, None] * lam[None, :]).clamp(min=0)

    def denoise(x, sigma, **kw):
        s2 = sigma.double().view(-1, 1, 1, 1) ** 2
        coef = torch.einsum("ia,vcij,jb->vcab", u, x.double(), u)  # into the eigenbasis, along both axes
        coef = coef * (lam2 / (lam2 + s2))
        return torch.einsum("ia,vcab,jb->vcij", u, coef, u).to(x.dtype)

    return denoise


def toy(seeds: int, steps: int, smoke: bool) -> None:
    from diffcli.core.samplers import get_sigmas_karras
    from diffcli.core.sync import sample_views
    from diffcli.core.views import ViewSet, windows
    window, height = 16, 16
    width = 32 if smoke else 96
    sigmas = get_sigmas_karras(steps, 0.02, 80.0)
    ratios: dict[bool, list[float]] = {False: [], True: []}
    for seed in range(seeds):
        for circular in (False, True):
            views = ViewSet(windows(height, width, (window, window), 4, circular), (1, height, width))
            g = torch.Generator().manual_seed(seed)
            z = views.average(sample_views(lambda a, b: toy_denoiser(window), views, sigmas,
                                           lambda shape: torch.randn(shape, generator=g), (1, window, window),
                                           sampler="euler", start_scale=float(sigmas[0]), view_batch=64))
            fig = seam_figure(z)
            ratios[circular].append(fig["ratio"])
            print(f"toy seed {seed} {'circular' if circular else 'flat    '}: join {fig['join']:.4f}  inside "
                  f"{fig['inside']:.4f}  ratio {fig['ratio']:.3f}  ({len(views)} windows)")
    print(f"toy mean join/inside ratio: flat {statistics.fmean(ratios[False]):.3f}, circular "
          f"{statistics.fmean(ratios[True]):.3f} ({seeds} seed(s), {steps} Euler steps on Karras sigmas, latent "
          f"{height} x {width}, windows of {window} every 4)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--model", default=None, help="an SD pipeline folder (default: a random one built in code)")
    ap.add_argument("--toy", action="store_true", help="only the smooth Gaussian-prior model (see above)")
    ap.add_argument("--smoke", action="store_true", help="tiny: 1 seed, 2 steps, a narrow canvas")
    args = ap.parse_args()
    seeds, steps = (1, 2) if args.smoke else (args.seeds, args.steps)
    if args.toy or args.smoke:
        toy(seeds, max(steps, 3), args.smoke)
        if args.toy:
            return
    cpu = torch.device("cpu")
    with tempfile.TemporaryDirectory() as tmp:
        if args.model:
            folder = args.model
        else:
            from panorama_vs_diffusers import build_sd
            folder = build_sd(Path(tmp))
        pipe = pipelines.load_pipeline(str(folder), cpu, torch.float32)
        f = pipelines.pipeline_family(pipe).scale_factor
        window = pipelines.pipeline_family(pipe).native_size() // f
        width = window * (2 if args.smoke else 6) * f
        ratios: dict[bool, list[float]] = {False: [], True: []}
        for seed in range(seeds):
            for circular in (False, True):
                cfg = PanoramaConfig(prompt=PROMPT, steps=steps, height=window * f, width=width, stride=window // 4,
                                     seed=seed, circular=circular, view_batch=8)
                jobs = validate(cfg)
                p = plan(pipe, cfg, jobs)
                image, _ = generate(pipe, p, PROMPT, cfg, cpu)
                fig = seam_figure((image + 1) / 2)
                ratios[circular].append(fig["ratio"])
                print(f"seed {seed} {'circular' if circular else 'flat    '}: join {fig['join']:.4f}  inside "
                      f"{fig['inside']:.4f}  ratio {fig['ratio']:.3f}  ({len(p.views)} windows)")
    flat, circ = statistics.fmean(ratios[False]), statistics.fmean(ratios[True])
    print(f"mean join/inside ratio: flat {flat:.3f}, circular {circ:.3f} ({seeds} seed(s), {steps} steps, "
          f"{width} px wide)")


if __name__ == "__main__":
    main()
