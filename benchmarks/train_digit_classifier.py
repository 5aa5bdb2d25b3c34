"""Train the shipped digit classifier on the 10k MNIST test images; report accuracy on the held-out 5k.

    python benchmarks/train_digit_classifier.py --out checkpoints/mnist-classifier.safetensors

Small random shifts/rotations as augmentation; Adam with a cosine schedule; BatchNorm in eval mode at the end.
"""
from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.mnist_data import DEFAULT_ROOT, heldout_5k, t10k  # noqa: E402
from diffcli.backends.classifier import DigitNet  # noqa: E402
from diffcli.shared.checkpoints import save_checkpoint  # noqa: E402
from diffcli.shared.images import to_model_range  # noqa: E402


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random affine: rotation +-12 deg, scale 0.9-1.1, shift +-2 px."""
    n = x.shape[0]
    ang = (torch.rand(n, generator=gen) * 2 - 1) * math.radians(12)
    scale = 0.9 + 0.2 * torch.rand(n, generator=gen)
    shift = (torch.rand(n, 2, generator=gen) * 2 - 1) * (2 / 14)
    cos, sin = torch.cos(ang) / scale, torch.sin(ang) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, padding_mode="border", align_corners=False)


@torch.no_grad()
def accuracy(net: DigitNet, images: torch.Tensor, labels: torch.Tensor) -> float:
    net.eval()
    pred = torch.cat([net(to_model_range(images[i:i + 500])).argmax(1) for i in range(0, len(images), 500)])
    return (pred == labels).float().mean().item()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-root", type=Path, default=DEFAULT_ROOT)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--out", type=Path, default=Path("checkpoints/mnist-classifier.safetensors"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true", help="tiny settings: only checks that the script runs")
    args = ap.parse_args()
    if args.smoke:  # tests/test_benchmarks.py; options given on the command line still win
        ap.set_defaults(epochs=1, out=Path(tempfile.mkdtemp()) / "classifier.safetensors")
        args = ap.parse_args()
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    x_train, y_train = t10k(args.data_root)
    x_test, y_test = heldout_5k(args.data_root)
    net = DigitNet()
    steps_per_epoch = math.ceil(len(x_train) / 128)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=args.epochs * steps_per_epoch)
    t0 = time.time()
    for epoch in range(args.epochs):
        net.train()
        perm = torch.randperm(len(x_train), generator=gen)
        for i in range(0, len(perm), 128):
            idx = perm[i:i + 128]
            x = augment(to_model_range(x_train[idx]), gen)
            loss = F.cross_entropy(net(x), y_train[idx], label_smoothing=0.05)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        print(f"epoch {epoch + 1}: loss {loss.item():.3f}  held-out acc {accuracy(net, x_test, y_test):.4f}  "
              f"({time.time() - t0:.0f}s)", flush=True)
    acc = accuracy(net, x_test, y_test)
    record = {"classifier": {"width": net.width, "num_classes": 10, "train": "MNIST t10k (10,000 official test images)",
                             "heldout": "mnist_5k (5,000 training-set images, 500 a class)",
                             "heldout_accuracy": acc, "epochs": args.epochs, "seconds": round(time.time() - t0)}}
    save_checkpoint(args.out, net.state_dict(), record)
    print(f"held-out accuracy {acc:.4f}; wrote {args.out}")


if __name__ == "__main__":
    main()
