"""Particle guidance on the shipped digit model: a Markdown table of diversity and quality per pg factor.

For each factor (default 0, 0.5, 1, 1.7, 3) it draws --batches (default 25) UNLABELLED batches of 8,
each sampled jointly (seeds 8b .. 8b+7, the same for every factor), and the same number of LABELLED
batches of 8 (labels cycling over 0..9). Columns, judged by the shipped digit classifier exactly as
`diffcli eval --digits` does (images rounded to uint8 first):

- modes discovered: distinct predicted classes per unlabelled batch of 8, mean over batches (max 8);
- mean in-batch similarity: mean pairwise cosine of the classifier's 128-d features, unlabelled batches
  (lower = more diverse);
- class accuracy: share of labelled samples classified as their label (quality).

Run: OMP_NUM_THREADS=1 python benchmarks/pg_digits.py [--kernel rbf|classifier] [--batches 25]
(default 25 x 2 batches x 5 factors of heun 18 steps: about 12 min on one CPU thread).
"""
from __future__ import annotations

import argparse
import time

import torch

from diffcli.backends.classifier import classify, load_classifier
from diffcli.shared.devices import pick_device
from diffcli.shared.images import to_uint8
from diffcli.core.metrics import digit_record
from diffcli.backends.models import load_model
from diffcli.core.particles import make_kernel
from diffcli.pg import PGConfig, sample_digits
from diffcli.sample import SHIPPED_CHECKPOINT


def judge(classifier, images: torch.Tensor, labels: list[int] | None, device) -> dict:
    grey = torch.from_numpy(to_uint8(images)).movedim(-1, 1).float().mean(1, keepdim=True).round().to(torch.uint8)
    logits, feats = classify(classifier, grey, 64, device)
    return digit_record(logits, feats, labels)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--factors", default="0,0.5,1,1.7,3")
    ap.add_argument("--kernel", default="rbf", choices=["rbf", "classifier"])
    ap.add_argument("--batches", type=int, default=25)
    ap.add_argument("--sampler", default="heun")
    ap.add_argument("--steps", type=int, default=18)
    ap.add_argument("--checkpoint", default=str(SHIPPED_CHECKPOINT))
    ap.add_argument("--device", default=None)
    ap.add_argument("--smoke", action="store_true", help="tiny settings: only checks that the script runs")
    args = ap.parse_args()
    if args.smoke:  # tests/test_benchmarks.py; options given on the command line still win
        ap.set_defaults(factors="0,1", batches=1, steps=2)
        args = ap.parse_args()
    device = pick_device(args.device)
    model, meta = load_model(args.checkpoint, device)
    classifier = load_classifier(device=device)
    kernel = make_kernel(args.kernel, classifier)
    rows = []
    start = time.time()
    for factor in (float(f) for f in args.factors.split(",")):
        modes, sims, correct, total = [], [], 0, 0
        for b in range(args.batches):
            cfg = PGConfig(n=8, seed=8 * b, sampler=args.sampler, steps=args.steps, kernel=args.kernel)
            rec = judge(classifier, sample_digits(model, meta, cfg, factor, kernel, device), None, device)
            modes.append(rec["modes_discovered"])
            sims.append(rec["mean_similarity"])
            labels = [(8 * b + i) % 10 for i in range(8)]
            cfg.labels = ",".join(map(str, labels))
            rec = judge(classifier, sample_digits(model, meta, cfg, factor, kernel, device), labels, device)
            correct, total = correct + round(rec["accuracy"] * 8), total + 8
        rows.append((factor, sum(modes) / len(modes), sum(sims) / len(sims), correct / total))
    print(f"PG on the shipped model, kernel {args.kernel}, {args.sampler} {args.steps} steps, "
          f"{args.batches} unlabelled + {args.batches} labelled batches of 8 per factor ({time.time() - start:.0f} s)\n")
    print("| pg factor | modes discovered (of 8) | mean in-batch similarity | class accuracy |")
    print("| ---: | ---: | ---: | ---: |")
    for factor, m, s, a in rows:
        print(f"| {factor:g} | {m:.2f} | {s:.4f} | {a:.3f} |")


if __name__ == "__main__":
    main()
