"""What a new user found trying bad and odd inputs from outside (issue 30), each case and its class: every input
path through one check (`shared.inputs.input_path`), every JSON read back through one bounded reader, prompt files
as streams, environment variables with ranges, linear naming, library warnings as diffcli notes, and the newer
commands (sweep, rerun, --config, RUN@STEP, train's memory, pg --resume, eval --summary) held to the same rule:
the whole input checked before anything is written, one short line, nothing written outside the output folder."""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, invoke_cli, write_digit_folder
from diffcli.shared.errors import DiffcliError
from diffcli.shared.inputs import (JSON_MAX_DEPTH, SHOWN_MAX, env_number, input_path, one_line, read_json,
                                   read_stream)
from diffcli.shared.names import unique_stems

ROOT_USER = hasattr(os, "geteuid") and os.geteuid() == 0


@pytest.fixture
def odd(tmp_path):
    """Paths that are not what a command expects: a symlink loop, a dangling link, a folder, a device, a FIFO, a
    regular file (where a folder is expected)."""
    base = tmp_path / "odd"
    base.mkdir()
    (base / "loop-a").symlink_to(base / "loop-b")
    (base / "loop-b").symlink_to(base / "loop-a")
    (base / "dangling").symlink_to(base / "gone")
    (base / "folder").mkdir()
    (base / "file.txt").write_text("a file\n")
    os.mkfifo(base / "fifo")
    return {"loop": (base / "loop-a", "symlink loop"), "dangling": (base / "dangling", "dangling symlink"),
            "folder": (base / "folder", "is a folder"), "device": (Path(os.devnull), "character device"),
            "fifo": (base / "fifo", "FIFO"), "file": (base / "file.txt", "not a folder")}


def one_error_line(code: int, err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: ") and "internal error" not in err, err
    return lines[0]


# ---------------------------------------------------------------- the class: every path a command reads

# (command line with PATH where the path goes, the kinds of odd path it must refuse); files and folders
FILE_INPUTS = {
    "sample --checkpoint": ["sample", "--checkpoint", "PATH", "--n", "1"],
    "pg --checkpoint": ["pg", "--checkpoint", "PATH", "--n", "2"],
    "seg --prompts-file": ["seg", "--prompts-file", "PATH", "--model", "m"],
    "panorama --prompts-file": ["panorama", "--prompts-file", "PATH", "--model", "m"],
    "anagram --prompts-file": ["anagram", "--prompts-file", "PATH", "--model", "m"],
    "sample --config": ["sample", "--config", "PATH"],
    "rerun RUN_JSON": ["rerun", "PATH"],
}
FOLDER_INPUTS = {
    "eval FOLDER": ["eval", "PATH", "--digits"],
    "train --dataset folder:": ["train", "--dataset", "folder:PATH", "--steps", "1"],
    "seg --model": ["seg", "a cat", "--model", "PATH"],
    "eval --fid REF": ["eval", "FOLDER", "--fid", "PATH"],
}


def _args(template, path, folder):
    return [a.replace("PATH", str(path)).replace("FOLDER", str(folder)) for a in template]


@pytest.mark.parametrize("kind", ["loop", "dangling", "folder", "device", "fifo"])
@pytest.mark.parametrize("name", list(FILE_INPUTS))
def test_every_file_input_refuses_odd_paths_in_one_line(name, kind, odd, tmp_path, capsys):
    path, said = odd[kind]
    if kind == "folder" and ("checkpoint" in name or "rerun" in name):  # a run folder: the file inside is missing
        said = "not found" if "checkpoint" in name else "no run.json"
    if kind == "fifo" and "--config" in name:
        pytest.skip("a config is a stream: a FIFO no one writes to is an empty config")
    if kind == "fifo" and "prompts-file" in name:  # a stream: a FIFO no one writes to reads as empty, never hangs
        said = "not valid JSON" if "anagram" in name else "no prompts"
    out = tmp_path / "out"
    code, _, err = invoke_cli([*_args(FILE_INPUTS[name], path, tmp_path), "--out", out], capsys)
    line = one_error_line(code, err)
    assert said in line and str(path)[:20] in line, line
    assert not out.exists()


@pytest.mark.parametrize("kind", ["loop", "dangling", "file", "device"])
@pytest.mark.parametrize("name", list(FOLDER_INPUTS))
def test_every_folder_input_refuses_odd_paths_in_one_line(name, kind, odd, tmp_path, capsys):
    path, said = odd[kind]
    folder = write_digit_folder(tmp_path / "digits", classes=2, per_class=2)
    out = tmp_path / "out"
    code, _, err = invoke_cli([*_args(FOLDER_INPUTS[name], path, folder), "--out", out], capsys)
    if code == 2 and "--out" in err and "no such option" in err.lower():  # eval takes no --out
        code, _, err = invoke_cli(_args(FOLDER_INPUTS[name], path, folder), capsys)
    line = one_error_line(code, err)
    assert "symlink loop" in line if kind == "loop" else True, line
    assert "dangling symlink" in line if kind == "dangling" else True, line
    assert not out.exists()


def test_input_path_names_each_problem(odd):
    for kind, (path, said) in odd.items():
        expect = "folder" if kind == "file" else "file"
        with pytest.raises(DiffcliError, match=said):
            input_path(path, "thing", expect)
    assert input_path(odd["folder"][0], "thing", "folder") == odd["folder"][0]
    assert input_path(odd["fifo"][0], "thing", "file", stream=True) == odd["fifo"][0]  # a pipe is a stream
    with pytest.raises(DiffcliError, match="character device"):  # /dev/null reads as nothing forever
        input_path(os.devnull, "thing", "file", stream=True)
    with pytest.raises(DiffcliError, match="the path is empty"):
        input_path("", "thing")


@pytest.mark.skipif(ROOT_USER, reason="root reads every file")
def test_an_unreadable_file_is_named(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("x")
    secret.chmod(0)
    with pytest.raises(DiffcliError, match="permission denied"):
        input_path(secret, "prompts file")


def test_a_checkpoint_that_is_a_symlink_loop(odd, tmp_path, capsys):
    code, _, err = invoke_cli(["sample", "--checkpoint", odd["loop"][0], "--out", tmp_path / "o"], capsys)
    assert "symlink loop" in one_error_line(code, err)


# ---------------------------------------------------------------- prompts files are streams

def test_prompts_from_a_pipe_and_from_standard_input(tmp_path, monkeypatch):
    from diffcli.shared.names import read_prompts_file
    read, write = os.pipe()  # what `<(printf ...)` hands a command: /dev/fd/N, a pipe
    os.write(write, b"a cat\n# a comment\n\na dog\n")
    os.close(write)
    try:
        assert read_prompts_file(f"/dev/fd/{read}") == ["a cat", "a dog"]
    finally:
        os.close(read)
    import io
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"from stdin\n")))
    assert read_prompts_file("-") == ["from stdin"]


def test_a_prompts_process_substitution_through_the_cli(tmp_path, tiny_sd):
    """The real shell case: `diffcli seg --prompts-file <(printf ...)`."""
    out = tmp_path / "o"
    cmd = (f"{shlex.quote(sys.executable)} -m diffcli seg --prompts-file <(printf 'a cat\\na dog\\n') "
           f"--model {shlex.quote(str(tiny_sd))} --steps 1 --n 1 --out {shlex.quote(str(out))}")
    proc = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.glob("*.png") if p.name != "grid.png")[:2] == ["a_cat_seed0.png", "a_dog_seed0.png"]


def test_a_stream_is_bounded(tmp_path):
    big = tmp_path / "big.txt"
    big.write_bytes(b"a cat\n" * 2000)
    with pytest.raises(DiffcliError, match="larger than"):
        read_stream(big, "prompts file", max_bytes=1000)
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe")
    with pytest.raises(DiffcliError, match="not UTF-8"):
        read_stream(bad, "prompts file")


# ---------------------------------------------------------------- linear naming

def test_naming_many_copies_of_one_prompt_is_linear():
    """8,000 copies used to take a minute (each copy tried -2, -3, ... from the start); the rule is unchanged."""
    assert unique_stems(["a cat", "a/cat", "A cat", "a cat-2", "a cat"]) == \
        ["a_cat", "a_cat-2", "A_cat-3", "a_cat-2-2", "a_cat-4"]
    start = time.process_time()
    small = unique_stems(["a cat"] * 2000)
    t_small = time.process_time() - start
    start = time.process_time()
    big = unique_stems(["a cat"] * 20000)
    t_big = time.process_time() - start
    assert small[-1] == "a_cat-2000" and big[-1] == "a_cat-20000" and len(set(big)) == 20000
    # quadratic would be 100x; linear 10x: allow generous noise (no absolute time thresholds)
    assert t_big < 40 * max(t_small, 1e-3), (t_small, t_big)


def test_naming_keeps_the_first_free_suffix_with_crops():
    """The rule is still 'the first free -k': a suffix taken only by another prompt's crop is skipped for a prompt
    with that crop and used by one without (the first file of a stem is the same for every prompt)."""
    from diffcli import panorama
    jobs = panorama.name_jobs([panorama.Job("x"), panorama.Job("x-2 5"), panorama.Job("x", [5]),
                               panorama.Job("x")])
    assert [j.stem for j in jobs] == ["x", "x-2_5", "x-3", "x-2"]


# ---------------------------------------------------------------- one bounded JSON reader

def test_deep_json_is_one_line_everywhere(tmp_path, capsys):
    deep = "[" * 100_000 + "]" * 100_000
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(deep)
    code, _, err = invoke_cli(["rerun", run / "run.json"], capsys)
    assert "nests 100000 levels deep" in one_error_line(code, err)
    code, _, err = invoke_cli(["sample", "--n", "1", "--out", run, "--resume"], capsys)
    assert one_error_line(code, err)
    prompts = tmp_path / "p.json"
    prompts.write_text(deep)
    code, _, err = invoke_cli(["anagram", "--prompts-file", prompts, "--out", tmp_path / "a"], capsys)
    assert "nests" in one_error_line(code, err)
    assert json.loads(json.dumps([[[[1]]]])) == read_json(_write(tmp_path / "ok.json", "[[[[1]]]]"), "x")
    with pytest.raises(DiffcliError, match=f"at most {JSON_MAX_DEPTH}"):
        read_json(_write(tmp_path / "d.json", "{\"a\":" * 65 + "1" + "}" * 65), "x")
    # brackets inside strings do not count
    assert read_json(_write(tmp_path / "s.json", json.dumps({"k": "[" * 500})), "x") == {"k": "[" * 500}
    with pytest.raises(DiffcliError, match="larger than"):
        read_json(_write(tmp_path / "big.json", "[" + "1," * 1000 + "1]"), "x", max_bytes=100)


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# ---------------------------------------------------------------- environment variables with ranges

@pytest.mark.parametrize("value", ["1e99", "inf", "nan", "-5", "0", "abc", "9" * 5000])
def test_dist_timeout_has_a_range(value, monkeypatch):
    from diffcli.shared.dist import rendezvous_timeout
    monkeypatch.setenv("DIFFCLI_DIST_TIMEOUT", value)
    with pytest.raises(DiffcliError, match=r"DIFFCLI_DIST_TIMEOUT=.*expected a number in \[0.001, 1e\+06\]") as e:
        rendezvous_timeout()
    assert len(str(e.value)) < 300


def test_env_number_reads_what_is_in_range(monkeypatch):
    monkeypatch.setenv("X_TEST", " 12 ")
    assert env_number("X_TEST", 3, 1, 100, integer=True) == 12
    monkeypatch.delenv("X_TEST")
    assert env_number("X_TEST", 3, 1, 100, integer=True) == 3
    monkeypatch.setenv("X_TEST", "1.5")
    with pytest.raises(DiffcliError, match="an integer"):
        env_number("X_TEST", 3, 1, 100, integer=True)


def test_a_sweep_under_a_bad_rank_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RANK", "abc")
    code, _, err = invoke_cli(["sweep", "sample", "--n", "1", "--steps", "1", "--grid", "cfg=1,2",
                               "--out", tmp_path / "s"], capsys)
    assert code != 0 and "RANK" in err and "internal error" not in err


# ---------------------------------------------------------------- library warnings

def test_library_warnings_never_reach_the_user(tmp_path, capsys):
    from diffcli.runner import Command, RunContext, execute

    def noisy(cfg, ctx):
        warnings.warn("some library's chatter", UserWarning)
        return 0
    command = Command("noisy", object, lambda cfg: None, noisy)
    execute(command, None, RunContext())
    assert "chatter" not in capsys.readouterr().err


def test_fid_on_too_few_images_says_how_many_are_needed(tmp_path, capsys):
    folder = write_digit_folder(tmp_path / "a", classes=2, per_class=3)
    ref = write_digit_folder(tmp_path / "b", classes=2, per_class=3, seed=1)
    code, out, err = invoke_cli(["eval", folder, "--fid", ref, "--features", "mnist"], capsys)
    assert code == 0, err
    assert "LinAlgWarning" not in err and "Warning:" not in err, err
    note = next(line for line in err.splitlines() if "covariance is singular" in line)
    assert note.startswith("warning: FID: the folder has") and "at least" in note


# ---------------------------------------------------------------- sweep

def test_sweep_counts_the_grid_before_building_it(tmp_path, capsys):
    grid = [a for k in ("seed", "n", "steps", "cfg", "sigma_max", "s_churn", "rho", "s_noise", "eta", "nrow")
            for a in ("--grid", f"{k}={','.join(str(v) for v in range(1, 11))}")]
    code, _, err = invoke_cli(["sweep", "sample", *grid, "--yes", "--out", tmp_path / "s"], capsys)
    assert "10,000,000,000 settings" in one_error_line(code, err)
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("grid,said", [
    (["--grid", "cfg=1,2", "--grid", "guidance=3"], "are the same option --cfg"),
    (["--grid", "labels=1,zz"], "--labels expects"),
    (["--grid", "checkpoint=/no/such/model"], "not found"),
    (["--grid", "steps=1,abc"], "steps"),
])
def test_sweep_refuses_a_bad_grid_before_writing(grid, said, tmp_path, capsys):
    code, _, err = invoke_cli(["sweep", "sample", "--n", "1", "--steps", "1", *grid, "--out", tmp_path / "s"], capsys)
    assert said in one_error_line(code, err)
    assert not (tmp_path / "s").exists()


def test_sweep_setting_names_never_collide():
    from diffcli.sweep import setting_names
    long = "x" * 300
    names = setting_names([{"blur": long + "a"}, {"blur": long + "b"}, {"blur": "a/b"}, {"blur": "a b"}])
    assert len(set(names)) == 4 and names[1] == names[0] + "-2" and names[3] == names[2] + "-2"


def test_sweep_resume_rescores_a_corrupt_scored_file(tmp_path, capsys):
    args = ["sweep", "sample", "--n", "2", "--steps", "1", "--grid", "cfg=1,2", "--score", "digits",
            "--out", tmp_path / "s"]
    code, _, err = invoke_cli(args, capsys)
    assert code == 0, err
    before = json.loads((tmp_path / "s" / "results.json").read_text())
    for text in ("{not json", "[" * 10_000, '{"setting": {"cfg": "9"}}'):
        (tmp_path / "s" / "cfg-1" / ".scored.json").write_text(text)
        code, _, err = invoke_cli([*args, "--resume"], capsys)
        assert code == 0, err
        assert json.loads((tmp_path / "s" / "results.json").read_text()) == before


# ---------------------------------------------------------------- rerun

def test_rerun_quotes_its_echo_and_works_inside_the_run_folder(tmp_path, capsys, monkeypatch):
    run = tmp_path / "a;b"
    code, _, err = invoke_cli(["sample", "--n", "1", "--steps", "1", "--out", run], capsys)
    assert code == 0, err
    monkeypatch.chdir(run)
    code, _, err = invoke_cli(["rerun", "run.json"], capsys)
    assert code == 0, err
    echoed = err.strip().splitlines()[0]
    assert shlex.split(echoed)[-1] == str(tmp_path / "a;b-rerun") and "'" in echoed
    assert (tmp_path / "a;b-rerun" / "run.json").is_file()


def test_rerun_never_writes_into_a_full_folder_a_config_says_to_overwrite(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("c.toml").write_text("overwrite = true\nn = 1\nsteps = 1\n")
    code, _, err = invoke_cli(["sample", "--config", "c.toml", "--out", "run"], capsys)
    assert code == 0, err
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.txt").write_text("do not touch")
    code, _, err = invoke_cli(["rerun", "run", "--out", mine], capsys)
    assert "not empty" in one_error_line(code, err)
    assert sorted(p.name for p in mine.iterdir()) == ["thesis.txt"]


# ---------------------------------------------------------------- --config

@pytest.mark.parametrize("text,said", [
    ("n = true\n", "n = true is a boolean; n takes an integer"),
    ("n = 2.5\n", "n takes an integer"),
    ("cfg = true\n", "cfg takes a number"),
    ("steps = [1, 2]\n", "takes one value, not a list"),
    ("clip_denoised = 1\n", "takes true or false"),
])
def test_config_types_are_strict(text, said, tmp_path, capsys):
    config = tmp_path / "c.toml"
    config.write_text(text)
    code, _, err = invoke_cli(["sample", "--config", config, "--out", tmp_path / "o"], capsys)
    assert said in one_error_line(code, err)
    assert not (tmp_path / "o").exists()


def test_a_huge_value_comes_back_as_a_short_line(tmp_path, capsys):
    config = tmp_path / "c.toml"
    config.write_text('sampler = "' + "x" * 10_000_000 + '"\n')
    code, _, err = invoke_cli(["sample", "--config", config, "--out", tmp_path / "o"], capsys)
    line = one_error_line(code, err)
    assert len(line) < 700 and "10000000 characters" in line
    assert len(one_line("a" * 10_000)) < 700
    assert one_line("got '" + "y" * 1000 + "'").count("y") == SHOWN_MAX


# ---------------------------------------------------------------- --checkpoint RUN@STEP

def test_run_at_step_lists_the_steps_and_a_real_folder_wins(tiny_run, tmp_path, capsys):
    import shutil
    run = tmp_path / "run"
    (run / "snapshots").mkdir(parents=True)
    for step in (100, 200):
        shutil.copy(tiny_run / "model.safetensors", run / "snapshots" / f"step-{step:07d}.safetensors")
    code, _, err = invoke_cli(["sample", "--checkpoint", f"{run}@150", "--n", "1", "--out", tmp_path / "o"], capsys)
    assert "it has steps 100, 200" in one_error_line(code, err)
    real = tmp_path / "model@5"  # a folder whose name looks like a snapshot reference is that folder
    shutil.copytree(tiny_run, real)
    code, _, err = invoke_cli(["sample", "--checkpoint", real, "--n", "1", "--steps", "1", "--out", tmp_path / "o"],
                              capsys)
    assert code == 0, err


# ---------------------------------------------------------------- train: memory before any work

def test_train_on_huge_sequence_frames_is_refused_before_allocating(tmp_path, capsys, monkeypatch):
    from conftest import write_idx
    import diffcli.data.sequences as sequences
    import diffcli.shared.memory as memory
    root = tmp_path / "mnist"
    root.mkdir()
    write_idx(root / "t10k-images-idx3-ubyte.gz", np.zeros((10000, 28, 28), np.uint8))
    write_idx(root / "t10k-labels-idx1-ubyte.gz", np.zeros(10000, np.uint8))
    monkeypatch.setattr(memory, "device_memory", lambda device: 64 * 2**30)  # a 64 GiB machine

    def never(*a, **kw):
        raise AssertionError("the digit tiles were resized before the memory check")
    monkeypatch.setattr(sequences, "digit_tiles", never)
    import diffcli.data.datasets as datasets
    monkeypatch.setattr(datasets, "digit_tiles", never)
    code, _, err = invoke_cli(["train", "--dataset", "circle-jumping", "--data-root", root, "--split", "test",
                               "--image-size", "8192", "--steps", "1", "--out", tmp_path / "o"], capsys)
    assert "needs at least" in one_error_line(code, err) and "--image-size" in err
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------- pg --resume

@pytest.mark.parametrize("damage", ["shape", "no_images", "other_set", "garbage"])
def test_pg_resume_redraws_a_particle_set_that_is_not_this_runs(damage, tiny_run, tmp_path, capsys):
    from diffcli.pg import SETS
    from diffcli.shared.checkpoints import save_checkpoint
    args = ["pg", "--checkpoint", tiny_run, "--n", "2", "--steps", "2", "--labels", "all", "--pg-factor", "3",
            "--compare", "--device", "cpu"]
    whole = tmp_path / "whole"
    assert invoke_cli([*args, "--out", whole], capsys)[0] == 0
    cut = tmp_path / "cut"
    assert invoke_cli([*args, "--out", cut], capsys)[0] == 0
    for p in cut.rglob("*.png"):
        p.unlink()  # as if killed after drawing: the sets are gone after a finished run, so write them back
    sets = cut / "plain" / SETS
    sets.mkdir(parents=True, exist_ok=True)
    path = sets / "00000.safetensors"
    images = torch.rand(2, 1, 8, 8)
    if damage == "shape":
        save_checkpoint(path, {"images": torch.rand(3, 1, 5, 5)}, {"pg_set": {"name": "plain", "index": 0}})
    elif damage == "no_images":
        save_checkpoint(path, {"other": images}, {"pg_set": {"name": "plain", "index": 0}})
    elif damage == "other_set":
        save_checkpoint(path, {"images": images}, {"pg_set": {"name": "pg", "index": 0}})
    else:
        path.write_bytes(b"not a tensor file")
    code, _, err = invoke_cli([*args, "--out", cut, "--resume"], capsys)
    assert code == 0, err
    for p in whole.rglob("*.png"):
        if p.name != "embedding.png":
            assert p.read_bytes() == (cut / p.relative_to(whole)).read_bytes(), p


# ---------------------------------------------------------------- eval

def test_eval_summary_never_lands_in_a_scored_folder(tmp_path, capsys):
    a = write_digit_folder(tmp_path / "a", classes=2, per_class=2)
    b = write_digit_folder(tmp_path / "b", classes=2, per_class=2, seed=1)
    (a / "eval.json").write_text('{"fid": {"value": 1.0}}')
    code, _, err = invoke_cli(["eval", "--summary", a / "eval", a, b, "--digits"], capsys)
    assert "inside the scored folder" in one_error_line(code, err)
    assert json.loads((a / "eval.json").read_text()) == {"fid": {"value": 1.0}}


def test_fid_reads_only_the_samples_a_pg_compare_run_lists(tiny_run, tmp_path, capsys):
    from diffcli.data.fid import feature_files
    out = tmp_path / "pg"
    code, _, err = invoke_cli(["pg", "--checkpoint", tiny_run, "--n", "3", "--steps", "2", "--labels", "all",
                               "--pg-factor", "3", "--compare", "--device", "cpu", "--out", out], capsys)
    assert code == 0, err
    assert (out / "compare.png").is_file()
    files, notes = feature_files(str(out), "folder")
    listed = [s["file"] for s in json.loads((out / "run.json").read_text())["samples"]]
    assert sorted(Path(f).name for f in files) == sorted(listed)
    assert not any(Path(f).name in ("compare.png", "embedding.png", "grid.png") for f in files)
    assert not any("plain" in Path(f).parts for f in files)
    assert notes and "compare.png" in notes[0]
