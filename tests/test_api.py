"""The Python API: the README's examples run as written (the pipeline one on a tiny SD), and `import diffcli` names
what it promises."""
from __future__ import annotations

import re

import pytest
import torch

import diffcli as dc
from conftest import ROOT


def readme_examples() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Python API", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def test_readme_has_two_python_examples():
    assert len(readme_examples()) == 2


def test_shipped_model_example_with_cfg_and_pg():
    scope: dict = {}
    exec(readme_examples()[0], scope)
    digits = scope["digits"]
    assert digits.shape == (8, 1, 28, 28) and digits.abs().max() <= 1
    assert len({d.numpy().tobytes() for d in digits}) == 8  # eight different particles


def test_pipeline_example_with_seg_pg_and_dpmpp(tiny_sd):
    code = readme_examples()[1]
    code, n = re.subn(r"^MODEL, SIZE, STEPS = .*$", f"MODEL, SIZE, STEPS = {str(tiny_sd)!r}, 16, 3", code, flags=re.M)
    assert n == 1
    scope: dict = {}
    exec(code, scope)
    images = scope["images"]
    assert images.shape == (4, 3, 16, 16) and torch.isfinite(images).all()
    assert not any(type(p).__name__ == "SegAttnProcessor" for p in scope["pipe"].unet.attn_processors.values())


def test_every_promised_name_resolves_and_unknown_names_fail():
    for name in dc.__all__:
        assert getattr(dc, name) is not None, name
    with pytest.raises(AttributeError):
        dc.no_such_thing  # noqa: B018
    assert issubclass(dc.DiffcliError, ValueError)
    assert set(dc.SAMPLERS) >= {"euler", "heun", "stochastic_heun", "ddim", "euler_ancestral", "dpmpp_2m"}
