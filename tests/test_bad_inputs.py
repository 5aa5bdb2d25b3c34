"""Every bad input: one line on stderr naming the problem, a non-zero exit, nothing written or overwritten."""
from __future__ import annotations

import errno
import os
import pickle
from pathlib import Path

import pytest
from conftest import invoke_cli



def invoke(args: list[str], capsys) -> tuple[int, str]:
    """The console script's entry point in this process: (exit code, stderr)."""
    code, _, err = invoke_cli(args, capsys)
    return code, err


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def bad_files(tmp_path, tiny_run):
    d = tmp_path / "bad"
    d.mkdir()
    good = (tiny_run / "model.safetensors").read_bytes()
    (d / "truncated.safetensors").write_bytes(good[: len(good) // 2])
    (d / "garbage.safetensors").write_bytes(os.urandom(2000))
    (d / "weights.pkl").write_bytes(pickle.dumps({"a": 1}))
    import torch
    torch.save({"w": torch.zeros(2)}, d / "weights.pt")
    from safetensors.torch import save_file
    save_file({"w": torch.zeros(2)}, str(d / "foreign.safetensors"))
    (d / "afile").write_text("x")
    (d / "prompts.json").write_text('{"x": {"prompt": 3}}\n')
    return d


CASES = [
    # (id, args, expected fragment of the message)
    ("unknown-dataset", ["train", "--dataset", "imagenet", "--out", "{tmp}/o"], "unknown dataset"),
    ("missing-data-offline", ["train", "--data-root", "{tmp}/nodata", "--out", "{tmp}/o"], "could not be downloaded"),
    ("missing-folder-dataset", ["train", "--dataset", "folder:{tmp}/nothing", "--out", "{tmp}/o"], "not found"),
    ("train-steps-zero", ["train", "--dataset", "folder:{digits}", "--steps", "0", "--out", "{tmp}/o"], "--steps"),
    ("train-bad-p-uncond", ["train", "--dataset", "folder:{digits}", "--p-uncond", "1.5", "--out", "{tmp}/o"], "--p-uncond"),
    ("train-unknown-net", ["train", "--dataset", "folder:{digits}", "--net", "huge", "--out", "{tmp}/o"], "unknown --net"),
    ("train-resume-nothing", ["train", "--dataset", "folder:{digits}", "--resume", "--out", "{tmp}/o"], "nothing to resume"),
    ("train-existing-run", ["train", "--dataset", "folder:{digits}", "--out", "{run}"], "already holds a training run"),
    ("unknown-sampler", ["sample", "--checkpoint", "{run}", "--sampler", "dpm", "--out", "{tmp}/o"], "unknown sampler"),
    ("checkpoint-missing", ["sample", "--checkpoint", "{tmp}/none.safetensors", "--out", "{tmp}/o"], "not found"),
    ("checkpoint-truncated", ["sample", "--checkpoint", "{bad}/truncated.safetensors", "--out", "{tmp}/o"], "truncated"),
    ("checkpoint-garbage", ["sample", "--checkpoint", "{bad}/garbage.safetensors", "--out", "{tmp}/o"], "not a readable safetensors"),
    ("checkpoint-pickle", ["sample", "--checkpoint", "{bad}/weights.pkl", "--out", "{tmp}/o"], "never unpickles"),
    ("checkpoint-torch-save", ["sample", "--checkpoint", "{bad}/weights.pt", "--out", "{tmp}/o"], "never unpickles"),
    ("checkpoint-foreign", ["sample", "--checkpoint", "{bad}/foreign.safetensors", "--out", "{tmp}/o"], "not a diffcli checkpoint"),
    ("labels-outside", ["sample", "--checkpoint", "{run}", "--labels", "0,9", "--out", "{tmp}/o"], "outside the model's classes"),
    ("labels-malformed", ["sample", "--checkpoint", "{run}", "--labels", "one", "--out", "{tmp}/o"], "comma-separated"),
    ("cfg-unconditional", ["sample", "--checkpoint", "{urun}", "--cfg", "2", "--out", "{tmp}/o"], "class-conditional"),
    ("labels-unconditional", ["sample", "--checkpoint", "{urun}", "--labels", "1", "--out", "{tmp}/o"], "unconditional"),
    ("steps-zero", ["sample", "--checkpoint", "{run}", "--steps", "0", "--out", "{tmp}/o"], "--steps"),
    ("n-zero", ["sample", "--checkpoint", "{run}", "--n", "0", "--out", "{tmp}/o"], "--n"),
    ("cfg-negative", ["sample", "--checkpoint", "{run}", "--cfg", "-1", "--out", "{tmp}/o"], "--cfg"),
    ("output-not-empty", ["sample", "--checkpoint", "{run}", "--out", "{run}"], "not empty"),
    ("output-under-a-file", ["sample", "--checkpoint", "{run}", "--out", "{bad}/afile/sub"], "cannot write"),
    ("output-is-a-file", ["sample", "--checkpoint", "{run}", "--out", "{bad}/afile"], "not a folder"),
    ("unknown-device", ["sample", "--checkpoint", "{run}", "--device", "tpu9", "--out", "{tmp}/o"], "device"),
    ("fp16-on-cpu", ["sample", "--checkpoint", "{run}", "--dtype", "fp16", "--device", "cpu", "--out", "{tmp}/o"], "fp16"),
    ("unknown-dtype", ["sample", "--checkpoint", "{run}", "--dtype", "fp8", "--out", "{tmp}/o"], "unknown dtype"),
    ("train-bad-precision", ["train", "--dataset", "folder:{digits}", "--precision", "fp8", "--out", "{tmp}/o"], "--precision"),
    ("train-batch-zero", ["train", "--dataset", "folder:{digits}", "--batch", "0", "--out", "{tmp}/o"], "--batch"),
    ("sample-resume-nothing", ["sample", "--checkpoint", "{run}", "--resume", "--out", "{tmp}/o"], "no run.json"),
    ("pg-batch-of-one", ["pg", "--checkpoint", "{run}", "--n", "1", "--out", "{tmp}/o"], "PG needs a batch"),
    ("pg-negative-factor", ["pg", "--checkpoint", "{run}", "--pg-factor", "-1", "--out", "{tmp}/o"], "--pg-factor"),
    ("pg-nan-factor", ["pg", "--checkpoint", "{run}", "--pg-factor", "nan", "--out", "{tmp}/o"], "--pg-factor"),
    ("pg-unknown-kernel", ["pg", "--checkpoint", "{run}", "--kernel", "dino", "--out", "{tmp}/o"], "unknown --kernel"),
    ("pg-prompt-without-model", ["pg", "a dog", "--out", "{tmp}/o"], "needs --model"),
    ("pg-pipeline-missing", ["pg", "a dog", "--model", "{tmp}/no-pipe", "--out", "{tmp}/o"], "local folder"),
    ("pg-pickled-classifier", ["pg", "--checkpoint", "{run}", "--kernel", "classifier", "--classifier",
                               "{bad}/weights.pt", "--out", "{tmp}/o"], "never unpickles"),
    ("seg-blur-malformed", ["seg", "a cat", "--model", "{sd}", "--blur", "gaussian_x", "--out", "{tmp}/o"], "accepted forms"),
    ("seg-unknown-layer", ["seg", "a cat", "--model", "{sd}", "--layers", "q7", "--out", "{tmp}/o"], "valid: down (d0-d1)"),
    ("seg-steps-zero", ["seg", "a cat", "--model", "{sd}", "--steps", "0", "--out", "{tmp}/o"], "--steps"),
    ("seg-size-not-multiple", ["seg", "a cat", "--model", "{sd}", "--height", "18", "--out", "{tmp}/o"], "multiple of 4"),
    ("seg-no-prompt", ["seg", "--model", "{sd}", "--out", "{tmp}/o"], "give a prompt"),
    ("seg-unknown-region", ["seg", "a cat", "--model", "{sd}", "--regions", "start", "--out", "{tmp}/o"], "--regions"),
    ("seg-model-offline", ["seg", "a cat", "--model", "nobody/no-such-model", "--out", "{tmp}/o"], "hf download nobody/no-such-model"),
    ("seg-prompts-file-missing", ["seg", "--model", "{sd}", "--prompts-file", "{tmp}/none.txt", "--out", "{tmp}/o"], "prompts file"),
    ("seg-metrics-with-resume", ["seg", "a cat", "--model", "{sd}", "--metrics", "--resume", "--out", "{run}"], "--metrics records one"),
    ("seg-resume-other-options", ["seg", "a cat", "--model", "{sd}", "--resume", "--out", "{run}"], "options differ from the run"),
    ("seg-existing-output", ["seg", "a cat", "--model", "{sd}", "--out", "{run}"], "not empty"),
    ("panorama-width-not-multiple", ["panorama", "a b", "--model", "{sd}", "--width", "100", "--height", "16", "--out", "{tmp}/o"], "multiple of 8"),
    ("panorama-stride-zero", ["panorama", "a b", "--model", "{sd}", "--width", "64", "--height", "16", "--stride", "0", "--out", "{tmp}/o"], "--stride 0"),
    ("panorama-smaller-than-window", ["panorama", "a b", "--model", "{sd}", "--width", "8", "--height", "16", "--out", "{tmp}/o"], "smaller than one window"),
    ("panorama-eval-pos-outside", ["panorama", "a b", "--model", "{sd}", "--width", "64", "--height", "16", "--eval-pos", "60", "--out", "{tmp}/o"], "outside the image"),
    ("panorama-prompts-file-malformed", ["panorama", "--prompts-file", "{bad}/prompts.json", "--model", "{sd}", "--width", "64", "--height", "16", "--out", "{tmp}/o"], "entry 'x' (line 1)"),
    ("panorama-unknown-sync", ["panorama", "a b", "--model", "{sd}", "--sync", "maybe", "--out", "{tmp}/o"], "unknown --sync"),
    ("panorama-model-offline", ["panorama", "a b", "--model", "nobody/no-sd", "--out", "{tmp}/o"], "hf download nobody/no-sd"),
    ("anagram-unknown-view", ["anagram", "a", "b", "--views", "identity,spin", "--out", "{tmp}/o"], "unknown view(s) spin"),
    ("anagram-prompt-count", ["anagram", "a", "--views", "identity", "rotate_cw", "--out", "{tmp}/o"], "one prompt per view"),
    ("anagram-square-view-on-wide", ["anagram", "a", "b", "--views", "identity", "rotate_cw", "--width", "128", "--height", "64", "--out", "{tmp}/o"], "needs a square image"),
    ("anagram-prompts-file-malformed", ["anagram", "--prompts-file", "{bad}/prompts.json", "--out", "{tmp}/o"], "canonical_prompt"),
    ("anagram-model-offline", ["anagram", "a", "b", "--model", "nobody/no-if", "--out", "{tmp}/o"], "hf download nobody/no-if"),
    ("eval-folder-missing", ["eval", "{tmp}/nothing", "--digits"], "folder not found"),
    ("eval-unknown-app", ["eval", "{bad}", "--app", "wide"], "unknown --app"),
    ("eval-reference-missing", ["eval", "{bad}", "--fid", "{tmp}/nothing", "--features", "mnist"], "reference folder not found"),
    ("eval-unknown-features", ["eval", "{bad}", "--fid", "{bad}", "--features", "vgg"], "unknown --features"),
    ("eval-batch-zero", ["eval", "{bad}", "--app", "wide_images", "--batch-size", "0"], "--batch-size"),
    ("option-not-a-number", ["sample", "--n", "abc", "--out", "{tmp}/o"], "Invalid value for '--n'"),
    ("unknown-option", ["sample", "--bogus", "--out", "{tmp}/o"], "No such option"),
    ("unknown-command", ["generate"], "No such command"),
    ("option-missing-value", ["sample", "--sampler"], "requires an argument"),
]


@pytest.mark.parametrize("case_id,args,fragment", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case_id, args, fragment, tmp_path, tiny_run, tiny_uncond_run, digit_folder, bad_files, capsys,
                   request):
    subs = {"tmp": tmp_path / "w", "run": tiny_run, "urun": tiny_uncond_run, "digits": digit_folder, "bad": bad_files}
    if any("{sd}" in a for a in args):
        subs["sd"] = request.getfixturevalue("tiny_sd")
    (tmp_path / "w").mkdir()
    args = [a.format(**subs) for a in args]
    watched = [tiny_run, tiny_uncond_run, bad_files, tmp_path / "w"]
    before = [snapshot(d) for d in watched]
    code, stderr = invoke(args, capsys)
    assert code != 0
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in stderr
    after = [snapshot(d) for d in watched]
    assert before == after, "a failed command changed files"
    assert not (tmp_path / "w" / "o").exists()


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EROFS], ids=["disk-full", "read-only-fs"])
def test_output_device_fails_mid_run(err, tmp_path, tiny_run, capsys, monkeypatch):
    """The disk fills up (or is remounted read-only) after a few files: one line naming the OS error, a non-zero
    exit, only whole files and no temp files left behind; once there is room, --resume finishes the run exactly.
    (Tests run as root here, so a chmod'ed folder would not refuse writes: the fault is injected at the fsync
    every atomic write makes.)"""
    from diffcli.shared import files
    args = ["sample", "--checkpoint", str(tiny_run), "--n", "6", "--batch-size", "1", "--steps", "2", "--device", "cpu"]
    assert invoke([*args, "--out", str(tmp_path / "straight")], capsys)[0] == 0
    real_fsync, calls = os.fsync, []

    def failing_fsync(fd):
        calls.append(fd)
        if len(calls) > 3:  # run.json and two PNGs fit
            raise OSError(err, os.strerror(err))
        real_fsync(fd)

    monkeypatch.setattr(files.os, "fsync", failing_fsync)
    out = tmp_path / "o"
    code, stderr = invoke([*args, "--out", str(out)], capsys)
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert code != 0 and len(lines) == 1 and lines[0].startswith("error: ") and os.strerror(err) in lines[0], stderr
    assert lines[0].endswith(str(out / "00002-seed2-label2.png")), lines[0]  # the file it could not write
    assert "Traceback" not in stderr
    assert sorted(p.name for p in out.iterdir()) == ["00000-seed0-label0.png", "00001-seed1-label1.png", "run.json"]
    monkeypatch.setattr(files.os, "fsync", real_fsync)
    assert invoke([*args, "--out", str(out), "--resume"], capsys)[0] == 0
    assert snapshot(out).keys() == snapshot(tmp_path / "straight").keys()
    for name, data in snapshot(tmp_path / "straight").items():
        if name.endswith(".png"):
            assert snapshot(out)[name] == data, name
