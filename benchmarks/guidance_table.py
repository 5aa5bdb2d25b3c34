"""FID and class accuracy of guided sampling on the shipped digit model, one row per guidance setting.

    OMP_NUM_THREADS=1 python benchmarks/guidance_table.py --n 1000 --seed 100000 --save-features runs/gt \
        --guide checkpoints/mnist-edm-guide.safetensors --rows none,ag2,ag2.5,cfg2,cfg2[0.3-5],ag2[0.3-5]

A row is terms joined by `+`, each a method and its scale with an optional guidance interval [LO-HI] (the term
acts at sigma in (LO, HI]): `none`, `cfg2`, `cfg1.5[0.3-5]`, `ag2.5` (guide: --guide, or `ag2.5@RUN@STEP` for
another), `seg3`, `cfg2+ag2`. Samples come from `diffcli sample`'s own function (seeds SEED..SEED+n-1, labels
cycling 0-9, Heun 18 steps = 35 NFE unless --steps), are rounded to uint8 as the PNGs would be, and are scored
against the 5k held-out real digits as `diffcli eval --fid REF --features mnist` scores folders. Each row prints as
it finishes (rows most important first: a run cut short keeps what it measured), with its seconds and their ratio
to the first row's (one network evaluation of the guide rides on every main one: the cost of autoguidance).
`--save-features DIR` writes DIR/ROW.npz for `fid_paired_bootstrap.py DIR --baseline ROW` (paired intervals).
"""
from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from diffcli.backends.classifier import load_classifier  # noqa: E402
from diffcli.backends.models import load_model  # noqa: E402
from diffcli.drawing import sample_images  # noqa: E402
from diffcli.sample import SHIPPED_CHECKPOINT, SampleConfig  # noqa: E402
from diffcli.shared.images import to_uint8  # noqa: E402
from fid_vs_nfe import features, fid  # noqa: E402
from mnist_data import DEFAULT_ROOT, heldout_5k  # noqa: E402

TERM = re.compile(r"^(cfg|ag|seg)(\d+(?:\.\d+)?)(?:@(.+?))?(?:\[([\d.e-]+)-([\d.e+inf]+)\])?$")


def parse_row(row: str, guide: str | None) -> dict:
    """`cfg2[0.3-5]+ag2` -> SampleConfig keyword arguments."""
    kw: dict = {}
    if row == "none":
        return kw
    for term in row.split("+"):
        m = TERM.match(term)
        if not m:
            raise SystemExit(f"--rows: {term!r} is not cfgW, agW or segW with an optional @GUIDE and [LO-HI]")
        name, scale, other, lo, hi = m.groups()
        kw[{"cfg": "cfg", "ag": "ag_scale", "seg": "seg_scale"}[name]] = float(scale)
        if name == "ag":
            kw["ag_model"] = other or guide
            if kw["ag_model"] is None:
                raise SystemExit(f"--rows {term}: give the guide (--guide or {term}@CHECKPOINT)")
        if lo is not None:
            low, high = float(lo), float(hi)
            if name == "seg":
                kw.update(sigma_end=low, sigma_start=high)
            else:
                kw.update({f"{name}_sigma_min": low, f"{name}_sigma_max": high})
    return kw


@torch.no_grad()
def step_cost(model, guide_spec: str, device: torch.device, batch: int = 64, reps: int = 20) -> tuple[float, float]:
    """Seconds of one plain network evaluation and of one autoguided one (main + guide pass) on a batch, timed
    alternately (ABAB...) so that a busy machine slows both alike: medians."""
    from diffcli.backends.pipelines import load_family
    from diffcli.core.guidance import autoguided
    guide = load_family(guide_spec, device, checkpoint=True).model
    x, sigma = torch.randn(batch, 1, 28, 28), torch.full((batch,), 1.0)
    y = torch.arange(batch) % 10
    ag = autoguided(model, guide, 2.0)
    times: dict[str, list[float]] = {"plain": [], "ag": []}
    for _ in range(reps):
        for name, fn in (("plain", model), ("ag", ag)):
            t0 = time.perf_counter()
            fn(x, sigma, class_labels=y)
            times[name].append(time.perf_counter() - t0)
    return float(np.median(times["plain"])), float(np.median(times["ag"]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="none,cfg2,ag2", help="comma-separated rows (module docstring)")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=100000, help="first seed (the model card's protocol: 100000)")
    ap.add_argument("--steps", type=int, default=18, help="Heun steps (18 = 35 NFE)")
    ap.add_argument("--batch-size", type=int, default=250)
    ap.add_argument("--checkpoint", default=str(SHIPPED_CHECKPOINT))
    ap.add_argument("--guide", default=None, help="autoguidance's guide for ag rows (any --ag-model)")
    ap.add_argument("--save-features", default=None, metavar="DIR", help="write DIR/ROW.npz (paired bootstrap)")
    ap.add_argument("--grid", default=None, metavar="PNG", help="also write the first 20 samples of each row, a row each")
    ap.add_argument("--data-root", type=Path, default=DEFAULT_ROOT, help="MNIST folder (benchmarks/mnist_data.py)")
    ap.add_argument("--cost", action="store_true", help="first time one autoguided network evaluation against a plain "
                                                              "one (batch 64, the --guide)")
    ap.add_argument("--smoke", action="store_true", help="tiny settings: only checks that the script runs")
    args = ap.parse_args()
    device = torch.device("cpu")
    model, meta = load_model(args.checkpoint, device)
    if args.cost or args.smoke:
        plain, ag = step_cost(model, args.guide or args.checkpoint, device, reps=2 if args.smoke else 20)
        print(f"one network evaluation, batch 64: plain {1000 * plain:.1f} ms, autoguided (main + guide) "
              f"{1000 * ag:.1f} ms: AG step / plain step = {ag / plain:.2f}\n", flush=True)
    classifier = load_classifier()
    if args.smoke:  # tests/test_benchmarks.py: the shipped model as its own guide, 4 samples, 2 steps, no data
        args.n, args.steps, args.guide = 4, 2, args.guide or args.checkpoint
        args.rows = "none,cfg2[0.5-5],ag2"
        ref = features(classifier, torch.randint(0, 256, (16, 1, 28, 28), dtype=torch.uint8))[0]
    else:
        ref = features(classifier, heldout_5k(args.data_root)[0])[0]
    rows = [r for r in args.rows.split(",") if r]
    settings = {r: parse_row(r, args.guide) for r in rows}  # every row parsed before the first is drawn
    print(f"{args.n} samples a row, seeds {args.seed}..{args.seed + args.n - 1}, labels cycling, heun {args.steps} "
          f"steps; FID on the digit classifier's features against the held-out 5k\n")
    print("| row | FID | accuracy | seconds | time / first row |")
    print("| --- | ---: | ---: | ---: | ---: |", flush=True)
    first, pictures = None, []
    for row in rows:
        cfg = SampleConfig(n=args.n, seed=args.seed, steps=args.steps, sampler="heun", labels="all",
                           batch_size=args.batch_size, checkpoint=args.checkpoint, **settings[row])
        t0 = time.perf_counter()
        with torch.no_grad():
            images, labels, _ = sample_images(model, meta, cfg, device)
        seconds = time.perf_counter() - t0
        first = first or seconds
        grey = torch.from_numpy(to_uint8(images)).movedim(-1, 1)
        feats, pred = features(classifier, grey)
        acc = (pred.numpy() == np.array(labels)).mean()
        print(f"| {row} | {fid(feats, ref):.2f} | {100 * acc:.1f} % | {seconds:.0f} | {seconds / first:.2f} |",
              flush=True)
        if args.save_features:
            Path(args.save_features).mkdir(parents=True, exist_ok=True)
            name = re.sub(r"[^\w.@\[\]+-]+", "_", row)  # a guide's path inside the row: one file name
            np.savez(Path(args.save_features) / f"{name}.npz", feats=feats, pred=pred.numpy(), labels=np.array(labels))
        pictures.append(images[:20])
    if args.grid or args.smoke:
        from diffcli.shared.images import save_grid
        path = args.grid or str(Path(tempfile.mkdtemp()) / "grid.png")
        save_grid(Path(path), torch.cat(pictures), nrow=len(pictures[0]))
        print(f"\nwrote {path}: one row of samples per setting, in the order above")


if __name__ == "__main__":
    main()
