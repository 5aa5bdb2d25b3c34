"""Outputs that carry their settings: every PNG diffcli writes holds its generation settings in PNG text chunks
(`diffcli` JSON, `parameters` in the A1111 style); `diffcli info IMAGE` prints them and `diffcli rerun IMAGE`
reproduces that one image."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from conftest import invoke_cli


def ok(capsys, *args):
    code, out, err = invoke_cli([str(a) for a in args], capsys)
    assert code == 0, err
    return out, err


def chunks(path):
    with Image.open(path) as im:
        im.load()
        return dict(im.text)


def pixels(path):
    with Image.open(path) as im:
        return im.mode, np.asarray(im).copy()


@pytest.fixture(scope="module")
def digits(tmp_path_factory, tiny_run):
    """A small run of the tiny model: 10 samples, two network groups of 8 on a CPU."""
    out = tmp_path_factory.mktemp("settings") / "digits"
    from conftest import call_cli
    call_cli("sample", "--checkpoint", tiny_run, "--n", "10", "--steps", "2", "--labels", "1,2", "--seed", "5",
             "--sampler", "euler_ancestral", "--out", out, "--device", "cpu", check=True)
    return out


def test_samples_and_figures_carry_their_settings(digits, tiny_run):
    text = chunks(digits / "00003-seed8-label2.png")
    settings = json.loads(text["diffcli"])
    assert settings["command"] == "sample" and settings["argv"][:2] == ["diffcli", "sample"]
    assert "--out" not in settings["argv"] and "out" not in settings["options"]  # where it went is no setting
    assert settings["file"] == "00003-seed8-label2.png" and settings["device"] == "cpu"
    assert settings["image"] == {"index": 3, "seed": 8, "label": 2, "rerun": ["--n", "8"]}
    assert settings["options"]["sampler"] == "euler_ancestral" and settings["options"]["steps"] == 2
    assert settings["diffcli"] == settings["versions"]["diffcli"]
    assert "Steps: 2, Sampler: euler_ancestral, Seed: 8, Label: 2, Size: 8x8" in text["parameters"]
    grid = json.loads(chunks(digits / "grid.png")["diffcli"])
    assert grid["file"] == "grid.png" and "image" not in grid  # a figure: the run's settings only


def test_info_prints_an_images_settings(digits, tmp_path, capsys):
    out, _ = ok(capsys, "info", digits / "00009-seed14-label2.png")
    assert "command line: diffcli sample --checkpoint" in out and "seed: 14" in out and "label: 2" in out
    assert "parameters: Steps: 2, Sampler: euler_ancestral, Seed: 14" in out
    Image.new("RGB", (4, 4)).save(tmp_path / "plain.png")
    out, _ = ok(capsys, "info", tmp_path / "plain.png")
    assert out.strip() == f"{tmp_path / 'plain.png'}: no diffcli settings (not written by diffcli, or by a diffcli " \
                          "that did not record them)"
    (tmp_path / "cut.png").write_bytes((digits / "grid.png").read_bytes()[:60])
    (tmp_path / "text.png").write_text("not a picture")
    for bad in ("cut.png", "text.png", "missing.png"):
        code, out, err = invoke_cli(["info", str(tmp_path / bad)], capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("error: "), err


def test_rerun_image_reproduces_that_one_image(digits, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out, err = ok(capsys, "rerun", digits / "00002-seed7-label1.png", "--out", "again")
    assert "--n 8" in err.splitlines()[0]  # only as far as the image's network group
    again = tmp_path / "again" / "00002-seed7-label1.png"
    assert pixels(again)[0] == pixels(digits / "00002-seed7-label1.png")[0]
    assert np.array_equal(pixels(again)[1], pixels(digits / "00002-seed7-label1.png")[1])
    assert "the same pixels" in out and not (tmp_path / "again" / "00008-seed13-label1.png").exists()
    # its settings say how it was drawn again: the same sample of a run cut after its network group
    settings = json.loads(chunks(again)["diffcli"])
    assert settings["image"]["seed"] == 7 and settings["options"]["n"] == 8


def test_rerun_image_refuses_what_it_cannot_replay(digits, tmp_path, capsys):
    Image.new("RGB", (4, 4)).save(tmp_path / "plain.png")
    code, _, err = invoke_cli(["rerun", str(tmp_path / "plain.png")], capsys)
    assert code == 2 and "carries no diffcli settings" in err
    from PIL.PngImagePlugin import PngInfo
    for name, text in (("deep.png", "[" * 100000 + "]" * 100000), ("big.png", json.dumps({"x": "a" * (1 << 20)})),
                       ("bad.png", "{not json"), ("noargv.png", json.dumps({"command": "sample"}))):
        info = PngInfo()
        info.add_text("diffcli", text)
        Image.new("RGB", (4, 4)).save(tmp_path / name, pnginfo=info)
        for command in ("rerun", "info"):
            code, _, err = invoke_cli([command, str(tmp_path / name)], capsys)
            assert code == 2 and len(err.strip().splitlines()) == 1 and "internal error" not in err, (name, err)


def test_a_pipeline_image_carries_its_prompt_and_reruns(tiny_sd, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ok(capsys, "seg", "a red barn", "--model", tiny_sd, "--steps", "2", "--n", "2", "--width", "32",
       "--blur", "gaussian_-1_2", "--guidance", "3", "--out", "barn", "--device", "cpu")
    image = tmp_path / "barn" / "a_red_barn_seed1.png"
    settings = json.loads(chunks(image)["diffcli"])
    assert settings["image"] == {"index": 1, "seed": 1, "prompt": "a red barn", "blur": "gaussian_-1_2"}
    assert chunks(image)["parameters"].startswith("a red barn\nSteps: 2, ")
    assert "CFG scale: 3.0, Seed: 1, Size: 32x" in chunks(image)["parameters"]
    out, _ = ok(capsys, "info", image)
    assert "prompt: a red barn" in out
    out, _ = ok(capsys, "rerun", image)  # default: beside the run's folder
    again = tmp_path / "barn-a_red_barn_seed1-rerun" / "a_red_barn_seed1.png"
    assert f"{again}: the same pixels as {image}" in out
    assert np.array_equal(pixels(again)[1], pixels(image)[1])
