"""The 003 grader's CLIP-score protocol, exactly: which files it scores and under which prompt (wide_images drops
the crop position, ambiguous_images maps `_` to space), the per-prompt means and eval.json's layout (source_dir,
the first image path of each prompt -> its mean, score), its grade; and the Visual Anagrams record beside it.

Embeddings come from `clip_model`, the numbers from `metrics`; this module only maps files to prompts and
numbers to records.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from ..shared.errors import DiffcliError
from ..shared.files import read_json_option, some_names
from .image_folders import list_pngs
from ..core.metrics import anagram_scores

APPS = ("wide_images", "ambiguous_images")
GRADES = ((0.28, "full marks"), (0.26, "half marks"))  # 003's thresholds on the CLIP score


def prompt_from_name(name: str, app: str) -> str | None:
    """The grader's prompt for a file: wide drops the last `_`-token (crop position), ambiguous maps `_` to space.

    None for a name outside the protocol (hidden file, or nothing left for a prompt).
    """
    if name.startswith("."):
        return None
    tokens = name[:-len(".png")].split("_")
    if app == "wide_images":
        tokens = tokens[:-1]
    prompt = " ".join(tokens)
    return prompt if prompt.strip() else None


def has_crop_position(name: str) -> bool:
    return name[:-len(".png")].rsplit("_", 1)[-1].isdigit()


@dataclass
class ClipFile:
    name: str
    path: str      # os.path.join(source_dir as typed, name): the grader's key for a prompt's first image
    prompt: str


def plan_clip_files(folder: str, app: str, drop_panoramas: bool = False) -> tuple[list[ClipFile], list[str]]:
    """The files the grader scores, each with its prompt, and notes naming what it does with odd names."""
    pngs, notes = list_pngs(folder)
    files, bad, panoramas = [], [], []
    for name in pngs:
        prompt = prompt_from_name(name, app)
        if prompt is None:
            bad.append(name)
            continue
        if app == "wide_images" and not has_crop_position(name):
            panoramas.append(f"{name} -> '{prompt}'")
            if drop_panoramas:
                continue
        files.append(ClipFile(name, os.path.join(folder, name), prompt))
    if not files:
        why = f"; skipped: {some_names(bad)}" if bad else ""
        raise DiffcliError(f"none of the {len(pngs)} PNG(s) in {folder} is named as the {app} protocol expects"
                           f" ({'<prompt>_<crop position>.png' if app == 'wide_images' else '<prompt>.png'}){why}")
    if bad:
        notes.append(f"skipped {len(bad)} PNG(s) whose names give no prompt under the {app} protocol: {some_names(bad)}")
    if panoramas and drop_panoramas:
        notes.append(f"drop_panoramas: left out {len(panoramas)} file(s) with no crop position (the grader would "
                     f"score them, so this score differs from its): {some_names(panoramas)}")
    elif panoramas:
        notes.append(f"{len(panoramas)} file(s) have no crop position (a full panorama left in the folder?); the "
                     f"grader scores each under its name minus the last word, usually as a prompt group of its own, "
                     f"and so does this score (drop_panoramas leaves them out): {some_names(panoramas)}")
    return files, notes


def group_prompts(files: Sequence[ClipFile]) -> tuple[list[str], list[str], torch.Tensor]:
    """Prompts in order of first appearance, the first file path of each, and each file's prompt index."""
    order: dict[str, int] = {}
    first_paths: list[str] = []
    for f in files:
        if f.prompt not in order:
            order[f.prompt] = len(order)
            first_paths.append(f.path)
    return list(order), first_paths, torch.tensor([order[f.prompt] for f in files], dtype=torch.long)


def clip_score_record(source_dir: str, first_paths: Sequence[str], prompt_means: torch.Tensor) -> dict[str, Any]:
    """The grader's eval.json layout: source_dir, the first image path of each prompt -> its mean, score."""
    record: dict[str, Any] = {"source_dir": source_dir}
    record.update({p: float(m) for p, m in zip(first_paths, prompt_means)})
    record["score"] = float(prompt_means.mean())
    return record


def grade(score: float) -> str:
    return next((f"003 grade: {name} (>= {t})" for t, name in GRADES if score >= t), "003 grade: none (< 0.26)")


# ---------------------------------------------------------------- Visual Anagrams

def read_anagram_pairs(path: str, option: str = "anagram_prompts") -> dict[str, tuple[str, str]]:
    """003's ambiguous_image_prompts.json: key -> (canonical_prompt, instance_prompt); the prompt fields count.
    `option` names the setting in messages."""
    data = read_json_option(path, option, "prompt file")
    pairs = {}
    for key, rec in (data.items() if isinstance(data, dict) else []):
        if not (isinstance(rec, dict) and isinstance(rec.get("canonical_prompt"), str)
                and isinstance(rec.get("instance_prompt"), str)):
            raise DiffcliError(f"{path}: entry {key!r} needs string fields canonical_prompt and instance_prompt")
        pairs[key] = (rec["canonical_prompt"], rec["instance_prompt"])
    if not pairs:
        raise DiffcliError(f"{path} holds no anagram pairs ({{key: {{canonical_prompt, instance_prompt}}}})")
    return pairs


def anagram_record(pairs: dict[str, tuple[str, str]], prompts: Sequence[str], first_paths: Sequence[str],
                   image_emb: torch.Tensor, prompt_index: torch.Tensor, text_emb: torch.Tensor,
                   logit_scale: float, prompts_file: str) -> tuple[dict[str, Any], list[str]]:
    """Alignment/concealment per pair (views = the images named by the pair's two prompts) and their means."""
    first_image = {p: int((prompt_index == i).nonzero()[0]) for i, p in enumerate(prompts)}
    kept, missing, sims = [], [], []
    for key, views in pairs.items():
        absent = [p for p in views if p not in first_image]
        if absent:
            missing.append(f"{key} (no {', '.join(p.replace(' ', '_') + '.png' for p in absent)})")
            continue
        img = image_emb[[first_image[p] for p in views]]
        txt = text_emb[[prompts.index(p) for p in views]]
        sims.append(img @ txt.T)
        kept.append((key, views))
    if not kept:
        expected = [p.replace(" ", "_") + ".png" for p in next(iter(pairs.values()))]
        raise DiffcliError(f"anagram metrics: no pair of {prompts_file} has both of its images in the folder "
                           f"(expected e.g. {some_names(expected)})")
    sim = torch.stack(sims)
    alignment, concealment = anagram_scores(sim, logit_scale)
    per_pair = {key: {"views": [first_paths[prompts.index(p)] for p in views], "prompts": list(views),
                      "similarity": [[float(v) for v in row] for row in s],
                      "alignment": float(a), "concealment": float(c)}
                for (key, views), s, a, c in zip(kept, sim, alignment, concealment)}
    record = {"prompts_file": prompts_file, "logit_scale": float(logit_scale), "pairs": per_pair,
              "alignment": float(alignment.double().mean()), "concealment": float(concealment.mean())}
    notes = [f"anagram metrics: skipped {len(missing)} pair(s) with a view missing: {some_names(missing)}"]
    return record, notes if missing else []
