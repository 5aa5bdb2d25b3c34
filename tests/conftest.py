"""Shared fixtures: tiny datasets written to temp folders and tiny trained checkpoints, all built in code."""
from __future__ import annotations

import contextlib
import gzip
import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
torch.set_num_threads(1)


def run_cli(*args: str, check: bool = False, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the real `diffcli` entry point in a subprocess."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "diffcli", *map(str, args)], capture_output=True, text=True,
                          env=full_env, timeout=timeout, cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"diffcli {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


WRITE_LOG_HOOK = """import os
_replace = os.replace


def _logged_replace(src, dst, *args, **kwargs):
    _replace(src, dst, *args, **kwargs)
    with open(os.environ["DIFFCLI_TEST_WRITE_LOG"], "a") as log:
        log.write(os.fspath(dst) + chr(10))


os.replace = _logged_replace
"""


def write_log_env(folder: Path) -> tuple[dict, Path]:
    """Environment for run_cli/run_torchrun that logs every file our atomic writes (`files.atomic_path`, whose last
    step is os.replace) put in place, one line each, from every process: (env, log file)."""
    hook = folder / "hook"
    hook.mkdir(parents=True, exist_ok=True)
    (hook / "sitecustomize.py").write_text(WRITE_LOG_HOOK)
    log = folder / "writes.log"
    return {"PYTHONPATH": os.pathsep.join([str(hook), str(ROOT)]), "DIFFCLI_TEST_WRITE_LOG": str(log)}, log


def entry_point(args) -> int:
    """The console script's entry point (`diffcli.cli:run`) run in this process with `args`; its exit code."""
    from diffcli import cli
    argv = sys.argv
    sys.argv = ["diffcli", *map(str, args)]
    try:
        cli.run()
        return 0
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1
    finally:
        sys.argv = argv


def invoke_cli(args, capsys) -> tuple[int, str, str]:
    """`entry_point` with pytest's capture: (exit code, stdout, stderr), without paying an interpreter start and the
    imports per call (run_cli covers the real subprocess)."""
    capsys.readouterr()
    code = entry_point(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def call_cli(*args: str, check: bool = False) -> subprocess.CompletedProcess:
    """run_cli's answer (exit code, stdout, stderr) from `entry_point`, for tests that need no real process: no
    interpreter start and no imports per call. Usable where capsys is not (session and module fixtures)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = entry_point(args)
    proc = subprocess.CompletedProcess(["diffcli", *map(str, args)], code, out.getvalue(), err.getvalue())
    if check and code != 0:
        raise AssertionError(f"diffcli {' '.join(map(str, args))} failed ({code}):\n{proc.stderr}")
    return proc


def pixels(path):
    """An image's mode, size and pixels, not the settings it carries (they name the command line, which differs)."""
    from PIL import Image
    with Image.open(path) as im:
        return im.mode, im.size, im.tobytes()


def write_digit_folder(root: Path, classes: int = 3, per_class: int = 6, size: int = 8, seed: int = 0) -> Path:
    """A labelled image folder: class k is a bright bar at a class-specific row, plus noise."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    for k in range(classes):
        d = root / f"class{k}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = rng.integers(0, 60, (size, size), dtype=np.uint8)
            img[(2 * k + 1) % size, :] = 255
            Image.fromarray(img).save(d / f"{i}.png")
    return root


def write_idx(path: Path, array: np.ndarray) -> None:
    magic = (0x08 << 8) | array.ndim
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture(scope="session")
def digit_folder(tmp_path_factory) -> Path:
    return write_digit_folder(tmp_path_factory.mktemp("digits"))


TINY_TRAIN = ("--net", "tiny", "--batch", "8", "--lr", "2e-3", "--lr-warmup", "1", "--grid-every", "0",
              "--log-every", "0", "--quiet", "--device", "cpu")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, digit_folder) -> Path:
    """A tiny class-conditional EDM model trained for a few steps (weights are what they are; tests use its shape)."""
    out = tmp_path_factory.mktemp("run") / "run"
    call_cli("train", "--dataset", f"folder:{digit_folder}", "--steps", "4", "--out", out, *TINY_TRAIN, check=True)
    return out


@pytest.fixture(scope="session")
def tiny_uncond_run(tmp_path_factory, digit_folder) -> Path:
    out = tmp_path_factory.mktemp("run") / "run"
    call_cli("train", "--dataset", f"folder:{digit_folder}", "--unconditional", "--steps", "2", "--out", out,
            *TINY_TRAIN, check=True)
    return out


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory) -> Path:
    from pipes import build_tiny_sd
    return build_tiny_sd(tmp_path_factory.mktemp("tiny-sd"))


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory) -> Path:
    from pipes import build_tiny_sdxl
    return build_tiny_sdxl(tmp_path_factory.mktemp("tiny-sdxl"))


@pytest.fixture(scope="session")
def tiny_if(tmp_path_factory) -> tuple[Path, Path]:
    """DeepFloyd IF stages I and II (tests/pipes.py), built once for the session."""
    from pipes import build_tiny_if
    return build_tiny_if(tmp_path_factory.mktemp("tiny-if"))


def run_torchrun(*args: str, port: int, nproc: int = 2, env: dict | None = None) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node N -m diffcli -- ARGS` on CPU ranks (the `--` keeps torchrun off `--n`)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                           "--master_port", str(port), "-m", "diffcli", "--", *map(str, args)],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="session")
def tiny_sd3(tmp_path_factory) -> Path:
    """A tiny random SD3 pipeline (tests/pipes.py), built once for the session."""
    from pipes import build_tiny_sd3
    return build_tiny_sd3(tmp_path_factory.mktemp("tiny-sd3"))


@pytest.fixture(scope="session")
def tiny_flux(tmp_path_factory) -> Path:
    """A tiny random guidance-distilled Flux pipeline (tests/pipes.py), built once for the session."""
    from pipes import build_tiny_flux
    return build_tiny_flux(tmp_path_factory.mktemp("tiny-flux"))


K_DIFFUSION_INSTALL = "pip install --no-deps k-diffusion==0.1.1.post1 (with the test extra's torchdiffeq)"


@pytest.fixture(scope="session")
def k_sampling():
    """k-diffusion's `sampling` module, the reference the samplers are checked against. Its package __init__
    imports its training stack (wandb, kornia, clip, ...), so the package is installed without dependencies and
    only `sampling` (with `utils`) is loaded here; a missing install is a failure, not a skip."""
    import importlib
    import importlib.util
    import types

    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail(f"k-diffusion is not installed: {K_DIFFUSION_INSTALL}")
    if "k_diffusion.sampling" not in sys.modules:
        package = types.ModuleType("k_diffusion")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules.setdefault("k_diffusion", package)
    return importlib.import_module("k_diffusion.sampling")
