"""diffcli eval: score folders (the scoring is `evaluation`), print each folder's lines, write the summary table of
several folders."""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .evaluation import EvalConfig, expand_folders, run_many, validate, write_summary
from .runner import Command, CommandExit, RunContext
from .shared.errors import DiffcliError
from .shared.inputs import shown
from .shared.fields import opt

@dataclass(kw_only=True)
class EvalArgs:
    """The command line's folders and where several folders' table goes."""
    folders: list[str] = opt(..., argument=True, metavar="FOLDER...", panel="input",
                             help="Folder(s) of images to score (or quoted glob patterns); each gets its eval.json "
                                  "(images are never touched).")
    summary: Path = opt(Path("eval-summary"), "--summary", metavar="PATH", panel="output",
                        help="Several folders: the combined table goes to PATH.csv and PATH.json.")


@dataclass
class EvalJob:
    """What `diffcli eval` scores: the config for each of these folders, and where the summary goes."""
    config: EvalConfig
    folders: list[str]
    summary: Path




def build(values: dict[str, Any]) -> EvalJob:
    """The command line's values -> the folders (globs expanded) and the config of the first."""
    folders, summary = expand_folders(values.pop("folders")), values.pop("summary")
    if len(folders) > 1:
        check_summary(summary, folders)
    return EvalJob(EvalConfig(folder=folders[0], **values), folders, summary)


def check_summary(summary: Path, folders: list[str]) -> None:
    """The rule for --summary PATH: PATH.csv and PATH.json lie outside every folder scored (a folder holds its
    images and its own eval.json, never a table of several: `--summary a/eval.json` would replace a's scores)."""
    for table in (summary.with_suffix(".csv"), summary.with_suffix(".json")):
        where = os.path.realpath(table)
        inside = next((f for f in folders if os.path.commonpath([where, os.path.realpath(f)]) == os.path.realpath(f)),
                      None)
        if inside is not None:
            raise DiffcliError(f"--summary {shown(str(summary), 200)} would write {table.name} inside the scored "
                               f"folder {shown(inside, 200)}; put the summary outside the folders")


def main(job: EvalJob, ctx: RunContext) -> dict[str, Any]:
    """`diffcli eval`: score every folder, print its lines, and with several folders write the summary table."""
    cfg, paths = replace(job.config, device=ctx.device), job.folders

    def report(folder: str, result: dict | None, error: str | None) -> None:
        if error is not None:
            if len(paths) == 1:
                raise DiffcliError(error)
            ctx.echo_err(f"error: {folder}: {error}")
            return
        for note in result["warnings"]:
            ctx.echo_err(f"warning: {note}")
        for line in result["lines"]:
            ctx.echo(line)
        ctx.echo(f"wrote {result['eval_file']}")

    outcome = run_many(cfg, paths, report)
    if len(paths) > 1 and outcome["main"]:
        for line in write_summary(job.summary, outcome["rows"], outcome["failures"]):
            ctx.echo(line)
        ctx.echo(f"wrote {job.summary}.csv and {job.summary}.json ({len(outcome['rows'])} of {len(paths)} folders "
                 "scored)")
    if outcome["failures"]:
        raise CommandExit(1)
    return outcome


COMMAND = Command(
    "eval", EvalConfig, lambda job: validate(job.config), main, build=build, cli=EvalArgs,
    context={"device": {}},
    help="""Score folders: the 003 CLIP score exactly as graded, anagram metrics, FID/KID (clean-fid), digit metrics.

    Example: diffcli eval results/wide_images --app wide_images

    Results go to FOLDER/eval.json: a CLIP run writes the grader's layout (source_dir, the first image path of each prompt with its mean, score; indent 4); fid, kid and digits keep their own keys beside it.
    """)
