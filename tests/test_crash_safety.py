"""Crash safety: SIGKILL at random moments, many of them while a checkpoint is being written, never leaves a
broken checkpoint, and resuming after every kill ends in exactly the weights of an uninterrupted run."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

from conftest import ROOT, TINY_TRAIN, call_cli, run_cli
from diffcli.shared.checkpoints import load_checkpoint

STEPS = 150


def test_repeated_kills_mid_save_then_resume_equals_straight_run(tmp_path, digit_folder):
    common = ["train", "--dataset", f"folder:{digit_folder}", *TINY_TRAIN, "--steps", str(STEPS)]
    straight = tmp_path / "straight"
    call_cli(*common, "--ckpt-every", "0", "--out", straight, check=True)

    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    rng = random.Random(0)
    steps_seen = []
    for trial in range(4):
        # a checkpoint every step: most of the wall time is spent inside the save, so kills land there
        args = [*common, "--ckpt-every", "1", "--out", str(out)] + (["--resume"] if trial else [])
        proc = subprocess.Popen([sys.executable, "-m", "diffcli", *args], env=env, cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        state = out / "training-state.safetensors"
        before = state.stat().st_mtime_ns if state.exists() else None
        deadline = time.time() + 120
        while time.time() < deadline and (not state.exists() or state.stat().st_mtime_ns == before):
            time.sleep(0.005)
        time.sleep(rng.uniform(0.05, 0.6))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL, f"trial {trial}: training finished before the kill"
        # whatever moment the kill hit, the checkpoint on disk is a whole one (old or new)
        step = load_checkpoint(state)[1]["train"]["step"]
        load_checkpoint(out / "model.safetensors")
        steps_seen.append(step)
    assert steps_seen == sorted(steps_seen) and 0 < steps_seen[-1] < STEPS, steps_seen
    run_cli(*common, "--ckpt-every", "0", "--out", out, "--resume", check=True)
    a, b = load_checkpoint(out / "training-state.safetensors")[0], load_checkpoint(straight / "training-state.safetensors")[0]
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] == b[k]).all(), k
    # killed writers leave at most their own temp files behind, never in place of the checkpoint
    assert not [p for p in out.iterdir() if p.name.endswith(".safetensors") and p.stat().st_size == 0]


def sample_pngs(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("0*.png"))}


def test_sampling_killed_repeatedly_then_resumed_equals_straight_run(tmp_path, tiny_run):
    """SIGKILL while `diffcli sample` writes one PNG after another: every file on disk is whole, each --resume
    keeps what was written and skips it, and the finished folder is byte for byte the uninterrupted one."""
    from PIL import Image
    common = ["sample", "--checkpoint", str(tiny_run), "--n", "40", "--batch-size", "1", "--steps", "6",
              "--device", "cpu"]
    straight = tmp_path / "straight"
    call_cli(*common, "--out", straight, check=True)

    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    rng = random.Random(1)
    counts = []
    for trial in range(3):
        have = len(sample_pngs(out)) if out.exists() else 0
        proc = subprocess.Popen([sys.executable, "-m", "diffcli", *common, "--out", str(out),
                                 *(["--resume"] if trial else [])], env=env, cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while time.time() < deadline and (not out.exists() or len(list(out.glob("0*.png"))) <= have):
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.3))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL, f"trial {trial}: sampling finished before the kill"
        written = sample_pngs(out)
        for name, data in written.items():  # whole files only: each decodes and equals the straight run's
            Image.open(out / name).load()
            assert data == (straight / name).read_bytes(), name
        counts.append(len(written))
    assert counts == sorted(counts) and 0 < counts[-1] < 40, counts
    run_cli(*common, "--out", out, "--resume", check=True)
    assert sample_pngs(out) == sample_pngs(straight)
    assert (out / "grid.png").read_bytes() == (straight / "grid.png").read_bytes()
    assert not list(out.glob(".*.tmp"))  # --resume clears the temp files the killed writers left
