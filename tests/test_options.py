"""Each option declared once (a Config field's metadata), the CLI derived from it, and the command contract that
sweep and rerun call without touching module attributes or sys.argv."""
from __future__ import annotations

import json
import sys

import pytest

from diffcli import cli
from diffcli.cliopts import context_fields, fields_of, parameters
from diffcli.shared.errors import DiffcliError
from conftest import invoke_cli


@pytest.mark.parametrize("name", sorted(cli.COMMANDS))
def test_every_declared_option_is_in_help_and_every_parameter_is_declared(name, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")
    command = cli.COMMANDS[name]
    code, out, err = invoke_cli([name, "--help"], capsys)
    assert code == 0, err
    declared = fields_of(command.config) + fields_of(command.cli) + context_fields(command)
    for field_name, info, _, _ in declared:
        if not info.argument:
            flag = info.flag(field_name).split("/")[0]
            assert flag in out, f"{name}: {flag} missing from --help"
    names = {info.name or n for n, info, *_ in declared} | {"config"}
    for p in parameters(command)[0]:
        assert p.name in names, f"{name}: parameter {p.name} is no declared field"


def test_a_cross_field_rule_holds_in_the_python_api_with_the_cli_message(tmp_path, capsys):
    from diffcli.train import COMMAND, TrainConfig, train
    message = "--blur-sigma-max is a --process blurring option"
    with pytest.raises(DiffcliError, match=message):
        COMMAND.validate(TrainConfig(process="edm", blur_sigma_max=5.0))
    with pytest.raises(DiffcliError, match=message):
        train(TrainConfig(process="edm", blur_sigma_max=5.0), tmp_path / "run")
    with pytest.raises(DiffcliError, match="--p-mean and --p-std are --process edm options"):
        COMMAND.validate(TrainConfig(process="blurring", p_std=1.0))
    code, _, err = invoke_cli(["train", "--process", "edm", "--blur-sigma-max", "5", "--out", tmp_path / "cli"], capsys)
    assert code == 2 and err.strip() == f"error: {message}"
    assert not (tmp_path / "run").exists() and not (tmp_path / "cli").exists()


def test_sweep_and_rerun_use_the_contract_without_patching(tmp_path, capsys):
    import diffcli.sample as sample
    before, argv = sample.run, list(sys.argv)
    commands = cli.Commands()
    commands.check("sample", ["--n", "2", "--steps", "2", "--out", str(tmp_path / "never")])
    with pytest.raises(DiffcliError, match="--n must be"):
        commands.check("sample", ["--n", "0", "--out", str(tmp_path / "never")])
    assert sample.run is before and sys.argv == argv
    out = tmp_path / "one"
    assert commands.run("sample", ["--n", "1", "--steps", "1", "--device", "cpu", "--out", str(out)]) == 0
    assert sample.run is before and sys.argv == argv
    record = json.loads((out / "run.json").read_text())
    assert record["argv"] == ["diffcli", "sample", "--n", "1", "--steps", "1", "--device", "cpu", "--out", str(out)]
    assert not (tmp_path / "never").exists()
