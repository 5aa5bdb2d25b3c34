"""The installed app: seven commands, examples in help, the shipped checkpoints load and sample."""
from __future__ import annotations

import pytest
import torch

from conftest import call_cli, run_cli
from diffcli.backends.classifier import SHIPPED_CLASSIFIER, load_classifier
from diffcli.backends.models import load_model
from diffcli.drawing import sample_images
from diffcli.sample import SHIPPED_CHECKPOINT, SampleConfig

SHIPPED_BLURRING = SHIPPED_CHECKPOINT.parent / "mnist-blurring.safetensors"

COMMANDS = ("train", "sample", "seg", "panorama", "anagram", "pg", "eval")


def test_help_lists_all_commands():
    proc = run_cli("--help", check=True)
    for name in COMMANDS:
        assert name in proc.stdout


@pytest.mark.parametrize("name", ["train", "sample", "seg", "panorama", "anagram", "pg", "eval", "info"])
def test_command_help_shows_example(name):
    assert "Example: diffcli " + name in call_cli(name, "--help", check=True).stdout


def test_shipped_model_loads_and_samples_digits():
    model, meta = load_model(SHIPPED_CHECKPOINT)
    assert meta["num_classes"] == 10 and meta["image_size"] == 28 and meta["channels"] == 1
    assert SHIPPED_CHECKPOINT.stat().st_size < 20e6
    images, labels, _ = sample_images(model, meta, SampleConfig(n=10, steps=10), torch.device("cpu"))
    assert images.shape == (10, 1, 28, 28) and labels == list(range(10))
    # the shipped classifier reads the shipped model's digits as the labels they were drawn for
    clf = load_classifier(SHIPPED_CLASSIFIER)
    with torch.no_grad():
        pred = clf(images).argmax(1)
    assert (pred == torch.tensor(labels)).float().mean() >= 0.8, pred.tolist()


def test_shipped_blurring_model_loads_and_samples_digits():
    """The blurring-diffusion twin (sigma_B,max 20) samples through its own 100-step reverse process."""
    model, meta = load_model(SHIPPED_BLURRING, kinds=("edm", "blurring"))
    assert meta["kind"] == "blurring" and meta["blur_sigma_max"] == 20.0 and meta["num_classes"] == 10
    assert SHIPPED_BLURRING.stat().st_size < 20e6
    images, labels, _ = sample_images(model, meta, SampleConfig(checkpoint=str(SHIPPED_BLURRING), n=10),
                                      torch.device("cpu"))
    assert images.shape == (10, 1, 28, 28) and labels == list(range(10))
    with torch.no_grad():
        pred = load_classifier(SHIPPED_CLASSIFIER)(images).argmax(1)
    assert (pred == torch.tensor(labels)).float().mean() >= 0.8, pred.tolist()
