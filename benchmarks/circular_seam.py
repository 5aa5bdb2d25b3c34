"""The seam of a 360-degree panorama: how much the picture changes across its left/right join, against how much
it changes between neighbouring columns inside, with and without --circular.

    python benchmarks/circular_seam.py [--seeds 4] [--steps 10] [--model FOLDER]

`--model` takes any SD pipeline folder available offline; without it a random SD-shaped model is built in code
(the one benchmarks/panorama_vs_diffusers.py times). For each seed, the same prompt, canvas (latent 16 x 96,
windows of 16 every 4) and noise run twice: flat (windows stop at the borders) and --circular (windows, noise and
the tiled decode wrap). The figure per image is `core.metrics.seam_figure`: join = mean |last column - first
column|, inside = mean |column j+1 - column j|, ratio = join / inside (1: the join is as smooth as the rest). The
script prints each run's ratio and the mean ratio of each mode, measured in this one run.
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--model", default=None, help="an SD pipeline folder (default: a random one built in code)")
    ap.add_argument("--smoke", action="store_true", help="tiny: 1 seed, 2 steps, a narrow canvas")
    args = ap.parse_args()
    seeds, steps = (1, 2) if args.smoke else (args.seeds, args.steps)
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
