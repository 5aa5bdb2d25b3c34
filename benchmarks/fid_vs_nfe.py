"""FID (shipped classifier's 128-d features) and class accuracy of the shipped EDM model against NFE, per sampler.

    OMP_NUM_THREADS=2 python benchmarks/fid_vs_nfe.py --n 1000
    OMP_NUM_THREADS=1 python benchmarks/fid_vs_nfe.py --n 1000 --rows heun:18,dpmpp_2m:10,dpmpp_2m:12,dpmpp_2m:15

Samples come from `diffcli sample`'s own function (seeds 0..n-1, labels cycling 0-9, no CFG), are rounded to
uint8 as the PNGs would be, and are scored against the 5k held-out real digits exactly as
`diffcli eval --fid REF --features mnist` scores folders. Two floors: n real t10k digits against the same 5k
(the small-sample bias at this n) and all 10k against the 5k. Prints Markdown tables and writes a PNG plot if
matplotlib is installed. `--rows SAMPLER:STEPS[:SCHEDULE],...` measures just those rows instead of each sampler's
default steps; `--nfe 5,7,10` instead runs every --samplers x --schedules at the fewest steps that reach each NFE;
`--schedules` (default karras) and `--rho/--sigma-min/--sigma-max` set the noise levels (default: the model's).
`--seed-base S` draws seeds S..S+n-1 (keep tuning seeds and reported seeds apart).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from diffcli.backends.classifier import load_classifier  # noqa: E402
from diffcli.shared.images import to_uint8  # noqa: E402
from diffcli.core.metrics import frechet_distance  # noqa: E402
from diffcli.backends.models import load_model  # noqa: E402
from diffcli.drawing import sample_images  # noqa: E402
from diffcli.sample import SHIPPED_CHECKPOINT, SampleConfig  # noqa: E402
from diffcli.core.samplers import SAMPLERS, SCHEDULES, nfe  # noqa: E402
from mnist_data import DEFAULT_ROOT, heldout_5k, t10k  # noqa: E402

STEPS = {"euler": (9, 17, 35, 79), "heun": (5, 9, 18, 40), "stochastic_heun": (5, 9, 18, 40),
         "ddim": (9, 17, 35, 79), "euler_ancestral": (9, 17, 35, 79), "dpmpp_2m": (9, 12, 17, 35)}


def steps_for(sampler: str, target: int) -> int:
    """The fewest steps whose NFE reaches `target` (2-evaluation samplers: 2N - 1)."""
    steps = 1
    while nfe(sampler, steps) < target:
        steps += 1
    return steps


def parse_rows(rows: str | None, samplers: str, schedules: str = "karras",
               nfes: str | None = None) -> list[tuple[str, int, str]]:
    """`heun:18,dpmpp_2m:10:exponential` -> [(sampler, steps, schedule)]; with `nfes` every sampler x schedule at
    each NFE; otherwise every listed sampler at its STEPS, on each schedule."""
    names = [s for s in samplers.split(",") if s]
    scheds = [s for s in schedules.split(",") if s]
    for name in names:
        if name not in SAMPLERS or (not nfes and name not in STEPS):
            raise SystemExit(f"--samplers: {name!r} is not one of {', '.join(SAMPLERS if nfes else STEPS)}")
    for sched in scheds:
        if sched not in SCHEDULES:
            raise SystemExit(f"--schedules: {sched!r} is not one of {', '.join(SCHEDULES)}")
    if not rows and nfes:
        return [(s, steps_for(s, int(t)), sc) for s in names for sc in scheds for t in nfes.split(",")]
    if not rows:
        return [(s, steps, sc) for s in names for sc in scheds for steps in STEPS[s]]
    out = []
    for item in rows.split(","):
        name, steps, *rest = item.split(":") + [""]
        sched = rest[0] or scheds[0]
        if name not in SAMPLERS or not steps.isdigit() or int(steps) < 1 or sched not in SCHEDULES:
            raise SystemExit(f"--rows: {item!r} is not SAMPLER:STEPS[:SCHEDULE] with SAMPLER one of "
                             f"{', '.join(SAMPLERS)}")
        out.append((name, int(steps), sched))
    return out


@torch.no_grad()
def features(classifier, grey_uint8: torch.Tensor) -> tuple[np.ndarray, torch.Tensor]:
    x = grey_uint8.float() / 127.5 - 1
    feats = torch.cat([classifier.features(x[i:i + 500]) for i in range(0, len(x), 500)])
    logits = torch.cat([classifier(x[i:i + 500]) for i in range(0, len(x), 500)])
    return feats.double().numpy(), logits.argmax(1)


def fid(feats: np.ndarray, ref: np.ndarray) -> float:
    return frechet_distance(feats, ref.mean(0), np.cov(ref, rowvar=False))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--samplers", default="euler,heun,stochastic_heun")
    ap.add_argument("--rows", default=None, help="SAMPLER:STEPS[:SCHEDULE],... instead of --samplers' default steps")
    ap.add_argument("--nfe", default=None, help="NFE targets, e.g. 5,7,10,15,35: every --samplers x --schedules row")
    ap.add_argument("--schedules", default="karras", help="schedules of the rows (core.schedules.SCHEDULES)")
    ap.add_argument("--seed-base", type=int, default=0, help="first seed (samples use seed-base..seed-base+n-1)")
    ap.add_argument("--rho", type=float, default=7.0)
    ap.add_argument("--sigma-min", type=float, default=None)
    ap.add_argument("--sigma-max", type=float, default=None)
    ap.add_argument("--batch-size", type=int, default=250)
    ap.add_argument("--save-features", default=None, metavar="DIR",
                    help="also write each row's features and predictions (DIR/SAMPLER-STEPS.npz) for paired analysis")
    ap.add_argument("--checkpoint", default=str(SHIPPED_CHECKPOINT))
    ap.add_argument("--data-root", type=Path, default=DEFAULT_ROOT, help="MNIST folder (benchmarks/mnist_data.py)")
    ap.add_argument("--plot", default="docs/fid-vs-nfe.png")
    ap.add_argument("--replot", default=None, help="redraw --plot from a saved output of this script")
    ap.add_argument("--smoke", action="store_true", help="tiny settings: only checks that the script runs")
    args = ap.parse_args()
    if args.smoke:  # tests/test_benchmarks.py; options given on the command line still win
        ap.set_defaults(n=4, rows="heun:2,dpmpp_2m_sde:2:exponential", batch_size=4, save_features=tempfile.mkdtemp(),
                        plot=str(Path(tempfile.mkdtemp()) / "fid-vs-nfe.png"))
        args = ap.parse_args()
    if args.replot:
        return replot(args.replot, args.plot)
    model, meta = load_model(args.checkpoint)
    clf = load_classifier()
    ref, _ = features(clf, heldout_5k(args.data_root)[0])
    real, _ = features(clf, t10k(args.data_root)[0])
    floors = {"all": fid(real, ref), "n": fid(real[np.random.default_rng(0).permutation(len(real))[:args.n]], ref)}
    rows = []
    for sampler, steps, sched in parse_rows(args.rows, args.samplers, args.schedules, args.nfe):
        t0 = time.time()
        # the samplers' own noise defaults (eta None: each sampler's own); s_noise only reaches stochastic_heun
        cfg = SampleConfig(n=args.n, steps=steps, sampler=sampler, batch_size=args.batch_size, rho=args.rho,
                           sigma_min=args.sigma_min, sigma_max=args.sigma_max, schedule=sched, seed=args.seed_base)
        images, labels, _ = sample_images(model, meta, cfg, torch.device("cpu"))
        grey = torch.from_numpy(to_uint8(images)).movedim(-1, 1)
        feats, pred = features(clf, grey)
        acc = (pred == torch.tensor(labels)).float().mean().item()
        rows.append((sampler, sched, steps, nfe(sampler, steps), fid(feats, ref), acc, time.time() - t0))
        print(f"{sampler} {sched} {steps} steps: NFE {rows[-1][3]}, FID {rows[-1][4]:.2f}, acc {acc:.3f}, "
              f"{rows[-1][6]:.0f} s", file=sys.stderr, flush=True)
        if args.save_features:
            Path(args.save_features).mkdir(parents=True, exist_ok=True)
            np.savez(Path(args.save_features) / f"{sampler}-{sched}-{steps}.npz", feats=feats, pred=pred.numpy(),
                     labels=np.asarray(labels))
    levels = (f"rho {args.rho:g}, sigma {args.sigma_min or meta['sigma_min']:g}.."
              f"{args.sigma_max or meta['sigma_max']:g}")
    print(f"model {args.checkpoint} (step {meta.get('train_step')}), {args.n} samples per row (seeds "
          f"{args.seed_base}..{args.seed_base + args.n - 1}, labels cycling 0-9, no CFG), {levels}; reference: 5k "
          f"held-out real digits, shipped classifier features\n")
    print("| sampler | schedule | steps | NFE | FID (mnist features) | class accuracy | seconds |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for s, sched, steps, n_fe, f, a, sec in rows:
        print(f"| {s} | {sched} | {steps} | {n_fe} | {f:.2f} | {100 * a:.1f} % | {sec:.0f} |")
    print(f"\nfloor (real vs real): {args.n} t10k digits vs the 5k: {floors['n']:.2f}; "
          f"all 10k t10k vs the 5k: {floors['all']:.2f}")
    plot(rows, floors["n"], args.n, args.plot)


def plot(rows: list[tuple], floor: float, n: int, path: str) -> None:
    """FID against NFE per sampler, both axes log (the 9-NFE Heun rows are far off), real-vs-real floor dashed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import NullFormatter
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for key in dict.fromkeys((r[0], r[1]) for r in rows):
        pts = [(r[3], r[4]) for r in rows if (r[0], r[1]) == key]
        ax.plot(*zip(*pts), marker="o", label=" ".join(key))
    if floor == floor:  # a partial run (replot of its log) has no floor
        ax.axhline(floor, color="grey", ls="--", lw=1, label=f"real vs real, n={n}")
    ax.set(xscale="log", yscale="log", xlabel="NFE", ylabel="FID (mnist features)", title="shipped MNIST EDM model")
    ticks = sorted({r[3] for r in rows})
    ax.set_xticks(ticks, labels=[str(t) for t in ticks])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def replot(table: str, path: str) -> None:
    """Redraw the plot from this script's printed output (no resampling): its Markdown table, or, for a run still
    going, its stderr lines ("SAMPLER SCHEDULE STEPS steps: NFE n, FID f, ..."); several files joined by commas."""
    import re
    text = "\n".join(open(name).read() for name in table.split(","))
    rows = [(m[0], m[1], int(m[2]), int(m[3]), float(m[4])) for m in
            re.findall(r"\| (\w+) \| (\w+) \| (\d+) \| (\d+) \| ([\d.]+) \|", text)]
    rows += [(m[0], m[1], int(m[2]), int(m[3]), float(m[4])) for m in
             re.findall(r"^(\w+) (\w+) (\d+) steps: NFE (\d+), FID ([\d.]+)", text, re.M)]
    rows = sorted(dict.fromkeys(rows), key=lambda r: (r[0], r[1], r[3]))
    floor = re.search(r"floor \(real vs real\): (\d+) t10k digits vs the 5k: ([\d.]+)", text)
    n, level = (int(floor[1]), float(floor[2])) if floor else (1000, float("nan"))
    plot(rows, level, n, path)


if __name__ == "__main__":
    main()
