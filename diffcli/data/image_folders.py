"""The folders of images `diffcli eval` scores: which files count, what a `diffcli sample` folder records about its
samples, every image decoded once up front (shared among torchrun ranks) so a bad file is named before any
model loads, and the entries the real 003 grader would choke on. Problems are one-line DiffcliErrors; what only
deserves a mention comes back as notes.

Nothing here opens what is not a regular file: a FIFO would block the reader forever, so every open goes through
`open_regular` (O_NONBLOCK, then fstat), and listings look at stat before anything is read.
"""
from __future__ import annotations

import os
import stat
import zlib
from pathlib import Path
from typing import BinaryIO, Sequence

from PIL import Image, UnidentifiedImageError

from ..shared.images import IMAGE_EXTS
from ..shared.errors import DiffcliError
from ..shared.files import check_folder, some_names
from ..shared.dist import Dist, read_each
from ..shared.inputs import read_json

SAMPLE_ARTIFACTS = ("grid.png", "strip.png", "compare.png")  # written beside the samples by sample, seg, pg
EVAL_FILE = "eval.json"                        # the grader's own output, in the folder it grades
PIL_ERRORS = (OSError, SyntaxError, ValueError, EOFError, zlib.error, Image.DecompressionBombError)


def open_regular(path: str | os.PathLike) -> BinaryIO:
    """Open a regular file for reading; anything else (FIFO, socket, device, folder) is a one-line error, and a
    FIFO never blocks: it is opened with O_NONBLOCK and refused after fstat, before a byte is read."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        raise DiffcliError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise DiffcliError(f"{path} is not a regular file ({file_kind(path)}); refusing to read it")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def open_image(path: str | os.PathLike) -> Image.Image:
    """One image fully decoded, in the mode it was saved in (not converted: the 003 grader hands the image as
    opened to CLIP's preprocess, which resizes and crops in that mode and converts to RGB only then). A file PIL
    cannot decode is a one-line error naming it."""
    im, reason = decode_image(path)
    if im is None:
        raise DiffcliError(f"cannot read image {path}: {reason} (corrupt or truncated file?)")
    return im


def decode_image(path: str | os.PathLike) -> tuple[Image.Image | None, str]:
    """(the decoded image, "") or (None, why PIL cannot decode it); a file that is not a regular file, or that
    cannot be opened, is a one-line error."""
    with open_regular(path) as f:
        try:
            im = Image.open(f)
            im.load()  # decoded now; closing our file object keeps the pixels (only im.close() drops them)
            return im, ""
        except UnidentifiedImageError:
            return None, "PIL cannot identify the image format"
        except PIL_ERRORS as e:
            return None, str(e).splitlines()[0] if str(e) else type(e).__name__


def file_kind(path: str | os.PathLike) -> str:
    """What a path is, in words, from lstat/stat only (never opened)."""
    try:
        st = os.lstat(path)
    except OSError:
        return "missing"
    if stat.S_ISLNK(st.st_mode):
        try:
            target = os.stat(path)
        except OSError:
            return "a broken symlink"
        return "a symlink to " + _kind(target.st_mode)
    return _kind(st.st_mode)


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISREG, "a file"), (stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "a special file"


def is_regular(path: str | os.PathLike) -> bool:
    """A regular file (following symlinks), decided by stat alone."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def check_images(paths: Sequence[str | Path], dist: Dist | None = None) -> dict[str, list[str]]:
    """Decode every image once before any model runs (so a bad file is named up front); modes -> file names.

    Under torchrun each rank decodes its share and the modes come back to rank 0 (the others get {}).
    """
    modes_in_order = read_each(dist, paths, lambda p: open_image(p).mode)
    if dist is not None:
        modes_in_order = dist.gather(modes_in_order) or []
    modes: dict[str, list[str]] = {}
    for p, mode in zip(paths, modes_in_order):
        modes.setdefault(mode, []).append(Path(p).name)
    return modes


def conversion_warnings(modes: dict[str, list[str]]) -> list[str]:
    """What CLIP's preprocess does to images of other modes (PIL resizes them in their own mode, then
    convert('RGB'), as the grader's `preprocess(Image.open(path))` does), named."""
    out = []
    wide = [n for m in ("I;16", "I;16B", "I;16L", "I", "F") for n in modes.get(m, [])]
    alpha = [n for m in ("RGBA", "LA", "PA", "RGBa", "La") for n in modes.get(m, [])]
    nearest = [n for m in ("P", "1") for n in modes.get(m, [])]
    if wide:
        out.append(f"{len(wide)} image(s) have 16/32-bit pixels: as the grader does, PIL resizes them at that depth "
                   f"and convert('RGB') then clips values above 255 rather than rescaling them: {some_names(wide)}")
    if alpha:
        out.append(f"{len(alpha)} image(s) have an alpha channel: as the grader does, PIL resizes them with "
                   f"premultiplied alpha (transparent pixels darken their neighbours) and convert('RGB') then drops "
                   f"the alpha: {some_names(alpha)}")
    if nearest:
        out.append(f"{len(nearest)} palette or 1-bit image(s): as the grader does, PIL resizes them nearest-neighbour "
                   f"(no smoothing) before convert('RGB'): {some_names(nearest)}")
    return out


def grader_chokes(folder: str, decoded: Sequence[str] = (), writes_eval: bool = True) -> list[str]:
    """One note per entry of FOLDER the real 003 grader would choke on. It opens every entry of glob(FOLDER/*)
    (so hidden names are never seen) with PIL: a subfolder, a JSON or text file, a broken image, a broken symlink
    or a special file stops it (a FIFO hangs it). `decoded`: names already decoded without error (the scored
    images), not read again. `writes_eval`: this run writes eval.json into FOLDER, as the grader does, and a
    second grader run would choke on it. Nothing that is not a regular file is opened."""
    notes = []
    skip = set(decoded) | {EVAL_FILE}
    for name in sorted(os.listdir(folder)):
        if name.startswith(".") or name in skip:
            continue
        path = os.path.join(folder, name)
        kind = file_kind(path)
        if kind in ("a file", "a symlink to a file"):
            try:
                image, reason = decode_image(path)
            except DiffcliError as e:  # unreadable (permissions), or swapped for a special file since the stat
                image, reason = None, str(e)
            if image is not None:
                continue
            what = (f"a broken image ({reason})" if Path(name).suffix.lower() in IMAGE_EXTS
                    else f"not an image PIL opens ({'JSON' if name.endswith('.json') else reason})")
        else:
            what = kind
        hint = ""
        if name == "run.json" or (name == "animations" and "folder" in kind):
            hint = (f" (diffcli panorama and anagram now keep their run record and animations beside the folder, "
                    f"as {Path(folder).name}.run.json and {Path(folder).name}.animations/)")
        verb = "hang on" if "FIFO" in kind else "crash on"
        notes.append(f"{path}: {what}; the 003 grader opens every entry of the folder with PIL and would {verb} it: "
                     f"move it out of the folder before grading{hint}")
    eval_file = os.path.join(folder, EVAL_FILE)
    if writes_eval:
        notes.append(f"{eval_file}: written there as the 003 grader writes it, but it is not an image: a second "
                     f"grader run on this folder would crash on it: move it out before grading again")
    elif os.path.lexists(eval_file):
        notes.append(f"{eval_file}: a previous grading's output, not an image: the 003 grader opens every entry of "
                     f"the folder with PIL and would crash on it: move it out before grading again")
    return notes


def list_pngs(folder: str) -> tuple[list[str], list[str]]:
    """The *.png names the protocol scores (sorted; regular files only) and a note naming other image files."""
    path = check_folder(folder)
    files = sorted(p.name for p in path.iterdir() if p.is_file())
    if not files:
        raise DiffcliError(f"folder {folder} is empty: no images to score")
    pngs = [n for n in files if n.endswith(".png")]
    others = [n for n in files if not n.endswith(".png") and Path(n).suffix.lower() in IMAGE_EXTS]
    if not pngs:
        found = (f" (it holds {len(others)} other image(s): {some_names(others)}; the protocol scores *.png names)"
                 if others else "")
        raise DiffcliError(f"no PNG images in {folder}{found}")
    notes = [f"skipped {len(others)} non-PNG image(s): the protocol names its images <prompt>.png, so this score "
             f"leaves them out, but the grader opens every entry of the folder: move them out so that its score is "
             f"this one: {some_names(others)}"]
    return pngs, notes if others else []


def is_sample_folder(folder: str) -> bool:
    """Whether `diffcli sample`, `seg` or `pg` wrote the folder (its run.json says so): their grid.png and strip.png
    sit beside the samples."""
    run_json = Path(folder) / "run.json"
    if not is_regular(run_json):  # never read a FIFO (it would hang) or a folder
        return False
    try:
        record = read_json(run_json, "run record")
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and record.get("command") in ("sample", "seg", "pg")


def recorded_samples(folder: str) -> list[str] | None:
    """The sample images a diffcli run record in `folder` lists (`samples: [{file}]`, relative to the folder), or
    None without one. THE rule telling samples from figures: what the record lists is a sample; what it does not
    (grid.png, strip.png, compare.png, embedding.png, landing pictures, another run's subfolder) is not."""
    if not is_sample_folder(folder):
        return None
    try:
        samples = read_json(Path(folder) / "run.json", "run record").get("samples")
    except (ValueError, AttributeError):
        return None
    if not (isinstance(samples, list) and samples and all(isinstance(s, dict) and isinstance(s.get("file"), str)
                                                         for s in samples)):
        return None
    return [s["file"] for s in samples]


def read_digit_samples(folder: str) -> tuple[list[str], list[int] | None, list[str]]:
    """The samples `diffcli sample` recorded in run.json (file, label); without one, every PNG, unlabelled."""
    path = check_folder(folder)
    run_json = path / "run.json"
    if not is_regular(run_json):
        pngs, notes = list_pngs(folder)
        pngs = [n for n in pngs if n not in SAMPLE_ARTIFACTS and not n.startswith(".")]
        if not pngs:
            raise DiffcliError(f"no sample PNGs in {folder}")
        notes.append(f"no run.json in {folder}: no labels, so no class accuracy ({len(pngs)} PNGs)")
        return [str(path / n) for n in pngs], None, notes
    try:
        samples = read_json(run_json, "run record").get("samples")
    except (ValueError, AttributeError):
        raise DiffcliError(f"{run_json} is not a diffcli run record (JSON with a samples list)") from None
    if not (isinstance(samples, list) and samples and all(isinstance(s, dict) and "file" in s for s in samples)):
        raise DiffcliError(f"{run_json} lists no samples (expected samples: [{{file, seed, label}}] "
                           "from diffcli sample)")
    names = [s["file"] for s in samples]
    if not all(isinstance(n, str) and n for n in names):
        raise DiffcliError(f"{run_json}: every sample's file must be a file name (a non-empty string)")
    root = os.path.realpath(path)
    outside = [n for n in names if os.path.isabs(n) or os.path.commonpath([root, os.path.realpath(path / n)]) != root]
    if outside:
        raise DiffcliError(f"{run_json} names {len(outside)} sample file(s) that resolve outside {folder} (absolute "
                           f"paths, '..' or symlinks out), which eval never reads: {some_names(outside)}")
    files = [str(path / n) for n in names]
    missing = [n for n in names if not is_regular(path / n)]
    if missing:
        raise DiffcliError(f"{run_json} lists {len(missing)} sample(s) missing from the folder: {some_names(missing)}")
    labels = [s.get("label") for s in samples]
    if any(y is None for y in labels):
        return files, None, [f"{run_json} records no labels (unconditional samples): no class accuracy"]
    if not all(isinstance(y, int) for y in labels):
        raise DiffcliError(f"{run_json}: sample labels must be integers")
    return files, labels, []
