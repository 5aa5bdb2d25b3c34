"""Golden outputs: a fixed set of diffcli command lines must keep writing the same bytes.

Every case below runs diffcli commands in this process through the console entry point, with the command-line
flags only (never a module's functions, which a refactor may move or rename), on tiny models: the shipped
checkpoints, the tiny digit run, tiny random diffusers pipelines built in code. Each file a case writes is
hashed (sha256) and compared with tests/golden.json, so moving code between modules, renaming internals or
re-declaring options cannot change an image, a checkpoint or a record unnoticed.

What is hashed:
- run records and other JSON (run.json, OUT.run.json, eval.json, metrics.json, compare.json, ...) and JSON-lines
  logs: the parsed content, with the folders of this test written as placeholders (<case>, <digits>, <sd>,
  <repo>, ...) and the fields that describe the machine or the moment rather than the result left out
  (VOLATILE_KEYS: time stamps, seconds since the start, package versions), as sorted-keys JSON;
- safetensors files: the tensors' header and bytes, and their JSON metadata as above (it records the dataset
  folder, a temporary path);
- PNG files: their raw bytes without the generation-settings text chunks (`diffcli`, `parameters`), so the entry
  pins the pixels and the encoder's bytes as before; the settings themselves, read as JSON and scrubbed as above,
  are a second entry `<file>#settings`;
- every other file (GIF, CSV, ...): its raw bytes.

A failure lists, per case, the commands that failed and the files whose hash changed, that are missing or that
are extra. The hashes hold for one machine and one set of library versions (float rounding, PNG encoders): a
refactor is checked where golden.json was written: golden.env.json records the machine and versions, and the test
is skipped, saying which differ, anywhere else.

golden.json is regenerated only on purpose, when an output is meant to change:

    DIFFCLI_GOLDEN_WRITE=1 python -m pytest tests/test_golden.py

which runs every case twice and refuses to write if the two runs disagree (an output that is not a function of
its command line cannot be a golden value). Commit the new golden.json with the change that explains it.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import struct
import zlib
from pathlib import Path
from typing import Any

import pytest

from conftest import ROOT, invoke_cli

GOLDEN = Path(__file__).with_name("golden.json")
ENVIRONMENT = Path(__file__).with_name("golden.env.json")  # the machine and versions golden.json holds for
PACKAGES = ("torch", "diffusers", "transformers", "numpy", "pillow", "scipy", "safetensors", "open_clip_torch",
            "matplotlib", "clean-fid")
WRITE = os.environ.get("DIFFCLI_GOLDEN_WRITE") == "1"

# JSON keys whose values describe the machine or the moment, not the result: left out of the hash
VOLATILE_KEYS = frozenset({"time", "versions"})

TINY_TRAIN = ["--net", "tiny", "--batch", "8", "--lr", "2e-3", "--lr-warmup", "1", "--quiet", "--device", "cpu"]

# case name -> the command lines it runs, in order. Placeholders: {case} the case's own folder (every file written
# under it is hashed, paths relative to it), {digits} the labelled digit folder, {run} the tiny digit run,
# {sd} / {sdxl} the tiny Stable Diffusion 1.x / XL pipelines, {if1} / {if2} the tiny DeepFloyd IF stages,
# {clip} / {clip_weights} a tiny open_clip model (JSON config, safetensors weights). The shipped models are named
# as a user names them.
CASES: dict[str, list[list[str]]] = {
    # ---- train
    "train-edm": [
        ["train", "--dataset", "folder:{digits}", "--steps", "4", "--ckpt-every", "2", "--snapshot-every", "2",
         "--log-every", "2", "--grid-every", "4", "--out", "{case}/run", *TINY_TRAIN]],
    "train-blurring": [
        ["train", "--dataset", "folder:{digits}", "--process", "blurring", "--blur-sigma-max", "20", "--steps", "2",
         "--grid-every", "0", "--log-every", "0", "--out", "{case}/run", *TINY_TRAIN],
        ["sample", "--checkpoint", "{case}/run", "--n", "3", "--steps", "5", "--strip", "--gif", "--out", "{case}/s",
         "--device", "cpu"],
        ["sample", "--show-forward", "{digits}/class0/0.png", "--checkpoint", "{case}/run", "--out", "{case}/fwd"]],
    # ---- sample: the shipped models and the tiny run, samplers, CFG, SEG (--blur), PG (--pg-factor), strip, GIF
    "sample-shipped-cfg-strip-gif": [
        ["sample", "--n", "2", "--labels", "3,7", "--steps", "3", "--cfg", "2", "--strip", "--gif",
         "--out", "{case}/out", "--device", "cpu"]],
    "sample-shipped-seg-cfg": [
        ["sample", "--n", "2", "--labels", "4", "--steps", "2", "--sampler", "euler", "--blur", "gaussian_-1_1",
         "--cfg", "2", "--out", "{case}/out", "--device", "cpu"]],
    "sample-shipped-seg-pg-dpmpp": [
        ["sample", "--n", "2", "--steps", "2", "--blur", "gaussian_-1_1", "--pg-factor", "1.7", "--sampler",
         "dpmpp_2m", "--out", "{case}/out", "--device", "cpu"]],
    "sample-run-stochastic-heun": [
        ["sample", "--checkpoint", "{run}", "--n", "4", "--steps", "3", "--sampler", "stochastic_heun", "--seed", "7",
         "--batch-size", "3", "--out", "{case}/out", "--device", "cpu"]],
    "sample-run-ddim-eta-strip": [
        ["sample", "--checkpoint", "{run}", "--n", "3", "--steps", "3", "--sampler", "ddim", "--eta", "1",
         "--labels", "2,0", "--strip", "--out", "{case}/out", "--device", "cpu"]],
    "sample-run-dpmpp-cfg": [
        ["sample", "--checkpoint", "{run}", "--n", "3", "--steps", "3", "--sampler", "dpmpp_2m", "--cfg", "3",
         "--out", "{case}/out", "--device", "cpu"]],
    "sample-run-pg-x0": [
        ["sample", "--checkpoint", "{run}", "--n", "3", "--batch-size", "3", "--labels", "0", "--steps", "3",
         "--kernel", "x0", "--pg-factor", "20", "--sampler", "euler_ancestral", "--out", "{case}/out",
         "--device", "cpu"]],
    "sample-blurring-strip-gif": [
        ["sample", "--checkpoint", "mnist-blurring", "--n", "2", "--labels", "1,8", "--steps", "4", "--strip",
         "--gif", "--out", "{case}/out", "--device", "cpu"]],
    "sample-show-forward": [
        ["sample", "--show-forward", "{digits}/class1/0.png", "--blur-sigma-max", "12", "--gif", "--seed", "3",
         "--out", "{case}/out"]],
    "sample-circle-context": [
        ["sample", "--checkpoint", "circle-jumping", "--context", "1", "--n", "2", "--steps", "2", "--sampler", "euler",
         "--out", "{case}/out", "--device", "cpu"]],
    "sample-config-file": [
        ["sample", "--config", "{case}/c.toml", "--n", "2", "--out", "{case}/out", "--device", "cpu"]],
    "rerun-sample": [
        ["sample", "--n", "3", "--steps", "2", "--labels", "2,5", "--sampler", "euler_ancestral", "--seed", "9",
         "--out", "{case}/digits", "--device", "cpu"],
        ["rerun", "{case}/digits/run.json", "--out", "{case}/again"]],
    "sweep-sample-digits": [
        ["sweep", "sample", "--n", "4", "--steps", "2", "--labels", "1,7", "--sampler", "euler", "--device", "cpu",
         "--grid", "cfg=1,2", "--score", "digits", "--out", "{case}/sweep"]],
    # ---- seg, panorama, anagram on tiny pipelines
    "seg-sd": [
        ["seg", "a cat", "--model", "{sd}", "--steps", "2", "--n", "2", "--width", "32", "--blur", "gaussian_-1_2",
         "--blur", "ema_0.1_0.9_cosine", "--layers", "down,mid", "--regions", "begin", "--guidance", "4",
         "--metrics", "--out", "{case}/out", "--device", "cpu"]],
    "seg-sd-pg-ancestral": [
        ["seg", "a cat", "--model", "{sd}", "--steps", "3", "--n", "2", "--pg-factor", "2", "--sampler",
         "euler_ancestral", "--out", "{case}/out", "--device", "cpu"]],
    "seg-sdxl": [
        ["seg", "a cat", "--model", "{sdxl}", "--steps", "2", "--n", "1", "--height", "16", "--width", "32",
         "--cfg", "5", "--blur", "gaussian_-1_1e7", "--blur", "interpolatedBoxBlur_3_0.5", "--layers", "down,mid,up",
         "--out", "{case}/out", "--device", "cpu"]],
    "panorama-sd": [
        ["panorama", "a beach", "--model", "{sd}", "--height", "16", "--width", "40", "--stride", "3", "--steps", "2",
         "--eval-pos", "0,16", "--out", "{case}/wide_images", "--device", "cpu"]],
    "panorama-sd-seg-views-ancestral": [
        ["panorama", "a beach", "--model", "{sd}", "--height", "16", "--width", "40", "--stride", "3", "--steps", "2",
         "--blur", "gaussian_-1_10", "--seg-scale", "3", "--noise", "views", "--sampler", "euler_ancestral",
         "--seed", "3", "--out", "{case}/pano", "--device", "cpu"]],
    "anagram-if": [
        ["anagram", "a horse", "a village", "--views", "identity", "rotate_cw", "--model", "{if1}", "--sr-model",
         "{if2}", "--steps", "2", "--sr-steps", "1", "--frames", "2", "--out", "{case}/ambiguous_images",
         "--device", "cpu"]],
    "anagram-if-seg-jigsaw-then-eval": [
        ["anagram", "--prompts-file", "{case}/pairs.json", "--views", "identity", "jigsaw", "--model", "{if1}",
         "--sr-model", "{if2}", "--steps", "2", "--sr-steps", "1", "--frames", "2", "--pieces", "2",
         "--blur", "ema_0.5_0.9_cosine", "--out", "{case}/ambiguous_images", "--device", "cpu"],
        ["eval", "{case}/ambiguous_images", "--anagram-metrics", "{case}/pairs.json", "--clip-model", "{clip}",
         "--clip-pretrained", "{clip_weights}", "--device", "cpu"]],
    # ---- pg: digits (the tiny run, the shipped next-frame model) and a pipeline
    "pg-run-compare": [
        ["pg", "--checkpoint", "{run}", "--n", "4", "--labels", "all", "--steps", "3", "--pg-factor", "2",
         "--compare", "--out", "{case}/out", "--device", "cpu"]],
    "pg-run-classifier-skip": [
        ["pg", "--checkpoint", "{run}", "--n", "3", "--steps", "3", "--kernel", "classifier", "--pg-grad", "skip",
         "--pg-factor", "20", "--sampler", "stochastic_heun", "--seed", "5", "--out", "{case}/out",
         "--device", "cpu"]],
    "pg-circle-centroid-compare": [
        ["pg", "--checkpoint", "circle-jumping", "--context", "0", "--n", "3", "--steps", "2", "--sampler", "euler",
         "--kernel", "centroid", "--pg-factor", "5", "--compare", "--out", "{case}/out", "--device", "cpu"]],
    "pg-sd-clip-compare": [
        ["pg", "a photo of a dog", "--model", "{sd}", "--n", "3", "--steps", "3", "--sampler", "euler",
         "--pg-factor", "3", "--cfg", "3", "--kernel", "clip", "--clip-model", "{clip}", "--clip-pretrained",
         "{clip_weights}", "--compare", "--out", "{case}/out", "--device", "cpu"]],
    # ---- eval
    "eval-digits-fid-kid": [
        ["sample", "--n", "6", "--labels", "all", "--steps", "2", "--sampler", "euler", "--out", "{case}/digits",
         "--device", "cpu"],
        ["eval", "{case}/digits", "--digits", "--fid", "{digits}", "--kid", "{digits}", "--features", "mnist",
         "--kid-subsets", "2", "--kid-subset-size", "4", "--device", "cpu"]],
    "eval-clip-panorama": [
        ["panorama", "a beach", "--model", "{sd}", "--height", "16", "--width", "32", "--stride", "4", "--steps", "2",
         "--eval-pos", "0,8,16", "--out", "{case}/wide_images", "--device", "cpu"],
        ["eval", "{case}/wide_images", "--app", "wide_images", "--clip-model", "{clip}", "--clip-pretrained",
         "{clip_weights}", "--device", "cpu"]],
}

# input files a case writes into its folder before its commands run (hashed with its outputs)
CASE_FILES: dict[str, dict[str, str]] = {
    "sample-config-file": {"c.toml": 'n = 3\nsteps = 2\nlabels = "4"\ncfg = 2.0\nseg-scale = 1.5\n'
                                     'blur = ["gaussian_-1_1"]\n'},
    "anagram-if-seg-jigsaw-then-eval": {"pairs.json": json.dumps({
        "horse-village": {"canonical_prompt": "a horse", "instance_prompt": "a village"},
        "cat-dog": {"canonical_prompt": "a cat", "instance_prompt": "a dog"}})},
}


# ---------------------------------------------------------------- hashing

def scrub(obj: Any, places: list[tuple[str, str]]) -> Any:
    """The JSON value with VOLATILE_KEYS left out and every temporary path replaced by its placeholder."""
    if isinstance(obj, dict):  # keys too: eval.json is keyed by image paths
        return {scrub(k, places): scrub(v, places) for k, v in obj.items() if k not in VOLATILE_KEYS}
    if isinstance(obj, list):
        return [scrub(v, places) for v in obj]
    if isinstance(obj, str):
        for path, name in places:
            obj = obj.replace(path, name)
        return obj
    return obj


def canonical(obj: Any, places: list[tuple[str, str]]) -> bytes:
    return json.dumps(scrub(obj, places), sort_keys=True).encode()


def safetensors_digest(data: bytes, places: list[tuple[str, str]]) -> bytes:
    """The header (dtypes, shapes, offsets), the tensor bytes, and the metadata values read as JSON and scrubbed."""
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + size])
    meta = header.pop("__metadata__", None) or {}
    for k, v in meta.items():
        try:
            meta[k] = json.loads(v)
        except ValueError:
            pass
    return canonical({"header": header, "metadata": meta}, places) + data[8 + size:]


SETTINGS_CHUNKS = (b"diffcli", b"parameters")  # the generation settings diffcli's PNGs carry (shared/image_settings.py)


def png_split(data: bytes) -> tuple[bytes, dict[str, str]]:
    """A PNG's bytes without the settings chunks (what the file would be without them: its pixels and the rest,
    byte for byte) and those chunks' texts by key."""
    kept, texts, pos = [data[:8]], {}, 8
    while pos + 8 <= len(data):
        (size,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + size]
        chunk = data[pos:pos + 12 + size]
        pos += 12 + size
        key = body.split(b"\0", 1)[0]
        if kind in (b"tEXt", b"iTXt") and key in SETTINGS_CHUNKS:
            rest = body[len(key) + 1:]
            if kind == b"iTXt":  # compression flag and method, language tag, translated keyword, then the text
                compressed, rest = rest[0], rest[2:].split(b"\0", 2)[2]
                rest = zlib.decompress(rest) if compressed else rest
            texts[key.decode()] = rest.decode("utf-8" if kind == b"iTXt" else "latin-1")
            continue
        kept.append(chunk)
    return b"".join(kept), texts


def file_digest(path: Path, places: list[tuple[str, str]]) -> str:
    data = path.read_bytes()
    name = path.name
    if name.endswith(".png"):
        data = png_split(data)[0]
    elif name.endswith(".json"):
        data = canonical(json.loads(data), places)
    elif name.endswith(".jsonl"):
        data = b"\n".join(canonical(json.loads(line), places) for line in data.splitlines() if line.strip())
    elif name.endswith(".safetensors"):
        data = safetensors_digest(data, places)
    return hashlib.sha256(data).hexdigest()


def settings_digest(path: Path, places: list[tuple[str, str]]) -> str | None:
    """The settings a PNG carries, scrubbed as JSON is (paths as placeholders, versions left out): its own entry
    `<file>#settings` beside the file's, so a change of settings and a change of pixels read apart."""
    texts = png_split(path.read_bytes())[1]
    if not texts:
        return None
    settings = {"diffcli": json.loads(texts["diffcli"]) if "diffcli" in texts else None,
                "parameters": texts.get("parameters")}
    return hashlib.sha256(canonical(settings, places)).hexdigest()


def folder_digests(folder: Path, places: list[tuple[str, str]]) -> dict[str, str]:
    digests = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            rel = p.relative_to(folder).as_posix()
            digests[rel] = file_digest(p, places)
            settings = settings_digest(p, places) if p.name.endswith(".png") else None
            if settings is not None:
                digests[rel + "#settings"] = settings
    return digests


# ---------------------------------------------------------------- running the cases

@pytest.fixture(scope="module")
def inputs(tmp_path_factory, digit_folder, tiny_run, tiny_sd, tiny_sdxl) -> dict[str, Path]:
    """Every input a case reads, by placeholder name."""
    from pipes import build_tiny_clip, build_tiny_if
    if1, if2 = build_tiny_if(tmp_path_factory.mktemp("golden-if"))
    clip_dir = tmp_path_factory.mktemp("golden-clip")
    clip, clip_weights, _ = build_tiny_clip(clip_dir, "tinyclip-golden", seed=0)
    return {"digits": digit_folder, "run": tiny_run, "sd": tiny_sd, "sdxl": tiny_sdxl, "if1": if1, "if2": if2,
            "clip": clip, "clip_weights": clip_weights}


def run_case(name: str, case_dir: Path, inputs: dict[str, Path], capsys, monkeypatch) -> dict[str, str]:
    """Run a case's command lines in a fresh folder; the digest of every file under it, or ValueError naming the
    command that failed."""
    case_dir.mkdir(parents=True)
    monkeypatch.chdir(case_dir)  # run.json records the working folder
    for rel, text in CASE_FILES.get(name, {}).items():
        (case_dir / rel).write_text(text)
    fill = {k: str(v) for k, v in {**inputs, "case": case_dir}.items()}
    for argv in CASES[name]:
        code, _, err = invoke_cli([a.format(**fill) for a in argv], capsys)
        if code != 0:
            last = err.strip().splitlines()[-1] if err.strip() else ""
            raise ValueError(f"diffcli {' '.join(argv)} exited {code}: {last}")
    # longest first: a path inside another is replaced as itself
    places = sorted([(str(v), f"<{k}>") for k, v in {**inputs, "case": case_dir, "repo": ROOT}.items()],
                    key=lambda p: -len(p[0]))
    return folder_digests(case_dir, places)


def run_all(root: Path, inputs: dict[str, Path], capsys, monkeypatch) -> tuple[dict[str, dict[str, str]], list[str]]:
    """Every case, each in root/<case>: (case -> relative path -> sha256, the failed commands)."""
    digests, failures = {}, []
    for name in CASES:
        try:
            digests[name] = run_case(name, root / name, inputs, capsys, monkeypatch)
        except ValueError as e:
            failures.append(f"{name}: {e}")
    return digests, failures


def compare(golden: dict[str, dict[str, str]], got: dict[str, dict[str, str]]) -> list[str]:
    """One line per case or file that is not as golden: differs, missing, extra."""
    problems = []
    for case in sorted(set(golden) | set(got)):
        want, have = golden.get(case), got.get(case)
        if want is None:
            problems.append(f"{case}: a case golden.json does not hold (regenerate it)")
        elif have is None:
            problems.append(f"{case}: in golden.json but not run")
        else:
            for path in sorted(set(want) | set(have)):
                if path not in have:
                    problems.append(f"{case}: missing {path}")
                elif path not in want:
                    problems.append(f"{case}: extra {path}")
                elif want[path] != have[path]:
                    problems.append(f"{case}: differs {path}")
    return problems


def environment() -> dict[str, str]:
    """What the hashes depend on besides diffcli: the processor architecture and the numeric/image libraries."""
    from importlib import metadata
    return {"machine": platform.machine(), **{p: metadata.version(p) for p in PACKAGES}}


def test_outputs_match_golden(inputs, tmp_path, capsys, monkeypatch):
    if not WRITE and ENVIRONMENT.is_file():
        recorded, here = json.loads(ENVIRONMENT.read_text()), environment()
        changed = [f"{k} {recorded.get(k)} -> {v}" for k, v in here.items() if recorded.get(k) != v]
        if changed:  # float rounding and encoders differ: the hashes say nothing about diffcli here
            pytest.skip("golden.json was written with other versions (" + ", ".join(changed) + ")")
    got, failures = run_all(tmp_path / "a", inputs, capsys, monkeypatch)
    if not WRITE:
        assert GOLDEN.is_file(), "tests/golden.json is missing; generate it with DIFFCLI_GOLDEN_WRITE=1"
        failed = {line.split(":")[0] for line in failures}
        problems = failures + compare({k: v for k, v in json.loads(GOLDEN.read_text()).items() if k not in failed},
                                      got)
        assert not problems, ("outputs differ from tests/golden.json (regenerate it with DIFFCLI_GOLDEN_WRITE=1 "
                              "only if the change is meant):\n  " + "\n  ".join(problems))
        return
    assert not failures, "golden.json not written:\n  " + "\n  ".join(failures)
    # every case again, after all the others and in other folders: its outputs may depend on neither
    again, failures = run_all(tmp_path / "b", inputs, capsys, monkeypatch)
    unstable = failures + compare(got, again)
    assert not unstable, "not deterministic, golden.json not written:\n  " + "\n  ".join(unstable)
    GOLDEN.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
    ENVIRONMENT.write_text(json.dumps(environment(), indent=1) + "\n")
