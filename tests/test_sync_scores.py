"""`diffcli eval --app regions|seam` on panorama folders written by hand: each region's crop against its prompt
(checked with open_clip directly), the seam figure (checked by hand), and the one-line refusals."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import call_cli

open_clip = pytest.importorskip("open_clip")


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from pipes import build_tiny_clip
    d = tmp_path_factory.mktemp("clip")
    config, _, model = build_tiny_clip(d, "tinyclip-synctest", seed=1)
    torch.save(model.state_dict(), d / "tiny.bin")
    model, _, preprocess = open_clip.create_model_and_transforms("tinyclip-synctest", pretrained=str(d / "tiny.bin"))
    return config, d / "tiny.bin", model.eval(), preprocess, open_clip.get_tokenizer("tinyclip-synctest")


def write_panorama(tmp_path, regions):
    folder = tmp_path / "pano"
    folder.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (32, 64, 3), dtype=np.uint8)).save(folder / "a_beach.png")
    record = {"command": "panorama", "prompts": [{"prompt": "a beach", "eval_pos": [], "stem": "a_beach",
                                                 "regions": regions}]}
    (tmp_path / "pano.run.json").write_text(json.dumps(record))
    return folder


def test_region_clip_scores(tmp_path, tiny_clip):
    config, weights, model, preprocess, tokenizer = tiny_clip
    mask = np.zeros((32, 64), dtype=np.uint8)
    mask[4:20, 40:60] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    folder = write_panorama(tmp_path, [{"prompt": "a red ball", "region": "0,0,24,16"},
                                       {"prompt": "a tree", "region": str(tmp_path / "mask.png")}])
    call_cli("eval", folder, "--app", "regions", "--clip-model", config, "--clip-pretrained", weights, check=True)
    got = json.loads((folder / "eval.json").read_text())["regions"]
    image = Image.open(folder / "a_beach.png").convert("RGB")
    want = []
    for box, prompt in (((0, 0, 24, 16), "a red ball"), ((40, 4, 60, 20), "a tree")):
        with torch.no_grad():
            e = model.encode_image(preprocess(image.crop(box))[None])
            t = model.encode_text(tokenizer([prompt]))
        want.append(torch.cosine_similarity(e, t).item())
    assert [r["box"] for r in got["regions"]] == [[0, 0, 24, 16], [40, 4, 60, 20]]
    assert [r["clip"] for r in got["regions"]] == pytest.approx(want, abs=2e-5)
    assert got["score"] == pytest.approx(sum(want) / 2, abs=2e-5)


def test_seam_figure(tmp_path):
    folder = tmp_path / "seam"
    folder.mkdir()
    cols = np.arange(64)
    smooth = (127 + 100 * np.sin(2 * math.pi * cols / 64)).astype(np.uint8)  # one period: wraps smoothly
    ramp = (cols * 4).astype(np.uint8)                                      # 0..252: a jump at the join
    for name, row in (("smooth.png", smooth), ("ramp.png", ramp)):
        Image.fromarray(np.repeat(np.tile(row, (16, 1))[..., None], 3, -1)).save(folder / name)
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(folder / "ramp_0.png")  # a crop: not a panorama
    call_cli("eval", folder, "--app", "seam", check=True)
    got = json.loads((folder / "eval.json").read_text())["seam"]
    assert set(got["images"]) == {"smooth.png", "ramp.png"}
    assert got["images"]["ramp.png"]["join"] == pytest.approx(252 / 255) and \
        got["images"]["ramp.png"]["inside"] == pytest.approx(4 / 255)
    assert got["images"]["ramp.png"]["ratio"] == pytest.approx(63)
    assert got["images"]["smooth.png"]["ratio"] < 2


def test_refusals(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = call_cli("eval", tmp_path / "empty", "--app", "regions")
    assert proc.returncode != 0 and "run record" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    proc = call_cli("eval", tmp_path / "empty", "--app", "seam")
    assert proc.returncode != 0 and "no panorama" in proc.stderr
    folder = write_panorama(tmp_path, [])
    proc = call_cli("eval", folder, "--app", "regions")
    assert proc.returncode != 0 and "records no region prompts" in proc.stderr
    proc = call_cli("eval", folder, "--app", "nope")
    assert proc.returncode != 0 and "regions or seam" in proc.stderr
