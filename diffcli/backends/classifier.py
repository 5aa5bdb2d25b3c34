"""A small digit classifier: judges class-conditional samples (accuracy, modes) and gives features for FID; and
digit images read for it (greyscale uint8, 28x28).

Shipped as checkpoints/mnist-classifier.safetensors; benchmarks/train_digit_classifier.py retrains it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..shared.errors import DiffcliError
from ..shared.checkpoints import load_checkpoint
from ..shared.images import read_image, to_model_range

from ..shared.shipped import SHIPPED_CLASSIFIER  # every shipped path is in shipped.py


class DigitNet(nn.Module):
    """28x28 greyscale in [-1, 1] -> 10 logits; `features` is the 128-d penultimate layer."""

    def __init__(self, width: int = 32, num_classes: int = 10):
        super().__init__()
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(),
            nn.Conv2d(w, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Dropout(0.3), nn.Linear(2 * w * 7 * 7, 128), nn.ReLU(),
        )
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(128, num_classes))
        self.width = width

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (28, 28):
            x = nn.functional.interpolate(x, size=(28, 28), mode="bilinear", antialias=True, align_corners=False)
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def load_classifier(path: str | Path = SHIPPED_CLASSIFIER, device: str | torch.device = "cpu") -> DigitNet:
    tensors, meta = load_checkpoint(path)
    record = meta.get("classifier")
    if not record:
        raise DiffcliError(f"{path} holds no digit classifier")
    net = DigitNet(width=record["width"], num_classes=record["num_classes"])
    net.load_state_dict(tensors)
    return net.to(device).eval().requires_grad_(False)


# ---------------------------------------------------------------- digits in, logits and features out

def read_digit(path: str, size: int = 28) -> np.ndarray:
    """Greyscale uint8 (size,size); other sizes are resized (bilinear) for the classifier."""
    im, _ = read_image(path, mode="L")
    if im.size != (size, size):
        im = im.resize((size, size), Image.BILINEAR)
    return np.asarray(im)


def stack_digits(arrays: Sequence[np.ndarray]) -> torch.Tensor:
    """(size,size) uint8 arrays -> (N,1,size,size) uint8."""
    return torch.from_numpy(np.stack(arrays))[:, None]


def load_digits(files: Sequence[str], size: int = 28) -> torch.Tensor:
    """Greyscale uint8 (N,1,size,size); other sizes are resized (bilinear) for the classifier."""
    return stack_digits([read_digit(f, size) for f in files])


@torch.inference_mode()
def classify(classifier: DigitNet, images: torch.Tensor, batch_size: int,
             device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 digits -> (logits, 128-d penultimate features)."""
    logits, feats = [], []
    for i in range(0, len(images), batch_size):
        f = classifier.features(to_model_range(images[i:i + batch_size].to(device)))
        feats.append(f.cpu())
        logits.append(classifier.head(f).cpu())
    return torch.cat(logits), torch.cat(feats)
