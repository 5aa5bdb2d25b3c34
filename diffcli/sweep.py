"""diffcli sweep: run a generating command over a grid of its options, score every setting with `diffcli eval`'s
code, and write the table, the plot and the side-by-side grid a paper shows.

Each setting is the command run in this process with the base arguments plus `--KEY VALUE` for each grid key, into
OUT/<setting>/ with its own run.json; every setting uses the same seeds. Models and prompt encodings are loaded
once for the whole sweep (`pipelines.caching`, `models.caching`). A killed sweep resumes where it stopped: a setting
whose folder is complete and scored is skipped, one cut short continues with the command's own --resume. Under
torchrun every setting is sharded by its command across the ranks, and rank 0 writes the results.
"""
from __future__ import annotations

import csv
import itertools
import math
import os
from dataclasses import MISSING, dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Protocol

import torch

from .runner import Command, RunContext
from .shared.cache import caching
from .shared.fields import opt
from .shared.dist import Dist
from .shared.errors import DiffcliError
from .shared.files import atomic_path, prepare_out_dir, write_json
from .shared.images import load_images, save_figure, save_grid
from .shared.records import note_run, run_record_path
from .shared.names import unique_stems
from .shared.dist import env_int
from .shared.limits import WORLD_MAX
from .shared.inputs import read_json

MAX_SETTINGS = 32  # more settings than this need --yes
SETTINGS_LIMIT = 10_000  # no sweep runs more (each setting is a whole run); counted before the grid is built
SCORES = ("digits", "fid", "kid", "clip")
GRID_SAMPLES = 8  # rows of the side-by-side grid
RESULTS = ("results.csv", "results.json", "plot.png", "grid.png")


@dataclass
class SweepConfig:
    command: str = opt(MISSING, argument=True, panel="input",
                       help="The command to sweep: sample, seg, panorama, anagram or pg; its own arguments follow.")
    args: list[str]                       # the command's own arguments, shared by every setting
    # KEY=V1,V2,... (KEY: the option's name, e.g. blur, seg_scale, cfg)
    grid: list[str] = opt(MISSING, "--grid", cli_default=..., panel="input",
                          help="KEY=V1,V2,...: an option of the command (blur, seg_scale, cfg, pg_factor, sampler, "
                               "steps, ...) and its values; repeat for a grid.")
    # digits, fid=REF, kid=REF, clip
    scores: list[str] = opt(None, "--score", name="score", factory=list, cli_default=None, cli_type=Optional[list[str]],
                            to_config=lambda given: given or [], panel="output",
                            help="Score every setting as diffcli eval does: digits (sample, pg), fid=REF, kid=REF, "
                                 "clip (panorama, anagram).")
    # FID/KID features: mnist (digits, offline) or inception
    features: str = opt("mnist", "--features", panel="output",
                        help="FID/KID features: mnist (the digit classifier's, offline) or inception.")
    yes: bool = opt(False, "--yes", panel="input", help=f"Run a grid of more than {MAX_SETTINGS} settings.")


# ---------------------------------------------------------------- the grid

def parse_grid(specs: list[str], options: dict[str, str]) -> list[tuple[str, list[str]]]:
    """['blur=a,b', 'seg_scale=1,3'] -> [('blur', ['a', 'b']), ('seg_scale', ['1', '3'])]; keys must be options."""
    if not specs:
        raise DiffcliError("give at least one --grid KEY=V1,V2 (e.g. --grid cfg=1,2,3)")
    grid: list[tuple[str, list[str]]] = []
    for spec in specs:
        key, sep, values = spec.partition("=")
        key = key.strip().lstrip("-").replace("-", "_")
        vals = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or not key or not vals:
            raise DiffcliError(f"--grid {spec!r}: expected KEY=V1,V2,... (e.g. seg_scale=1,3)")
        if key not in options:
            raise DiffcliError(f"--grid {key!r} is no option of this command; valid: {', '.join(sorted(options))}")
        if key in (k for k, _ in grid):
            raise DiffcliError(f"--grid {key!r} given twice; put all its values in one --grid {key}=V1,V2")
        same = next((k for k, _ in grid if options[k] == options[key]), None)
        if same is not None:  # two names of one option (cfg and guidance): one would silently win
            raise DiffcliError(f"--grid {key!r} and {same!r} are the same option {options[key]}; give it once")
        if len(set(vals)) != len(vals):
            raise DiffcliError(f"--grid {key}: a value is repeated ({spec})")
        grid.append((key, vals))
    return grid


def count_settings(grid: list[tuple[str, list[str]]], yes: bool) -> int:
    """How many settings the grid makes, refused before any is built: above MAX_SETTINGS without --yes, above
    SETTINGS_LIMIT always."""
    total = math.prod(len(v) for _, v in grid)
    if total > SETTINGS_LIMIT:
        raise DiffcliError(f"the grid makes {total:,} settings; a sweep runs at most {SETTINGS_LIMIT:,}")
    if total > MAX_SETTINGS and not yes:
        raise DiffcliError(f"the grid makes {total} settings (more than {MAX_SETTINGS}); pass --yes to run them all")
    return total


def settings(grid: list[tuple[str, list[str]]]) -> list[dict[str, str]]:
    """Every combination, the first key varying slowest."""
    keys = [k for k, _ in grid]
    return [dict(zip(keys, combo)) for combo in itertools.product(*(v for _, v in grid))]


def setting_names(todo: list[dict[str, str]]) -> list[str]:
    """Every setting's folder, under the one naming rule (`unique_stems`): names cut to the length limit, or
    cleaned to the same text, get -2, -3, ... instead of sharing a folder."""
    return unique_stems(["_".join(f"{k}-{v}" for k, v in s.items()) for s in todo], max_len=200)


def scored_row(done: Path, setting: dict[str, str], name: str) -> dict[str, Any] | None:
    """A setting's `.scored.json` from an earlier run of the sweep, or None when it is missing, unreadable or not
    this setting's (it is then run with --resume and scored again)."""
    try:
        row = read_json(done, "scored setting")
    except DiffcliError:
        return None
    good = (isinstance(row, dict) and row.get("setting") == setting and row.get("folder") == name
            and isinstance(row.get("scores"), dict) and isinstance(row.get("files"), list)
            and all(isinstance(f, str) for f in row["files"]))
    return row if good else None


def parse_scores(scores: list[str], command: str, commands: Commands) -> dict[str, str | None]:
    """['digits', 'fid=REF'] -> {'digits': None, 'fid': 'REF'}, refused where the score does not apply (each
    command's `scores`)."""
    having = lambda score: [c for c in commands.sweepable() if score in commands.spec(c).scores]  # noqa: E731
    out: dict[str, str | None] = {}
    for spec in scores:
        name, _, ref = spec.partition("=")
        if name not in SCORES:
            raise DiffcliError(f"--score {spec!r}: choose from digits, fid=REF, kid=REF, clip")
        if name in ("fid", "kid") and not ref:
            raise DiffcliError(f"--score {name} needs a reference: {name}=FOLDER (or a clean-fid dataset name)")
        if name == "digits" and command not in having("digits"):
            raise DiffcliError(f"--score digits scores digit samples ({', '.join(having('digits'))}); {command} writes "
                               "text-to-image pictures")
        if name == "clip" and command not in having("clip"):
            raise DiffcliError(f"--score clip is the 003 CLIP score of {' and '.join(having('clip'))} folders; not of "
                               f"{command} outputs")
        out[name] = ref or None
    return out


# ---------------------------------------------------------------- the commands a sweep runs

class Commands(Protocol):
    """diffcli's own commands run by their argv in this process (the CLI provides it: `cli.Commands`)."""

    def options(self, command: str) -> dict[str, str]: ...  # grid key -> flag, for every option but the output's
    def spec(self, command: str) -> Any: ...  # the command's runner.Command (its facts: record_beside, scores, ...)
    def sweepable(self) -> list[str]: ...  # the commands a sweep runs
    def check(self, command: str, argv: list[str]) -> None: ...  # parse and validate only; DiffcliError if refused
    def run(self, command: str, argv: list[str]) -> int: ...  # the exit code; errors print their own line


def setting_argv(cfg: SweepConfig, options: dict[str, str], setting: dict[str, str], out: Path) -> list[str]:
    return [*cfg.args, *(a for k, v in setting.items() for a in (options[k], v)), "--out", str(out)]


# ---------------------------------------------------------------- scoring and results

def score(folder: Path, clip_app: str | None, scores: dict[str, str | None], features: str) -> dict[str, float]:
    """The numbers `diffcli eval` writes for one setting's folder, flattened to name -> value."""
    from .evaluation import EvalConfig, run as run_eval, scores_of
    if not scores:
        return {}
    ecfg = EvalConfig(folder=str(folder), app=clip_app if "clip" in scores else None,
                      fid=scores.get("fid"), kid=scores.get("kid"), features=features, digits="digits" in scores)
    result = run_eval(ecfg)
    return scores_of(result.get("eval") or read_json((folder / "eval.json"), "eval.json"))


def written_files(folder: Path, record: dict[str, Any]) -> list[str]:
    """The images a setting wrote, in the command's own order (its run.json), for the side-by-side grid."""
    if record.get("samples"):
        return [s["file"] for s in record["samples"]]
    images = record.get("images") or record.get("files")
    if isinstance(images, dict):  # seg: one list per blur
        images = [f for files in images.values() for f in files]
    return list(images or sorted(p.name for p in folder.glob("*.png") if p.name != "grid.png"))


def write_table(out: Path, grid: list[tuple[str, list[str]]], rows: list[dict[str, Any]]) -> list[str]:
    """results.csv and results.json; returns the terminal table's lines."""
    keys = [k for k, _ in grid]
    metrics = list(dict.fromkeys(m for r in rows for m in r["scores"]))
    with atomic_path(out / "results.csv") as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([*keys, "folder", *metrics])
        for r in rows:
            writer.writerow([*(r["setting"][k] for k in keys), r["folder"], *(r["scores"].get(m, "") for m in metrics)])
    write_json(out / "results.json", {"grid": dict(grid), "rows": rows}, indent=2)
    cells = [[*(r["setting"][k] for k in keys), *(fmt(r["scores"].get(m)) for m in metrics)] for r in rows]
    head = [*keys, *metrics]
    widths = [max(len(str(c)) for c in col) for col in zip(head, *cells)]
    return ["  ".join(str(c).rjust(w) for c, w in zip(line, widths)) for line in [head, *cells]]


def fmt(v: Any) -> str:
    if v is None:
        return "-"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def side_by_side(out: Path, rows: list[dict[str, Any]]) -> None:
    """grid.png: one column per setting, one row per sample (the same seeds), the first GRID_SAMPLES of each."""
    columns = []
    for r in rows:
        files = r["files"][:GRID_SAMPLES]
        if not files:
            return
        columns.append(load_images([out / r["folder"] / f for f in files]))
    n = min(len(c) for c in columns)
    shapes = {tuple(c.shape[1:]) for c in columns}
    if n == 0 or len(shapes) != 1:
        return  # settings of different image sizes have no common grid
    save_grid(out / "grid.png", torch.stack([c[:n] for c in columns], 1).flatten(0, 1), nrow=len(columns))


def plot(out: Path, grid: list[tuple[str, list[str]]], rows: list[dict[str, Any]]) -> bool:
    """plot.png: each score against the first grid key, one line per value of the other keys; False when there is
    no score to plot (or matplotlib is missing)."""
    try:  # deferred: matplotlib is slow to import and only this picture needs it
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    metrics = list(dict.fromkeys(m for r in rows for m in r["scores"]))
    if not metrics:
        return False
    key, values = grid[0]
    others = [k for k, _ in grid[1:]]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3.2), squeeze=False)
    numeric = all(_x_value(v) is not None for v in values)
    xs = [_x_value(v) for v in values] if numeric else list(range(len(values)))
    for ax, m in zip(axes[0], metrics):
        for group in dict.fromkeys(tuple(r["setting"][k] for k in others) for r in rows):
            ys = [next((r["scores"].get(m) for r in rows if r["setting"][key] == v
                        and tuple(r["setting"][k] for k in others) == group), None) for v in values]
            label = ", ".join(f"{k}={g}" for k, g in zip(others, group)) or None
            ax.plot(xs, [math.nan if y is None else y for y in ys], marker="o", label=label)
        ax.set_xlabel("training step" if all("@" in v for v in values) else key)
        ax.set_title(m)
        if not numeric:
            ax.set_xticks(xs, values, rotation=30, ha="right", fontsize=7)
        if others:
            ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(out / "plot.png", fig, dpi=110)
    plt.close(fig)
    return True


def _x_value(text: str) -> float | None:
    """A grid value as a number on the plot's axis: the number itself, or the step of a RUN@STEP snapshot."""
    try:
        value = float(text.rpartition("@")[2] if "@" in text else text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


# ---------------------------------------------------------------- the command

def plan(cfg: SweepConfig, commands: Commands) -> tuple[list[tuple[str, list[str]]], list[dict[str, str]],
                                                        dict[str, str | None], dict[str, str]]:
    """Everything checked before any setting runs: command, grid keys, every setting's options, scores."""
    if cfg.command not in commands.sweepable():
        raise DiffcliError(f"diffcli sweep runs one of {', '.join(commands.sweepable())}; got {cfg.command!r}")
    if any(a in ("--out", "--resume", "--overwrite") or a.startswith("--out=") for a in cfg.args):
        raise DiffcliError("give --out, --resume and --overwrite to the sweep, not to the swept command")
    options = commands.options(cfg.command)
    grid = parse_grid(cfg.grid, options)
    count_settings(grid, cfg.yes)
    todo = settings(grid)
    scores = parse_scores(cfg.scores, cfg.command, commands)
    if cfg.features not in ("mnist", "inception"):
        raise DiffcliError(f"--features {cfg.features!r}: choose mnist or inception")
    for s, name in zip(todo, setting_names(todo)):
        try:
            commands.check(cfg.command, setting_argv(cfg, options, s, Path(os.devnull) / "never"))
        except DiffcliError as e:
            raise DiffcliError(f"setting {name}: {e}") from None
    return grid, todo, scores, options


def run(cfg: SweepConfig, commands: Commands, out: Path, overwrite: bool, resume: bool,
        on_setting: Callable[[str], None] | None = None) -> dict[str, Any]:
    grid, todo, scores, options = plan(cfg, commands)
    main = env_int("RANK", 0, 0, WORLD_MAX - 1) == 0
    record_path = out / "sweep.json"
    record = {"command": cfg.command, "args": cfg.args, "grid": dict(grid), "scores": cfg.scores,
              "features": cfg.features}
    if resume:
        try:
            before = read_json(record_path, "sweep record")
        except (OSError, ValueError):
            raise DiffcliError(f"--resume: {out} holds no sweep.json of an earlier sweep; start without --resume"
                               ) from None
        if before != record:
            raise DiffcliError(f"--resume: the sweep in {out} had other arguments; resume with the same ones")
    elif main:
        prepare_out_dir(out, overwrite)
        write_json(record_path, record, indent=2)
    note_run("sweep", {"out": str(out), **record}, "none")  # its grid and plot carry the sweep's settings
    rows, beside_record = [], commands.spec(cfg.command).record_beside
    with caching(), Dist(None):  # under torchrun, one process group for every setting's command and score
        for s, name in zip(todo, setting_names(todo)):
            folder = out / name
            done = folder / ".scored.json"
            row = scored_row(done, s, name) if resume and os.path.lexists(done) else None
            if row is not None:
                rows.append(row)
                continue
            argv = setting_argv(cfg, options, s, folder)
            if run_record_path(folder, beside_record).is_file():
                argv.append("--resume")
            if on_setting:
                on_setting(name)
            code = commands.run(cfg.command, argv)
            if code:
                raise DiffcliError(f"setting {name} failed (its message is above); rerun with --resume to continue")
            values = score(folder, commands.spec(cfg.command).clip_app, scores, cfg.features)
            run_record = read_json(run_record_path(folder, beside_record), "sweep record")
            files = written_files(folder, run_record)
            row = {"setting": s, "folder": name, "scores": values, "files": files}
            if main:
                write_json(done, row, indent=2)
            rows.append(row)
    if not main:
        return {"out": str(out), "main": False}
    lines = write_table(out, grid, rows)
    plotted = plot(out, grid, rows)
    side_by_side(out, rows)
    return {"out": str(out), "main": True, "lines": lines, "settings": len(rows), "plot": plotted}


def main(cfg: SweepConfig, ctx: RunContext) -> dict[str, Any]:
    """`diffcli sweep`: run every setting through `ctx.commands` and say what was written."""
    result = run(cfg, ctx.commands, ctx.out, ctx.overwrite, ctx.resume,
                 on_setting=lambda name: ctx.echo_err(f"setting {name}"))
    if result["main"]:
        for line in result["lines"]:
            ctx.echo(line)
        ctx.echo(f"wrote {result['settings']} settings, results.csv, results.json"
                 f"{', plot.png' if result['plot'] else ''} and grid.png to {result['out']}")
    return result


COMMAND = Command(
    "sweep", SweepConfig, lambda cfg: None, main, extra_args=True,
    context={"out": {"default": Path("diffcli-out/sweep"),
                     "help": "Sweep folder: one subfolder per setting, results.csv/json, plot.png, grid.png."},
             "overwrite": {"help": "Write into a non-empty folder."},
             "resume": {"help": "Continue a killed sweep: scored settings are skipped, a cut one resumes."}},
    help="""Run a command over a grid of its options, with the same seeds; score each setting; one table, plot and grid.

    Example: diffcli sweep seg "a cat" --steps 30 --grid blur=gaussian_-1_1,gaussian_-1_2,gaussian_-1_5,gaussian_-1_10,gaussian_-1_9999999 --grid seg_scale=1,3 --out ablation

    Example: diffcli sweep sample --n 1000 --grid cfg=1,1.5,2,3 --score digits --score fid=REF5K --out cfg-sweep
    """)
