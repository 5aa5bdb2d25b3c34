"""Shared IO: atomic writes, images/grids/GIFs, state flattening, per-sample generators."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from PIL import Image

from diffcli.shared.devices import PerSampleRandn
from diffcli.shared.files import atomic_path, write_json
from diffcli.shared.checkpoints import flatten_state, load_checkpoint, save_checkpoint, unflatten_state
from diffcli.shared.images import make_grid, save_gif, save_image


def test_atomic_write_keeps_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "f.json"
    write_json(target, {"v": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert target.read_text().strip().endswith("}") and '"v": 1' in target.read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]  # no temp file left behind


def test_image_grid_and_gif(tmp_path):
    x = torch.linspace(-1, 1, 4 * 3 * 5 * 6).reshape(4, 3, 5, 6)
    grid = make_grid(x, nrow=2, pad=1)
    assert grid.shape == (3, 1 + 2 * 6, 1 + 2 * 7)
    assert torch.equal(grid[:, 1:6, 1:7], x[0]) and torch.equal(grid[:, 7:12, 8:14], x[3])
    save_image(tmp_path / "a.png", x[0])
    arr = torch.from_numpy(__import__("numpy").asarray(Image.open(tmp_path / "a.png"))).permute(2, 0, 1)
    assert torch.equal(arr, ((x[0] + 1) * 127.5).round().to(torch.uint8))
    save_gif(tmp_path / "a.gif", list(x))
    assert Image.open(tmp_path / "a.gif").n_frames == 4


def test_state_flatten_roundtrip_through_safetensors(tmp_path):
    opt = torch.optim.Adam([torch.nn.Parameter(torch.randn(3))], lr=0.1)
    opt.param_groups[0]["params"][0].grad = torch.ones(3)
    opt.step()
    tensors, skel = flatten_state(opt.state_dict(), "optim")
    save_checkpoint(tmp_path / "s.safetensors", tensors, {"skel": skel})
    t2, meta = load_checkpoint(tmp_path / "s.safetensors")
    restored = unflatten_state(meta["skel"], t2)
    orig = opt.state_dict()
    assert restored["param_groups"] == orig["param_groups"]
    for k in ("step", "exp_avg", "exp_avg_sq"):
        assert torch.equal(restored["state"][0][k], orig["state"][0][k])


def test_per_sample_generators_do_not_depend_on_batch():
    whole = PerSampleRandn([5, 6, 7]).randn((2, 2))
    parts = torch.cat([PerSampleRandn([5]).randn((2, 2)), PerSampleRandn([6, 7]).randn((2, 2))])
    assert torch.equal(whole, parts) and not torch.equal(whole[0], whole[1])


def test_resume_clears_only_atomic_temp_files(tmp_path):
    """--resume removes what a killed atomic write left, never a user's own hidden .tmp file."""
    import tempfile
    from diffcli.shared.files import atomic_temp_files
    fd, left = tempfile.mkstemp(prefix=".diffcli.00001-seed1.png.", suffix=".tmp", dir=tmp_path)  # atomic_path's
    os.close(fd)
    (tmp_path / ".notes.tmp").write_text("mine")
    (tmp_path / ".notes.abcdefgh.tmp").write_text("mine")  # the old pattern's shape, a user's file
    assert atomic_temp_files(tmp_path) == [Path(left)]
