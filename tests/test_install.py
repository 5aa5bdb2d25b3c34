"""diffcli installs like a library: a wheel carries the shipped models, model cards and prompt sets inside the
package, and an installed diffcli (wheel or editable) finds them through diffcli.shared.shipped, from any directory.

The wheel is built offline from a copy of the sources (so the build's build/ and egg-info never land in the
checkout), installed with `pip install --target`, and run from a folder outside the repository with PYTHONPATH
holding only that target. About 30 s.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import ROOT
from diffcli.shared import shipped
from diffcli.shared.errors import DiffcliError

# what the build reads; tests/ and benchmarks/ stay out of the copy and must stay out of the wheel
BUILD_INPUTS = ("pyproject.toml", "README.md", "diffcli", "checkpoints", "prompts")
CARDS = ("circle-jumping.md", "mnist-edm.md", "mnist-edm-guide.md", "mnist-classifier.md", "mnist-blurring.md")
PROMPT_SETS = ["ambiguous_image_prompts.json", "wide_image_prompts.json"]

# run first in every child: the checkout's own editable install (a finder on sys.meta_path) must not be the
# diffcli that answers, so it is dropped; the repository is not on sys.path either (cwd and PYTHONPATH elsewhere)
NO_CHECKOUT = ("import sys; sys.meta_path[:] = [f for f in sys.meta_path "
               "if '__editable__' not in str(getattr(f, '__module__', ''))]; ")


def pip(*args: str, cwd: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "pip", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}, timeout=300)
    assert proc.returncode == 0, f"pip {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


def child_env(pythonpath: Path | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    return env


def python(code: str, cwd: Path, pythonpath: Path | None) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-c", NO_CHECKOUT + code], cwd=cwd, env=child_env(pythonpath),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def copy_sources(dest: Path) -> Path:
    dest.mkdir(parents=True)
    for name in BUILD_INPUTS:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(src, dest / name)
    return dest


@pytest.fixture(scope="module")
def wheel_install(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("install")
    src = copy_sources(tmp / "src")
    pip("wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist"), ".", cwd=src)
    (wheel,) = (tmp / "dist").glob("diffcli-*.whl")
    pip("install", "--no-deps", "--target", str(tmp / "site"), str(wheel), cwd=tmp)
    work = tmp / "elsewhere"
    work.mkdir()
    return wheel, tmp / "site", work


def test_wheel_carries_the_shipped_files_and_no_tests(wheel_install):
    wheel, _, _ = wheel_install
    names = zipfile.ZipFile(wheel).namelist()
    for f in [*(p.name for p in (ROOT / "checkpoints").glob("*.safetensors")), *CARDS]:
        assert f"diffcli/checkpoints/{f}" in names
    for f in [*PROMPT_SETS, "README.md"]:  # the prompt sets' README holds their licence
        assert f"diffcli/prompts/{f}" in names
    for package in ("core", "data", "backends", "shared"):  # every subpackage of the library travels
        assert {f"diffcli/{package}/__init__.py", *(f"diffcli/{package}/{p.name}" for p in (ROOT / "diffcli" / package).glob("*.py"))} <= set(names)
    assert "diffcli/shared/shipped.py" in names
    tops = {n.split("/")[0] for n in names}
    assert tops == {"diffcli", wheel.name.split("-py")[0] + ".dist-info"}, tops  # no tests/, benchmarks/


def test_wheel_install_samples_from_its_own_checkpoint(wheel_install):
    """`python -m diffcli sample` as a user types it, from a folder outside the repository, PYTHONPATH = the target
    only: the default model is the one inside the installed package (the checkout's would be ROOT/checkpoints)."""
    _, site, work = wheel_install
    out = work / "digits"
    proc = subprocess.run([sys.executable, "-m", "diffcli", "sample", "--n", "2", "--steps", "2", "--out", str(out)],
                          cwd=work, env=child_env(site), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    record = json.loads((out / "run.json").read_text())
    used = Path(record["options"]["checkpoint"]).resolve()
    assert used == (site / "diffcli" / "checkpoints" / "mnist-edm.safetensors").resolve()
    assert sorted(p.name for p in out.glob("0*.png")) == ["00000-seed0-label0.png", "00001-seed1-label1.png"]


def test_wheel_install_finds_prompt_sets_and_cards(wheel_install):
    _, site, work = wheel_install
    proc = python(
        "import json, diffcli, diffcli.shared.shipped as s; from diffcli.shared.errors import DiffcliError\n"
        "from diffcli.data.prompt_files import resolve_prompts_file\n"
        "try:\n    s.checkpoint('no-such-model'); err = None\nexcept DiffcliError as e:\n    err = str(e)\n"
        "print(json.dumps({'package': diffcli.__file__, 'prompts_dir': str(s.PROMPTS_DIR),"
        " 'checkpoints_dir': str(s.CHECKPOINTS_DIR), 'sets': s.prompt_sets(), 'models': s.models(),"
        " 'wide': str(s.prompts('wide_image_prompts')), 'assignment': resolve_prompts_file('assignment', s.AMBIGUOUS_PROMPTS),"
        " 'cards': [str(s.checkpoint(c)) for c in %r], 'files': [str(p) for p in"
        " (s.SHIPPED_MODEL, s.SHIPPED_CLASSIFIER, s.SHIPPED_BLURRING) if p.is_file()], 'error': err,"
        " 'sys_path': sys.path, 'loaded': [m.__file__ for m in list(sys.modules.values()) if getattr(m, '__file__', None)"
        " and m.__name__.startswith('diffcli')]}))" % (CARDS,), work, site)
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    inside = (site / "diffcli").resolve()
    assert Path(got["package"]).resolve().parent == inside
    assert Path(got["prompts_dir"]).resolve() == inside / "prompts"
    assert Path(got["checkpoints_dir"]).resolve() == inside / "checkpoints"
    assert got["sets"] == PROMPT_SETS
    assert got["models"] == sorted(p.name for p in (ROOT / "checkpoints").glob("*.safetensors"))
    assert Path(got["wide"]).resolve() == inside / "prompts" / "wide_image_prompts.json"
    assert Path(got["assignment"]).resolve() == inside / "prompts" / "ambiguous_image_prompts.json"
    assert [Path(c).resolve() for c in got["cards"]] == [inside / "checkpoints" / c for c in CARDS]
    assert len(got["files"]) == 3
    assert got["error"] and "\n" not in got["error"] and "no-such-model" in got["error"]
    root = str(ROOT.resolve())
    assert not any(p and Path(p).resolve() == ROOT.resolve() for p in got["sys_path"])
    assert got["loaded"] and not any(str(Path(f).resolve()).startswith(root + os.sep) for f in got["loaded"])


def test_editable_install_uses_the_repository_folders(tmp_path):
    """setuptools' editable install of the same pyproject: the package is the source folder, and shipped.py finds
    checkpoints/ and prompts/ beside it (importlib.resources cannot: the editable finder maps no data packages)."""
    src = copy_sources(tmp_path / "src")
    prefix = tmp_path / "prefix"
    pip("install", "--no-deps", "--no-build-isolation", "-e", ".", "--prefix", str(prefix), cwd=src)
    (pth,) = prefix.rglob("__editable__.diffcli-*.pth")
    work = tmp_path / "elsewhere"
    work.mkdir()
    proc = python(f"import site; site.addsitedir({str(pth.parent)!r}); import json, diffcli, diffcli.shared.shipped as s; "
                  "print(json.dumps([diffcli.__file__, str(s.SHIPPED_MODEL), str(s.prompts('ambiguous_image_prompts')),"
                  " s.prompt_sets()]))", work, None)
    package, model, anagram, sets = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(package).resolve().parent == (src / "diffcli").resolve()
    assert Path(model).resolve() == (src / "checkpoints" / "mnist-edm.safetensors").resolve()
    assert Path(anagram).resolve() == (src / "prompts" / "ambiguous_image_prompts.json").resolve()
    assert sets == PROMPT_SETS


def test_checkout_paths_and_one_line_errors():
    """In the checkout, the shipped folders are the repository's; each shipped model has its model card."""
    assert shipped.CHECKPOINTS_DIR == ROOT.resolve() / "checkpoints"
    assert shipped.PROMPTS_DIR == ROOT.resolve() / "prompts"
    for path in (shipped.SHIPPED_MODEL, shipped.SHIPPED_CLASSIFIER, shipped.SHIPPED_BLURRING, shipped.SHIPPED_CIRCLE):
        assert path.is_file() and path.with_suffix(".md").is_file()
        assert shipped.checkpoint(path.stem) == path == shipped.checkpoint(path.name)
    assert shipped.prompts("wide_image_prompts") == shipped.PROMPTS_DIR / shipped.WIDE_PROMPTS
    assert shipped.prompt_sets() == PROMPT_SETS
    for call, name in ((shipped.checkpoint, "mnist-nothing"), (shipped.prompts, "nothing"),
                       (shipped.checkpoint, "../pyproject.toml"), (shipped.prompts, "")):
        with pytest.raises(DiffcliError) as e:
            call(name)
        assert "\n" not in str(e.value)
