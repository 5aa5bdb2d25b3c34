"""diffcli sweep: a grid of a command's options, every setting scored by eval's code, one table; a killed sweep
resumes to the same table; bad grids are refused in one line before anything runs."""
from __future__ import annotations

import json

import pytest

from conftest import pixels, invoke_cli
from diffcli import cli


BASE = ["sample", "--n", "4", "--steps", "3", "--labels", "1,7", "--sampler", "euler"]


def run_sweep(capsys, out, *extra):
    code, stdout, err = invoke_cli(["sweep", *BASE, "--grid", "cfg=1,2", "--grid", "s_churn=0,40",
                                    "--score", "digits", "--out", out, *extra], capsys)
    return code, stdout, err


def test_two_by_two_grid_writes_four_scored_settings_and_the_table(tmp_path, capsys):
    code, out, err = run_sweep(capsys, tmp_path / "sw")
    assert code == 0, err
    rows = json.loads((tmp_path / "sw" / "results.json").read_text())["rows"]
    assert [r["setting"] for r in rows] == [{"cfg": "1", "s_churn": "0"}, {"cfg": "1", "s_churn": "40"},
                                          {"cfg": "2", "s_churn": "0"}, {"cfg": "2", "s_churn": "40"}]
    for r in rows:
        record = json.loads((tmp_path / "sw" / r["folder"] / "run.json").read_text())
        assert record["options"]["cfg"] == float(r["setting"]["cfg"])
        assert [s["seed"] for s in record["samples"]] == [0, 1, 2, 3]  # the same seeds in every setting
        assert set(r["scores"]) == {"accuracy", "modes", "similarity"}
        on_disk = json.loads((tmp_path / "sw" / r["folder"] / "eval.json").read_text())["digits"]
        assert r["scores"]["accuracy"] == on_disk["accuracy"]  # the numbers diffcli eval wrote
    csv_lines = (tmp_path / "sw" / "results.csv").read_text().splitlines()
    assert csv_lines[0] == "cfg,s_churn,folder,accuracy,modes,similarity" and len(csv_lines) == 5
    assert (tmp_path / "sw" / "plot.png").is_file() and (tmp_path / "sw" / "grid.png").is_file()
    assert "cfg  s_churn" in out and "wrote 4 settings" in out
    # euler ignores s_churn: same images, so the same scores; cfg changes them
    assert rows[0]["scores"] == rows[1]["scores"]


def test_killed_sweep_resumes_to_the_same_table(tmp_path, capsys, monkeypatch):
    straight = tmp_path / "straight"
    assert run_sweep(capsys, straight)[0] == 0
    cut = tmp_path / "cut"
    real = cli.Commands.run
    runs = []

    def dies_on_the_third(self, command, argv):
        if "never" not in argv[argv.index("--out") + 1]:  # a real setting, not the options check before them
            runs.append(argv)
            if len(runs) == 3:
                raise KeyboardInterrupt
        return real(self, command, argv)

    monkeypatch.setattr(cli.Commands, "run", dies_on_the_third)
    code, _, err = run_sweep(capsys, cut)
    assert code == 130, err
    monkeypatch.setattr(cli.Commands, "run", real)
    code, _, err = run_sweep(capsys, cut, "--resume")
    assert code == 0, err
    assert (cut / "results.csv").read_text().replace("cut", "") == (straight / "results.csv").read_text().replace(
        "straight", "")
    for r in json.loads((straight / "results.json").read_text())["rows"]:
        for f in r["files"]:
            assert (cut / r["folder"] / f).read_bytes() == (straight / r["folder"] / f).read_bytes()


@pytest.mark.parametrize("args,message", [
    (["--grid", "colour=1,2"], "--grid 'colour' is no option of this command; valid:"),
    (["--grid", "sampler=euler,plms"], "setting sampler-plms: unknown sampler 'plms'"),
    (["--grid", "cfg=1,2", "--score", "clip"], "--score clip is the 003 CLIP score of panorama and anagram"),
    (["--grid", "seed=" + ",".join(map(str, range(40)))], "40 settings (more than 32); pass --yes"),
    (["--grid", "cfg"], "expected KEY=V1,V2"),
])
def test_bad_grids_are_refused_before_anything_runs(tmp_path, capsys, args, message):
    code, _, err = invoke_cli(["sweep", *BASE, *args, "--out", tmp_path / "o"], capsys)
    assert code == 2 and message in err, err
    assert "internal error" not in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "o").exists()


def test_snapshots_select_a_step_and_sweep_over_training(digit_folder, tmp_path, capsys):
    from conftest import TINY_TRAIN
    run = tmp_path / "run"
    code, _, err = invoke_cli(["train", "--dataset", f"folder:{digit_folder}", "--steps", "4", "--snapshot-every", "2",
                               "--out", run, *TINY_TRAIN], capsys)
    assert code == 0, err
    assert sorted(p.name for p in (run / "snapshots").iterdir()) == ["step-0000002.safetensors",
                                                                     "step-0000004.safetensors"]
    args = ["--n", "2", "--steps", "2", "--sampler", "euler"]
    for spec, out in ((f"{run}@4", "at4"), (str(run), "latest"), (f"{run}@2", "at2")):
        code, _, err = invoke_cli(["sample", "--checkpoint", spec, *args, "--out", tmp_path / out], capsys)
        assert code == 0, err
    latest = sorted((tmp_path / "latest").glob("0*.png"))
    assert [pixels(p) for p in latest] == [pixels(tmp_path / "at4" / p.name) for p in latest]
    assert [pixels(p) for p in latest] != [pixels(tmp_path / "at2" / p.name) for p in latest]
    code, _, err = invoke_cli(["sample", "--checkpoint", f"{run}@3", *args, "--out", tmp_path / "x"], capsys)
    assert code == 2 and "no snapshot of step 3; it has steps 2, 4" in err and not (tmp_path / "x").exists()
    code, out, err = invoke_cli(["sweep", "sample", *args, "--grid", f"checkpoint={run}@2,{run}@4",
                                 "--out", tmp_path / "sw"], capsys)
    assert code == 0, err
    assert len(json.loads((tmp_path / "sw" / "results.json").read_text())["rows"]) == 2


def test_eval_over_several_folders_writes_one_table_and_reports_the_unreadable_one(tmp_path, capsys):
    for name, cfg in (("a", "1"), ("b", "2")):
        code, _, err = invoke_cli([*BASE, "--cfg", cfg, "--out", tmp_path / "runs" / name], capsys)
        assert code == 0, err
    (tmp_path / "runs" / "empty").mkdir()
    code, out, err = invoke_cli(["eval", str(tmp_path / "runs" / "*"), "--digits", "--summary", tmp_path / "table"],
                                capsys)
    assert code == 1  # after the others were scored and written
    assert [line for line in err.splitlines() if line.startswith("error:")] == [
        line for line in err.splitlines() if "runs/empty" in line and line.startswith("error:")]
    table = json.loads((tmp_path / "table.json").read_text())
    assert [r["folder"].rsplit("/", 1)[1] for r in table["rows"]] == ["a", "b"]
    assert [f["folder"].rsplit("/", 1)[1] for f in table["failed"]] == ["empty"]
    for r in table["rows"]:
        assert r["scores"]["accuracy"] == json.loads((tmp_path / "runs" / r["folder"].rsplit("/", 1)[1] / "eval.json")
                                                     .read_text())["digits"]["accuracy"]
    assert (tmp_path / "table.csv").read_text().splitlines()[0] == "folder,accuracy,modes,similarity"


def test_two_ranks_sweep_equals_one_process(tmp_path):
    from conftest import call_cli, run_torchrun
    args = ["sweep", "sample", "--n", "4", "--steps", "2", "--labels", "1,7", "--sampler", "euler",
            "--grid", "cfg=1,2", "--score", "digits"]
    call_cli(*args, "--out", tmp_path / "one", check=True)
    run_torchrun(*args, "--out", tmp_path / "two", port=29557)
    assert (tmp_path / "one" / "results.csv").read_text() == (tmp_path / "two" / "results.csv").read_text()
    for png in sorted((tmp_path / "one").rglob("0*.png")):
        assert png.read_bytes() == (tmp_path / "two" / png.relative_to(tmp_path / "one")).read_bytes()
