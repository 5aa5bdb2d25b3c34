"""Particle guidance on a digit model, unconditional: distinct classes per joint batch of 8 and FID, per setting.

Each setting is `name:key=value,...` with keys factor, kernel (rbf | x0 | classifier | posterior), grad (exact | skip),
bw (bandwidth multiple), smin / smax (the sigma window), classes (--pg-classes: the posterior kernel's classes a
particle runs after the first evaluation), sampler, steps. The last column is each setting's seconds a batch over
the first setting's, measured in this one run. For each, --batches joint batches of
--n particles (batch b uses seeds n*b .. n*b+n-1, the same for every setting) are judged by the shipped digit
classifier exactly as `diffcli eval --digits` does (images rounded to uint8 first): distinct predicted classes per
batch, mean and standard error over batches. With --fid N, the first N samples (N/n batches, the --batches ones
among them) are also scored: FID of the classifier's 128-d features against the held-out 5k (the `diffcli eval
--fid REF --features mnist` protocol, computed in-process), and class shares.

Run: OMP_NUM_THREADS=1 python benchmarks/pg_ablation.py --batches 50 --fid 1000 \\
         --settings plain:factor=0 pg:factor=2,kernel=classifier,grad=exact

`--plot PATH` draws modes (with standard errors) and FID against the factor, one line per kernel (the settings'
kernels; factor 0 is plain sampling, on every line): the modes/quality-vs-factor picture of the 001 thesis.

`--decided N` instead prints where a sample's class is decided: N unconditional plain samples, and at each Heun
step the share whose x0_hat the classifier already reads as the class the sample ends with (chance-like
agreement means the classifier cannot read x0_hat at that noise level, so a kernel on its features has nothing
to work with there).
"""
from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mnist_data import DEFAULT_ROOT, heldout_5k  # noqa: E402

from diffcli.backends.classifier import load_classifier  # noqa: E402
from diffcli.shared.devices import pick_device  # noqa: E402
from diffcli.shared.images import to_uint8
from diffcli.core.metrics import frechet_distance  # noqa: E402
from diffcli.backends.models import load_model  # noqa: E402
from diffcli.pg import PGConfig, sample_digits  # noqa: E402
from diffcli.drawing import digit_kernel  # noqa: E402
from diffcli.sample import SHIPPED_CHECKPOINT  # noqa: E402

KEYS = {"factor": ("pg_factor", float), "kernel": ("kernel", str), "grad": ("pg_grad", str),
        "bw": ("pg_bandwidth", float), "smin": ("pg_sigma_min", float), "smax": ("pg_sigma_max", float),
        "sampler": ("sampler", str), "steps": ("steps", int), "classes": ("pg_classes", int)}


def parse_setting(text: str, base: dict) -> tuple[str, dict]:
    name, _, body = text.partition(":")
    values = dict(base)
    for item in filter(None, body.split(",")):
        key, _, value = item.partition("=")
        field, kind = KEYS[key]
        values[field] = kind(value)
    return name, values


def uint8_grey(images: torch.Tensor) -> torch.Tensor:
    """As eval reads the PNGs: uint8, grey, back to the classifier's [-1, 1]."""
    grey = torch.from_numpy(to_uint8(images)).movedim(-1, 1).float().mean(1, keepdim=True).round()
    return grey / 127.5 - 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--settings", nargs="+", default=["plain:factor=0"])
    ap.add_argument("--batches", type=int, default=50)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--fid", type=int, default=0, help="also FID of this many samples (0: none)")
    ap.add_argument("--sampler", default="heun")
    ap.add_argument("--steps", type=int, default=18)
    ap.add_argument("--checkpoint", default=str(SHIPPED_CHECKPOINT))
    ap.add_argument("--data-root", type=Path, default=DEFAULT_ROOT)
    ap.add_argument("--device", default=None)
    ap.add_argument("--decided", type=int, default=0, metavar="N")
    ap.add_argument("--plot", default=None, help="write modes and FID against the factor here (PNG)")
    ap.add_argument("--smoke", action="store_true", help="tiny settings: only checks that the script runs")
    args = ap.parse_args()
    if args.smoke:  # tests/test_benchmarks.py; options given on the command line still win
        ap.set_defaults(settings=["plain:factor=0", "pg:factor=1,kernel=rbf"], batches=2, n=2, fid=4, steps=2,
                        plot=str(Path(tempfile.mkdtemp()) / "pg-ablation.png"))
        args = ap.parse_args()
    device = pick_device(args.device)
    model, meta = load_model(args.checkpoint, device)
    classifier = load_classifier(device=device)
    if args.decided:
        return decided(model, meta, classifier, args.decided, args.steps, device)
    ref = None
    if args.fid:
        with torch.no_grad():
            f = classifier.features(heldout_5k(args.data_root)[0].float() / 127.5 - 1).double().numpy()
        ref = (f.mean(0), np.cov(f, rowvar=False))
    base = {"sampler": args.sampler, "steps": args.steps, "pg_factor": 0.0}
    total = max(args.batches, math.ceil(args.fid / args.n))
    results = []  # (kernel, factor, modes, s.e., FID or None)
    print(f"{args.checkpoint}: {total} joint batches of {args.n}, unconditional, modes over the first {args.batches}")
    print("| setting | modes (of %d) | +- s.e. | all distinct | FID (%d) | classes in FID set | s/batch | x first |"
          % (args.n, args.fid))
    print("| --- | ---: | ---: | ---: | ---: | --- | ---: | ---: |")
    first = None
    for text in args.settings:
        name, values = parse_setting(text, base)
        cfg = PGConfig(n=args.n, **values)
        kernel = digit_kernel(cfg, device, meta=meta)
        start = time.time()
        modes, feats, preds = [], [], []
        for b in range(total):
            cfg.seed = args.n * b
            images = uint8_grey(sample_digits(model, meta, cfg, cfg.pg_factor, kernel, device))
            with torch.no_grad():
                f = classifier.features(images.to(device))
                pred = classifier.head(f).argmax(1).cpu()
            feats.append(f.double().cpu())
            preds.append(pred)
            if b < args.batches:
                modes.append(len(set(pred.tolist())))
        m = np.array(modes, dtype=float)
        se = m.std(ddof=1) / math.sqrt(len(m)) if len(m) > 1 else float("nan")
        fid, shares = "", ""
        if args.fid:
            feats_n = torch.cat(feats)[:args.fid].numpy()
            fid = f"{frechet_distance(feats_n, *ref):.2f}"
            counts = torch.bincount(torch.cat(preds)[:args.fid], minlength=10)
            shares = " ".join(str(int(c)) for c in counts)
        seconds = (time.time() - start) / total
        first = first or seconds
        print(f"| {name} | {m.mean():.2f} | {se:.2f} | {(m == args.n).mean():.2f} | {fid} | {shares} | "
              f"{seconds:.2f} | {seconds / first:.2f} |", flush=True)
        results.append((cfg.kernel, cfg.pg_factor, m.mean(), se, float(fid) if fid else None))
    if args.plot:
        plot(results, args, args.plot)


def plot(results: list[tuple], args, path: str) -> None:
    """Modes (left) and FID (right) against the PG factor, a line per kernel; factor 0 rows start every line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    plain = [r for r in results if r[1] == 0]
    kernels = sorted({r[0] for r in results if r[1] > 0})
    fig, (ax_m, ax_f) = plt.subplots(1, 2, figsize=(9, 3.4))
    for kernel in kernels:
        rows = sorted(plain[:1] + [r for r in results if r[0] == kernel and r[1] > 0], key=lambda r: r[1])
        xs = [r[1] for r in rows]
        ax_m.errorbar(xs, [r[2] for r in rows], yerr=[r[3] for r in rows], marker="o", capsize=3, label=kernel)
        if all(r[4] is not None for r in rows):
            ax_f.plot(xs, [r[4] for r in rows], marker="o", label=kernel)
    ax_m.axhline(10 * (1 - 0.9 ** args.n), color="grey", ls=":", lw=1, label="independent, 10 equal classes")
    ax_m.set(xlabel="PG factor", ylabel=f"distinct classes in {args.n}", title=f"modes ({args.batches} batches)")
    ax_f.set(xlabel="PG factor", ylabel="FID (mnist features)", title=f"quality ({args.fid} samples)")
    ax_m.legend(fontsize=8)
    ax_f.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


@torch.no_grad()
def decided(model, meta, classifier, n: int, steps: int, device) -> None:
    from diffcli.core.particles import class_posterior
    from diffcli.core.samplers import get_sigmas_karras, sample_heun
    k = meta["num_classes"]
    sigmas = get_sigmas_karras(steps, meta["sigma_min"], meta["sigma_max"], device=device)
    x = torch.randn((n, meta["channels"], meta["image_size"], meta["image_size"]),
                    generator=torch.Generator().manual_seed(0)).to(device) * sigmas[0]
    read = lambda img: classifier.head(classifier.features(img.clamp(-1, 1))).argmax(1)  # noqa: E731
    seen = []

    def posterior(z, s):  # the model's own class posterior (the posterior kernel's p), every class in one batch
        out = model(torch.cat([z] * (k + 1)), s.expand(len(z) * (k + 1)), torch.arange(k + 1, device=device)
                    .repeat_interleave(len(z))).view(k + 1, len(z), *z.shape[1:]).transpose(0, 1)
        return class_posterior(out[:, :k], out[:, k])

    def callback(info):
        seen.append((float(info["sigma"]), read(info["denoised"]), posterior(info["x"], info["sigma"])))

    out = sample_heun(lambda z, s: model(z, s.expand(len(z)), torch.full((len(z),), k, device=device)), x, sigmas,
                      callback=callback)
    final = read(uint8_grey(out).to(device))
    print(f"{n} plain unconditional samples, Heun {steps} steps: at each step, the share whose class is already read "
          "as the class the sample ends with, by the digit classifier on x0_hat and by the argmax of the model's own "
          "class posterior at x (the posterior kernel's p)\n")
    print("| sigma | classifier on x0_hat | model posterior | mean posterior of the final class |")
    print("| ---: | ---: | ---: | ---: |")
    for sigma, pred, p in seen:
        print(f"| {sigma:.3g} | {(pred == final).float().mean():.2f} | {(p.argmax(1) == final).float().mean():.2f} | "
              f"{p[torch.arange(n), final].mean():.2f} |")


if __name__ == "__main__":
    main()
