"""What the real 003 grader sees, and what eval must never do: CLIP preprocessing equal to the grader's
`preprocess(Image.open(path))` for every image mode a generator may write; panorama and anagram folders that the
grader (every entry of glob(dir/*) opened with PIL) reads as written, their run record and animations beside the
folder (resume included); eval's one-line warnings for every entry the grader would choke on; no hang on FIFOs,
no double counting through symlink loops, no reading outside the folder through run.json."""
from __future__ import annotations

import contextlib
import json
import os
import signal
from glob import glob
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import invoke_cli

open_clip = pytest.importorskip("open_clip")
from torchvision import transforms as T  # noqa: E402

# OpenAI CLIP's preprocess, written out here (not taken from open_clip or diffcli): what the grader runs on
# Image.open(path), in this order, in the file's own mode until the convert
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
GRADER_PREPROCESS = T.Compose([T.Resize(32, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(32),
                               lambda im: im.convert("RGB"), T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)])


@contextlib.contextmanager
def deadline(seconds: float):
    """Fail instead of hanging: SIGALRM interrupts a blocking open() (of a FIFO) and raises here."""
    def expire(*_):
        raise TimeoutError(f"still running after {seconds} s (a FIFO opened?)")
    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from pipes import build_tiny_clip
    config, weights, model = build_tiny_clip(tmp_path_factory.mktemp("clip"), "tinyclip-trust", seed=1)
    return config, weights, model, open_clip.get_tokenizer("tinyclip-trust")


def grader_scores(folder: Path, names: list[str], model, tokenizer, prompt_of) -> dict[str, float]:
    """The grader's per-image cosine: preprocess(Image.open(path)), one image at a time."""
    out = {}
    with torch.no_grad():
        for name in names:
            image = model.encode_image(GRADER_PREPROCESS(Image.open(folder / name)).unsqueeze(0))
            text = model.encode_text(tokenizer([prompt_of(name)]))
            out[name] = torch.cosine_similarity(image, text).item()
    return out


def save_modes(folder: Path) -> dict[str, str]:
    """One image per mode a generator may write (odd sizes, so the resize and crop both act): name -> mode."""
    rng = np.random.default_rng(7)
    rgb = Image.fromarray(rng.integers(0, 256, (45, 61, 3), dtype=np.uint8))
    rgba = rng.integers(0, 256, (45, 61, 4), dtype=np.uint8)
    rgba[:, :20, 3] = 0  # fully transparent columns: premultiplied resizing shows at their edge
    palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    images = {
        "RGB": (rgb, {}), "RGBA": (Image.fromarray(rgba), {}), "LA": (Image.fromarray(rgba).convert("LA"), {}),
        "L": (rgb.convert("L"), {}), "1": (rgb.convert("1"), {}), "P": (palette, {}),
        "P_transparent_index": (palette, {"transparency": 3}),
        "P_alpha_palette": (palette, {"transparency": bytes(rng.integers(0, 256, 64, dtype=np.uint8))}),
        "I16": (Image.fromarray(rng.integers(0, 700, (45, 61), dtype=np.uint16)), {}),
    }
    written = {}
    for key, (im, kw) in images.items():
        name = f"a_picture_in_mode_{key}.png"
        im.save(folder / name, **kw)
        written[name] = Image.open(folder / name).mode
    # modes PNG cannot hold: TIFF files (the grader opens any file PIL reads)
    for key, im in {"CMYK": rgb.convert("CMYK"), "I32": Image.fromarray(rng.integers(0, 900, (45, 61), dtype=np.int32)),
                    "F": Image.fromarray(rng.normal(128, 60, (45, 61)).astype(np.float32))}.items():
        name = f"a_picture_in_mode_{key}.tif"
        im.save(folder / name)
        written[name] = Image.open(folder / name).mode
    return written


def test_clip_preprocessing_is_the_graders_for_every_mode(tmp_path, tiny_clip, capsys):
    from diffcli.backends.clip_model import embed_image_files, embed_prompts, load_clip
    from diffcli.data.image_folders import open_image
    config, weights, model, tokenizer = tiny_clip
    d = tmp_path / "ambiguous_images"
    d.mkdir()
    modes = save_modes(d)
    assert {"RGB", "RGBA", "LA", "L", "1", "P", "I;16", "CMYK", "I", "F"} <= set(modes.values())
    assert sum(m == "P" for m in modes.values()) == 3
    names = sorted(modes)
    prompt = lambda name: name[:-4].replace("_", " ")  # noqa: E731
    want = grader_scores(d, names, model, tokenizer, prompt)

    clip = load_clip(str(config), str(weights), torch.device("cpu"))
    image_emb = embed_image_files(clip, [str(d / n) for n in names], batch_size=4)
    text_emb = embed_prompts(clip, [prompt(n) for n in names], 4)
    got = dict(zip(names, (image_emb * text_emb).sum(-1).tolist()))
    for name in names:
        assert got[name] == pytest.approx(want[name], abs=1e-4), (modes[name], got[name], want[name])
    # RGB pixels reach the network exactly as before (converting an RGB image is a copy)
    rgb = str(d / "a_picture_in_mode_RGB.png")
    assert torch.equal(clip.preprocess(open_image(rgb)), clip.preprocess(Image.open(rgb).convert("RGB")))
    # the test has teeth: converting to RGB before resizing (the old order) moves RGBA/P/I;16 scores visibly
    with torch.no_grad():
        before = {n: torch.cosine_similarity(
            model.encode_image(GRADER_PREPROCESS(Image.open(d / n).convert("RGB"))[None]),
            model.encode_text(tokenizer([prompt(n)]))).item() for n in names}
    assert max(abs(before[n] - want[n]) for n in names) > 1e-3

    # through the CLI: eval.json's per-prompt means are the grader's per-image scores (one image a prompt)
    code, out, err = invoke_cli(["eval", d, "--app", "ambiguous_images", "--clip-model", config,
                                 "--clip-pretrained", weights], capsys)
    assert code == 0, err
    record = json.loads((d / "eval.json").read_text())
    pngs = [n for n in names if n.endswith(".png")]
    assert {n: record[str(d / n)] for n in pngs} == pytest.approx({n: want[n] for n in pngs}, abs=1e-4)
    assert "alpha channel" in err and "nearest-neighbour" in err and "clips values above 255" in err


# ---------------------------------------------------------------- folders panorama and anagram hand in

def grader_reads(folder: Path) -> list[str]:
    """The grader's listing: every entry of glob(dir/*) opened with PIL and preprocessed; raises where it would."""
    names = []
    for path in sorted(glob(os.path.join(folder, "*"))):
        GRADER_PREPROCESS(Image.open(path))
        names.append(os.path.basename(path))
    return names


def test_panorama_folder_is_gradable_and_resumes_with_its_record_beside(tmp_path, tiny_sd, capsys):
    args = ["panorama", "--prompts-file", tmp_path / "wide.txt", "--model", tiny_sd, "--height", "16", "--width",
            "32", "--stride", "4", "--steps", "2", "--eval-pos", "0,16"]
    (tmp_path / "wide.txt").write_text("a red barn\na blue lake\n")
    out = tmp_path / "wide_images"
    code, _, err = invoke_cli([*args, "--out", out], capsys)
    assert code == 0, err
    assert grader_reads(out) == sorted(p.name for p in out.iterdir()) and len(grader_reads(out)) == 6
    record_file = tmp_path / "wide_images.run.json"
    record = json.loads(record_file.read_text())
    assert record["command"] == "panorama" and record["status"] == "complete" and len(record["files"]) == 6
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    (out / "a_blue_lake_16.png").unlink()
    code, stdout, err = invoke_cli([*args, "--out", out, "--resume"], capsys)
    assert code == 0, err
    assert "1 prompt(s) already there" in stdout
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    code, _, err = invoke_cli([*args, "--out", out, "--resume", "--steps", "3"], capsys)
    assert code == 2 and "options differ" in err  # resume reads the record beside the folder

    # a file of the user's where the record would go: refused in one line, nothing written or overwritten
    mine = tmp_path / "mine.run.json"
    mine.write_text("my notes\n")
    code, _, err = invoke_cli([*args, "--out", tmp_path / "mine"], capsys)
    assert code == 2 and err.count("\n") == 1 and "mine.run.json exists and is not a diffcli run record" in err
    assert mine.read_text() == "my notes\n" and not (tmp_path / "mine").exists()


def test_anagram_folder_is_gradable_with_animations_and_record_beside(tmp_path, tiny_if, capsys):
    args = ["anagram", "a horse", "a village", "--views", "identity", "rotate_cw", "--model", tiny_if[0],
            "--sr-model", tiny_if[1], "--steps", "2", "--sr-steps", "1", "--frames", "2"]
    out = tmp_path / "ambiguous_images"
    code, _, err = invoke_cli([*args, "--out", out], capsys)
    assert code == 0, err
    assert grader_reads(out) == sorted(p.name for p in out.iterdir()) == ["a_horse.png", "a_village.png"]
    anim = tmp_path / "ambiguous_images.animations"
    assert sorted(p.name for p in anim.iterdir()) == ["a_horse-a_village.gif", "a_horse-a_village_strip.png"]
    record = json.loads((tmp_path / "ambiguous_images.run.json").read_text())
    assert record["command"] == "anagram" and record["animations"] == anim.name
    # resume: the missing animation is found beside the folder and redone; the views stay as they were
    views = {p.name: p.read_bytes() for p in out.iterdir()}
    gif = (anim / "a_horse-a_village.gif").read_bytes()
    (anim / "a_horse-a_village.gif").unlink()
    code, stdout, err = invoke_cli([*args, "--out", out, "--resume"], capsys)
    assert code == 0 and "(0 already there)" in stdout, err
    assert (anim / "a_horse-a_village.gif").read_bytes() == gif
    assert {p.name: p.read_bytes() for p in out.iterdir()} == views

    # OUT.animations that is not ours (no record of ours beside it): refused, untouched
    theirs = tmp_path / "other.animations"
    theirs.mkdir()
    (theirs / "holiday.png").write_bytes(b"not ours")
    code, _, err = invoke_cli([*args, "--out", tmp_path / "other"], capsys)
    assert code == 2 and err.count("\n") == 1 and "was not written by diffcli" in err
    assert (theirs / "holiday.png").read_bytes() == b"not ours" and not (tmp_path / "other").exists()


def test_beside_names_and_the_older_layout(tmp_path, monkeypatch):
    from diffcli.shared.errors import DiffcliError
    from diffcli.shared.records import begin_output, beside, write_run_json
    assert beside("wide_images", ".run.json") == Path("wide_images.run.json")
    assert beside("runs/wide_images/", ".animations") == Path("runs/wide_images.animations")
    monkeypatch.chdir(tmp_path)
    here = Path(os.getcwd())
    assert beside(".", ".run.json") == here.parent / f"{here.name}.run.json"
    with pytest.raises(DiffcliError, match="no folder around it"):
        beside("/", ".run.json")
    # a folder an older diffcli wrote (run.json and animations/ inside): resume says what to move, in one line
    out = tmp_path / "old"
    (out / "animations").mkdir(parents=True)
    write_run_json(out, "anagram", {"seed": 0}, "cpu")
    with pytest.raises(DiffcliError, match=r"older diffcli.*move .*old/run.json to .*old.run.json and "
                                           r".*old/animations to .*old.animations, then resume"):
        begin_output(out, False, True, {"seed": 0}, record_path=beside(out, ".run.json"),
                     beside_folders=[beside(out, ".animations")])
    assert sorted(p.name for p in out.iterdir()) == ["animations", "run.json"]
    if os.getuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        try:
            with pytest.raises(DiffcliError, match="is not writable"):
                begin_output(locked / "out", False, False, {}, record_path=beside(locked / "out", ".run.json"))
        finally:
            locked.chmod(0o700)


# ---------------------------------------------------------------- eval: what the grader chokes on, no hangs

def noise_png(path: Path, seed: int, mode: str = "RGB") -> None:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).convert(mode).save(path)


def test_eval_names_every_entry_the_grader_chokes_on_and_never_hangs(tmp_path, tiny_clip, capsys):
    config, weights, *_ = tiny_clip
    d = tmp_path / "wide_images"
    d.mkdir()
    for i, pos in enumerate((0, 64)):
        noise_png(d / f"A_red_barn_{pos}.png", i)
    noise_png(d / "extra_photo.jpg", 5)                             # an image PIL opens: the grader copes
    (d / "run.json").write_text('{"command": "panorama"}')         # what diffcli used to leave inside
    (d / "animations").mkdir()
    (d / "notes.txt").write_text("todo")
    (d / "eval.json").write_text('{"score": 0.3}')                 # a previous grading
    (d / "broken.gif").write_bytes(b"GIF89a" + os.urandom(40))
    os.symlink(tmp_path / "nowhere.png", d / "dangling.png")
    os.mkfifo(d / "pipe.png")
    (d / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")                 # hidden: glob(dir/*) never lists it
    choking = ["run.json", "animations", "notes.txt", "broken.gif", "dangling.png", "pipe.png", "eval.json"]

    with deadline(60):
        code, out, err = invoke_cli(["eval", d, "--app", "wide_images", "--clip-model", config,
                                     "--clip-pretrained", weights], capsys)
    assert code == 0, err
    assert "CLIP score" in out and "score" in json.loads((d / "eval.json").read_text())  # scoring went on
    lines = err.splitlines()
    for name in choking:  # one warning line each, naming the entry
        mine = [ln for ln in lines if ln.startswith(f"warning: {d / name}:")]
        assert len(mine) == 1, (name, err)
    assert "hang" in next(ln for ln in lines if f"{d / 'pipe.png'}:" in ln)
    assert "a second grader run" in next(ln for ln in lines if f"{d / 'eval.json'}:" in ln)
    assert "wide_images.run.json" in next(ln for ln in lines if f"{d / 'run.json'}:" in ln)
    assert not any(".DS_Store" in ln or "extra_photo.jpg:" in ln for ln in lines)
    assert stat_is_fifo(d / "pipe.png")  # left as it was

    # an eval.json that is a FIFO is neither read nor replaced: one line, before any work
    e = tmp_path / "fifo_eval"
    e.mkdir()
    noise_png(e / "A_red_barn_0.png", 0)
    os.mkfifo(e / "eval.json")
    with deadline(60):
        code, _, err = invoke_cli(["eval", e, "--app", "wide_images", "--clip-model", config,
                                   "--clip-pretrained", weights], capsys)
    assert code == 2 and err.count("\n") == 1 and "FIFO" in err and stat_is_fifo(e / "eval.json")


def stat_is_fifo(path: Path) -> bool:
    import stat
    return stat.S_ISFIFO(os.lstat(path).st_mode)


def write_digit_pngs(folder: Path, n: int, seed: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        im = np.zeros((28, 28), np.uint8)
        im[4 + i % 20, 3:25] = 255
        Image.fromarray(np.clip(im + rng.integers(0, 60, im.shape), 0, 255).astype(np.uint8)).save(
            folder / f"{i:05d}.png")


def test_fid_lists_files_itself_through_symlink_loops_and_fifos(tmp_path, capsys):
    from diffcli.data.fid import cleanfid_listing
    gen, ref = tmp_path / "gen", tmp_path / "ref"
    write_digit_pngs(gen / "sub", 12, seed=1)
    write_digit_pngs(gen, 12, seed=2)
    write_digit_pngs(ref, 24, seed=3)
    clean = tmp_path / "clean"  # the same images, no tricks
    write_digit_pngs(clean / "sub", 12, seed=1)
    write_digit_pngs(clean, 12, seed=2)
    os.symlink(gen, gen / "sub" / "loop")                    # gen/sub/loop -> gen: clean-fid's glob follows it
    os.mkfifo(gen / "pipe.png")
    os.mkfifo(gen / "run.json")                               # is_sample_folder must not read it
    notes: list[str] = []
    with deadline(60):
        files = cleanfid_listing(str(gen), notes)
    assert len(files) == 24 and not any("loop" in f or "pipe" in f for f in files)
    assert any("symlinked folder" in n and "loop" in n for n in notes) and any("pipe.png" in n for n in notes)
    assert files == [f.replace(str(clean), str(gen)) for f in cleanfid_listing(str(clean))]
    assert len(glob(os.path.join(gen, "**/*.png"), recursive=True)) > 24  # what clean-fid's own glob counts

    with deadline(120):
        code, _, err = invoke_cli(["eval", gen, "--fid", ref, "--features", "mnist", "--device", "cpu"], capsys)
        assert code == 0, err
        looped = json.loads((gen / "eval.json").read_text())["fid"]
        code, _, err2 = invoke_cli(["eval", clean, "--fid", ref, "--features", "mnist", "--device", "cpu"], capsys)
        assert code == 0, err2
    plain = json.loads((clean / "eval.json").read_text())["fid"]
    assert looped["n_images"] == plain["n_images"] == 24 and looped["value"] == pytest.approx(plain["value"], rel=1e-9)
    assert "symlinked folder" in err and "pipe.png" in err


@pytest.mark.parametrize("where", ["dotdot", "absolute", "symlink-out"])
def test_digits_refuses_run_json_files_outside_the_folder(tmp_path, capsys, where):
    d = tmp_path / "samples"
    write_digit_pngs(d, 3, seed=0)
    outside = tmp_path / "secret.png"
    noise_png(outside, 9, "L")
    os.symlink(d / "00000.png", d / "inside_link.png")   # a link that stays inside is fine
    name = {"dotdot": "../secret.png", "absolute": str(outside), "symlink-out": "link.png"}[where]
    if where == "symlink-out":
        os.symlink(outside, d / "link.png")
    samples = [{"file": f, "seed": i, "label": i} for i, f in enumerate(["00000.png", "inside_link.png", name])]
    (d / "run.json").write_text(json.dumps({"command": "sample", "samples": samples}))
    code, _, err = invoke_cli(["eval", d, "--digits", "--device", "cpu"], capsys)
    assert code == 2 and err.count("\n") == 1 and "outside" in err and name in err
    assert not (d / "eval.json").exists()
    samples[-1]["file"] = "00002.png"
    (d / "run.json").write_text(json.dumps({"command": "sample", "samples": samples}))
    code, out, err = invoke_cli(["eval", d, "--digits", "--device", "cpu"], capsys)
    assert code == 0 and "3 samples" in out, err
