"""Every script in benchmarks/ runs, at tiny settings, so none of them rots unnoticed.

Each script takes `--smoke`: tiny sizes, steps and sample counts, outputs in temp folders. It runs here as
`python benchmarks/NAME.py --smoke` would, from a temp folder so that nothing lands in the repository. Benchmarks
print ratios measured in one run; no timing is judged here.
Scripts that read MNIST (they have `--data-root`) get a tiny fake one: the t10k IDX files and the held-out
mnist_5k.csv.gz, a few digits each. A new script is picked up by the glob; it must take `--smoke` too.
"""
from __future__ import annotations

import gzip
import os
import re
import runpy
import subprocess
import sys
import tempfile

import numpy as np
import pytest

from conftest import ROOT, write_idx

BENCHMARKS = ROOT / "benchmarks"
HELPERS = {"__init__.py": "package marker",
           "mnist_data.py": "the MNIST reader the data scripts import; runs within each of them"}
SCRIPTS = sorted(p.name for p in BENCHMARKS.glob("*.py") if p.name not in HELPERS)


@pytest.fixture(scope="module")
def fake_mnist(tmp_path_factory):
    """A tiny MNIST folder as benchmarks/mnist_data.py reads it: 20 t10k digits and a 20-row held-out set."""
    root = tmp_path_factory.mktemp("mnist")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 40, (20, 28, 28)).astype(np.uint8)
    for i in range(20):
        images[i, 4:24, 6 + i % 10:11 + i % 10] = 255
    labels = np.arange(20) % 10
    write_idx(root / "t10k-images-idx3-ubyte.gz", images)
    write_idx(root / "t10k-labels-idx1-ubyte.gz", labels)
    rows = np.concatenate([images[::-1].reshape(20, -1), labels[:, None]], 1)
    with gzip.open(root / "mnist_5k.csv.gz", "wt") as f:
        np.savetxt(f, rows, fmt="%d", delimiter=",")
    return root


def test_scripts_are_found():
    assert len(SCRIPTS) >= 14 and "seg_overhead.py" in SCRIPTS


@pytest.mark.parametrize("helper", sorted(set(HELPERS) - {"__init__.py"}))
def test_helper_is_used_by_a_script(helper):
    """A helper module has no smoke run of its own: some script must import it."""
    stem = helper[:-3]
    pattern = re.compile(rf"^from (benchmarks\.)?{stem} import", re.M)
    users = [s for s in SCRIPTS if pattern.search((BENCHMARKS / s).read_text())]
    assert users, f"benchmarks/{helper} is imported by no script"


@pytest.mark.parametrize("script", SCRIPTS)
def test_benchmark_smoke(script, fake_mnist, tmp_path, monkeypatch, capsys):
    """In this process (runpy, as `python benchmarks/NAME.py --smoke`), temp files under tmp_path; a script that
    spawns processes of its own (multiprocessing pickles its __main__) runs in a real subprocess."""
    path = BENCHMARKS / script
    text = path.read_text()
    args = ["--smoke", *(["--data-root", str(fake_mnist)] if '"--data-root"' in text else [])]
    cwd, temp = tmp_path / "cwd", tmp_path / "temp"
    cwd.mkdir()
    temp.mkdir()
    if "multiprocessing" in text:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TMPDIR": str(temp)}
        proc = subprocess.run([sys.executable, str(path), *args], cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=600)
        code, out, err = proc.returncode, proc.stdout, proc.stderr
    else:
        monkeypatch.chdir(cwd)
        monkeypatch.setenv("OMP_NUM_THREADS", "1")  # some scripts set it for the processes they start
        monkeypatch.setattr(tempfile, "tempdir", str(temp))
        monkeypatch.setattr(sys, "argv", [str(path), *args])
        monkeypatch.setattr(sys, "path", list(sys.path))  # the scripts put their folders in front
        capsys.readouterr()
        try:
            runpy.run_path(str(path), run_name="__main__")
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        out, err = capsys.readouterr()
    assert code == 0, f"{script} --smoke failed ({code}):\n{out[-2000:]}\n{err[-3000:]}"
    assert out.strip(), f"{script} --smoke printed nothing"
    assert not list(cwd.iterdir()), f"{script} --smoke wrote into its working folder: {list(cwd.iterdir())}"
