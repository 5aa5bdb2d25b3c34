"""Flux panoramas: RoPE positions relative to each window vs absolute on the canvas, measured in one run.

    OMP_NUM_THREADS=1 python benchmarks/flow_panorama_rope.py [--width 64] [--steps 8] [--seeds 3]

Flux's image ids (0, row, col) give RoPE its positions. diffcli's panorama counts them from each window's corner
(relative: every window looks like a whole image to the network); the alternative is the window's place on the
canvas (absolute: the windows share one coordinate frame, as the canvas would if generated whole). Both run the
same x0-synchronized panorama (one window per network call, --view-batch 1, so each call can carry its own
offset). The figure: at every step, the windows' x0_hat predictions before they are averaged, their variance
across the windows that cover a latent cell, averaged over the cells covered more than once and over the steps:
how much the windows disagree where they join (lower = they join better).

Weak evidence, said plainly: the tiny Flux of the tests is a random network, so this measures how the two position
choices change a random transformer's disagreement, not how a trained Flux joins windows.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
from diffcli.backends import pipelines  # noqa: E402
from diffcli.core.guidance import classifier_free  # noqa: E402
from diffcli.core.sync import sample_views  # noqa: E402
from diffcli.core.views import ViewSet, windows  # noqa: E402
from diffcli.shared.devices import PerSampleRandn  # noqa: E402

CPU = torch.device("cpu")


def disagreement(fam, views: ViewSet, steps: int, seed: int, absolute: bool, size: int) -> float:
    fam.check_size(size, size)
    sigmas = fam.sigmas(steps, CPU)
    cond, uncond = fam.encode_prompts(["a mountain range"], None, size, size, CPU)
    base = classifier_free(fam.denoiser(), 1.0, cond, uncond)
    outs: dict[int, torch.Tensor] = {}
    scores: list[float] = []

    def make(a: int, b: int):
        win = views.views[a]

        def denoise(x, sigma, **kw):
            fam.position_offset = (win.top // 2, win.left // 2) if absolute else (0, 0)
            out = base(x, sigma, **kw)
            outs[a] = out
            if len(outs) == len(views):  # every window predicted this step: their spread where they overlap
                stack = torch.stack([views.views[i].inverse_view(outs[i][0]) for i in range(len(views))])
                cover = torch.stack([views.views[i].inverse_view(torch.ones_like(outs[i][0]))
                                     for i in range(len(views))])
                n = cover.sum(0)
                mean = stack.sum(0) / n.clamp(min=1)
                var = ((stack - mean) ** 2 * cover).sum(0) / n.clamp(min=1)
                scores.append(float(var[n > 1].mean()))
                outs.clear()
            return out

        return denoise

    rng = PerSampleRandn([seed])
    state = fam.state_dtype(CPU)
    sample_views(make, views, sigmas, lambda shape: rng.randn(shape)[0].to(state), (views.canvas[0], 8, 8),
                 sampler="euler", case="x0", noise="canvas", view_batch=1, start_scale=fam.start_scale(sigmas[0]))
    fam.position_offset = (0, 0)
    return statistics.mean(scores[:-1])  # the last call's x0 at sigma -> 0 is the sample itself


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=64, help="canvas width in px (height 16 px, windows 16 px)")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    if args.smoke:
        args.width, args.steps, args.seeds = 24, 2, 1
    from pipes import build_tiny_flux
    fam = pipelines.load_family(str(build_tiny_flux(Path(tempfile.mkdtemp()))), CPU, torch.float32)
    latent = fam.latent_shape(16, args.width)
    views = ViewSet(windows(latent[1], latent[2], (8, 8), 2), latent)
    rel = [disagreement(fam, views, args.steps, s, False, 16) for s in range(args.seeds)]
    ab = [disagreement(fam, views, args.steps, s, True, 16) for s in range(args.seeds)]
    print(f"tiny random Flux, canvas 16x{args.width} px, {len(views)} windows of 8x8 latent cells (stride 2), "
          f"{args.steps} steps, seeds 0-{args.seeds - 1}")
    print(f"windows' x0 disagreement on overlaps, relative RoPE: {statistics.mean(rel):.4g}, absolute RoPE: "
          f"{statistics.mean(ab):.4g}, absolute / relative: {statistics.mean(ab) / statistics.mean(rel):.3f}")
    print("(a random network: weak evidence about trained Flux; see the docstring)")


if __name__ == "__main__":
    main()
