"""diffcli report: one self-contained HTML page for a run folder or a sweep folder.

A run: its command line, its scores (eval.json, if the folder was evaluated), every image as a thumbnail with the
settings it carries (seed, label, prompt) and its own scores where eval.json has them, and the run's figures (grid,
strip, plots). A sweep: a table with a row per setting (the grid's values, the scores, a thumbnail of the setting's
first image) that sorts by any column with a click, and the sweep's plot and grid.

Self-contained: the pictures are inlined as data URIs (thumbnails of at most THUMB_SIDE px a side, at most
IMAGES_MAX of them), the script is inline, nothing is fetched. The page goes beside the folder (FOLDER.report.html),
never into it: graders open every entry of an output folder.
"""
from __future__ import annotations

import base64
import html
import io
import os
import shlex
from dataclasses import MISSING, dataclass
from pathlib import Path
from typing import Any, Optional

from .evaluation import scores_of
from .runner import Command, RunContext
from .shared.errors import DiffcliError
from .shared.fields import opt
from .shared.files import atomic_path, check_folder
from .shared import inputs
from .shared.image_settings import read_settings
from .shared.images import check_image_file
from .shared.limits import PIXELS_MAX
from .shared.records import RECORD_BESIDE, beside

THUMB_SIDE = 256          # px: a thumbnail's longer side at most (smaller images stay as they are)
IMAGES_MAX = 400          # thumbnails a page inlines; the rest are counted
JSON_MAX_BYTES = 64 << 20  # eval.json, results.json, run.json read at most this large


# ---------------------------------------------------------------- reading the folder

def read_json(path: Path) -> Any:
    """A JSON file of the folder (eval.json, results.json, run.json), bounded; None when absent. The one place this
    command reads JSON."""
    if not path.is_file():
        return None
    return inputs.read_json(path, "report input", JSON_MAX_BYTES)


def thumbnail(path: Path) -> tuple[str, tuple[int, int]]:
    """The image as a PNG data URI, at most THUMB_SIDE px a side (without its text chunks), and its full size."""
    from PIL import Image
    check_image_file(path, PIXELS_MAX)
    try:
        with Image.open(path) as im:
            im.load()
            size = im.size
            small = im.copy()
    except (OSError, ValueError, SyntaxError) as e:
        raise DiffcliError(f"cannot read image {path}: {str(e)[:200]}") from None
    if max(size) > THUMB_SIDE:
        small.thumbnail((THUMB_SIDE, THUMB_SIDE), Image.Resampling.LANCZOS)
    if small.mode not in ("RGB", "RGBA", "L", "LA", "P"):
        small = small.convert("RGB")
    buf = io.BytesIO()
    small.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii"), size


def per_image_scores(record: Any) -> dict[str, dict[str, float]]:
    """Numbers eval.json keeps per image (keyed by a path ending in .png), by file name: {name: {score: value}}."""
    found: dict[str, dict[str, float]] = {}
    stack = [("", record, 0)]
    while stack:
        label, value, depth = stack.pop()
        if depth > 16:
            continue
        if isinstance(value, dict):
            for k, v in value.items():
                if isinstance(k, str) and k.lower().endswith(".png"):
                    name = Path(k).name
                    if isinstance(v, (int, float)) and not isinstance(v, bool):
                        found.setdefault(name, {})[label or "score"] = float(v)
                    elif isinstance(v, dict):
                        found.setdefault(name, {}).update({f"{label + ' ' if label else ''}{m}": float(x)
                                                           for m, x in v.items()
                                                           if isinstance(x, (int, float)) and not isinstance(x, bool)})
                else:
                    stack.append((k if not label else f"{label} {k}", v, depth + 1))
    return found


def run_images(folder: Path) -> list[Path]:
    """The PNGs of a run folder and its subfolders (plain/, a blur's folder), not hidden ones, in name order."""
    out = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        out += [Path(root) / f for f in sorted(files) if f.lower().endswith(".png") and not f.startswith(".")]
    return out


# ---------------------------------------------------------------- the page

STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.3em} h2{font-size:1.1em;margin-top:1.5em}
code{background:#f3f3f3;padding:2px 4px;word-break:break-all}
table{border-collapse:collapse;font-size:.9em} td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th button{font:inherit;font-weight:bold;border:0;background:none;cursor:pointer}
th.sorted-asc button::after{content:" \\25B2"} th.sorted-desc button::after{content:" \\25BC"}
.gallery{display:flex;flex-wrap:wrap;gap:10px}
figure{margin:0;width:170px;font-size:.75em} figure img{width:160px;image-rendering:pixelated;border:1px solid #ddd}
figure.figure{width:auto} figure.figure img{width:auto;max-width:100%}
td img{height:48px;image-rendering:pixelated}
details{margin:.5em 0}
"""

# sorting: a click on a column's button sorts the rows by it (numbers as numbers, blanks last), a second click
# reverses; `#sort=NAME` or `#sort=-NAME` in the address sorts on load, by the same click
SCRIPT = """
(function(){
  var table=document.getElementById('settings'); if(!table) return;
  var body=table.tBodies[0];
  function sortBy(th){
    var col=th.cellIndex, desc=th.classList.contains('sorted-asc');
    Array.prototype.forEach.call(table.tHead.rows[0].cells,function(c){c.classList.remove('sorted-asc','sorted-desc');});
    th.classList.add(desc?'sorted-desc':'sorted-asc');
    var rows=Array.prototype.slice.call(body.rows);
    rows.sort(function(a,b){
      var x=a.cells[col].getAttribute('data-value'), y=b.cells[col].getAttribute('data-value');
      if(x===''&&y==='') return 0; if(x==='') return 1; if(y==='') return -1;
      var nx=parseFloat(x), ny=parseFloat(y), r;
      r=(!isNaN(nx)&&!isNaN(ny))?nx-ny:(x<y?-1:(x>y?1:0));
      return desc?-r:r;
    });
    rows.forEach(function(r){body.appendChild(r);});
    table.setAttribute('data-sorted', th.getAttribute('data-key')+(desc?' desc':' asc'));
  }
  Array.prototype.forEach.call(table.tHead.rows[0].cells,function(th){
    var b=th.querySelector('button'); if(b) b.addEventListener('click',function(){sortBy(th);});
  });
  var m=/[#&]sort=(-?)([^&]+)/.exec(location.hash);
  if(m){
    var th=table.querySelector('th[data-key="'+decodeURIComponent(m[2]).replace(/"/g,'')+'"]');
    if(th){ var b=th.querySelector('button'); b.click(); if(m[1]==='-') b.click(); }
  }
})();
"""


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def page(title: str, body: list[str]) -> str:
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{esc(title)}</title><style>{STYLE}</style></head><body>\n" + "\n".join(body)
            + f"\n<script>{SCRIPT}</script>\n</body></html>\n")


def number(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def settings_block(settings: dict[str, Any] | None, record: Any) -> list[str]:
    """The command line and the options, from the images' settings or else the run record."""
    source = settings or (record if isinstance(record, dict) else None)
    if not source or not isinstance(source.get("argv"), list):
        return ["<p>No settings recorded for this folder.</p>"]
    argv = [str(a) for a in source["argv"]]
    lines = [f"<p>Command line: <code>{esc(shlex.join(argv))}</code></p>"]
    if source.get("cwd"):
        lines.append(f"<p>Working folder: <code>{esc(source['cwd'])}</code></p>")
    options = source.get("options")
    if isinstance(options, dict):
        rows = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in options.items())
        lines.append(f"<details><summary>Options ({len(options)})</summary><table>{rows}</table></details>")
    versions = source.get("versions")
    if isinstance(versions, dict):
        lines.append("<p>Versions: " + esc(", ".join(f"{k} {v}" for k, v in versions.items())) + "</p>")
    return lines


def run_page(folder: Path) -> tuple[str, int]:
    """A run folder's page and how many images it shows."""
    record = read_json(folder / "run.json")
    if record is None and folder.name:
        record = read_json(beside(folder, RECORD_BESIDE))
    evaluation = read_json(folder / "eval.json")
    images = run_images(folder)
    if not images:
        raise DiffcliError(f"{folder} holds no PNG images; diffcli report shows a run folder or a sweep folder")
    each = per_image_scores(evaluation) if isinstance(evaluation, dict) else {}
    samples, figures, first = [], [], None
    for path in images[:IMAGES_MAX]:
        settings = read_settings(path)
        first = first or settings
        uri, size = thumbnail(path)
        rel = path.relative_to(folder).as_posix()
        facts = (settings or {}).get("image") or {}
        lines = [f"<b>{esc(rel)}</b>", f"{size[0]} x {size[1]}"]
        lines += [f"{k}: {esc(facts[k])}" for k in ("index", "seed", "label", "prompt", "blur", "view", "crop_x")
                  if facts.get(k) is not None]
        lines += [f"{esc(k)}: {esc(number(v))}" for k, v in each.get(path.name, {}).items()]
        kind = "sample" if facts or path.name in each else "figure"
        html_figure = (f"<figure class=\"{kind}\" data-file=\"{esc(rel)}\"><img alt=\"{esc(rel)}\" src=\"{uri}\">"
                       f"<figcaption>{'<br>'.join(lines)}</figcaption></figure>")
        (samples if kind == "sample" else figures).append(html_figure)
    body = [f"<h1>diffcli report: {esc(folder)}</h1>"]
    body += settings_block(first, record)
    if isinstance(evaluation, dict):
        scores = scores_of(evaluation)
        if scores:
            body.append("<h2>Scores (eval.json)</h2><table id=\"scores\"><tr>"
                        + "".join(f"<th>{esc(k)}</th>" for k in scores) + "</tr><tr>"
                        + "".join(f"<td>{esc(number(v))}</td>" for v in scores.values()) + "</tr></table>")
    if figures:
        body.append("<h2>Figures</h2><div class=\"gallery\">" + "".join(figures) + "</div>")
    body.append(f"<h2>Images ({len(samples)})</h2><div class=\"gallery\">" + "".join(samples) + "</div>")
    if len(images) > IMAGES_MAX:
        body.append(f"<p>{len(images) - IMAGES_MAX} more images not shown (a report shows the first {IMAGES_MAX}).</p>")
    return page(f"diffcli report: {folder.name}", body), min(len(images), IMAGES_MAX)


def sweep_page(folder: Path, results: Any) -> tuple[str, int]:
    """A sweep folder's page: the settings table (sortable by every column), the plot and the grid."""
    if not (isinstance(results, dict) and isinstance(results.get("rows"), list) and isinstance(results.get("grid"), dict)):
        raise DiffcliError(f"{folder / 'results.json'} is no diffcli sweep table (it needs grid and rows)")
    keys = [str(k) for k in results["grid"]]
    rows = [r for r in results["rows"] if isinstance(r, dict)]
    metrics = list(dict.fromkeys(m for r in rows if isinstance(r.get("scores"), dict) for m in r["scores"]))
    head = "".join(f"<th data-key=\"{esc(k)}\"><button type=\"button\">{esc(k)}</button></th>" for k in keys + metrics)
    lines, shown = [], 0
    for r in rows:
        setting = r.get("setting") if isinstance(r.get("setting"), dict) else {}
        scores = r.get("scores") if isinstance(r.get("scores"), dict) else {}
        cells = [f"<td data-value=\"{esc(setting.get(k, ''))}\">{esc(setting.get(k, ''))}</td>" for k in keys]
        for m in metrics:
            v = scores.get(m)
            ok = isinstance(v, (int, float)) and not isinstance(v, bool)
            cells.append(f"<td data-value=\"{esc(repr(float(v)) if ok else '')}\">{esc(number(v) if ok else '-')}</td>")
        name = str(r.get("folder", ""))
        picture = ""
        files = r.get("files") if isinstance(r.get("files"), list) else []
        first = folder / name / str(files[0]) if files and name and shown < IMAGES_MAX else None
        if first is not None and first.is_file() and folder.resolve() in first.resolve().parents:
            picture = f"<img alt=\"{esc(name)}\" src=\"{thumbnail(first)[0]}\">"
            shown += 1
        lines.append(f"<tr data-folder=\"{esc(name)}\">{''.join(cells)}<td>{esc(name)}</td><td>{picture}</td></tr>")
    sweep = read_json(folder / "sweep.json")
    body = [f"<h1>diffcli report: sweep {esc(folder)}</h1>"]
    if isinstance(sweep, dict) and isinstance(sweep.get("args"), list):
        argv = ["diffcli", "sweep", str(sweep.get("command")), *map(str, sweep["args"])]
        body.append(f"<p>Swept command: <code>{esc(shlex.join(argv))}</code></p>")
    body.append("<h2>Settings</h2><p>Click a column to sort by it; again to reverse.</p>"
                f"<table id=\"settings\"><thead><tr>{head}<th>folder</th><th>first image</th></tr></thead>"
                f"<tbody>{''.join(lines)}</tbody></table>")
    figures = []
    for name in ("plot.png", "grid.png"):
        if (folder / name).is_file():
            figures.append(f"<figure class=\"figure\" data-file=\"{name}\"><img alt=\"{name}\" "
                           f"src=\"{thumbnail(folder / name)[0]}\"><figcaption>{name}</figcaption></figure>")
            shown += 1
    if figures:
        body.append("<h2>Figures</h2>" + "".join(figures))
    return page(f"diffcli report: sweep {folder.name}", body), shown


# ---------------------------------------------------------------- the command

@dataclass
class ReportConfig:
    folder: Path = opt(MISSING, argument=True, metavar="FOLDER", panel="input",
                       help="A run's output folder (sample, seg, panorama, anagram, pg, train) or a sweep's.")


def default_out(folder: Path) -> Path:
    """FOLDER.report.html beside the folder."""
    return beside(folder, ".report.html")


def main(cfg: ReportConfig, ctx: RunContext) -> dict[str, Any]:
    """`diffcli report FOLDER`: read everything, build the page, then write it (atomically) beside the folder."""
    folder = check_folder(cfg.folder, "folder")
    out = Path(ctx.out) if ctx.out is not None else default_out(folder)
    if out.is_dir():
        raise DiffcliError(f"--out {out} is a folder; name the HTML file to write")
    if os.path.lexists(out) and not ctx.overwrite:
        raise DiffcliError(f"{out} exists; pass --overwrite or choose another --out")
    if out.resolve().parent == folder.resolve() or folder.resolve() in out.resolve().parents:
        raise DiffcliError(f"--out {out} lies inside {folder}; a report goes beside the folder (graders open every "
                           f"entry of an output folder)")
    results = read_json(folder / "results.json") if (folder / "sweep.json").is_file() else None
    text, shown = sweep_page(folder, results) if results is not None else run_page(folder)
    with atomic_path(out) as tmp:
        tmp.write_text(text, encoding="utf-8")
    ctx.echo(f"wrote {out} ({'sweep, ' if results is not None else ''}{shown} picture(s), "
             f"{len(text.encode()) / 1e6:.2f} MB)")
    return {"out": str(out), "pictures": shown, "sweep": results is not None}


COMMAND = Command(
    "report", ReportConfig, lambda cfg: None, main, config_file=False,
    context={"out": {"default": None, "cli_type": Optional[Path],
                     "help": "The HTML file to write (default: FOLDER.report.html beside the folder)."},
             "overwrite": {"help": "Replace an existing report."}},
    help="""One self-contained HTML page for a run or a sweep: the images with their settings and scores, a sweep's
    settings as rows sortable by each score, the plots. Pictures are inlined as thumbnails.

    Example: diffcli report digits

    Example: diffcli report cfg-sweep --out cfg-sweep.html
    """)
