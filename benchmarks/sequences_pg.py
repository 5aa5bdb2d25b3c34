"""Particle guidance on a next-frame model: plain vs PG on the same contexts, the 001 seed's metrics.

For each setting (`name:key=value,...`, keys as in pg_ablation.py: factor, kernel, grad, bw, smin, smax, sampler,
steps; or --factors for the rbf kernel) and each of --contexts sequences of the model's dataset, draws --n
particles sharing that context (seeds seed + j*n + i, the same for every setting), and reports, as
`diffcli pg --compare` does, means over contexts (modes found also with its standard error) of:

- modes found: distinct true futures reached (a sample reaches future k when its digit's ink centroid moved
  within half the gap between futures of future k's shift), of K;
- all K: share of contexts where every true future was reached;
- directional accuracy: share of samples that moved by an allowed shift;
- L2: RMSE (ink in [0, 1]) to the nearest true future; IoU: of the ink masks (> 0.5) with it;
- spread: mean pairwise RMSE between the particles of a context.

--data-seed N regenerates the contexts with other motions than the model was trained on (same digits).

Run: OMP_NUM_THREADS=1 python benchmarks/sequences_pg.py --checkpoint runs/circle --contexts 50 --n 4 \
         --settings plain:factor=0 centroid:factor=30,kernel=centroid
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from diffcli.shared.devices import pick_device
from diffcli.shared.shipped import SHIPPED_CIRCLE
from diffcli.data.contexts import dataset_item, load_digits
from diffcli.backends.models import load_model
from diffcli.pg import PGConfig, sample_digits
from diffcli.drawing import digit_kernel
from diffcli.data.sequences import Context, context_metrics, ink, mean_metrics, pairwise_rmse

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pg_ablation import parse_setting  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", help="a next-frame model (required; --smoke: the shipped circle-jumping)")
    ap.add_argument("--factors", default="0,1.7,5", help="rbf-kernel factors (when no --settings)")
    ap.add_argument("--settings", nargs="+", default=None)
    ap.add_argument("--contexts", type=int, default=10)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--sampler", default="heun")
    ap.add_argument("--steps", type=int, default=18)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-seed", type=int, default=None, help="motions of the contexts (default: the training set's)")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--device", default=None)
    ap.add_argument("--smoke", action="store_true", help="tiny settings: only checks that the script runs")
    args = ap.parse_args()
    if args.smoke:  # tests/test_benchmarks.py; options given on the command line still win
        ap.set_defaults(checkpoint=str(SHIPPED_CIRCLE), factors="0,1", contexts=1, n=2, steps=2)
        args = ap.parse_args()
    if args.checkpoint is None:
        ap.error("--checkpoint is required")
    device = pick_device(args.device)
    model, meta = load_model(args.checkpoint, device)
    record = dict(meta["sequence"])
    if args.data_seed is not None:
        record["seed"] = args.data_seed
    digits = load_digits(record, args.data_root)
    contexts = [Context(it.context.float() / 127.5 - 1, f"index {i}", i, it)
                for i, it in ((i, dataset_item(record, i, digits)) for i in range(args.contexts))]
    base = {"sampler": args.sampler, "steps": args.steps, "pg_factor": 0.0}
    settings = args.settings or [f"{'plain' if float(f) == 0 else f'PG {f}'}:factor={f}" for f in args.factors.split(",")]
    rows, start = [], time.time()
    for text in settings:
        name, values = parse_setting(text, base)
        cfg = PGConfig(n=args.n, seed=args.seed, **values)
        kernel = digit_kernel(cfg, device, meta=meta)
        per, spread = [], []
        for j, ctx in enumerate(contexts):
            x = sample_digits(model, meta, cfg, cfg.pg_factor, kernel, device, context=ctx.frames, seed_offset=j * args.n)
            per.append(context_metrics(x, ctx))
            spread.append(pairwise_rmse(ink(x)))
        found = [m["modes_found"] for m in per]
        se = (sum((f - sum(found) / len(found)) ** 2 for f in found) / max(len(found) - 1, 1) / len(found)) ** 0.5
        rows.append((name, mean_metrics(per), se, sum(spread) / len(spread)))
        print(f"  {name}: {time.time() - start:.0f} s", file=sys.stderr, flush=True)
    k = int(rows[0][1]["modes_possible"])
    print(f"{meta['sequence']['kind']} (K = {k}), {args.contexts} contexts x {args.n} particles, {args.sampler} "
          f"{args.steps} steps, data seed {record['seed']} ({time.time() - start:.0f} s)\n")
    print(f"| setting | modes found (of {k}) | all {k} found | directional accuracy | L2 to nearest future | "
          "IoU with nearest future | spread (pairwise RMSE) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, m, se, s in rows:
        print(f"| {name} | {m['modes_found']:.2f} +- {se:.2f} | {m['all_modes_found']:.2f} | "
              f"{m['directional_accuracy']:.3f} | {m['l2']:.4f} | {m['iou']:.3f} | {s:.4f} |")


if __name__ == "__main__":
    main()
