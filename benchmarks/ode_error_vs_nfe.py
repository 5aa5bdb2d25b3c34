"""How far each deterministic sampler lands from the exact probability-flow ODE solution of the shipped EDM model.

    OMP_NUM_THREADS=1 python benchmarks/ode_error_vs_nfe.py --n 100 --rows heun:18,dpmpp_2m:10,dpmpp_2m:15,euler:15

Every row starts from the same noise (seeds 0..n-1, labels cycling 0-9, no CFG, `diffcli sample`'s own function),
so the deterministic samplers solve one ODE per sample; the reference is Heun at --ref-steps steps on the same
Karras schedule. Prints the RMS and the largest per-sample RMS distance to it, in uint8 grey levels (1 = one level
of 255), before rounding. FID (fid_vs_nfe.py) judges the images; this judges the solver.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from diffcli.backends.models import load_model  # noqa: E402
from diffcli.drawing import sample_images  # noqa: E402
from diffcli.sample import SHIPPED_CHECKPOINT, SampleConfig  # noqa: E402
from diffcli.core.samplers import nfe  # noqa: E402
from fid_vs_nfe import parse_rows  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--rows", default="heun:18,dpmpp_2m:10,dpmpp_2m:12,dpmpp_2m:15,euler:15,euler:35")
    ap.add_argument("--ref-steps", type=int, default=100, help="Heun steps of the reference solution")
    ap.add_argument("--rho", type=float, default=7.0)
    ap.add_argument("--checkpoint", default=str(SHIPPED_CHECKPOINT))
    ap.add_argument("--smoke", action="store_true", help="tiny settings: only checks that the script runs")
    args = ap.parse_args()
    if args.smoke:  # tests/test_benchmarks.py; options given on the command line still win
        ap.set_defaults(n=2, rows="heun:2,dpmpp_2m:2,euler:3", ref_steps=3)
        args = ap.parse_args()
    model, meta = load_model(args.checkpoint)

    def solve(sampler: str, steps: int) -> torch.Tensor:
        cfg = SampleConfig(n=args.n, steps=steps, sampler=sampler, batch_size=250, rho=args.rho)
        return sample_images(model, meta, cfg, torch.device("cpu"))[0].double()

    t0 = time.time()
    ref = solve("heun", args.ref_steps)
    print(f"reference heun {args.ref_steps} steps ({nfe('heun', args.ref_steps)} NFE): {time.time() - t0:.0f} s",
          file=sys.stderr, flush=True)
    print(f"model {args.checkpoint}, {args.n} samples (seeds 0..{args.n - 1}), Karras rho {args.rho:g}; distance to "
          f"heun at {args.ref_steps} steps, in grey levels (255 = black to white)\n")
    print("| sampler | steps | NFE | RMS distance | worst sample's RMS | seconds |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for sampler, steps, *_ in parse_rows(args.rows, ""):
        t0 = time.time()
        per_sample = ((solve(sampler, steps) - ref) * 127.5).pow(2).flatten(1).mean(1)
        print(f"| {sampler} | {steps} | {nfe(sampler, steps)} | {per_sample.mean().sqrt():.2f} | "
              f"{per_sample.max().sqrt():.2f} | {time.time() - t0:.0f} |", flush=True)


if __name__ == "__main__":
    main()
