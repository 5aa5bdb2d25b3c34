"""Training: exact resume (after a clean stop and after SIGKILL), SIGINT, NaN guard, DDP, datasets."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, TINY_TRAIN, call_cli, run_cli, write_idx
from diffcli.shared.checkpoints import load_checkpoint
from diffcli.data.datasets import BatchOrder, load_dataset


def weights(run: Path, file: str = "training-state.safetensors") -> dict[str, torch.Tensor]:
    return load_checkpoint(run / file)[0]


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, digit_folder) -> Path:
    out = tmp_path_factory.mktemp("straight") / "run"
    call_cli("train", "--dataset", f"folder:{digit_folder}", "--steps", "12", "--ckpt-every", "0", "--out", out,
            *TINY_TRAIN, check=True)
    return out


def test_run_writes_model_state_and_record(straight_run):
    tensors, meta = load_checkpoint(straight_run / "model.safetensors")
    assert meta["model"]["kind"] == "edm" and meta["model"]["num_classes"] == 3
    assert meta["model"]["train_step"] == 12
    state, smeta = load_checkpoint(straight_run / "training-state.safetensors")
    assert smeta["train"]["step"] == 12
    assert any(k.startswith("optim.") for k in state) and any(k.startswith("ema.") for k in state)
    # the model file carries the EMA weights, which differ from the raw ones after training
    assert torch.equal(tensors["net.unet.conv_in.weight"], state["ema.unet.conv_in.weight"])
    assert not torch.equal(state["net.unet.conv_in.weight"], state["ema.unet.conv_in.weight"])
    assert (straight_run / "run.json").is_file()


def test_resume_after_clean_stop_equals_straight_run(tmp_path, digit_folder, straight_run):
    out = tmp_path / "run"
    common = ("train", "--dataset", f"folder:{digit_folder}", "--out", out, *TINY_TRAIN)
    call_cli(*common, "--steps", "5", check=True)
    run_cli(*common, "--steps", "12", "--resume", check=True)
    assert_same_weights(weights(out), weights(straight_run))
    record = json.loads((out / "run.json").read_text())
    assert record["resumed_from"] == 5 and record["earlier_sessions"][0]["resumed_from"] == 0


def test_sigint_writes_checkpoint_and_exits_130(tmp_path, digit_folder):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "diffcli", "train", "--dataset", f"folder:{digit_folder}",
                             *TINY_TRAIN, "--steps", "100000", "--ckpt-every", "0", "--log-every", "1",
                             "--out", str(out)], env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not ((out / "log.jsonl").exists() and (out / "log.jsonl").stat().st_size):
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    step = load_checkpoint(out / "training-state.safetensors")[1]["train"]["step"]
    assert 0 < step < 100000


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, digit_folder):
    out = tmp_path / "run"
    proc = call_cli("train", "--dataset", f"folder:{digit_folder}", *TINY_TRAIN, "--steps", "50", "--lr", "1e30",
                   "--ckpt-every", "1", "--out", out)
    assert proc.returncode != 0
    assert "loss became" in proc.stderr and "Traceback" not in proc.stderr
    tensors, meta = load_checkpoint(out / "training-state.safetensors")
    assert meta["train"]["step"] < 50
    # the kept checkpoint is the one written before the bad step, and it is readable
    assert all(torch.isfinite(v).all() for k, v in tensors.items() if k.startswith("ema."))


def test_ddp_two_processes_match_one(tmp_path, digit_folder):
    """torchrun with 2 CPU (gloo) processes: each takes half of the global batch; the result equals one process."""
    common = ("train", "--dataset", f"folder:{digit_folder}", *TINY_TRAIN, "--steps", "4", "--ckpt-every", "0")
    one = tmp_path / "one"
    call_cli(*common, "--out", one, check=True)
    two = tmp_path / "two"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           "29517", "-m", "diffcli", *map(str, common), "--out", str(two)],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = weights(one), weights(two)
    for k in a:
        # softmax is invariant to the key bias, so its gradient is float noise that Adam rescales to full steps
        if k.startswith(("net.", "ema.")) and not k.endswith("to_k.bias"):
            assert torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4), k
    assert load_checkpoint(two / "training-state.safetensors")[1]["train"]["step"] == 4


def test_bf16_autocast_trains_and_resume_keeps_it(tmp_path, digit_folder, straight_run):
    out = tmp_path / "run"
    common = ("train", "--dataset", f"folder:{digit_folder}", "--out", out, *TINY_TRAIN)
    call_cli(*common, "--steps", "3", "--precision", "bf16", check=True)
    run_cli(*common, "--steps", "12", "--resume", check=True)
    tensors, meta = load_checkpoint(out / "training-state.safetensors")
    assert meta["train"]["config"]["precision"] == "bf16" and meta["train"]["step"] == 12
    assert all(torch.isfinite(v).all() for v in tensors.values())
    # bf16 arithmetic really ran: the weights are close to, but not exactly, the fp32 run's
    ref = weights(straight_run)
    k = "net.unet.conv_in.weight"
    assert not torch.equal(tensors[k], ref[k]) and torch.allclose(tensors[k], ref[k], atol=0.05)


def test_batch_order_is_a_function_of_seed_and_covers_each_epoch():
    order = BatchOrder(10, 4, seed=3)
    first = torch.cat([order.indices(s) for s in range(5)])  # 20 draws = 2 epochs
    assert sorted(first[:10].tolist()) == list(range(10)) and sorted(first[10:].tolist()) == list(range(10))
    assert torch.equal(BatchOrder(10, 4, seed=3).indices(3), order.indices(3))


def test_idx_mnist_loader(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    imgs = np.random.default_rng(0).integers(0, 256, (5, 28, 28)).astype(np.uint8)
    write_idx(raw / "t10k-images-idx3-ubyte.gz", imgs)
    write_idx(raw / "t10k-labels-idx1-ubyte.gz", np.array([0, 1, 2, 3, 4], dtype=np.uint8))
    ds = load_dataset("mnist", tmp_path, "test")
    assert ds.images.shape == (5, 1, 28, 28) and torch.equal(ds.images[:, 0], torch.from_numpy(imgs))
    assert ds.labels.tolist() == [0, 1, 2, 3, 4] and ds.num_classes == 10


def test_folder_dataset_labels_from_subfolders(digit_folder):
    ds = load_dataset(f"folder:{digit_folder}")
    assert ds.class_names == ["class0", "class1", "class2"]
    assert ds.images.shape == (18, 1, 8, 8) and ds.labels.bincount().tolist() == [6, 6, 6]
