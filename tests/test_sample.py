"""Sampling a diffcli checkpoint: determinism, batch-size invariance, labels, CFG, strip and run.json."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import call_cli, run_torchrun
from diffcli.backends.models import load_model
from diffcli.drawing import sample_images
from diffcli.sample import SampleConfig


def test_same_seed_same_bytes(tmp_path, tiny_run):
    for name in ("a", "b"):
        call_cli("sample", "--checkpoint", tiny_run, "--n", 4, "--steps", 3, "--sampler", "stochastic_heun",
                "--seed", 7, "--out", tmp_path / name, "--device", "cpu", check=True)
    files = sorted(p.name for p in (tmp_path / "a").glob("*.png"))
    assert len(files) == 5  # 4 samples + grid
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f


@pytest.mark.parametrize("sampler", ["heun", "stochastic_heun", "ddim", "dpmpp_2m_sde", "dpmpp_sde"])
def test_sample_i_does_not_depend_on_batch_size(tiny_run, sampler):
    model, meta = load_model(tiny_run)
    base = dict(n=5, steps=4, sampler=sampler, eta=1.0, seed=11)
    whole, labels, _ = sample_images(model, meta, SampleConfig(**base, batch_size=5), torch.device("cpu"))
    ones, labels1, _ = sample_images(model, meta, SampleConfig(**base, batch_size=1), torch.device("cpu"))
    pairs, _, _ = sample_images(model, meta, SampleConfig(**base, batch_size=2), torch.device("cpu"))
    assert labels == labels1 == [0, 1, 2, 0, 1]
    assert torch.allclose(whole, ones, atol=1e-5) and torch.allclose(whole, pairs, atol=1e-5)
    other, _, _ = sample_images(model, meta, SampleConfig(**{**base, "seed": 12}, batch_size=5), torch.device("cpu"))
    assert not torch.allclose(whole, other)


def test_cfg_scale_changes_samples_and_one_is_conditional(tiny_run):
    model, meta = load_model(tiny_run)
    dev = torch.device("cpu")
    plain, _, _ = sample_images(model, meta, SampleConfig(n=3, steps=3), dev)
    one, _, _ = sample_images(model, meta, SampleConfig(n=3, steps=3, cfg=1.0), dev)
    two, _, _ = sample_images(model, meta, SampleConfig(n=3, steps=3, cfg=3.0), dev)
    assert torch.equal(plain, one) and not torch.allclose(plain, two)


def test_outputs_labels_strip_and_run_json(tmp_path, tiny_run):
    out = tmp_path / "s"
    call_cli("sample", "--checkpoint", tiny_run, "--n", 4, "--labels", "2,0", "--steps", 3, "--cfg", 2,
            "--strip", "--out", out, check=True)
    names = sorted(p.name for p in out.glob("0*.png"))
    assert names == ["00000-seed0-label2.png", "00001-seed1-label0.png", "00002-seed2-label2.png",
                     "00003-seed3-label0.png"]
    from PIL import Image
    strip = Image.open(out / "strip.png")
    # 4 rows (samples) x (3 steps + final) columns of 8 px images with 2 px padding
    assert strip.size == (2 + 4 * 10, 2 + 4 * 10)
    record = json.loads((out / "run.json").read_text())
    assert record["command"] == "sample" and record["options"]["cfg"] == 2.0 and record["options"]["seed"] == 0
    assert {"diffcli", "torch", "diffusers"} <= set(record["versions"]) and record["device"] == "cpu"
    assert [s["label"] for s in record["samples"]] == [2, 0, 2, 0]


def test_unconditional_model_samples(tmp_path, tiny_uncond_run):
    out = tmp_path / "u"
    call_cli("sample", "--checkpoint", tiny_uncond_run, "--n", 3, "--steps", 2, "--out", out, check=True)
    assert sorted(p.name for p in out.glob("0*.png")) == ["00000-seed0.png", "00001-seed1.png", "00002-seed2.png"]


def test_resume_fills_in_what_an_interrupted_run_left_identically(tiny_run, tmp_path):
    args = ("sample", "--checkpoint", tiny_run, "--n", "6", "--steps", "3", "--sampler", "stochastic_heun",
            "--batch-size", "4", "--device", "cpu")
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    call_cli(*args, "--out", whole, check=True)
    call_cli(*args, "--out", cut, check=True)
    gone = sorted(cut.glob("0000[235]-*.png"))
    for f in gone + [cut / "grid.png"]:
        f.unlink()  # what a kill after the first batch leaves (files appear atomically, one by one)
    proc = call_cli(*args, "--batch-size", "2", "--out", cut, "--resume", check=True)
    assert "3 already there" in proc.stdout
    for f in sorted(whole.glob("*.png")):
        assert (cut / f.name).read_bytes() == f.read_bytes(), f.name


@pytest.mark.parametrize("change,message", [(("--steps", "4"), "steps: 3 -> 4"), (("--out", "elsewhere"), "no run.json")])
def test_resume_refuses_other_options_or_no_run(tiny_run, tmp_path, change, message):
    out = tmp_path / "run"
    base = ("sample", "--checkpoint", tiny_run, "--n", "2", "--steps", "3", "--device", "cpu")
    call_cli(*base, "--out", out, check=True)
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    args = [*base, "--out", out, "--resume", *change]
    if change[0] == "--out":
        args = [*base, "--resume", "--out", tmp_path / change[1]]
    proc = call_cli(*args)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], proc.stderr
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before


def test_two_ranks_write_the_same_files_as_one(tiny_run, tmp_path):
    args = ("sample", "--checkpoint", str(tiny_run), "--n", "5", "--steps", "3", "--batch-size", "2", "--device", "cpu")
    one, two = tmp_path / "one", tmp_path / "two"
    call_cli(*args, "--out", one, check=True)
    proc = run_torchrun(*args, "--out", two, port=29531)
    assert proc.stdout.count("wrote 5 samples") == 1  # one merged report, from rank 0
    pngs = sorted(f.name for f in one.glob("*.png"))
    assert pngs == sorted(f.name for f in two.glob("*.png")) and len(pngs) == 6
    for name in pngs:
        assert (one / name).read_bytes() == (two / name).read_bytes(), name
    rec = json.loads((two / "run.json").read_text())
    assert rec["world_size"] == 2 and rec["status"] == "complete" and len(rec["samples"]) == 5
