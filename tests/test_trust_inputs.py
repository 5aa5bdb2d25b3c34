"""Untrusted numbers, sizes and files (docs/trust.md, "Limits"): every numeric option of every command is checked in
one place (diffcli/shared/limits.py: `finite`, `count`, `seed`, `check_image_size`, the limits), bombs are refused before
anything is allocated, malformed checkpoints, run records, CLIP configs and environments are one-line errors, and a
refused command leaves --out as it found it. All in-process (conftest.invoke_cli), no model work before a refusal."""
from __future__ import annotations

import errno
import json
import os
import shutil
import struct
import time
import typing
import zlib
from pathlib import Path

import pytest
import torch
from conftest import TINY_TRAIN, invoke_cli
from safetensors import safe_open
from safetensors.torch import save_file

from diffcli import cli
from diffcli.cliopts import parameters
from diffcli.shared import checkpoints, files, images, limits
from diffcli.shared.errors import DiffcliError


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def refused(args: list, fragment: str, capsys, watched: list[Path] = (), out: Path | None = None,
            code: int = 2) -> str:
    """Run the CLI; assert one `error:` line with `fragment`, no internal error, `code`, nothing written."""
    before = [snapshot(d) for d in watched]
    out_before = snapshot(out) if out is not None and out.is_dir() else None
    t0 = time.monotonic()
    got, _, err = invoke_cli(args, capsys)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert got == code, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "internal error" not in err and "Traceback" not in err, err
    assert fragment in lines[0], lines[0]
    assert time.monotonic() - t0 < 30, "a refusal must come within seconds"
    assert [snapshot(d) for d in watched] == before, "a refused command changed files"
    if out is not None:
        assert (snapshot(out) if out.is_dir() else None) == out_before, "a refused command touched --out"
    return lines[0]


# ---------------------------------------------------------------- every numeric option of every command

def numeric_options(command: str) -> list[tuple[str, str]]:
    """(flag, 'int' | 'float') of each numeric option, read from the CLI itself: a new option is swept too."""
    found = []
    for p in parameters(cli.COMMANDS[command])[0]:
        name = p.name
        args = [a for a in typing.get_args(p.annotation) if a is not type(None)]
        base = args[0] if args else p.annotation
        if base in (int, float) and hasattr(p.default, "param_decls"):
            flags = [d for d in p.default.param_decls if d.startswith("--")] or ["--" + name.replace("_", "-")]
            found.append((flags[0], "int" if base is int else "float"))
    return found


# the inputs these commands would read do not exist: a value that is not refused up front fails on them instead,
# without the option's name in the message
BASE = {
    "train": ["train", "--dataset", "folder:{tmp}/nothing"],
    "sample": ["sample", "--checkpoint", "{tmp}/none.safetensors"],
    "seg": ["seg", "a cat", "--model", "{tmp}/none"],
    "panorama": ["panorama", "a cat", "--model", "{tmp}/none"],
    "anagram": ["anagram", "a", "b", "--model", "{tmp}/none", "--sr-model", "none"],
    "pg": ["pg", "--checkpoint", "{tmp}/none.safetensors"],
    "eval": ["eval", "{tmp}/nothing", "--digits"],
}
SWEEP = [(command, flag, value) for command in BASE for flag, kind in numeric_options(command)
         for value in (("-1", str(2**64)) if kind == "int" else ("nan", "-inf"))]


def test_the_sweep_covers_every_command_and_the_known_options():
    flags = {(c, f) for c, f, _ in SWEEP}
    assert {c for c, _ in flags} == set(BASE)
    for expected in [("sample", "--sigma-max"), ("sample", "--nrow"), ("sample", "--rho"), ("train", "--ema-halflife-kimg"),
                     ("train", "--channels"), ("train", "--image-size"), ("panorama", "--width"), ("seg", "--width"),
                     ("anagram", "--frames"), ("pg", "--n"), ("eval", "--kid-subsets")]:
        assert expected in flags, expected


@pytest.mark.parametrize("command,flag,value", SWEEP, ids=[f"{c} {f} {v}" for c, f, v in SWEEP])
def test_every_numeric_option_is_checked_up_front(command, flag, value, tmp_path, capsys):
    args = [a.format(tmp=tmp_path) for a in BASE[command]]
    out = [] if command == "eval" else ["--out", tmp_path / "o"]
    refused([*args, flag, value, *out], flag, capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# ---------------------------------------------------------------- ranges named in the message

NUMBERS = [
    # the examples
    (["sample", "--checkpoint", "{run}", "--sigma-max", "nan"], "--sigma-max must be a finite number > 0 and <= 100000, got nan"),
    (["sample", "--checkpoint", "{run}", "--sigma-min", "-1"], "--sigma-min must be a finite number > 0"),
    (["sample", "--checkpoint", "{run}", "--sigma-min", "100"], "need --sigma-min < --sigma-max, got 100 and 80"),
    (["sample", "--checkpoint", "{run}", "--rho", "0"], "--rho must be a finite number > 0 and <= 1000, got 0"),
    (["sample", "--checkpoint", "{run}", "--seed", str(2**64)], "--seed must be >= 0 and <= 9223372036854775807"),
    (["sample", "--checkpoint", "{run}", "--seed", "-1"], "--seed must be >= 0"),
    (["sample", "--checkpoint", "{run}", "--seed", str(2**63 - 1), "--n", "2"], "<= 9223372036854775806 for 2 items"),
    (["sample", "--checkpoint", "{run}", "--nrow", "-1"], "--nrow must be >= 1 and <= 256, got -1"),
    (["sample", "--checkpoint", "{run}", "--cfg", "inf"], "--cfg must be a finite number >= 0 and <= 1000"),
    (["sample", "--checkpoint", "{run}", "--s-noise", "nan"], "--s-noise must be a finite number"),
    (["sample", "--checkpoint", "{run}", "--sigma-start", "nan"], "--seg-sigma-max must be a number >= 0"),
    (["train", "--dataset", "folder:{digits}", "--ema-halflife-kimg", "nan"], "--ema-halflife-kimg must be a finite number >= 0"),
    (["train", "--dataset", "folder:{digits}", "--lr", "0"], "--lr must be a finite number > 0, got 0"),
    (["train", "--dataset", "folder:{digits}", "--p-uncond", "nan"], "--p-uncond must be a finite number >= 0 and <= 1"),
    (["train", "--dataset", "folder:{digits}", "--channels", "2"], "--channels must be 1 or 3"),
    (["train", "--dataset", "folder:{digits}", "--image-size", "-8"], "--image-size must be >= 1 and <= 65536, got -8"),
    (["train", "--dataset", "folder:{digits}", "--net", "tiny", "--block-channels", "0,0"], "--block-channels: each width must be >= 1 and <= 4096, got 0"),
    (["train", "--dataset", "folder:{digits}", "--net", "tiny", "--block-channels", "8"], "--block-channels needs 2 widths"),
    (["train", "--dataset", "folder:{digits}", "--net", "tiny", "--block-channels", "6,8"], "multiple of 4"),
    (["train", "--dataset", "folder:{digits}", "--seed", str(2**40)], "--seed must be >= 0 and <= 1099511627775"),
    (["train", "--dataset", "folder:{digits}", "--lr-warmup", "-1"], "--lr-warmup must be >= 0 and <= 100000000"),
    (["train", "--dataset", "folder:{digits}", "--process", "blurring", "--blur-sigma-max", "inf"], "blur_sigma_max must be a finite number"),
    (["train", "--dataset", "circle-jumping", "--p-left", "nan"], "p_left is a probability and must be in [0, 1]"),
    (["train", "--dataset", "circle-jumping", "--data-seed", "-1"], "--data-seed must be >= 0"),
    (["anagram", "a", "b", "--sr-cfg", "nan"], "--sr-cfg must be a finite number >= 0 and <= 1000"),
    (["anagram", "a", "b", "--skew", "1e30"], "--skew must be a finite number >= -65536 and <= 65536"),
    (["anagram", "a", "b", "--view-seed", "-1"], "--view-seed must be >= 0"),
    (["pg", "--checkpoint", "{run}", "--rho", "-1"], "--rho must be a finite number > 0"),
]

BOMBS = [
    (["sample", "--checkpoint", "{run}", "--n", str(10**12)], "--n must be >= 1 and <= 1000000"),
    (["sample", "--checkpoint", "{run}", "--steps", str(10**9)], "--steps must be >= 1 and <= 10000"),
    (["sample", "--checkpoint", "{run}", "--batch-size", str(10**9)], "--batch-size must be >= 1 and <= 65536"),
    (["sample", "--checkpoint", "{run}", "--nrow", str(10**12)], "--nrow must be >= 1 and <= 256"),
    (["sample", "--show-forward", "{bombs}/bomb.png"], "is 10000 x 10000 = 100000000 px; diffcli reads at most 67108864 px"),
    (["sample", "--show-forward", "{bombs}/huge.png"], "has 10000000000 px; diffcli reads at most 67108864 px"),
    (["train", "--dataset", "folder:{bombs}/folder"], "diffcli reads at most 67108864 px"),
    (["train", "--dataset", "folder:{digits}", "--image-size", "10000000"], "--image-size must be >= 1 and <= 65536"),
    (["train", "--dataset", "folder:{digits}", "--image-size", "16384"], "= 268435456 px: an image may have at most 67108864 px"),
    (["train", "--dataset", "folder:{digits}", "--net", "tiny", "--block-channels", "65536,65536"], "<= 4096, got 65536"),
    (["train", "--dataset", "folder:{digits}", "--steps", str(10**9)], "--steps must be >= 1 and <= 100000000"),
    (["train", "--dataset", "folder:{digits}", "--batch", str(10**12)], "--batch must be >= 1 and <= 65536"),
    (["train", "--dataset", "folder:{digits}", "--net", "tiny", "--batch", "65536", "--image-size", "1024"],
     "one training batch (65536 x 8 x 1024 x 1024 activations) needs at least 2.0 TiB"),
    (["train", "--dataset", "circle-jumping", "--directions", str(10**12)], "--directions must be >= 1 and <= 1024"),
    (["train", "--dataset", "circle-jumping", "--context-frames", str(10**6)], "--context-frames must be >= 1 and <= 64"),
    (["train", "--dataset", "folder:{digits}", "--preview", str(10**9)], "--preview must be >= 1 and <= 1000"),
    (["seg", "a cat", "--width", "10000000"], "--width must be >= 1 and <= 65536, got 10000000"),
    (["seg", "a cat", "--height", "8192", "--width", "16384"], "= 134217728 px: an image may have at most 67108864 px"),
    (["seg", "a cat", "--n", str(10**12)], "--n must be >= 1 and <= 65536"),
    (["seg", "a cat", "--steps", str(10**9)], "--steps must be >= 1 and <= 10000"),
    (["seg", "a cat", "--model", "{sd}", "--steps", "5000"], "--steps must be >= 1 and <= 1000"),  # DDIM's own table
    (["panorama", "a b", "--width", "10000000"], "--width must be >= 1 and <= 65536, got 10000000"),
    (["panorama", "a b", "--width", "65536", "--height", "2048"], "an image may have at most 67108864 px"),
    (["panorama", "a b", "--view-batch", str(10**9)], "--view-batch must be >= 1 and <= 65536"),
    (["panorama", "a b", "--model", "{sd}", "--height", "16", "--width", "48", "--steps", "2000"], "--steps must be >= 1 and <= 1000"),
    (["anagram", "a", "b", "--frames", str(10**12)], "--frames must be >= 1 and <= 240"),
    (["anagram", "a", "b", "--sr-steps", str(10**9)], "--sr-steps must be >= 1 and <= 10000"),
    (["anagram", "a", "b", "--height", str(10**7)], "--height must be >= 1 and <= 65536"),
    (["anagram", "a", "b", "--noise-level", str(10**9)], "--noise-level must be >= 0 and <= 10000"),
    (["pg", "--checkpoint", "{run}", "--n", str(10**12)], "--n must be >= 1 and <= 65536"),
    (["pg", "a dog", "--model", "{sd}", "--width", str(10**7)], "--width must be >= 1 and <= 65536"),
    (["pg", "a dog", "--model", "{sd}", "--steps", "3000"], "--steps must be >= 1 and <= 1000"),
    (["eval", "{run}", "--digits", "--batch-size", str(10**9)], "--batch-size must be >= 1 and <= 65536"),
    (["eval", "{run}", "--kid", "{run}", "--kid-subsets", str(10**12)], "--kid-subsets must be >= 1 and <= 10000"),
]


class _NoCapture:
    """capsys's interface for a module fixture (which cannot use the function-scoped capsys)."""

    def readouterr(self):
        return type("Captured", (), {"out": "", "err": ""})()


def png(path: Path, width: int, height: int, whole: bool) -> Path:
    """A grey PNG whose header says width x height: `whole` compresses every (zero) row, a real decompression bomb
    of ~100 KB; otherwise one row follows a header that promises far more."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    z = zlib.compressobj(9)
    row = bytes(width + 1)
    body = b"".join(z.compress(row) for _ in range(height if whole else 1)) + z.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", body) + chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="module")
def bombs(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("bombs")
    png(d / "bomb.png", 10_000, 10_000, whole=True)   # 100 Mpx: PIL itself only warns below 179 Mpx
    png(d / "huge.png", 100_000, 100_000, whole=False)  # 10 Gpx: PIL's own DecompressionBombError
    (d / "folder").mkdir()
    shutil.copy(d / "bomb.png", d / "folder" / "a.png")
    return d


@pytest.mark.parametrize("args,fragment", NUMBERS + BOMBS, ids=[" ".join(a[:1] + a[-2:])[:60] for a, _ in NUMBERS + BOMBS])
def test_refused_with_the_range_named(args, fragment, tmp_path, tiny_run, digit_folder, bombs, capsys, request):
    subs = {"run": tiny_run, "digits": digit_folder, "bombs": bombs, "tmp": tmp_path}
    if any("{sd}" in a for a in args):
        subs["sd"] = request.getfixturevalue("tiny_sd")
    args = [a.format(**subs) for a in args]
    out = tmp_path / "o"
    refused([*args, *([] if args[0] == "eval" else ["--out", out])], fragment, capsys,
            watched=[tiny_run, digit_folder, bombs])
    assert not out.exists()


# ---------------------------------------------------------------- malformed checkpoints

def rewrite(src: Path, dst: Path, edit) -> Path:
    """A copy of a model file whose 'diffcli' metadata is edit(meta) (a string is written as is)."""
    with safe_open(str(src), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = json.loads(f.metadata()["diffcli"])
    new = edit(meta)
    save_file(tensors, str(dst), metadata={"diffcli": new if isinstance(new, str) else json.dumps(new)})
    return dst


def model_edit(**changes):
    def edit(meta):
        for key, value in changes.items():
            *path, last = key.split(".")
            node = meta["model"]
            for p in path:
                node = node[p]
            if value is DELETE:
                del node[last]
            else:
                node[last] = value
        return meta
    return edit


DELETE = object()
CHECKPOINTS = [
    ("not-json", lambda m: "{not json", "its 'diffcli' metadata is not valid JSON"),
    ("json-list", lambda m: [1, 2], "its 'diffcli' metadata is a JSON list, not an object"),
    ("record-a-list", lambda m: {**m, "model": [1]}, "holds no diffcli EDM or blurring model"),
    ("missing-net", model_edit(net=DELETE), "lacks field(s) net"),
    ("missing-sigma", model_edit(sigma_max=DELETE), "lacks field(s) sigma_max"),
    ("unknown-net-argument", model_edit(**{"net.bogus": 1}), "unknown UNet2DModel argument(s) 'bogus'"),
    ("65536-channels", model_edit(**{"net.block_out_channels": [65536, 65536]}), "a block width must be >= 1 and <= 4096, got 65536"),
    ("widths-as-strings", model_edit(**{"net.block_out_channels": ["8", "16"]}), "a block width must be an integer"),
    ("image-size-1e7", model_edit(image_size=10**7), "image_size must be >= 1 and <= 65536, got 10000000"),
    ("image-size-pixels", model_edit(image_size=16384), "an image may have at most 67108864 px"),
    ("image-size-string", model_edit(image_size="28"), "image_size must be an integer"),
    ("classes-string", model_edit(num_classes="3"), "num_classes must be an integer"),
    ("sigma-nan", model_edit(sigma_data=float("nan")), "sigma_data must be a finite number > 0"),
    ("sigmas-reversed", model_edit(sigma_min=100.0), "need sigma_min < sigma_max"),
    ("channels-2", model_edit(channels=2), "channels must be 1 or 3"),
    ("unknown-block", model_edit(**{"net.down_block_types": ["Foo2D", "DownBlock2D"]}), "its net does not build"),
    ("norm-groups", model_edit(**{"net.norm_num_groups": 3}), "multiple of norm_num_groups 3"),
    ("layers-1e6", model_edit(**{"net.layers_per_block": 10**6}), "layers_per_block must be >= 1 and <= 16"),
    ("in-channels", model_edit(**{"net.in_channels": 3}), "the net maps 3 to 1 channels"),
    ("embeds", model_edit(**{"net.num_class_embeds": 2}), "need num_class_embeds >= 4"),
    ("context-frames", model_edit(context_frames=10**6), "context_frames must be >= 0 and <= 64"),
]


@pytest.mark.parametrize("name,edit,fragment", CHECKPOINTS, ids=[c[0] for c in CHECKPOINTS])
def test_malformed_checkpoint_records(name, edit, fragment, tiny_run, tmp_path, capsys):
    ckpt = rewrite(tiny_run / "model.safetensors", tmp_path / f"{name}.safetensors", edit)
    refused(["sample", "--checkpoint", ckpt, "--out", tmp_path / "o"], fragment, capsys, watched=[tiny_run])
    assert not (tmp_path / "o").exists()
    if name in ("image-size-1e7", "65536-channels"):  # the same refusal for pg, and for show-forward's reader
        refused(["pg", "--checkpoint", ckpt, "--out", tmp_path / "o"], fragment, capsys)


def test_a_large_image_size_is_refused_by_memory_before_sampling(tiny_run, tmp_path, capsys):
    """8192 x 8192 is a legal image, but a batch of 4096 of them cannot fit any machine: refused after the model
    loads, before --out exists."""
    ckpt = rewrite(tiny_run / "model.safetensors", tmp_path / "big.safetensors", model_edit(image_size=8192))
    refused(["sample", "--checkpoint", ckpt, "--n", "4096", "--batch-size", "4096", "--device", "cpu",
             "--out", tmp_path / "o"], "one network batch (4096 x 8 x 8192 x 8192 activations) needs at least", capsys)
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------- corrupted run records on --resume

@pytest.fixture(scope="module")
def sample_run(tmp_path_factory, tiny_run) -> Path:
    out = tmp_path_factory.mktemp("samples") / "o"
    code, _, err = invoke_cli(["sample", "--checkpoint", tiny_run, "--n", "2", "--steps", "2", "--device", "cpu",
                               "--out", out], _NoCapture())
    assert code == 0, err
    return out


RUN_JSONS = [
    ("not-json", "{oops", "holds no run.json of an earlier run"),
    ("a-list", "[1, 2]", "holds no run.json of an earlier run"),
    ("options-a-list", json.dumps({"options": [1, 2]}), "holds no run.json of an earlier run"),
    ("options-wrong-types", json.dumps({"options": {"n": "two", "seed": [0]}}), "options differ from the run"),
]


@pytest.mark.parametrize("name,text,fragment", RUN_JSONS, ids=[r[0] for r in RUN_JSONS])
def test_sample_resume_with_a_corrupted_run_json(name, text, fragment, sample_run, tiny_run, tmp_path, capsys):
    out = tmp_path / "o"
    shutil.copytree(sample_run, out)
    (out / "run.json").write_text(text)
    refused(["sample", "--checkpoint", tiny_run, "--n", "2", "--steps", "2", "--device", "cpu", "--resume",
             "--out", out], fragment, capsys, out=out)


STATES = [
    ("train-not-a-dict", lambda m: {**m, "train": [1]}, "its 'train' record is malformed"),
    ("config-a-list", lambda m: {**m, "train": {**m["train"], "config": [1]}}, "its 'train' record is malformed"),
    ("config-unknown-key", lambda m: {**m, "train": {**m["train"], "config": {**m["train"]["config"], "bogus": 1}}},
     "its training config does not fit this diffcli"),
    ("config-lr-string", lambda m: {**m, "train": {**m["train"], "config": {**m["train"]["config"], "lr": "x"}}},
     "--lr must be a finite number > 0, got 'x'"),
    ("config-dataset-number", lambda m: {**m, "train": {**m["train"], "config": {**m["train"]["config"], "dataset": 3}}},
     "--dataset must be a string"),
    ("step-string", lambda m: {**m, "train": {**m["train"], "step": "four"}}, "'train' record's step must be an integer"),
    ("optim-garbage", lambda m: {**m, "train": {**m["train"], "optim": {"__dict__": {"state": {"__value__": 3}}}}},
     "its weights or optimizer state do not match"),
]


@pytest.mark.parametrize("name,edit,fragment", STATES, ids=[s[0] for s in STATES])
def test_train_resume_with_a_malformed_training_state(name, edit, fragment, tiny_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(tiny_run, out)
    rewrite(tiny_run / "training-state.safetensors", out / "training-state.safetensors", edit)
    refused(["train", "--resume", "--steps", "6", "--out", out, *TINY_TRAIN], fragment, capsys, out=out)


def test_train_resume_survives_a_corrupted_run_json(tiny_run, tmp_path, capsys):
    """run.json only carries the history: a damaged one loses that, not the run."""
    out = tmp_path / "run"
    shutil.copytree(tiny_run, out)
    (out / "run.json").write_text("[1, 2]")
    code, _, err = invoke_cli(["train", "--resume", "--steps", "5", "--out", out, *TINY_TRAIN], capsys)
    assert code == 0 and "internal error" not in err, err
    assert json.loads((out / "run.json").read_text())["resumed_from"] == 4


# ---------------------------------------------------------------- CLIP configs, the environment, full disks

CLIP = {"embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
CLIP_CONFIGS = [
    ("embed-dim-string", {**CLIP, "embed_dim": "16"}, "embed_dim must be an integer"),
    ("vision-a-list", {**CLIP, "vision_cfg": [1]}, "vision_cfg must be a JSON object"),
    ("layers-string", {**CLIP, "vision_cfg": {**CLIP["vision_cfg"], "layers": "x"}}, "vision_cfg.layers must be an integer"),
    ("width-1e9", {**CLIP, "text_cfg": {**CLIP["text_cfg"], "width": 10**9}}, "text_cfg.width must be >= 1 and <= 16384"),
    ("mlp-ratio-nan", {**CLIP, "text_cfg": {**CLIP["text_cfg"], "mlp_ratio": float("nan")}}, "mlp_ratio must be a finite number > 0"),
    ("unknown-field", {**CLIP, "text_cfg": {**CLIP["text_cfg"], "bogus": 1}}, "does not build"),
]


@pytest.mark.parametrize("name,config,fragment", CLIP_CONFIGS, ids=[c[0] for c in CLIP_CONFIGS])
def test_clip_config_files_with_wrong_fields(name, config, fragment, tmp_path, capsys):
    folder = tmp_path / "wide"
    folder.mkdir()
    from PIL import Image
    Image.new("RGB", (8, 8), (10, 20, 30)).save(folder / "A_cat_0.png")
    cfg = tmp_path / f"trust-{name}.json"
    cfg.write_text(json.dumps(config))
    weights = tmp_path / "w.safetensors"  # read before the model is built; a config refused up front never gets here
    save_file({"w": torch.zeros(1)}, str(weights))
    refused(["eval", folder, "--app", "wide_images", "--clip-model", cfg, "--clip-pretrained", weights],
            fragment, capsys, out=folder)


@pytest.mark.parametrize("env,fragment", [
    ({"WORLD_SIZE": "abc"}, "environment variable WORLD_SIZE='abc': expected an integer in [1, 65536]"),
    ({"WORLD_SIZE": "0"}, "WORLD_SIZE='0'"),
    ({"WORLD_SIZE": "2", "RANK": "5"}, "RANK='5': expected an integer in [0, 1]"),
    ({"LOCAL_RANK": "-1"}, "LOCAL_RANK='-1'"),
], ids=["world-abc", "world-0", "rank-too-big", "local-rank-negative"])
def test_torchrun_variables_that_are_no_numbers(env, fragment, tiny_run, tmp_path, capsys, monkeypatch):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    refused(["sample", "--checkpoint", tiny_run, "--n", "2", "--steps", "2", "--out", tmp_path / "o"], fragment, capsys)
    assert not (tmp_path / "o").exists()


def test_disk_full_while_writing_a_training_checkpoint(digit_folder, tmp_path, capsys, monkeypatch):
    """ENOSPC at the fsync of the first checkpoint (run.json fits): the message names the file, exit 1, no temp
    file left (tests run as root: the fault is injected, as in test_bad_inputs)."""
    real, calls = os.fsync, []

    def failing(fd):
        calls.append(fd)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd)

    monkeypatch.setattr(files.os, "fsync", failing)
    out = tmp_path / "run"
    line = refused(["train", "--dataset", f"folder:{digit_folder}", "--steps", "2", "--out", out, *TINY_TRAIN],
                   os.strerror(errno.ENOSPC), capsys, code=1)
    assert line.endswith(str(out / "training-state.safetensors")), line
    assert sorted(p.name for p in out.iterdir()) == ["run.json"]


def test_disk_full_inside_the_safetensors_writer(digit_folder, tmp_path, capsys, monkeypatch):
    """A real full disk fails in safetensors' own writer, with its own error type: still an OS error naming the
    file."""
    from safetensors import SafetensorError

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(checkpoints, "save_file", full)
    out = tmp_path / "run"
    line = refused(["train", "--dataset", f"folder:{digit_folder}", "--steps", "2", "--out", out, *TINY_TRAIN],
                   "No space left on device", capsys, code=1)
    assert line.endswith(str(out / "training-state.safetensors")), line
    assert files.atomic_temp_files(out) == []


def test_context_bombs(bombs):
    """--context of a next-frame model: a range is bounded before its list exists, a PNG before it is decoded."""
    from diffcli.data.contexts import parse_indices, read_context
    with pytest.raises(DiffcliError, match="--context 0:1000000000000: 1000000000000 sequences; at most 1000000"):
        parse_indices("0:1000000000000")
    for bomb in ("bomb.png", "huge.png"):
        with pytest.raises(DiffcliError, match="context image .* diffcli reads at most 67108864 px"):
            read_context(bombs / bomb, 2, 32)


def test_a_nan_image_never_becomes_a_file(tmp_path):
    x = torch.zeros(1, 4, 4)
    x[0, 1, 1] = float("nan")
    with pytest.raises(DiffcliError, match="NaN or infinite values"):
        images.save_image(tmp_path / "a.png", x)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- the limits leave real work alone

def test_real_sizes_pass():
    from diffcli.panorama import PanoramaConfig, validate as panorama_validate
    from diffcli.sample import SampleConfig, validate as sample_validate
    from diffcli.seg import SegConfig, validate as seg_validate
    limits.check_image_size(1024, 1024)                 # SDXL
    limits.check_image_size(512, 3072)                  # the 003 panoramas
    limits.check_image_size(8192, 8192)                 # the largest image
    panorama_validate(PanoramaConfig(prompt="a beach", height=512, width=3072))
    seg_validate(SegConfig(prompts=["a cat"], height=1024, width=1024, n=4))
    sample_validate(SampleConfig(n=50_000, batch_size=500, seed=12345))  # a 50k FID set, written batch by batch
    limits.count("steps", 1_000_000, 1, limits.TRAIN_STEPS_MAX)          # a long training run
    limits.seed("seed", 2**63 - 50_000, 50_000)
    with pytest.raises(DiffcliError, match=r"--n must be an integer >= 1, got 2.5"):
        limits.count("n", 2.5)
    with pytest.raises(DiffcliError, match=r"--cfg must be a finite number >= 0 and <= 1000, got 'x'"):
        limits.finite("cfg", "x", high=limits.SCALE_MAX)


def test_a_safetensors_header_length_that_starts_like_a_pickle_is_still_read(tmp_path):
    """A safetensors file begins with its header's length (u64, little-endian): 1 length in 256 has 0x80, the
    pickle protocol byte, first. Such a file is read, not refused as a pickle."""
    from diffcli.shared.checkpoints import load_checkpoint
    for pad in range(300):  # find a metadata size that puts 0x80 first
        path = tmp_path / "w.safetensors"
        save_file({"w": torch.zeros(2)}, str(path), metadata={"diffcli": json.dumps({"model": {}, "pad": "x" * pad})})
        if path.read_bytes()[0] == 0x80:
            break
    assert path.read_bytes()[0] == 0x80
    tensors, meta = load_checkpoint(path)
    assert torch.equal(tensors["w"], torch.zeros(2)) and meta["pad"] == "x" * pad
