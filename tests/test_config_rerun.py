"""`--config FILE.toml` on every command (flags given on the command line win) and `diffcli rerun RUN_JSON`
(the same files, byte for byte)."""
from __future__ import annotations

import json

import pytest

from conftest import invoke_cli


def ok(capsys, *args):
    code, out, err = invoke_cli(args, capsys)
    assert code == 0, err
    return out, err


def pngs(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.png"))}


def test_config_values_and_flag_overrides(tmp_path, capsys):
    config = tmp_path / "c.toml"
    config.write_text('n = 3\nsteps = 2\nlabels = "4"\ncfg = 2.0\nseg-scale = 1.5\nblur = ["gaussian_-1_1"]\n')
    ok(capsys, "sample", "--config", config, "--n", "2", "--out", tmp_path / "o")
    options = json.loads((tmp_path / "o" / "run.json").read_text())["options"]
    assert (options["n"], options["steps"], options["labels"], options["cfg"]) == (2, 2, "4", 2.0)  # --n wins
    assert options["seg_scale"] == 1.5 and options["blurs"] == ["gaussian_-1_1"]


@pytest.mark.parametrize("text,message", [
    ("colour = 3\n", "unknown option 'colour'; valid:"),
    ("n = [\n", "is not valid TOML"),
    ("[sample]\nn = 3\n", "is a table"),
    ('n = "many"\n', "n = 'many' is a string; n takes an integer"),
])
def test_bad_configs_are_one_line_and_write_nothing(tmp_path, capsys, text, message):
    config = tmp_path / "c.toml"
    config.write_text(text)
    code, _, err = invoke_cli(["sample", "--config", config, "--out", tmp_path / "o"], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


def test_config_on_a_pipeline_command_and_eval(tiny_sd, tmp_path, capsys):
    config = tmp_path / "seg.toml"
    config.write_text(f'prompt = "a cat"\nmodel = "{tiny_sd}"\nsteps = 2\nn = 2\nblur = ["gaussian_-1_2"]\n')
    ok(capsys, "seg", "--config", config, "--seed", "3", "--out", tmp_path / "s")
    options = json.loads((tmp_path / "s" / "run.json").read_text())["options"]
    assert options["prompts"] == ["a cat"] and options["seed"] == 3 and options["steps"] == 2


def test_rerun_reproduces_sample_and_seg_byte_for_byte(tiny_sd, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative paths in the command line are replayed in this folder
    ok(capsys, "sample", "--n", "3", "--steps", "2", "--labels", "2,5", "--sampler", "euler_ancestral", "--seed", "9",
       "--out", "digits")
    ok(capsys, "seg", "a red barn", "--model", str(tiny_sd), "--steps", "2", "--n", "2", "--pg-factor", "2",
       "--out", "barn")
    monkeypatch.chdir("/")
    for name in ("digits", "barn"):
        _, err = ok(capsys, "rerun", tmp_path / name / "run.json")
        assert f"--out {tmp_path / (name + '-rerun')}" in err
        first, again = pngs(tmp_path / name), pngs(tmp_path / f"{name}-rerun")
        assert len(first) >= 3 and first == again
    code, _, err = invoke_cli(["rerun", tmp_path / "digits" / "run.json"], capsys)  # the folder exists now
    assert code == 2 and "not empty" in err


def test_rerun_refuses_what_is_no_run_record(tmp_path, capsys):
    (tmp_path / "run.json").write_text('{"command": "eval"}')
    code, _, err = invoke_cli(["rerun", tmp_path / "run.json"], capsys)
    assert code == 2 and "no diffcli run record" in err
    code, _, err = invoke_cli(["rerun", tmp_path / "nothing.json"], capsys)
    assert code == 2 and "no run.json" in err
