"""How sure is an FID ratio? Paired bootstrap over the rows `fid_vs_nfe.py --save-features DIR` wrote.

    python benchmarks/fid_paired_bootstrap.py DIR --baseline heun-18 [--boot 200] [--data-root MNIST_DIR]

Every row of one fid_vs_nfe run draws the same seeds (sample i: seed i, label i mod 10), so the rows are paired:
each bootstrap replicate resamples the sample indices once and scores every row on those same indices against the
fixed 5k held-out reference. Prints each row's FID, its difference to the baseline row's as a fraction of the
baseline's FID, and the 2.5-97.5 % interval of that difference (and of the accuracy difference). A replicate's
duplicated samples raise every row's FID by about the same amount (FID is biased by the number of distinct
samples), so the difference is bootstrapped, not the ratio, which that shared bias would pull towards 1. The
intervals cover the sampling noise of the n generated images only, not the reference set's.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from fid_vs_nfe import features, fid  # noqa: E402
from diffcli.backends.classifier import load_classifier  # noqa: E402
from mnist_data import DEFAULT_ROOT, heldout_5k  # noqa: E402


def random_rows(folder: Path, n: int) -> Path:
    """Two paired rows of made-up features and predictions (heun-2, euler-2), as --save-features writes them."""
    rng = np.random.default_rng(0)
    labels = np.arange(n) % 10
    for name in ("heun-2", "euler-2"):
        np.savez(folder / f"{name}.npz", feats=rng.normal(size=(n, 128)), pred=rng.integers(0, 10, n), labels=labels)
    return folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", nargs="?", help="what fid_vs_nfe.py --save-features wrote (--smoke: made up)")
    ap.add_argument("--baseline", help="row name, e.g. heun-18 (file heun-18.npz); required")
    ap.add_argument("--boot", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-root", type=Path, default=DEFAULT_ROOT, help="MNIST folder (benchmarks/mnist_data.py)")
    ap.add_argument("--smoke", action="store_true", help="tiny settings: only checks that the script runs")
    args = ap.parse_args()
    if args.smoke:  # tests/test_benchmarks.py; options given on the command line still win
        ap.set_defaults(baseline="heun-2", boot=3)
        args = ap.parse_args()
    if args.smoke and args.folder is None:
        args.folder = random_rows(Path(tempfile.mkdtemp()), n=8)
    if args.folder is None or args.baseline is None:
        ap.error("the folder and --baseline are required")
    rows = {p.stem: np.load(p) for p in sorted(Path(args.folder).glob("*.npz"))}
    if args.baseline not in rows:
        raise SystemExit(f"no row {args.baseline!r} in {args.folder}: {', '.join(rows)}")
    n = {len(r["feats"]) for r in rows.values()}
    if len(n) != 1:
        raise SystemExit(f"rows have different sample counts {sorted(n)}: not paired")
    n = n.pop()
    ref, _ = features(load_classifier(), heldout_5k(args.data_root)[0])
    rng = np.random.default_rng(args.seed)
    draws = [rng.integers(0, n, n) for _ in range(args.boot)]
    base = rows[args.baseline]
    base_acc = (base["pred"] == base["labels"]).astype(float)
    base_fids = np.array([fid(base["feats"][i], ref) for i in draws])
    print(f"{n} samples a row, {args.boot} paired bootstrap replicates; baseline {args.baseline}\n")
    base_full = fid(base["feats"], ref)
    print("| row | FID | (FID - baseline) / baseline (95 % interval) | accuracy | accuracy - baseline (95 % interval) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, r in rows.items():
        acc = (r["pred"] == r["labels"]).astype(float)
        f = fid(r["feats"], ref)
        diffs = (np.array([fid(r["feats"][i], ref) for i in draws]) - base_fids) / base_full
        dacc = np.array([acc[i].mean() - base_acc[i].mean() for i in draws])
        lo, hi = np.percentile(diffs, [2.5, 97.5])
        alo, ahi = np.percentile(dacc, [2.5, 97.5])
        print(f"| {name} | {f:.2f} | {100 * (f / base_full - 1):+.1f} % ({100 * lo:+.1f} .. {100 * hi:+.1f}) | "
              f"{100 * acc.mean():.1f} % | {100 * (acc.mean() - base_acc.mean()):+.1f} ({100 * alo:+.1f} .. "
              f"{100 * ahi:+.1f}) |", flush=True)


if __name__ == "__main__":
    main()
