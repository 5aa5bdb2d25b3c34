"""Read the two MNIST parts the benchmarks use, from a data folder (default: data/ in the repository; scripts take
--data-root). t10k: the official test set, torchvision's layout, downloaded there by torchvision where a network
exists. heldout_5k: `mnist_5k.csv.gz`, 5,000 training-set digits (500 a class; a row = 784 pixels, then the label),
which nothing downloads: put it in the folder yourself. Neither is needed to run diffcli."""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch

from diffcli.data.datasets import load_dataset

DEFAULT_ROOT = Path(__file__).resolve().parent.parent / "data"


def t10k(root: Path = DEFAULT_ROOT) -> tuple[torch.Tensor, torch.Tensor]:
    """The official 10k test images (the split the shipped models train on): uint8 (N,1,28,28), labels."""
    ds = load_dataset("mnist", root, "test")
    return ds.images, ds.labels


def heldout_5k(root: Path = DEFAULT_ROOT) -> tuple[torch.Tensor, torch.Tensor]:
    """5,000 training-set images, 500 a class: held out from all training, the reference set."""
    with gzip.open(root / "mnist_5k.csv.gz", "rt") as f:
        rows = np.loadtxt(f, delimiter=",", dtype=np.int64)
    images = torch.from_numpy(rows[:, :784].astype(np.uint8)).reshape(-1, 1, 28, 28)
    return images, torch.from_numpy(rows[:, 784])
