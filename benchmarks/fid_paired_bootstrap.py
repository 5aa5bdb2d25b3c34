"""How sure is an FID ratio? Paired bootstrap over the rows `fid_vs_nfe.py --save-features DIR` wrote.

    python benchmarks/fid_paired_bootstrap.py DIR --baseline heun-18 [--boot 200]

Every row of one fid_vs_nfe run draws the same seeds (sample i: seed i, label i mod 10), so the rows are paired:
each bootstrap replicate resamples the sample indices once and scores every row on those same indices against the
fixed 5k held-out reference. Prints each row's FID, its ratio to the baseline row and the 2.5-97.5 % interval
of that ratio (and of the accuracy difference). The intervals cover the sampling noise of the n generated images
only, not the reference set's. A replicate's duplicated samples raise every row's FID alike (FID is biased by n);
read the ratio's interval, not the replicates' FIDs.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from fid_vs_nfe import features, fid  # noqa: E402
from diffcli.classifier import load_classifier  # noqa: E402
from mnist_data import heldout_5k  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder")
    ap.add_argument("--baseline", required=True, help="row name, e.g. heun-18 (file heun-18.npz)")
    ap.add_argument("--boot", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rows = {p.stem: np.load(p) for p in sorted(Path(args.folder).glob("*.npz"))}
    if args.baseline not in rows:
        raise SystemExit(f"no row {args.baseline!r} in {args.folder}: {', '.join(rows)}")
    n = {len(r["feats"]) for r in rows.values()}
    if len(n) != 1:
        raise SystemExit(f"rows have different sample counts {sorted(n)}: not paired")
    n = n.pop()
    ref, _ = features(load_classifier(), heldout_5k()[0])
    rng = np.random.default_rng(args.seed)
    draws = [rng.integers(0, n, n) for _ in range(args.boot)]
    base = rows[args.baseline]
    base_acc = (base["pred"] == base["labels"]).astype(float)
    base_fids = np.array([fid(base["feats"][i], ref) for i in draws])
    print(f"{n} samples a row, {args.boot} paired bootstrap replicates; baseline {args.baseline}\n")
    print("| row | FID | FID / baseline (95 % interval) | accuracy | accuracy - baseline (95 % interval) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, r in rows.items():
        acc = (r["pred"] == r["labels"]).astype(float)
        f = fid(r["feats"], ref)
        ratios = np.array([fid(r["feats"][i], ref) for i in draws]) / base_fids
        dacc = np.array([acc[i].mean() - base_acc[i].mean() for i in draws])
        lo, hi = np.percentile(ratios, [2.5, 97.5])
        alo, ahi = np.percentile(dacc, [2.5, 97.5])
        print(f"| {name} | {f:.2f} | {f / fid(base['feats'], ref):.3f} ({lo:.3f} .. {hi:.3f}) | "
              f"{100 * acc.mean():.1f} % | {100 * (acc.mean() - base_acc.mean()):+.1f} ({100 * alo:+.1f} .. "
              f"{100 * ahi:+.1f}) |", flush=True)


if __name__ == "__main__":
    main()
