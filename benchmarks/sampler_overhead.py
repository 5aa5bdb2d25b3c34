"""Sampler overhead: wall time of a sampling run / (NFE x time of one network forward), in one run.

    python benchmarks/sampler_overhead.py [--checkpoint checkpoints/mnist-edm.safetensors] [--batch 16]

1.00 means the sampler adds nothing around the network. Measured through the same function `diffcli sample`
uses (per-sample generators, callbacks, CFG batching included).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from diffcli.backends.models import load_model  # noqa: E402
from diffcli.drawing import sample_images  # noqa: E402
from diffcli.sample import SHIPPED_CHECKPOINT, SampleConfig  # noqa: E402
from diffcli.core.samplers import nfe  # noqa: E402


def time_it(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", default=str(SHIPPED_CHECKPOINT))
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=18)
    ap.add_argument("--repeats", type=int, default=3, help="timed sampling runs per row (median)")
    ap.add_argument("--forward-repeats", type=int, default=10, help="timed network forwards per row (median)")
    ap.add_argument("--smoke", action="store_true", help="tiny settings: only checks that the script runs")
    args = ap.parse_args()
    if args.smoke:  # tests/test_benchmarks.py; options given on the command line still win
        ap.set_defaults(batch=2, steps=2, repeats=1, forward_repeats=1)
        args = ap.parse_args()
    model, meta = load_model(args.checkpoint)
    dev = torch.device("cpu")
    shape = (meta["channels"], meta["image_size"], meta["image_size"])
    print(f"torch threads {torch.get_num_threads()}, batch {args.batch}, {args.steps} steps")
    print(f"{'sampler':16s} {'cfg':>4s} {'NFE':>4s} {'forward ms':>10s} {'run s':>7s} {'ratio':>6s}")
    for sampler, cfg in [("euler", None), ("heun", None), ("stochastic_heun", None), ("heun", 2.0)]:
        rows = 2 * args.batch if cfg else args.batch
        x = torch.randn(rows, *shape)
        s = torch.full((rows,), 1.0)
        y = torch.arange(rows) % max(meta["num_classes"], 1)
        with torch.no_grad():
            t_fwd = time_it(lambda: model(x, s, y), args.forward_repeats)
        config = SampleConfig(n=args.batch, steps=args.steps, sampler=sampler, cfg=cfg, batch_size=args.batch)
        t_run = time_it(lambda: sample_images(model, meta, config, dev), args.repeats)
        k = nfe(sampler, args.steps)
        print(f"{sampler:16s} {cfg or '':>4} {k:4d} {t_fwd * 1e3:10.2f} {t_run:7.3f} {t_run / (k * t_fwd):6.3f}")


if __name__ == "__main__":
    main()
