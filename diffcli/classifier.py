"""A small digit classifier: judges class-conditional samples (accuracy, modes) and gives features for FID.

Shipped as checkpoints/mnist-classifier.safetensors; benchmarks/train_digit_classifier.py retrains it.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .common import DiffcliError, load_checkpoint

SHIPPED_CLASSIFIER = Path(__file__).resolve().parent.parent / "checkpoints" / "mnist-classifier.safetensors"


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
