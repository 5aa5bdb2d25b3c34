"""Scoring folders, as `diffcli eval` does: check the options, read every input, compute what was asked, write
eval.json (the command itself, in eval.py, prints the lines and the several-folders summary).

The parts live where their job is: `grading` (the 003 CLIP-score protocol and eval.json's layout), `clip_model`
(open_clip model, weights, embeddings), `fid` (clean-fid's references, readers and features), `classifier`
(digits), `metrics` (the numbers), `image_folders` (which files count, decoded up front). Input is checked where
it is read and problems raise DiffcliError before any model loads; `run` returns what the command prints. Under
torchrun the ranks share the reading and the per-image networks, and rank 0 computes every aggregate from the
gathered values and writes the eval.json one process would (see `run`).
"""
from __future__ import annotations

import csv
import os
import stat
from dataclasses import dataclass, replace
from glob import glob
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from .backends.classifier import SHIPPED_CLASSIFIER, classify, load_classifier, read_digit, stack_digits
from .backends.clip_model import Clip, embed_image_files, embed_prompts, encode_images, load_clip
from .data.sync_scores import SYNC_APPS, crop_pictures, region_crops, region_record, seam_record
from .shared.images import BATCH_SIZE
from .shared.errors import DiffcliError
from .shared.files import atomic_path, write_json
from .shared.progress import progress_bar
from .shared.dist import Dist, batch_share, per_image, read_each
from .data.fid import (FEATURES, Reference, feature_extractor, feature_files, folder_features, parse_reference,
                       reference_statistics)
from .data.grading import (APPS, ClipFile, anagram_record, clip_score_record, grade, group_prompts, plan_clip_files,
                           read_anagram_pairs)
from .data.image_folders import (EVAL_FILE, check_images, conversion_warnings, file_kind, grader_chokes,
                                 read_digit_samples)
from .shared.limits import BATCH_MAX, KID_SUBSETS_MAX, N_MAX
from .shared.fields import check_fields, opt
from .shared.inputs import read_json, shown
from .shared.libraries import library_warnings
from .core.metrics import cosine_per_image, digit_record, frechet_distance, group_means, kernel_distance

OTHER_FAMILIES = ("fid", "kid", "digits", "regions", "seam")  # eval.json keys a CLIP run leaves in place; the rest is the CLIP part


@dataclass
class EvalConfig:
    folder: str                        # as typed: the grader writes it verbatim into eval.json
    app: str | None = opt(None, "--app", name="app_name", panel="input",
                          help="003 CLIP score: wide_images (<prompt>_<crop pos>.png) or ambiguous_images "
                               "(<prompt>.png); or a panorama folder's regions (CLIP score of each region's crop "
                               "against its prompt, from OUT.run.json) or seam (the 360-degree join's change "
                               "against the change inside).")
    clip_model: str = opt("ViT-B-32", "--clip-model", panel="model",
                          help="open_clip model name, or a JSON model config file (embed_dim, vision_cfg, text_cfg), "
                               "registered at run time under its file name.")
    clip_pretrained: str = opt("openai", "--clip-pretrained", panel="model",
                               help="open_clip pretrained tag (from the cache, downloaded where a network exists) or a "
                                    "local weights file: safetensors or a torch state dict (read with "
                                    "weights_only=True).")
    # None: what the weights were trained with (OpenAI: QuickGELU)
    quick_gelu: bool | None = opt(None, "--quick-gelu/--no-quick-gelu", panel="model",
                                  help="Activation of the CLIP model (default: what the weights were trained with; a "
                                       "local file counts as the OpenAI weights: QuickGELU for ViT-B-32).")
    anagram_prompts: str | None = opt(None, "--anagram-metrics", name="anagram_metrics", metavar="PROMPTS_JSON", panel="input",
                                      help="Also Visual Anagrams alignment/concealment per pair of this 003 prompt "
                                           "file (implies --app ambiguous_images).")
    drop_panoramas: bool = opt(False, "--drop-panoramas", panel="input",
                               help="wide_images: leave out files with no crop position (the grader scores them; the "
                                    "score then differs).")
    fid: str | None = opt(None, "--fid", metavar="REF", panel="input",
                          help="FID against a reference folder, or a dataset clean-fid has statistics for "
                               "(NAME[:RES[:SPLIT]], e.g. cifar10:32:train).")
    kid: str | None = opt(None, "--kid", metavar="REF", panel="input",
                          help="KID against a reference folder or dataset, as --fid.")
    features: str = opt("inception", "--features", panel="model",
                        help="FID/KID features: inception (clean-fid's) or mnist (the digit classifier's 128-d "
                             "penultimate layer; offline).")
    classifier: str | None = opt(None, "--classifier", panel="model",
                                 help="Digit classifier for --digits and --features mnist (default: the shipped one).")
    digits: bool = opt(False, "--digits", panel="input",
                       help="Class accuracy against the labels in the folder's run.json, modes discovered, in-batch "
                            "similarity.")
    kid_subsets: int = opt(100, "--kid-subsets", panel="sampling", check="count", high=KID_SUBSETS_MAX,
                           help="KID: number of random subsets (clean-fid's default).")
    kid_subset_size: int = opt(1000, "--kid-subset-size", panel="sampling", check="count", low=2, high=N_MAX,
                               help="KID: largest subset size (clean-fid's default).")
    batch_size: int = opt(BATCH_SIZE, "--batch-size", panel="model", check="count", high=BATCH_MAX,
                          help="Images per network batch.")
    device: str | None = None          # the command line's --device (RunContext)




def validate(cfg: EvalConfig) -> None:
    if cfg.app is not None and cfg.app not in APPS + SYNC_APPS:
        raise DiffcliError(f"unknown --app {cfg.app!r}; choose {' or '.join(APPS + SYNC_APPS)}")
    if cfg.anagram_prompts and cfg.app in SYNC_APPS:
        raise DiffcliError(f"--anagram-metrics scores ambiguous images; it cannot go with --app {cfg.app}")
    if cfg.anagram_prompts and cfg.app == "wide_images":
        raise DiffcliError("--anagram-metrics scores ambiguous images; it cannot go with --app wide_images")
    if not (cfg.app or cfg.anagram_prompts or cfg.fid or cfg.kid or cfg.digits):
        raise DiffcliError("nothing to evaluate: pass --app wide_images|ambiguous_images|regions|seam, --fid REF, --kid REF "
                           "or --digits")
    if cfg.features not in FEATURES:
        raise DiffcliError(f"unknown --features {cfg.features!r}; choose {' or '.join(FEATURES)}")
    if cfg.batch_size < 1:
        raise DiffcliError("--batch-size must be >= 1")
    if cfg.kid_subsets < 1 or cfg.kid_subset_size < 2:
        raise DiffcliError("--kid-subsets must be >= 1 and --kid-subset-size >= 2")
    check_fields(cfg, ["batch_size", "kid_subsets", "kid_subset_size"])  # the upper limits


def check_eval_file(folder: str) -> None:
    """eval.json is replaced atomically at the end: refuse up front an eval.json that is not a plain file (a
    folder, a symlink, a FIFO: it is neither read nor overwritten)."""
    path = Path(folder) / EVAL_FILE
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        return
    if not stat.S_ISREG(mode):
        raise DiffcliError(f"{path} exists and is {file_kind(path)}, not a file eval can replace; move it away")


def merge_eval(folder: str, clip_part: dict[str, Any] | None, families: dict[str, Any]) -> dict[str, Any]:
    """A CLIP run rewrites the grader's part of eval.json; fid/kid/digits replace only their own keys."""
    old: dict[str, Any] = {}
    try:
        if stat.S_ISREG(os.lstat(Path(folder) / EVAL_FILE).st_mode):  # checked up front; never read a FIFO
            loaded = read_json((Path(folder) / EVAL_FILE), "eval.json")
            old = loaded if isinstance(loaded, dict) else {}
    except (OSError, ValueError):
        pass
    if clip_part is None:
        clip_part = {k: v for k, v in old.items() if k not in OTHER_FAMILIES}
    rest = {k: families.get(k, old.get(k)) for k in OTHER_FAMILIES if k in families or k in old}
    return {**clip_part, **rest}


def run(cfg: EvalConfig) -> dict[str, Any]:
    """Read and check every input, compute what was asked, write eval.json; returns lines and warnings to print.

    Under torchrun every rank reads the inputs, decodes its share of the images and computes the per-image values
    (CLIP image embeddings, FID/KID features, digit logits) for its share of whole batches; rank 0 gathers them in
    item order, computes every aggregate and writes eval.json, so the file is the one a single process writes.
    """
    validate(cfg)
    if cfg.anagram_prompts and cfg.app is None:
        cfg.app = "ambiguous_images"
    with Dist(cfg.device) as dist:
        return _run(cfg, dist)


def _run(cfg: EvalConfig, dist: Dist) -> dict[str, Any]:
    device, bs = dist.device, cfg.batch_size
    notes: list[str] = []
    check_eval_file(cfg.folder)

    # ---- read everything first, so bad input fails before any model loads
    clip_files = pairs = crops = seam = None
    if cfg.app == "regions":
        crops = region_crops(cfg.folder)
    elif cfg.app == "seam":
        seam = seam_record(cfg.folder)
    elif cfg.app:
        clip_files, n = plan_clip_files(cfg.folder, cfg.app, cfg.drop_panoramas)
        notes += n + conversion_warnings(check_images([f.path for f in clip_files], dist))
        if dist.main:  # every entry the real grader opens and would choke on, one line each
            notes += grader_chokes(cfg.folder, decoded=[f.name for f in clip_files])
        if cfg.anagram_prompts:
            pairs = read_anagram_pairs(cfg.anagram_prompts, "--anagram-metrics")
    refs: dict[str, Reference] = {}  # "fid" / "kid" -> its reference
    for name, spec in (("fid", cfg.fid), ("kid", cfg.kid)):
        if spec:
            refs[name] = parse_reference(spec, f"--{name}")
            if refs[name].dataset and cfg.features != "inception":
                raise DiffcliError(f"--{name} {spec}: clean-fid's dataset statistics are Inception features; "
                                   f"pass a reference folder with --features {cfg.features}")
    gen_files: list[str] = []
    ref_files: dict[str, list[str]] = {}
    if refs:
        gen_files, n = feature_files(cfg.folder, "folder", dist)
        notes += n
        for r in refs.values():
            if r.folder and r.folder not in ref_files:
                ref_files[r.folder], n = feature_files(r.folder, "reference folder", dist)
                notes += n
    digit_labels = None
    if cfg.digits:
        digit_files, digit_labels, n = read_digit_samples(cfg.folder)
        notes += n
        digit_arrays = read_each(dist, digit_files, read_digit, batch_share(dist, digit_files, bs))

    # ---- per-image work: this rank's share, gathered on rank 0 in item order
    clip = image_emb = None
    if clip_files:
        clip = load_clip(cfg.clip_model, cfg.clip_pretrained, device, cfg.quick_gelu)

        def embed(paths: Sequence[str]) -> torch.Tensor:
            with progress_bar("CLIP", len(paths), disable=not dist.main) as advance:
                return embed_image_files(clip, paths, bs, on_batch=advance)
        image_emb = per_image(dist, batch_share(dist, [f.path for f in clip_files], bs), bs, embed)
    classifier_path = cfg.classifier or SHIPPED_CLASSIFIER
    digit_classifier = None
    feats: dict[str, np.ndarray] = {}
    if refs:
        if cfg.features == "mnist":
            digit_classifier = load_classifier(classifier_path, device)
        extractor, resize = feature_extractor(cfg.features, device, digit_classifier)
        for p, f in [("", gen_files), *ref_files.items()]:
            feats[p] = per_image(dist, batch_share(dist, f, bs), bs,
                                 lambda share: folder_features(share, extractor, resize, bs, device, dist.main))
    digit_out = None
    if cfg.digits:
        digit_classifier = digit_classifier or load_classifier(classifier_path, device)
        digit_out = per_image(dist, digit_arrays, bs,
                              lambda arrays: classify(digit_classifier, stack_digits(arrays), bs, device))

    # ---- every aggregate on rank 0, from the per-image values in item order; then eval.json
    def aggregate() -> dict[str, Any]:
        lines: list[str] = []
        clip_part = None
        if clip_files:
            clip_part = clip_metrics(cfg, clip, clip_files, image_emb, pairs, lines, notes)
        families: dict[str, Any] = {}
        if crops:
            families["regions"] = region_scores(cfg, crops, device)
            lines.append(f"region CLIP score {families['regions']['score']:.4f} over {len(crops)} region(s)")
        if seam:
            families["seam"] = seam
            lines.append(f"seam: the join changes {seam['ratio']:.3f}x as much as neighbouring columns inside "
                         f"({len(seam['images'])} panorama(s))")
        if refs:
            families.update(fid_kid(cfg, refs, feats, len(gen_files), lines, notes))
        if cfg.digits:
            rec = digit_record(*digit_out, digit_labels)
            families["digits"] = {**rec, "classifier": str(classifier_path)}
            acc = f"accuracy {100 * rec['accuracy']:.2f} %, " if "accuracy" in rec else ""
            sim = f"{rec['mean_similarity']:.4f}" if rec["mean_similarity"] is not None else "n/a"
            lines.append(f"digits: {acc}{rec['modes_discovered']} modes discovered, mean in-batch similarity {sim} "
                         f"({rec['n']} samples)")
        out = Path(cfg.folder) / EVAL_FILE
        write_json(out, merge_eval(cfg.folder, clip_part, families), indent=4)
        return {"eval_file": str(out), "lines": lines, "warnings": notes, "eval": read_json(out, "eval.json")}

    result = dist.main_first(aggregate, failure="rank 0 could not compute the scores (see its message)")
    return {**(result or {}), "main": dist.main}


def clip_metrics(cfg: EvalConfig, clip: Clip, clip_files: Sequence[ClipFile], image_emb: torch.Tensor,
                 pairs: dict[str, tuple[str, str]] | None, lines: list[str], notes: list[str]) -> dict[str, Any]:
    """The grader's part of eval.json (+ anagram metrics) from the image embeddings in file order."""
    prompts, first_paths, prompt_index = group_prompts(clip_files)
    text_emb = embed_prompts(clip, prompts, cfg.batch_size)
    means = group_means(cosine_per_image(image_emb, text_emb, prompt_index), prompt_index, len(prompts))
    clip_part = clip_score_record(cfg.folder, first_paths, means)
    lines.append(f"CLIP score {clip_part['score']:.4f} ({cfg.app}: {len(prompts)} prompts, {len(clip_files)} "
                 f"images; {clip.weights}{', QuickGELU' if clip.quick_gelu else ''}); {grade(clip_part['score'])}")
    if pairs is not None:
        scale = float(clip.model.logit_scale.exp().reshape(-1)[0])
        clip_part["anagram_metrics"], n = anagram_record(pairs, prompts, first_paths, image_emb, prompt_index,
                                                         text_emb, scale, cfg.anagram_prompts)
        notes += n
        am = clip_part["anagram_metrics"]
        lines.append(f"anagram alignment {am['alignment']:.4f}, concealment {am['concealment']:.4f} "
                     f"over {len(am['pairs'])} pair(s)")
    return clip_part


def region_scores(cfg: EvalConfig, crops: list, device: torch.device) -> dict[str, Any]:
    """eval.json's regions family: each region's crop against its own prompt (raw CLIP cosine, as the grader's)."""
    clip = load_clip(cfg.clip_model, cfg.clip_pretrained, device, cfg.quick_gelu)
    pixels = torch.stack([clip.preprocess(p) for p in crop_pictures(crops)])
    image_emb = torch.cat([encode_images(clip.model, pixels[a:a + cfg.batch_size].to(clip.device)).cpu()
                           for a in range(0, len(pixels), cfg.batch_size)])
    prompts = sorted({c.prompt for c in crops})
    text_emb = embed_prompts(clip, prompts, cfg.batch_size)
    index = torch.tensor([prompts.index(c.prompt) for c in crops])
    return {**region_record(crops, cosine_per_image(image_emb, text_emb, index)), "clip_model": clip.weights}


def covariance_notes(what: str, n: int, dims: int) -> list[str]:
    """FID compares covariances of `dims`-dimensional features; n images give one of rank at most n - 1, so with
    n <= dims it is singular and the FID's matrix square root unstable. One note saying how many are needed."""
    if n > dims:
        return []
    return [f"FID: {what} has {n} images for {dims} feature dimensions, so its covariance is singular and the FID "
            f"is unstable; it needs more images than feature dimensions: at least {dims + 1} ({dims + 1 - n} more)"]


def fid_kid(cfg: EvalConfig, refs: dict[str, Reference], feats: dict[str, np.ndarray], n_images: int,
            lines: list[str], notes: list[str] | None = None) -> dict[str, Any]:
    """eval.json's fid and kid families from the folder's features (key "") and each reference folder's."""
    families: dict[str, Any] = {}
    common = {"features": cfg.features, "mode": "clean", "n_images": n_images}
    if "fid" in refs:
        r = refs["fid"]
        if r.folder:
            ref = feats[r.folder]
            mu, sigma, n_ref = ref.mean(0), np.cov(ref, rowvar=False), len(ref)
        else:
            mu, sigma = reference_statistics(r, "FID")
            n_ref = None
        notes = notes if notes is not None else []
        said = covariance_notes("the folder", len(feats[""]), feats[""].shape[1])
        said += covariance_notes(f"the reference {r.spec}", n_ref, mu.shape[0]) if n_ref is not None else []
        try:
            with library_warnings(keep=True) as caught:  # scipy's LinAlgWarning says what the notes say
                value = frechet_distance(feats[""], mu, sigma)
        except ValueError as e:
            raise DiffcliError(f"FID is numerically undefined here ({shown(str(e), 80)}); use more images") from None
        if caught and not said:
            said = [f"FID: the covariances' matrix square root was inexact ({shown(str(caught[0].message), 80)}); "
                    "more images make it stable"]
        notes += said
        families["fid"] = {"value": value, "reference": r.spec, **common, "n_reference": n_ref}
        lines.append(f"FID {value:.4f} ({cfg.features} features, {n_images} images vs {r.spec})")
    if "kid" in refs:
        r = refs["kid"]
        ref = feats[r.folder] if r.folder else reference_statistics(r, "KID")
        m = min(len(ref), len(feats[""]), cfg.kid_subset_size)
        value = kernel_distance(feats[""], ref, cfg.kid_subsets, cfg.kid_subset_size)
        families["kid"] = {"value": value, "reference": r.spec, **common, "n_reference": len(ref),
                           "subsets": cfg.kid_subsets, "subset_size": m}
        lines.append(f"KID {value:.6f} ({cfg.features} features, {cfg.kid_subsets} subsets of {m})")
    return families


# ---------------------------------------------------------------- several folders: one table

def scores_of(record: dict[str, Any]) -> dict[str, float]:
    """An eval.json's headline numbers, flat: fid, kid, accuracy, modes, similarity, clip (those it has)."""
    values: dict[str, float] = {}
    for name in ("fid", "kid"):
        if isinstance(record.get(name), dict) and "value" in record[name]:
            values[name] = record[name]["value"]
    digits = record.get("digits") or {}
    for key, name in (("accuracy", "accuracy"), ("modes_discovered", "modes"), ("mean_similarity", "similarity")):
        if digits.get(key) is not None:
            values[name] = digits[key]
    if "score" in record:
        values["clip"] = record["score"]
    return values


def expand_folders(specs: Sequence[str]) -> list[str]:
    """Folders and glob patterns (quoted, so the shell leaves them) -> folders, in order, once each."""
    out: list[str] = []
    for spec in specs:
        matches = sorted(glob(spec)) if any(c in spec for c in "*?[") else [spec]
        if not matches:
            raise DiffcliError(f"no folder matches {spec!r}")
        out += [m for m in matches if m not in out and (m == spec or Path(m).is_dir())]
    return out


def run_many(cfg: EvalConfig, folders: Sequence[str], on_folder: Callable[[str, dict[str, Any] | None, str | None],
             None] | None = None) -> dict[str, Any]:
    """Score each folder as `run` does (its own eval.json); one that cannot be scored is reported and skipped.
    Returns the table rows (folder, scores) and the failures (folder, message)."""
    rows: list[dict[str, Any]] = []
    failures: list[tuple[str, str]] = []
    main = True
    for folder in folders:
        try:
            result = run(replace(cfg, folder=folder))
        except DiffcliError as e:
            failures.append((folder, str(e)))
            if on_folder:
                on_folder(folder, None, str(e))
            continue
        main = result["main"]
        if main:
            rows.append({"folder": folder, "scores": scores_of(result["eval"])})
            if on_folder:
                on_folder(folder, result, None)
    return {"rows": rows, "failures": failures, "main": main}


def write_summary(path: Path, rows: list[dict[str, Any]], failures: list[tuple[str, str]]) -> list[str]:
    """PATH.csv and PATH.json: a row per folder and every score; returns the terminal table's lines."""
    metrics = list(dict.fromkeys(m for r in rows for m in r["scores"]))
    with atomic_path(path.with_suffix(".csv")) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["folder", *metrics])
        for r in rows:
            writer.writerow([r["folder"], *(r["scores"].get(m, "") for m in metrics)])
    write_json(path.with_suffix(".json"), {"rows": rows, "failed": [{"folder": f, "error": e} for f, e in failures]},
               indent=2)
    cells = [[r["folder"], *(_cell(r["scores"].get(m)) for m in metrics)] for r in rows]
    widths = [max(len(c) for c in col) for col in zip(["folder", *metrics], *cells)]
    return ["  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in [["folder", *metrics], *cells]]


def _cell(v: Any) -> str:
    return "-" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))


# ---------------------------------------------------------------- the command
