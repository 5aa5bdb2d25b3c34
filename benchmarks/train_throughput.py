"""Training images/s of the shipped net on this machine: fp32 against bf16 autocast, in one run.

    python benchmarks/train_throughput.py [--net small] [--batch 64] [--steps 8]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from diffcli.backends.models import build_edm  # noqa: E402
from diffcli.backends.nets import count_params, net_config  # noqa: E402
from diffcli.train import EDMLoss  # noqa: E402


def images_per_s(model, batch: int, steps: int, autocast: torch.dtype | None) -> float:
    loss_fn = EDMLoss()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 1, 28, 28) * 2 - 1
    y = torch.randint(0, 10, (batch,))
    t0 = 0.0
    for i in range(steps + 2):
        if i == 2:
            t0 = time.perf_counter()
        sigma, noise = loss_fn.draw(batch, (1, 28, 28), gen)
        with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
            loss = loss_fn(model, x, sigma, noise, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return batch * steps / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--net", default="small")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--smoke", action="store_true", help="tiny settings: only checks that the script runs")
    args = ap.parse_args()
    if args.smoke:  # tests/test_benchmarks.py; options given on the command line still win
        ap.set_defaults(net="tiny", batch=2, steps=1)
        args = ap.parse_args()
    record = {"net": net_config(args.net, 28, 1, 10), "sigma_data": 0.5, "num_classes": 10}
    torch.manual_seed(0)
    model = build_edm(record)
    print(f"net {args.net} ({count_params(model) / 1e6:.2f}M params), batch {args.batch}, "
          f"torch threads {torch.get_num_threads()}")
    fp32 = images_per_s(model, args.batch, args.steps, None)
    bf16 = images_per_s(model, args.batch, args.steps, torch.bfloat16)
    print(f"fp32 {fp32:.1f} img/s   bf16-autocast {bf16:.1f} img/s   bf16/fp32 {bf16 / fp32:.2f}")


if __name__ == "__main__":
    main()
