"""What docs/trust.md promises about files: one naming rule for names from user text (nothing overwritten), names
capped in bytes and checked before any work, --resume clearing only diffcli's own temp files, no hang on a FIFO
or a missing torchrun peer, no unpickling of pipeline weights, and resume byte-identical whatever --batch-size."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, TINY_TRAIN, invoke_cli, write_digit_folder
from diffcli.backends import pipelines
from diffcli.shared.names import NAME_MAX_BYTES, unique_stems
from diffcli.shared.files import TEMP_NAME_BYTES, atomic_path, atomic_temp_files
from diffcli.shared.errors import DiffcliError
from diffcli.shared.shipped import SHIPPED_MODEL

CPU = torch.device("cpu")
USER_TEMP = ".notes.abcdefgh.tmp"  # a user's own hidden file of the form --resume used to delete


def killed_writer(path: Path, held: list) -> Path:
    """The temp file a writer killed inside atomic_path leaves (the context is kept open: never renamed)."""
    cm = atomic_path(path)
    tmp = cm.__enter__()
    tmp.write_bytes(b"half a file")
    held.append(cm)
    return tmp


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- 1. one naming rule, nothing overwritten

def test_one_rule_for_names_from_user_text():
    from diffcli import anagram, panorama, seg
    assert unique_stems(["a cat", "a/cat", "A cat", "a cat-2"]) == ["a_cat", "a_cat-2", "A_cat-3", "a_cat-2-2"]
    assert seg.image_stems(["a cat", "a/cat"]) == ["a_cat", "a_cat-2"]
    # a panorama whose name is another's crop is moved too
    jobs = panorama.name_jobs([panorama.Job("a cat", [64]), panorama.Job("a/cat", [64]), panorama.Job("a cat 64")])
    assert [panorama.outputs(j) for j in jobs] == [["a_cat.png", "a_cat_64.png"], ["a_cat-2.png", "a_cat-2_64.png"],
                                                   ["a_cat_64-2.png"]]
    jobs = anagram.validate(anagram.AnagramConfig(prompts=["a horse", "a horse"]))
    assert jobs[0].files == ["a_horse.png", "a_horse-2.png"]


def test_colliding_prompts_are_all_written(tmp_path, tiny_sd, tiny_if, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na/cat\nA cat\n")
    code, _, err = invoke_cli(["seg", "--prompts-file", prompts, "--model", tiny_sd, "--steps", 1, "--n", 1,
                               "--out", tmp_path / "seg", "--device", "cpu"], capsys)
    assert code == 0, err
    assert {p.name for p in (tmp_path / "seg").glob("*_seed0.png")} == {"a_cat_seed0.png", "a_cat-2_seed0.png",
                                                                        "A_cat-3_seed0.png"}
    code, _, err = invoke_cli(["panorama", "--prompts-file", prompts, "--model", tiny_sd, "--height", 16, "--width",
                               24, "--stride", 4, "--steps", 1, "--eval-pos", "0", "--out", tmp_path / "pano",
                               "--device", "cpu"], capsys)
    assert code == 0, err
    assert {p.name for p in (tmp_path / "pano").iterdir()} == {
        "a_cat.png", "a_cat_0.png", "a_cat-2.png", "a_cat-2_0.png", "A_cat-3.png", "A_cat-3_0.png"}
    pairs = tmp_path / "pairs.json"
    pairs.write_text(json.dumps({"a/b": {"canonical_prompt": "a horse", "instance_prompt": "a cat"},
                                 "a b": {"canonical_prompt": "a horse", "instance_prompt": "a/cat"}}))
    out = tmp_path / "ambiguous"
    code, _, err = invoke_cli(["anagram", "--prompts-file", pairs, "--model", tiny_if[0], "--sr-model", "none",
                               "--steps", 1, "--frames", 1, "--out", out, "--device", "cpu"], capsys)
    assert code == 0, err
    assert {p.name for p in out.iterdir()} == {"a_horse.png", "a_cat.png", "a_horse-2.png", "a_cat-2.png"}
    assert {p.name for p in out.with_name(out.name + ".animations").iterdir()} == {
        "a_b.gif", "a_b_strip.png", "a_b-2.gif", "a_b-2_strip.png"}


def test_multibyte_prompt_is_capped_in_bytes_and_checked_before_work(tmp_path, tiny_sd, capsys, monkeypatch):
    prompt = "猫" * 100  # 100 characters, 300 bytes: valid characters, too long a name
    out = tmp_path / "long"
    code, _, err = invoke_cli(["seg", prompt, "--model", tiny_sd, "--steps", 1, "--n", 1, "--seed", 12,
                               "--out", out, "--device", "cpu"], capsys)
    assert code == 0, err
    (image,) = out.glob("*_seed12.png")
    assert image.name.startswith("猫" * 50) and len(image.name.encode()) + TEMP_NAME_BYTES <= NAME_MAX_BYTES
    # a file system with shorter names (eCryptfs: 143 bytes) is refused in one line before the model loads
    from diffcli.shared import names
    monkeypatch.setattr(names, "name_max", lambda folder: 143)
    monkeypatch.setattr(pipelines, "load_pipeline", lambda *a, **k: pytest.fail("loaded a model before the check"))
    for command in (["seg", prompt], ["panorama", prompt, "--height", 16, "--width", 24]):
        code, _, err = invoke_cli([*command, "--model", tiny_sd, "--out", tmp_path / "short", "--device", "cpu"],
                                  capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1 and "143-byte name limit" in err, err
    assert not (tmp_path / "short").exists()


# ---------------------------------------------------------------- 2. --resume clears only our own temp files

def test_resume_clears_only_its_own_temp_files(tmp_path, tiny_sd, capsys):
    blurs = ["--blur", "gaussian_-1_1", "--blur", "gaussian_-1_2"]
    args = ["seg", "a cat", "--model", tiny_sd, "--steps", 1, "--n", 2, *blurs, "--device", "cpu"]
    out = tmp_path / "seg"
    assert invoke_cli([*args, "--out", out], capsys)[0] == 0
    whole = snapshot(out)
    (out / "gaussian_-1_2" / "a_cat_seed1.png").unlink()
    held: list = []
    ours = [killed_writer(out / "gaussian_-1_2" / "a_cat_seed1.png", held), killed_writer(out / "grid.png", held)]
    assert all(p.name.startswith(".diffcli.") and p.name.endswith(".tmp") for p in ours)
    mine = [out / USER_TEMP, out / "gaussian_-1_1" / USER_TEMP, out / "notes" / USER_TEMP,
            out / "notes" / ".diffcli.x.png.abcdefgh.tmp"]  # an unrelated subfolder: never searched
    for p in mine:
        p.parent.mkdir(exist_ok=True)
        p.write_text("mine")
    assert atomic_temp_files(out, out / "gaussian_-1_2") == sorted(ours)
    code, _, err = invoke_cli([*args, "--out", out, "--resume"], capsys)
    assert code == 0, err
    assert not any(p.exists() for p in ours) and all(p.read_text() == "mine" for p in mine)
    after = snapshot(out)
    assert {k: v for k, v in after.items() if not k.startswith("notes") and USER_TEMP not in k
            and k != "run.json"} == {k: v for k, v in whole.items() if k != "run.json"}


def test_train_resume_clears_its_killed_writers_temp_files(tmp_path, tiny_run, digit_folder, capsys):
    out = tmp_path / "run"
    shutil.copytree(tiny_run, out)
    held: list = []
    ours = [killed_writer(out / "training-state.safetensors", held),
            killed_writer(out / "grids" / "step-0000004.png", held)]
    mine = [out / USER_TEMP, out / "grids" / USER_TEMP, out / "mine" / ".diffcli.a.png.abcdefgh.tmp"]
    for p in mine:
        p.parent.mkdir(exist_ok=True)
        p.write_text("mine")
    code, _, err = invoke_cli(["train", "--dataset", f"folder:{digit_folder}", "--steps", 5, "--out", out,
                               "--resume", *TINY_TRAIN], capsys)
    assert code == 0, err
    assert not any(p.exists() for p in ours) and all(p.read_text() == "mine" for p in mine)


# ---------------------------------------------------------------- 3. never hang, never unpickle

def test_fifo_in_a_dataset_folder_is_refused_without_opening_it(tmp_path, capsys):
    data = write_digit_folder(tmp_path / "data", classes=2, per_class=2)
    fifo = data / "class1" / "stream.png"
    os.mkfifo(fifo)
    result = {}
    worker = threading.Thread(target=lambda: result.update(zip(("code", "out", "err"), invoke_cli(
        ["train", "--dataset", f"folder:{data}", "--steps", 1, "--out", tmp_path / "run", *TINY_TRAIN], capsys))),
        daemon=True)
    worker.start()
    worker.join(60)
    if worker.is_alive():  # it opened the FIFO: let it go, then fail
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("train blocked on a FIFO in the dataset folder")
    assert result["code"] == 2 and len(result["err"].strip().splitlines()) == 1
    assert "stream.png is not a regular file" in result["err"]
    assert not (tmp_path / "run").exists()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_rendezvous_without_a_peer_fails_within_the_timeout(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "WORLD_SIZE": "2", "RANK": "0",
           "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "DIFFCLI_DIST_TIMEOUT": "2"}
    start = time.time()
    proc = subprocess.run([sys.executable, "-m", "diffcli", "sample", "--n", "1", "--device", "cpu", "--out",
                           str(tmp_path / "out")], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and time.time() - start < 60
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "within 2 s" in proc.stderr and "DIFFCLI_DIST_TIMEOUT" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_pickled_pipeline_weights_are_refused(tmp_path, tiny_sd, capsys):
    from diffusers import DiffusionPipeline
    pickled = tmp_path / "bin-pipe"
    DiffusionPipeline.from_pretrained(str(tiny_sd)).save_pretrained(pickled, safe_serialization=False)
    assert (pickled / "unet" / "diffusion_pytorch_model.bin").is_file()
    with pytest.raises(DiffcliError, match="unet/diffusion_pytorch_model.bin.*never unpickles"):
        pipelines.load_pipeline(str(pickled), CPU, torch.float32)
    code, _, err = invoke_cli(["seg", "a cat", "--model", pickled, "--out", tmp_path / "out", "--device", "cpu"],
                              capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "safetensors" in err
    assert not (tmp_path / "out").exists()
    # where only a safetensors file stands beside, that one loads and the pickle is never read
    (pickled / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"\x80 not even a pickle")
    shutil.copy(tiny_sd / "unet" / "diffusion_pytorch_model.safetensors", pickled / "unet")
    shutil.copy(tiny_sd / "vae" / "diffusion_pytorch_model.safetensors", pickled / "vae")
    assert hasattr(pipelines.load_pipeline(str(pickled), CPU, torch.float32), "unet")


# ---------------------------------------------------------------- 4. resume byte-identical whatever --batch-size

def test_sample_floats_do_not_depend_on_the_batch():
    """The shipped net's convolutions round differently at different batch sizes (up to ~1e-5 after 35 network
    evaluations); fixed network groups make each sample's floats equal whatever batch or subset it is drawn in."""
    from diffcli.backends.models import load_model
    from diffcli.drawing import sample_batches
    from diffcli.sample import SampleConfig
    model, meta = load_model(SHIPPED_MODEL)
    base = dict(n=11, steps=3, cfg=2.0, labels="all", seed=5)
    draw = lambda bs, indices=None: {i: x for idx, images, _ in sample_batches(  # noqa: E731
        model, meta, SampleConfig(**base, batch_size=bs), CPU, indices) for i, x in zip(idx, images)}
    whole = draw(11)
    for got in (draw(3), draw(1), draw(4, [9, 2, 3, 10])):
        assert all(torch.equal(x, whole[i]) for i, x in got.items())


def test_resume_with_another_batch_size_is_byte_identical(tmp_path, capsys):
    args = ["sample", "--n", 12, "--steps", 2, "--cfg", 2, "--device", "cpu"]
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    assert invoke_cli([*args, "--batch-size", 12, "--out", straight], capsys)[0] == 0
    assert invoke_cli([*args, "--batch-size", 5, "--out", cut], capsys)[0] == 0
    for name in ("00001-seed1-label1.png", "00006-seed6-label6.png", "00007-seed7-label7.png", "grid.png"):
        (cut / name).unlink()
    assert invoke_cli([*args, "--batch-size", 3, "--out", cut, "--resume"], capsys)[0] == 0
    assert {k: v for k, v in snapshot(cut).items() if k != "run.json"} == \
        {k: v for k, v in snapshot(straight).items() if k != "run.json"}
    # with PG each batch is a particle set: another --batch-size is refused, the folder untouched
    pg = tmp_path / "pg"
    assert invoke_cli([*args, "--pg-factor", 1, "--batch-size", 4, "--out", pg], capsys)[0] == 0
    (pg / "00005-seed5-label5.png").unlink()
    before = snapshot(pg)
    code, _, err = invoke_cli([*args, "--pg-factor", 1, "--batch-size", 6, "--out", pg, "--resume"], capsys)
    assert code == 2 and "resumes only with --batch-size 4" in err and snapshot(pg) == before
