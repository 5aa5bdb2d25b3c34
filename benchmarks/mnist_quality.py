"""Class accuracy of a digit model's samples under the shipped classifier, for several samplers and CFG scales.

    python benchmarks/mnist_quality.py --checkpoint checkpoints/mnist-edm.safetensors --per-class 100

Samples are drawn with `diffcli sample`'s own function (seeds 0..n-1, labels cycling 0-9). Prints a Markdown table.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from diffcli.backends.classifier import SHIPPED_CLASSIFIER, load_classifier  # noqa: E402
from diffcli.backends.models import load_model  # noqa: E402
from diffcli.drawing import sample_images  # noqa: E402
from diffcli.sample import SHIPPED_CHECKPOINT, SampleConfig  # noqa: E402
from diffcli.core.samplers import nfe  # noqa: E402

CONFIGS = [("heun", 18, None), ("heun", 18, 2.0), ("euler", 35, None), ("stochastic_heun", 18, None),
           ("heun", 9, None), ("heun", 9, 2.0)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", default=str(SHIPPED_CHECKPOINT))
    ap.add_argument("--classifier", default=str(SHIPPED_CLASSIFIER))
    ap.add_argument("--per-class", type=int, default=100)
    ap.add_argument("--configs", default=None, help="sampler:steps:cfg,... (cfg '-' for none)")
    ap.add_argument("--smoke", action="store_true", help="tiny settings: only checks that the script runs")
    args = ap.parse_args()
    if args.smoke:  # tests/test_benchmarks.py; options given on the command line still win
        ap.set_defaults(per_class=1, configs="heun:2:-,euler:2:2")
        args = ap.parse_args()
    configs = CONFIGS
    if args.configs:
        configs = [(s, int(n), None if c == "-" else float(c)) for s, n, c in (t.split(":") for t in args.configs.split(","))]
    model, meta = load_model(args.checkpoint)
    clf = load_classifier(args.classifier)
    n = args.per_class * meta["num_classes"]
    print(f"model {args.checkpoint} (step {meta.get('train_step')}), {n} samples per row, seeds 0..{n - 1}\n")
    print("| sampler | steps | NFE | CFG w | class accuracy | seconds |")
    print("|---|---|---|---|---|---|")
    for sampler, steps, cfg in configs:
        t0 = time.time()
        images, labels, _ = sample_images(model, meta, SampleConfig(n=n, steps=steps, sampler=sampler, cfg=cfg,
                                                                    batch_size=250), torch.device("cpu"))
        with torch.no_grad():
            pred = torch.cat([clf(images[i:i + 500]).argmax(1) for i in range(0, n, 500)])
        acc = (pred == torch.tensor(labels)).float().mean().item()
        print(f"| {sampler} | {steps} | {nfe(sampler, steps)} | {cfg if cfg is not None else '1 (none)'} | "
              f"{100 * acc:.1f} % | {time.time() - t0:.0f} |", flush=True)


if __name__ == "__main__":
    main()
