"""Model families behind one interface (`diffcli.backends.family`): commands and options ask the family, never
the network; each loaded pipeline or model gets the family its type says."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import diffcli
from diffcli.backends import pipelines
from diffcli.backends.deepfloyd import DeepFloydIF, DeepFloydIFSuperResolution
from diffcli.backends.edm import DiffcliModel
from diffcli.backends.family import Family
from diffcli.backends.stable_diffusion import StableDiffusion, StableDiffusionXL
from diffcli.shared.errors import DiffcliError
from diffcli.shared.shipped import SHIPPED_MODEL

PACKAGE = Path(diffcli.__file__).parent
COMMANDS = ("seg.py", "panorama.py", "anagram.py", "pg.py", "sample.py", "options.py")
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny_if(tmp_path_factory):
    from pipes import build_tiny_if
    return build_tiny_if(tmp_path_factory.mktemp("tiny-if"))


@pytest.mark.parametrize("name", COMMANDS)
def test_commands_never_reach_into_a_network(name):
    """Sizes, memory and attention layers come from the family object: no `.unet` / `.transformer` in a command."""
    text = (PACKAGE / name).read_text(encoding="utf-8")
    found = [f"{name}:{n}: {line.strip()}" for n, line in enumerate(text.splitlines(), 1)
             if re.search(r"\.(unet|transformer)\b", line)]
    assert not found, "\n".join(found)


def test_each_pipeline_gets_its_family(tiny_sd, tiny_sdxl):
    sd = pipelines.load_family(str(tiny_sd), CPU, torch.float32)
    xl = pipelines.load_family(str(tiny_sdxl), CPU, torch.float32)
    assert type(sd) is StableDiffusion and type(xl) is StableDiffusionXL
    assert (sd.name, xl.name, sd.kind) == ("sd", "sdxl", type(sd.pipe).__name__)
    assert pipelines.pipeline_family(sd) is sd and type(pipelines.pipeline_family(sd.pipe)) is StableDiffusion
    assert sd.native_size() == pipelines.default_size(sd.pipe) and sd.attention is sd.pipe.unet
    assert sd.latent_shape(16, 32) == (sd.pipe.unet.config.in_channels, 16 // sd.scale_factor, 32 // sd.scale_factor)
    with pytest.raises(DiffcliError, match=r"^--width 18: this model needs a positive multiple of \d+ px$"):
        sd.check_size(16, 18, ("--height", "--width"))
    assert sd.layers(["mid"]) and not sd.pixel_space


def test_if_stages_get_their_families(tiny_if):
    stage1, stage2 = tiny_if
    one = pipelines.load_family(str(stage1), CPU, torch.float32)
    two = pipelines.load_family(str(stage2), CPU, torch.float32, text_encoder=None)
    assert type(one) is DeepFloydIF and type(two) is DeepFloydIFSuperResolution
    assert one.pixel_space and (one.stage, two.stage) == (1, 2) and one.scale_factor == 1
    assert two.upscale(one) == two.native_size() // one.native_size()


def test_our_models_are_a_family():
    ours = pipelines.load_family(str(SHIPPED_MODEL), CPU, torch.float32, checkpoint=True)
    assert isinstance(ours, DiffcliModel) and isinstance(ours, Family) and DiffcliModel.matches(ours.model)
    assert ours.name == "edm" and ours.attention is ours.model.net.unet
    size = ours.native_size()
    assert ours.latent_shape(size, size) == (ours.meta["channels"], size, size)
    sigmas = ours.sigmas(4, CPU)
    assert sigmas[0] == pytest.approx(ours.meta["sigma_max"]) and sigmas[-1] == 0
    with pytest.raises(DiffcliError, match="takes no prompts"):
        ours.encode_prompts(["a cat"], None, size, size)
    with pytest.raises(DiffcliError, match="needs at least"):
        ours.check_memory(10 ** 9, size, size, torch.float32, CPU, "a batch", "lower --n")
